"""What the agent, the zone and the libraries under them share: HTTP clients, backoff."""
