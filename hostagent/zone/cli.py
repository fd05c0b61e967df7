"""The zone's verbs of the `hostagent` command: `zone serve|host-token|hosts`,
`cluster create|scale|upgrade|get|list|describe|console|delete` and `image push|list|rm`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

from hostagent import tables
from hostagent.config import Config
from hostagent.console import DEFAULT_TAIL_BYTES
from hostagent.errors import StoreUnavailable
from hostagent.zone.client import RolloutStopped, ZoneClient, resolve_context
from hostagent.zone.config import load_zone_config
from hostagent.zone.describe import describe
from hostagent.zone.tokens import next_host_token


def _client(args: argparse.Namespace) -> ZoneClient:
    context = resolve_context(args.zone, args.zone_token, args.zone_context, dict(os.environ))
    return ZoneClient(context)


def cmd_zone_serve(args: argparse.Namespace, _: Config) -> None:
    from hostagent.zone.server import serve

    asyncio.run(serve(load_zone_config(args.zone_config), os.environ))


def cmd_host_token(args: argparse.Namespace, _: Config) -> None:
    config = load_zone_config(args.zone_config)
    try:
        print(next_host_token(config, args.host))
    except (ValueError, StoreUnavailable) as exc:
        raise SystemExit(f"hostagent: {exc}") from exc


def cmd_hosts(args: argparse.Namespace, _: Config) -> None:
    hosts = _client(args).hosts()

    def table() -> str:
        head = ("HOST", "STATE", "DOMAIN", "UNDERLAY", "NODES", "FREE MEMORY", "LAST SEEN")
        rows = [head] + [
            (
                h["host"],
                h["state"],
                h["failure_domain"],
                h["underlay_address"] or "-",
                str(len(h["nodes"])),
                f"{h['allocatable']['memory_mib'] - h['allocated']['memory_mib']} MiB",
                f"{h['last_heartbeat_s_ago']}s ago",
            )
            for h in hosts
        ]
        return tables.render(rows)

    tables.emit({"items": hosts}, args.output, table)


def cmd_remove_host(args: argparse.Namespace, _: Config) -> None:
    _client(args).remove_host(args.host)
    print(f"host {args.host}: removed from the zone")


def cluster_spec(args: argparse.Namespace) -> dict[str, Any]:
    keys = [Path(p).read_text().strip() for p in args.ssh_key or []]
    pool = {"vcpus": args.vcpus, "memory_mib": args.memory_mib, "disk_gib": args.disk_gib}
    return {
        "kubernetes_version": args.kubernetes_version,
        "image": args.image,
        "masters": {"count": args.masters, **pool},
        "workers": {"count": args.workers, **pool},
        "ssh_authorized_keys": keys,
    }


def cmd_cluster_create(args: argparse.Namespace, _: Config) -> None:
    client = _client(args)
    view = client.put_cluster(args.name, cluster_spec(args))
    status = view["status"]
    print(
        f"cluster {args.name}: vni {status['vni']}, nodes {status['node_subnet']}, "
        + ", ".join(f"{n['name']} on {n['host']}" for n in status["nodes"])
    )
    if args.wait:
        client.wait(args.name, "Ready", timeout_s=args.timeout, progress=print)
        cmd_cluster_describe(args, _)


def cmd_cluster_scale(args: argparse.Namespace, _: Config) -> None:
    client = _client(args)
    spec = client.cluster(args.name)["spec"]
    spec["workers"]["count"] = args.workers
    view = client.put_cluster(args.name, spec)
    print(f"cluster {args.name}: {len(view['status']['nodes'])} nodes")
    if args.wait:
        client.wait(args.name, "Ready", timeout_s=args.timeout, progress=print)


def cmd_cluster_upgrade(args: argparse.Namespace, _: Config) -> None:
    """PUT the cluster's spec with a new version (and image); with --wait, show the
    rollout's progress until it is done, exiting non-zero with the reason if it stops."""
    client = _client(args)
    spec = client.cluster(args.name)["spec"]
    spec["kubernetes_version"] = args.kubernetes_version
    if args.image is not None:
        spec["image"] = args.image
    view = client.put_cluster(args.name, spec)
    print(f"cluster {args.name}: {view['status']['phase']}: {view['status']['message']}")
    if args.wait:
        try:
            client.wait_rollout(args.name, timeout_s=args.timeout, progress=print)
        except (RolloutStopped, TimeoutError) as exc:
            raise SystemExit(f"hostagent: {exc}") from exc
        print(f"cluster {args.name}: every node runs {args.kubernetes_version}")


def cmd_cluster_get(args: argparse.Namespace, _: Config) -> None:
    print(json.dumps(_client(args).cluster(args.name), indent=2))


def cmd_cluster_list(args: argparse.Namespace, _: Config) -> None:
    clusters = _client(args).clusters()

    def table() -> str:
        rows = [("CLUSTER", "PHASE", "NODES", "VNI", "SUBNET")] + [
            (
                c["name"],
                c["status"]["phase"],
                str(len(c["status"]["nodes"])),
                str(c["status"]["vni"]),
                c["status"]["node_subnet"],
            )
            for c in clusters
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows
        )

    tables.emit({"items": clusters}, args.output, table)


def cmd_cluster_describe(args: argparse.Namespace, _: Config) -> None:
    print(describe(_client(args).cluster(args.name), tables.age))


def cmd_cluster_delete(args: argparse.Namespace, _: Config) -> None:
    client = _client(args)
    client.delete_cluster(args.name)
    print(f"cluster {args.name}: deleting")
    if args.wait:
        client.wait(args.name, "Gone", timeout_s=args.timeout, progress=print)


def cmd_cluster_console(args: argparse.Namespace, _: Config) -> None:
    print(_client(args).console(args.name, args.node, args.tail_bytes), end="")


def image_source(args: argparse.Namespace) -> dict[str, Any]:
    """The ImageSource of `image push`'s flags (the zone checks it: 422 with the reason)."""
    source: dict[str, Any] = {"url": args.url, "sha256": args.sha256, "format": args.format}
    for part in ("kernel", "initrd"):
        url, digest = getattr(args, f"{part}_url"), getattr(args, f"{part}_sha256")
        if url is not None or digest is not None:
            source[part] = {"url": url, "sha256": digest}
    if args.cmdline is not None:
        source["cmdline"] = args.cmdline
    return source


def cmd_image_push(args: argparse.Namespace, _: Config) -> None:
    view = _client(args).put_image(args.name, image_source(args))
    print(f"image {view['name']}: {view['digest']} in the zone's catalogue")


def cmd_image_list(args: argparse.Namespace, _: Config) -> None:
    images = _client(args).images()

    def table() -> str:
        rows = [("IMAGE", "DIGEST", "CLUSTERS", "HOSTS")] + [
            (
                i["name"],
                i["digest"][:19],
                ", ".join(i["used_by"]) or "-",
                ", ".join(f"{h['host']} {h['phase']}" for h in i["hosts"]) or "-",
            )
            for i in images
        ]
        return tables.render(rows)

    tables.emit({"items": images}, args.output, table)


def cmd_image_rm(args: argparse.Namespace, _: Config) -> None:
    _client(args).delete_image(args.name)
    print(f"image {args.name}: removed from the zone's catalogue")


def add_image_commands(image: Any) -> None:
    """`hostagent image push|list|rm`: the zone's image catalogue."""
    push = image.add_parser("push", help="add an image to the zone's catalogue by URL and sha256")
    push.add_argument("name")
    push.add_argument("--url", required=True, help="the qcow2 root disk, or a tar of an image")
    push.add_argument("--sha256", required=True, help="its sha256 (hex)")
    push.add_argument("--format", choices=["qcow2", "tar"], default="qcow2")
    for part in ("kernel", "initrd"):
        push.add_argument(f"--{part}-url", help=f"the {part} of a qcow2 image")
        push.add_argument(f"--{part}-sha256", help=f"the {part}'s sha256 (hex)")
    push.add_argument("--cmdline", help="the kernel command line of a qcow2 image")
    _zone_flags(push)
    push.set_defaults(agent_config=False, func=cmd_image_push)
    listing = image.add_parser("list", help="the zone's image catalogue and the hosts' copies")
    listing.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    _zone_flags(listing)
    listing.set_defaults(agent_config=False, func=cmd_image_list)
    remove = image.add_parser("rm", help="remove an image no cluster names from the catalogue")
    remove.add_argument("name")
    _zone_flags(remove)
    remove.set_defaults(agent_config=False, func=cmd_image_rm)


def _zone_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--zone",
        help="zone URL (env HOSTAGENT_ZONE_URL; default the lab's or http://127.0.0.1:8471)",
    )
    parser.add_argument(
        "--zone-token",
        help="the zone's admin token (env HOSTAGENT_ZONE_TOKEN; "
        "default /var/lib/hostagent-zone/api-token)",
    )
    parser.add_argument(
        "--zone-context",
        type=Path,
        help="a JSON file with url, token, ca_file "
        "(`hostagent lab up` writes /var/lib/hostagent-lab/zone-client.json)",
    )


def add_commands(sub: Any) -> None:
    zone = sub.add_parser("zone", help="the host-zone API").add_subparsers(
        dest="zone", required=True
    )
    serve = zone.add_parser("serve", help="run the zone")
    serve.add_argument("--zone-config", type=Path, help="TOML (default /etc/hostagent/zone.toml)")
    serve.set_defaults(agent_config=False, func=cmd_zone_serve)
    token = zone.add_parser(
        "host-token",
        help="print a new one-time token a host's agent bootstraps its certificate with",
    )
    token.add_argument("host")
    token.add_argument("--zone-config", type=Path, help="TOML (default /etc/hostagent/zone.toml)")
    token.set_defaults(agent_config=False, func=cmd_host_token)
    hosts = zone.add_parser("hosts", help="the zone's hosts")
    hosts.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    _zone_flags(hosts)
    hosts.set_defaults(agent_config=False, func=cmd_hosts)
    remove = zone.add_parser("remove-host", help="forget a host that runs no wanted node")
    remove.add_argument("host")
    _zone_flags(remove)
    remove.set_defaults(agent_config=False, func=cmd_remove_host)

    cluster = sub.add_parser("cluster", help="guest clusters through the zone")
    verbs = cluster.add_subparsers(dest="verb", required=True)

    def verb(name: str, help: str, func: Any, wait: bool = False) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = verbs.add_parser(name, help=help)
        parser.add_argument("name")
        _zone_flags(parser)
        if wait:
            parser.add_argument("--wait", action="store_true", help="show progress until done")
            parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait")
        parser.set_defaults(agent_config=False, func=func)
        return parser

    create = verb("create", "create a cluster", cmd_cluster_create, wait=True)
    create.add_argument("--masters", type=int, default=1)
    create.add_argument("--workers", type=int, default=1)
    create.add_argument("--kubernetes-version", default="1.31.2")
    create.add_argument("--image", default="lab")
    create.add_argument("--vcpus", type=int, default=1)
    create.add_argument("--memory-mib", type=int, default=256)
    create.add_argument("--disk-gib", type=int, default=1)
    create.add_argument("--ssh-key", action="append", help="a public key file (repeatable)")
    scale = verb("scale", "change the worker count", cmd_cluster_scale, wait=True)
    scale.add_argument("--workers", type=int, required=True)
    upgrade = verb(
        "upgrade", "roll the cluster to another Kubernetes version", cmd_cluster_upgrade, wait=True
    )
    upgrade.add_argument("--kubernetes-version", required=True)
    upgrade.add_argument("--image", help="also roll to this image")
    verb("get", "the cluster as JSON", cmd_cluster_get)
    verb("describe", "the cluster as a tree", cmd_cluster_describe)
    console = verb("console", "the end of a node's serial console", cmd_cluster_console)
    console.add_argument("node")
    console.add_argument(
        "--tail-bytes", type=int, default=DEFAULT_TAIL_BYTES, help="at most this many bytes"
    )
    verb("delete", "delete the cluster from every host", cmd_cluster_delete, wait=True)
    listing = verbs.add_parser("list", help="every cluster")
    listing.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    _zone_flags(listing)
    listing.set_defaults(agent_config=False, func=cmd_cluster_list)
