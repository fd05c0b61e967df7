"""The PKI's errors, inside the project's one hierarchy (common.errors).

Two kinds matter to callers: the backend could not be reached (wait and retry; nothing
was written) and the backend refused (a role or policy says no: an operator must act).
"""

from __future__ import annotations

from common.errors import ProvisioningError


class PkiError(ProvisioningError):
    """A node's certificates could not be made; the message says which and why."""

    code = "pki"


class BackendUnavailable(PkiError):
    """The CA backend is down, sealed or unreachable. Nothing was written; retry later."""

    code = "pki_unavailable"


class BackendRefused(PkiError):
    """The CA backend answered and refused: a role's limits, a policy, bad credentials."""

    code = "pki_refused"
