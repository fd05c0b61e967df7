#!/bin/sh
# Install hostagent on a host from this checkout (see docs/install.md):
#   - builds the wheel (pip wheel, no extra build tool),
#   - makes a virtualenv at the prefix and installs the wheel with its pinned deps,
#   - installs the systemd units into <root>/etc/systemd/system/,
#   - writes <root>/etc/hostagent/hostagent.toml with every key commented out, only if
#     it does not exist (an existing configuration is never touched),
#   - copies the docs to <prefix>/share/doc/hostagent (the units' Documentation=).
# Idempotent: running it again upgrades the agent in place and leaves the config alone.
#
# Usage: scripts/install.sh [--prefix /opt/hostagent] [--root DIR] [--python python3]
#                           [--wheel-dir DIR]
# --root installs units and config below DIR instead of / (tests, image builds); the
# prefix is used as given. --wheel-dir keeps the built wheel there (default: a
# temporary directory). Extra pip options can come through PIP_* environment variables
# (e.g. PIP_FIND_LINKS for an offline wheel cache).
set -eu

prefix=/opt/hostagent
root=
python=${PYTHON:-python3}
wheel_dir=

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case $1 in
        --prefix) prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --root) root=$2; shift 2 ;;
        --root=*) root=${1#*=}; shift ;;
        --python) python=$2; shift 2 ;;
        --python=*) python=${1#*=}; shift ;;
        --wheel-dir) wheel_dir=$2; shift 2 ;;
        --wheel-dir=*) wheel_dir=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

src=$(cd "$(dirname "$0")/.." && pwd)
root=${root%/}
etc="$root/etc"
unit_dir="$etc/systemd/system"
conf_dir="$etc/hostagent"
conf="$conf_dir/hostagent.toml"

say() { printf 'install.sh: %s\n' "$*"; }

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "install.sh: $python is older than 3.11" >&2; exit 1; }

# 1. The wheel. Built from a copy of the sources so the checkout gets no build/ dir.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
[ -n "$wheel_dir" ] || wheel_dir="$tmp/wheels"
mkdir -p "$wheel_dir"
mkdir -p "$tmp/src"
tar -C "$src" --exclude=.venv --exclude=.git --exclude=build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.mypy_cache --exclude=.ruff_cache \
    --exclude=.pytest_cache -cf - . | tar -C "$tmp/src" -xf -
say "building the wheel"
"$python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$wheel_dir" "$tmp/src" \
    2>"$tmp/wheel.err" || {
    # No setuptools in this interpreter: let pip fetch the build backend.
    "$python" -m pip wheel --quiet --no-deps -w "$wheel_dir" "$tmp/src" || {
        cat "$tmp/wheel.err" >&2; exit 1; }
}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$src/pyproject.toml" | head -n 1)
wheel=$(ls -t "$wheel_dir"/hostagent-"$version"-*.whl | head -n 1)

# 2. The virtualenv at the prefix, the wheel and its pinned dependencies.
if [ ! -x "$prefix/bin/python" ]; then
    say "creating the virtualenv $prefix"
    "$python" -m venv "$prefix"
fi
say "installing $(basename "$wheel") into $prefix"
"$prefix/bin/python" -m pip install --quiet --disable-pip-version-check \
    --force-reinstall --no-deps "$wheel"
"$prefix/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel"
"$prefix/bin/hostagent" --help >/dev/null

# 3. The units (replaced on every run: local changes belong in drop-ins).
mkdir -p "$unit_dir"
for unit in "$src"/systemd/*.service "$src"/systemd/*.target; do
    install -m 0644 "$unit" "$unit_dir/"
done
say "units installed in $unit_dir"

# 4. Documentation, where the units' Documentation= points.
mkdir -p "$prefix/share/doc/hostagent"
install -m 0644 "$src"/docs/*.md "$prefix/share/doc/hostagent/"
install -m 0644 "$src"/pki/vault-policy.hcl "$prefix/share/doc/hostagent/"

# 5. The configuration: written once, never overwritten.
mkdir -p "$conf_dir"
chmod 0750 "$conf_dir"
if [ -e "$conf" ]; then
    say "keeping the existing $conf"
else
    umask 077
    cat >"$conf.new" <<'EOF'
# hostagent configuration (docs/configuration.md, installed in
# /opt/hostagent/share/doc/hostagent/). Every key is shown with its default and
# commented out: with this file as it is, the agent runs a single host with all
# defaults. Uncomment and change what differs. Unknown keys are errors.

# host_id = "<hostname>"           # this host's id; recorded in every domain's metadata
# state_dir = "/var/lib/hostagent" # SQLite state, api-token, node files, probe cache
# image_dir = "<state_dir>/images" # one folder per base image; pulled ones in .pulled/

[api]
# listen = "127.0.0.1:8470"        # a non-loopback address requires tls_cert and tls_key
# tls_cert = ""                    # PEM certificate chain (unset: plain HTTP, loopback only)
# tls_key = ""                     # PEM private key
# client_ca_file = ""              # verifies the zone's client certificate (mutual TLS);
#                                  # unset: the zone's CA this host got at bootstrap

[phone_home]
# port = 8472                      # guests POST here, on their cluster's gateway address

[libvirt]
# uri = "qemu:///system"
# domain_type = "auto"             # "kvm", "qemu" (TCG) or "auto" (probe a real kernel)
# kvm_probe_timeout_s = 15.0       # how long "auto" gives a kernel to boot under KVM
# shutdown_timeout_s = 30.0        # ACPI shutdown wait on delete before destroying
# qemu_user = "libvirt-qemu"       # user QEMU runs as (qemu.conf); owns the certificate share

[capacity]
# reserved_vcpus = 1               # kept for the host itself
# reserved_memory_mib = 1024
# reserved_disk_gib = 10
# vcpu_ratio = 4.0                 # vCPUs offered per physical CPU (memory: no overcommit)
# qemu_overhead_base_mib = 192     # QEMU overhead per VM (bench/qemu_overhead.py) ...
# qemu_overhead_per_gib_mib = 16   # ... plus this per GiB of guest memory

[reconciler]
# concurrency = 8                  # nodes reconciled at the same time
# max_attempts = 5                 # attempts before a node goes to Failed
# backoff_initial_s = 1.0          # first retry delay, doubled per attempt ...
# backoff_max_s = 60.0             # ... up to this
# resync_interval_s = 60.0         # full desired-vs-libvirt comparison this often
# crash_loop_starts = 5            # a VM started this often ...
# crash_loop_window_s = 600.0      # ... within this window is not started again: Failed

[health]
# report_interval_s = 30           # guests report to the agent this often (5..3600)
# report_timeout_s = 120.0         # a Ready guest silent this long is unhealthy
# crash_loop_starts = 3            # started this often within crash_loop_window_s: crash-looping
# check_interval_s = 10.0          # the agent judges every node this often
# boot_timeout_s = 900.0           # Running this long without phoning home: Failed, with
#                                  # the console's last lines in the message

[images]                           # images pulled with PUT /v1/images/{name}
# unused_ttl_s = 86400.0           # a pulled image no node has named this long is removed
# gc_interval_s = 600.0            # how often the agent looks for such images
# download_timeout_s = 60.0        # connect, and each read of a download
# download_attempts = 5            # tries per file after connection errors; then Failed
# ca_file = ""                     # PEM CAs for https sources (unset: the system's CAs)

[cloudconfig]
# template_dir = ""                # files here override the shipped templates, file by file
# Per role (cloudconfig.master, cloudconfig.worker): files, units and commands added to
# every node of that role (docs/cloudconfig.md).
# [cloudconfig.worker]
# files = []                       # [{path = "/etc/x", content = "...", permissions = "0644"}]
# units = []                       # [{name = "x.service", content = "...", enable = true}]
# commands = []                    # run before the node phones home

[network]
# underlay_address = ""            # this host's underlay IPv4; unset: bridges only (one host)
# underlay_mtu = 0                 # unset: read from the device holding underlay_address
# vxlan_port = 4789
# peer_check_interval_s = 30.0     # how often every peer host is pinged (GET /v1/host)
# peer_check_timeout_s = 2.0
# Standalone mode (no zone yet): each cluster's peer hosts. The same list may go to
# every host: a host skips its own address (docs/network.md).
# [[network.clusters]]
# cluster = "alpha"
# peers = [{address = "192.0.2.12", macs = ["52:54:00:8a:1f:03"]}, {address = "192.0.2.13"}]

[pki]
# backend = "local"                # "local": CAs in <state_dir>/ca; "vault": Vault/OpenBao
# key_type = "ecdsa"               # "ecdsa" (P-256) or "rsa" (2048)
# ttl_days = 90.0                  # lifetime of each node certificate
# renew_fraction = 0.6667          # renewed at this fraction of its lifetime
# revoke_on_last_node = true       # the cluster's last node leaving this host ends its CAs

# Only with backend = "vault" (docs/install.md: "Vault"):
# url is required there; the other keys have no default unless shown. Set either
# token_file or both role_id_file and secret_id_file.
# [pki.vault]
# url = "https://vault.example:8200"
# ca_bundle = "/etc/hostagent/vault-ca.pem"         # unset: the system's CAs
# token_file = "/etc/hostagent/vault-token"         # either a token file ...
# role_id_file = "/etc/hostagent/vault-role-id"     # ... or AppRole credentials
# secret_id_file = "/etc/hostagent/vault-secret-id"
# approle_mount = "approle"
# mount_prefix = "hostagent"       # PKI mounts: <prefix>-<cluster>-<ca>
# kv_mount = "hostagent-kv"        # the clusters' service-account keys

# A host of a zone (docs/zone.md; unset url: standalone). With an https url the agent
# bootstraps a client certificate of the zone with the one-time token (mutual TLS),
# keeps it in <state_dir>/zone-tls and renews it at 2/3 of its lifetime.
# [zone]
# url = "https://192.0.2.10:8471"
# token_file = "/etc/hostagent/zone-token"  # `hostagent zone host-token HOST` on the zone
# ca_file = ""                     # trust for the zone's TLS; unset: the system's CAs
# failure_domain = "default"       # hosts that fail together
# api_url = ""                     # how the zone reaches this agent; default from api.listen
# timeout_s = 10.0                 # per request to the zone
EOF
    mv "$conf.new" "$conf"
    chmod 0640 "$conf"
    say "wrote $conf (all defaults, commented)"
fi

# Check that the configuration (new or kept) loads.
if ! "$prefix/bin/python" -c 'import sys; from pathlib import Path
from hostagent.config import ConfigError, load_config
try:
    load_config(Path(sys.argv[1]))
except ConfigError as exc:
    sys.exit(str(exc))' "$conf"; then
    echo "install.sh: $conf does not load (see above); fix it before starting the agent" >&2
    exit 1
fi

cat <<EOF

hostagent $version is installed in $prefix.
Next steps (as root):
  \$EDITOR $conf            # host_id, network.underlay_address, pki, ... (docs/install.md)
  systemctl daemon-reload
  systemctl enable --now hostagent.service hostagent.target
  journalctl -u hostagent -f
  $prefix/bin/hostagent host   # capacity, domain type, networks
EOF
if [ -n "$root" ]; then
    echo "(units and config went below --root $root; a host's own systemd does not see them)"
fi
