"""The domain XML checked against libvirt's own RelaxNG schema with virt-xml-validate."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from hostagent.virt.domain import DomainMeta, DomainParams, domain_xml
from tests.conftest import require

pytestmark = pytest.mark.integration

VALIDATE = Path("/usr/bin/virt-xml-validate")
NODE = Path("/var/lib/hostagent/nodes/alpha/m1")
PARAMS = DomainParams(
    name="alpha-m1",
    domain_type="kvm",
    vcpus=2,
    memory_mib=2048,
    kernel=Path("/var/lib/hostagent/images/lab/vmlinuz"),
    initrd=Path("/var/lib/hostagent/images/lab/initrd.img"),
    cmdline="console=ttyS0 root=/dev/vda1 quiet",
    disk=NODE / "disk.qcow2",
    config_drive=NODE / "cidata.iso",
    pki_dir=NODE / "pki",
    pki_tag="hostagent-pki",
    console_log=NODE / "console.log",
    bridge="hak-4242",
    tap="hat-0123abcd",
    mac="52:54:00:12:34:56",
    mtu=1450,
    meta=DomainMeta(cluster="alpha", node="m1", host="host-1", spec_hash="0123456789abcdef"),
)


def validate(tmp_path: Path, xml: str) -> subprocess.CompletedProcess[str]:
    require(VALIDATE.is_file(), f"needs {VALIDATE} (apt-get install libvirt-clients)")
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    return subprocess.run(
        [str(VALIDATE), str(path), "domain"], capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize("domain_type", ["kvm", "qemu"])
def test_domain_xml_validates(tmp_path: Path, domain_type: str) -> None:
    xml = domain_xml(dataclasses.replace(PARAMS, domain_type=domain_type))
    result = validate(tmp_path, xml)
    assert result.returncode == 0, result.stdout + result.stderr


def test_domain_xml_with_hostile_values_validates(tmp_path: Path) -> None:
    hostile = "a\"b'c <d> & e ]]> f"
    params = dataclasses.replace(
        PARAMS,
        cmdline=hostile,
        meta=dataclasses.replace(PARAMS.meta, host=hostile),
    )
    result = validate(tmp_path, domain_xml(params))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_a_broken_domain(tmp_path: Path) -> None:
    """Guards the tests above: a validator that accepts anything would prove nothing."""
    xml = domain_xml(PARAMS).replace('type="kvm"', 'type="no-such-hypervisor"', 1)
    assert validate(tmp_path, xml).returncode != 0
