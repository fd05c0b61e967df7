"""The only module that runs `nft`: observe and apply this agent's table (network.firewall).

Blocking, synchronous calls (a short-lived process each): the daemon runs them with
asyncio.to_thread. A change is one `nft -f -` transaction, so the kernel has the old table
or the new one, never half of either. Only the table named after this agent's host id is
ever listed, replaced or deleted; every other table (another agent's, the host's own
firewall) is left alone.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from network.firewall import FAMILY, TableAction, plan_table, table_name, table_wanted
from network.model import ClusterNetworkWanted, NetworkError

log = logging.getLogger(__name__)

TIMEOUT_S = 30.0
_ABSENT = "Error: No such file or directory"  # nft's answer for a table that is not there
_NETNS_DIR = Path("/run/netns")  # where `ip netns` keeps the named namespaces


class NfTables:
    """host tables in one network namespace (the root one unless netns is given; then
    nft runs under `ip netns exec`, for tests and labs)."""

    def __init__(self, netns: str | None = None, nft: str = "nft") -> None:
        self._netns = netns
        self._nft = nft

    def listing(self, host: str) -> str | None:
        """host's table as `nft list table` prints it; None when there is none."""
        name = f"{FAMILY} {table_name(host)}"
        done = self._run(["list", "table", *name.split()], None, check=False)
        if done.returncode == 0:
            return done.stdout
        if done.stderr.startswith(_ABSENT):
            return None
        raise NetworkError(f"nft list table {name} failed: {_message(done.stderr)}")

    def apply(self, actions: Iterable[TableAction]) -> None:
        for action in actions:
            self._run(["-f", "-"], action.script())
            log.info("network: %s", action)

    def reconcile(
        self, clusters: Sequence[ClusterNetworkWanted], *, host: str, tcp_ports: Iterable[int]
    ) -> list[TableAction]:
        """Make host's table guard exactly these clusters' bridges (no table when there
        are none); returns the actions applied ([] when the table was right)."""
        wanted = table_wanted(clusters, host=host, tcp_ports=tcp_ports)
        actions = plan_table(host, wanted, self.listing(host))
        self.apply(actions)
        return actions

    def _run(
        self, args: list[str], stdin: str | None, *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        nft = shutil.which(self._nft)
        if nft is None:
            raise NetworkError(
                f"{self._nft!r} not found: install nftables (scripts/setup-host.sh does); "
                "the cluster bridges' isolation needs it"
            )
        prefix = []
        if self._netns is not None:
            if not (_NETNS_DIR / self._netns).exists():
                raise NetworkError(f"network namespace {self._netns!r} does not exist")
            prefix = ["ip", "netns", "exec", self._netns]
        argv = [*prefix, nft, *args]
        try:
            done = subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise NetworkError(f"nft {' '.join(args)} did not finish in {TIMEOUT_S} s") from err
        if check and done.returncode != 0:
            raise NetworkError(f"nft {' '.join(args)} failed: {_message(done.stderr)}")
        return done


def _message(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-3:]) if lines else "(no message)"
