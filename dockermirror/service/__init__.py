"""The edge of the daemon: logging, TLS, running the HTTP server (and, later, systemd)."""
