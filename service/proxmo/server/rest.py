"""The REST front door (FastAPI) for operators and quick use, over the same ``Runtime``.

Bodies use the proto3 JSON mapping, exactly as the ``proxmo compute`` CLI reads and writes it.
Errors are ``{"error": {"code": <gRPC code name>, "message": ..., "field": ...}}`` with the HTTP
status the error names (422 bad input, 413 over a limit, 429 overloaded, 503 not ready, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

import proxmo
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from google.protobuf import json_format
from google.protobuf.message import Message
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from proxmo.core.batch import cut
from proxmo.errors import ClientGone, InvalidArgument, LimitExceeded
from proxmo.limits import Limits
from proxmo.proto import pb
from proxmo.server.auth import AccessPolicy, HttpBearerAuth, refusal_recorder
from proxmo.server.prescan import check_json_counts
from proxmo.server.runtime import Runtime, new_request_id
from proxmo.server.status import ErrorStatus, classify

TRANSPORT = "http"
_JSON = "application/json"


def _to_json(message: Message) -> str:
    """A message as the CLI prints it: proto3 JSON, camelCase, every field printed."""
    return json_format.MessageToJson(message, indent=None,
                                     always_print_fields_with_no_presence=True)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413, RESOURCE_EXHAUSTED) past ``limit`` bytes without reading on."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise LimitExceeded("body", f"{declared} bytes exceed the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise LimitExceeded("body", f"more than {limit} bytes (the limit)")
        chunks.append(chunk)
    return b"".join(chunks)


T = TypeVar("T")


async def _unless_disconnected(request: Request, call: Awaitable[T]) -> T:
    """``call``'s result, or ClientGone once the client disconnects: the call is cancelled
    then, which stops its compute worker (the work would be answered to nobody)."""
    work = asyncio.ensure_future(call)

    async def disconnected() -> None:
        # The body has been read: the next ASGI message is the disconnect (or never comes).
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.create_task(disconnected())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
    if work.cancelled() or not work.done():
        with contextlib.suppress(asyncio.CancelledError):
            await work
        raise ClientGone()
    return work.result()


# A client's request id may hold any unicode (or a line break): percent-encode everything but
# visible ASCII so that echoing it in a header can neither fail (latin-1) nor inject a header.
_HEADER_SAFE = "".join(chr(c) for c in range(33, 127) if chr(c) != "%")


def header_value(text: str) -> str:
    """``text`` as a header value: visible ASCII kept, the rest percent-encoded (UTF-8)."""
    return quote(text, safe=_HEADER_SAFE)


def _error_response(status: ErrorStatus, request_id: str) -> JSONResponse:
    return JSONResponse(status.body(request_id), status_code=status.http_status,
                        headers={"x-request-id": header_value(request_id)})


M = TypeVar("M", bound=Message)


def _parse_request(body: bytes, request: M, limits: Limits) -> M:
    """``body`` (proto3 JSON) parsed into ``request``; LimitExceeded when it holds more than
    ``limits`` allow (counted before parsing), InvalidArgument("body") when it is not one."""
    check_json_counts(body, type(request), limits)
    try:
        json_format.Parse(body, request)
    except json_format.ParseError as error:
        name = request.DESCRIPTOR.name
        raise InvalidArgument("body", f"not a {name}: {cut(str(error), 256)}") from None
    except UnicodeDecodeError:
        raise InvalidArgument("body", "not UTF-8 JSON") from None
    except RecursionError:
        raise InvalidArgument("body", "JSON nested too deeply") from None
    return request


# --- OpenAPI: the bodies FastAPI cannot see (the routes read the raw body themselves) --------


def _json_body(description: str, example: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` of a route whose body is a proto3 JSON message."""
    return {"requestBody": {"required": True, "description": description,
                            "content": {_JSON: {"schema": {"type": "object"},
                                                "example": example}}}}


_ADVANTAGES_BODY = _json_body(
    "A proxmo.v1.ComputeAdvantagesRequest in the proto3 JSON mapping (the `proxmo compute` "
    "input).",
    {
        "requestId": "b7c1...",
        "trajectories": [
            {"trajectoryId": "t0", "groupId": "g0", "steps": [
                {"state": "You are in the kitchen.", "reward": 0.0},
                {"state": "You see a mug.", "reward": 1.0}]},
            {"trajectoryId": "t1", "groupId": "g0", "steps": [
                {"state": "You are in the kitchen.", "reward": 0.0}]},
        ],
        "config": {"preset": "proxmo"},
    },
)
_PREFETCH_BODY = _json_body(
    "A proxmo.v1.PrefetchStatesRequest in the proto3 JSON mapping.",
    {"states": ["You are in the kitchen.", "You see a mug."], "wait": False},
)


# --- answering one call --------------------------------------------------------------------


def _refused(runtime: Runtime, rpc: str, started: float, request_id: str,
             exc: Exception) -> JSONResponse:
    """The error answer for ``exc``, counted and logged."""
    status = classify(exc, request_id)
    runtime.finish(transport=TRANSPORT, rpc=rpc, started=started, request_id=request_id,
                   error=status, exc=exc)
    return _error_response(status, request_id)


async def _serve(runtime: Runtime, rpc: str, request_id: str,
                 call: Callable[[], Awaitable[Message]]) -> Response:
    """Run one call as a service call: count, time and log it; answer its message as proto3
    JSON, or its error as the error body."""
    started = time.monotonic()
    try:
        with runtime.call():
            message = await call()
    except Exception as exc:
        return _refused(runtime, rpc, started, request_id, exc)
    computed = message if isinstance(message, pb.ComputeAdvantagesResponse) else None
    runtime.finish(transport=TRANSPORT, rpc=rpc, started=started, request_id=request_id,
                   response=computed)
    if computed is not None:  # a large response takes milliseconds to print: off the loop
        text = await asyncio.to_thread(_to_json, computed)
    else:
        text = _to_json(message)
    return Response(content=text, media_type=_JSON,
                    headers={"x-request-id": header_value(request_id)})


# --- the app -------------------------------------------------------------------------------


def create_app(runtime: Runtime, registry: CollectorRegistry, *,
               access: AccessPolicy | None = None) -> FastAPI:
    """The FastAPI app; OpenAPI docs at /docs. With ``access`` enabled every call but the
    probes and the docs needs the bearer token (``proxmo.server.auth``)."""
    app = FastAPI(
        title="proxmo",
        version=proxmo.__version__,
        description="Credit assignment for multi-turn agent RL. Trainers use gRPC "
        "(proxmo.v1.CreditAssignmentService); this REST side serves operators and quick use.",
    )
    if access is not None and access.enabled:
        app.add_middleware(HttpBearerAuth, policy=access, on_refused=refusal_recorder(runtime))
    app.exception_handler(RequestValidationError)(_bad_parameter)
    _add_health_routes(app, runtime, registry)
    _add_advantages_routes(app, runtime)
    _add_success_rate_routes(app, runtime)
    _add_info_route(app, runtime)
    return app


async def _bad_parameter(_: Request, exc: RequestValidationError) -> JSONResponse:
    """A query or path parameter FastAPI refused: the error body, as InvalidArgument."""
    first = exc.errors()[0] if exc.errors() else {}
    field = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
    status = classify(InvalidArgument(field, str(first.get("msg", "invalid"))), "")
    return _error_response(status, new_request_id())


def _add_health_routes(app: FastAPI, runtime: Runtime, registry: CollectorRegistry) -> None:
    @app.get("/livez", tags=["health"], summary="Liveness: the process and its loop answer")
    @app.get("/healthz", tags=["health"], summary="Alias of /livez")
    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"],
             summary="Readiness: warm and not draining (503 otherwise); ?verbose lists checks")
    async def readyz(verbose: Annotated[str | None, Query()] = None) -> JSONResponse:
        checks = await runtime.checks()
        ready = all(c.ok for c in checks)
        body: dict[str, Any] = {"status": "ready" if ready else "not ready",
                                "phase": runtime.lifecycle.phase.value}
        if verbose is not None:
            body["checks"] = [
                {"name": c.name, "ok": c.ok, "status": c.status, "detail": c.detail}
                for c in checks
            ]
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (text format)")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _add_advantages_routes(app: FastAPI, runtime: Runtime) -> None:
    @app.post("/v1/advantages", tags=["advantages"], openapi_extra=_ADVANTAGES_BODY,
              summary="ComputeAdvantages: per-step advantages for one batch")
    async def advantages(request: Request) -> Response:
        received = time.monotonic()
        try:
            body = await _read_body(request, runtime.settings.limits.max_message_bytes)
            # Parsing a large batch takes milliseconds: keep it off the event loop.
            message = await asyncio.to_thread(_parse_request, body, pb.ComputeAdvantagesRequest(),
                                              runtime.engine.limits)
        except Exception as exc:
            # Unparsed, the request has no id of its own yet.
            return _refused(runtime, "ComputeAdvantages", received, new_request_id(), exc)

        async def compute() -> pb.ComputeAdvantagesResponse:
            return await _unless_disconnected(request, runtime.compute(
                message, deadline=None, received_at=received, wait_for_slot=False))

        return await _serve(runtime, "ComputeAdvantages", runtime.request_id_of(message), compute)

    @app.post("/v1/prefetch", tags=["advantages"], openapi_extra=_PREFETCH_BODY,
              summary="PrefetchStates: embed states in the background, ahead of their batch")
    async def prefetch(request: Request) -> Response:
        async def call() -> pb.PrefetchStatesResponse:
            body = await _read_body(request, runtime.settings.limits.max_message_bytes)
            message = await asyncio.to_thread(_parse_request, body, pb.PrefetchStatesRequest(),
                                              runtime.engine.limits)
            return await runtime.prefetch_states(message)

        return await _serve(runtime, "PrefetchStates", new_request_id(), call)


def _add_success_rate_routes(app: FastAPI, runtime: Runtime) -> None:
    @app.get("/v1/tasks", tags=["success rates"],
             summary="GetSuccessRates: per-task success-rate histories")
    async def tasks(
        task_id: Annotated[list[str] | None, Query(description="exact task ids")] = None,
        prefix: Annotated[str, Query()] = "",
        page_size: Annotated[int, Query(ge=0)] = 0,
        page_token: Annotated[str, Query()] = "",
    ) -> Response:
        message = pb.GetSuccessRatesRequest(task_ids=task_id or [], prefix=prefix,
                                            page_size=page_size, page_token=page_token)
        return await _serve(runtime, "GetSuccessRates", new_request_id(),
                            lambda: runtime.success_rates(message))

    # Access (the admin token, when auth is on) is checked by the HttpBearerAuth middleware.
    async def reset(message: pb.ResetSuccessRatesRequest) -> Response:
        return await _serve(runtime, "ResetSuccessRates", new_request_id(),
                            lambda: runtime.reset_success_rates(message))

    @app.delete("/v1/tasks/{task_id}", tags=["success rates"],
                summary="ResetSuccessRates: delete one task's history")
    async def reset_task(task_id: Annotated[str, Path()]) -> Response:
        return await reset(pb.ResetSuccessRatesRequest(task_ids=[task_id]))

    @app.delete("/v1/tasks", tags=["success rates"],
                summary="ResetSuccessRates: delete every task of this server's namespace")
    async def reset_all() -> Response:
        return await reset(pb.ResetSuccessRatesRequest(all_tasks=True))


def _add_info_route(app: FastAPI, runtime: Runtime) -> None:
    @app.get("/v1/info", tags=["server"], summary="GetServerInfo: version, presets, limits")
    async def info() -> Response:
        async def call() -> pb.GetServerInfoResponse:
            return runtime.server_info()

        return await _serve(runtime, "GetServerInfo", new_request_id(), call)
