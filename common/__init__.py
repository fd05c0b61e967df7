"""What every package shares and that imports no other package of the project: names, root
errors, outbound HTTP clients (http.py, the only httpx user), backoff."""
