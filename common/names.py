"""Names users choose (clusters, nodes, images, hosts): DNS-1123 labels, checked in one place."""

from __future__ import annotations

import re

DNS1123_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_name(kind: str, value: str) -> str:
    """Return value when it is a DNS-1123 label, else raise ValueError naming the kind."""
    if not DNS1123_LABEL.fullmatch(value):
        raise ValueError(
            f"{kind} {value[:80]!r} is not a DNS-1123 label: lowercase a-z, 0-9 and '-', "
            "at most 63 characters, starting and ending with a letter or digit"
        )
    return value


def check_dns_name(kind: str, value: str) -> str:
    """Return value when it is a DNS name of DNS-1123 labels (cluster.local), else ValueError."""
    labels = value.split(".")
    if len(value) > 253 or not all(DNS1123_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{kind} {value[:80]!r} is not a DNS name")
    return value
