"""The root of the project's one exception hierarchy, shared by the agent and the PKI.

hostagent.errors adds the agent's own errors below it; api.py maps each class to its HTTP
status in one place.
"""


class HostAgentError(Exception):
    """Base of every error the agent reports to a caller."""

    code = "internal"


class ProvisioningError(HostAgentError):
    """A step of making a node failed; the message says what and what to do."""

    code = "provisioning"
