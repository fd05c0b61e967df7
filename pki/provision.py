"""Make a node's certificate directory current: the one entry point for the agent.

`provision_node` is idempotent, like the rest of the reconcile loop: it reads the
directory's manifest and (re)issues only what is missing, torn, changed (the node's
address, the cluster's endpoint...) or due for renewal; with nothing to do it makes no
backend call at all. Everything that may block (key generation, backend calls, fsync)
runs in a worker thread. All backend calls finish before the first byte is written, so
a backend that fails midway (BackendUnavailable) leaves the directory as it was.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pki import files, keys, layout
from pki.backend import Backend, IssuedCert
from pki.certset import CA_FILES, DEFAULT_TTL, CertRequest, NodeIdentity, requests_for
from pki.errors import PkiError
from pki.keys import KeyType
from pki.lifetime import RENEW_FRACTION, due

# One writer per directory at a time: the agent's reconcile and the Renewer may meet.
_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class Outcome:
    expiries: dict[str, datetime]  # layout.Cert name -> notAfter, CAs included
    issued: tuple[str, ...]  # certificates signed by this call
    rotated: tuple[str, ...]  # of those, the ones that replaced an existing certificate


async def provision_node(
    backend: Backend,
    node: NodeIdentity,
    directory: Path,
    *,
    key_type: KeyType = KeyType.ECDSA,
    ttl: timedelta = DEFAULT_TTL,
    uid: int | None = None,
    gid: int | None = None,
) -> dict[str, datetime]:
    """Ensure `directory` holds `node`'s complete, current certificate set, owned by
    uid/gid; returns each certificate's expiry. Raises BackendUnavailable (nothing
    written; retry later), BackendRefused or PkiError."""
    outcome = await ensure_certificates(
        backend, node, directory, key_type=key_type, ttl=ttl, uid=uid, gid=gid
    )
    return outcome.expiries


async def ensure_certificates(
    backend: Backend,
    node: NodeIdentity,
    directory: Path,
    *,
    key_type: KeyType = KeyType.ECDSA,
    ttl: timedelta = DEFAULT_TTL,
    uid: int | None = None,
    gid: int | None = None,
    fraction: float = RENEW_FRACTION,
) -> Outcome:
    """provision_node, telling what it did (the Renewer counts and reports it)."""
    key = str(directory.resolve())
    lock = _locks.get(key)
    if lock is None:
        lock = _locks[key] = asyncio.Lock()
    async with lock:
        job = _Job(backend, node, directory, key_type, ttl, fraction)
        return await asyncio.to_thread(job.run, uid, gid)


@dataclass
class _Job:
    backend: Backend
    node: NodeIdentity
    directory: Path
    key_type: KeyType
    ttl: timedelta
    fraction: float

    def run(self, uid: int | None, gid: int | None) -> Outcome:
        manifest = self._current_manifest()
        todo, refresh = self._plan(manifest)
        if not todo and not refresh:
            return Outcome(_expiries(manifest), (), ())
        content, records = self._issue(todo, with_sa=self._sa_missing())
        rotated = tuple(r.name for r in todo if (self.directory / f"{r.name}.crt").exists())
        kept = manifest.certs if manifest is not None else {}
        new_manifest = files.Manifest(
            self.node.cluster, self.node.name, self.node.role, self.key_type, {**kept, **records}
        )
        try:
            files.write_set(
                self.directory, content, new_manifest, uid=uid, gid=gid, rotated=rotated
            )
        except OSError as exc:
            raise PkiError(
                f"writing the certificates of {self._who} to {self.directory}: {exc}"
            ) from exc
        return Outcome(_expiries(new_manifest), tuple(r.name for r in todo), rotated)

    def _plan(self, manifest: files.Manifest | None) -> tuple[list[CertRequest], bool]:
        """The certificates to (re)issue, and whether CA or SA files need writing anyway."""
        requests = requests_for(self.node, self.key_type, self.ttl)
        if manifest is None:
            return requests, True
        stale = files.stale_names(self.directory, manifest)
        ca_names = [cert.name for cert in CA_FILES.values() if self._has(cert)]
        ca_stale = any(name in stale or name not in manifest.certs for name in ca_names)
        return self._todo(requests, manifest, stale), ca_stale or self._sa_missing()

    def _sa_missing(self) -> bool:
        names = (layout.SA_KEY_FILE, layout.SA_PUB_FILE)
        master = self.node.role == layout.MASTER
        return master and not all((self.directory / name).exists() for name in names)

    @property
    def _who(self) -> str:
        return f"node {self.node.cluster}/{self.node.name}"

    def _has(self, cert: layout.Cert) -> bool:
        return self.node.role in cert.roles

    def _current_manifest(self) -> files.Manifest | None:
        """The manifest if it describes this node as it is now; None means start over."""
        manifest = files.read_manifest(self.directory)
        if manifest is None:
            return None
        same = (manifest.cluster, manifest.node, manifest.role, manifest.key_type) == (
            self.node.cluster,
            self.node.name,
            self.node.role,
            self.key_type,
        )
        return manifest if same else None

    def _todo(
        self, requests: list[CertRequest], manifest: files.Manifest, stale: set[str]
    ) -> list[CertRequest]:
        now = datetime.now(UTC)
        todo = []
        for request in requests:
            record = manifest.certs.get(request.name)
            if (
                record is None
                or request.name in stale
                or record.fingerprint != request.fingerprint()
                or due(record.not_before, record.not_after, self.fraction, now)
            ):
                todo.append(request)
        return todo

    def _issue(
        self, todo: list[CertRequest], *, with_sa: bool
    ) -> tuple[dict[str, str], dict[str, files.CertRecord]]:
        """Every backend call, before anything is written: the files and manifest records."""
        backend, cluster = self.backend, self.node.cluster
        backend.ensure_cluster(cluster)
        content: dict[str, str] = {}
        records: dict[str, files.CertRecord] = {}
        for ca, pem in backend.ca_certificates(cluster).items():
            cert = CA_FILES[ca]
            if self._has(cert):
                records[cert.name] = files.CertRecord.of(pem)
                if _read(self.directory / f"{cert.name}.crt") != pem:
                    content[f"{cert.name}.crt"] = pem  # unchanged CA files stay untouched
        if with_sa:
            private, public = backend.service_account_key(cluster)
            content[layout.SA_KEY_FILE], content[layout.SA_PUB_FILE] = private, public
        for request in todo:
            key = keys.generate_key(self.key_type)
            issued = backend.issue(cluster, request, keys.build_csr(key, request))
            content[f"{request.name}.crt"] = issued.cert_pem
            content[f"{request.name}.key"] = keys.private_pem(key)
            records[request.name] = _record(issued, request)
        return content, records


def _record(issued: IssuedCert, request: CertRequest) -> files.CertRecord:
    return files.CertRecord(
        issued.serial, issued.not_before, issued.not_after, request.fingerprint()
    )


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _expiries(manifest: files.Manifest | None) -> dict[str, datetime]:
    if manifest is None:
        return {}
    return {name: record.not_after for name, record in manifest.certs.items()}
