#!/usr/bin/env bash
# Build the Vagrant box hostagent/debian12 (vagrant-libvirt) offline from Debian's
# packages, as root: vagrant/hostagent-debian12.box. Cached by recipe hash under
# /var/cache/hostagent-test/vagrant (HOSTAGENT_VAGRANT_CACHE): a second run is instant.
# Options: --force (rebuild), --output FILE, --cache-dir DIR. See docs/vagrant.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="$here/../.venv/bin/python"
# The builder needs only the standard library and the hostagent package from this checkout.
[ -x "$python" ] || python=python3
exec "$python" "$here/build_box.py" "$@"
