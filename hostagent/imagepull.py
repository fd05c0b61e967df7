"""Pulls images in the background: one download per name, each part streamed to a work
folder and hashed as it arrives, verified against its sha256, then moved into place under
the image's digest (`<image_dir>/.pulled/sha256/<hex>/`, ImageLayout) and recorded Ready.

A transport error is retried with backoff (`[images] download_attempts`), resuming with
a Range request where the server allows it; an HTTP error, a digest mismatch or a file
that is not what it should be fails the pull at once (phase Failed, the message says
which part, what was expected and what came). Nothing half-downloaded is ever used: the
work folder goes whatever happens, and a folder appears under its digest only whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from common import http
from common import tasks as tasks_
from common.backoff import Backoff
from common.errors import ProvisioningError
from common.files import write_atomically
from hostagent.config import ImagesConfig
from hostagent.images import IMAGE_JSON, ImageLayout, read_folder
from hostagent.imagesource import FileSource, ImagePhase
from hostagent.store import ImageRecord, Store
from hostagent.virt import disk

log = logging.getLogger(__name__)
# The names a qcow2 source's parts get in the image folder (as `hostagent image build`).
FILE_NAMES = {"kernel": "vmlinuz", "initrd": "initrd.img", "disk": "disk.qcow2"}


class PullFailed(Exception):
    """The pull cannot succeed as asked; the message is the image's status message."""


@dataclass
class Progress:
    """Bytes downloaded and hashed, per part, and each part's size once its server said."""

    done: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int | None] = field(default_factory=dict)
    parts: int = 0

    @property
    def bytes_done(self) -> int:
        return sum(self.done.values())

    @property
    def bytes_total(self) -> int | None:
        sizes = list(self.sizes.values())
        if len(sizes) < self.parts or any(size is None for size in sizes):
            return None
        return sum(size or 0 for size in sizes)


class ImagePuller:
    """The downloads, their progress, and the folders under .pulled/sha256 (moved in and
    swept out under one lock, so a sweep never removes a folder a pull just found)."""

    def __init__(
        self,
        store: Store,
        layout: ImageLayout,
        config: ImagesConfig,
        *,
        qemu_img_timeout_s: float,
        counted: Callable[[bool], None] = lambda _ok: None,
    ) -> None:
        self.store = store
        self.layout = layout
        self.config = config
        self.qemu_img_timeout_s = qemu_img_timeout_s
        self._counted = counted  # one pull ended: True ready, False failed
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._progress: dict[str, Progress] = {}
        self._placing = asyncio.Lock()

    # --- what the catalog and the API ask ---------------------------------------------

    def ready_digest(self, name: str) -> str | None:
        record = self.store.image(name)
        return record.digest if record is not None and record.phase is ImagePhase.READY else None

    def ready_names(self) -> list[str]:
        return [r.name for r in self.store.images() if r.phase is ImagePhase.READY]

    def progress(self, name: str) -> Progress | None:
        return self._progress.get(name)

    def held_bytes(self) -> int:
        """Bytes of the pulled images' folders (each digest once)."""
        return sum(_size(folder) for folder in _folders(self.layout.by_digest))

    # --- downloads ----------------------------------------------------------------------

    async def start(self) -> None:
        """At the agent's start: what a killed download left goes, and the pulls that were
        under way start again."""
        await asyncio.to_thread(shutil.rmtree, self.layout.partial, ignore_errors=True)
        for record in self.store.images():
            if record.phase is ImagePhase.DOWNLOADING:
                self.pull(record)

    def pull(self, record: ImageRecord) -> None:
        """Download the record's source in the background, replacing any pull of the name."""
        previous = self._tasks.pop(record.name, None)
        if previous is not None:
            previous.cancel()
        self._progress[record.name] = Progress(parts=len(record.source.files()))
        task = asyncio.create_task(self._pull(record, previous), name=f"pull-{record.name}")
        self._tasks[record.name] = task

    async def cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        await tasks_.cancel(task)

    async def close(self) -> None:
        for name in list(self._tasks):
            await self.cancel(name)

    async def _pull(self, record: ImageRecord, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await previous
        progress = self._progress.setdefault(record.name, Progress())
        work: Path | None = None
        try:
            work = await asyncio.to_thread(self._work_folder, record.name)
            log.info(
                "image %s: pulling %s (digest %s)", record.name, record.source.url, record.digest
            )
            await self._fetch_all(record, work, progress)
            await self._place(record, work, progress)
        except (PullFailed, ProvisioningError, OSError) as exc:
            message = str(exc) if not isinstance(exc, OSError) else f"writing the image: {exc}"
            log.warning("image %s: pull failed: %s", record.name, message)
            await self.store.set_image_phase(
                record.name, record.digest, ImagePhase.FAILED, message, progress.bytes_total
            )
            self._counted(False)
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            if self._tasks.get(record.name) is asyncio.current_task():
                del self._tasks[record.name]
                self._progress.pop(record.name, None)

    def _work_folder(self, name: str) -> Path:
        self.layout.partial.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.layout.partial))

    async def _fetch_all(self, record: ImageRecord, work: Path, progress: Progress) -> None:
        try:
            tls = http.tls_context(self.config.ca_file)
        except OSError as exc:  # ssl.SSLError included
            raise PullFailed(f"[images] ca_file {self.config.ca_file}: {exc}") from exc
        client = http.async_client(tls=tls, timeout_s=self.config.download_timeout_s)
        try:
            async with client, asyncio.TaskGroup() as group:
                for part, source in record.source.files().items():
                    group.create_task(self._fetch(client, part, source, work / part, progress))
        except ExceptionGroup as failed:  # the first part that failed says why
            raise failed.exceptions[0] from None

    async def _fetch(
        self,
        client: http.AsyncClient,
        part: str,
        source: FileSource,
        path: Path,
        progress: Progress,
    ) -> None:
        retry = Backoff(1.0, 30.0)
        with path.open("wb") as out:
            partial = _Partial(out)
            for attempt in range(1, self.config.download_attempts + 1):
                try:
                    await _stream(client, part, source, partial, progress)
                    break
                except http.TransportError as exc:
                    if attempt == self.config.download_attempts:
                        raise PullFailed(
                            f"{part}: downloading {source.url} failed {attempt} times, the "
                            f"last: {exc!r}; PUT the image again once the server answers"
                        ) from exc
                    delay = retry.next()
                    log.warning(
                        "%s: %s failed (%r), retrying in %.1fs", part, source.url, exc, delay
                    )
                    await asyncio.sleep(delay)
            await asyncio.to_thread(partial.sync)
        actual = partial.hasher.hexdigest()
        if actual != source.sha256:
            raise PullFailed(
                f"{part}: sha256 mismatch: expected {source.sha256}, got {actual} from "
                f"{source.url}; the file there is not the one named: check the URL and the "
                "sha256, then PUT the image again"
            )

    async def _place(self, record: ImageRecord, work: Path, progress: Progress) -> None:
        async with self._placing:
            final = self.layout.folder(record.digest)
            if not final.is_dir():
                folder = await asyncio.to_thread(_assemble, record, work)
                await self._check_disk(folder)
                await asyncio.to_thread(_move, folder, final)
            stored = await self.store.set_image_phase(
                record.name, record.digest, ImagePhase.READY, "", progress.bytes_total
            )
        if stored:
            log.info("image %s is ready (%s)", record.name, final)
            self._counted(True)

    async def _check_disk(self, folder: Path) -> None:
        """The root disk is a qcow2 of its own: no raw file read as qcow2 and no backing
        file (which could name any file on the host) ever reaches QEMU."""
        image = read_folder("check", folder)
        assert image is not None  # _assemble checked it
        info = await disk.info(image.disk, timeout_s=self.qemu_img_timeout_s)
        if info.get("format") != "qcow2":
            raise PullFailed(f"disk: {image.disk.name} is {info.get('format')}, not qcow2")
        if "backing-filename" in info:
            raise PullFailed(
                f"disk: {image.disk.name} has a backing file ({info['backing-filename']}); "
                "an image's disk must stand alone"
            )

    async def sweep(self) -> int:
        """Remove the folders no image record names any more; the bytes freed. A Failed
        record names none: nothing of its pull stayed, and the folder of its digest (the
        same content, pulled under another name) is that other image's to keep or free."""
        async with self._placing:
            named = {r.digest for r in self.store.images() if r.phase is not ImagePhase.FAILED}
            return await asyncio.to_thread(_remove_unnamed, self.layout.by_digest, named)


class _Partial:
    """A part being downloaded: the open file and the hash of what it holds."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hasher = hashlib.sha256()
        self.written = 0

    def append(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        self.out.write(chunk)
        self.written += len(chunk)

    def restart(self) -> None:
        self.out.seek(0)
        self.out.truncate()
        self.hasher = hashlib.sha256()
        self.written = 0

    def sync(self) -> None:
        self.out.flush()
        os.fsync(self.out.fileno())


async def _stream(
    client: http.AsyncClient, part: str, source: FileSource, partial: _Partial, progress: Progress
) -> None:
    """One GET of the part, resumed from what it holds when the server can (206)."""
    headers = {"Range": f"bytes={partial.written}-"} if partial.written else {}
    async with client.stream("GET", source.url, headers=headers, follow_redirects=True) as response:
        status = response.status_code
        resumed = status == 206 and _range_start(response) == partial.written > 0
        if status != 200 and not resumed:
            raise PullFailed(f"{part}: GET {source.url} answered {status} {response.reason_phrase}")
        if not resumed and partial.written:
            await asyncio.to_thread(partial.restart)
        length = response.headers.get("Content-Length")
        known = length is not None and length.isdigit()
        progress.sizes[part] = partial.written + int(length) if known and length else None
        # As received: a chunk held back to fill a bigger one would be lost to a resume.
        async for chunk in response.aiter_bytes():
            await asyncio.to_thread(partial.append, chunk)
            progress.done[part] = partial.written


def _range_start(response: http.Response) -> int | None:
    unit, _, spec = response.headers.get("Content-Range", "").partition(" ")
    start = spec.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _assemble(record: ImageRecord, work: Path) -> Path:
    """The finished image folder inside work: the parts under their names and an
    image.json (qcow2 source), or the archive's image folder (tar source)."""
    folder = work / "image"
    folder.mkdir()
    source = record.source
    if source.format == "tar":
        folder = _unpack(work / "archive", folder)
    else:
        for part, name in FILE_NAMES.items():
            (work / part).rename(folder / name)
        manifest = {**FILE_NAMES, "cmdline": source.cmdline, "recipe": f"sha256:{record.digest}"}
        write_atomically(
            folder / IMAGE_JSON, (json.dumps(manifest, indent=2) + "\n").encode(), 0o644
        )
    if read_folder("check", folder) is None:
        raise PullFailed(
            "archive: no image folder in it: an image.json naming kernel, initrd and disk "
            "files beside it, with cmdline and recipe (as `hostagent image build` makes)"
        )
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # QEMU's user reads them
    return folder


def _unpack(archive: Path, into: Path) -> Path:
    """Extract with tarfile's "data" filter (no absolute paths, links out, devices or
    set-id bits); the image folder is the top or its only directory."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
    except tarfile.TarError as exc:
        raise PullFailed(f"archive: not a tar archive that can be unpacked safely: {exc}") from exc
    entries = list(into.iterdir())
    if not (into / IMAGE_JSON).exists() and len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return into


def _move(folder: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    for directory in (final.parent.parent, final.parent):
        directory.chmod(0o755)
    folder.rename(final)


def _folders(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _remove_unnamed(root: Path, named: set[str]) -> int:
    freed = 0
    for folder in _folders(root):
        if folder.name not in named:
            freed += _size(folder)
            shutil.rmtree(folder)
            log.info("removed image folder %s: no image names it any more", folder)
    return freed
