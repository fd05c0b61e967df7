"""hostagent.capacity: QEMU overhead, allocatable, never-fits (422) versus not-now (507)."""

from __future__ import annotations

from typing import Any

import pytest

from hostagent.capacity import (
    ZERO,
    Resources,
    allocatable,
    allocated,
    check_fits,
    cost,
    qemu_overhead_mib,
)
from hostagent.config import CapacityConfig
from hostagent.errors import Invalid, OutOfCapacity
from hostagent.model import NodeSpec

# Round numbers so that the boundaries below can be checked by hand.
CONFIG = CapacityConfig(
    reserved_vcpus=1,
    reserved_memory_mib=1024,
    reserved_disk_gib=10,
    vcpu_ratio=2.0,
    qemu_overhead_base_mib=100,
    qemu_overhead_per_gib_mib=10,
)


def make_spec(vcpus: int = 2, memory_mib: int = 2048, disk_gib: int = 20) -> NodeSpec:
    data: dict[str, Any] = {
        "role": "worker",
        "vcpus": vcpus,
        "memory_mib": memory_mib,
        "disk_gib": disk_gib,
        "image": "lab",
        "kubernetes_version": "1.31.2",
        "network": {"vni": 1, "address": "10.42.0.11/24", "gateway": "10.42.0.1"},
    }
    return NodeSpec.model_validate(data)


SPEC = make_spec()
# SPEC costs 2 vCPUs, 2048 + 100 + 10 * 2 = 2168 MiB, 20 GiB.
SPEC_COST = Resources(2, 2168, 20)


def physical_for(need: Resources) -> Resources:
    """The physical host on which exactly `need` is allocatable under CONFIG."""
    return Resources(
        vcpus=CONFIG.reserved_vcpus + need.vcpus / CONFIG.vcpu_ratio,
        memory_mib=CONFIG.reserved_memory_mib + need.memory_mib,
        disk_gib=CONFIG.reserved_disk_gib + need.disk_gib,
    )


# --- the formula ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory_mib", "overhead"),
    [(64, 110), (1023, 110), (1024, 110), (1025, 120), (2048, 120), (2049, 130), (65536, 740)],
)
def test_overhead_rounds_memory_up_to_whole_gib(memory_mib: int, overhead: int) -> None:
    assert qemu_overhead_mib(memory_mib, CONFIG) == overhead


def test_overhead_with_the_documented_defaults() -> None:
    defaults = CapacityConfig()
    # 192 + 16 * ceil(2048 / 1024)
    assert qemu_overhead_mib(2048, defaults) == 224
    assert qemu_overhead_mib(1536, defaults) == 224
    assert qemu_overhead_mib(4096, defaults) == 256


def test_cost_adds_overhead_to_memory_only() -> None:
    assert cost(SPEC, CONFIG) == SPEC_COST
    assert cost(make_spec(vcpus=5, memory_mib=1000, disk_gib=7), CONFIG) == Resources(5, 1110, 7)


def test_allocated_sums_costs() -> None:
    assert allocated([], CONFIG) == ZERO
    assert allocated([SPEC, SPEC, make_spec(1, 1024, 1)], CONFIG) == Resources(
        2 + 2 + 1, 2168 * 2 + 1134, 20 + 20 + 1
    )


def test_resources_arithmetic() -> None:
    a = Resources(1.5, 100, 3)
    b = Resources(0.5, 40, 1)
    assert a + b == Resources(2.0, 140, 4)
    assert a - b == Resources(1.0, 60, 2)


# --- allocatable ------------------------------------------------------------------------------


def test_allocatable_subtracts_reserve_and_scales_vcpus() -> None:
    assert allocatable(Resources(8, 16384, 100), CONFIG) == Resources(14.0, 15360, 90)


def test_allocatable_uses_fractional_vcpu_ratio() -> None:
    config = CONFIG.model_copy(update={"vcpu_ratio": 1.5})
    assert allocatable(Resources(5, 2048, 20), config).vcpus == 6.0


def test_allocatable_never_negative() -> None:
    assert allocatable(Resources(0, 512, 5), CONFIG) == Resources(0.0, 0, 0)


def test_allocatable_with_no_reserve_and_ratio_one_is_physical() -> None:
    config = CapacityConfig(
        reserved_vcpus=0, reserved_memory_mib=0, reserved_disk_gib=0, vcpu_ratio=1.0
    )
    assert allocatable(Resources(4, 8192, 50), config) == Resources(4, 8192, 50)


# --- check_fits -------------------------------------------------------------------------------


def test_fits_exactly_on_an_empty_host() -> None:
    check_fits(SPEC, [], physical_for(SPEC_COST), CONFIG)


def test_fits_exactly_next_to_others() -> None:
    check_fits(SPEC, [SPEC, SPEC], physical_for(Resources(6, 3 * 2168, 60)), CONFIG)


@pytest.mark.parametrize(
    ("short", "resource"),
    [
        (Resources(0.5, 0, 0), "vcpus"),
        (Resources(0, 1, 0), "memory_mib"),
        (Resources(0, 0, 1), "disk_gib"),
    ],
)
def test_never_fits_is_invalid_naming_the_resource(short: Resources, resource: str) -> None:
    physical = physical_for(SPEC_COST) - short
    with pytest.raises(Invalid, match=f"^{resource} ") as exc:
        check_fits(SPEC, [], physical, CONFIG)
    assert "can ever offer" in str(exc.value)
    assert not isinstance(exc.value, OutOfCapacity)


@pytest.mark.parametrize(
    ("short", "resource"),
    [
        (Resources(0.5, 0, 0), "vcpus"),
        (Resources(0, 1, 0), "memory_mib"),
        (Resources(0, 0, 1), "disk_gib"),
    ],
)
def test_not_now_is_out_of_capacity_naming_the_resource(short: Resources, resource: str) -> None:
    # Room for exactly two SPECs minus a bit of one resource: the second does not fit now.
    physical = physical_for(SPEC_COST + SPEC_COST) - short
    check_fits(SPEC, [], physical, CONFIG)
    with pytest.raises(OutOfCapacity, match=f"^{resource}: ") as exc:
        check_fits(SPEC, [SPEC], physical, CONFIG)
    assert "is free on this host" in str(exc.value)
    assert not isinstance(exc.value, Invalid)


def test_out_of_capacity_message_has_the_numbers() -> None:
    physical = physical_for(Resources(4, 2168 + 1000, 40))
    with pytest.raises(OutOfCapacity) as exc:
        check_fits(SPEC, [SPEC], physical, CONFIG)
    message = str(exc.value)
    assert "memory_mib" in message
    assert "2168 MiB" in message  # needed
    assert "1000 MiB" in message  # free
    assert "3168 MiB" in message  # allocatable in total


def test_invalid_message_has_the_numbers() -> None:
    physical = physical_for(Resources(4, 2000, 40))
    with pytest.raises(Invalid) as exc:
        check_fits(SPEC, [], physical, CONFIG)
    assert "memory_mib 2168 MiB" in str(exc.value)
    assert "2000 MiB" in str(exc.value)


def test_a_node_that_can_never_fit_is_invalid_even_when_the_host_is_full() -> None:
    """422 means 'never', 507 'retry later': a node that can never fit must not get a 507
    just because an earlier resource happens to be used up right now."""
    physical = physical_for(Resources(2, 2168 + 1000, 100))  # memory: 3168 MiB in total
    huge = make_spec(vcpus=2, memory_mib=8192, disk_gib=20)
    with pytest.raises(Invalid, match="memory_mib"):
        check_fits(huge, [SPEC], physical, CONFIG)  # SPEC uses up every vCPU for now
