"""Certificates of guest cluster nodes: where they live on the host and inside the guest."""
