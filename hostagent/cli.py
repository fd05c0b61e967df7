"""`hostagent`: the daemon (`serve`), the lab image, and client verbs for the HTTP API."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import sys
from pathlib import Path
from typing import Any

from common import http, yamlio
from common.errors import HostAgentError
from hostagent import logs, tables
from hostagent.client import ApiError, Client
from hostagent.config import Config, load_config
from hostagent.demo import run_demo
from hostagent.lab import cli as lab_cli
from hostagent.zone import cli as zone_cli


def read_nodes(path: Path) -> list[dict[str, Any]]:
    """Nodes from a YAML/JSON file: {cluster, name, spec}, a list of those, or {items: [...]}."""
    text = sys.stdin.read() if str(path) == "-" else path.read_text()
    nodes: list[dict[str, Any]] = []
    for doc in yamlio.load_all(text):
        if doc is None:
            continue
        items = doc.get("items", [doc]) if isinstance(doc, dict) else doc
        nodes.extend(items)
    for node in nodes:
        if not isinstance(node, dict) or {"cluster", "name", "spec"} - set(node):
            raise SystemExit(f"{path}: every node needs cluster, name and spec")
    return nodes


def client_for(args: argparse.Namespace, config: Config) -> Client:
    tls = config.api.tls_cert is not None
    default_url = f"{'https' if tls else 'http'}://{config.api.listen}"
    url = args.url or os.environ.get("HOSTAGENT_URL") or default_url
    token = args.token or os.environ.get("HOSTAGENT_TOKEN")
    if token is None:
        try:
            token = config.token_file.read_text().strip()
        except OSError as exc:
            raise SystemExit(
                f"no API token: pass --token or make {config.token_file} readable ({exc.strerror})"
            ) from exc
    return Client(url, token, tls=_trust(config))


def _trust(config: Config) -> ssl.SSLContext:
    """The system's CAs, plus the agent's own certificate when it serves TLS: the CLI on
    the host trusts the agent it was configured with, whoever issued its certificate."""
    context = http.tls_context()
    if config.api.tls_cert is not None and config.api.tls_cert.exists():
        context.load_verify_locations(cafile=config.api.tls_cert)
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def cmd_serve(args: argparse.Namespace, config: Config) -> None:
    from hostagent.daemon import serve

    asyncio.run(serve(config, os.environ))


def cmd_image_build(args: argparse.Namespace, config: Config) -> None:
    from hostagent.labimage.build import build_lab_image
    from hostagent.labimage.cloudinit import build_cloudinit_image

    build = build_lab_image if args.name == "lab" else build_cloudinit_image
    folder = build(config.images, force=args.force)
    print(f"image {args.name} is ready in {folder}")


def cmd_apply(args: argparse.Namespace, config: Config) -> None:
    client = client_for(args, config)
    nodes = read_nodes(Path(args.file))
    for node in nodes:
        result = client.put_node(node["cluster"], node["name"], node["spec"])
        print(f"{node['cluster']}/{node['name']}: {result['status']['phase']}")
    if args.wait:
        client.wait(
            [(n["cluster"], n["name"]) for n in nodes], timeout_s=args.timeout, progress=print
        )
        cmd_list(args, config)


def cmd_get(args: argparse.Namespace, config: Config) -> None:
    node = client_for(args, config).get_node(args.cluster, args.node)
    tables.emit(node, args.output, lambda: tables.nodes([node]) + tables.node_events(node))


def cmd_list(args: argparse.Namespace, config: Config) -> None:
    nodes = client_for(args, config).nodes()
    tables.emit({"items": nodes}, args.output, lambda: tables.nodes(nodes))


def cmd_delete(args: argparse.Namespace, config: Config) -> None:
    client = client_for(args, config)
    client.delete_node(args.cluster, args.node)
    print(f"{args.cluster}/{args.node}: Deleting")
    if args.wait:
        client.wait(
            [(args.cluster, args.node)], until="Gone", timeout_s=args.timeout, progress=print
        )


def cmd_host(args: argparse.Namespace, config: Config) -> None:
    info = client_for(args, config).host()
    tables.emit(info, args.output if args.output != "table" else "yaml", lambda: "")


def cmd_render(args: argparse.Namespace, config: Config) -> None:
    """Print what a node's config drive would hold, without an agent or libvirt."""
    from hostagent.rendering import render_files

    files = render_files(config, Path(args.spec), role=args.role, only=args.only)
    for name, text in files.items():
        if len(files) > 1:
            print(f"# ---- {name} ----")
        print(text, end="" if text.endswith("\n") else "\n")


def cmd_demo(args: argparse.Namespace, config: Config) -> None:
    run_demo(config, client_for)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="hostagent", description=__doc__)
    top.add_argument(
        "-c", "--config", type=Path, help="TOML file (default /etc/hostagent/hostagent.toml)"
    )
    top.add_argument("--url", help="agent API URL (default from api.listen; env HOSTAGENT_URL)")
    top.add_argument(
        "--token", help="API token (default <state_dir>/api-token; env HOSTAGENT_TOKEN)"
    )
    top.add_argument("-v", "--verbose", action="store_true")
    top.add_argument(
        "--log-format",
        choices=["auto", "text", "json"],
        default="auto",
        help="auto: JSON lines when running under systemd's journal, else text",
    )
    sub = top.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="run the agent").set_defaults(func=cmd_serve)
    image = sub.add_parser("image", help="base images").add_subparsers(dest="image", required=True)
    build = image.add_parser("build", help="build a lab image offline from Debian's packages")
    build.add_argument("name", choices=["lab", "lab-cloudinit"])
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    build.set_defaults(func=cmd_image_build)
    zone_cli.add_image_commands(image)

    def with_output(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
        return p

    def with_wait(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--wait", action="store_true", help="show progress until done")
        p.add_argument("--timeout", type=float, default=900.0, help="seconds --wait waits")
        return p

    apply = with_output(with_wait(sub.add_parser("apply", help="create or update nodes")))
    apply.add_argument("-f", "--file", required=True, help="YAML or JSON file, - for stdin")
    apply.set_defaults(func=cmd_apply)
    get = with_output(sub.add_parser("get", help="show one node"))
    get.add_argument("cluster")
    get.add_argument("node")
    get.set_defaults(func=cmd_get)
    with_output(sub.add_parser("list", help="list nodes")).set_defaults(func=cmd_list)
    delete = with_wait(sub.add_parser("delete", help="delete a node"))
    delete.add_argument("cluster")
    delete.add_argument("node")
    delete.set_defaults(func=cmd_delete)
    with_output(sub.add_parser("host", help="host capacity and allocation")).set_defaults(
        func=cmd_host
    )
    sub.add_parser("demo", help="create a demo cluster of lab VMs").set_defaults(func=cmd_demo)
    render = sub.add_parser("render", help="print a node's user-data, meta-data, network-config")
    render.add_argument("--spec", required=True, help="a NodeSpec, or {cluster, name, spec}")
    render.add_argument("--role", choices=["master", "worker"], help="override the spec's role")
    render.add_argument("--only", choices=["user-data", "meta-data", "network-config"])
    render.set_defaults(func=cmd_render)
    zone_cli.add_commands(sub)
    lab_cli.add_commands(sub)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logs.setup(logging.DEBUG if args.verbose else logging.INFO, args.log_format, os.environ)
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        # The zone, cluster and lab verbs never read the agent's configuration (the zone
        # runs as its own user, which may not read /etc/hostagent/hostagent.toml).
        config = load_config(args.config) if getattr(args, "agent_config", True) else Config()
        args.func(args, config)
    except HostAgentError as exc:
        raise SystemExit(f"hostagent: {exc}") from exc
    except ApiError as exc:
        raise SystemExit(f"hostagent: {exc}") from exc
    except TimeoutError as exc:
        raise SystemExit(f"hostagent: {exc}") from exc
    except BrokenPipeError:  # output piped into head or less that quit early
        sys.stderr.close()
