"""The certificate directory of a node, shared by the host side and the guest templates.

The host keeps each node's certificates in one directory and shares it read-only into
the VM; the guest mounts it at GUEST_MOUNT. Inside, the files follow kubeadm's layout
(`/etc/kubernetes/pki`), so every Kubernetes guide's paths hold. This module is the one
place that names them: the PKI side writes exactly `files_for(role)`, the templates
reference `Cert.cert` / `Cert.key` and the service-account key paths.

No CA private key is ever shared into a guest: the controller-manager therefore runs
without `--cluster-signing-*` (no in-cluster CSR signing), and kubelets get their client
and serving certificates from the host instead of TLS bootstrap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MOUNT_TAG = "hostagent-pki"
GUEST_MOUNT = "/etc/kubernetes/pki"

MASTER = "master"
WORKER = "worker"
_BOTH = (MASTER, WORKER)
_MASTER = (MASTER,)


@dataclass(frozen=True)
class Cert:
    """One certificate in the node's directory, with its private key unless `ca_only`.

    `name` is its path below the directory without the suffix, e.g. "etcd/server";
    `roles` are the node roles that get it.
    """

    name: str
    roles: tuple[str, ...]
    ca_only: bool = False  # a CA's certificate alone: its key stays with the issuer

    @property
    def cert(self) -> str:
        """The certificate's path inside the guest."""
        return f"{GUEST_MOUNT}/{self.name}.crt"

    @property
    def key(self) -> str:
        """The private key's path inside the guest."""
        if self.ca_only:
            raise ValueError(f"{self.name}: a CA's private key is never shared into a guest")
        return f"{GUEST_MOUNT}/{self.name}.key"

    def relative_files(self) -> tuple[str, ...]:
        """Its files relative to the node's directory: the certificate, then the key."""
        if self.ca_only:
            return (f"{self.name}.crt",)
        return (f"{self.name}.crt", f"{self.name}.key")


# Cluster CAs: every component verifies its peers against these.
CA = Cert("ca", _BOTH, ca_only=True)
FRONT_PROXY_CA = Cert("front-proxy-ca", _MASTER, ca_only=True)
ETCD_CA = Cert("etcd/ca", _MASTER, ca_only=True)
# The control plane (kubeadm's names and file names).
APISERVER = Cert("apiserver", _MASTER)
APISERVER_KUBELET_CLIENT = Cert("apiserver-kubelet-client", _MASTER)
APISERVER_ETCD_CLIENT = Cert("apiserver-etcd-client", _MASTER)
FRONT_PROXY_CLIENT = Cert("front-proxy-client", _MASTER)
ETCD_SERVER = Cert("etcd/server", _MASTER)
ETCD_PEER = Cert("etcd/peer", _MASTER)
ETCD_HEALTHCHECK_CLIENT = Cert("etcd/healthcheck-client", _MASTER)
# Kubeconfig identities (kubeadm embeds these; here the kubeconfigs reference the files).
ADMIN = Cert("admin", _MASTER)
CONTROLLER_MANAGER = Cert("controller-manager", _MASTER)
SCHEDULER = Cert("scheduler", _MASTER)
# Every node: the kubelet's client identity (CN system:node:<hostname>) and its serving
# certificate, kube-proxy's identity, and Calico's.
KUBELET_CLIENT = Cert("kubelet-client", _BOTH)
KUBELET_SERVING = Cert("kubelet-serving", _BOTH)
KUBE_PROXY = Cert("kube-proxy", _BOTH)
CALICO = Cert("calico", _BOTH)

CERTS: tuple[Cert, ...] = (
    CA,
    FRONT_PROXY_CA,
    ETCD_CA,
    APISERVER,
    APISERVER_KUBELET_CLIENT,
    APISERVER_ETCD_CLIENT,
    FRONT_PROXY_CLIENT,
    ETCD_SERVER,
    ETCD_PEER,
    ETCD_HEALTHCHECK_CLIENT,
    ADMIN,
    CONTROLLER_MANAGER,
    SCHEDULER,
    KUBELET_CLIENT,
    KUBELET_SERVING,
    KUBE_PROXY,
    CALICO,
)

# The service-account signing key pair (masters): an RSA key, not a certificate.
SA_KEY_FILE = "sa.key"
SA_PUB_FILE = "sa.pub"
SA_KEY = f"{GUEST_MOUNT}/{SA_KEY_FILE}"
SA_PUB = f"{GUEST_MOUNT}/{SA_PUB_FILE}"


# Rewritten by the host after each renewal; the guest's hostagent-cert-reload timer
# compares it with the last copy it saw.
ROTATED_FILE = ".rotated"
ROTATED = f"{GUEST_MOUNT}/{ROTATED_FILE}"


def files_for(role: str) -> tuple[str, ...]:
    """The files a node of `role` finds in its directory, relative to it."""
    if role not in _BOTH:
        raise ValueError(f"role {role!r} must be one of {', '.join(_BOTH)}")
    files = [path for cert in CERTS if role in cert.roles for path in cert.relative_files()]
    if role == MASTER:
        files += [SA_KEY_FILE, SA_PUB_FILE]
    return tuple(files)


def guest_paths() -> dict[str, object]:
    """What the templates call `pki`: each certificate by a Jinja-friendly name
    (etcd/server -> etcd_server), plus `sa_key`, `sa_pub` and `dir`."""
    names: dict[str, object] = {
        cert.name.replace("/", "_").replace("-", "_"): cert for cert in CERTS
    }
    names.update(sa_key=SA_KEY, sa_pub=SA_PUB, dir=GUEST_MOUNT, rotated=ROTATED)
    return names


def host_dir(node_dir: Path) -> Path:
    """The host directory shared into the node's VM."""
    return node_dir / "pki"
