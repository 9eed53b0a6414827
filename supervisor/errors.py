"""Typed errors that carry their HTTP status; api.py turns them into JSON in one place."""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "Busy",
    "EdgeLoaderError",
    "ModelInvalid",
    "NoModelLoaded",
    "NotFound",
    "PayloadTooLarge",
    "RequestTimeout",
    "StartupError",
    "UnsupportedMediaType",
]


class StartupError(RuntimeError):
    """The service cannot start; the message (one line) tells the operator what to fix. The command
    line prints it and exits with status 2."""


class EdgeLoaderError(Exception):
    status = 500
    code = "internal_error"


class BadRequest(EdgeLoaderError):
    status = 400
    code = "bad_request"


class NotFound(EdgeLoaderError):
    status = 404
    code = "not_found"


class RequestTimeout(EdgeLoaderError):
    status = 408
    code = "request_timeout"


class Conflict(EdgeLoaderError):
    status = 409
    code = "conflict"


class PayloadTooLarge(EdgeLoaderError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(EdgeLoaderError):
    status = 415
    code = "unsupported_media_type"


class NoModelLoaded(EdgeLoaderError):
    status = 503
    code = "no_model"


class Busy(EdgeLoaderError):
    """Temporarily out of a shared resource (memory for decoding); the client may retry."""

    status = 503
    code = "busy"


class ModelInvalid(EdgeLoaderError):
    """A model (package) that cannot serve: bad files, no handler, failed warm-up or inference."""

    status = 500
    code = "model_error"
