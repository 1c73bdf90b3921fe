"""THE composition root: settings -> registry, store, encoder, engine, gRPC server, REST app.

``main`` (console script ``proxmo-server``) resolves the settings, logs them (secrets masked)
and runs both servers on one event loop. Start-up: bind both ports with health NOT_SERVING,
warm up (encoder, then one dry-run batch through the engine), then SERVING / ``/readyz`` 200.
Compute worker processes (``compute_workers``) start and warm up before SERVING too.
SIGTERM or SIGINT: NOT_SERVING and ``/readyz`` 503 at once, stop accepting, let in-flight work
finish within ``grace_period_s``, close engine, store and encoder, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import proxmo
import uvicorn
from fastapi import FastAPI
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry
from proxmo.core.config import Similarity
from proxmo.engine import Engine, warmup_request
from proxmo.server.admission import Phase
from proxmo.server.auth import load_access_policy, load_tls
from proxmo.server.config import Settings, SettingsError, load_settings
from proxmo.server.connections import MAX_HEADER_BYTES, bounded_h11
from proxmo.server.grpc_service import build_grpc_server, set_serving
from proxmo.server.logging import configure_logging
from proxmo.server.metrics import ServerMetrics
from proxmo.server.rest import create_app
from proxmo.server.runtime import Runtime
from proxmo.store import SuccessRateStore, create_store

log = logging.getLogger("proxmo.server")

# What `--similarity auto` means when an encoder is loaded. The one switch between TF-IDF and
# the sentence encoder as the server default.
AUTO_SIMILARITY_WITH_ENCODER = Similarity.ENCODER
# After the drain: seconds left for calls that are not work (health Watch streams) to end.
_FINAL_GRACE_S = 0.5


@dataclass
class Service:
    """Everything ``build`` wired, ready to start. The engine (and the encoder behind it) is
    attached by ``load`` once the servers listen."""

    settings: Settings
    registry: CollectorRegistry
    store: SuccessRateStore
    runtime: Runtime
    grpc_server: grpc.aio.Server
    health: health.aio.HealthServicer
    app: FastAPI
    http_server: uvicorn.Server
    embedder: Any | None = None  # proxmo.encoder.Embedder
    engine: Engine | None = None


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the composition root owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def git_sha() -> str:
    """PROXMO_GIT_SHA (set by the image build), else ``git rev-parse HEAD`` (best effort)."""
    sha = os.environ.get("PROXMO_GIT_SHA", "")
    if sha:
        return sha
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=2, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def default_similarity(settings: Settings, encoder_loaded: bool) -> Similarity:
    """The similarity of presets that defer to the server (``proxmo``)."""
    if settings.similarity == "auto":
        return AUTO_SIMILARITY_WITH_ENCODER if encoder_loaded else Similarity.TFIDF
    chosen = Similarity[settings.similarity.upper()]
    if chosen is Similarity.ENCODER and not encoder_loaded:
        raise SettingsError("similarity: 'encoder' needs an encoder (encoder_backend is 'none' "
                            "or the encoder failed to load; see the log)")
    return chosen


async def create_encoder(settings: Settings, registry: CollectorRegistry) -> Any | None:
    """The sentence encoder, or None when disabled. A failure to load is fatal only when the
    encoder was asked for explicitly (``--similarity encoder``); otherwise the server runs on
    without it and says so."""
    if not settings.encoder_enabled:
        return None
    try:
        # Imported here: torch takes seconds to import, and `--encoder-backend none` skips it.
        from proxmo.encoder import EncoderSettings, create_embedder

        encoder_settings = EncoderSettings(
            model_path=settings.encoder_model,
            backend=settings.encoder_backend,
            dtype=settings.encoder_dtype,
            threads=settings.encoder_threads,
            max_batch_tokens=settings.encoder_max_batch_tokens,
            lru_size=settings.encoder_lru_size,
            redis_cache_url=settings.redis_url if settings.embedding_cache_redis else "",
            redis_cache_ttl_s=settings.embedding_cache_ttl_s,
            engine_cache_dir=settings.encoder_engine_cache_dir,
        )
        return await create_embedder(encoder_settings, registry=registry)
    except Exception:
        if settings.similarity == "encoder":
            raise
        log.exception("encoder unavailable; serving without ENCODER similarity")
        return None


async def build(settings: Settings) -> Service:
    """Wire the servers from the settings. Binds the gRPC port; starts nothing."""
    # Token file and TLS files are read first: a bad one stops the start (SettingsError).
    access = load_access_policy(settings)
    tls = load_tls(settings)
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    sha = git_sha()
    metrics.build.info({"version": proxmo.__version__, "git_sha": sha or "unknown"})
    store = create_store(
        settings.redis_url, namespace=settings.namespace, registry=registry,
        max_tasks=settings.store_max_tasks, cluster=settings.redis_cluster,
        request_ttl_seconds=settings.store_request_ttl_s,
        sentinels=[a for a in settings.redis_sentinels.split(",") if a.strip()],
        sentinel_master=settings.redis_sentinel_master,
        wait_replicas=settings.redis_wait_replicas,
        wait_timeout_s=settings.redis_wait_timeout_s,
    )
    runtime = Runtime(settings=settings, store=store, metrics=metrics, git_sha=sha)
    grpc_server, health_servicer = await build_grpc_server(runtime, access=access, tls=tls)
    app = create_app(runtime, registry, access=access)
    http_server = _EmbeddedUvicorn(uvicorn.Config(
        app, host=settings.host, port=settings.http_port, log_config=None, lifespan="off",
        timeout_graceful_shutdown=max(1, round(settings.grace_period_s)),
        http=bounded_h11(settings.http_max_connections, settings.http_header_timeout_s),
        timeout_keep_alive=settings.http_keepalive_timeout_s,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        ssl_certfile=tls.cert_path if tls else None, ssl_keyfile=tls.key_path if tls else None,
    ))
    return Service(settings, registry, store, runtime, grpc_server, health_servicer, app,
                   http_server)


async def load(service: Service) -> None:
    """Load the encoder (when enabled), choose the default similarity, build the Engine."""
    settings = service.settings
    service.embedder = await create_encoder(settings, service.registry)
    similarity = default_similarity(settings, service.embedder is not None)
    service.runtime.metrics.default_similarity.info({"similarity": similarity.name})
    service.engine = Engine(
        store=service.store,
        embedder=service.embedder,
        default_similarity=similarity,
        limits=settings.limits,
        registry=service.registry,
        compute_threads=settings.compute_threads,
        compute_workers=settings.compute_worker_count,
    )
    service.runtime.attach(service.engine, service.embedder)
    encoder = service.runtime.encoder_info()
    log.info("compute: %s", f"{settings.compute_worker_count} worker processes"
             if settings.compute_worker_count else "in-process threads",
             extra={"compute_workers": settings.compute_worker_count})
    log.info("default similarity: %s", similarity.name,
             extra={"encoder_backend": encoder.backend, "encoder_device": encoder.device,
                    "encoder_dtype": encoder.dtype})


async def warm_up(service: Service) -> None:
    """Compute workers and encoder first, then one dry-run batch through the engine."""
    started = time.monotonic()
    await service.runtime.engine.start()
    if service.embedder is not None:
        await service.embedder.warmup()
    await service.runtime.engine.compute(warmup_request())
    log.info("warm-up done", extra={"ms": round((time.monotonic() - started) * 1000, 1)})


async def _close(service: Service) -> None:
    if service.engine is not None:
        await asyncio.to_thread(service.engine.close)
    await service.store.close()
    if service.embedder is not None:
        await service.embedder.close()


async def run(settings: Settings, *, started: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain; returns the exit status (0 after a clean
    drain). ``started`` (tests, embedding) is set once the server is SERVING."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    service = await build(settings)
    runtime = service.runtime
    await service.grpc_server.start()
    http_task = asyncio.create_task(service.http_server.serve(), name="uvicorn")
    while not service.http_server.started:
        if http_task.done():  # uvicorn failed to bind (it logged why)
            await service.grpc_server.stop(None)
            await _close(service)
            return 1
        await asyncio.sleep(0.01)
    log.info("listening", extra={"grpc": f"{settings.host}:{settings.grpc_port}",
                                 "http": f"{settings.host}:{settings.http_port}"})

    status = 0
    try:
        await load(service)
        await warm_up(service)
    except Exception:
        log.exception("start-up failed")
        stop.set()
        status = 1
    else:
        runtime.lifecycle.phase = Phase.SERVING
        await set_serving(service.health)
        log.info("ready: SERVING")
        if started is not None:
            started.set()

    stopped_by = await _first_of(stop.wait(), http_task)
    log.info("draining (%s): in-flight work has %.1f s", stopped_by, settings.grace_period_s)
    # New work is refused (UNAVAILABLE / 503) from here on; work already admitted finishes.
    runtime.lifecycle.phase = Phase.DRAINING
    await service.health.enter_graceful_shutdown()
    service.http_server.should_exit = True
    if not await runtime.wait_idle(settings.grace_period_s):
        log.warning("grace period over: cancelling the calls still in progress")
    # Only long-lived calls that are not work (health Watch streams) remain: end them now
    # instead of letting them hold the exit for the whole grace period.
    await asyncio.gather(service.grpc_server.stop(_FINAL_GRACE_S), http_task,
                         return_exceptions=True)
    await _close(service)
    log.info("stopped")
    return status


async def _first_of(stop_wait: Any, http_task: asyncio.Task[None]) -> str:
    """Wait for a stop signal, or for the REST server to end on its own; say which."""
    signal_task = asyncio.create_task(stop_wait)
    done, _ = await asyncio.wait({signal_task, http_task}, return_when=asyncio.FIRST_COMPLETED)
    if signal_task in done:
        return "stop signal"
    signal_task.cancel()
    return "REST server stopped"


def main(argv: Sequence[str] | None = None) -> int:
    """``proxmo-server``: resolve settings, log them, serve."""
    try:
        settings = load_settings(argv)
    except SettingsError as error:
        print(f"proxmo-server: error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    if settings.log_format == "json":
        log.info("settings", extra={"settings": settings.masked()})
    else:
        log.info("settings:\n%s", settings.describe())
    try:
        return asyncio.run(run(settings))
    except SettingsError as error:
        log.error("%s", error)
        return 2
    except OSError as error:
        log.error("cannot start: %s", error)
        return 1
