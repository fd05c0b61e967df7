#!/usr/bin/env bash
# Provision one lab VM through the install path (docs/systemd.md): the project, synced
# to /vagrant, is pip-installed into the virtualenv /opt/hostagent and the systemd units
# are installed. Usage (as root, run by the Vagrantfile): provision.sh ROLE UNDERLAY_IP
#   ROLE host: libvirt + QEMU, /etc/hostagent/hostagent.toml, hostagent.service enabled
#   ROLE zone: placeholder until the zone issue: agent installed, hostagent-zone.service
#              copied but not enabled (`hostagent zone serve` does not exist yet)
# Idempotent: `vagrant provision` re-runs it (an upgrade of the agent from /vagrant).
set -euo pipefail

role="${1:?usage: provision.sh host|zone UNDERLAY_IP}"
underlay_ip="${2:?usage: provision.sh host|zone UNDERLAY_IP}"
src=/vagrant
export DEBIAN_FRONTEND=noninteractive

case "$role" in
  host|zone) ;;
  *) echo "provision: unknown role $role (host or zone)" >&2; exit 2 ;;
esac

packages=(python3-venv python3-dev gcc pkg-config libvirt-dev)
if [ "$role" = host ]; then
  packages+=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients iproute2)
fi
echo "provision[$role]: apt-get install ${packages[*]}"
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

# The install path: a virtualenv at /opt/hostagent with the project pip-installed.
if [ ! -x /opt/hostagent/bin/python ]; then
  python3 -m venv /opt/hostagent
fi
# Without PyPI (or behind a TLS-intercepting proxy the guest does not trust), put the
# wheels in vagrant/wheelhouse on the workstation (pip wheel -w vagrant/wheelhouse .)
# and the install uses only them.
pip_args=()
if [ -d "$src/vagrant/wheelhouse" ]; then
  pip_args=(--no-index --find-links "$src/vagrant/wheelhouse")
else
  /opt/hostagent/bin/pip install -q --upgrade pip
fi
/opt/hostagent/bin/pip install -q "${pip_args[@]}" "$src"
install -d -m 0755 /opt/hostagent/share/doc/hostagent
install -m 0644 "$src"/docs/*.md /opt/hostagent/share/doc/hostagent/

install -m 0644 "$src/systemd/hostagent.service" "$src/systemd/hostagent.target" \
  /etc/systemd/system/
install -m 0644 "$src/systemd/hostagent-zone.service" /etc/systemd/system/
systemctl daemon-reload

if [ "$role" = zone ]; then
  echo "provision[zone]: agent installed; zone service left disabled (zone issue pending)"
  exit 0
fi

install -d -m 0750 /etc/hostagent
if [ ! -e /etc/hostagent/hostagent.toml ]; then
  # Only what differs from the defaults (docs/configuration.md): the VM's hostname as
  # host id; "auto" picks kvm when nested KVM works in this VM and qemu (TCG) otherwise.
  cat > /etc/hostagent/hostagent.toml <<TOML
# Written by vagrant/provision.sh; see docs/configuration.md for every key.
host_id = "$(hostname)"

[libvirt]
domain_type = "auto"
TOML
  chmod 0640 /etc/hostagent/hostagent.toml
fi
echo "provision[host]: underlay address $underlay_ip"
systemctl enable --now libvirtd.service virtlogd.service
systemctl enable hostagent.target hostagent.service
systemctl restart hostagent.target
systemctl --no-pager --lines=0 status hostagent.service || true
