"""The "lab" guest image: a Debian 12 kernel plus a busybox initramfs.

It is built offline from Debian's packages (see build.py). Its /init (init.sh) reads
the NoCloud config drive, configures the network, mounts the PKI 9p share, phones
home and powers off on an ACPI power button press: enough to test the agent's whole
VM life cycle without a full distribution inside the guest.
"""

from hostagent.labimage.build import build_lab_image

__all__ = ["build_lab_image"]
