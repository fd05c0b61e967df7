"""Pure: what `PUT /v1/images/{name}` names (an ImageSource: the files of an image by URL
and sha256), an image's digest, and how an image reads in the API.

An image boots directly (domain XML: kernel, initrd, root disk), so a source is either
one archive (``format: tar``: an image folder as `hostagent image build` makes it, with
its image.json) or a qcow2 root disk with its kernel and initrd and the kernel's command
line (``format: qcow2``). The image's digest is the sha256 of its parts' digests (not
of their URLs: the same content from another mirror is the same image); pulled images
are stored under it, so two names of the same content share one copy.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SHA256 = re.compile(r"^[0-9a-f]{64}$")
CMDLINE_MAX = 2048
# The parts of a qcow2 source, in the order a download reports them.
PARTS = ("kernel", "initrd", "disk")


class ImagePhase(enum.StrEnum):
    DOWNLOADING = "Downloading"
    READY = "Ready"
    FAILED = "Failed"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_url(value: str) -> str:
    if not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", value):
        raise ValueError(f"url {value[:80]!r} must be an http:// or https:// URL")
    return value


def check_sha256(value: str) -> str:
    if not SHA256.fullmatch(value):
        raise ValueError("sha256 must be 64 lowercase hexadecimal digits")
    return value


class FileSource(_Strict):
    """One file of an image: where to get it and its sha256 (hex), verified before use."""

    url: Annotated[str, Field(max_length=2048)]
    sha256: str

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url(value)

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        return check_sha256(value)


class ImageSource(FileSource):
    """`url`/`sha256`: the qcow2 root disk (format qcow2, with kernel, initrd and cmdline)
    or a tar archive of an image folder (format tar, nothing else)."""

    format: Literal["qcow2", "tar"] = "qcow2"
    kernel: FileSource | None = None
    initrd: FileSource | None = None
    cmdline: Annotated[str, Field(max_length=CMDLINE_MAX)] | None = None

    @field_validator("cmdline")
    @classmethod
    def _cmdline(cls, value: str | None) -> str | None:
        if value is not None and not value.isprintable():
            raise ValueError("cmdline must be one line of printable characters")
        return value

    @model_validator(mode="after")
    def _parts(self) -> ImageSource:
        extras = (self.kernel, self.initrd, self.cmdline)
        if self.format == "tar" and any(part is not None for part in extras):
            raise ValueError("a tar source brings its kernel, initrd and cmdline (image.json)")
        if self.format == "qcow2" and any(part is None for part in extras):
            raise ValueError(
                "a qcow2 source needs kernel and initrd (url and sha256 each) and cmdline: "
                "images boot their kernel directly"
            )
        return self

    def files(self) -> dict[str, FileSource]:
        """What to download, by part: {"archive": ...} or kernel, initrd and disk."""
        if self.format == "tar":
            return {"archive": FileSource(url=self.url, sha256=self.sha256)}
        assert self.kernel is not None and self.initrd is not None
        return {
            "kernel": self.kernel,
            "initrd": self.initrd,
            "disk": FileSource(url=self.url, sha256=self.sha256),
        }

    def digest(self) -> str:
        """sha256 of what the image is (its parts' digests, its command line)."""
        content = {
            "format": self.format,
            "cmdline": self.cmdline,
            "files": {part: source.sha256 for part, source in self.files().items()},
        }
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class ImageStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    phase: ImagePhase
    message: str = ""
    bytes_done: int = Field(default=0, description="Bytes downloaded and hashed so far")
    bytes_total: int | None = Field(
        default=None, description="Bytes to download, once every server said (Content-Length)"
    )
    updated_at: str


class ImageInfo(BaseModel):
    """An image on this host: pulled (`PUT /v1/images/{name}`) or a folder the operator put
    in the image directory (origin "folder": no source, never collected)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    origin: Literal["pulled", "folder"]
    digest: str | None = Field(default=None, description="sha256:<hex> of a pulled image")
    source: ImageSource | None = None
    status: ImageStatus
    used_by: list[str] = Field(
        default_factory=list, description="The nodes (cluster/node) on this host that name it"
    )
    unused_since: str | None = Field(
        default=None,
        description="Since when no node has named it; collected after [images] unused_ttl_s",
    )


class ImageList(BaseModel):
    items: list[ImageInfo]


def percent(done: int, total: int | None) -> int | None:
    if not total:
        return None
    return min(100, done * 100 // total)


def waiting_message(name: str, done: int, total: int | None) -> str:
    """A node's message while its image downloads; the percentage in steps of 5 so that
    a node's history does not get a line per percent."""
    share = percent(done, total)
    if share is None:
        return f"waiting for image {name!r} to download"
    return f"waiting for image {name!r}: {share // 5 * 5} % downloaded"
