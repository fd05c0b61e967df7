"""Calico inside a guest cluster, as data: the manifests a master applies (pure).

The guest's nodes already share one L2 segment (the cluster's bridge and VXLAN on the
hosts), which is Calico's "single L2 network" case: plain BGP between the nodes, a
node-to-node mesh, and NO encapsulation (no IP-in-IP, no VXLAN). So pods get the
network's full MTU: Calico adds no header of its own. `manifest_file` is the add-on
file: the built-in `calico_manifests`, or an operator's own Calico release manifest
(`read_release`, from `[cloudconfig] calico_manifest`) with the cluster's MTU, pod
CIDR and encapsulation patched in (`patch_release`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import ipaddress
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from common import yamlio

# The one place that names Calico's version and images (the built-in manifests).
VERSION = "v3.29.2"
REGISTRY = "docker.io/calico"
IMAGES = {
    "cni": f"{REGISTRY}/cni:{VERSION}",
    "node": f"{REGISTRY}/node:{VERSION}",
    "kube-controllers": f"{REGISTRY}/kube-controllers:{VERSION}",
}
GROUP = "crd.projectcalico.org"
NAMESPACE = "kube-system"
AS_NUMBER = 64512  # private ASN; the mesh is internal to the cluster
BLOCK_SIZE = 26  # Calico's default: 64 addresses per block and node
MIN_MTU, MAX_MTU = 576, 9000
# Calico's resources as (kind, plural, scope). The CRDs below carry no field schema
# (x-kubernetes-preserve-unknown-fields); Calico's own manifests have full ones.
KINDS = (
    ("BGPConfiguration", "bgpconfigurations", "Cluster"),
    ("BGPFilter", "bgpfilters", "Cluster"),
    ("BGPPeer", "bgppeers", "Cluster"),
    ("BlockAffinity", "blockaffinities", "Cluster"),
    ("CalicoNodeStatus", "caliconodestatuses", "Cluster"),
    ("ClusterInformation", "clusterinformations", "Cluster"),
    ("FelixConfiguration", "felixconfigurations", "Cluster"),
    ("GlobalNetworkPolicy", "globalnetworkpolicies", "Cluster"),
    ("GlobalNetworkSet", "globalnetworksets", "Cluster"),
    ("HostEndpoint", "hostendpoints", "Cluster"),
    ("IPAMBlock", "ipamblocks", "Cluster"),
    ("IPAMConfig", "ipamconfigs", "Cluster"),
    ("IPAMHandle", "ipamhandles", "Cluster"),
    ("IPPool", "ippools", "Cluster"),
    ("IPReservation", "ipreservations", "Cluster"),
    ("KubeControllersConfiguration", "kubecontrollersconfigurations", "Cluster"),
    ("NetworkPolicy", "networkpolicies", "Namespaced"),
    ("NetworkSet", "networksets", "Namespaced"),
    ("Tier", "tiers", "Cluster"),
)
_ALL = ["get", "list", "watch", "create", "update", "delete"]

Encapsulation = Literal["none", "ipip", "vxlan"]
# The cluster network is already an overlay: no IP-in-IP, no VXLAN on top.
ENCAPSULATION: Encapsulation = "none"
POOL_MODES: dict[str, tuple[str, str]] = {  # encapsulation -> (ipipMode, vxlanMode)
    "none": ("Never", "Never"),
    "ipip": ("Always", "Never"),
    "vxlan": ("Never", "Always"),
}


def check_pool(pod_cidr: str, mtu: int) -> str:
    """The pod CIDR, normalised; ValueError on a bad CIDR or MTU."""
    pool = ipaddress.ip_network(pod_cidr)
    if pool.version != 4 or pool.prefixlen > BLOCK_SIZE:
        raise ValueError(f"pod_cidr {pod_cidr} must be an IPv4 network of /{BLOCK_SIZE} or larger")
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_MTU <= mtu <= MAX_MTU:
        raise ValueError(f"mtu {mtu!r} must be an integer from {MIN_MTU} to {MAX_MTU}")
    return str(pool)


def pool_env(encapsulation: Encapsulation) -> dict[str, str]:
    """calico-node's settings for the pool it creates (the IPPool below says the same)."""
    ipip, vxlan = POOL_MODES[encapsulation]
    return {"CALICO_IPV4POOL_IPIP": ipip, "CALICO_IPV4POOL_VXLAN": vxlan}


def calico_manifests(pod_cidr: str, mtu: int) -> list[dict[str, Any]]:
    """Everything Calico needs, in apply order: CRDs, RBAC, config, workloads, then the
    IPPool, BGP and Felix resources. ValueError on a bad CIDR or MTU."""
    pool = check_pool(pod_cidr, mtu)
    return [
        *(crd(kind, plural, scope) for kind, plural, scope in KINDS),
        *rbac(),
        config_map(mtu),
        node_daemonset(pool),
        kube_controllers(),
        ip_pool(pool),
        bgp_configuration(),
        felix_configuration(),
    ]


def crd(kind: str, plural: str, scope: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
            },
            "scope": scope,
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


def _rule(groups: list[str], resources: list[str], verbs: list[str]) -> dict[str, Any]:
    return {"apiGroups": groups, "resources": resources, "verbs": verbs}


def _calico_resources(*exclude: str) -> list[str]:
    return [plural for _kind, plural, _scope in KINDS if plural not in exclude]


RULES: dict[str, list[dict[str, Any]]] = {
    "calico-node": [
        _rule([""], ["pods", "nodes", "namespaces", "configmaps"], ["get"]),
        _rule(
            [""],
            ["endpoints", "services", "pods", "namespaces", "serviceaccounts"],
            ["get", "list", "watch"],
        ),
        _rule([""], ["nodes"], ["get", "list", "watch"]),
        _rule([""], ["nodes/status"], ["patch", "update"]),
        _rule([""], ["pods/status"], ["patch"]),
        {
            **_rule([""], ["serviceaccounts/token"], ["create"]),
            "resourceNames": ["calico-cni-plugin"],
        },
        _rule(["discovery.k8s.io"], ["endpointslices"], ["list", "watch"]),
        _rule(["networking.k8s.io"], ["networkpolicies"], ["list", "watch"]),
        _rule(["apps"], ["daemonsets"], ["get"]),
        _rule([GROUP], _calico_resources(), _ALL),
    ],
    "calico-cni-plugin": [
        _rule([""], ["pods", "nodes", "namespaces"], ["get"]),
        _rule([""], ["pods/status"], ["patch"]),
        _rule(
            [GROUP],
            [
                "blockaffinities",
                "ipamblocks",
                "ipamhandles",
                "clusterinformations",
                "ippools",
                "ipreservations",
                "ipamconfigs",
            ],
            _ALL,
        ),
    ],
    "calico-kube-controllers": [
        _rule([""], ["nodes", "pods"], ["get", "list", "watch"]),
        _rule(
            [GROUP],
            [
                "blockaffinities",
                "ipamblocks",
                "ipamhandles",
                "hostendpoints",
                "clusterinformations",
                "kubecontrollersconfigurations",
                "ippools",
                "ipreservations",
                "tiers",
            ],
            _ALL,
        ),
    ],
}


def rbac() -> list[dict[str, Any]]:
    """A ServiceAccount, ClusterRole and ClusterRoleBinding per Calico component."""
    objects: list[dict[str, Any]] = []
    for name, rules in RULES.items():
        account = {"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}
        objects += [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name)},
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": name},
                "rules": rules,
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": name},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": name,
                },
                "subjects": [account],
            },
        ]
    return objects


def _meta(name: str, **labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NAMESPACE}
    if labels:
        meta["labels"] = labels
    return meta


def cni_network_config(mtu: int) -> dict[str, Any]:
    """The CNI conflist install-cni writes (it fills the __PLACEHOLDERS__ in)."""
    return {
        "name": "k8s-pod-network",
        "cniVersion": "0.3.1",
        "plugins": [
            {
                "type": "calico",
                "log_level": "info",
                "log_file_path": "/var/log/calico/cni/cni.log",
                "datastore_type": "kubernetes",
                "nodename": "__KUBERNETES_NODE_NAME__",
                "mtu": mtu,
                "ipam": {"type": "calico-ipam"},
                "policy": {"type": "k8s"},
                "kubernetes": {"kubeconfig": "__KUBECONFIG_FILEPATH__"},
            },
            {"type": "portmap", "snat": True, "capabilities": {"portMappings": True}},
            {"type": "bandwidth", "capabilities": {"bandwidth": True}},
        ],
    }


def config_map(mtu: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta("calico-config"),
        "data": {
            "typha_service_name": "none",
            "calico_backend": "bird",  # BGP
            "veth_mtu": str(mtu),  # no encapsulation: the pods get the network's MTU
            "cni_network_config": json.dumps(cni_network_config(mtu), indent=2),
        },
    }


def _from_config(key: str) -> dict[str, Any]:
    return {"valueFrom": {"configMapKeyRef": {"name": "calico-config", "key": key}}}


def _env(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Kubernetes env entries; a dict value is a valueFrom source, anything else a value."""
    return [
        {"name": name, **value} if isinstance(value, dict) else {"name": name, "value": value}
        for name, value in values.items()
    ]


NODE_NAME = {"valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}


def node_env(pod_cidr: str) -> list[dict[str, Any]]:
    return _env(
        {
            "DATASTORE_TYPE": "kubernetes",
            "WAIT_FOR_DATASTORE": "true",
            "NODENAME": NODE_NAME,
            "CALICO_NETWORKING_BACKEND": _from_config("calico_backend"),
            "CLUSTER_TYPE": "k8s,bgp",
            "IP": "autodetect",
            # The address the kubelet registered (its --node-ip): the cluster network's.
            "IP_AUTODETECTION_METHOD": "kubernetes-internal-ip",
            "CALICO_IPV4POOL_CIDR": pod_cidr,
            "CALICO_IPV4POOL_BLOCK_SIZE": str(BLOCK_SIZE),
            **pool_env(ENCAPSULATION),
            "CALICO_IPV4POOL_NAT_OUTGOING": "true",
            "CALICO_MANAGE_CNI": "true",
            "CALICO_DISABLE_FILE_LOGGING": "true",
            "FELIX_IPINIPMTU": _from_config("veth_mtu"),
            "FELIX_VXLANMTU": _from_config("veth_mtu"),
            "FELIX_WIREGUARDMTU": _from_config("veth_mtu"),
            "FELIX_DEFAULTENDPOINTTOHOSTACTION": "ACCEPT",
            "FELIX_IPV6SUPPORT": "false",
            "FELIX_HEALTHENABLED": "true",
        }
    )


HOST_PATHS = {  # volume name -> (host path, type)
    "lib-modules": ("/lib/modules", ""),
    "var-run-calico": ("/var/run/calico", "DirectoryOrCreate"),
    "var-lib-calico": ("/var/lib/calico", "DirectoryOrCreate"),
    "xtables-lock": ("/run/xtables.lock", "FileOrCreate"),
    "sys-fs": ("/sys/fs/", "DirectoryOrCreate"),
    "bpffs": ("/sys/fs/bpf", "Directory"),
    "cni-bin-dir": ("/opt/cni/bin", "DirectoryOrCreate"),
    "cni-net-dir": ("/etc/cni/net.d", "DirectoryOrCreate"),
    "cni-log-dir": ("/var/log/calico/cni", "DirectoryOrCreate"),
    "policysync": ("/var/run/nodeagent", "DirectoryOrCreate"),
}
NODE_MOUNTS = {  # volume name -> path in the calico-node container
    "lib-modules": "/lib/modules",
    "xtables-lock": "/run/xtables.lock",
    "policysync": "/var/run/nodeagent",
    "var-run-calico": "/var/run/calico",
    "var-lib-calico": "/var/lib/calico",
    "cni-log-dir": "/var/log/calico/cni",
    "cni-net-dir": "/host/etc/cni/net.d",
    "sys-fs": "/sys/fs/",
    "bpffs": "/sys/fs/bpf",
}


def _volumes() -> list[dict[str, Any]]:
    volumes = []
    for name, (path, kind) in HOST_PATHS.items():
        host_path = {"path": path, **({"type": kind} if kind else {})}
        volumes.append({"name": name, "hostPath": host_path})
    return volumes


def _mounts(mounts: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": name, "mountPath": path} for name, path in mounts.items()]


def _install_cni() -> dict[str, Any]:
    return {
        "name": "install-cni",
        "image": IMAGES["cni"],
        "command": ["/opt/cni/bin/install"],
        "env": _env(
            {
                "CNI_CONF_NAME": "10-calico.conflist",
                "CNI_NETWORK_CONFIG": _from_config("cni_network_config"),
                "KUBERNETES_NODE_NAME": NODE_NAME,
                "CNI_MTU": _from_config("veth_mtu"),
                "SLEEP": "false",
            }
        ),
        "volumeMounts": _mounts(
            {"cni-bin-dir": "/host/opt/cni/bin", "cni-net-dir": "/host/etc/cni/net.d"}
        ),
        "securityContext": {"privileged": True},
    }


def _calico_node(pod_cidr: str) -> dict[str, Any]:
    return {
        "name": "calico-node",
        "image": IMAGES["node"],
        "env": node_env(pod_cidr),
        "securityContext": {"privileged": True},
        "resources": {"requests": {"cpu": "250m"}},
        "livenessProbe": {
            "exec": {"command": ["/bin/calico-node", "-felix-live", "-bird-live"]},
            "periodSeconds": 10,
            "initialDelaySeconds": 10,
            "failureThreshold": 6,
            "timeoutSeconds": 10,
        },
        "readinessProbe": {
            "exec": {"command": ["/bin/calico-node", "-felix-ready", "-bird-ready"]},
            "periodSeconds": 10,
            "timeoutSeconds": 10,
        },
        "volumeMounts": _mounts(NODE_MOUNTS),
    }


def node_daemonset(pod_cidr: str) -> dict[str, Any]:
    labels = {"k8s-app": "calico-node"}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta("calico-node", **labels),
        "spec": {
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "hostNetwork": True,
                    # Every node, masters too: pods anywhere need the network.
                    "tolerations": [
                        {"effect": "NoSchedule", "operator": "Exists"},
                        {"key": "CriticalAddonsOnly", "operator": "Exists"},
                        {"effect": "NoExecute", "operator": "Exists"},
                    ],
                    "serviceAccountName": "calico-node",
                    "terminationGracePeriodSeconds": 0,
                    "priorityClassName": "system-node-critical",
                    "initContainers": [_install_cni()],
                    "containers": [_calico_node(pod_cidr)],
                    "volumes": _volumes(),
                },
            },
        },
    }


def kube_controllers() -> dict[str, Any]:
    labels = {"k8s-app": "calico-kube-controllers"}
    container = {
        "name": "calico-kube-controllers",
        "image": IMAGES["kube-controllers"],
        "env": _env({"ENABLED_CONTROLLERS": "node", "DATASTORE_TYPE": "kubernetes"}),
        "livenessProbe": {
            "exec": {"command": ["/usr/bin/check-status", "-l"]},
            "periodSeconds": 10,
            "initialDelaySeconds": 10,
            "failureThreshold": 6,
            "timeoutSeconds": 10,
        },
        "readinessProbe": {
            "exec": {"command": ["/usr/bin/check-status", "-r"]},
            "periodSeconds": 10,
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta("calico-kube-controllers", **labels),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {"name": "calico-kube-controllers", "labels": labels},
                "spec": {
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "tolerations": [
                        {"key": "CriticalAddonsOnly", "operator": "Exists"},
                        {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"},
                    ],
                    "serviceAccountName": "calico-kube-controllers",
                    "priorityClassName": "system-cluster-critical",
                    "containers": [container],
                },
            },
        },
    }


def ip_pool(pod_cidr: str) -> dict[str, Any]:
    """The pods' pool: no IP-in-IP, no VXLAN; the cluster network is already an overlay."""
    ipip, vxlan = POOL_MODES[ENCAPSULATION]
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "IPPool",
        "metadata": {"name": "default-ipv4-ippool"},  # the name calico-node would create
        "spec": {
            "cidr": pod_cidr,
            "blockSize": BLOCK_SIZE,
            "ipipMode": ipip,
            "vxlanMode": vxlan,
            "natOutgoing": True,
            "nodeSelector": "all()",
        },
    }


def bgp_configuration() -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "BGPConfiguration",
        "metadata": {"name": "default"},
        "spec": {
            "logSeverityScreen": "Info",
            "nodeToNodeMeshEnabled": True,
            "asNumber": AS_NUMBER,
        },
    }


def felix_configuration() -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "FelixConfiguration",
        "metadata": {"name": "default"},
        "spec": {
            "ipipEnabled": False,
            "vxlanEnabled": False,
            "wireguardEnabled": False,
            "logSeverityScreen": "Info",
            "reportingInterval": "0s",
        },
    }


# --- an operator's own Calico release manifest ---------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Release:
    """A Calico release manifest (the multi-document calico.yaml Calico publishes), read
    once when the agent's configuration is loaded. Hashed by identity (render caches)."""

    path: Path
    documents: tuple[dict[str, Any], ...]


def read_release(path: Path) -> Release:
    """Read and parse path; ValueError when it cannot be read or lacks what
    `patch_release` patches (the message names the file and what is missing)."""
    try:
        text = path.read_text(encoding="utf-8")
        documents = [doc for doc in yamlio.load_all(text) if doc is not None]
    except (OSError, UnicodeDecodeError, yamlio.YAMLError) as exc:
        raise ValueError(f"cannot read the Calico manifest {path}: {exc}") from exc
    if not all(isinstance(doc, dict) for doc in documents):
        raise ValueError(f"Calico manifest {path}: every document must be a mapping")
    try:
        _targets(documents)
    except ValueError as exc:
        raise ValueError(f"Calico manifest {path}: {exc}") from exc
    return Release(path, tuple(documents))


def patch_release(
    documents: Iterable[Mapping[str, Any]],
    pod_cidr: str,
    mtu: int,
    encapsulation: Encapsulation = ENCAPSULATION,
) -> str:
    """A Calico release manifest with the cluster's MTU (`veth_mtu` of the calico-config
    ConfigMap), pod CIDR and encapsulation (calico-node's CALICO_IPV4POOL_* settings)
    set, as one multi-document YAML. The documents are not changed. ValueError on a bad
    CIDR or MTU, or when the calico-config ConfigMap or the calico-node container of the
    calico-node DaemonSet is missing."""
    pool = check_pool(pod_cidr, mtu)
    docs = [copy.deepcopy(dict(doc)) for doc in documents]
    config_maps, containers = _targets(docs)
    for config_map in config_maps:
        config_map["data"] = {**(config_map.get("data") or {}), "veth_mtu": str(mtu)}
    for container in containers:
        _set_env(container, {"CALICO_IPV4POOL_CIDR": pool, **pool_env(encapsulation)})
    return yamlio.dump_all(docs)


def _targets(docs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The calico-config ConfigMaps and calico-node containers; ValueError naming what
    is missing."""
    config_maps = [d for d in docs if _is(d, "ConfigMap", "calico-config")]
    containers = [
        container
        for d in docs
        if _is(d, "DaemonSet", "calico-node")
        for container in _get(d, "spec", "template", "spec", "containers") or []
        if isinstance(container, dict) and container.get("name") == "calico-node"
    ]
    missing = [
        what
        for what, found in (
            ("the ConfigMap calico-config", config_maps),
            ("the container calico-node of the DaemonSet calico-node", containers),
        )
        if not found
    ]
    if missing:
        raise ValueError(f"it lacks {' and '.join(missing)}")
    return config_maps, containers


def _is(doc: dict[str, Any], kind: str, name: str) -> bool:
    return doc.get("kind") == kind and _get(doc, "metadata", "name") == name


def _get(value: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _set_env(container: dict[str, Any], values: dict[str, str]) -> None:
    """Set each variable to its value, in place (replacing a valueFrom) or appended."""
    env = list(container.get("env") or [])
    for name, value in values.items():
        entry = {"name": name, "value": value}
        at = [i for i, e in enumerate(env) if isinstance(e, dict) and e.get("name") == name]
        if at:
            env[at[0]] = entry
        else:
            env.append(entry)
    container["env"] = env


@functools.lru_cache(maxsize=32)
def manifest_file(pod_cidr: str, mtu: int, release: Release | None = None) -> str:
    """/etc/kubernetes/addons/calico.yaml: the built-in manifests, or the operator's
    release with the cluster's values patched in."""
    if release is not None:
        return patch_release(release.documents, pod_cidr, mtu)
    return yamlio.dump_all(calico_manifests(pod_cidr, mtu))
