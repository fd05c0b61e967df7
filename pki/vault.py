"""The Vault (or OpenBao) CA backend: the only module that imports hvac.

Layout in Vault, created on first use by the agent (policy: pki/vault-policy.hcl):
- one PKI mount per CA per cluster, `<prefix>-<cluster>-<ca>` (ca: kubernetes, etcd,
  front-proxy), holding an internal root (the key never leaves Vault) under the issuer
  name "root". One CA per mount is Vault's own advice; a fixed issuer name makes a
  second host's concurrent `root/generate` fail instead of adding a second root.
  Cluster names are DNS labels and no CA name ends in another's "-suffix", so two
  clusters' mounts never collide; no mount is a path prefix of another.
- in each mount one role per certificate kind and key type, `<cert>-ec` / `<cert>-rsa`
  (pki.roles: fixed O, CN pattern, server/client flags, key type and size, TTL),
  rewritten on each agent start so the roles follow the code;
- one KV v2 mount `<kv_mount>` with `clusters/<cluster>/service-account`: the
  service-account key pair is not a certificate, and it must be the same on every
  master of a cluster even when they run on different hosts, so it lives where every
  host's agent can read it, written once with check-and-set.

Only `sign` is used, never `issue`: keys are made on the host, Vault sees CSRs.
Tokens, secret IDs and keys are never logged; error messages carry Vault's error text
and the request URL only.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import hvac
import requests
from cryptography import x509
from hvac import exceptions as vault_errors

from common.names import check_name
from pki import keys
from pki.backend import IssuedCert
from pki.certset import CA_COMMON_NAMES, PROFILES, CaName, CertRequest
from pki.errors import BackendRefused, BackendUnavailable, PkiError
from pki.roles import RoleLimits, limits_for

log = logging.getLogger(__name__)
T = TypeVar("T")
_MOUNT = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$")
ISSUER = "root"
SA_SECRET = "clusters/{cluster}/service-account"
_UNAVAILABLE = (
    vault_errors.VaultDown,
    vault_errors.InternalServerError,
    vault_errors.BadGateway,
    vault_errors.RateLimitExceeded,
    vault_errors.VaultNotInitialized,
)


@dataclass(frozen=True)
class VaultSettings:
    """How to reach and authenticate to Vault: a token, or an AppRole's role_id and
    secret_id (the agent logs in again whenever the token cannot be renewed)."""

    url: str
    ca_bundle: Path | None = None  # PEM bundle that verifies Vault's TLS certificate
    token: str | None = field(default=None, repr=False)
    role_id: str | None = field(default=None, repr=False)
    secret_id: str | None = field(default=None, repr=False)
    approle_mount: str = "approle"
    mount_prefix: str = "hostagent"
    kv_mount: str = "hostagent-kv"
    ca_ttl: timedelta = timedelta(days=3650)
    max_ttl: timedelta = timedelta(days=365)  # the roles' ceiling for a leaf's TTL
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if not re.match(r"^https?://", self.url):
            raise ValueError(f"Vault url {self.url[:80]!r} must start with http:// or https://")
        if (self.token is None) == (self.role_id is None or self.secret_id is None):
            raise ValueError("Vault needs either a token or an AppRole role_id and secret_id")
        for name in (self.mount_prefix, self.kv_mount):
            if not _MOUNT.fullmatch(name):
                raise ValueError(f"Vault mount name {name[:80]!r} must be a DNS-1123 label")


def mount_path(prefix: str, cluster: str, ca: CaName) -> str:
    return f"{prefix}-{cluster}-{ca}"


def role_name(cert_name: str, key_type: keys.KeyType) -> str:
    suffix = "ec" if key_type is keys.KeyType.ECDSA else "rsa"
    return f"{cert_name.replace('/', '-')}-{suffix}"


def role_params(limits: RoleLimits, key_type: keys.KeyType, max_ttl: timedelta) -> dict[str, Any]:
    """The PKI role for one certificate kind and key type (pure)."""
    rsa = key_type is keys.KeyType.RSA
    return {
        "allowed_domains": list(limits.allowed_names),
        "allow_bare_domains": True,
        "allow_glob_domains": True,
        "allow_subdomains": False,
        "allow_any_name": False,
        "allow_wildcard_certificates": False,
        "enforce_hostnames": limits.enforce_hostnames,
        "allow_ip_sans": limits.allow_ip_sans,
        "allow_localhost": limits.allow_localhost,
        "organization": list(limits.organizations),
        "server_flag": limits.server,
        "client_flag": limits.client,
        "code_signing_flag": False,
        "email_protection_flag": False,
        "key_type": "rsa" if rsa else "ec",
        "key_bits": keys.RSA_BITS if rsa else 256,
        # Key encipherment only for RSA, as in certset.key_usages.
        "key_usage": ["DigitalSignature", "KeyEncipherment"] if rsa else ["DigitalSignature"],
        "ext_key_usage": [],
        "ttl": _seconds(max_ttl),
        "max_ttl": _seconds(max_ttl),
        "use_csr_common_name": True,
        "use_csr_sans": True,
        "require_cn": True,
        "no_store": False,  # revoke_cluster lists what was issued
        "generate_lease": False,
    }


def _seconds(ttl: timedelta) -> str:
    return f"{int(ttl.total_seconds())}s"


class VaultBackend:
    def __init__(self, settings: VaultSettings, *, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        verify: bool | str = str(settings.ca_bundle) if settings.ca_bundle else True
        self._client = hvac.Client(url=settings.url, verify=verify, timeout=settings.timeout)
        self._clock = clock
        self._auth_lock = threading.Lock()
        self._logged_in = False
        self._deadline: float | None = None  # when the token expires; None: it does not
        self._lease = 0.0
        self._login_lease = 0.0  # the lease a fresh token gets; renewals shrink it near max TTL
        self._renewable = False
        self._ready: set[str] = set()
        self._kv_ready = False

    @property
    def description(self) -> str:
        return f"Vault at {self.settings.url}"

    # --- the Backend interface -------------------------------------------------------

    def ensure_cluster(self, cluster: str) -> None:
        if cluster in self._ready:
            return
        check_name("cluster", cluster)
        for ca in CaName:
            self._ensure_ca(cluster, ca)
        self._ensure_kv()
        self._ready.add(cluster)

    def issue(self, cluster: str, request: CertRequest, csr_pem: str) -> IssuedCert:
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
            key_type = keys.key_type_of(csr.public_key())
        except ValueError as exc:
            raise BackendRefused(f"certificate request for {request.name}: {exc}") from exc
        mount = self._mount(cluster, request.ca)
        sign = functools.partial(
            self._client.secrets.pki.sign_certificate,
            role_name(request.name, key_type),
            csr_pem,
            "",  # the role takes the CN from the CSR (use_csr_common_name)
            extra_params={"ttl": _seconds(request.ttl), "exclude_cn_from_sans": True},
            mount_point=mount,
        )
        response = self._call(
            f"signing {request.name} for cluster {cluster}", sign, missing_ok=True
        )
        if response is None:
            raise PkiError(f"cluster {cluster} has no CA in {self.description} ({mount})")
        data = response["data"]
        return IssuedCert.from_pem(data["certificate"], data["issuing_ca"])

    def ca_certificates(self, cluster: str) -> dict[CaName, str]:
        result = {}
        for ca in CaName:
            mount = self._mount(cluster, ca)
            read = functools.partial(self._client.secrets.pki.read_ca_certificate, mount)
            pem = self._call(f"reading the {ca} CA of cluster {cluster}", read, missing_ok=True)
            if not pem:
                raise PkiError(f"cluster {cluster} has no {ca} CA in {self.description}")
            result[ca] = pem.strip() + "\n"
        return result

    def service_account_key(self, cluster: str) -> tuple[str, str]:
        check_name("cluster", cluster)
        self._ensure_kv()
        stored = self._read_sa(cluster)
        if stored is not None:
            return stored
        private, public = keys.service_account_key()
        write = functools.partial(
            self._client.secrets.kv.v2.create_or_update_secret,
            SA_SECRET.format(cluster=cluster),
            secret={"private": private, "public": public},
            cas=0,  # only if absent: another host may have written it meanwhile
            mount_point=self.settings.kv_mount,
        )
        try:
            self._call(f"storing the service-account key of cluster {cluster}", write)
        except BackendRefused:
            stored = self._read_sa(cluster)
            if stored is None:
                raise
            return stored
        return private, public

    def revoke_cluster(self, cluster: str) -> None:
        self.revoke_issued(cluster)
        for ca in CaName:
            mount = self._mount(cluster, ca)
            disable = functools.partial(self._client.sys.disable_secrets_engine, mount)
            self._call(f"removing {mount}", disable, missing_ok=True)
        delete = functools.partial(
            self._client.secrets.kv.v2.delete_metadata_and_all_versions,
            SA_SECRET.format(cluster=cluster),
            mount_point=self.settings.kv_mount,
        )
        self._call(f"deleting the service-account key of {cluster}", delete, missing_ok=True)
        self._ready.discard(cluster)
        log.info(
            "cluster %s: CAs and service-account key removed from %s", cluster, self.description
        )

    def revoke_issued(self, cluster: str) -> list[str]:
        """Revoke every certificate the cluster's CAs issued (they enter the CRLs); returns
        their serials. Mounts that are already gone are skipped."""
        revoked = []
        for ca in CaName:
            mount = self._mount(cluster, ca)
            pki = self._client.secrets.pki
            listing = self._call(
                f"listing {mount}", functools.partial(pki.list_certificates, mount), missing_ok=True
            )
            if listing is None:
                continue
            ca_pem = self._call(
                f"reading {mount}", functools.partial(pki.read_ca_certificate, mount)
            )
            ca_serial = _serial_number(ca_pem) if ca_pem else None
            for serial in listing["data"]["keys"]:
                number = int(serial.replace("-", "").replace(":", ""), 16)
                if number != ca_serial:  # a CA cannot revoke itself
                    revoke = functools.partial(pki.revoke_certificate, serial, mount)
                    self._call(f"revoking {serial} in {mount}", revoke)
                    revoked.append(keys.format_serial(number))
        return revoked

    def maintain(self) -> float:
        """Log in or renew the token when due; the seconds until the next renewal is due."""
        with self._errors("renewing the agent's token"), self._auth_lock:
            self._authenticate()
            if self._deadline is None:
                return 3600.0
            return max(1.0, self._renew_at() - self._clock())

    # --- cluster setup ---------------------------------------------------------------

    def _ensure_ca(self, cluster: str, ca: CaName) -> None:
        mount = self._mount(cluster, ca)
        self._ensure_mount(mount, "pki", {"max_lease_ttl": _seconds(self.settings.ca_ttl)})
        pki = self._client.secrets.pki
        pem = self._call(f"reading {mount}", functools.partial(pki.read_ca_certificate, mount))
        if not pem:
            self._generate_root(cluster, ca, mount)
        self._write_roles(ca, mount)
        # Renewals leave expired certificates behind in the store: let Vault drop them.
        tidy = {"enabled": True, "tidy_cert_store": True, "tidy_revoked_certs": True}
        write_tidy = functools.partial(
            self._client.write_data, f"{mount}/config/auto-tidy", data=tidy
        )
        self._call(f"configuring auto-tidy in {mount}", write_tidy)

    def _write_roles(self, ca: CaName, mount: str) -> None:
        """Every role signed by `ca`, for both key types (rewritten to follow the code)."""
        for profile in (p for p in PROFILES if p.ca is ca):
            for key_type in keys.KeyType:
                params = role_params(limits_for(profile), key_type, self.settings.max_ttl)
                name = role_name(profile.name, key_type)
                write = functools.partial(
                    self._client.secrets.pki.create_or_update_role,
                    name,
                    extra_params=params,
                    mount_point=mount,
                )
                self._call(f"writing role {name} in {mount}", write)

    def _generate_root(self, cluster: str, ca: CaName, mount: str) -> None:
        params = {
            "ttl": _seconds(self.settings.ca_ttl),
            "key_type": "ec",
            "key_bits": 256,
            "issuer_name": ISSUER,
            "ou": cluster,
            "exclude_cn_from_sans": True,
        }
        generate = functools.partial(
            self._client.secrets.pki.generate_root,
            "internal",
            CA_COMMON_NAMES[ca],
            extra_params=params,
            mount_point=mount,
        )
        try:
            self._call(f"creating the {ca} CA of cluster {cluster}", generate)
        except BackendRefused as exc:
            if "already in use" not in str(exc):
                raise
            return  # another host created it between our read and our write
        log.info("cluster %s: created the %s CA in %s (%s)", cluster, ca, self.description, mount)

    def _ensure_mount(self, path: str, kind: str, config: dict[str, Any]) -> None:
        sys = self._client.sys
        enable = functools.partial(
            sys.enable_secrets_engine, kind, path=path, config=config, options=_options(kind)
        )
        try:
            self._call(f"creating mount {path}", enable)
        except BackendRefused as exc:
            if "already in use" not in str(exc):
                raise
            if "max_lease_ttl" in config:
                tune = functools.partial(
                    sys.tune_mount_configuration, path, max_lease_ttl=config["max_lease_ttl"]
                )
                self._call(f"tuning mount {path}", tune)

    def _ensure_kv(self) -> None:
        if not self._kv_ready:
            self._ensure_mount(self.settings.kv_mount, "kv", {})
            self._kv_ready = True

    def _read_sa(self, cluster: str) -> tuple[str, str] | None:
        read = functools.partial(
            self._client.secrets.kv.v2.read_secret_version,
            SA_SECRET.format(cluster=cluster),
            mount_point=self.settings.kv_mount,
            raise_on_deleted_version=True,
        )
        response = self._call(
            f"reading the service-account key of {cluster}", read, missing_ok=True
        )
        if response is None:
            return None
        data = response["data"]["data"]
        return data["private"], data["public"]

    def _mount(self, cluster: str, ca: CaName) -> str:
        return mount_path(self.settings.mount_prefix, check_name("cluster", cluster), ca)

    # --- calls, errors, authentication -----------------------------------------------

    def _call(self, what: str, call: Callable[[], T], *, missing_ok: bool = False) -> T | None:
        """Run one Vault call, authenticated, with errors translated. `missing_ok`: a path
        that does not exist gives None instead of an error."""
        with self._errors(what):
            with self._auth_lock:
                self._authenticate()
            try:
                return call()
            except vault_errors.InvalidPath:
                if missing_ok:
                    return None
                raise
            except vault_errors.Forbidden:
                if self.settings.token is not None:
                    raise
                # The token was revoked or expired behind our back: log in again, once.
                with self._auth_lock:
                    self._login()
                return call()

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except requests.exceptions.SSLError as exc:
            raise BackendUnavailable(
                f"{self.description}: TLS verification failed while {what} (check the CA "
                f"bundle, ca_bundle={self.settings.ca_bundle}): {exc}; provisioning waits and "
                "retries"
            ) from exc
        except requests.exceptions.RequestException as exc:
            raise BackendUnavailable(
                f"{self.description} is not reachable while {what}: {exc}; provisioning waits "
                "and retries"
            ) from exc
        except _UNAVAILABLE as exc:
            raise BackendUnavailable(
                f"{self.description} cannot serve {what} (sealed, starting or overloaded): "
                f"{exc}; provisioning waits and retries"
            ) from exc
        except (vault_errors.Forbidden, vault_errors.Unauthorized) as exc:
            raise BackendRefused(
                f"{self.description} denied {what}: {exc}. The agent's token may have expired, "
                "or lacks the policy in pki/vault-policy.hcl"
            ) from exc
        except vault_errors.VaultError as exc:
            raise BackendRefused(f"{self.description} refused {what}: {exc}") from exc

    def _authenticate(self) -> None:
        """Under the auth lock: log in once, then renew the token at 2/3 of its lease."""
        if not self._logged_in:
            self._login()
        elif self._deadline is not None and self._clock() >= self._renew_at():
            self._renew()

    def _login(self) -> None:
        settings = self.settings
        if settings.token is not None:
            self._client.token = settings.token
            data = self._client.auth.token.lookup_self()["data"]
            self._set_lease(float(data.get("ttl") or 0), bool(data.get("renewable")))
            self._login_lease = self._lease
        else:
            auth = self._client.auth.approle.login(
                settings.role_id, settings.secret_id, mount_point=settings.approle_mount
            )["auth"]
            self._set_lease(float(auth["lease_duration"]), bool(auth["renewable"]))
            self._login_lease = self._lease
            log.info("logged in to %s with AppRole", self.description)
        self._logged_in = True

    def _renew(self) -> None:
        if self._renewable:
            try:
                auth = self._client.auth.token.renew_self()["auth"]
            except vault_errors.VaultError as exc:
                log.warning("renewing the token at %s failed: %s", self.description, exc)
            else:
                lease = float(auth["lease_duration"])
                self._set_lease(lease, True)
                log.debug("renewed the token at %s for %.0fs", self.description, lease)
                if lease >= self._login_lease / 2:
                    return
                # Renewal is capped by the token's max TTL: it will soon expire for good.
        if self.settings.token is None:
            self._login()  # AppRole: a fresh token
            return
        self._token_exhausted()

    def _token_exhausted(self) -> None:
        """A configured token that cannot be renewed: warn, retry once more at expiry."""
        assert self._deadline is not None
        remaining = self._deadline - self._clock()
        log.warning(
            "the token for %s cannot be renewed and expires in %.0fs: configure a new token "
            "or use AppRole",
            self.description,
            max(remaining, 0.0),
        )
        self._lease = 0.0  # next attempt at the deadline, not on every call
        if remaining <= 0:
            self._deadline = None

    def _set_lease(self, seconds: float, renewable: bool) -> None:
        self._renewable = renewable
        self._lease = seconds
        self._deadline = None if seconds <= 0 else self._clock() + seconds

    def _renew_at(self) -> float:
        assert self._deadline is not None
        return self._deadline - self._lease / 3


def _options(kind: str) -> dict[str, str] | None:
    return {"version": "2"} if kind == "kv" else None


def _serial_number(pem: str) -> int:
    return x509.load_pem_x509_certificate(pem.encode()).serial_number
