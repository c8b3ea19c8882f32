"""The HTTP API (FastAPI) in front of the model deployments, version 1.

    POST /v1/synthesize   multipart: labels (PNG), [style | style_code], [instance], [seed], [format], [size]
    POST /v1/encode       multipart: style (PNG / JPEG / WebP) -> {"mu": [...], "logvar": [...]}
    GET  /v1/model        configuration, classes (names, colours), checkpoint identity  [?model=NAME]
    GET  /v1/models       the models served (each route takes ``model``; absent: the first)
    GET  /healthz         the ingress runs;  GET /readyz: a generator replica answers
    GET  /docs            OpenAPI
    GET  /                the paint studio (serve_app/studio/: static files, no build step)

Errors are JSON ``{"error": {"status": 400, "message": "..."}}``: 400 invalid content,
401 missing or wrong token, 408 timeout, 413 too large, 415 media type, 422 malformed
form, 503 queue full (with Retry-After).
"""

# No `from __future__ import annotations`: Serve copies the route methods and FastAPI must
# see their real parameter types (File, Form), not strings it cannot resolve there.

import asyncio
import hmac
import json
import os
import time
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, StringConstraints
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from spade_core.config import ModelConfig
from spade_core.model import NO_STYLE_INPUT
from spade_core.semantics import classes_for

from .config import ApiSettings
from .deployments import InputError
from .images import (
    MEDIA_TYPES,
    Palette,
    RequestError,
    encode_image,
    label_ids,
    parse_size,
    resize_rgb,
    rgb_image,
)
from .metrics import series
from .studio import index_page
from .studio import static_files as studio_files

API_VERSION = "v1"
MODEL_INFO_TTL_S = 5.0  # how stale the ingress's copy of the model config may get after a swap
REPLICA_RETRIES = 2  # a request whose replica died is sent again this many times (synthesis is idempotent)
REPLICA_RETRY_PAUSE_S = 0.2  # times the attempt: Serve's router learns of the death meanwhile

app = FastAPI(
    title="spade-ray",
    version="1.0",
    description="SPADE / GauGAN semantic image synthesis: label map in, photo out.",
)
app.mount("/studio", studio_files(), name="studio")  # the page's script and styles


class ErrorDetail(BaseModel):
    status: int
    message: str


class ErrorBody(BaseModel):
    """Every error: ``{"error": {"status": 400, "message": "..."}}``."""

    error: ErrorDetail


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait, when the queue is full", "schema": {"type": "string"}}}
_ERRORS = {
    400: "invalid content (not an image, a colour outside the palette, a bad field value)",
    401: "missing or wrong bearer token (servers with auth)",
    405: "the route does not take this method",
    408: "the request took longer than the request timeout",
    413: "the body or an image is too large",
    415: "the body is not multipart/form-data, or an image of an unsupported format",
    422: "a malformed form: a missing or mistyped field",
    503: "at capacity (queue full; Retry-After says when to retry), not ready, or auth misconfigured",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, all with the error body's schema."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": ErrorBody, "description": _ERRORS[code]}
        if code == 503:
            out[code]["headers"] = _RETRY_AFTER
    return out


# What each kind of route can answer besides 200: auth and capacity on /v1, the form's
# checks on the uploads, 405 everywhere.
PROBE_ERRORS = errors(405)
READY_ERRORS = errors(405, 503)
INFO_ERRORS = errors(401, 405, 408, 503)
UPLOAD_ERRORS = errors(400, 401, 405, 408, 413, 415, 422, 503)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=headers)


@app.exception_handler(RequestError)
async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
    return error_response(422, f"malformed request: {problems}")


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


class BodyLimit:
    """ASGI middleware: bodies over ``limits.max_body_bytes`` get 413, declared or streamed.

    Ray Serve has no request-size limit. A declared Content-Length over the limit is refused
    before the app runs; a chunked body is counted as it arrives, and once it passes the
    limit the app sees a disconnect and its response is replaced by the 413.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        settings = _settings_of(scope.get("app"))
        if scope["type"] != "http" or settings is None:
            return await self.inner(scope, receive, send)
        limit = settings.limits.max_body_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > limit:
            return await error_response(413, f"request body is {declared} bytes; the limit is {limit}")(scope, receive, send)
        seen = 0
        exceeded = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not exceeded:
                await send(message)

        try:
            await self.inner(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded:
            await error_response(413, f"request body exceeds the limit of {limit} bytes")(scope, receive, send)


app.add_middleware(BodyLimit)


def _settings_of(served: Any) -> ApiSettings | None:
    """The ingress settings the replica put on the app it serves (Starlette hands every
    middleware that app as ``scope["app"]``); None before the replica has started."""
    return getattr(getattr(served, "state", None), "settings", None)


def _openapi() -> dict[str, Any]:
    """FastAPI's schema, plus what multipart forms mean that it cannot say itself: a required
    upload is never empty (FastAPI treats an empty form value as a missing one: 422), and an
    optional field is left out, never sent as null (a form has no null: "null" is text)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                             servers=app.servers or None)
        for body in schema.get("components", {}).get("schemas", {}).values():
            if not body.get("title", "").startswith("Body_"):  # the multipart forms
                continue
            for name, prop in body.get("properties", {}).items():
                branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
                if name in body.get("required", []):
                    for branch in branches:
                        if branch.get("type") == "string":
                            branch.setdefault("minLength", 1)
                if "anyOf" in prop:
                    prop["anyOf"] = branches
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]


@app.middleware("http")
async def _auth_media_type_metrics(request: Request, call_next: Any) -> Response:
    """Bearer auth on /v1 (401), multipart bodies for /v1 POSTs (415), and the request metrics."""
    started = time.monotonic()
    path = _app_path(request.scope)
    route = path if path in _ROUTES else "other"
    settings = _settings_of(request.app)
    try:
        if settings is not None:
            _check_auth(request, settings)
        if request.method == "POST" and path in _UPLOAD_ROUTES:
            media = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "multipart/form-data":
                raise RequestError(415, f"the request body must be multipart/form-data, got {media or 'no Content-Type'}")
        response = await call_next(request)
    except RequestError as exc:
        response = error_response(exc.status, exc.message, exc.headers)
    except (Exception, asyncio.CancelledError) as exc:
        # The client hung up (Serve cancels the request and its model calls; Starlette's
        # middleware then reports that no response came), or a bug: counted either way.
        gone = isinstance(exc, asyncio.CancelledError) or await _disconnected(request)
        series()["requests"].inc(tags={"route": route, "status": "499" if gone else "500"})
        raise
    metrics = series()
    metrics["requests"].inc(tags={"route": route, "status": str(response.status_code)})
    metrics["latency"].observe(time.monotonic() - started, tags={"route": route})
    return response


async def _disconnected(request: Request) -> bool:
    try:
        return await asyncio.wait_for(request.is_disconnected(), timeout=0.1)
    except (Exception, asyncio.CancelledError):
        return False


def _app_path(scope: dict[str, Any]) -> str:
    """The path below the app's route prefix (Serve mounts an app at its route_prefix)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _check_auth(request: Request, settings: ApiSettings) -> None:
    if settings.auth_token_env is None or not _app_path(request.scope).startswith(f"/{API_VERSION}/"):
        return
    token = os.environ.get(settings.auth_token_env, "")
    if not token:  # configured but unset: refuse everything rather than serve unauthenticated
        raise RequestError(503, f"the server's auth token variable {settings.auth_token_env} is not set")
    given = request.headers.get("authorization", "")
    if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())):
        raise RequestError(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


async def _read(upload: UploadFile | str | None, field: str) -> bytes | None:
    if upload is None:
        return None
    if isinstance(upload, str):  # a form value without a filename: its text is the content
        return upload.encode("utf-8", "surrogateescape")
    return await upload.read()


# An image field may also come as a form value without a filename: its text is then the
# content (and is refused as an image if it is not one). Empty, it counts as absent (FastAPI's
# rule for form values): the schema says so with min_length.
TextPart = Annotated[str, StringConstraints(min_length=1)]

_UPLOAD_ROUTES = {f"/{API_VERSION}/encode", f"/{API_VERSION}/synthesize"}  # multipart POSTs
_ROUTES = {"/healthz", "/readyz", f"/{API_VERSION}/model", f"/{API_VERSION}/models", *_UPLOAD_ROUTES}


def _parse_style_code(text: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The style_code form field's JSON (its length is the model's to check)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"style_code is not valid JSON: {exc}") from exc
    logvar = None
    if isinstance(value, dict):
        if "mu" not in value or not set(value) <= {"mu", "logvar", "checkpoint"}:
            raise RequestError(400, 'style_code must be a list of numbers or {"mu": [...], "logvar": [...]} as /v1/encode returns')
        logvar = _vector(value.get("logvar"), "style_code.logvar") if value.get("logvar") is not None else None
        value = value["mu"]
    return _vector(value, "style_code"), logvar


def _vector(value: Any, name: str) -> np.ndarray:
    if not isinstance(value, list) or not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise RequestError(400, f"{name} must be a list of numbers")
    out = np.asarray(value, dtype=np.float32)
    if not np.isfinite(out).all():
        raise RequestError(400, f"{name} must be finite")
    return out


# Everything the ingress class uses is defined above it: Serve serializes the class when
# it is decorated, and names defined later in this module are missing in the replica.
@serve.ingress(app)
class _Routes:
    def __init__(self, generator: DeploymentHandle, encoder: DeploymentHandle | None, settings: ApiSettings) -> None:
        self.generator = generator
        self.encoder = encoder
        self.settings = settings
        self._table: tuple[float, dict[str, Any]] | None = None  # (when, the generator's models())
        self._info: dict[str, tuple[float, dict[str, Any]]] = {}  # model id -> (when, info)
        self._info_lock = asyncio.Lock()

    # --- models ---------------------------------------------------------------------------

    async def models(self, *, fresh: bool = False) -> dict[str, Any]:
        """The generator's model table (names, multiplexed ids, checkpoints), at most 5 s old."""
        if fresh or self._table is None or time.monotonic() - self._table[0] > MODEL_INFO_TTL_S:
            table = await self._call(lambda: self.generator.models.remote(), timeout=30.0)
            self._table = (time.monotonic(), table)
        return self._table[1]

    async def model_id(self, name: str | None, *, fresh: bool = False) -> str:
        """The multiplexed id of the model ``name`` (None: the first); 400 for a name not served."""
        served = (await self.models(fresh=fresh))["models"]
        if name is None:
            return served[0]["id"]
        for entry in served:
            if entry["name"] == name:
                return entry["id"]
        raise RequestError(400, f"no model named {name!r}; this app serves {', '.join(e['name'] for e in served)} "
                                f"(GET /{API_VERSION}/models)")

    async def model_info(self, name: str | None = None, *, fresh: bool = False) -> dict[str, Any]:
        mid = await self.model_id(name, fresh=fresh)
        async with self._info_lock:
            cached = self._info.get(mid)
            if fresh or cached is None or time.monotonic() - cached[0] > MODEL_INFO_TTL_S:
                info = await self._call(lambda: self.generator.options(multiplexed_model_id=mid).info.remote(), timeout=60.0)
                config = ModelConfig.from_dict(info["config"])
                classes = classes_for(config.labels)
                cached = (time.monotonic(), {**info, "id": mid, "model": config, "classes": classes,
                                             "palette": Palette(classes.colors)})
                self._info = {k: v for k, v in self._info.items() if time.monotonic() - v[0] <= MODEL_INFO_TTL_S}
                self._info[mid] = cached
            return cached[1]

    async def _call(self, call: Callable[[], Any], *, timeout: float) -> Any:
        """Await ``call()``, a handle call: 503 when the queue is full, 408 past the timeout, 400
        for input errors. A replica that dies under the request (killed, node lost) is not the
        client's fault and the calls are idempotent: the call is sent again, to a live replica,
        up to REPLICA_RETRIES times within the timeout; then 503 with Retry-After."""
        deadline = time.monotonic() + timeout
        retry_after = {"Retry-After": str(self.settings.limits.retry_after_s)}
        for attempt in range(REPLICA_RETRIES + 1):
            response = call()
            try:
                return await asyncio.wait_for(response, timeout=max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError as exc:
                response.cancel()
                raise RequestError(408, f"the request took longer than {timeout:.0f} s") from exc
            except BackPressureError as exc:
                raise RequestError(503, "the server is at capacity (queue full); retry later", headers=retry_after) from exc
            except InputError as exc:
                raise RequestError(400, str(exc)) from exc
            except (RayActorError, ActorUnavailableError) as exc:
                series()["replica_failures"].inc(tags={"retried": str(attempt < REPLICA_RETRIES).lower()})
                if attempt == REPLICA_RETRIES or time.monotonic() >= deadline:
                    raise RequestError(503, f"a model replica failed while serving the request ({type(exc).__name__}); "
                                            "retry later", headers=retry_after) from exc
                await asyncio.sleep(REPLICA_RETRY_PAUSE_S * (attempt + 1))
        raise AssertionError("unreachable")

    # --- routes ---------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def studio(self) -> FileResponse:
        return index_page()

    @app.get("/healthz", responses=PROBE_ERRORS)
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={200: {"description": "a generator replica answers"}, **READY_ERRORS})
    async def readyz(self) -> JSONResponse:
        try:
            info = await self.model_info(None, fresh=True)
        except Exception as exc:  # not ready, whatever the reason: say so, never 500
            return error_response(503, f"not ready: {exc}")
        return JSONResponse({"status": "ready", "checkpoint": info["identity"], "load_error": info.get("load_error")})

    @app.get(f"/{API_VERSION}/models", responses=INFO_ERRORS)
    async def list_models(self) -> dict[str, Any]:
        table = await self.models()
        return {"models": [{"name": e["name"], "checkpoint": e["checkpoint"], "select": e["select"], "load_error": e["load_error"],
                            "default": i == 0} for i, e in enumerate(table["models"])],
                "failed": table["failed"]}

    @app.get(f"/{API_VERSION}/model", responses=errors(400, 401, 405, 408, 422, 503))
    async def model(self, model: Annotated[str | None, Query(description="a served model's name (default: the first)")] = None
                    ) -> dict[str, Any]:
        info = await self.model_info(model)
        config: ModelConfig = info["model"]
        return {
            "name": info["name"],
            "checkpoint": info["identity"],
            "load_error": info.get("load_error"),  # the last rollout's failure, while this checkpoint serves on
            "config": info["config"],
            "input_size": {"height": config.generator.output_size[0], "width": config.generator.output_size[1]},
            "style": {"encoder": self.encoder is not None, "z_dim": config.generator.z_dim},
            "instance_map": config.labels.instance_edges,
            "classes": [
                {"id": i, "name": name, "color": list(color)}
                for i, (name, color) in enumerate(zip(info["classes"].names, info["classes"].colors))
            ],
            "device": info["device"],
            "precision": info["precision"],
            "formats": sorted(MEDIA_TYPES),
        }

    @app.post(f"/{API_VERSION}/encode", responses=UPLOAD_ERRORS)
    async def encode(
        self,
        style: Annotated[UploadFile | TextPart, File(description="style image: PNG, JPEG or WebP")],
        model: Annotated[str | None, Form(description="a served model's name (default: the first)")] = None,
    ) -> dict[str, Any]:
        info = await self.model_info(model)
        data = await _read(style, "style")
        rgb = rgb_image(data, field="style", max_pixels=self.settings.limits.max_pixels)
        out = await self._encode(info, rgb)
        return {"mu": out["mu"], "logvar": out["logvar"], "checkpoint": out["identity"]}

    async def _encode(self, info: dict[str, Any], rgb: np.ndarray) -> dict[str, Any]:
        if self.encoder is None or info["model"].generator.z_dim is None:
            raise RequestError(400, NO_STYLE_INPUT)
        handle = self.encoder.options(multiplexed_model_id=info["id"])
        return await self._call(lambda: handle.encode.remote(rgb), timeout=self.settings.limits.request_timeout_s)

    @app.post(
        f"/{API_VERSION}/synthesize",
        response_class=Response,
        responses={
            200: {
                "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in MEDIA_TYPES.values()},
                "description": "the image",
                "headers": {
                    "X-Checkpoint": {"description": "identity of the checkpoint that drew it", "schema": {"type": "string"}},
                    "X-Model": {"description": "the served model's name", "schema": {"type": "string"}},
                    "X-Batch-Size": {"description": "requests merged into its batch", "schema": {"type": "string"}},
                    "X-Seed": {"description": "VAE models: the seed z was drawn from (the request's, or a fresh one): "
                                              "send it as seed to draw the same image again", "schema": {"type": "string"}},
                },
            },
            **UPLOAD_ERRORS,
        },
    )
    async def synthesize(
        self,
        labels: Annotated[UploadFile | TextPart, File(description="label map PNG: single-channel raw ids, or RGB in the palette")],
        style: Annotated[UploadFile | TextPart | None, File(description="style image (VAE models): PNG, JPEG or WebP")] = None,
        style_code: Annotated[str | None, Form(description='JSON: [z...] or {"mu": [...], "logvar": [...]}')] = None,
        instance: Annotated[UploadFile | TextPart | None, File(description="instance-id PNG (models with instance edges)")] = None,
        seed: Annotated[int | None, Form(ge=0, le=2**53 - 1)] = None,  # JSON numbers are exact up to 2**53
        format: Annotated[str | None, Form(description="png, jpeg or webp (any case)")] = None,  # noqa: A002 - the API's name
        size: Annotated[str | None, Form(description="'WIDTHxHEIGHT', 'original', or absent (the model's)")] = None,
        model: Annotated[str | None, Form(description="a served model's name (default: the first)")] = None,
    ) -> Response:
        started = time.monotonic()
        limits = self.settings.limits
        fmt = (format or self.settings.default_format).lower()
        if fmt not in MEDIA_TYPES:
            raise RequestError(400, f"format must be one of {', '.join(sorted(MEDIA_TYPES))}, got {format!r}")
        info = await self.model_info(model)
        config: ModelConfig = info["model"]
        ids = label_ids(await _read(labels, "labels"), field="labels", palette=info["palette"], max_pixels=limits.max_pixels)
        out_size = parse_size(size, original=ids.shape, model=config.generator.output_size, max_side=limits.max_output_side)
        inst = None
        if instance is not None:
            inst = label_ids(await _read(instance, "instance"), field="instance", palette=info["palette"], max_pixels=limits.max_pixels)
        mu, logvar = await self._style_code(info, style, style_code)
        remaining = limits.request_timeout_s - (time.monotonic() - started)
        handle = self.generator.options(multiplexed_model_id=info["id"])  # Serve routes it to a replica holding the model
        # the replica's model checks the inputs and draws z from the seed (SpadeModel.check_inputs / sample_z)
        result = await self._call(lambda: handle.synthesize.remote(ids, instance=inst, mu=mu, logvar=logvar, seed=seed),
                                  timeout=max(remaining, 0.001))
        rgb = resize_rgb(result["image"], out_size)
        body = await asyncio.to_thread(encode_image, rgb, fmt, quality=self.settings.jpeg_quality)
        headers = {"X-Checkpoint": result["identity"], "X-Model": info["name"],
                   "X-Batch-Size": str(result["batch_size"])}
        if result["seed"] is not None:
            headers["X-Seed"] = str(result["seed"])
        return Response(content=body, media_type=MEDIA_TYPES[fmt], headers=headers)

    async def _style_code(
        self, info: dict[str, Any], style: UploadFile | str | None, style_code: str | None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(mu, logvar) of the style the request names: its image through the StyleEncoder, or
        its style_code (logvar None for a bare list); (None, None) without one."""
        if style is not None and style_code is not None:
            raise RequestError(400, "send either style or style_code, not both")
        if style is not None:
            rgb = rgb_image(await _read(style, "style"), field="style", max_pixels=self.settings.limits.max_pixels)
            code = await self._encode(info, rgb)
            return np.asarray(code["mu"], np.float32), np.asarray(code["logvar"], np.float32)
        if style_code is not None:
            return _parse_style_code(style_code)
        return None, None


@serve.deployment(name="SpadeIngress")
class SpadeIngress(_Routes):
    """The HTTP ingress. Its settings are held by the app it serves (``app.state.settings``),
    where the middleware reads them: Serve hands the replica its own copy of the FastAPI app
    (``self.app``), so neither a module global nor the module's ``app`` would be that one."""

    async def __init__(self, generator: DeploymentHandle, encoder: DeploymentHandle | None, settings: ApiSettings) -> None:
        await super().__init__(generator, encoder, settings)
        self.app.state.settings = self.settings
