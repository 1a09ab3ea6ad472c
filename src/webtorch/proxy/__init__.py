"""The reverse proxy: upstream groups, forwarding, health, retries."""
