"""The agent's errors, below the root the PKI shares (common.errors); api.py maps each class
to its HTTP status in one place."""

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from common.errors import HostAgentError, ProvisioningError

M = TypeVar("M", bound=BaseModel)


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


class StoreFull(Unavailable):
    """The state store's disk is full: the write changed nothing; retry once there is
    space again."""

    code = "store_full"


class StoreUnavailable(Unavailable):
    """The zone's replicated store (etcd) cannot be reached, or this zone cannot follow
    it: nothing was changed (a write whose answer was lost is re-checked when retried)."""

    code = "store_unavailable"


class NotLeader(StoreUnavailable):
    """A zone replica that is no longer the leader tried a leader's write (a delivery's
    record): etcd refused it, as the leader key it was fenced by is gone."""


def validation_problems(exc: ValidationError, *, plain: bool = False) -> str:
    """A pydantic ValidationError as one line: ``key.path: message; ...`` (the message
    alone when the whole object failed). ``plain`` drops pydantic's ``Value error, ``
    prefix, as the HTTP API's answers do; configuration errors keep it."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ") if plain else error["msg"]
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def parse_body(body: bytes, model: type[M], what: str) -> M:
    """A request body that must be a JSON object of the model: MalformedRequest when it is
    no JSON object (``what`` names the expected one), Invalid when a value is wrong."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise MalformedRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedRequest(f"the body must be a JSON object ({what})")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Invalid(validation_problems(exc, plain=True)) from exc


class ImageNotReady(ProvisioningError):
    """The node's image is still being pulled: the node waits (Pending), it does not fail."""
