#!/usr/bin/env bash
# Provision one lab VM through the install path (docs/systemd.md): the project, synced
# to /vagrant, is pip-installed into the virtualenv /opt/hostagent and the systemd units
# are installed; then the VM takes its role (docs/vagrant.md). As root, run by the
# Vagrantfile:
#
#   provision.sh zone UNDERLAY_IP HOST=IP...
#     The zone API on UNDERLAY_IP:8471 with TLS from the lab's CA (made here once, kept
#     in /var/lib/hostagent-vagrant/ca), hostagent-zone.service enabled, and for each
#     HOST its files in /var/lib/hostagent-vagrant/share/HOST/: zone-ca.pem, agent.crt and
#     agent.key (TLS for its agent API at IP) and zone-token (a fresh one-time token: it
#     bootstraps the agent's client certificate of the zone). The Vagrantfile copies them
#     to vagrant/.lab/HOST/ on the workstation, which is rsynced to that host's
#     /vagrant-lab.
#   provision.sh host UNDERLAY_IP HOST_ID ZONE_IP
#     libvirt + QEMU, its files from /vagrant-lab in /etc/hostagent, an agent
#     configuration that registers with the zone (pki backend "zone"), hostagent.service
#     enabled; done when the zone has taken the agent's first report, which mutual TLS
#     (on: the zone is https) makes with the agent's client certificate only.
#
# Idempotent: `vagrant provision` re-runs it (an upgrade of the agent from /vagrant).
# Files it writes start with "# Written by vagrant/provision.sh"; remove that line to
# keep your own edits.
set -euo pipefail

SRC=/vagrant
ZONE_PORT=8471
AGENT_PORT=8470
LAB=/var/lib/hostagent-vagrant # zone VM: the lab's CA and each host's files
HOST_FILES=/vagrant-lab         # host VM: its files, rsynced from vagrant/.lab/HOST_ID
HOST_FILE_NAMES=(zone-ca.pem agent.crt agent.key zone-token)
# The zone runs as a dynamic user that cannot read /etc/hostagent: systemd hands it its
# files as credentials, in this directory (docs/install.md).
CREDENTIALS=/run/credentials/hostagent-zone.service
WAIT_S=90
MARKER="# Written by vagrant/provision.sh"
RENEW_S=$((30 * 86400)) # certificates are re-issued this long before they end
export DEBIAN_FRONTEND=noninteractive
role=provision

say() { echo "provision[$role]: $*"; }
die() {
  echo "provision[$role]: error: $*" >&2
  exit 1
}

# Run the command every 2 s until it succeeds; 1 when WAIT_S passed without success.
wait_for() {
  local deadline=$((SECONDS + WAIT_S))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 2
  done
}

# stdin into FILE with MODE, unless FILE exists and does not start with MARKER (someone
# took it over: it is left as it is).
write_managed() {
  local file=$1 mode=$2 tmp
  if [ -e "$file" ] && ! head -n 1 "$file" | grep -qF "$MARKER"; then
    say "keeping $file: its first line is not '$MARKER'"
    cat >/dev/null
    return
  fi
  tmp=$(mktemp "$file.XXXXXX")
  cat >"$tmp"
  chmod "$mode" "$tmp"
  mv "$tmp" "$file"
}

# --- the install path ------------------------------------------------------------------

install_agent() {
  local packages=(python3-venv python3-dev gcc pkg-config libvirt-dev openssl curl)
  if [ "$role" = host ]; then
    packages+=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients iproute2 nftables)
  fi
  say "apt-get install ${packages[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

  # The install path: a virtualenv at /opt/hostagent with the project pip-installed.
  if [ ! -x /opt/hostagent/bin/python ]; then
    python3 -m venv /opt/hostagent
  fi
  # Without PyPI (or behind a TLS-intercepting proxy the guest does not trust), put the
  # wheels in vagrant/wheelhouse on the workstation (pip wheel -w vagrant/wheelhouse .)
  # and the install uses only them.
  # The wheelhouse holds hostagent's own wheel too: install that, since building from
  # the sources would need setuptools from an index.
  if [ -d "$SRC/vagrant/wheelhouse" ]; then
    /opt/hostagent/bin/pip install -q --no-index --find-links "$SRC/vagrant/wheelhouse" \
      --force-reinstall hostagent
  else
    /opt/hostagent/bin/pip install -q --upgrade pip
    /opt/hostagent/bin/pip install -q "$SRC"
  fi
  install -d -m 0755 /opt/hostagent/share/doc/hostagent
  install -m 0644 "$SRC"/docs/*.md /opt/hostagent/share/doc/hostagent/

  install -m 0644 "$SRC/systemd/hostagent.service" "$SRC/systemd/hostagent.target" \
    "$SRC/systemd/hostagent-zone.service" /etc/systemd/system/
  install -d -m 0750 /etc/hostagent
  systemctl daemon-reload
}

# --- the lab's certificates (openssl; the box has it through ca-certificates) ----------

# DIR/ca.crt and DIR/ca.key: the lab's CA, made once and kept until it nears its end.
ensure_ca() {
  local dir=$1
  install -d -m 0700 "$dir"
  if [ -s "$dir/ca.key" ] && openssl x509 -checkend "$RENEW_S" -noout -in "$dir/ca.crt" \
    >/dev/null 2>&1; then
    return
  fi
  say "making the lab CA in $dir"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -days 3650 -subj "/CN=hostagent vagrant lab CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  chmod 0600 "$dir/ca.key"
}

# CRT and KEY: a TLS server certificate for NAME at IP from the CA in CA_DIR. Kept while
# it chains to that CA, names IP and is not near its end; re-issued otherwise.
issue_cert() {
  local ca_dir=$1 name=$2 ip=$3 crt=$4 key=$5 tmp
  if [ -s "$key" ] && openssl verify -CAfile "$ca_dir/ca.crt" "$crt" >/dev/null 2>&1 &&
    openssl x509 -checkend "$RENEW_S" -noout -in "$crt" >/dev/null 2>&1 &&
    openssl x509 -noout -ext subjectAltName -in "$crt" | grep -qFw "IP Address:$ip"; then
    return
  fi
  say "issuing a certificate for $name ($ip)"
  tmp=$(mktemp -d)
  printf '%s\n' "subjectAltName=IP:$ip,DNS:$name" "extendedKeyUsage=serverAuth" \
    "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" >"$tmp/ext"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$tmp/key" -out "$tmp/csr" -subj "/CN=$name" 2>/dev/null
  openssl x509 -req -in "$tmp/csr" -CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 825 -extfile "$tmp/ext" \
    -out "$tmp/crt" 2>/dev/null
  install -m 0600 "$tmp/key" "$key"
  install -m 0644 "$tmp/crt" "$crt"
  rm -rf "$tmp"
}

# --- the zone VM -------------------------------------------------------------------------

provision_zone() {
  local ip=$1 url="https://$1:$ZONE_PORT"
  shift
  ensure_ca "$LAB/ca"
  install -m 0644 "$LAB/ca/ca.crt" /etc/hostagent/lab-ca.pem
  issue_cert "$LAB/ca" zone "$ip" /etc/hostagent/zone.crt /etc/hostagent/zone.key

  write_managed /etc/hostagent/zone.toml 0640 <<TOML
$MARKER; every key: docs/zone.md.
# TLS files come as credentials (hostagent-zone.service.d/vagrant-lab.conf).
state_dir = "/var/lib/hostagent-zone"

[api]
listen = "$ip:$ZONE_PORT"
tls_cert = "$CREDENTIALS/zone.crt"
tls_key = "$CREDENTIALS/zone.key"

[agents]
ca_file = "$CREDENTIALS/agents-ca.pem"
TOML
  install -d -m 0755 /etc/systemd/system/hostagent-zone.service.d
  write_managed /etc/systemd/system/hostagent-zone.service.d/vagrant-lab.conf 0644 <<UNIT
$MARKER: the files zone.toml names under $CREDENTIALS.
[Service]
LoadCredential=zone.crt:/etc/hostagent/zone.crt
LoadCredential=zone.key:/etc/hostagent/zone.key
LoadCredential=agents-ca.pem:/etc/hostagent/lab-ca.pem
UNIT
  systemctl daemon-reload
  systemctl enable hostagent-zone.service hostagent.target
  systemctl restart hostagent-zone.service
  wait_for curl -sf --cacert /etc/hostagent/lab-ca.pem "$url/healthz" ||
    die "the zone does not answer at $url/healthz after ${WAIT_S}s: journalctl -u hostagent-zone"
  say "zone serving at $url"

  # The CLI's connection (hostagent zone hosts --zone-context /etc/hostagent/zone-client.json).
  local token
  token=$(cat /var/lib/hostagent-zone/api-token)
  (umask 077 && printf '{"url": "%s", "token": "%s", "ca_file": "%s"}\n' \
    "$url" "$token" /etc/hostagent/lab-ca.pem >/etc/hostagent/zone-client.json)

  local spec host host_ip dir
  for spec in "$@"; do
    host=${spec%%=*}
    host_ip=${spec#*=}
    dir="$LAB/share/$host"
    install -d -m 0700 "$dir"
    install -m 0644 "$LAB/ca/ca.crt" "$dir/zone-ca.pem"
    issue_cert "$LAB/ca" "$host" "$host_ip" "$dir/agent.crt" "$dir/agent.key"
    (umask 077 && /opt/hostagent/bin/hostagent zone host-token "$host" \
      --zone-config /etc/hostagent/zone.toml >"$dir/zone-token")
    say "files for $host ($host_ip) in $dir"
  done
}

# --- a host VM ---------------------------------------------------------------------------

host_files_present() {
  local name
  for name in "${HOST_FILE_NAMES[@]}"; do
    [ -s "$HOST_FILES/$name" ] || return 1
  done
}

# The agent's connection to the zone, from its own API (GET /v1/host): "registered", or
# why not yet.
zone_registration() {
  local ip=$1 token answer
  token=$(cat /var/lib/hostagent/api-token 2>/dev/null) || true
  answer=$(curl -sf --cacert /etc/hostagent/zone-ca.pem -H "Authorization: Bearer $token" \
    "https://$ip:$AGENT_PORT/v1/host") || {
    echo "the agent's API does not answer at https://$ip:$AGENT_PORT"
    return
  }
  /opt/hostagent/bin/python -c 'import json, sys
zone = json.loads(sys.argv[1]).get("zone") or {}
print("registered" if zone.get("registered") else zone.get("last_error") or "no report yet")' \
    "$answer"
}

registered() { [ "$(zone_registration "$1")" = registered ]; }

provision_host() {
  local ip=$1 host=$2 zone_ip=$3
  if ! host_files_present; then
    say "waiting up to ${WAIT_S}s for ${HOST_FILE_NAMES[*]} in $HOST_FILES"
    wait_for host_files_present ||
      die "no $(printf '%s ' "${HOST_FILE_NAMES[@]}")in $HOST_FILES: the zone VM makes them \
and \`vagrant up zone\` copies them to vagrant/.lab/$host/ on the workstation. Bring the \
zone up first (\`vagrant up zone\`), then \`vagrant rsync $host && vagrant provision $host\`"
  fi
  install -m 0644 "$HOST_FILES/zone-ca.pem" /etc/hostagent/zone-ca.pem
  install -m 0644 "$HOST_FILES/agent.crt" /etc/hostagent/agent.crt
  install -m 0600 "$HOST_FILES/agent.key" /etc/hostagent/agent.key
  install -m 0600 "$HOST_FILES/zone-token" /etc/hostagent/zone-token

  # Only what differs from the defaults (docs/configuration.md). "auto" picks kvm when
  # nested KVM works in this VM and qemu (TCG) otherwise.
  write_managed /etc/hostagent/hostagent.toml 0640 <<TOML
$MARKER; every key: docs/configuration.md.
host_id = "$host"

[api]
listen = "$ip:$AGENT_PORT"
tls_cert = "/etc/hostagent/agent.crt"
tls_key = "/etc/hostagent/agent.key"

[libvirt]
domain_type = "auto"

[network]
underlay_address = "$ip"

[pki]
backend = "zone"

[zone]
url = "https://$zone_ip:$ZONE_PORT"
token_file = "/etc/hostagent/zone-token"
ca_file = "/etc/hostagent/zone-ca.pem"
failure_domain = "$host"
api_url = "https://$ip:$AGENT_PORT"
TOML
  say "host $host, underlay address $ip, zone https://$zone_ip:$ZONE_PORT"
  systemctl enable --now libvirtd.service virtlogd.service
  systemctl enable hostagent.target hostagent.service
  systemctl restart hostagent.target
  wait_for registered "$ip" ||
    die "the agent is not registered with the zone after ${WAIT_S}s: \
$(zone_registration "$ip") (journalctl -u hostagent)"
  [ -s /var/lib/hostagent/zone-tls/client.pem ] ||
    die "registered, but no client certificate in /var/lib/hostagent/zone-tls (journalctl -u hostagent)"
  say "registered with the zone at https://$zone_ip:$ZONE_PORT with its client certificate"
}

main() {
  role="${1:?usage: provision.sh zone UNDERLAY_IP HOST=IP... | host UNDERLAY_IP HOST_ID ZONE_IP}"
  case "$role" in
    zone) [ $# -ge 3 ] || die "usage: provision.sh zone UNDERLAY_IP HOST=IP..." ;;
    host) [ $# -eq 4 ] || die "usage: provision.sh host UNDERLAY_IP HOST_ID ZONE_IP" ;;
    *) die "unknown role $role (zone or host)" ;;
  esac
  shift
  install_agent
  "provision_$role" "$@"
}

# Sourcing the file (bash -c '. vagrant/provision.sh; issue_cert ...') only defines the
# functions: the certificate steps can be tried without a VM.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
