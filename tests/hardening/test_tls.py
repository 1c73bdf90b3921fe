"""TLS for gRPC and HTTP (a self-signed certificate made by the test), and Redis reached with a
password and over TLS (``rediss://``) through the server's ``--redis-url``."""

from __future__ import annotations

import ssl

import grpc
import httpx
import pytest
from proxmo_client import ProxmoClient
from proxmo_client.v1 import proxmo_pb2 as pb
from proxmo_client.v1 import proxmo_pb2_grpc as pb_grpc
from server.conftest import make_request, unique

from hardening.conftest import (
    Certificate,
    RedisServer,
    StartServer,
    https_url,
    wait_ready_tls,
)

TOKEN = "tls-tok-R2d9Wq"
REDIS_PASSWORD = "redis-pw-Jk3s8Lq"


def history_request(prefix: str) -> pb.ComputeAdvantagesRequest:
    return make_request(task_prefix=prefix, request_id=f"{prefix}-req",
                        success_rate_source=pb.SUCCESS_RATE_SOURCE_HISTORY)


def test_grpc_and_http_over_tls_with_a_token(start_server: StartServer,
                                              certificate: Certificate) -> None:
    server = start_server("--tls-cert", str(certificate.cert), "--tls-key", str(certificate.key),
                          "--auth-token", TOKEN, wait=False)
    wait_ready_tls(server, certificate.cert)
    request = make_request(dry_run=True)

    # The client settings that match: tls (root_certificates for a private CA) + token.
    with ProxmoClient(server.grpc_target, root_certificates=certificate.cert_pem,
                      tls_server_name="localhost", token=TOKEN) as client:
        assert client.health().name == "SERVING"
        assert len(client.compute_advantages(request).trajectories) == 8

    # Plaintext to the TLS port fails; so does TLS that does not trust the certificate.
    with grpc.insecure_channel(server.grpc_target) as plain, pytest.raises(grpc.RpcError) as e:
        pb_grpc.CreditAssignmentServiceStub(plain).GetServerInfo(
            pb.GetServerInfoRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),),
            timeout=3)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(server.grpc_target, grpc.ssl_channel_credentials()) as untrusted, \
            pytest.raises(grpc.RpcError) as e:
        pb_grpc.CreditAssignmentServiceStub(untrusted).GetServerInfo(
            pb.GetServerInfoRequest(), timeout=3)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE

    url = https_url(server)
    ca = ssl.create_default_context(cafile=str(certificate.cert))
    info = httpx.get(f"{url}/v1/info", verify=ca, timeout=5,
                     headers={"authorization": f"Bearer {TOKEN}"})
    assert info.status_code == 200 and info.json()["version"]
    assert httpx.get(f"{url}/v1/info", verify=ca, timeout=5).status_code == 401
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.http_port}/livez", timeout=3).raise_for_status()
    with pytest.raises(httpx.ConnectError):  # not trusted without the CA
        httpx.get(f"{url}/livez", timeout=3)


def _stored_trials(redis: RedisServer, namespace: str, task_ids: list[str]) -> list[int]:
    client = redis.client()
    try:
        return [int(client.hget(f"{namespace}:task:{t}", "total_trials") or 0)
                for t in task_ids]
    finally:
        client.close()


@pytest.mark.parametrize("tls", [False, True], ids=["password", "password+tls"])
def test_redis_with_password_and_tls_through_the_settings(
    start_server: StartServer, certificate: Certificate, tmp_path, tls: bool,
) -> None:
    redis = RedisServer(tmp_path, password=REDIS_PASSWORD, tls=certificate if tls else None)
    redis.start()
    try:
        namespace = "hardening"
        server = start_server("--redis-url", redis.url, "--namespace", namespace,
                              "--log-level", "debug")
        prefix = unique("secure-redis")
        response = server.stub.ComputeAdvantages(history_request(prefix), timeout=30)
        assert all(g.success_rate_source == pb.SUCCESS_RATE_SOURCE_HISTORY
                   and not g.success_rate_fallback for g in response.groups)
        assert _stored_trials(redis, namespace, [f"{prefix}-0", f"{prefix}-1"]) == [4, 4]
        ready = httpx.get(f"{server.http_url}/readyz?verbose", timeout=5).json()
        store = next(c for c in ready["checks"] if c["name"] == "store")
        assert store["status"] == "ok"
        assert REDIS_PASSWORD not in server.logs() and REDIS_PASSWORD not in str(ready)

        if tls:
            return
        # A wrong password: the store is degraded, requests still succeed (batch fallback),
        # and neither password is printed.
        wrong_url = redis.url.replace(REDIS_PASSWORD, "wrong-pw-Zz")
        wrong = start_server("--redis-url", wrong_url, "--namespace", namespace)
        answer = wrong.stub.ComputeAdvantages(history_request(unique("wrong-pw")), timeout=30)
        assert all(g.success_rate_fallback for g in answer.groups)
        checks = httpx.get(f"{wrong.http_url}/readyz?verbose", timeout=5).json()["checks"]
        assert next(c for c in checks if c["name"] == "store")["status"] == "degraded"
        assert "wrong-pw-Zz" not in wrong.logs()
    finally:
        redis.kill()
