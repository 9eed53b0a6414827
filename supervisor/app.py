"""Builds the aiohttp application and its services.

Services are entered in order through ``cleanup_ctx`` and left in reverse: the engine and the
model first (the API answers 503 until a model is ready), then the folder watcher, then the twin
watcher. Each background service runs under ``supervised`` (restart with backoff)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import structlog
from aiohttp import web

from supervisor.errors import StartupError
from supervisor.fsutil import remove_tree
from supervisor.http.auth import token_middleware
from supervisor.http.keys import (
    ADMISSION,
    DOWNLOADS,
    ENGINE,
    EVENTS,
    METRICS,
    PIPELINE,
    REPOSITORY,
    SETTINGS,
    TWIN_STATUS,
    WATCHER,
)
from supervisor.http.middleware import error_middleware, request_log_middleware
from supervisor.http.observe import install_metrics, metrics_middleware, observe_ctx
from supervisor.http.observe import routes as metrics_routes
from supervisor.http.overload import Admission
from supervisor.http.pictures import routes as picture_routes
from supervisor.http.routes import routes
from supervisor.http.status_page import routes as page_routes
from supervisor.metrics import Metrics
from supervisor.serving.engine import Engine
from supervisor.settings import Settings
from supervisor.supervise import supervised
from supervisor.twin.status import TwinStatus
from supervisor.updates.events import EventBus
from supervisor.updates.pending import Downloads
from supervisor.updates.pipeline import Pipeline
from supervisor.updates.repository import Repository

__all__ = ["ImportFailed", "StartupError", "build_app", "serving_logger"]

log = structlog.get_logger(__name__)


class ImportFailed(StartupError):
    """The model given with --model was rejected."""


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    engine = Engine(
        workers=settings.worker_count,
        runtime_threads=settings.runtime_threads,
        max_image_pixels=settings.max_image_pixels,
        default_threshold=settings.score_threshold,
        decode_memory_bytes=settings.decode_memory_bytes,
        decode_wait_seconds=settings.decode_wait_seconds,
        wide_lane=settings.wide_lane,
    )
    engine.on_load = app[METRICS].model_loaded
    repo = Repository(settings.data_dir)
    try:
        repo.ensure_layout()
    except OSError as exc:
        raise StartupError(
            f"cannot write the data dir {settings.data_dir.resolve()} as uid {os.getuid()}: {exc.strerror}. "
            "Make it writable by this user (on IoT Edge: see docs/deployment.md, 'Preparing the device')."
        ) from exc
    pipeline = Pipeline(settings, repo, engine, app[EVENTS])
    app[ENGINE], app[REPOSITORY], app[PIPELINE] = engine, repo, pipeline
    await pipeline.start()
    active = engine.active
    log.info("model_ready", model=active.info.name if active else None,
             version=active.info.version if active else None, data_dir=str(settings.data_dir))
    yield
    await pipeline.close()
    await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)


async def import_model(pipeline: Pipeline, path: Path) -> None:
    """--model: copy a file, folder or zip into staging, run it through the pipeline, activate it."""
    if not path.exists():
        raise ImportFailed(f"--model {path}: no such file or folder")
    # A .tmp- folder in staging is ignored by the folder watcher (the pipeline gets the package
    # only from here) and removed by the start-up repair if we crash; the package keeps its name.
    holder = pipeline.staging_dir / f".tmp-import-{uuid.uuid4().hex[:8]}"
    holder.mkdir()
    copy = holder / path.name
    loop = asyncio.get_running_loop()
    if path.is_dir():
        await loop.run_in_executor(None, shutil.copytree, path, copy)
    else:
        await loop.run_in_executor(None, shutil.copyfile, path, copy)
    try:
        version = await pipeline.process(copy, source="cli")
    finally:
        await loop.run_in_executor(None, remove_tree, holder)
    if version is None:
        rejected = [e for e in pipeline.events.history if e.state == "rejected" and e.package == copy.name]
        reason = rejected[-1].reason if rejected else "see the log"
        raise ImportFailed(f"--model {path} was rejected: {reason}")
    await pipeline.activate(version.name, version.version, source="cli")


async def _import_ctx(app: web.Application) -> AsyncIterator[None]:
    path = app.get(IMPORT_PATH)
    if path is not None:
        await import_model(app[PIPELINE], path)
    yield


async def _watcher_ctx(app: web.Application) -> AsyncIterator[None]:
    from supervisor.updates.watcher import PackageWatcher

    settings = app[SETTINGS]
    watcher = PackageWatcher(
        app[PIPELINE], settings.inbox_dir, settings.staging_dir, settings.settle_seconds,
        incomplete_timeout=settings.incomplete_timeout_seconds, rescan_seconds=settings.rescan_seconds,
    )
    app[WATCHER] = watcher  # /models and the status page show what it waits for
    async with supervised("package-watcher", watcher.run):
        yield


async def _twin_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if settings.twin == "off":
        log.info("twin_disabled", reason="EDGELOADER_TWIN=off: models arrive through the drop folder only")
        app[TWIN_STATUS].set("off", reason="EDGELOADER_TWIN=off")
        yield
        return
    from supervisor.twin.service import TwinService

    service = TwinService(
        settings,
        app[PIPELINE],
        progress_interval=settings.twin_progress_seconds,
        twin_timeout=settings.twin_timeout_seconds,
        download_retries=settings.download_retries,
        download_read_timeout=settings.download_read_timeout_seconds,
        status=app[TWIN_STATUS],
        download_counters=app[METRICS],
    )
    async with supervised("twin-watcher", service.run):
        yield


IMPORT_PATH = web.AppKey("import_path", Path)


async def _plain_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp advertises ``Python/3.x aiohttp/3.y``: versions tell a scanner which CVEs to try."""
    response.headers["Server"] = "edge-model-loader"


def serving_logger(app: web.Application, sock: socket.socket) -> Callable[..., None]:
    """For ``run_app(print=...)``, which calls it once the socket listens and the services have
    started: one ``serving`` line naming the address, the port actually bound and the model."""

    def serving(*_banner: object, **_kwargs: object) -> None:
        host, port = sock.getsockname()[:2]
        active = app[ENGINE].active if ENGINE in app else None
        log.info("serving", url=f"http://{_url_host(host)}:{port}/", host=host, port=port,
                 model=active.info.name if active else None, version=active.info.version if active else None,
                 handler=active.info.handler if active else None)

    return serving


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def build_app(settings: Settings, import_path: Path | None = None, services: bool = True) -> web.Application:
    """The whole service as one aiohttp app. ``services=False`` leaves out the folder and twin
    watchers (tests that drive the pipeline themselves)."""
    admission = Admission(settings.max_queued_requests)
    middlewares = [metrics_middleware, request_log_middleware, error_middleware, admission.middleware]
    if settings.api_token:
        middlewares.append(token_middleware(settings.api_token, settings.api_token_scope))
        log.info("api_token_required", scope=settings.api_token_scope)
    elif settings.host not in ("127.0.0.1", "::1", "localhost"):
        log.info("api_open", hint="anyone who reaches the port can switch models; see EDGELOADER_API_TOKEN")
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=middlewares)
    app[SETTINGS] = settings
    app[ADMISSION] = admission
    app[EVENTS] = EventBus()
    app[TWIN_STATUS] = TwinStatus()
    app[METRICS] = Metrics()  # a registry per app: tests build several in one process
    app[DOWNLOADS] = Downloads()
    install_metrics(app)
    if import_path is not None:
        app[IMPORT_PATH] = import_path
    app.add_routes(routes)
    app.add_routes(picture_routes)
    app.add_routes(metrics_routes)
    app.add_routes(page_routes)
    app.on_response_prepare.append(_plain_server_header)
    app.cleanup_ctx.append(observe_ctx)  # first: it counts the start-up swap
    app.cleanup_ctx.append(_engine_ctx)
    app.cleanup_ctx.append(_import_ctx)
    if services:
        app.cleanup_ctx.append(_watcher_ctx)
        app.cleanup_ctx.append(_twin_ctx)
    return app
