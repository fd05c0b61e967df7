"""pki.layout: the one list of certificate paths the host writes and the guest reads."""

from __future__ import annotations

import posixpath
from pathlib import Path

import pytest

from pki import layout


def all_guest_paths() -> list[str]:
    paths = [layout.SA_KEY, layout.SA_PUB]
    for cert in layout.CERTS:
        paths.append(cert.cert)
        if not cert.ca_only:
            paths.append(cert.key)
    return paths


def test_paths_are_unique_and_under_the_mount() -> None:
    paths = all_guest_paths()
    assert len(paths) == len(set(paths))
    for path in paths:
        assert path.startswith(layout.GUEST_MOUNT + "/")
        assert posixpath.normpath(path) == path


def test_kubeadm_names() -> None:
    # The files kubeadm's documentation and every guide expect.
    master = set(layout.files_for("master"))
    for name in (
        "ca.crt",
        "apiserver.crt",
        "apiserver.key",
        "apiserver-kubelet-client.crt",
        "apiserver-etcd-client.key",
        "front-proxy-ca.crt",
        "front-proxy-client.crt",
        "sa.key",
        "sa.pub",
        "etcd/ca.crt",
        "etcd/server.crt",
        "etcd/peer.key",
        "etcd/healthcheck-client.crt",
    ):
        assert name in master


def test_no_ca_private_key_enters_a_guest() -> None:
    for role in ("master", "worker"):
        files = layout.files_for(role)
        assert not {"ca.key", "etcd/ca.key", "front-proxy-ca.key"} & set(files)
    with pytest.raises(ValueError, match="never shared"):
        _ = layout.CA.key


def test_files_per_role() -> None:
    master, worker = set(layout.files_for("master")), set(layout.files_for("worker"))
    assert worker == {
        "ca.crt",
        "kubelet-client.crt",
        "kubelet-client.key",
        "kubelet-serving.crt",
        "kubelet-serving.key",
        "kube-proxy.crt",
        "kube-proxy.key",
        "calico.crt",
        "calico.key",
    }
    assert worker < master
    assert len(layout.files_for("master")) == len(master)
    with pytest.raises(ValueError, match="role"):
        layout.files_for("etcd")


def test_guest_paths_for_templates() -> None:
    names = layout.guest_paths()
    assert names["etcd_server"] is layout.ETCD_SERVER
    assert names["apiserver_kubelet_client"] is layout.APISERVER_KUBELET_CLIENT
    assert names["sa_key"] == f"{layout.GUEST_MOUNT}/sa.key"
    assert names["dir"] == layout.GUEST_MOUNT
    assert all(name.isidentifier() for name in names)


def test_host_dir() -> None:
    assert layout.host_dir(Path("/var/lib/hostagent/nodes/a/m1")) == Path(
        "/var/lib/hostagent/nodes/a/m1/pki"
    )
