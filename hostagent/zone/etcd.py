"""etcd v3 for the zone's store: the only module that imports aetcd (and through it gRPC).

aetcd gives the etcd v3 API (its generated stubs and messages); this module adds what the
store needs and aetcd's Client lacks: TLS with client certificates, an endpoint list
(aetcd speaks to one endpoint: a call that fails on one is tried on the next, with
common.backoff between rounds, until ``request_timeout_s`` has passed), the revision of
a transaction, range reads paged at one revision, and a watch stream whose batches keep
each revision's events together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

from common.backoff import Backoff
from hostagent.errors import StoreUnavailable

log = logging.getLogger(__name__)

KEEPALIVE_STREAMS = 8  # per zone replica, for every host's lease (LeaseKeeper)
PAGE = 500  # keys per range request while listing (gRPC caps a message at 4 MiB)
# CANCELLED: another call found the endpoint dead and closed the connection under this one.
RETRYABLE = {
    rpc.StatusCode.UNAVAILABLE,
    rpc.StatusCode.DEADLINE_EXCEEDED,
    rpc.StatusCode.CANCELLED,
}
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),  # etcd accepts pings every 5 s or slower
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)


@dataclass(frozen=True)
class Tls:
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True)
class Event:
    """A key put (value) or deleted (value None) at revision."""

    key: str
    value: bytes | None
    revision: int


@dataclass(frozen=True)
class Compare:
    key: str
    target: Literal["create", "mod", "version"]
    op: Literal["==", ">"]
    number: int


def absent(key: str) -> Compare:
    return Compare(key, "create", "==", 0)


def present(key: str) -> Compare:
    return Compare(key, "version", ">", 0)


def unchanged(key: str, mod_revision: int) -> Compare:
    """The key is as last seen (mod_revision 0: still absent)."""
    return Compare(key, "mod", "==", mod_revision)


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0  # the key goes when this lease expires or is revoked


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


Op = Put | Delete


@dataclass(frozen=True)
class TxnResult:
    """succeeded and the revision the transaction made; when it did not, what each
    compared key holds now (its mod_revision, 0 for absent) at ``revision``."""

    succeeded: bool
    revision: int
    current: dict[str, int]
    changed: bool = False  # it wrote something (a delete of nothing makes no revision)


class Compacted(Exception):
    """The revision a watch asked for is compacted away: list again."""


class Etcd:
    """A connection to one of ``endpoints`` at a time (``http://`` or ``https://``
    host:port), moving to the next one when a call fails."""

    def __init__(
        self,
        endpoints: Sequence[str],
        tls: Tls,
        *,
        dial_timeout_s: float,
        request_timeout_s: float,
    ) -> None:
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.tls = tls
        self.dial_timeout_s = dial_timeout_s
        self.request_timeout_s = request_timeout_s
        self._index = 0
        self._channel: Any = None

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._index]

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def _connected(self) -> Any:
        """The channel to the current endpoint, connected within dial_timeout_s (else
        _Retry, and the next endpoint is current)."""
        if self._channel is None:
            channel = self._channel = _channel(self.endpoint, self.tls)
            try:
                async with asyncio.timeout(self.dial_timeout_s):
                    state = channel.get_state(try_to_connect=True)
                    while state != grpc.ChannelConnectivity.READY:
                        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                            raise _Retry("cannot connect")
                        await channel.wait_for_state_change(state)
                        state = channel.get_state(try_to_connect=True)
            except TimeoutError as exc:
                await self._next(channel)
                raise _Retry(f"no connection within {self.dial_timeout_s} s") from exc
            except _Retry:
                await self._next(channel)
                raise
        return self._channel

    async def _next(self, failed: Any) -> None:
        """Leave the endpoint whose channel failed for the next one (once, however many
        calls saw it fail)."""
        if failed is not None and failed is self._channel:
            await self.close()
            self._index = (self._index + 1) % len(self.endpoints)

    async def _unary(self, method: str, request: Any, stub_class: Any = rpc.KVStub) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout_s
        backoff = Backoff(0.05, 1.0)
        tried = 0
        while True:
            endpoint, channel = self.endpoint, None
            try:
                channel = await self._connected()
                remaining = max(deadline - loop.time(), 0.01)
                stub = stub_class(channel)
                return await getattr(stub, method)(request, timeout=remaining)
            except _Retry as exc:
                why = str(exc)
            except rpc.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise StoreUnavailable(_refusal(endpoint, exc.details(), request)) from exc
                why = f"{exc.code().name}: {exc.details()}"
                await self._next(channel)
            except asyncio.CancelledError:
                _reraise_if_cancelled()
                why = "the connection was closed under the call"
            tried += 1
            log.debug("etcd %s failed (%s); trying %s", endpoint, why, self.endpoint)
            delay = backoff.next() if tried % len(self.endpoints) == 0 else 0.0
            if loop.time() + delay >= deadline:
                raise StoreUnavailable(
                    f"etcd cannot be reached ({', '.join(self.endpoints)}), last {endpoint}: "
                    f"{why}; retry shortly"
                )
            await asyncio.sleep(delay)

    async def grant(self, ttl_s: int) -> int:
        """A new lease of ttl_s seconds; its id."""
        response = await self._unary("LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl_s), rpc.LeaseStub)
        lease: int = response.ID
        return lease

    async def revoke(self, lease: int) -> None:
        """End a lease now: its keys go at once (an unknown lease is no error)."""
        try:
            await self._unary("LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease), rpc.LeaseStub)
        except StoreUnavailable as exc:
            if "not found" not in str(exc):
                raise

    async def list_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under prefix, read in pages at one revision; and that revision."""
        end = prefix_range_end(prefix.encode())
        start, revision = prefix.encode(), 0
        found: list[KeyValue] = []
        while True:
            request = rpc.RangeRequest(key=start, range_end=end, limit=PAGE, revision=revision)
            response = await self._unary("Range", request)
            revision = revision or response.header.revision
            found += [KeyValue(kv.key.decode(), kv.value, kv.mod_revision) for kv in response.kvs]
            if not response.more:
                return revision, found
            start = response.kvs[-1].key + b"\0"

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], *, atomic_read: bool = True
    ) -> TxnResult:
        """Apply success if every compare holds; otherwise read the compared keys (with
        atomic_read) to tell what changed."""
        failure = [_range(c.key) for c in compares] if atomic_read else []
        request = rpc.TxnRequest(
            compare=[_compare(c) for c in compares],
            success=[_op(op) for op in success],
            failure=failure,
        )
        response = await self._unary("Txn", request)
        current = dict.fromkeys((c.key for c in compares), 0)
        if not response.succeeded:
            for item in response.responses:
                for kv in item.response_range.kvs:
                    current[kv.key.decode()] = kv.mod_revision
        changed = response.succeeded and any(
            item.HasField("response_put") or item.response_delete_range.deleted
            for item in response.responses
        )
        return TxnResult(response.succeeded, response.header.revision, current, changed)

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        """Batches of events under prefix from start_revision on, each revision's events in
        one batch; an empty batch first, once the watch is in place. Ends by raising
        Compacted or StoreUnavailable (the connection moves on to the next endpoint)."""
        key = prefix.encode()
        create = rpc.WatchCreateRequest(
            key=key, range_end=prefix_range_end(key), start_revision=start_revision
        )
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield rpc.WatchRequest(create_request=create)
            await stop.wait()

        endpoint = self.endpoint
        try:
            channel = await self._connected()
        except _Retry as exc:
            raise StoreUnavailable(f"etcd {endpoint}: {exc}") from exc
        call = rpc.WatchStub(channel).Watch(requests())
        try:
            async for response in call:
                if response.compact_revision:
                    raise Compacted(f"revision {start_revision} is compacted")
                if response.canceled:
                    raise StoreUnavailable(
                        f"etcd {endpoint} ended the watch: {response.cancel_reason}"
                    )
                if response.created:
                    yield []
                if response.events:
                    yield [_event(e) for e in response.events]
            raise StoreUnavailable(f"etcd {endpoint} closed the watch")
        except rpc.AioRpcError as exc:
            await self._next(channel)
            raise StoreUnavailable(f"etcd {endpoint}: {exc.code().name}: {exc.details()}") from exc
        except asyncio.CancelledError:
            _reraise_if_cancelled()
            raise StoreUnavailable(f"etcd {endpoint}: the connection was closed") from None
        finally:
            stop.set()
            call.cancel()


class LeaseKeeper:
    """Renews leases over a few LeaseKeepAlive streams shared by every caller (hosts'
    heartbeats: a thousand hosts must not mean a thousand streams), a lease always on the
    same one. etcd handles a stream's renewals one after the other (a member that is not
    the etcd leader forwards each to the leader and waits), so a single stream would cap a
    replica at one renewal per round trip; STREAMS of them renew in parallel."""

    def __init__(self, etcd: Etcd) -> None:
        self._streams = [_KeepAliveStream(etcd) for _ in range(KEEPALIVE_STREAMS)]

    async def renew(self, lease: int) -> int:
        """The seconds the lease has left after this renewal; 0: it had expired."""
        return await self._streams[lease % len(self._streams)].renew(lease)

    async def close(self) -> None:
        for stream in self._streams:
            await stream.close()


class _KeepAliveStream:
    """One LeaseKeepAlive stream: a renewal is one request on it and its answer (matched by
    lease id); a broken stream fails the renewals waiting on it and is opened again by the
    next."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self._queue: asyncio.Queue[int | None] | None = None
        self._waiting: dict[int, list[asyncio.Future[int]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._opening = asyncio.Lock()

    async def renew(self, lease: int) -> int:
        """The seconds the lease has left after this renewal; 0: it had expired."""
        async with self._opening:  # one stream, however many renewals find none open
            if self._reader is None or self._reader.done():
                await self._open()
        assert self._queue is not None
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(lease, []).append(future)
        self._queue.put_nowait(lease)
        try:
            async with asyncio.timeout(self.etcd.request_timeout_s):
                return await future
        except TimeoutError:
            raise StoreUnavailable(
                f"etcd {self.etcd.endpoint} did not renew a lease within "
                f"{self.etcd.request_timeout_s} s"
            ) from None
        finally:
            waiting = self._waiting.get(lease, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._waiting.pop(lease, None)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None

    async def _open(self) -> None:
        etcd = self.etcd
        try:
            channel = await etcd._connected()
        except _Retry as exc:
            raise StoreUnavailable(f"etcd {etcd.endpoint}: {exc}") from exc
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        self._queue = queue

        async def requests() -> AsyncIterator[Any]:
            # None ends the requests (the stream is done): gRPC's task that reads them then
            # ends too, instead of being left pending when the process exits.
            while (lease := await queue.get()) is not None:
                yield rpc.LeaseKeepAliveRequest(ID=lease)

        call = rpc.LeaseStub(channel).LeaseKeepAlive(requests())
        reader = self._read(call, channel, queue)
        self._reader = asyncio.create_task(reader, name="etcd-lease-keeper")

    async def _read(self, call: Any, channel: Any, queue: asyncio.Queue[int | None]) -> None:
        why = "the stream ended"
        try:
            async for response in call:
                for future in self._waiting.get(response.ID, []):
                    if not future.done():
                        future.set_result(response.TTL)
                        break
        except rpc.AioRpcError as exc:
            why = f"{exc.code().name}: {exc.details()}"
            await self.etcd._next(channel)
        except asyncio.CancelledError:
            _reraise_if_cancelled()
            why = "the connection was closed"
        finally:
            queue.put_nowait(None)
            call.cancel()
            failed = StoreUnavailable(f"etcd {self.etcd.endpoint}: lease renewals failed: {why}")
            for futures in self._waiting.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(failed)


def _reraise_if_cancelled() -> None:
    """gRPC cancels the calls of a channel that is closed (when a call found its endpoint
    dead, or the store closes): that CancelledError is a failed call, unless this task
    itself is being cancelled."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class _Retry(Exception):
    """This endpoint failed before the call was sent: try the next."""


def _channel(endpoint: str, tls: Tls) -> Any:
    url = urlsplit(endpoint)
    target = url.netloc
    if url.scheme == "http":
        return rpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file),
        private_key=_read(tls.key_file),
        certificate_chain=_read(tls.cert_file),
    )
    return rpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)


def _refusal(endpoint: str, details: str, request: Any) -> str:
    message = f"etcd {endpoint} refused the call: {details}"
    if "too many operations" in details:
        size = max(len(request.compare), len(request.success))
        message += (
            f" ({size} in this one, one or more per node of a cluster: run etcd with "
            "--max-txn-ops of at least 3 x the largest cluster's nodes + 8, e.g. 2048)"
        )
    return message


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()


def _compare(compare: Compare) -> Any:
    message = rpc.Compare(key=compare.key.encode())
    message.result = {"==": rpc.Compare.EQUAL, ">": rpc.Compare.GREATER}[compare.op]
    if compare.target == "create":
        message.target, message.create_revision = rpc.Compare.CREATE, compare.number
    elif compare.target == "mod":
        message.target, message.mod_revision = rpc.Compare.MOD, compare.number
    else:
        message.target, message.version = rpc.Compare.VERSION, compare.number
    return message


def _range(key: str) -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key.encode()))


def _op(op: Op) -> Any:
    if isinstance(op, Put):
        put = rpc.PutRequest(key=op.key.encode(), value=op.value, lease=op.lease)
        return rpc.RequestOp(request_put=put)
    key = op.key.encode()
    request = rpc.DeleteRangeRequest(key=key)
    if op.prefix:
        request.range_end = prefix_range_end(key)
    return rpc.RequestOp(request_delete_range=request)


def _event(event: Any) -> Event:
    deleted = event.type == rpc.Event.DELETE
    value = None if deleted else event.kv.value
    return Event(event.kv.key.decode(), value, event.kv.mod_revision)
