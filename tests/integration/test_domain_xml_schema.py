"""The domain XML checked against libvirt's own RelaxNG schema with virt-xml-validate."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from hostagent.virt.domain import domain_xml
from tests.conftest import require
from tests.unit.test_domain_xml import PARAMS  # one example node for both layers

pytestmark = pytest.mark.integration

VALIDATE = Path("/usr/bin/virt-xml-validate")


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
