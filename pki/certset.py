"""Which certificates a node needs, and what each says (pure).

Follows kubeadm's "PKI certificates and requirements": three CAs per cluster (the
cluster CA, the etcd CA, the front-proxy CA), the control plane's certificates on
masters, and on every node the kubelet's client and serving certificates, kube-proxy's
and Calico's identity. `PROFILES` is the table (one row per non-CA `layout.Cert`);
`requests_for(node)` renders it for one node.

Choices that differ from kubeadm, and why:
- admin: O=system:masters, not kubeadm >= 1.29's kubeadm:cluster-admins. That group
  only has rights through a ClusterRoleBinding that kubeadm creates with a separate
  super-admin identity; the guests' addon unit applies manifests with admin.conf on a
  fresh cluster, before any binding exists. admin.conf stays root-only in the guest.
- etcd server/peer: CN kube-etcd / kube-etcd-peer (the documented defaults; kubeadm's
  code uses the node name). Fixed CNs let the Vault role pin them.
- kubelet serving: CN system:node:<name>, O system:nodes (what the kubelet-serving
  signer issues), because the host issues it instead of TLS bootstrap.
- calico: CN calico-node, client only, signed by the cluster CA: an API identity for
  Calico's CNI plugin and calico-node (Kubernetes datastore). It has rights only once
  the guest binds User "calico-node" to the calico-node ClusterRole.
- Key usage: digital signature, plus key encipherment for RSA keys only (RFC 5480:
  keyEncipherment is not defined for ECDSA keys; Go ignores it either way).
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import json
from dataclasses import dataclass
from datetime import timedelta

from common.names import check_dns_name, check_name
from pki import layout
from pki.keys import KeyType

DEFAULT_TTL = timedelta(days=90)  # renewed at 2/3: every 60 days
ADMIN_GROUP = "system:masters"  # see the module docstring
NODE = "{node}"  # placeholder for the node's name in a profile's common name


class CaName(enum.StrEnum):
    KUBERNETES = "kubernetes"
    ETCD = "etcd"
    FRONT_PROXY = "front-proxy"


CA_FILES: dict[CaName, layout.Cert] = {
    CaName.KUBERNETES: layout.CA,
    CaName.ETCD: layout.ETCD_CA,
    CaName.FRONT_PROXY: layout.FRONT_PROXY_CA,
}
CA_COMMON_NAMES: dict[CaName, str] = {
    CaName.KUBERNETES: "kubernetes-ca",
    CaName.ETCD: "etcd-ca",
    CaName.FRONT_PROXY: "kubernetes-front-proxy-ca",
}


class Usage(enum.StrEnum):
    """Kubernetes' certificates.k8s.io vocabulary."""

    DIGITAL_SIGNATURE = "digital signature"
    KEY_ENCIPHERMENT = "key encipherment"
    SERVER_AUTH = "server auth"
    CLIENT_AUTH = "client auth"


class Sans(enum.Enum):
    """Which subject alternative names a certificate carries."""

    NONE = "none"
    APISERVER = "apiserver"  # kubernetes.* names, service IP, node, API endpoint, VIP
    ETCD = "etcd"  # node name and IP, localhost, 127.0.0.1, VIP
    NODE = "node"  # node name and IP


@dataclass(frozen=True)
class Profile:
    """One row of the table: a certificate's subject, issuer and purpose."""

    name: str  # layout.Cert.name
    ca: CaName
    common_name: str  # NODE stands for the node's name
    organizations: tuple[str, ...] = ()
    server: bool = False
    client: bool = False
    sans: Sans = Sans.NONE


_K, _E, _F = CaName.KUBERNETES, CaName.ETCD, CaName.FRONT_PROXY
PROFILES: tuple[Profile, ...] = (
    Profile("apiserver", _K, "kube-apiserver", server=True, sans=Sans.APISERVER),
    Profile(
        "apiserver-kubelet-client",
        _K,
        "kube-apiserver-kubelet-client",
        ("system:masters",),
        client=True,
    ),
    Profile("apiserver-etcd-client", _E, "kube-apiserver-etcd-client", client=True),
    Profile("front-proxy-client", _F, "front-proxy-client", client=True),
    # etcd 3.2+ needs clientAuth on its server certificate too (etcd-io/etcd#9785).
    Profile("etcd/server", _E, "kube-etcd", server=True, client=True, sans=Sans.ETCD),
    Profile("etcd/peer", _E, "kube-etcd-peer", server=True, client=True, sans=Sans.ETCD),
    Profile("etcd/healthcheck-client", _E, "kube-etcd-healthcheck-client", client=True),
    Profile("admin", _K, "kubernetes-admin", (ADMIN_GROUP,), client=True),
    Profile("controller-manager", _K, "system:kube-controller-manager", client=True),
    Profile("scheduler", _K, "system:kube-scheduler", client=True),
    Profile("kubelet-client", _K, f"system:node:{NODE}", ("system:nodes",), client=True),
    Profile(
        "kubelet-serving", _K, f"system:node:{NODE}", ("system:nodes",), server=True, sans=Sans.NODE
    ),
    Profile("kube-proxy", _K, "system:kube-proxy", client=True),
    Profile("calico", _K, "calico-node", client=True),
)
PROFILE_BY_NAME: dict[str, Profile] = {profile.name: profile for profile in PROFILES}


@dataclass(frozen=True)
class NodeIdentity:
    """What a node's certificates depend on; ValueError on construction when malformed."""

    cluster: str
    name: str
    role: str  # layout.MASTER or layout.WORKER
    address: str  # IPv4, without prefix length
    service_cidr: str = "10.96.0.0/12"
    cluster_domain: str = "cluster.local"
    api_endpoint: str | None = None  # host:port when the cluster has one beyond its masters
    vip: str | None = None  # the cluster's virtual IP, held by one master at a time

    def __post_init__(self) -> None:
        check_name("cluster", self.cluster)
        check_name("node", self.name)
        if self.role not in (layout.MASTER, layout.WORKER):
            raise ValueError(f"role {self.role!r} must be {layout.MASTER} or {layout.WORKER}")
        ipaddress.IPv4Address(self.address)
        ipaddress.IPv4Network(self.service_cidr)
        check_dns_name("cluster_domain", self.cluster_domain)
        if self.api_endpoint is not None and ":" not in self.api_endpoint:
            raise ValueError(f"api_endpoint {self.api_endpoint[:80]!r} must be HOST:PORT")
        if self.vip is not None:
            ipaddress.IPv4Address(self.vip)

    @property
    def service_ip(self) -> str:
        """The `kubernetes` Service's address: the first host of the service range."""
        return str(ipaddress.IPv4Network(self.service_cidr).network_address + 1)


@dataclass(frozen=True)
class CertRequest:
    """One certificate to sign for one node: `name` is its layout.Cert name."""

    name: str
    ca: CaName
    common_name: str
    organizations: tuple[str, ...]
    dns_sans: tuple[str, ...]
    ip_sans: tuple[str, ...]
    usages: tuple[Usage, ...]
    ttl: timedelta

    def fingerprint(self) -> str:
        """What the certificate says, without its lifetime: a change means re-issue."""
        data = [self.ca, self.common_name, self.organizations, self.dns_sans, self.ip_sans]
        data.append([str(usage) for usage in self.usages])
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


def key_usages(key_type: KeyType) -> tuple[Usage, ...]:
    if key_type is KeyType.RSA:
        return (Usage.DIGITAL_SIGNATURE, Usage.KEY_ENCIPHERMENT)
    return (Usage.DIGITAL_SIGNATURE,)


def usages_for(profile: Profile, key_type: KeyType) -> tuple[Usage, ...]:
    extended = [Usage.SERVER_AUTH] * profile.server + [Usage.CLIENT_AUTH] * profile.client
    return key_usages(key_type) + tuple(extended)


def profiles_for(role: str) -> tuple[Profile, ...]:
    """The profiles of the certificates a node of `role` gets, in layout order."""
    names = {cert.name for cert in layout.CERTS if role in cert.roles and not cert.ca_only}
    if not names:
        raise ValueError(f"role {role!r} must be {layout.MASTER} or {layout.WORKER}")
    return tuple(profile for profile in PROFILES if profile.name in names)


def requests_for(
    node: NodeIdentity, key_type: KeyType = KeyType.ECDSA, ttl: timedelta = DEFAULT_TTL
) -> list[CertRequest]:
    """Every certificate (not the CAs, not the service-account key) `node` needs."""
    return [_request(profile, node, key_type, ttl) for profile in profiles_for(node.role)]


def _request(
    profile: Profile, node: NodeIdentity, key_type: KeyType, ttl: timedelta
) -> CertRequest:
    dns, ips = sans_for(profile.sans, node)
    return CertRequest(
        name=profile.name,
        ca=profile.ca,
        common_name=profile.common_name.replace(NODE, node.name),
        organizations=profile.organizations,
        dns_sans=dns,
        ip_sans=ips,
        usages=usages_for(profile, key_type),
        ttl=ttl,
    )


def sans_for(kind: Sans, node: NodeIdentity) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(DNS names, IP addresses) of one SAN kind for `node`, without duplicates."""
    dns: list[str] = []
    ips: list[str] = []
    if kind is Sans.APISERVER:
        dns += ["kubernetes", "kubernetes.default", "kubernetes.default.svc"]
        dns.append(f"kubernetes.default.svc.{node.cluster_domain}")
        ips.append(node.service_ip)
    if kind is not Sans.NONE:
        dns.append(node.name)
        ips.append(node.address)
    if kind is Sans.ETCD:
        dns.append("localhost")
        ips.append("127.0.0.1")
    if kind in (Sans.APISERVER, Sans.ETCD) and node.vip:
        # Whichever master holds the VIP answers on it: every master's certificate has it.
        ips.append(node.vip)
    if kind is Sans.APISERVER and node.api_endpoint:
        # Only an explicit endpoint: the default (first master:6443) is that master's
        # own address, already in its certificate, and no other master's.
        host = node.api_endpoint.rsplit(":", 1)[0]
        (ips if _is_ip(host) else dns).append(host)
    return tuple(dict.fromkeys(dns)), tuple(dict.fromkeys(ips))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
