"""The agent's operations on images, between the HTTP layer, the store and the puller.

Each write checks and records in one store transaction with the nodes it reads: an image
that a node names is never deleted or given other content, and a node is never accepted
for an image that is being deleted (nodes.py checks the image in its own transaction).
"""

from __future__ import annotations

from datetime import UTC, datetime

from common.names import check_name
from hostagent.errors import Conflict, Invalid, NotFound, parse_body
from hostagent.imagepull import ImagePuller
from hostagent.images import IMAGE_JSON, ImageCatalog
from hostagent.imagesource import (
    ImageInfo,
    ImagePhase,
    ImageSource,
    ImageStatus,
    waiting_message,
)
from hostagent.model import NodeKey
from hostagent.store import ImageRecord, Store


def parse_name(name: str) -> str:
    try:
        return check_name("image", name)
    except ValueError as exc:
        raise Invalid(str(exc)) from exc


def parse_source(body: bytes) -> ImageSource:
    return parse_body(body, ImageSource, "an ImageSource")


def _nodes(users: list[NodeKey]) -> str:
    return ", ".join(str(key) for key in users)


class ImageService:
    def __init__(self, store: Store, catalog: ImageCatalog, puller: ImagePuller) -> None:
        self.store = store
        self.catalog = catalog
        self.puller = puller

    async def put(self, name: str, source: ImageSource) -> tuple[ImageInfo, bool]:
        self._not_a_folder(name, "PUT it under another name")
        digest = source.digest()

        def check(current: ImageRecord | None, users: list[NodeKey]) -> None:
            if current is not None and current.digest != digest and users:
                raise Conflict(
                    f"image {name!r} is used by {_nodes(users)}: its content cannot change "
                    "while nodes name it; PUT the new content under another name"
                )

        put = await self.store.put_image(name, source, check)
        if put.change in ("accepted", "replaced", "retry requested"):
            self.puller.pull(put.record)
        return self._pulled(put.record), put.change == "accepted"

    def get(self, name: str) -> ImageInfo:
        if self.catalog.folder_image(name) is not None:
            return self._folder(name)
        record = self.store.image(name)
        if record is None:
            raise NotFound(f"image {name!r} is not on this host")
        return self._pulled(record)

    def all(self) -> list[ImageInfo]:
        folders = self.catalog.folder_names()
        pulled = [self._pulled(r) for r in self.store.images() if r.name not in folders]
        return sorted([*map(self._folder, folders), *pulled], key=lambda image: image.name)

    async def delete(self, name: str) -> None:
        self._not_a_folder(name, "remove the folder")

        def check(current: ImageRecord | None, users: list[NodeKey]) -> None:
            if current is None:
                raise NotFound(f"image {name!r} is not on this host")
            if users:
                raise Conflict(f"image {name!r} is used by {_nodes(users)}; delete them first")

        await self.store.delete_image(name, check)
        await self.puller.cancel(name)
        await self.puller.sweep()

    def waiting(self, name: str) -> str | None:
        """A node's message while its image downloads; None when it does not."""
        record = self.store.image(name)
        if record is None or record.phase is not ImagePhase.DOWNLOADING:
            return None
        progress = self.puller.progress(name)
        if progress is None:
            return waiting_message(name, 0, None)
        return waiting_message(name, progress.bytes_done, progress.bytes_total)

    def _not_a_folder(self, name: str, hint: str) -> None:
        if self.catalog.folder_image(name) is not None:
            raise Conflict(
                f"image {name!r} is a folder the operator placed in {self.catalog.root}; "
                f"the agent does not pull or remove it: {hint}"
            )

    def _users(self, name: str) -> list[str]:
        return [str(r.key) for r in self.store.all() if r.spec.image == name]

    def _pulled(self, record: ImageRecord) -> ImageInfo:
        progress = self.puller.progress(record.name)
        if record.phase is ImagePhase.DOWNLOADING and progress is not None:
            done, total = progress.bytes_done, progress.bytes_total
        else:
            total = record.bytes_total
            done = total or 0 if record.phase is ImagePhase.READY else 0
        return ImageInfo(
            name=record.name,
            origin="pulled",
            digest=f"sha256:{record.digest}",
            source=record.source,
            status=ImageStatus(
                phase=record.phase,
                message=record.message,
                bytes_done=done,
                bytes_total=total,
                updated_at=record.updated_at,
            ),
            used_by=self._users(record.name),
            unused_since=record.unused_since,
        )

    def _folder(self, name: str) -> ImageInfo:
        manifest = self.catalog.root / name / IMAGE_JSON
        changed = datetime.fromtimestamp(manifest.stat().st_mtime, UTC)
        return ImageInfo(
            name=name,
            origin="folder",
            status=ImageStatus(
                phase=ImagePhase.READY, updated_at=changed.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            ),
            used_by=self._users(name),
        )
