"""Bearer-token auth, TLS and mTLS on a real server."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.kit.certificates import make_pki
from tests.kit.conftest import make_settings
from tests.kit.test_server import get_model, health


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_bearer_token_required_except_for_health(start_server, tmp_path):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# rotated weekly\nfile-token\n\n")
    server = start_server(make_settings(auth={"tokens": ["env-token"], "tokens_file": tokens_file}))
    with grpc.insecure_channel(server.target) as channel:
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
        for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", "env-token")],
                         [("authorization", "Basic env-token")]):
            with pytest.raises(grpc.RpcError) as err:
                get_model(channel, "models/a", metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "token" in err.value.details()
        for token in ("env-token", "file-token"):
            reply = get_model(channel, "models/a", metadata=[("authorization", f"Bearer {token}")])
            assert reply.model.name == "models/a"


def test_tls(start_server, pki):
    server = start_server(make_settings(tls={"cert_file": pki.server_cert,
                                             "key_file": pki.server_key}))
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes())
    with grpc.secure_channel(server.target, creds) as channel:
        assert get_model(channel, "models/a").model.name == "models/a"
    with grpc.insecure_channel(server.target) as channel:  # plaintext client is refused
        with pytest.raises(grpc.RpcError) as err:
            get_model(channel, "models/a")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate_from_the_ca(start_server, pki):
    server = start_server(make_settings(tls={
        "cert_file": pki.server_cert, "key_file": pki.server_key,
        "client_ca_file": pki.ca_cert, "require_client_cert": True,
    }))
    ca = pki.ca_cert.read_bytes()
    good = grpc.ssl_channel_credentials(ca, pki.client_key.read_bytes(),
                                        pki.client_cert.read_bytes())
    with grpc.secure_channel(server.target, good) as channel:
        assert get_model(channel, "models/a").model.name == "models/a"
    anonymous = grpc.ssl_channel_credentials(ca)
    rogue = grpc.ssl_channel_credentials(ca, pki.other_client_key.read_bytes(),
                                         pki.other_client_cert.read_bytes())
    for creds in (anonymous, rogue):
        with grpc.secure_channel(server.target, creds) as channel:
            with pytest.raises(grpc.RpcError) as err:
                get_model(channel, "models/a")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
