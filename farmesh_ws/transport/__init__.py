"""Transports: sockets, HTTP routes, connection limits and shutdown; no request rules."""
