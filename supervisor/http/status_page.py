"""``GET /``: the status page for a person on site, rendered here as HTML (no build step, no CDN).

The page is what ``/models`` says, laid out: the active model, every stored version with an activate
button, rollback, packages waiting in the drop folders, downloads in progress, rejected packages, the
twin's state and its last reported status, recent events; and a test box that sends an image to
``/annotate`` and ``/detect`` and shows the picture with its boxes. Its script (``ui/status.js``)
refreshes the state part every few seconds from ``GET /?part=state`` (the same rendering, so the HTML is
made in one place), and sends the API token, kept in the tab's ``sessionStorage``, as
``Authorization: Bearer`` with each call.

With ``EDGELOADER_API_TOKEN_SCOPE=all`` the page itself loads without a token (a browser's address bar
cannot send one) but shows no state until the script sends the right token. Fields another version of the
service may lack (download byte counts, a task) are shown when present and left out when not.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from functools import cache
from html import escape
from pathlib import Path
from typing import Any

from aiohttp import web

from supervisor import __version__
from supervisor.http.auth import has_token
from supervisor.http.keys import ENGINE, SETTINGS
from supervisor.http.routes import models_document

__all__ = ["render_state", "routes"]

routes = web.RouteTableDef()

_UI = Path(__file__).resolve().parent / "ui"
_EVENTS_SHOWN = 10


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _size(n: object) -> str:
    if not isinstance(n, int | float) or isinstance(n, bool):
        return "?"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "?"


def _when(iso: object) -> str:
    """An ISO 8601 UTC time as a <time> element (the script shows it in the browser's time zone)."""
    if not isinstance(iso, str) or not iso:
        return ""
    return f'<time datetime="{_e(iso)}">{_e(iso.replace("T", " ").removesuffix("Z")[:19])} UTC</time>'


def _table(headers: Iterable[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _active(doc: Mapping[str, Any], task: str | None) -> str:
    active = doc.get("active")
    if not active:
        return '<section id="active"><h2>Active model</h2><p class="empty">No model is loaded.</p></section>'
    sha = str(active.get("sha256") or "")
    items = [("Name", _e(active.get("name"))), ("Version", _e(active.get("version"))),
             ("Handler", _e(active.get("handler"))), ("Task", _e(task or active.get("task") or "detection")),
             ("Labels", _e(active.get("labels"))),
             ("SHA-256", f'<code title="{_e(sha)}">{_e(sha[:12])}</code>')]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    return f'<section id="active"><h2>Active model</h2><dl class="active-model">{dl}</dl></section>'


def _versions(doc: Mapping[str, Any]) -> str:
    rows = []
    for v in doc.get("versions") or ():
        state = str(v.get("state") or "stored")
        sha = str(v.get("sha256") or "")
        problem = v.get("last_problem") or {}
        trouble = f'{_e(problem.get("state"))}: {_e(problem.get("reason"))}' if problem else ""
        button = (
            '<span class="now">serving</span>' if state == "active" else
            f'<button type="button" class="activate" data-name="{_e(v.get("name"))}" '
            f'data-version="{_e(v.get("version"))}">Activate</button>'
        )
        rows.append(
            f'<tr data-model="{_e(v.get("name"))}/{_e(v.get("version"))}" class="state-{_e(state)}">'
            f'<td>{_e(v.get("name"))}</td><td>{_e(v.get("version"))}</td>'
            f'<td><span class="badge {_e(state)}">{_e(state)}</span></td><td>{_e(v.get("handler"))}</td>'
            f'<td><code title="{_e(sha)}">{_e(sha[:12])}</code></td><td>{_e(v.get("source"))}</td>'
            f'<td>{_when(v.get("installed_at"))}</td><td class="problem">{trouble}</td><td>{button}</td></tr>'
        )
    table = _table(("Name", "Version", "State", "Handler", "SHA-256", "From", "Installed", "Last problem", ""),
                   rows, "No version is stored.")
    return (
        '<section id="versions"><h2>Stored versions '
        '<button type="button" id="rollback" title="Back to the version active before this one">Roll back</button>'
        f"</h2>{table}</section>"
    )


def _pending(doc: Mapping[str, Any]) -> str:
    pending = doc.get("pending") or {}
    packages = []
    for p in pending.get("packages") or ():
        packages.append(
            f'<tr><td>{_e(p.get("package"))}</td><td>{_e(p.get("source"))}</td><td>{_e(p.get("state"))}</td>'
            f'<td>{_when(p.get("since"))}</td><td>{"" if p.get("bytes") is None else _size(p.get("bytes"))}</td>'
            "</tr>"
        )
    downloads = []
    for d in pending.get("downloads") or ():
        done, total = d.get("bytes_done"), d.get("bytes_total")
        fraction = done / total if isinstance(done, int) and isinstance(total, int) and total > 0 else None
        bar = (f'<progress max="1" value="{fraction:.3f}"></progress> {fraction:.0%}' if fraction is not None else "")
        rate = d.get("bytes_per_second")
        extra = "".join(
            f" · {label} {_size(d[key])}" for key, label in
            (("bytes_fetched", "fetched"), ("bytes_reused", "reused"), ("bytes_needed", "needed")) if key in d
        )
        downloads.append(
            f'<tr><td>{_e(d.get("package"))}</td><td>{bar}</td>'
            f'<td>{_size(done)} of {_size(total) if total is not None else "?"}{extra}</td>'
            f'<td>{_size(rate) + "/s" if rate is not None else ""}</td><td>{_when(d.get("since"))}</td></tr>'
        )
    return (
        '<section id="pending"><h2>Waiting and downloading</h2>'
        + _table(("Package", "Folder", "State", "Since", "So far"), packages, "Nothing is waiting in the drop folders.")
        + _table(("Download", "Progress", "Bytes", "Rate", "Since"), downloads, "No download in progress.")
        + "</section>"
    )


def _rejected(doc: Mapping[str, Any]) -> str:
    rows = [
        f'<tr><td>{_e(r.get("package"))}</td><td class="reason">{_e(r.get("reason"))}</td>'
        f'<td>{_when(r.get("at"))}</td></tr>'
        for r in reversed(doc.get("rejected") or ())
    ]
    return ('<section id="rejected"><h2>Rejected packages</h2>'
            + _table(("Package", "Reason", "When"), rows, "No package was rejected.") + "</section>")


def _twin(doc: Mapping[str, Any]) -> str:
    twin = doc.get("twin") or {}
    state = twin.get("state") or "unknown"
    items = [("State", f'<span class="badge twin-{_e(state)}">{_e(state)}</span>')]
    if twin.get("mode"):
        items.append(("Mode", _e(twin["mode"])))
    if twin.get("reason"):
        items.append(("Why", _e(twin["reason"])))
    if twin.get("since"):
        items.append(("Since", _when(twin["since"])))
    report = twin.get("last_report")
    if isinstance(report, Mapping):
        shown = ", ".join(f"{_e(k)}: {_e(v)}" for k, v in report.items() if v is not None and k != "Timestamp")
        items.append(("Last reported", f'{shown} <span class="muted">{_e(report.get("Timestamp"))}</span>'))
    else:
        items.append(("Last reported", '<span class="muted">nothing yet</span>'))
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    return f'<section id="twin"><h2>IoT Hub twin</h2><dl>{dl}</dl></section>'


def _events(doc: Mapping[str, Any]) -> str:
    rows = []
    for ev in list(doc.get("events") or ())[-_EVENTS_SHOWN:][::-1]:
        what = " ".join(filter(None, (str(ev.get("name") or ""), str(ev.get("version") or ""))))
        rows.append(
            f'<tr><td>{_when(ev.get("at"))}</td><td><span class="badge {_e(ev.get("state"))}">{_e(ev.get("state"))}'
            f'</span></td><td>{_e(ev.get("source"))}</td><td>{_e(ev.get("package"))}</td><td>{_e(what)}</td>'
            f'<td class="reason">{_e(ev.get("reason"))}</td></tr>'
        )
    return ('<section id="events"><h2>Recent events</h2>'
            + _table(("When", "State", "From", "Package", "Model", "Note"), rows, "No event yet.") + "</section>")


def render_state(doc: Mapping[str, Any], task: str | None = None) -> str:
    """The state part of the page, from a ``/models`` document."""
    return "".join((_active(doc, task), _versions(doc), _pending(doc), _rejected(doc), _twin(doc), _events(doc)))


_LOCKED = ('<section id="locked"><h2>API token needed</h2><p>This device shows its state only to holders of its '
           "API token (<code>EDGELOADER_API_TOKEN</code>). Enter it above.</p></section>")


@cache
def _assets() -> tuple[str, str]:
    """The page's skeleton, style and script, and the Content-Security-Policy that allows exactly them."""
    css = (_UI / "status.css").read_text("utf-8")
    js = (_UI / "status.js").read_text("utf-8")
    html = (_UI / "status.html").read_text("utf-8")

    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    csp = (f"default-src 'none'; script-src {digest(js)}; style-src {digest(css)}; img-src 'self' blob: data:; "
           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    # Plain replacement, not a template engine: the script's own ${...} must stay as written.
    page = html.replace("{{version}}", _e(__version__)).replace("{{css}}", css).replace("{{js}}", js)
    return page, csp


@routes.get("/")
async def status_page(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    allowed = not (settings.api_token and settings.api_token_scope == "all"
                   and not has_token(request, settings.api_token))
    if allowed:
        engine = request.app.get(ENGINE)
        model = engine.active if engine is not None else None
        task = getattr(model.handler, "task", None) if model is not None else None
        state = render_state(await models_document(request), task if isinstance(task, str) else None)
    else:
        state = _LOCKED
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    if request.query.get("part") == "state":
        # What the script polls: the state part alone. 401 tells it the token is missing or wrong.
        return web.Response(text=state, content_type="text/html", status=200 if allowed else 401, headers=headers)
    page, csp = _assets()
    headers["Content-Security-Policy"] = csp
    # The state last: whatever a package name in it says, nothing is replaced after it.
    body = page.replace("{{token_needed}}", "true" if settings.api_token else "false").replace("{{state}}", state)
    return web.Response(text=body, content_type="text/html", headers=headers)
