"""A TCP proxy on loopback that holds the n-th HTTP request matching a pattern until the
test releases it: failure injection at one exact request of a real client and server
(tests/e2e/test_backend_restarts.py stops OpenBao between two certificate signings).

Each client connection gets its own connection to the upstream; when the upstream cannot
be reached, or closes, the client's connection is closed too, as a stopped server's would
be. Requests are recognised by their request line at the start of what the client sends.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from types import TracebackType


class HoldProxy:
    def __init__(self, upstream_port: int, pattern: bytes, hold_at: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.pattern = re.compile(pattern)
        self.hold_at = hold_at
        self.seen = 0
        self.held = threading.Event()  # set when the hold_at-th matching request arrived
        self.released = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._sockets: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name="holdproxy", daemon=True).start()

    def __enter__(self) -> HoldProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self._closed = True
        self.released.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()  # the upstream is down: so is the proxy, for this client
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if from_client and self.pattern.match(data):
                    self._count()
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _count(self) -> None:
        with self._lock:
            self.seen += 1
            hold = self.seen == self.hold_at
        if hold:
            self.held.set()
            self.released.wait()
