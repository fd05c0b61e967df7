"""What PUT /v1/images/{name} takes (pure), an image's digest, the store's image records,
and image folders that name files outside themselves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from hostagent.images import read_folder
from hostagent.imagesource import ImagePhase, ImageSource, waiting_message
from hostagent.model import NodeKey, NodeSpec
from hostagent.store import ImageRecord, Store

DIGEST = "a" * 64
QCOW2: dict[str, Any] = {
    "url": "https://mirror/disk.qcow2",
    "sha256": DIGEST,
    "kernel": {"url": "https://mirror/vmlinuz", "sha256": "b" * 64},
    "initrd": {"url": "https://mirror/initrd.img", "sha256": "c" * 64},
    "cmdline": "console=ttyS0",
}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"format": "tar"}, "a tar source brings its kernel"),
        ({"kernel": None}, "a qcow2 source needs kernel and initrd"),
        ({"cmdline": None}, "a qcow2 source needs kernel and initrd"),
        ({"sha256": "A" * 64}, "64 lowercase hexadecimal"),
        ({"url": "file:///etc/shadow"}, "must be an http:// or https:// URL"),
        ({"cmdline": "a\nb"}, "one line of printable characters"),
        ({"extra": 1}, "Extra inputs are not permitted"),
    ],
)
def test_a_source_must_say_what_the_image_is(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        ImageSource.model_validate({**QCOW2, **change})


def test_a_tar_source_is_one_file() -> None:
    source = ImageSource.model_validate(
        {"url": "http://m/lab.tar", "sha256": DIGEST, "format": "tar"}
    )
    assert list(source.files()) == ["archive"]


def test_the_digest_is_the_content_not_where_it_comes_from() -> None:
    source = ImageSource.model_validate(QCOW2)
    moved = ImageSource.model_validate({**QCOW2, "url": "https://other/disk.qcow2"})
    assert moved.digest() == source.digest()
    other_kernel = {**QCOW2, "kernel": {"url": "https://mirror/vmlinuz", "sha256": "d" * 64}}
    assert ImageSource.model_validate(other_kernel).digest() != source.digest()
    other_cmdline = ImageSource.model_validate({**QCOW2, "cmdline": "quiet"})
    assert other_cmdline.digest() != source.digest()


def test_a_waiting_node_reads_the_progress_in_steps() -> None:
    assert waiting_message("x", 47, 100) == "waiting for image 'x': 45 % downloaded"
    assert waiting_message("x", 100, 100) == "waiting for image 'x': 100 % downloaded"
    assert waiting_message("x", 5, None) == "waiting for image 'x' to download"


def test_an_image_folder_naming_files_outside_it_is_no_image(tmp_path: Path) -> None:
    for name in ("vmlinuz", "initrd.img", "disk.qcow2"):
        (tmp_path / name).touch()
    manifest = {"kernel": "vmlinuz", "initrd": "initrd.img", "disk": "disk.qcow2"}
    (tmp_path / "image.json").write_text(json.dumps({**manifest, "cmdline": "", "recipe": "r"}))
    assert read_folder("x", tmp_path) is not None
    for escape in ("../disk.qcow2", "/etc/shadow", "..", "sub/disk.qcow2"):
        (tmp_path / "image.json").write_text(
            json.dumps({**manifest, "disk": escape, "cmdline": "", "recipe": "r"})
        )
        assert read_folder("x", tmp_path) is None, escape


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "state.db")
    yield store
    store.close()


def no_check(_current: ImageRecord | None, _users: list[NodeKey]) -> None:
    return None


async def test_the_store_knows_when_a_pull_is_due(store: Store) -> None:
    source = ImageSource.model_validate(QCOW2)
    first = await store.put_image("x", source, no_check)
    assert (first.change, first.record.phase) == ("accepted", ImagePhase.DOWNLOADING)
    assert (await store.put_image("x", source, no_check)).change is None
    moved = ImageSource.model_validate({**QCOW2, "url": "https://other/disk.qcow2"})
    assert (await store.put_image("x", moved, no_check)).change == "source moved"
    assert await store.set_image_phase("x", source.digest(), ImagePhase.FAILED, "no", None)
    retry = await store.put_image("x", moved, no_check)
    assert (retry.change, retry.record.phase) == ("retry requested", ImagePhase.DOWNLOADING)
    other = ImageSource.model_validate({**QCOW2, "sha256": "e" * 64})
    replaced = await store.put_image("x", other, no_check)
    assert replaced.change == "replaced"
    # The pull of the old content ends after the new PUT: it records nothing.
    assert not await store.set_image_phase("x", source.digest(), ImagePhase.READY, "", 1)
    assert store.image("x").phase is ImagePhase.DOWNLOADING  # type: ignore[union-attr]


async def test_the_store_tells_a_check_which_nodes_name_the_image(store: Store) -> None:
    spec = NodeSpec.model_validate(
        {
            "role": "worker",
            "vcpus": 1,
            "memory_mib": 256,
            "disk_gib": 1,
            "image": "x",
            "kubernetes_version": "1.31.2",
            "network": {"vni": 1, "address": "10.0.0.2/24", "gateway": "10.0.0.1"},
        }
    )
    key = NodeKey(cluster="c", name="w1")
    await store.create(key, spec, "t")
    seen: list[list[NodeKey]] = []

    def check(_current: ImageRecord | None, users: list[NodeKey]) -> None:
        seen.append(users)

    await store.put_image("x", ImageSource.model_validate(QCOW2), check)
    assert seen == [[key]]
