"""The HTTP app: routes over one `EdgeState`, and `serve` to run it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import shutil
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from transflow_edge import __version__, drift, schemas, v2
from transflow_edge.bundle import BundleError
from transflow_edge.candidate import parse_options
from transflow_edge.guards import BodyDeadline, head_deadline_protocol
from transflow_edge.metrics import MetricsMiddleware
from transflow_edge.model import LoadedModel
from transflow_edge.parsing import (
    ApiError,
    check_predict_type,
    parse_inputs,
    predictions,
    read_body,
    receive_archive,
)
from transflow_edge.preprocess import PreprocessError
from transflow_edge.settings import TOKEN_ENV, Settings
from transflow_edge.state import EdgeState

log = logging.getLogger("transflow.edge")


def create_app(settings: Settings) -> FastAPI:
    """The app over one EdgeState; a bad --bundle raises here, before anything listens."""
    state = EdgeState(settings)
    try:
        state.start()
    except BaseException:
        state.close()
        raise

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.batcher.start()
        if state.watcher is not None:
            state.watcher.start()
        try:
            yield
        finally:
            state.close()

    # The OpenAPI schema is served (/openapi.json); the docs pages are not: they load scripts from a CDN.
    app = FastAPI(title="transflow edge", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.edge = state
    # Parsing, base64 and image decoding, tokenisation: on these threads only, never on the event loop.
    workers = anyio.CapacityLimiter(settings.parse_workers)

    def require_model() -> LoadedModel:
        model = state.model
        if model is None:
            raise ApiError(503, f"no model loaded: {state.error}")
        return model

    def require_admin(request: Request) -> None:
        if settings.token is None:
            raise ApiError(403, f"admin endpoints are disabled: start the server with ${TOKEN_ENV} or --token-file")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.token.encode()):
            raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error", exc_info=exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, 500)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        model = state.model
        if model is None:
            return JSONResponse({"ready": False, "error": state.error}, 503)
        return JSONResponse({"ready": True, "name": model.name, "version": model.version})

    @app.get("/v1/model")
    async def model_info() -> dict[str, Any]:
        return state.describe(require_model())

    @app.get("/v1/drift")
    async def drift_info() -> dict[str, Any]:
        """The served version's drift: PSI per statistic against its bundle's reference, and the live counts."""
        return drift.describe(require_model())

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(state.model), media_type=CONTENT_TYPE_LATEST)

    def parse_and_prepare(body: bytes, content_type: str, model: LoadedModel) -> dict[str, Any]:
        items = parse_inputs(body, content_type, model, settings)
        try:
            return {"prepared": model.prepare(items), "items": items}
        except PreprocessError as exc:
            raise ApiError(422, str(exc)) from None

    async def run_model(prepare: Callable[[], Any], model: LoadedModel) -> tuple[Any, np.ndarray]:
        """Prepare on a worker thread (the batcher knows it is coming), queue, and await the logits."""
        with state.batcher.arriving() as arrival:
            parsed = await anyio.to_thread.run_sync(prepare, limiter=workers)
            try:
                future = arrival.submit(model, parsed["prepared"])
            except OverflowError:
                raise ApiError(503, "overloaded: too many queued inputs, retry shortly", {"Retry-After": "1"}) from None
            except RuntimeError:
                raise ApiError(503, "the server is shutting down") from None
        began = time.perf_counter()
        logits = await asyncio.wrap_future(future)
        parsed["infer_s"] = time.perf_counter() - began  # prepared inputs to logits: what candidates are judged by
        return parsed, logits

    @app.post("/v1/predict", openapi_extra=schemas.PREDICT)
    async def predict(request: Request) -> JSONResponse:
        started = time.perf_counter()
        # this request uses this model to the end, whatever is swapped in meanwhile (a canary: maybe the candidate)
        model, role, held = state.candidates.route(request.headers, require_model())
        content_type = request.headers.get("content-type", "")
        check_predict_type(content_type, model)
        body = await read_body(request, settings.max_body_bytes, max_parts=settings.max_items)
        with state.candidates.serving(held, role) as timing:
            parsed, logits = await run_model(partial(parse_and_prepare, body, content_type, model), model)
            timing["seconds"] = parsed["infer_s"]
        state.candidates.mirror(held, role, model, parsed, logits)  # shadow copy: queued or dropped, never waited on
        answer = {
            "predictions": predictions(model, logits),
            "model": {"name": model.name, "version": model.version},
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        return JSONResponse(answer)  # plain JSON types already: no jsonable_encoder pass on the hot path

    # -- Open Inference Protocol v2

    def require_v2_model(name: str) -> LoadedModel:
        model = require_model()
        if name != model.name:
            raise ApiError(404, f"unknown model {name[:80]!r}; this server serves {model.name!r}")
        return model

    @app.get("/v2")
    async def v2_server() -> dict[str, Any]:
        return {"name": "transflow-edge", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def v2_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def v2_ready() -> JSONResponse:
        return JSONResponse({"ready": state.model is not None}, 200 if state.model is not None else 503)

    @app.get("/v2/models/{name}")
    async def v2_model(name: str) -> dict[str, Any]:
        return v2.model_metadata(require_v2_model(name))

    @app.get("/v2/models/{name}/ready")
    async def v2_model_ready(name: str) -> dict[str, Any]:
        require_v2_model(name)
        return {"name": name, "ready": True}

    def parse_infer_and_prepare(body: bytes, header_length: str | None, model: LoadedModel) -> dict[str, Any]:
        request = v2.parse_infer(body, header_length, model, settings)
        try:
            return request | {"prepared": model.prepare(request["items"])}
        except PreprocessError as exc:
            raise ApiError(422, str(exc)) from None

    @app.post("/v2/models/{name}/infer", openapi_extra=schemas.INFER)
    async def v2_infer(name: str, request: Request) -> JSONResponse:
        model = require_v2_model(name)
        body = await read_body(request, settings.max_body_bytes)
        header_length = request.headers.get(v2.HEADER_LENGTH)
        parsed, logits = await run_model(partial(parse_infer_and_prepare, body, header_length, model), model)
        return JSONResponse(v2.infer_response(model, logits, parsed["id"], parsed["outputs"]))

    # -- admin

    @app.post("/v1/admin/bundles")
    async def upload_bundle(request: Request) -> dict[str, Any]:
        require_admin(request)
        work = state.store.new_staging()
        try:
            archive = work / "upload.tar.gz"
            await receive_archive(request, archive, settings.max_upload_bytes, workers)
            return await run_in_threadpool(state.install, archive, "upload", work)
        except BundleError as exc:
            raise ApiError(422, f"bundle rejected, still serving the previous model: {exc}") from None
        finally:
            await run_in_threadpool(shutil.rmtree, work, True)

    @app.post("/v1/admin/candidate")
    async def upload_candidate(request: Request) -> dict[str, Any]:
        require_admin(request)
        q = request.query_params
        options = parse_options(q.get("mode"), q.get("fraction"), q.get("sticky"))
        work = state.store.new_staging()
        try:
            archive = work / "upload.tar.gz"
            await receive_archive(request, archive, settings.max_upload_bytes, workers)
            return await run_in_threadpool(state.candidates.install, archive, work, options)
        except BundleError as exc:
            raise ApiError(422, f"candidate rejected, the live model is unchanged: {exc}") from None
        finally:
            await run_in_threadpool(shutil.rmtree, work, True)

    @app.post("/v1/admin/candidate/{action}")
    async def candidate_action(action: str, request: Request) -> dict[str, Any]:
        require_admin(request)
        calls = {"promote": state.candidates.promote, "drop": state.candidates.drop}
        if action not in calls:
            raise ApiError(404, "unknown candidate action: promote or drop")
        try:
            return await run_in_threadpool(calls[action])
        except LookupError as exc:
            raise ApiError(409, str(exc)) from None

    @app.post("/v1/admin/rollback")
    async def rollback(request: Request) -> dict[str, Any]:
        require_admin(request)
        try:
            return await run_in_threadpool(state.rollback)
        except LookupError as exc:
            raise ApiError(409, str(exc)) from None
        except BundleError as exc:
            raise ApiError(422, f"previous bundle rejected, still serving the current model: {exc}") from None

    app.add_middleware(BodyDeadline, seconds=settings.body_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The connection limits of `Settings` as uvicorn options (see settings.py for what each bounds)."""
    options: dict[str, Any] = {
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_s,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "http": head_deadline_protocol(settings.head_timeout_s),  # h11, with a deadline on the request head
        "server_header": False,
        "timeout_graceful_shutdown": 10,
    }
    if settings.tls_certfile is not None:
        options |= {"ssl_certfile": str(settings.tls_certfile), "ssl_keyfile": str(settings.tls_keyfile)}
    return options


def warn_plain_admin(settings: Settings, host: str) -> bool:
    """Loudly, when the admin token would cross a network in clear text."""
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    if settings.token is None or settings.tls_certfile is not None or loopback:
        return False
    log.warning(
        "!!! admin endpoints are on over plain HTTP on %s: the bearer token travels in clear text. "
        "Give --tls-cert/--tls-key, or listen on 127.0.0.1 behind a TLS proxy. !!!",
        host,
    )
    return True


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Run the server in the foreground (one process: the model, the batcher and the state dir are per process)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warn_plain_admin(settings, host)
    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_options(settings))
