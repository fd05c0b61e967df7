"""The host-zone API: hosts register, clusters are allocated and placed, agents are driven."""
