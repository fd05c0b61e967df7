"""The lab's one error class: what failed, in words a person can act on."""

from __future__ import annotations

from common.errors import HostAgentError


class LabError(HostAgentError):
    code = "lab"
