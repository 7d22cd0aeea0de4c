"""Who may pull: the client's identity (certificate, htpasswd user, or anonymous), the
``access:`` rules, and the guard that applies both to every request."""
