"""Host capacity accounting (pure).

A VM costs its memory_mib plus QEMU's own overhead (device emulation, page tables,
I/O buffers, under TCG the translation cache). The overhead was measured on this
project's machines with bench/qemu_overhead.py; see docs/configuration.md for the
formula and the figures:

    overhead_mib = qemu_overhead_base_mib + qemu_overhead_per_gib_mib * ceil(memory_mib / 1024)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from hostagent.config import CapacityConfig
from hostagent.errors import Invalid, OutOfCapacity
from hostagent.model import NodeSpec


@dataclass(frozen=True)
class Resources:
    vcpus: float
    memory_mib: int
    disk_gib: int

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.vcpus + other.vcpus,
            self.memory_mib + other.memory_mib,
            self.disk_gib + other.disk_gib,
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            self.vcpus - other.vcpus,
            self.memory_mib - other.memory_mib,
            self.disk_gib - other.disk_gib,
        )


ZERO = Resources(0, 0, 0)


def qemu_overhead_mib(memory_mib: int, config: CapacityConfig) -> int:
    gib = math.ceil(memory_mib / 1024)
    return config.qemu_overhead_base_mib + config.qemu_overhead_per_gib_mib * gib


def cost(spec: NodeSpec, config: CapacityConfig) -> Resources:
    """What one node takes from the host, QEMU overhead included."""
    memory = spec.memory_mib + qemu_overhead_mib(spec.memory_mib, config)
    return Resources(spec.vcpus, memory, spec.disk_gib)


def allocatable(physical: Resources, config: CapacityConfig) -> Resources:
    """What the host offers to VMs: physical minus the host's reserve, vCPUs scaled by the ratio."""
    return Resources(
        vcpus=max(0.0, (physical.vcpus - config.reserved_vcpus) * config.vcpu_ratio),
        memory_mib=max(0, physical.memory_mib - config.reserved_memory_mib),
        disk_gib=max(0, physical.disk_gib - config.reserved_disk_gib),
    )


def allocated(specs: Iterable[NodeSpec], config: CapacityConfig) -> Resources:
    total = ZERO
    for spec in specs:
        total = total + cost(spec, config)
    return total


def check_fits(
    spec: NodeSpec, others: Iterable[NodeSpec], physical: Resources, config: CapacityConfig
) -> None:
    """Raise Invalid when the node could never fit this host, OutOfCapacity when not now."""
    need = cost(spec, config)
    offer = allocatable(physical, config)
    free = offer - allocated(others, config)
    units = {"vcpus": "", "memory_mib": " MiB", "disk_gib": " GiB"}
    note = {"memory_mib": " (QEMU overhead included)"}
    for field, unit in units.items():
        wanted, total = getattr(need, field), getattr(offer, field)
        if wanted > total:
            raise Invalid(
                f"{field} {wanted:g}{unit}{note.get(field, '')} exceeds what this host can "
                f"ever offer ({total:g}{unit} after the host's reserve)"
            )
    for field, unit in units.items():
        wanted, total, left = (getattr(r, field) for r in (need, offer, free))
        if wanted > left:
            raise OutOfCapacity(
                f"{field}: the node needs {wanted:g}{unit}{note.get(field, '')} but only "
                f"{left:g}{unit} of {total:g}{unit} is free on this host"
            )
