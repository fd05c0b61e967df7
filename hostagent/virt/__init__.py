"""VMs: pure domain XML (domain.py) and the one module that talks to libvirt (libvirt.py)."""
