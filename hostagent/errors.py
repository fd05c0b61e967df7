"""The agent's errors, below the root the PKI shares (common.errors); api.py maps each class
to its HTTP status in one place."""

from common.errors import HostAgentError, ProvisioningError


class MalformedRequest(HostAgentError):
    code = "malformed"


class Unauthorized(HostAgentError):
    code = "unauthorized"


class NotFound(HostAgentError):
    code = "not_found"


class Conflict(HostAgentError):
    code = "conflict"


class Invalid(HostAgentError):
    code = "invalid"


class OutOfCapacity(HostAgentError):
    code = "out_of_capacity"


class ConfigError(HostAgentError):
    """The agent's own configuration is wrong; the message names the key."""

    code = "config"


class LibvirtUnavailable(ProvisioningError):
    """libvirtd cannot be reached right now."""


class Forbidden(HostAgentError):
    """Authenticated, but not allowed: e.g. a host token used for another host."""

    code = "forbidden"


class Unavailable(HostAgentError):
    """A service this request needs (the PKI backend, an agent) cannot be reached now."""

    code = "unavailable"
