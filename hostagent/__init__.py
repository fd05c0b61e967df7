"""hostagent: runs the nodes of guest Kubernetes clusters as libvirt VMs on one host."""

__version__ = "0.1.0"
