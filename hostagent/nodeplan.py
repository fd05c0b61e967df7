"""What to do for one node (pure): desired record + observed domain -> steps.

The reconciler carries the steps out; this module knows nothing of libvirt, only of what
it reported (virt.domain.DomainInfo).

A removal ends with what remembers the node: the record of a deleted node is forgotten
after its domain, files and (its cluster's last node) certificates; an orphan domain (no
record) is undefined after its files and certificates. An agent killed at any step finds
the rest to do at its next start.
"""

from __future__ import annotations

import enum

from hostagent.model import Phase
from hostagent.store import NodeRecord
from hostagent.virt.domain import DomainInfo


class Step(enum.Enum):
    SHUTDOWN = "shut down the domain"
    DESTROY = "destroy the domain"
    UNDEFINE = "undefine the domain"
    REMOVE_FILES = "remove the node's files"
    CLUSTER_GONE = "remove the cluster's certificates if this was its last node"
    FORGET = "forget the node"
    NETWORK = "set up the cluster network"
    PREPARE = "prepare disk, config drive and certificate directory"
    DEFINE = "define the domain"
    START = "start the domain"
    MARK_RUNNING = "record that the domain runs"


CREATE = [Step.NETWORK, Step.PREPARE, Step.DEFINE, Step.START]


def plan_node(record: NodeRecord | None, domain: DomainInfo | None) -> list[Step]:
    """What to do for one node; [] when the world already matches."""
    if record is None:
        if domain is None:
            return []
        stop = [Step.DESTROY] if domain.running else []
        return [*stop, Step.REMOVE_FILES, Step.CLUSTER_GONE, Step.UNDEFINE, Step.NETWORK]
    if record.deleting:
        stop = [Step.SHUTDOWN] if domain and domain.running else []
        undefine = [Step.UNDEFINE] if domain else []
        return [*stop, *undefine, Step.REMOVE_FILES, Step.CLUSTER_GONE, Step.FORGET, Step.NETWORK]
    if domain is None:
        return list(CREATE)
    if domain.meta.spec_hash != record.spec.spec_hash():
        stop = [Step.SHUTDOWN] if domain.running else []
        return [*stop, Step.UNDEFINE, *CREATE]
    if not domain.running:
        return [Step.NETWORK, Step.START]
    if record.domain_id != domain.domain_id or record.phase not in (Phase.RUNNING, Phase.READY):
        return [Step.MARK_RUNNING]
    return []
