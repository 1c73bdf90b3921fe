"""Settings: defaults < file < PROXMO_* environment < flags; bad values name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from proxmo.server.config import Settings, SettingsError, load_settings, mask_secret


def test_embedded_defaults_serve_a_bare_machine() -> None:
    s = load_settings([], {})
    assert (s.host, s.grpc_port, s.http_port) == ("0.0.0.0", 50051, 8000)
    assert s.redis_url == ""  # in-memory store
    assert s.similarity == "auto" and s.encoder_backend == "auto"
    assert s.limits.max_message_bytes == 64 * 1024 * 1024
    assert s.grace_period_s == 20.0


def test_precedence_file_env_flag(tmp_path: Path) -> None:
    config = tmp_path / "proxmo.yaml"
    config.write_text(
        "grpc_port: 1111\nhttp-port: 2222\nnamespace: from-file\nmax_concurrency: 7\n"
    )
    env = {"PROXMO_CONFIG": str(config), "PROXMO_HTTP_PORT": "3333", "PROXMO_NAMESPACE": "env"}
    s = load_settings(["--namespace", "flag"], env)
    assert s.grpc_port == 1111  # file only
    assert s.http_port == 3333  # env beats file
    assert s.namespace == "flag"  # flag beats env
    assert s.max_concurrency == 7


def test_toml_file_and_bool_flags(tmp_path: Path) -> None:
    config = tmp_path / "proxmo.toml"
    config.write_text('redis_url = "redis://localhost:6379/0"\nembedding_cache_redis = true\n')
    s = load_settings(["--config", str(config)], {})
    assert s.embedding_cache_redis is True
    s = load_settings(["--config", str(config), "--no-embedding-cache-redis"], {})
    assert s.embedding_cache_redis is False


@pytest.mark.parametrize(
    ("argv", "env", "field"),
    [
        (["--grpc-port", "70000"], {}, "grpc_port"),
        ([], {"PROXMO_MAX_CONCURRENCY": "many"}, "max_concurrency"),
        (["--max-concurrency", "0"], {}, "max_concurrency"),
        (["--log-format", "xml"], {}, "log_format"),
        (["--similarity", "bm25"], {}, "similarity"),
        ([], {"PROXMO_EMBEDDING_CACHE_REDIS": "maybe"}, "embedding_cache_redis"),
        (["--embedding-cache-redis"], {}, "embedding_cache_redis"),
        (["--grace-period-s", "-1"], {}, "grace_period_s"),
    ],
)
def test_bad_values_name_the_setting(argv: list[str], env: dict[str, str], field: str) -> None:
    with pytest.raises(SettingsError, match=f"^{field}: "):
        load_settings(argv, env)


def test_unknown_file_key_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("grpc_prot: 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'grpc_prot'"):
        load_settings(["--config", str(config)], {})


def test_describe_masks_secrets() -> None:
    s = Settings(redis_url="redis://user:hunter2@redis:6379/0", auth_token="s3cret")
    text = s.describe()
    assert "hunter2" not in text and "s3cret" not in text
    assert "redis://user:***@redis:6379/0" in text
    assert "auth_token" in text and "'***'" in text
    assert s.masked()["auth_token"] == "***"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("rediss://u:p@w@h", "rediss://u:***@h"),
        ("redis://h:6379", "redis://h:6379"),
        ("token", "***"),
        ("", ""),
    ],
)
def test_mask_secret(value: str, shown: str) -> None:
    assert mask_secret(value) == shown


def test_each_limit_is_one_setting_and_one_server_info_field() -> None:
    """A limit is defined once (proxmo.limits.Limits): that makes it a setting of its own name
    (flag, environment, file) and a field of GetServerInfo's limits."""
    from dataclasses import fields

    from proxmo.limits import Limits
    from proxmo.server.runtime import limits_to_proto
    from proxmo_client.v1 import proxmo_pb2 as pb

    names = [f.name for f in fields(Limits)]
    assert {f.name for f in pb.Limits.DESCRIPTOR.fields} == {*names, "max_concurrency"}
    flags = [arg for name in names for arg in (f"--{name.replace('_', '-')}", "7")]
    assert load_settings(flags, {}).limits == Limits(**dict.fromkeys(names, 7))
    env = {f"PROXMO_{name.upper()}": "8" for name in names}
    assert load_settings([], env).limits == Limits(**dict.fromkeys(names, 8))
    proto = limits_to_proto(Limits(**dict.fromkeys(names, 9)), max_concurrency=3)
    assert proto == pb.Limits(max_concurrency=3, **dict.fromkeys(names, 9))
