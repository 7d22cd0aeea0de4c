"""Who may pull: client identities (certificates, htpasswd users), the ``access:`` rules about
them, and the guard that applies both to every request."""
