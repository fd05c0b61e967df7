#!/usr/bin/env bash
# Prepare a Debian 12 host (as root) for hostagent: packages, libvirt daemons, virtualenv.
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev
  pkg-config gcc python3-venv python3-dev cloud-init busybox-static cpio
  libxml2-utils iproute2 nftables ca-certificates debootstrap e2fsprogs systemd
  vagrant vagrant-libvirt fdisk mount etcd-server etcd-client prometheus
)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-host: run as root (libvirt, bridges and the lab image need it)" >&2
  exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-host: installing ${missing[*]}"
  # etcd-server enables and starts Debian's own member on 127.0.0.1:2379 when installed.
  # The zone's tests and labs run their own members on free ports: keep that one off
  # (masked before the install, so that it never starts; under sysvinit, disabled after).
  if [ -d /run/systemd/system ] && printf '%s\n' "${missing[@]}" | grep -qx etcd-server; then
    systemctl mask etcd.service >/dev/null
  fi
  # prometheus is here for promtool (the alert rules' checks and tests), not its server.
  if [ -d /run/systemd/system ] && printf '%s\n' "${missing[@]}" | grep -qx prometheus; then
    systemctl mask prometheus.service >/dev/null
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ ! -d /run/systemd/system ] && printf '%s\n' "${missing[@]}" | grep -qx etcd-server; then
    /etc/init.d/etcd stop >/dev/null 2>&1 || true
    update-rc.d etcd disable >/dev/null 2>&1 || true
  fi
  if [ ! -d /run/systemd/system ] && printf '%s\n' "${missing[@]}" | grep -qx prometheus; then
    /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
fi
# The lab image is built from Debian's packages with apt-get download: it needs package lists.
if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then apt-get update -qq; fi

stamp=.venv/.installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup-host: preparing the virtualenv in .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi

# Without udev (containers, CI runners, minimal inits) /dev/kvm stays root-only, and
# libvirt then re-probes QEMU on every call: 20-150 s per define instead of milliseconds
# (docs/operations.md). Give it udev's permissions; a host where udev runs is left alone.
granted=$(.venv/bin/hostagent lab kvm-permissions)
if [ -n "$granted" ]; then echo "setup-host: $granted"; fi

start_daemon() {
  if pgrep -x "$1" >/dev/null; then return; fi
  echo "setup-host: starting $1"
  if [ -d /run/systemd/system ]; then systemctl start "$1"; else "$1" -d; fi
}
if [ -n "$granted" ] && pgrep -x libvirtd >/dev/null; then
  echo "setup-host: restarting libvirtd so it probes QEMU again with the new permissions"
  if [ -d /run/systemd/system ]; then
    systemctl restart libvirtd
  else
    pkill -x libvirtd
    for _ in $(seq 1 100); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
  fi
fi
start_daemon virtlogd
start_daemon libvirtd
for _ in $(seq 1 50); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.2
done
