"""Cloud-config for guest nodes: templates, rendering and the NoCloud config drive."""
