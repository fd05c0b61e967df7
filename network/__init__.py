"""The host side of guest cluster networks: per cluster a bridge and a VXLAN device with static
FDB entries toward the other hosts serving it (docs/network.md)."""
