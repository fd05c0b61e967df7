"""domain_type = "auto" where KVM cannot be had: libvirt's refusals are injected at the one
call that gives them (a real libvirtd refusing a kvm guest: tests/integration/
test_kvm_device.py)."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import AsyncMock

import pytest
from pytest_mock import MockerFixture

from common.errors import ProvisioningError
from hostagent import kvmprobe
from hostagent.config import Config
from hostagent.errors import LibvirtUnavailable
from hostagent.images import ImageCatalog


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    device = tmp_path / "kvm"
    device.touch()
    monkeypatch.setattr(kvmprobe, "KVM_DEVICE", device)
    kernel = tmp_path / "vmlinuz"
    kernel.touch()
    monkeypatch.setattr(kvmprobe, "_probe_kernel", lambda _images: kernel)
    # root may open any device: the permission check passes, libvirt's answers decide
    return Config.model_validate(
        {"state_dir": str(tmp_path / "state"), "libvirt": {"qemu_user": "root"}}
    )


def _virt(mocker: MockerFixture, refusal: str | None, create: Exception | None = None) -> AsyncMock:
    virt = mocker.AsyncMock()
    virt.offers_kvm.return_value = refusal
    virt.run_transient.side_effect = create
    return virt


async def test_a_device_qemu_cannot_open_means_qemu_without_asking_libvirt(
    config: Config, mocker: MockerFixture, caplog: pytest.LogCaptureFixture
) -> None:
    kvmprobe.KVM_DEVICE.chmod(0o600)
    nobody = config.model_copy(
        update={"libvirt": config.libvirt.model_copy(update={"qemu_user": "nobody"})}
    )
    virt = _virt(mocker, None)
    config.state_dir.mkdir()
    assert (
        await kvmprobe.resolve_domain_type(nobody, virt, ImageCatalog(config.images))
    ).domain_type == "qemu"
    virt.offers_kvm.assert_not_called()
    virt.run_transient.assert_not_called()
    assert "QEMU's user nobody cannot open it" in caplog.text
    assert not (config.state_dir / "kvm-probe.json").exists()


async def test_no_kvm_domain_type_in_libvirt_means_qemu(
    config: Config, mocker: MockerFixture, caplog: pytest.LogCaptureFixture
) -> None:
    refusal = "could not get preferred machine for /usr/bin/qemu-system-x86_64 type=kvm"
    virt = _virt(mocker, refusal)
    config.state_dir.mkdir()
    assert (
        await kvmprobe.resolve_domain_type(config, virt, ImageCatalog(config.images))
    ).domain_type == "qemu"
    virt.run_transient.assert_not_called()
    assert not (config.state_dir / "kvm-probe.json").exists(), "a refusal is not cached"
    assert f"domain type: qemu (auto: libvirt offers no kvm domain: {refusal})" in caplog.text


async def test_a_kvm_guest_that_cannot_be_created_means_qemu(
    config: Config, mocker: MockerFixture, caplog: pytest.LogCaptureFixture
) -> None:
    denied = ProvisioningError("start probe domain: Could not access KVM kernel module")
    virt = _virt(mocker, None, denied)
    config.state_dir.mkdir()
    assert (
        await kvmprobe.resolve_domain_type(config, virt, ImageCatalog(config.images))
    ).domain_type == "qemu"
    assert not (config.state_dir / "kvm-probe.json").exists()
    assert "a kvm guest cannot even be created" in caplog.text


async def test_libvirt_going_away_is_not_an_answer(config: Config, mocker: MockerFixture) -> None:
    virt = _virt(mocker, None, LibvirtUnavailable("libvirt is not reachable"))
    config.state_dir.mkdir()
    with pytest.raises(LibvirtUnavailable):
        await kvmprobe.resolve_domain_type(config, virt, ImageCatalog(config.images))


async def test_a_configured_type_is_taken_as_it_is(config: Config, mocker: MockerFixture) -> None:
    virt = _virt(mocker, "never asked")
    kvm = config.model_copy(
        update={"libvirt": config.libvirt.model_copy(update={"domain_type": "kvm"})}
    )
    assert (
        await kvmprobe.resolve_domain_type(kvm, virt, ImageCatalog(config.images))
    ).domain_type == "kvm"
    virt.offers_kvm.assert_not_called()
