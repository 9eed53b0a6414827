"""``POST /annotate``: what ``/detect`` found, drawn on the image (a JPEG), for people to look at.

It takes what ``/detect`` takes (the same body forms, ``threshold``, ``max`` and ``labels``) and runs the
same detection; then the picture is decoded again, at most ``MAX_SIDE`` pixels on its long side (JPEGs
decode at reduced scale, inside the same decode memory budget as detection), and each detection is drawn:
its box, its label and score, and its keypoints when it has some. Drawing runs on the engine's worker
pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from PIL import Image, ImageDraw, ImageFont

from handlers.decodecost import decode_cost
from handlers.imaging import ImageDecodeError, decode_image, sniff_format
from supervisor.errors import BadRequest, Busy, PayloadTooLarge
from supervisor.http.keys import ENGINE
from supervisor.http.routes import detect_with_image
from supervisor.serving.membudget import BudgetExceeded, BudgetTimeout

__all__ = ["MAX_SIDE", "draw_detections", "routes"]

routes = web.RouteTableDef()

MAX_SIDE = 1920  # long side of the returned picture, in pixels
# Distinct, saturated colours, one per class id (cycled).
_PALETTE = ((0, 230, 64), (255, 64, 160), (0, 160, 255), (255, 176, 0), (176, 96, 255), (0, 224, 208),
            (255, 96, 32), (160, 224, 0))


def _colour(class_id: object) -> tuple[int, int, int]:
    return _PALETTE[class_id % len(_PALETTE)] if isinstance(class_id, int) else _PALETTE[0]


def _points(det: dict[str, Any]) -> list[tuple[float, float]]:
    """Keypoints as /detect gives them ({"x", "y"} in pixels of the original image; [x, y] pairs too)."""
    found = []
    for p in det.get("keypoints") or ():
        if isinstance(p, dict) and isinstance(p.get("x"), int | float) and isinstance(p.get("y"), int | float):
            found.append((float(p["x"]), float(p["y"])))
        elif isinstance(p, list | tuple) and len(p) >= 2 and all(isinstance(v, int | float) for v in p[:2]):
            found.append((float(p[0]), float(p[1])))
    return found


def draw_detections(image: Image.Image, original_size: tuple[int, int], detections: Sequence[dict[str, Any]],
                    quality: int = 90) -> bytes:
    """``image`` (RGB, any scale of a picture of ``original_size``) with the detections drawn, as JPEG."""
    image = image.copy() if max(image.size) <= MAX_SIDE else image
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    sx, sy = image.width / original_size[0], image.height / original_size[1]
    draw = ImageDraw.Draw(image)
    line = max(2, round(min(image.size) / 200))
    font = ImageFont.load_default(size=max(12, round(min(image.size) / 32)))
    for det in detections:
        box = det.get("box") or {}
        try:
            x0, y0, x1, y1 = (float(box[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (KeyError, TypeError, ValueError):
            continue
        x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
        colour = _colour(det.get("class_id"))
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        score = det.get("score")
        text = f"{det.get('label', '?')} {score:.2f}" if isinstance(score, int | float) else str(det.get("label", "?"))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * line, bottom - top + 2 * line
        # Above the box when there is room, else inside its top edge.
        ty = y0 - th if y0 - th >= 0 else y0
        draw.rectangle((x0, ty, x0 + tw, ty + th), fill=colour)
        draw.text((x0 + line - left, ty + line - top), text, fill=(0, 0, 0), font=font)
        r = line + 1
        for px, py in _points(det):
            px, py = px * sx, py * sy
            draw.ellipse((px - r, py - r, px + r, py + r), fill=colour, outline=(0, 0, 0))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _render(data: bytes, detections: list[dict[str, Any]], max_pixels: int) -> bytes:
    image, original = decode_image(data, (MAX_SIDE, MAX_SIDE), max_pixels)
    return draw_detections(image, original, detections)


@routes.post("/annotate")
async def annotate(request: web.Request) -> web.Response:
    result, data = await detect_with_image(request)  # the query and the body checked as /detect does
    engine = request.app[ENGINE]
    fmt = sniff_format(data)
    try:
        async with engine.decode_budget.reserve(decode_cost(data, fmt, (MAX_SIDE, MAX_SIDE))):
            picture = await asyncio.get_running_loop().run_in_executor(
                engine.executor, _render, data, result.detections, engine.max_image_pixels)
    except BudgetExceeded as exc:
        raise PayloadTooLarge(f"this {fmt} image {exc} for drawing; send a JPEG or a smaller image") from None
    except BudgetTimeout as exc:
        raise Busy(f"busy decoding other large images ({exc}); retry later") from None
    except ImageDecodeError as exc:  # decoded fine for detection a moment ago: only a bug gets here
        raise BadRequest(f"cannot decode the image: {exc}") from exc
    return web.Response(body=picture, content_type="image/jpeg", headers={
        "X-Detections": str(len(result.detections)),
        "X-Model": f"{result.model.name}/{result.model.version}",
    })
