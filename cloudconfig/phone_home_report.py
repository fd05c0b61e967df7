"""Runs INSIDE the guest (python3 -c): prints the JSON body the guest phones home with.

Not imported by the agent: userdata.py reads this file's text and puts it into the
last runcmd entry. argv[1] is a JSON object userdata.py wrote: `role`,
`kubernetes_version`, `health_interval_s` (the guest reports its health this often),
`files` (every path write_files wrote), `mounts` (paths that
must be mount points) and `marker` (a file an earlier runcmd entry creates). Kept to
the standard library of any python3 a cloud-init guest has.
"""

import json
import os
import socket
import stat
import subprocess
import sys


def mode(path: str) -> "str | None":
    """The file's permission bits in octal, e.g. "0644"; None when it does not exist."""
    try:
        return format(stat.S_IMODE(os.stat(path).st_mode), "04o")
    except OSError:
        return None


def addresses() -> "list[str]":
    """The guest's global IPv4 addresses with prefix length (`ip -4 -o addr`)."""
    try:
        out = subprocess.run(
            ["ip", "-4", "-o", "addr", "show", "scope", "global"],
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        ).stdout
    except OSError:
        return []
    fields = (line.split() for line in out.splitlines())
    return [words[3] for words in fields if len(words) > 3 and words[2] == "inet"]


def report(expected: "dict[str, object]") -> "dict[str, object]":
    files = expected["files"]
    mounts = expected["mounts"]
    marker = expected["marker"]
    assert isinstance(files, list) and isinstance(mounts, list) and isinstance(marker, str)
    return {
        "hostname": socket.gethostname(),
        "addresses": addresses(),
        "files": {path: mode(path) for path in files},
        "mounts": {path: os.path.ismount(path) for path in mounts},
        "commands_ran": os.path.exists(marker),
        "role": expected["role"],
        "kubernetes_version": expected["kubernetes_version"],
        "health_interval_s": expected["health_interval_s"],
    }


if __name__ == "__main__":
    print(json.dumps(report(json.loads(sys.argv[1])), sort_keys=True))
