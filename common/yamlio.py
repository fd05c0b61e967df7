"""YAML in and out, the only module that imports PyYAML. Loading is always safe (the C
loader where PyYAML was built with it); each way of writing is one function here, so
the same document is always written the same way."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import yaml
from yaml.representer import SafeRepresenter

YAMLError = yaml.YAMLError
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_FAST_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def load(text: str) -> Any:
    return yaml.load(text, Loader=_LOADER)


def load_all(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=_LOADER))


def dump(data: Any) -> str:
    """Block style, keys in their order: what people read (meta-data, `-o yaml`)."""
    return yaml.safe_dump(data, default_flow_style=False, sort_keys=False)


def dump_all(documents: Iterable[Any]) -> str:
    """Several documents, keys in their order (Kubernetes manifests)."""
    return yaml.dump_all(documents, Dumper=_FAST_DUMPER, sort_keys=False)


class _BlockDumper(_FAST_DUMPER):  # type: ignore[misc,valid-type]
    """Multi-line strings as literal blocks (`|`), so files read as files. The emitter
    itself falls back to double quotes for text a block cannot carry exactly (tabs,
    trailing spaces, control characters, ...)."""


def _block_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _block_str)


def dump_blocks(data: Any) -> str:
    """Keys in their order, one line per value (no folding), multi-line strings as
    blocks: a #cloud-config whose files read as files."""
    return str(
        yaml.dump(
            data,
            Dumper=_BlockDumper,
            sort_keys=False,
            allow_unicode=True,
            default_flow_style=False,
            width=1 << 30,
        )
    )


class _QuotingDumper(yaml.SafeDumper):
    """Every string double-quoted: the one YAML style that can hold any string on one line
    (line breaks and non-printables become escapes), so a value can never change the
    structure of the document it is pasted into, whatever its indentation."""


def _quoted_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')


_QuotingDumper.add_representer(str, _quoted_str)
_QuotingDumper.add_representer(tuple, SafeRepresenter.represent_list)


def one_line(value: object) -> str:
    """Any value as one line of YAML (flow style, strings double-quoted, tuples as
    lists); ValueError for what YAML has no tag for."""
    try:
        text = yaml.dump(
            value,
            Dumper=_QuotingDumper,
            default_flow_style=True,
            width=math.inf,
            allow_unicode=True,
        )
    except yaml.YAMLError as exc:
        raise ValueError(f"cannot write {type(value).__name__} as YAML: {exc}") from exc
    # A bare scalar (int, bool, null) is dumped as a document with an explicit end.
    text = text.removesuffix("\n...\n").removesuffix("\n")
    if "\n" in text:  # cannot happen with the dumper above; kept as the last guard
        raise ValueError(f"value does not fit on one YAML line: {value!r:.80}")
    return text
