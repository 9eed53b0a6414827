"""Typed application state (aiohttp AppKeys), in one place so every module names it the same way."""

from __future__ import annotations

from aiohttp import web

from supervisor.http.overload import Admission
from supervisor.metrics import Metrics
from supervisor.serving.engine import Engine
from supervisor.settings import Settings
from supervisor.twin.status import TwinStatus
from supervisor.updates.events import EventBus
from supervisor.updates.pending import Downloads
from supervisor.updates.pipeline import Pipeline
from supervisor.updates.repository import Repository
from supervisor.updates.watcher import PackageWatcher

__all__ = [
    "ADMISSION", "DOWNLOADS", "ENGINE", "EVENTS", "METRICS", "PIPELINE", "REPOSITORY", "SETTINGS", "TWIN_STATUS",
    "WATCHER",
]

SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", Engine)
EVENTS = web.AppKey("events", EventBus)
REPOSITORY = web.AppKey("repository", Repository)
PIPELINE = web.AppKey("pipeline", Pipeline)
TWIN_STATUS = web.AppKey("twin_status", TwinStatus)
METRICS = web.AppKey("metrics", Metrics)
DOWNLOADS = web.AppKey("downloads", Downloads)
WATCHER = web.AppKey("watcher", PackageWatcher)
ADMISSION = web.AppKey("admission", Admission)
