"""pki.local on the real filesystem: its CA directory and modes, removal at the cluster's
end, recovery from a torn write; and the Renewer driving it."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from pki import files, layout
from pki.certset import CaName, NodeIdentity
from pki.errors import BackendUnavailable, PkiError
from pki.local import LocalBackend
from pki.provision import provision_node
from pki.renewal import RenewalTarget, Renewer
from tests.integration.test_pki_backends import check_node_set, load, new_cluster, nodes

pytestmark = pytest.mark.integration


async def test_ca_directory_modes_and_removal(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "state")
    master, _ = nodes(new_cluster())
    await provision_node(backend, master, tmp_path / "m1")
    ca_dir = tmp_path / "state" / "ca" / master.cluster
    assert (tmp_path / "state" / "ca").stat().st_mode & 0o777 == 0o700
    assert ca_dir.stat().st_mode & 0o777 == 0o700
    expected = {f"{ca}.{ext}" for ca in CaName for ext in ("crt", "key")} | {"sa.key", "sa.pub"}
    assert {p.name for p in ca_dir.iterdir()} == expected
    for path in ca_dir.iterdir():
        assert path.stat().st_mode & 0o777 == (0o600 if path.suffix == ".key" else 0o644)
    backend.revoke_cluster(master.cluster)
    assert not ca_dir.exists()
    backend.revoke_cluster(master.cluster)  # again: nothing to do
    # The cluster's name can be used again: a new CA, nothing of the old one.
    await provision_node(backend, master, tmp_path / "again")
    assert load(tmp_path / "again/ca.crt") != load(tmp_path / "m1/ca.crt")


async def test_the_ca_survives_an_agent_restart(tmp_path: Path) -> None:
    _, worker = nodes(new_cluster())
    await provision_node(LocalBackend(tmp_path / "state"), worker, tmp_path / "w1")
    restarted = LocalBackend(tmp_path / "state")
    other = NodeIdentity(worker.cluster, "w2", "worker", "10.42.0.22")
    await provision_node(restarted, other, tmp_path / "w2")
    assert (tmp_path / "w1/ca.crt").read_bytes() == (tmp_path / "w2/ca.crt").read_bytes()


async def test_issue_before_ensure_is_an_error(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "state")
    with pytest.raises(PkiError, match="ensure_cluster"):
        backend.ca_certificates("nowhere")


async def test_a_torn_write_is_repaired(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = LocalBackend(tmp_path / "state")
    master, _ = nodes(new_cluster())
    directory = tmp_path / "m1"
    await provision_node(backend, master, directory)
    real = os.replace
    renames = 0

    def crash_at_rename_7(src: Any, dst: Any) -> None:  # failure injection: power cut
        nonlocal renames
        renames += 1
        if renames == 7:
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_at_rename_7)
    with pytest.raises(PkiError, match="Input/output error"):
        await _renew_all(backend, master, directory)
    monkeypatch.setattr(os, "replace", real)
    manifest = files.read_manifest(directory)
    assert manifest is not None
    torn = files.stale_names(directory, manifest)
    assert torn  # some certificates are new, the manifest is old
    await provision_node(backend, master, directory)
    check_node_set(directory, master)  # every key matches its certificate again


async def _renew_all(backend: LocalBackend, node: NodeIdentity, directory: Path) -> None:
    from pki.provision import ensure_certificates

    await ensure_certificates(backend, node, directory, fraction=1e-9)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_renewer_renews_backs_off_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = LocalBackend(tmp_path / "state")
    master, worker = nodes(new_cluster())
    await provision_node(backend, master, tmp_path / "m1")
    await provision_node(backend, worker, tmp_path / "w1")
    targets = [RenewalTarget(master, tmp_path / "m1"), RenewalTarget(worker, tmp_path / "w1")]
    clock = FakeClock()

    async def listing() -> list[RenewalTarget]:  # the agent's store may be async
        return targets

    # Nothing due: no change; the next pass at most max_sleep away.
    calm = Renewer(backend, listing, max_sleep=600, clock=clock)
    assert await calm.run_once() == 600
    status = calm.status()[(worker.cluster, "w1")]
    assert status.failures == 0 and status.renewals_total == 0
    assert status.soonest_expiry == min(
        files.read_expiries(tmp_path / "w1")[n] for n in ("kube-proxy", "calico")
    )
    assert status.next_renewal is not None and status.next_renewal < status.soonest_expiry

    eager = Renewer(backend, lambda: targets, fraction=1e-9, backoff_initial=5, clock=clock)
    real_issue = backend.issue

    def down(*args: Any) -> Any:  # failure injection: the backend is unreachable
        raise BackendUnavailable("local CA is not reachable: test")

    monkeypatch.setattr(backend, "issue", down)
    before = {p: p.stat().st_ino for p in (tmp_path / "w1").rglob("*")}
    delay = await eager.run_once()
    assert 4.5 <= delay <= 5
    status = eager.status()[(worker.cluster, "w1")]
    assert (status.failures, status.failures_total) == (1, 1)
    assert "not reachable" in status.last_error
    assert {p: p.stat().st_ino for p in (tmp_path / "w1").rglob("*")} == before
    await eager.run_once()  # within the backoff: not retried
    assert eager.status()[(worker.cluster, "w1")].failures == 1
    clock.now += 5
    assert 9 <= await eager.run_once() <= 10  # failed again: twice as long
    assert eager.status()[(worker.cluster, "w1")].failures == 2

    monkeypatch.setattr(backend, "issue", real_issue)
    clock.now += 10
    await eager.run_once()
    status = eager.status()[(worker.cluster, "w1")]
    assert (status.failures, status.failures_total, status.renewals_total) == (0, 2, 4)
    assert status.last_error == ""
    assert (tmp_path / "w1" / files.ROTATED).exists()
    check_node_set(tmp_path / "w1", worker)
    check_node_set(tmp_path / "m1", master)


async def test_renewer_leaves_unprovisioned_and_forgets_removed_nodes(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "state")
    _, worker = nodes(new_cluster())
    targets = [RenewalTarget(worker, tmp_path / "w1")]
    renewer = Renewer(backend, lambda: targets, ttl=timedelta(days=1), max_sleep=86400)
    await renewer.run_once()
    assert not (tmp_path / "w1").exists()  # provisioning's job, not renewal's
    await provision_node(backend, worker, tmp_path / "w1", ttl=timedelta(days=1))
    delay = await renewer.run_once()
    assert 15 * 3600 < delay <= 16 * 3600  # 2/3 of a day from now
    targets.clear()
    await renewer.run_once()
    assert renewer.status() == {}


async def test_renewer_keeps_the_node_key_type(tmp_path: Path) -> None:
    from pki.keys import KeyType

    backend = LocalBackend(tmp_path / "state")
    _, worker = nodes(new_cluster())
    await provision_node(backend, worker, tmp_path / "w1", key_type=KeyType.RSA)
    told: list[tuple[str, str, list[str]]] = []

    async def renewed(cluster: str, node: str, names: list[str]) -> None:
        told.append((cluster, node, names))

    target = RenewalTarget(worker, tmp_path / "w1")
    renewer = Renewer(backend, lambda: [target], fraction=1e-9, on_renewed=renewed)
    await renewer.run_once()
    assert renewer.status()[(worker.cluster, "w1")].renewals_total == 4
    ((cluster, node, names),) = told  # the agent keeps it as a node event
    assert (cluster, node, len(names)) == (worker.cluster, "w1", 4)
    check_node_set(tmp_path / "w1", worker, KeyType.RSA)
    assert layout.files_for("worker")
