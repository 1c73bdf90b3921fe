"""Auth and TLS settings, in process: each bad value is refused naming the setting and never
showing the secret; the token check is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
from proxmo.server.auth import AccessPolicy, bearer_token, load_access_policy, load_tls
from proxmo.server.config import Settings, SettingsError, load_settings

from hardening.conftest import Certificate, make_certificate

TOKEN = "unit-tok-8Kq2"


def settings(*argv: str, **env: str) -> Settings:
    return load_settings(list(argv), environ=env)


def test_token_sources_and_precedence(tmp_path: Path) -> None:
    assert not load_access_policy(settings()).enabled
    from_env = load_access_policy(settings(PROXMO_AUTH_TOKEN=TOKEN))
    assert from_env.allows(f"Bearer {TOKEN}") and not from_env.allows("Bearer other")
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    from_file = load_access_policy(settings("--auth-token-file", str(token_file)))
    assert from_file == from_env  # the same digest, whitespace around the file's token dropped
    # The flag wins over the environment (the server's general precedence).
    flag = load_access_policy(settings("--auth-token", "flag-tok", PROXMO_AUTH_TOKEN=TOKEN))
    assert flag.allows("Bearer flag-tok") and not flag.allows(f"Bearer {TOKEN}")


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("", None), ("Bearer", None), ("Bearer ", None), (TOKEN, None),
    (f"Basic {TOKEN}", None), (f"Bearer {TOKEN}", TOKEN), (f"bearer  {TOKEN} ", TOKEN),
    (f"BEARER {TOKEN}", TOKEN),
])
def test_bearer_parsing(header: str | None, expected: str | None) -> None:
    assert bearer_token(header) == expected


def test_policy_is_exact_and_the_metrics_token_opens_only_metrics() -> None:
    policy = load_access_policy(settings("--auth-token", TOKEN, "--metrics-token", "m-tok"))
    assert policy.allows(f"Bearer {TOKEN}")
    for other in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer m-tok", None):
        assert not policy.allows(other)
    assert policy.allows_metrics("Bearer m-tok") and policy.allows_metrics(f"Bearer {TOKEN}")
    assert not policy.allows_metrics("Bearer nope")
    assert AccessPolicy().allows(None)  # auth off: everything allowed
    # Only digests are kept: the token itself is not an attribute of the policy.
    assert TOKEN not in repr(policy)


@pytest.mark.parametrize(("argv", "env", "named"), [
    (["--auth-token", TOKEN, "--auth-token-file", "/etc/hostname"], {}, "auth_token_file"),
    (["--metrics-token", "m"], {}, "metrics_token"),
    (["--tls-cert", "/x.crt"], {}, "tls_key"),
    (["--tls-key", "/x.key"], {}, "tls_key"),
])
def test_inconsistent_settings(argv: list[str], env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=f"^{named}: "):
        settings(*argv, **env)


@pytest.mark.parametrize("bad", ["has space", "tab\there", "ünïcode", "line\nbreak"])
def test_unsendable_tokens_are_refused_without_showing_them(bad: str) -> None:
    with pytest.raises(SettingsError, match="^auth_token: ") as caught:
        load_access_policy(settings(PROXMO_AUTH_TOKEN=bad))
    assert bad not in str(caught.value)


def test_token_file_problems(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="^auth_token_file: cannot read"):
        load_access_policy(settings("--auth-token-file", str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SettingsError, match=r"^auth_token_file \(.*\): is empty"):
        load_access_policy(settings("--auth-token-file", str(empty)))


def test_tls_files(tmp_path: Path) -> None:
    cert: Certificate = make_certificate(tmp_path, "a")
    other = make_certificate(tmp_path, "b")
    tls = load_tls(settings("--tls-cert", str(cert.cert), "--tls-key", str(cert.key)))
    assert tls is not None and tls.cert_pem == cert.cert.read_bytes()
    assert tls.grpc_credentials() is not None
    assert load_tls(settings()) is None
    junk = tmp_path / "junk"
    junk.write_text("junk")
    cases = [
        ((str(cert.cert), str(other.key)), "^tls_key: does not match"),
        ((str(junk), str(cert.key)), "^tls_cert: .* is not PEM"),
        ((str(cert.cert), str(tmp_path / "missing")), "^tls_key: cannot read"),
    ]
    for (cert_path, key_path), message in cases:
        with pytest.raises(SettingsError, match=message):
            load_tls(settings("--tls-cert", cert_path, "--tls-key", key_path))


def test_secrets_are_masked_when_settings_are_printed() -> None:
    s = settings("--auth-token", TOKEN, "--metrics-token", "m-tok-123",
                 "--redis-url", "rediss://:pw-456@redis:6380/0?ssl_ca_certs=/ca.pem")
    for text in (s.describe(), str(s.masked())):
        assert TOKEN not in text and "m-tok-123" not in text and "pw-456" not in text
