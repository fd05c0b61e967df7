"""The host side of guest cluster networks: per-cluster bridges (and later VXLAN), via pyroute2."""
