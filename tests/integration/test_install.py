"""scripts/install.sh into a temporary prefix and root: the agent runs, the units and a
loadable configuration are in place, and a second run keeps a changed configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hostagent.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "install.sh"


def install(prefix: Path, root: Path, wheels: Path) -> str:
    result = subprocess.run(
        [
            str(SCRIPT),
            "--prefix",
            str(prefix),
            "--root",
            str(root),
            "--wheel-dir",
            str(wheels),
            "--python",
            sys.executable,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_install_and_reinstall(tmp_path: Path) -> None:
    prefix, root, wheels = tmp_path / "opt", tmp_path / "root", tmp_path / "wheels"
    out = install(prefix, root, wheels)
    assert "systemctl daemon-reload" in out
    assert "systemctl enable --now hostagent" in out

    help_text = subprocess.run(
        [str(prefix / "bin" / "hostagent"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "serve" in help_text

    units = root / "etc" / "systemd" / "system"
    for unit in ("hostagent.service", "hostagent-zone.service", "hostagent.target"):
        assert (units / unit).read_text() == (REPO / "systemd" / unit).read_text()
    assert (prefix / "share" / "doc" / "hostagent" / "systemd.md").exists()

    conf = root / "etc" / "hostagent" / "hostagent.toml"
    assert conf.stat().st_mode & 0o777 == 0o640
    config = load_config(conf)
    assert config == load_config(Path("/dev/null"))  # every key commented: all defaults
    text = conf.read_text()
    keys = ["host_id", "state_dir", "listen", "domain_type", "qemu_overhead_base_mib"]
    keys += ["crash_loop_window_s", "underlay_address", "backend", "secret_id_file"]
    for key in keys:
        assert f"# {key} = " in text, key

    changed = text.replace("[phone_home]\n", "[phone_home]\nport = 9472\n")
    conf.write_text(changed)
    out = install(prefix, root, wheels)
    assert "keeping the existing" in out
    assert conf.read_text() == changed
    assert load_config(conf).phone_home.port == 9472
    subprocess.run([str(prefix / "bin" / "hostagent"), "--help"], capture_output=True, check=True)


def test_install_refuses_unknown_argument(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(SCRIPT), "--bogus"], capture_output=True, text=True, check=False, timeout=30
    )
    assert result.returncode == 2
    assert "unknown argument: --bogus" in result.stderr
