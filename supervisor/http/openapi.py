"""The OpenAPI 3.1 document of the HTTP API (a test checks it lists exactly the app's routes)."""

from __future__ import annotations

from typing import Any

from supervisor import __version__
from supervisor.package.manifest import manifest_schema

__all__ = ["openapi_document"]

_ERROR = {"$ref": "#/components/schemas/Error"}
# Model switching needs the token when one is set; an empty requirement says it may be unset.
_TOKEN: list[dict[str, list[str]]] = [{"apiToken": []}, {}]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Bad request (undecodable image, bad query value, too many multipart parts)",
        401: "Missing or wrong API token (only when the service has one)",
        404: "Not found",
        408: "The request body did not arrive in time",
        409: "Conflict: nothing older to roll back to, or the active model does another task "
             "(/detect on an image classifier, /classify on a detector)",
        413: "Body over the size limit, image dimensions over the pixel limit, or a decode over the memory budget",
        415: "Unsupported Content-Type or image format",
        500: "The model failed",
        503: "No model loaded, or busy: no decode memory free in time",
    }
    return {str(c): _json(_ERROR, text[c]) for c in codes}


_IMAGE_BODY = {
    "required": True,
    "content": {
        **{t: {"schema": {"type": "string", "format": "binary"}} for t in
           ("image/jpeg", "image/png", "image/bmp", "image/webp", "application/octet-stream")},
        "multipart/form-data": {
            "schema": {"type": "object", "properties": {"image": {"type": "string", "format": "binary"}},
                       "required": ["image"]}
        },
    },
}

_DETECT_PARAMS = [
    {"name": "threshold", "in": "query", "schema": {"type": "number", "minimum": 0, "maximum": 1},
     "description": "Lowest score returned (default: the model's manifest, else the service setting)"},
    {"name": "max", "in": "query", "schema": {"type": "integer", "minimum": 1},
     "description": "Most detections returned, best first"},
    {"name": "labels", "in": "query", "schema": {"type": "string"},
     "description": "Comma-separated labels to keep, e.g. person,car"},
]

_BOX = {"type": "object", "properties": {k: {"type": "number"} for k in ("xmin", "ymin", "xmax", "ymax")}}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "properties": {"error": {"type": "object", "properties": {
            "code": {"type": "string"}, "message": {"type": "string"}}, "required": ["code", "message"]}},
        "required": ["error"],
    },
    "DetectResponse": {
        "type": "object",
        "properties": {
            "model": {"type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "string"}}},
            "image": {"type": "object", "properties": {"width": {"type": "integer"}, "height": {"type": "integer"}}},
            "detections": {"type": "array", "items": {"type": "object", "properties": {
                "label": {"type": "string"}, "class_id": {"type": "integer"}, "score": {"type": "number"},
                "box": {**_BOX, "description": "pixels of the original image"},
                "box_normalized": {**_BOX, "description": "0..1 of the image size"},
                "keypoints": {"type": "array", "description": "models with keypoints only (MediaPipe face, palm, "
                              "pose): pixels of the original image, not clipped, in the model's order",
                              "items": {"type": "object", "properties": {"x": {"type": "number"},
                                                                         "y": {"type": "number"}}}}}}},
            "timing_ms": {"type": "object", "additionalProperties": {"type": "number"}},
        },
        "required": ["model", "image", "detections"],
    },
    "ClassifyResponse": {
        "type": "object",
        "properties": {
            "model": {"type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "string"}}},
            "image": {"type": "object", "properties": {"width": {"type": "integer"}, "height": {"type": "integer"}}},
            "classes": {"type": "array", "description": "the k likeliest classes, best first", "items": {
                "type": "object", "properties": {
                    "label": {"type": "string"}, "class_id": {"type": "integer"},
                    "score": {"type": "number", "minimum": 0, "maximum": 1, "description": "a probability"}}}},
            "timing_ms": {"type": "object", "additionalProperties": {"type": "number"}},
        },
        "required": ["model", "image", "classes"],
    },
    "ScoreResponse": {
        "type": "object",
        "properties": {"inferences": {"type": "array", "items": {"type": "object"}}},
        "description": "Azure Video Analyzer HTTP extension format",
    },
}


_PAGES: dict[str, Any] = {
    "/annotate": {"post": {
        "summary": "Detect, answering with the image (JPEG) with boxes, labels, scores and keypoints drawn",
        "parameters": _DETECT_PARAMS, "requestBody": _IMAGE_BODY,
        "responses": {"200": {"description": "The picture (at most 1920 pixels on its long side); headers "
                                             "X-Detections (how many) and X-Model (name/version)",
                              "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
                      **_errors(400, 408, 413, 415, 500, 503)}}},
    "/metrics": {"get": {
        "summary": "Prometheus metrics (text exposition format)",
        "responses": {"200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    "/": {"get": {
        "summary": "The status page (HTML) for a browser",
        "parameters": [{"name": "part", "in": "query", "schema": {"enum": ["state"]},
                        "description": "state: only the state part (what the page's script refreshes)"}],
        "responses": {"200": {"description": "The page", "content": {"text/html": {"schema": {"type": "string"}}}},
                      "401": {"description": "part=state without the API token, when every route needs it "
                                             "(EDGELOADER_API_TOKEN_SCOPE=all): the part that asks for it",
                              "content": {"text/html": {"schema": {"type": "string"}}}}}}},
}


def _get(summary: str, ok: str, *errors: int) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": _json({"type": "object"}, ok), **_errors(*errors)}}}


def _schemas() -> dict[str, Any]:
    """The response schemas, and model.json's (for editors and tools reading this document)."""
    manifest = manifest_schema(ref_template="#/components/schemas/{model}")
    option_models = manifest.pop("$defs")
    manifest.pop("$schema")
    return {**_SCHEMAS, "ModelManifest": manifest, **option_models}


def openapi_document() -> dict[str, Any]:
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "edge-model-loader", "version": __version__,
                 "description": "Object detection (or image classification) on the active model of an IoT Edge "
                                "device."},
        "paths": {
            "/detect": {"post": {
                "summary": "Detect objects in an image", "parameters": _DETECT_PARAMS, "requestBody": _IMAGE_BODY,
                "responses": {"200": _json({"$ref": "#/components/schemas/DetectResponse"}, "Detections"),
                              **_errors(400, 408, 409, 413, 415, 500, 503)}}},
            "/classify": {"post": {
                "summary": "Classify an image (the active model must be an image classifier)",
                "parameters": [{"name": "k", "in": "query", "schema": {"type": "integer", "minimum": 1, "default": 5},
                                "description": "How many classes to return, likeliest first"}],
                "requestBody": _IMAGE_BODY,
                "responses": {"200": _json({"$ref": "#/components/schemas/ClassifyResponse"}, "Classes"),
                              **_errors(400, 408, 409, 413, 415, 500, 503)}}},
            "/score": {"post": {
                "summary": "Detect, answering in the Azure video-analytics extension format",
                "parameters": _DETECT_PARAMS, "requestBody": _IMAGE_BODY,
                "responses": {"200": _json({"$ref": "#/components/schemas/ScoreResponse"}, "Inferences"),
                              **_errors(400, 408, 409, 413, 415, 500, 503)}}},
            "/healthz": _get("Liveness", "Alive"),
            "/readyz": _get("Readiness: a model is loaded", "Ready", 503),
            "/v2/health/live": _get("Open Inference Protocol liveness", "Alive"),
            "/v2/health/ready": _get("Open Inference Protocol readiness", "Ready", 503),
            "/v2/models/{name}": {"get": {**_get("Model metadata (inputs, outputs, task)", "Metadata", 404, 503)["get"],
                                          "parameters": [name]}},
            "/v2/models/{name}/ready": {"get": {**_get("Model readiness", "Ready", 404, 503)["get"],
                                                "parameters": [name]}},
            "/models": _get("The repository: versions, states, rejected packages, recent events", "Repository"),
            "/models/{name}/{version}/activate": {"post": {
                "summary": "Make a stored version active (rollback or roll-forward)", "parameters": [name, version],
                "responses": {"200": _json({"type": "object"}, "Now active"), **_errors(401, 404, 500)},
                "security": _TOKEN}},
            "/models/rollback": {"post": {
                "summary": "Go back to the previously active version",
                "responses": {"200": _json({"type": "object"}, "Now active"), **_errors(401, 409, 500)},
                "security": _TOKEN}},
            "/openapi.json": _get("This document", "OpenAPI document"),
            **_PAGES,
        },
        "components": {"schemas": _schemas(), "securitySchemes": {"apiToken": {
            "type": "http", "scheme": "bearer",
            "description": "EDGELOADER_API_TOKEN; needed for model switching when set, for every route "
                           "but the health probes with EDGELOADER_API_TOKEN_SCOPE=all"}}},
    }
