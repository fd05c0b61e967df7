"""`hostagent render`: a node's config drive contents from a spec file, for inspection and diffs.

The phone-home token is a placeholder (the real one is made when the agent accepts the
node), so two renders of the same spec are identical and diff cleanly.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from cloudconfig.render import render_node
from common import yamlio
from hostagent.config import Config
from hostagent.errors import Invalid
from hostagent.model import NodeKey, NodeSpec, Phase
from hostagent.nodecontext import node_context
from hostagent.store import NodeRecord

PLACEHOLDER_TOKEN = "0" * 32


def load_node(path: Path, role: str | None) -> tuple[NodeKey, NodeSpec]:
    try:
        data = yamlio.load(path.read_text())
    except (OSError, yamlio.YAMLError) as exc:
        raise Invalid(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise Invalid(f"{path} must hold a NodeSpec or a mapping with cluster, name and spec")
    # {cluster, name, spec} as `hostagent apply` takes it, or a bare NodeSpec
    cluster, name, spec = "example", "node", data
    if "spec" in data:
        cluster, name, spec = str(data.get("cluster")), str(data.get("name")), data["spec"]
    if role is not None and isinstance(spec, dict):
        spec = {**spec, "role": role}
    try:
        return NodeKey(cluster=cluster, name=name), NodeSpec.model_validate(spec)
    except ValidationError as exc:
        raise Invalid(f"{path}: {exc}") from exc


def render_files(
    config: Config, path: Path, *, role: str | None = None, only: str | None = None
) -> dict[str, str]:
    key, spec = load_node(path, role)
    record = NodeRecord(key, spec, PLACEHOLDER_TOKEN, Phase.PENDING, "", "", False, None, None)
    cloudconfig = config.cloudconfig
    files = render_node(
        node_context(config, record), cloudconfig.template_dir, cloudconfig.calico_manifest
    )
    return {name: text for name, text in files.items() if only in (None, name)}
