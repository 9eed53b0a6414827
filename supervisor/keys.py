"""Typed application state (aiohttp AppKeys), in one place so every module names it the same way."""

from __future__ import annotations

from aiohttp import web

from supervisor.engine import Engine
from supervisor.events import EventBus
from supervisor.pipeline import Pipeline
from supervisor.repository import Repository
from supervisor.settings import Settings
from supervisor.twin_status import TwinStatus

__all__ = ["ENGINE", "EVENTS", "PIPELINE", "REPOSITORY", "SETTINGS", "TWIN_STATUS"]

SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", Engine)
EVENTS = web.AppKey("events", EventBus)
REPOSITORY = web.AppKey("repository", Repository)
PIPELINE = web.AppKey("pipeline", Pipeline)
TWIN_STATUS = web.AppKey("twin_status", TwinStatus)
