"""Server settings: defaults < config file < ``PROXMO_*`` environment < command-line flags.

Every setting (a field of :class:`Settings`, or of the per-request :class:`proxmo.limits.Limits`
it holds) has one environment twin (``PROXMO_`` + the field name in upper case) and one flag
(``--`` + the field name with dashes). The optional config file (``--config``
or ``PROXMO_CONFIG``) is YAML (``.yaml``/``.yml``) or TOML (``.toml``) with the field names as
keys. Secrets are masked whenever the settings are printed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib
import yaml
from proxmo.core.batch import ValidationError
from proxmo.limits import Limits
from proxmo.secrets import MASK, mask_url
from proxmo.store.base import validate_namespace

ENV_PREFIX = "PROXMO_"

SIMILARITY_CHOICES = ("auto", "tfidf", "encoder", "exact")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
# "none" is the server's own switch: do not load an encoder at all (ENCODER similarity is then
# unavailable). The other values are handed to the encoder package.
ENCODER_BACKENDS = ("auto", "tensorrt", "torch-cuda", "torch-cpu", "none")


class SettingsError(ValueError):
    """A setting has a bad value; the message names the setting and where it came from."""


@dataclass(frozen=True)
class Settings:
    """Everything the composition root needs. Field docs become the ``--help`` text."""

    host: str = field(default="0.0.0.0", metadata={"help": "address both servers bind"})
    grpc_port: int = field(default=50051, metadata={"help": "gRPC port"})
    http_port: int = field(default=8000, metadata={"help": "REST (operators) port"})
    redis_url: str = field(
        default="", metadata={"help": "success-rate store; empty: in-memory store", "secret": True}
    )
    namespace: str = field(default="proxmo", metadata={"help": "success-rate key prefix"})
    redis_cluster: bool = field(
        default=False, metadata={"help": "the store is a Redis Cluster; redis_url names any node"}
    )
    redis_sentinels: str = field(
        default="", metadata={"help": "Sentinel addresses host:port,...: the store is the "
                              "primary they manage (redis_url then only gives password and db)"}
    )
    redis_sentinel_master: str = field(
        default="", metadata={"help": "the Sentinel master name (with redis_sentinels)"}
    )
    redis_wait_replicas: int = field(
        default=0, metadata={"help": "acknowledge an update only once this many replicas have "
                             "it (Redis WAIT); 0: on the primary's word"}
    )
    redis_wait_timeout_s: float = field(
        default=1.0, metadata={"help": "how long WAIT waits for redis_wait_replicas, seconds"}
    )
    store_max_tasks: int = field(
        default=1_000_000, metadata={"help": "stored tasks per namespace; new tasks past it are "
                                     "refused (RESOURCE_EXHAUSTED); 0: no cap"}
    )
    store_request_ttl_s: int = field(
        default=86400, metadata={"help": "how long a request id is remembered for idempotency "
                                 "(retries later than this count again), seconds"}
    )
    similarity: str = field(
        default="auto",
        metadata={"help": "server default similarity: auto (encoder when loaded, else tfidf), "
                  "tfidf, encoder, exact", "choices": SIMILARITY_CHOICES},
    )
    max_concurrency: int = field(
        default=32, metadata={"help": "concurrent requests before RESOURCE_EXHAUSTED"}
    )
    stream_inflight: int = field(
        default=4, metadata={"help": "requests computed at once per StreamAdvantages stream"}
    )
    # The per-request limits: each field of proxmo.limits.Limits is a setting of its own (flag,
    # environment variable, config key) listed here, under its own name.
    limits: Limits = field(default_factory=Limits)
    http_max_connections: int = field(
        default=256, metadata={"help": "open REST connections; more are closed at once"}
    )
    http_header_timeout_s: float = field(
        default=10.0, metadata={"help": "seconds a REST connection may take to send a request's "
                                "headers before it is closed"}
    )
    http_keepalive_timeout_s: int = field(
        default=5, metadata={"help": "seconds an idle REST keep-alive connection stays open"}
    )
    grpc_max_concurrent_streams: int = field(
        default=64, metadata={"help": "concurrent calls per gRPC connection (HTTP/2 streams)"}
    )
    grpc_max_connection_idle_s: int = field(
        default=1800, metadata={"help": "seconds a gRPC connection without calls stays open "
                                "(GOAWAY after; clients reconnect on their own)"}
    )
    grace_period_s: float = field(
        default=20.0, metadata={"help": "seconds in-flight work may take after SIGTERM"}
    )
    log_format: str = field(
        default="text", metadata={"help": "text or json", "choices": LOG_FORMATS}
    )
    log_level: str = field(default="info", metadata={"help": "log level", "choices": LOG_LEVELS})
    compute_threads: int = field(
        default=0, metadata={"help": "compute threads when compute_workers is 0; 0: one per "
                             "CPU core"}
    )
    compute_workers: str = field(
        default="auto", metadata={"help": "compute worker processes (validation, TF-IDF, "
                                  "estimator): auto (one per usable CPU core), N, or 0 (threads "
                                  "in the server process)"}
    )
    encoder_model: str = field(
        default="", metadata={"help": "encoder model directory; empty: the packaged MiniLM"}
    )
    encoder_backend: str = field(
        default="auto",
        metadata={"help": "auto, tensorrt, torch-cuda, torch-cpu, or none (no encoder)",
                  "choices": ENCODER_BACKENDS},
    )
    encoder_dtype: str = field(
        default="auto", metadata={"help": "auto, float16, bfloat16, float32"}
    )
    encoder_threads: int = field(
        default=0, metadata={"help": "CPU threads of the encoder; 0: auto"}
    )
    encoder_max_batch_tokens: int = field(
        default=16384, metadata={"help": "token budget of one encoder batch"}
    )
    encoder_lru_size: int = field(default=100000, metadata={"help": "in-process embedding cache"})
    embedding_cache_redis: bool = field(
        default=False, metadata={"help": "also cache embeddings in Redis (at --redis-url)"}
    )
    embedding_cache_ttl_s: int = field(
        default=604800, metadata={"help": "TTL of Redis-cached embeddings, seconds"}
    )
    encoder_engine_cache_dir: str = field(
        default="~/.cache/proxmo/trt", metadata={"help": "TensorRT engine cache directory"}
    )
    auth_token: str = field(
        default="",
        metadata={"help": "bearer token every call must carry (authorization: Bearer <token>); "
                  "empty: no auth", "secret": True},
    )
    auth_token_file: str = field(
        default="", metadata={"help": "file holding the auth token (exclusive with auth_token)"}
    )
    admin_token: str = field(
        default="",
        metadata={"help": "bearer token of the destructive calls (ResetSuccessRates, DELETE "
                  "/v1/tasks); with auth on and no admin token they are refused", "secret": True},
    )
    metrics_token: str = field(
        default="",
        metadata={"help": "a second bearer token that opens /metrics only (scrapers)",
                  "secret": True},
    )
    tls_cert: str = field(
        default="", metadata={"help": "PEM certificate chain: serve gRPC and HTTP over TLS"}
    )
    tls_key: str = field(default="", metadata={"help": "PEM private key of tls_cert"})

    def __post_init__(self) -> None:
        _check(self)

    @property
    def encoder_enabled(self) -> bool:
        return self.encoder_backend != "none"

    @property
    def compute_worker_count(self) -> int:
        """``compute_workers`` as a number: ``auto`` is the CPU cores this process may use."""
        if self.compute_workers == "auto":
            return len(os.sched_getaffinity(0))
        return int(self.compute_workers)

    def value(self, name: str) -> Any:
        """The setting ``name`` (a limit's too)."""
        return getattr(self.limits if name in _LIMIT_NAMES else self, name)

    def describe(self) -> str:
        """One ``name = value`` line per setting, secrets masked (passwords inside URLs too)."""
        width = max(len(f.name) for f in setting_fields())
        return "\n".join(f"  {name:<{width}} = {shown!r}"
                         for name, shown in self.masked().items())

    def masked(self) -> dict[str, Any]:
        """The settings as a dict, secrets masked (for JSON logs)."""
        return {
            f.name: mask_secret(self.value(f.name)) if f.metadata.get("secret")
            else self.value(f.name)
            for f in setting_fields()
        }


_LIMIT_NAMES = tuple(f.name for f in fields(Limits))


def setting_fields() -> list[Field[Any]]:
    """Every setting, in ``--help`` order: the fields of Settings, with ``limits`` spelled out as
    the fields of Limits."""
    return [limit for f in fields(Settings)
            for limit in (fields(Limits) if f.name == "limits" else (f,))]


def mask_secret(value: Any) -> str:
    """Mask a secret: a URL's password and secret query values (``redis://u:***@h``,
    ``?password=***``), or the whole value."""
    text = str(value)
    if not text:
        return ""
    if "://" in text:
        return mask_url(text)
    return MASK


def _check(s: Settings) -> None:
    for name in ("grpc_port", "http_port"):
        port = getattr(s, name)
        if not 0 < port < 65536:
            raise SettingsError(f"{name}: must be in 1..65535, got {port}")
    for name in ("max_concurrency", "stream_inflight", *_LIMIT_NAMES,
                 "encoder_max_batch_tokens", "http_max_connections", "http_keepalive_timeout_s",
                 "grpc_max_concurrent_streams", "grpc_max_connection_idle_s"):
        if s.value(name) < 1:
            raise SettingsError(f"{name}: must be >= 1, got {s.value(name)}")
    for name in ("compute_threads", "encoder_threads", "encoder_lru_size", "embedding_cache_ttl_s"):
        if getattr(s, name) < 0:
            raise SettingsError(f"{name}: must be >= 0, got {getattr(s, name)}")
    if s.compute_workers != "auto" and not (
        s.compute_workers.isdigit() and s.compute_workers.isascii()
    ):
        raise SettingsError(
            f"compute_workers: must be auto or an integer >= 0, got {s.compute_workers!r}"
        )
    if s.http_header_timeout_s <= 0:
        raise SettingsError(f"http_header_timeout_s: must be > 0, got {s.http_header_timeout_s}")
    try:
        validate_namespace(s.namespace)
    except ValidationError as error:
        raise SettingsError(str(error)) from None
    if s.grace_period_s < 0:
        raise SettingsError(f"grace_period_s: must be >= 0, got {s.grace_period_s}")
    for f in setting_fields():
        choices = f.metadata.get("choices")
        if choices and s.value(f.name) not in choices:
            raise SettingsError(
                f"{f.name}: must be one of {', '.join(choices)}, got {s.value(f.name)!r}"
            )
    if s.embedding_cache_redis and not s.redis_url:
        raise SettingsError("embedding_cache_redis: needs redis_url")
    _check_redis_topology(s)
    if s.auth_token and s.auth_token_file:
        raise SettingsError("auth_token_file: exclusive with auth_token; give one")
    if s.admin_token and not (s.auth_token or s.auth_token_file):
        raise SettingsError("admin_token: needs auth_token (without it every call is open)")
    if s.metrics_token and not (s.auth_token or s.auth_token_file):
        raise SettingsError("metrics_token: needs auth_token (without it /metrics is open)")
    if bool(s.tls_cert) != bool(s.tls_key):
        raise SettingsError("tls_key: tls_cert and tls_key go together; give both or neither")


def _check_redis_topology(s: Settings) -> None:
    for name in ("redis_wait_replicas", "store_max_tasks"):
        if getattr(s, name) < 0:
            raise SettingsError(f"{name}: must be >= 0, got {getattr(s, name)}")
    if s.store_request_ttl_s < 1:
        raise SettingsError(f"store_request_ttl_s: must be >= 1, got {s.store_request_ttl_s}")
    if s.redis_wait_timeout_s <= 0:
        raise SettingsError(f"redis_wait_timeout_s: must be > 0, got {s.redis_wait_timeout_s}")
    if s.redis_cluster and not s.redis_url:
        raise SettingsError("redis_cluster: needs redis_url (any node of the cluster)")
    if s.redis_cluster and s.redis_sentinels:
        raise SettingsError("redis_sentinels: exclusive with redis_cluster; give one")
    if s.redis_sentinels and not s.redis_sentinel_master:
        raise SettingsError("redis_sentinel_master: needed with redis_sentinels")
    for address in filter(None, s.redis_sentinels.split(",")):
        host, _, port = address.strip().rpartition(":")
        if not host or not port.isdigit():
            raise SettingsError(f"redis_sentinels: each must be host:port, got {address!r}")
    if s.redis_wait_replicas and s.redis_cluster:
        raise SettingsError("redis_wait_replicas: needs a standalone or Sentinel-managed Redis")
    if s.redis_wait_replicas and not (s.redis_url or s.redis_sentinels):
        raise SettingsError("redis_wait_replicas: needs redis_url or redis_sentinels")
    if s.embedding_cache_redis and (s.redis_cluster or s.redis_sentinels):
        raise SettingsError("embedding_cache_redis: needs a standalone redis_url")


def _field_types() -> dict[str, type]:
    kinds = {"int": int, "float": float, "bool": bool, "str": str}
    return {f.name: kinds[str(f.type)] for f in setting_fields()}


def _coerce(name: str, raw: Any, source: str) -> Any:
    kind = _field_types()[name]
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if kind is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}: expected {kind.__name__}, got {raw!r} (from {source})") \
            from None


def _read_file(path: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as e:
        raise SettingsError(f"config: cannot read {p}: {e.strerror}") from None
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        # Only where and what, never the parser's quote of the line: it may hold a secret.
        raise SettingsError(f"config: {p} is not valid {p.suffix or 'YAML'}: "
                            f"{_parse_error_position(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config: {p} must hold a mapping of setting names to values")
    known = _field_types()
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise SettingsError(f"config: unknown setting {key!r} in {p}")
        out[name] = _coerce(name, value, str(p))
    return out


def _parse_error_position(error: Exception) -> str:
    """``line L, column C`` (and the parser's problem, which quotes no value) of a YAML or TOML
    syntax error."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"{error.problem or 'syntax error'} at line {mark.line + 1}, column " \
               f"{mark.column + 1}"
    if isinstance(error, tomllib.TOMLDecodeError):
        # tomllib's message is "<problem> (at line L, column C)" and quotes no value.
        return str(error).split("\n", 1)[0][:200]
    return "syntax error"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxmo-server",
        description="proxmo credit-assignment server: gRPC + REST in one process. Every flag has "
        "an environment twin PROXMO_<NAME> (e.g. --grpc-port / PROXMO_GRPC_PORT).",
    )
    parser.add_argument("--config", default=None, help="YAML or TOML file (env PROXMO_CONFIG)")
    for f in setting_fields():
        flag = "--" + f.name.replace("_", "-")
        kind = _field_types()[f.name]
        help_text = f"{f.metadata.get('help', '')} (default {f.default!r}; env {ENV_PREFIX}" \
            f"{f.name.upper()})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, type=str, help=help_text,
                                metavar=kind.__name__.upper())
    return parser


def load_settings(argv: Sequence[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Resolve the settings: defaults < config file < PROXMO_* environment < flags."""
    env = os.environ if environ is None else environ
    args = _parser().parse_args(argv)
    values: dict[str, Any] = {}
    config_path = args.config or env.get(ENV_PREFIX + "CONFIG", "")
    if config_path:
        values.update(_read_file(config_path))
    for name in _field_types():
        key = ENV_PREFIX + name.upper()
        if key in env:
            values[name] = _coerce(name, env[key], key)
    for name in _field_types():
        raw = getattr(args, name)
        if raw is not None:
            values[name] = _coerce(name, raw, "--" + name.replace("_", "-"))
    limits = Limits(**{name: values.pop(name) for name in _LIMIT_NAMES if name in values})
    return Settings(**values, limits=limits)

