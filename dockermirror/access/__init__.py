"""Who may pull: client identities (certificates, htpasswd users) and the rules about them."""
