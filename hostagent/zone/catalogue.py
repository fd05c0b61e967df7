"""The zone's image catalogue (`PUT|GET|DELETE /v1/images/{name}` on the zone): images by
source and digest, the agent's ImageSource under a name. A cluster naming one gets it on
each host it is placed on before the host gets the cluster's nodes (driver.py); images
not in the catalogue are the hosts' own, as before."""

from __future__ import annotations

from typing import Any

from hostagent.errors import Conflict, NotFound
from hostagent.imagesource import ImagePhase, ImageSource
from hostagent.store import now as stamp
from hostagent.zone.hostimages import image_view, reported
from hostagent.zone.service import ZoneService, valid_name
from hostagent.zone.store import CatalogueImage, ZoneStore, naming


class Catalogue:
    def __init__(self, service: ZoneService) -> None:
        self.service = service

    @property
    def store(self) -> ZoneStore:
        return self.service.store

    async def put(self, name: str, source: ImageSource) -> tuple[dict[str, Any], bool]:
        """201 when new, 200 when it existed (the same source: nothing changes, but hosts
        whose pull of it failed are sent it again: PUT again to retry); 409 for another
        source while a cluster names it."""
        valid_name("image", name)
        image = CatalogueImage(name, source, stamp())

        def check(current: CatalogueImage | None, users: list[str]) -> None:
            if current is not None and current.source != source and users:
                raise Conflict(
                    f"image {name} is named by cluster {', '.join(users)}: its content "
                    "cannot change while a cluster names it; PUT the new content under "
                    "another name and roll the clusters to it"
                )

        created = await self.store.put_image(image, check)
        await self._retry_failed(name)
        self.service.on_change(self._hosts_naming(name))
        return self.get(name), created

    def get(self, name: str) -> dict[str, Any]:
        valid_name("image", name)
        image = self.store.image(name)
        if image is None:
            raise NotFound(f"image {name} is not in the zone's catalogue")
        return image_view(image, self._users(name), self.store.hosts())

    def all(self) -> list[dict[str, Any]]:
        hosts = self.store.hosts()
        return [image_view(i, self._users(i.name), hosts) for i in self.store.images()]

    async def delete(self, name: str) -> None:
        """204; 404 when unknown, 409 while a cluster names it. The hosts keep their
        copies until their agents collect them ([images] unused_ttl_s)."""
        valid_name("image", name)

        def check(current: CatalogueImage | None, users: list[str]) -> None:
            if current is None:
                raise NotFound(f"image {name} is not in the zone's catalogue")
            if users:
                raise Conflict(
                    f"image {name} is named by cluster {', '.join(users)}; delete them or "
                    "roll them to another image first"
                )

        await self.store.delete_image(name, check)

    def _users(self, name: str) -> list[str]:
        return naming(name, self.store.clusters(), self.store.nodes())

    def _hosts_naming(self, name: str) -> set[str]:
        users = set(self._users(name))
        return {n.host for n in self.store.nodes() if n.cluster in users}

    async def _retry_failed(self, name: str) -> None:
        """Forget the deliveries of the image to hosts that report its pull Failed: their
        next pass PUTs it again, and the agent pulls again."""
        image = self.store.image(name)
        assert image is not None
        for host in self.store.hosts():
            entry = reported(host.report, image)
            if entry is not None and entry.phase == ImagePhase.FAILED.value:
                await self.store.set_delivery(host.id, "image", name, None)
