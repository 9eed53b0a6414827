"""HTTP routes. Handlers here only parse requests and shape responses; the engine and the
pipeline do the work. Errors are raised typed (supervisor/errors.py); middleware.py turns them
into JSON ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from handlers.base import lookup
from handlers.imaging import ImageDecodeError, ImageTooLarge, UnsupportedImageType
from supervisor.errors import (
    BadRequest,
    NoModelLoaded,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from supervisor.http.keys import DOWNLOADS, ENGINE, EVENTS, PIPELINE, REPOSITORY, SETTINGS, TWIN_STATUS, WATCHER
from supervisor.http.openapi import openapi_document
from supervisor.metrics import note_stage_timings
from supervisor.package.paths import is_safe_component
from supervisor.serving.engine import DetectResult
from supervisor.updates.pending import iso_utc

__all__ = ["detect_with_image", "models_document", "routes"]

log = structlog.get_logger("edgeloader.api")
routes = web.RouteTableDef()

_IMAGE_TYPES = {"image/jpeg", "image/jpg", "image/png", "image/bmp", "image/x-ms-bmp", "image/webp"}
_RAW_TYPES = {"application/octet-stream", ""}

# -- detection ----------------------------------------------------------------------------------------


def _query_params(request: web.Request) -> tuple[float | None, int | None, frozenset[str] | None]:
    q = request.query
    threshold = maxn = None
    try:
        if "threshold" in q:
            threshold = float(q["threshold"])
            if not 0.0 <= threshold <= 1.0:
                raise ValueError
    except ValueError:
        raise BadRequest("'threshold' must be a number between 0 and 1") from None
    try:
        if "max" in q:
            maxn = int(q["max"])
            if maxn < 1:
                raise ValueError
    except ValueError:
        raise BadRequest("'max' must be a whole number of at least 1") from None
    labels = frozenset(s.strip() for s in q["labels"].split(",") if s.strip()) if q.get("labels") else None
    return threshold, maxn, labels


async def _read_image(request: web.Request) -> bytes:
    settings = request.app[SETTINGS]
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body of {request.content_length} bytes is over the {limit}-byte limit")
    ctype = request.content_type.lower()
    if ctype.startswith("multipart/"):
        reader = _multipart_image(request, settings.max_multipart_parts)
    elif ctype in _IMAGE_TYPES or ctype in _RAW_TYPES:
        reader = request.read()
    else:
        raise UnsupportedMediaType(
            f"unsupported Content-Type {ctype!r}: send image/jpeg, image/png, image/bmp, image/webp, "
            "application/octet-stream or multipart/form-data with an 'image' field"
        )
    try:
        # A body that trickles (or never ends) must not hold a connection and its buffer for ever.
        data = await asyncio.wait_for(reader, settings.body_timeout_seconds)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {settings.body_timeout_seconds:g} s") from None
    if not data:
        raise BadRequest("empty body: send the image bytes")
    return bytes(data)


async def _multipart_image(request: web.Request, max_parts: int) -> bytes:
    """The 'image' part of a multipart body. Parts are counted: 100,000 tiny parts in a body under
    the size cap kept the event loop busy for seconds (each part is parsed without yielding)."""
    try:
        reader = await request.multipart()
        parts = 0
        async for part in reader:
            parts += 1
            if parts > max_parts:
                raise BadRequest(f"multipart body has more than {max_parts} parts; send the image as one part")
            if getattr(part, "name", None) == "image":
                return bytes(await part.read(decode=False))  # type: ignore[union-attr]
    except (ValueError, HttpProcessingError) as exc:
        # No boundary, a part header that is no header (found by schemathesis: both were 500s).
        message = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
        raise BadRequest(f"malformed multipart body: {str(message).splitlines()[0][:100]}") from None
    raise BadRequest("multipart body has no 'image' field")


_IMAGE_ERRORS = (ImageDecodeError, UnsupportedImageType, ImageTooLarge)


def _image_error(exc: Exception) -> Exception:
    """What an image the engine could not take answers: 400, 415 or 413."""
    if isinstance(exc, UnsupportedImageType):
        return UnsupportedMediaType(str(exc))
    if isinstance(exc, ImageTooLarge):
        return PayloadTooLarge(str(exc))
    return BadRequest(f"cannot decode the image: {exc}")


async def _detect(request: web.Request) -> DetectResult:
    return (await detect_with_image(request))[0]


async def detect_with_image(request: web.Request) -> tuple[DetectResult, bytes]:
    """Run the request's image through the engine: the result, and the image as received."""
    threshold, maxn, labels = _query_params(request)
    data = await _read_image(request)
    try:
        result = await request.app[ENGINE].detect(data, threshold, maxn, labels)
    except _IMAGE_ERRORS as exc:
        raise _image_error(exc) from exc
    structlog.contextvars.bind_contextvars(model=result.model.name, model_version=result.model.version)
    note_stage_timings(result.timing_ms)
    return result, data


@routes.post("/detect")
async def detect(request: web.Request) -> web.Response:
    result = await _detect(request)
    return web.json_response({
        "model": {"name": result.model.name, "version": result.model.version},
        "image": {"width": result.width, "height": result.height},
        "detections": result.detections,
        "timing_ms": result.timing_ms,
    })


@routes.post("/score")
async def score(request: web.Request) -> web.Response:
    """The Azure video-analytics HTTP extension format, as the original module's /score spoke it."""
    result = await _detect(request)
    inferences = []
    for det in result.detections:
        b = det["box_normalized"]
        inferences.append({
            "type": "entity",
            "entity": {
                "tag": {"value": det["label"], "confidence": det["score"]},
                "box": {"l": b["xmin"], "t": b["ymin"], "w": round(b["xmax"] - b["xmin"], 5),
                        "h": round(b["ymax"] - b["ymin"], 5)},
            },
        })
    return web.json_response({"inferences": inferences})


@routes.post("/classify")
async def classify(request: web.Request) -> web.Response:
    """The top ``k`` classes of an image classifier (409 on a detector)."""
    try:
        k = int(request.query.get("k", "5"))
        if k < 1:
            raise ValueError
    except ValueError:
        raise BadRequest("'k' must be a whole number of at least 1") from None
    data = await _read_image(request)
    try:
        result = await request.app[ENGINE].classify(data, k)
    except _IMAGE_ERRORS as exc:
        raise _image_error(exc) from exc
    structlog.contextvars.bind_contextvars(model=result.model.name, model_version=result.model.version)
    return web.json_response({
        "model": {"name": result.model.name, "version": result.model.version},
        "image": {"width": result.width, "height": result.height},
        "classes": result.classes,
        "timing_ms": result.timing_ms,
    })


# -- health and metadata ----------------------------------------------------------------------------


@routes.get("/healthz")
@routes.get("/v2/health/live")
async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
@routes.get("/v2/health/ready")
async def ready(request: web.Request) -> web.Response:
    model = request.app[ENGINE].active
    if model is None:
        raise NoModelLoaded("no model loaded yet")
    return web.json_response({"status": "ready", "model": {"name": model.info.name, "version": model.info.version}})


def _route_name(request: web.Request, key: str) -> str:
    """A model name or version from the route: the same safe-name rule as installs (no '..', no
    slash, however encoded: aiohttp decodes %2e%2e before we see it)."""
    value = request.match_info[key]
    if not is_safe_component(value):
        raise NotFound(f"no model {key} like that: names are letters, digits, '.', '-' and '_'")
    return value


def _active_named(request: web.Request) -> Any:
    model = request.app[ENGINE].active
    name = _route_name(request, "name")
    if model is None or model.info.name != name:
        known = {v.name for v in request.app[REPOSITORY].versions()}
        if name in known:
            return None
        raise NotFound(f"no model named {name!r}")
    return model


@routes.get("/v2/models/{name}")
async def v2_model(request: web.Request) -> web.Response:
    model = _active_named(request)
    if model is None:
        raise NoModelLoaded(f"model {request.match_info['name']!r} is stored but not loaded")
    sig = model.runtime.signature

    def tensors(specs: Any) -> list[dict[str, Any]]:
        return [
            {"name": s.name, "datatype": s.dtype.upper(), "shape": [d if d else -1 for d in s.shape]} for s in specs
        ]

    return web.json_response({
        "name": model.info.name,
        "versions": [model.info.version],
        "platform": f"{sig.format}",
        "task": model.info.task,
        "handler": model.info.handler,
        "inputs": tensors(sig.inputs),
        "outputs": tensors(sig.outputs),
    })


@routes.get("/v2/models/{name}/ready")
async def v2_model_ready(request: web.Request) -> web.Response:
    if _active_named(request) is None:
        raise NoModelLoaded(f"model {request.match_info['name']!r} is stored but not loaded")
    return web.json_response({"name": request.match_info["name"], "ready": True})


# -- the repository ---------------------------------------------------------------------------------


def _task_of(handler: Any) -> str | None:
    """What a stored version's handler answers ("detect" or "classify"), by the name it was installed with."""
    family = lookup(handler) if isinstance(handler, str) else None
    return family.task if family is not None else None



@routes.get("/models")
async def list_models(request: web.Request) -> web.Response:
    return web.json_response(await models_document(request))


async def models_document(request: web.Request) -> dict[str, Any]:
    """What ``GET /models`` answers (the status page renders the same)."""
    repo = request.app[REPOSITORY]
    engine = request.app[ENGINE]
    active = engine.active
    # Reads of the disk (records, links, quarantine reasons) in a thread, not on the loop. Not the
    # loader thread: it may be busy loading a model for seconds, and these reads need no order.
    current, previous, stored, rejected = await asyncio.to_thread(
        lambda: (repo.current(), repo.previous(), repo.versions(), request.app[PIPELINE].quarantine.entries())
    )
    # The newest trouble each version had (a failed activation, an automatic rollback away from it).
    trouble: dict[tuple[str | None, str | None], dict[str, Any]] = {}
    for event in request.app[EVENTS].history:
        if event.state in ("failed", "rolled_back") and event.reason:
            trouble[(event.name, event.version)] = {"state": event.state, "reason": event.reason,
                                                "at": iso_utc(event.at)}
    versions = []
    for v in reversed(stored):
        state = "stored"
        if active is not None and (active.info.name, active.info.version) == v.key:
            state = "active"
        elif previous is not None and previous.key == v.key:
            state = "previous"
        r = v.record
        versions.append({
            "name": v.name, "version": v.version, "state": state,
            "handler": r.get("handler"), "task": _task_of(r.get("handler")), "sha256": r.get("model_sha256"),
            "package": r.get("package"), "package_sha256": r.get("package_sha256"),
            "source": r.get("source"), "installed_at": iso_utc(r.get("installed_at")),
            "signer": r.get("signer"),  # {"key", "fingerprint", "verified"}; null: unsigned
            "last_problem": trouble.get(v.key),
        })
    signed_by = next((v["signer"] for v in versions if v["state"] == "active"), None)
    twin = request.app[TWIN_STATUS].public() if TWIN_STATUS in request.app else None
    return {
        "active": {**active.info.public(), "signer": signed_by} if active else None,
        "current_on_disk": f"{current.name}/{current.version}" if current else None,
        "versions": versions,
        "rejected": [{**e, "at": iso_utc(e.get("at"))} for e in rejected],
        "pending": _pending(request.app),
        "twin": {**twin, "since": iso_utc(twin["since"])} if twin else None,
        "events": [{**e.to_dict(), "at": iso_utc(e.at)} for e in list(request.app[EVENTS].history)[-50:]],
    }


def _pending(app: web.Application) -> dict[str, Any]:
    """Work that is not a model yet: packages waiting in the drop folders (to settle, or for the rest
    of their copy) and downloads in progress."""
    watcher = app.get(WATCHER)
    packages = [{**p, "since": iso_utc(p["since"])} for p in watcher.pending()] if watcher is not None else []
    downloads = app[DOWNLOADS].in_progress() if DOWNLOADS in app else []
    return {"packages": packages, "downloads": downloads}


@routes.post("/models/{name}/{version}/activate")
async def activate(request: web.Request) -> web.Response:
    name, version = _route_name(request, "name"), _route_name(request, "version")
    stored = await request.app[PIPELINE].activate(name, version, source="api")
    return web.json_response({"active": {"name": stored.name, "version": stored.version}})


@routes.post("/models/rollback")
async def rollback(request: web.Request) -> web.Response:
    stored = await request.app[PIPELINE].rollback(source="api")
    return web.json_response({"active": {"name": stored.name, "version": stored.version}})


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())
