"""What a signer accepts for each certificate, derived from the profile table (pure).

Vault enforces these as PKI roles; the local backend checks the same limits itself, so
both refuse the same CSRs. A role is per certificate kind, not per node: its common
name is fixed or a `system:node:*` glob, its organization is fixed (the signer sets O,
whatever the CSR asks), its extended key usage is fixed.

DNS names of the server certificates (apiserver, etcd, kubelet serving) cannot be
pinned per role, since node names are arbitrary: those roles allow any name ("*").
"""

from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass

from pki.certset import NODE, PROFILE_BY_NAME, CaName, Profile, Sans


@dataclass(frozen=True)
class RoleLimits:
    name: str  # the profile's (layout.Cert) name
    ca: CaName
    allowed_names: tuple[str, ...]  # globs every CN and DNS SAN must match
    organizations: tuple[str, ...]
    server: bool
    client: bool
    allow_ip_sans: bool
    allow_localhost: bool
    enforce_hostnames: bool  # CN and DNS names must be valid hostnames


def limits_for(profile: Profile) -> RoleLimits:
    common_name = profile.common_name.replace(NODE, "*")
    names = (common_name,) if profile.sans is Sans.NONE else (common_name, "*")
    return RoleLimits(
        name=profile.name,
        ca=profile.ca,
        allowed_names=names,
        organizations=profile.organizations,
        server=profile.server,
        client=profile.client,
        allow_ip_sans=profile.sans is not Sans.NONE,
        allow_localhost=profile.sans is Sans.ETCD,
        # "system:..." identities are not hostnames; only fixed, plain names are checked.
        enforce_hostnames=":" not in common_name,
    )


def limits(name: str) -> RoleLimits:
    """The limits of the certificate called `name` (a layout.Cert name); KeyError if none."""
    return limits_for(PROFILE_BY_NAME[name])


def check(role: RoleLimits, common_name: str, dns: tuple[str, ...], ips: tuple[str, ...]) -> None:
    """Raise ValueError, worded like Vault's refusal, when a CSR asks for more than `role`."""
    for name in (common_name, *dns):
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in role.allowed_names):
            kind = "common name" if name == common_name else "subject alternative name"
            raise ValueError(f"{kind} {name} not allowed by role {role.name}")
    if ips and not role.allow_ip_sans:
        raise ValueError(f"IP subject alternative names not allowed by role {role.name}")
    for ip in ips:
        ipaddress.ip_address(ip)
