"""The zone's Prometheus gauges, read from what the zone knows."""

from __future__ import annotations

from hostagent.metrics import ZoneMetrics


def test_zone_metrics_export_hosts_clusters_and_delivery() -> None:
    metrics = ZoneMetrics(
        lambda: {"Ready": 2, "NotReady": 1},
        lambda: {"Provisioning": 0, "Ready": 3, "Degraded": 1, "Deleting": 0},
        lambda: 1,
        lambda: 42,
    )
    text = metrics.render().decode()
    assert 'hostagent_zone_hosts{state="NotReady"} 1.0' in text
    assert 'hostagent_zone_clusters{phase="Degraded"} 1.0' in text
    assert "hostagent_zone_hosts_failing_delivery 1.0" in text
    assert "hostagent_zone_delivery_passes 42.0" in text
