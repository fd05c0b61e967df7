"""The certificate directory of a node, shared by the host side and the guest templates.

The host keeps each node's certificates in one directory and shares it read-only into
the VM; the guest mounts it at GUEST_MOUNT, following kubeadm's /etc/kubernetes/pki.
"""

from pathlib import Path

MOUNT_TAG = "hostagent-pki"
GUEST_MOUNT = "/etc/kubernetes/pki"


def host_dir(node_dir: Path) -> Path:
    """The host directory shared into the node's VM."""
    return node_dir / "pki"
