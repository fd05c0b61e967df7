"""`hostagent render`: prints a node's drive files from a spec file, no agent needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hostagent.cli import main

NODE = {
    "cluster": "alpha",
    "name": "w1",
    "spec": {
        "role": "worker",
        "vcpus": 1,
        "memory_mib": 256,
        "disk_gib": 2,
        "image": "lab",
        "kubernetes_version": "1.30.4",
        "network": {"vni": 4242, "address": "10.42.0.21/24", "gateway": "10.42.0.1"},
        "cluster": {"masters": [{"name": "m1", "address": "10.42.0.11"}]},
    },
}


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(NODE))
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    main(["-c", "/dev/null", "render", *args])
    return capsys.readouterr().out


def test_prints_all_three_files(spec_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run(capsys, "--spec", str(spec_file))
    sections = [line for line in out.splitlines() if line.startswith("# ---- ")]
    assert sections == [
        "# ---- user-data ----",
        "# ---- meta-data ----",
        "# ---- network-config ----",
    ]
    user_data = out.split("# ---- meta-data ----")[0].split("# ---- user-data ----\n")[1]
    assert user_data.startswith("#cloud-config")
    assert yaml.safe_load(user_data)["write_files"]


def test_only_one_file_and_stable_output(
    spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = run(capsys, "--spec", str(spec_file), "--only", "meta-data")
    assert yaml.safe_load(first) == {
        "instance-id": yaml.safe_load(first)["instance-id"],
        "local-hostname": "w1",
    }
    assert run(capsys, "--spec", str(spec_file), "--only", "meta-data") == first


def test_role_override_and_a_bare_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bare = tmp_path / "spec.yaml"
    spec = {**NODE["spec"], "cluster": {"masters": [{"name": "node", "address": "10.42.0.21"}]}}  # type: ignore[dict-item]
    bare.write_text(yaml.safe_dump(spec))
    out = run(capsys, "--spec", str(bare), "--role", "master", "--only", "user-data")
    paths = [f["path"] for f in yaml.safe_load(out)["write_files"]]
    assert "/etc/kubernetes/manifests/etcd.yaml" in paths


def test_unsupported_version_names_the_supported(spec_file: Path) -> None:
    spec_file.write_text(spec_file.read_text().replace("1.30.4", "1.29.1"))
    with pytest.raises(SystemExit, match=r"supported minors are 1\.30, 1\.31"):
        main(["-c", "/dev/null", "render", "--spec", str(spec_file)])
