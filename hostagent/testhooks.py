"""Test-only fault injection: the agent stops itself right after a named provisioning step.

Two environment variables, read once when `hostagent serve` starts (an unknown step name
is an error at start), each naming one Point:

- HOSTAGENT_TEST_CRASH_AFTER=<point>: right after that step completes the agent SIGKILLs
  itself, so it dies as in a real crash, with no cleanup (tests/e2e/test_crash_steps.py
  restarts it and checks that the node converges with nothing leaked);
- HOSTAGENT_TEST_FREEZE_AFTER=<point>: the agent SIGSTOPs itself there, once, so that a
  test can break something at exactly that moment (kill libvirtd) and then SIGCONT it.

Unset, as in production, neither has any effect. Never set them on a real host.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
from collections.abc import Mapping

from hostagent.errors import ConfigError

log = logging.getLogger(__name__)

CRASH_AFTER = "HOSTAGENT_TEST_CRASH_AFTER"
FREEZE_AFTER = "HOSTAGENT_TEST_FREEZE_AFTER"


class Point(enum.Enum):
    """The step boundaries, in the order a node passes them."""

    # making a node
    NETWORK = "network"  # the cluster's bridge, VXLAN, FDB, rules and nftables table
    DIRECTORIES = "directories"  # the node's directories
    CERTIFICATES = "certificates"  # its certificate set (in parallel with the next two)
    CONFIG_DRIVE = "config-drive"
    DISK = "disk"  # the root disk overlay (and the etcd disk)
    FILES = "files"  # all of the node's files
    DEFINE = "define"
    START = "start"  # the domain runs, not yet recorded
    RUNNING = "running"  # ... and recorded as Running
    # deleting a node (and removing a domain that has no node)
    SHUTDOWN = "shutdown"
    DESTROY = "destroy"  # a domain without a node: destroy, remove-files, cluster-gone, undefine
    UNDEFINE = "undefine"
    REMOVE_FILES = "remove-files"
    CLUSTER_GONE = "cluster-gone"  # its cluster's certificates revoked (its last node)
    FORGET = "forget"  # the node is gone from the store
    NETWORK_TEARDOWN = "network-teardown"  # the networks of the clusters left


def _point(environ: Mapping[str, str], name: str) -> Point | None:
    value = environ.get(name, "")
    if not value:
        return None
    try:
        return Point(value)
    except ValueError:
        known = ", ".join(point.value for point in Point)
        raise ConfigError(f"{name}={value[:80]!r} names no step; the steps are: {known}") from None


class Hook:
    def __init__(self, crash_after: Point | None = None, freeze_after: Point | None = None):
        self.crash_after = crash_after
        self.freeze_after = freeze_after

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Hook:
        return cls(_point(environ, CRASH_AFTER), _point(environ, FREEZE_AFTER))

    def reached(self, point: Point) -> None:
        """Called right after each step completes: no effect unless a test asked for one."""
        if point is self.freeze_after:
            self.freeze_after = None
            log.warning("%s=%s: stopping (SIGSTOP) until SIGCONT", FREEZE_AFTER, point.value)
            os.kill(os.getpid(), signal.SIGSTOP)
        if point is self.crash_after:
            log.warning("%s=%s: killing the agent (SIGKILL)", CRASH_AFTER, point.value)
            os.kill(os.getpid(), signal.SIGKILL)
