"""Server credentials for TLS and mTLS from PEM files."""

from __future__ import annotations

import grpc

from atelier.kit.settings import TlsSettings


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials | None:
    """Credentials for ``add_secure_port``, or None when TLS is off."""
    if not settings.enabled:
        return None
    assert settings.cert_file is not None and settings.key_file is not None
    key = settings.key_file.read_bytes()
    chain = settings.cert_file.read_bytes()
    client_ca = settings.client_ca_file.read_bytes() if settings.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca,
        require_client_auth=settings.require_client_cert,
    )
