"""Running a program and turning its failure into a LabError that quotes it."""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Sequence

from hostagent.lab.errors import LabError

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 60.0


def run(
    argv: Sequence[str], *, check: bool = True, timeout: float | None = DEFAULT_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run argv to its end, output captured as text; LabError on failure when check."""
    log.debug("run: %s", shlex.join(argv))
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{shlex.join(argv)}: no answer within {timeout} s") from exc
    except OSError as exc:
        raise LabError(f"{shlex.join(argv)}: {exc}") from exc
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        raise LabError(f"{shlex.join(argv)}: {detail}")
    return done
