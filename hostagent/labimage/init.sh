#!/bin/sh
# /init of the hostagent "lab" guest image: busybox sh running as PID 1.
#
# It reads the NoCloud config drive (ISO9660 label "cidata"), sets the hostname,
# configures the network from the netplan v2 network-config, mounts the
# "hostagent-pki" 9p share, phones home (POST, JSON body) and then idles; busybox
# acpid turns an ACPI power button press into a clean power-off.
# Every step is logged to the serial console prefixed "hostagent-lab:".
# PID 1 must never exit: every failure is logged and the script carries on.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
CIDATA=/mnt/cidata
PKI=/etc/kubernetes/pki
PHONE_HOME_LIMIT_S=600

log() { echo "hostagent-lab: $*"; }
err() { echo "hostagent-lab: ERROR $*"; }

mount_basics() {
    mkdir -p /proc /sys /dev /tmp /run /var/run /var/log "$CIDATA" "$PKI"
    mount -t proc proc /proc || err "mounting /proc failed"
    mount -t sysfs sysfs /sys || err "mounting /sys failed"
    mount -t devtmpfs devtmpfs /dev || err "mounting devtmpfs on /dev failed"
}

load_modules() {
    n=0
    while read -r mod; do
        [ -n "$mod" ] || continue
        if insmod "$mod"; then n=$((n + 1)); else err "insmod $mod failed"; fi
    done </etc/hostagent-lab/modules
    log "loaded $n kernel modules"
}

start_acpid() {
    mkdir -p /etc/acpi/PWRF
    cat >/etc/acpi/PWRF/00000080 <<'EOF'
#!/bin/sh
echo "hostagent-lab: ACPI power button pressed, powering off" >/dev/console
sync
poweroff -f
EOF
    chmod 755 /etc/acpi/PWRF/00000080
    if [ -z "$(ls /dev/input/event* 2>/dev/null)" ]; then
        err "no /dev/input/event* device: ACPI shutdown will not work"
    fi
    acpid -d -c /etc/acpi >/dev/console 2>&1 &
    log "acpid started (pid $!)"
}

# Strip surrounding whitespace, carriage returns and quotes from stdin.
unquote() {
    tr -d '\r' | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' \
        -e "s/^'\\(.*\\)'\$/\\1/" -e 's/^"\(.*\)"$/\1/' -e "s/''/'/g"
}

# Value of the first top-level-ish "KEY: value" line of a YAML file.
yaml_value() {
    sed -n "s/^[[:space:]]*$1:[[:space:]]*//p" "$2" | head -n 1 | unquote
}

# Prints the ISO9660 volume label of block device $1 (empty if not ISO9660).
iso_label() {
    dd if="$1" of=/tmp/pvd bs=2048 skip=16 count=1 2>/dev/null || return 0
    [ "$(dd if=/tmp/pvd bs=1 skip=1 count=5 2>/dev/null)" = CD001 ] || return 0
    dd if=/tmp/pvd bs=1 skip=40 count=32 2>/dev/null | tr -cd 'A-Za-z0-9_.-' | tr 'A-Z' 'a-z'
}

find_cidata() {
    i=0
    while [ "$i" -lt 60 ]; do
        for dev in /dev/sr* /dev/vd*; do
            [ -b "$dev" ] || continue
            if [ "$(iso_label "$dev")" = cidata ]; then
                echo "$dev"
                return 0
            fi
        done
        i=$((i + 1))
        sleep 0.5
    done
    return 1
}

mount_cidata() {
    if ! dev=$(find_cidata); then
        err "no config drive: no block device (/dev/sr*, /dev/vd*) has ISO9660 label cidata"
        return 1
    fi
    if ! mount -t iso9660 -o ro "$dev" "$CIDATA"; then
        err "mounting config drive $dev failed"
        return 1
    fi
    log "config drive $dev mounted on $CIDATA: $(ls "$CIDATA" | tr '\n' ' ')"
}

set_identity() {
    INSTANCE_ID=$(yaml_value instance-id "$CIDATA/meta-data")
    name=$(yaml_value local-hostname "$CIDATA/meta-data")
    log "instance-id: ${INSTANCE_ID:-<none>}"
    if [ -z "$name" ]; then
        err "meta-data has no local-hostname"
        return 1
    fi
    hostname "$name" && echo "$name" >/etc/hostname && log "hostname set to $name"
}

# netplan v2 -> one line per ethernet: KEY|MAC|SET-NAME|MTU|ADDRESSES|ROUTES
# (ADDRESSES space separated, ROUTES space separated TO>VIA pairs).
NETPLAN_AWK='
function unq(v) {
    sub(/^[ \t]+/, "", v); sub(/[ \t\r]+$/, "", v)
    if (v ~ /^".*"$/ || v ~ ("^" q ".*" q "$")) v = substr(v, 2, length(v) - 2)
    return v
}
function val(line) { sub(/^[^:]*:/, "", line); return unq(line) }
function item(line) { sub(/^[ \t]*-[ \t]*/, "", line); return line }
function endroute() {
    if (to != "" || via != "") routes = routes (routes == "" ? "" : " ") to ">" via
    to = ""; via = ""
}
function flush() {
    endroute()
    if (key != "") print key "|" mac "|" name "|" mtu "|" addrs "|" routes
    key = ""; mac = ""; name = ""; mtu = ""; addrs = ""; routes = ""; sect = ""
}
function flowlist(v,   n, parts, i) {
    gsub(/[\[\]]/, "", v); n = split(v, parts, ",")
    for (i = 1; i <= n; i++) if (unq(parts[i]) != "") addrs = addrs (addrs == "" ? "" : " ") unq(parts[i])
}
{ match($0, /^ */); ind = RLENGTH - base; line = $0; sub(/^ */, "", line) }
line == "" || line ~ /^#/ { next }
ind == 0 && line ~ /^network:/ { base = 2; next }
ind == 0 { flush(); ineth = (line ~ /^ethernets:/); next }
!ineth { next }
ind == 2 { flush(); key = line; sub(/:.*$/, "", key); key = unq(key); next }
ind == 4 && line !~ /^-/ {
    endroute(); sect = line; sub(/:.*$/, "", sect)
    if (sect == "mtu") mtu = val(line)
    else if (sect == "set-name") name = val(line)
    else if (sect == "addresses" && val(line) ~ /^\[/) flowlist(val(line))
    next
}
line ~ /^macaddress:/ { mac = val(line); next }
sect == "addresses" && line ~ /^-/ { a = unq(item(line)); addrs = addrs (addrs == "" ? "" : " ") a; next }
sect == "routes" && line ~ /^-/ { endroute(); line = item(line) }
sect == "routes" && line ~ /^to:/ { to = val(line); next }
sect == "routes" && line ~ /^via:/ { via = val(line); next }
END { flush() }
'

# Prints the name of the interface with MAC $1, waiting up to 10 s for it.
dev_by_mac() {
    want=$(echo "$1" | tr 'A-F' 'a-f')
    i=0
    while [ "$i" -lt 20 ]; do
        for f in /sys/class/net/*/address; do
            if [ "$(cat "$f")" = "$want" ]; then
                basename "$(dirname "$f")"
                return 0
            fi
        done
        i=$((i + 1))
        sleep 0.5
    done
    return 1
}

configure_iface() {  # KEY MAC SET-NAME MTU ADDRESSES ROUTES
    dev=$1
    if [ -n "$2" ] && ! dev=$(dev_by_mac "$2"); then
        err "no network interface has MAC $2 (ethernet $1)"
        return 1
    fi
    target=${3:-$dev}
    if [ "$dev" != "$target" ]; then
        ip link set dev "$dev" down
        ip link set dev "$dev" name "$target" || { err "renaming $dev to $target failed"; target=$dev; }
    fi
    [ -z "$4" ] || ip link set dev "$target" mtu "$4" || err "setting mtu $4 on $target failed"
    ip link set dev "$target" up || err "bringing up $target failed"
    for a in $5; do
        ip addr add "$a" dev "$target" || err "adding address $a to $target failed"
    done
    for r in $6; do
        to=${r%%>*}
        via=${r#*>}
        case "$to" in "" | 0.0.0.0/0) to=default ;; esac
        ip route add "$to" via "$via" dev "$target" || err "adding route $to via $via failed"
    done
    log "network $target (mac ${2:-?}): mtu ${4:-default}, addresses ${5:-none}, routes ${6:-none}"
}

configure_network() {
    if [ ! -f "$CIDATA/network-config" ]; then
        err "config drive has no network-config"
        return 1
    fi
    awk -v q="'" "$NETPLAN_AWK" "$CIDATA/network-config" >/tmp/net.conf
    [ -s /tmp/net.conf ] || err "network-config names no ethernets"
    while IFS='|' read -r key mac name mtu addrs routes; do
        configure_iface "$key" "$mac" "$name" "$mtu" "$addrs" "$routes"
    done </tmp/net.conf
}

# Value of "NAME=value" anywhere in user-data (indented, optionally quoted).
userdata_value() {
    sed -n "s/^.*$1=//p" "$CIDATA/user-data" | head -n 1 | tr -d '\r' |
        sed -e "s/^[[:space:]\"']*//" -e "s/[[:space:]\"']*\$//"
}

mount_pki() {
    if mount -t 9p -o trans=virtio,version=9p2000.L,ro hostagent-pki "$PKI"; then
        log "9p share hostagent-pki mounted on $PKI"
    else
        err "mounting 9p share hostagent-pki on $PKI failed"
    fi
}

json_str() {
    printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' | tr -d '\000-\037')"
}

json_list() {  # lines on stdin -> JSON list of strings
    sep=''
    printf '['
    while IFS= read -r entry; do
        printf '%s%s' "$sep" "$(json_str "$entry")"
        sep=', '
    done
    printf ']'
}

disk_bytes() {
    if [ -r /sys/block/vda/size ]; then
        echo $(($(cat /sys/block/vda/size) * 512))
    else
        err "no /dev/vda disk" >&2
        echo 0
    fi
}

# Bytes the guest could read from the certificate share, all files together.
pki_read_bytes() {
    (cd "$PKI" && find . -type f | while IFS= read -r f; do cat "$f"; done) 2>/dev/null | wc -c
}

# The share is read-only for the guest: writing must fail.
pki_writable() {
    if touch "$PKI/.guest-write-test" 2>/dev/null; then echo true; else echo false; fi
}

# Reachability of the addresses an operator (or a test) listed in user-data as
# PING_TARGETS=a,b (e.g. through an extension file): {"a": true, "b": false}.
ping_results() {
    sep=''
    printf '{'
    for ip in $(userdata_value PING_TARGETS | tr ',' ' '); do
        ok=false
        for _ in 1 2 3 4 5; do
            if ping -c 1 -W 2 "$ip" >/dev/null 2>&1; then ok=true; break; fi
        done
        log "ping $ip: $ok" >&2
        printf '%s%s: %s' "$sep" "$(json_str "$ip")" "$ok"
        sep=', '
    done
    printf '}'
}

phone_home_body() {
    addrs=$(ip -4 -o addr show | awk '$2 != "lo" { print $4 }' | json_list)
    pki=$( (cd "$PKI" && find . -type f | sed 's|^\./||' | sort) | json_list)
    read -r up _ </proc/uptime
    printf '{"hostname": %s, "instance_id": %s, "addresses": %s, "pki_files": %s, ' \
        "$(json_str "$(hostname)")" "$(json_str "$INSTANCE_ID")" "$addrs" "$pki"
    printf '"pki_read_bytes": %s, "pki_writable": %s, ' "$(pki_read_bytes)" "$(pki_writable)"
    printf '"pings": %s, ' "$PINGS"
    printf '"disk_bytes": %s, "kernel": %s, "uptime_s": %s, "health_interval_s": %s}' \
        "$(disk_bytes)" "$(json_str "$(uname -r)")" "$up" "$HEALTH_INTERVAL_S"
}

# One POST; prints the last HTTP status seen (empty if none). 0 on any 2xx.
post_once() {  # URL TOKEN BODY
    timeout 20 wget -S -O /dev/null --header "Authorization: Bearer $2" \
        --header "Content-Type: application/json" --post-data "$3" "$1" 2>/tmp/wget.log
    rc=$?
    status=$(sed -n 's/^ *HTTP\/[0-9.]* \([0-9][0-9][0-9]\).*/\1/p' /tmp/wget.log | tail -n 1)
    echo "$status"
    case "$status" in 2??) return 0 ;; "") return "$rc" ;; *) return 1 ;; esac
}

uptime_int() { read -r up _ </proc/uptime; echo "${up%%.*}"; }

phone_home() {  # URL TOKEN
    deadline=$(($(uptime_int) + PHONE_HOME_LIMIT_S))
    n=0
    while :; do
        n=$((n + 1))
        if status=$(post_once "$1" "$2" "$(phone_home_body)"); then
            log "phone-home attempt $n: HTTP ${status:-2xx}, done"
            return 0
        fi
        log "phone-home attempt $n failed: ${status:+HTTP $status: }$(tail -n 1 /tmp/wget.log)"
        if [ "$(uptime_int)" -ge "$deadline" ]; then
            err "phone-home gave up after $PHONE_HOME_LIMIT_S s ($n attempts)"
            return 1
        fi
        sleep 2
    done
}

# Tells the agent every INTERVAL s that the guest is alive, as cloud-init guests'
# hostagent-health.timer does (docs/operations.md, "Node health").
report_health() {  # URL TOKEN INTERVAL
    while sleep "$3"; do
        post_once "$1/health" "$2" '{}' >/dev/null ||
            log "health report failed: $(tail -n 1 /tmp/wget.log)"
    done
}

configure_from_cidata() {
    mount_cidata || return 1
    set_identity
    configure_network
    mount_pki
    url=$(userdata_value PHONE_HOME_URL)
    token=$(userdata_value PHONE_HOME_TOKEN)
    if [ -z "$url" ] || [ -z "$token" ]; then
        err "user-data has no PHONE_HOME_URL / PHONE_HOME_TOKEN line"
        return 1
    fi
    PINGS=$(ping_results)
    HEALTH_INTERVAL_S=$(userdata_value PHONE_HOME_HEALTH_INTERVAL_S)
    case "$HEALTH_INTERVAL_S" in ''|*[!0-9]*) HEALTH_INTERVAL_S=30 ;; esac
    log "phoning home to $url"
    phone_home "$url" "$token" || return 1
    report_health "$url" "$token" "$HEALTH_INTERVAL_S" &
}

main() {
    mount_basics
    log "starting, kernel $(uname -r)"
    load_modules
    ip link set lo up || err "bringing up lo failed"
    start_acpid
    configure_from_cidata
    log "ready; idling (ACPI power button powers off)"
}

main
while :; do
    sleep 3600
done
