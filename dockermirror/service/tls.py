"""Server TLS: one SSLContext, built from the configured certificate and key."""

from __future__ import annotations

import ssl
from pathlib import Path


class TLSError(Exception):
    """The certificate or key cannot be used; the message names the file."""


def server_context(certificate: Path, key: Path | None) -> ssl.SSLContext:
    for label, path in (("certificate", certificate), ("key", key)):
        if path is None:
            raise TLSError(f"tls.{label} is not set (both tls.certificate and tls.key are needed)")
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise TLSError(f"cannot read TLS {label} {path}: {exc.strerror}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(certificate), str(key))
    except ssl.SSLError as exc:
        raise TLSError(f"cannot use TLS certificate {certificate} with key {key}: {exc.reason or exc}") from None
    return context
