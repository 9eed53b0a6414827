"""``edgeloader status | activate NAME VERSION | rollback``: the running service, from a shell on site.

For people on the device without curl: it talks to the service's HTTP API (``--url``, default
``http://127.0.0.1:8080``) with the API token from ``EDGELOADER_API_TOKEN`` when set (the service's own
variable: in the module's container it is already there).
Standard library only: it imports no runtime, no aiohttp, nothing that loads a model, so it answers in a
blink on a small board.

Exit status: 0 done; 1 the service refused (its message is printed: no such version, nothing to roll back
to, a model that fails to load, a wrong token); 2 a usage error; 3 the service could not be reached.
Every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

__all__ = ["main"]

DEFAULT_URL = "http://127.0.0.1:8080"
REFUSED, USAGE, UNREACHABLE = 1, 2, 3


class _Failed(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _call(base: str, method: str, path: str, token: str | None, timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(base.rstrip("/") + path, method=method, data=b"" if method == "POST" else None)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read())["error"]
            message = f"{error['message']} (HTTP {exc.code} {error['code']})"
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code} {exc.reason}"
        if exc.code == 401 and not token:
            message += "; set EDGELOADER_API_TOKEN"
        raise _Failed(message, REFUSED) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Failed(f"cannot reach the service at {base}: {reason}", UNREACHABLE) from None
    except ValueError:
        raise _Failed(f"{base}{path} did not answer JSON: is that the edge-model-loader?", UNREACHABLE) from None
    if not isinstance(body, dict):
        raise _Failed(f"{base}{path} answered something else than a JSON object", UNREACHABLE)
    return body


def _size(n: object) -> str:
    if not isinstance(n, int | float):
        return "?"
    value = float(n)
    for unit in ("B", "KB", "MB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def format_status(doc: dict[str, Any]) -> str:
    """``/models`` as a few lines a person reads."""
    lines = []
    active = doc.get("active")
    if active:
        lines.append(f"active:   {active.get('name')} {active.get('version')} (handler {active.get('handler')}, "
                     f"{active.get('labels')} labels, sha256 {str(active.get('sha256') or '')[:12]})")
    else:
        lines.append("active:   none (no model loaded)")
    lines.append("versions:")
    for v in doc.get("versions") or ():
        mark = "*" if v.get("state") == "active" else " "
        problem = v.get("last_problem")
        note = f"  last problem: {problem.get('reason')}" if isinstance(problem, dict) else ""
        lines.append(f"  {mark} {v.get('name')} {v.get('version')}  {v.get('state')}  {v.get('handler')}  "
                     f"installed {v.get('installed_at')}{note}")
    pending = doc.get("pending") or {}
    for p in pending.get("packages") or ():
        lines.append(f"waiting:  {p.get('package')} in {p.get('source')} ({p.get('state')} since {p.get('since')}, "
                     f"{_size(p.get('bytes'))} so far)")
    for d in pending.get("downloads") or ():
        rate = d.get("bytes_per_second")
        lines.append(f"download: {d.get('package')} {_size(d.get('bytes_done'))} of {_size(d.get('bytes_total'))}"
                     + (f" at {_size(rate)}/s" if rate is not None else ""))
    for r in doc.get("rejected") or ():
        lines.append(f"rejected: {r.get('package')}: {r.get('reason')}")
    twin = doc.get("twin") or {}
    if twin:
        why = f" ({twin['reason']})" if twin.get("reason") else ""
        lines.append(f"twin:     {twin.get('state')}{why}")
        report = twin.get("last_report")
        if isinstance(report, dict):
            lines.append(f"reported: {report.get('State')} {report.get('FileName') or ''} "
                         f"at {report.get('Timestamp')}".rstrip())
    return "\n".join(lines)


def main(argv: list[str], command: str) -> int:
    """``command``: "status", "activate" or "rollback" (the rest of the arguments in ``argv``)."""
    descriptions = {
        "status": "Show the running service's models: active, stored, waiting, downloading, rejected, the twin.",
        "activate": "Make a stored version active (roll back or forward).",
        "rollback": "Go back to the version active before the active one.",
    }
    parser = argparse.ArgumentParser(
        prog=f"edgeloader {command}", description=descriptions[command] + " Exit status: 0 done, 1 refused by "
        "the service, 2 usage, 3 the service could not be reached.",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the service (default {DEFAULT_URL})")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for an answer (an activation loads the model first; default 120)")
    if command == "activate":
        parser.add_argument("name")
        parser.add_argument("version")
    if command == "status":
        parser.add_argument("--json", action="store_true", help="print /models as it is (JSON)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage line
        return USAGE if exc.code else 0
    if not urllib.parse.urlsplit(args.url).scheme.startswith("http"):
        print(f"edgeloader {command}: --url must be http://HOST:PORT, not {args.url!r}", file=sys.stderr)
        return USAGE
    token = os.environ.get("EDGELOADER_API_TOKEN") or None
    try:
        if command == "status":
            doc = _call(args.url, "GET", "/models", token, args.timeout)
            print(json.dumps(doc, indent=2) if args.json else format_status(doc))
            return 0
        if command == "activate":
            path = "/models/{}/{}/activate".format(*(urllib.parse.quote(v, safe="") for v in (args.name, args.version)))
            body = _call(args.url, "POST", path, token, args.timeout)
        else:
            body = _call(args.url, "POST", "/models/rollback", token, args.timeout)
    except _Failed as exc:
        print(f"edgeloader {command}: {exc}", file=sys.stderr)
        return exc.code
    active = body.get("active") or {}
    print(f"active: {active.get('name')} {active.get('version')}")
    return 0
