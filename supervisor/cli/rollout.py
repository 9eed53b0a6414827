"""``edgeloader rollout``: a layered IoT Edge deployment that points a group of devices at a model package.

IoT Hub's own rollout engine does the work: an automatic (layered) deployment sets the module twin's
desired properties (the same ones ``edgeloader twin-patch`` prints) on every device whose twin matches a
target condition (``tags.modelRing='canary'``), the highest priority winning where several match. Its
custom metrics are IoT Hub queries over what each module reports in ``ModelUpdate`` (twin/reporter.py,
docs/twin.md), so the portal and ``az iot edge deployment show-metric`` count the devices that applied the
model, are still downloading or installing it, or failed.

The file is an IoT Hub configuration (``id``, ``labels``, ``content``, ``metrics``, ``targetCondition``,
``priority``). ``az iot edge deployment create --layered`` reads ``content`` from it with ``--content FILE``
and ``metrics`` with ``--metrics FILE``; the target condition and priority are passed as flags (the command
is printed on stderr). Nothing here imports a runtime, aiohttp or the IoT Hub SDK.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from supervisor.cli.twinpatch import desired_properties
from supervisor.redact import redact_url
from supervisor.twin.desired import DesiredModel

__all__ = ["METRICS", "TWIN_FIELDS", "deployment", "main", "metric_queries"]

MODULE = "edgemodelloader"  # the module's name in deployment.template.json
# Every desired property the module reads: a layered deployment replaces the module's whole desired
# document, so the ones it does not set are written empty (absent for the device).
TWIN_FIELDS = ("FileName", "DownloadUrl", "ContentSHA256", "ContentMD5", "ContentLength", "ModelName",
               "ModelVersion", "Activate")

# ModelUpdate.State values (docs/twin.md) per metric. "applied" is "active", or "stored" for a request
# with Activate false; "rolled_back" (the new model kept failing on real requests) counts as failed.
METRICS: dict[str, tuple[str, ...]] = {
    "applied": ("active",),
    "downloading": ("downloading",),
    "installing": ("verifying", "activating"),
    "failed": ("failed", "rolled_back"),
}
_ID = re.compile(r"[a-z0-9][a-z0-9\-:+%_#*?!(),=@;$']{0,127}")


def _literal(value: str) -> str:
    if "'" in value or "\\" in value:
        raise ValueError(f"{value!r}: quotes and backslashes cannot appear in a query literal")
    return f"'{value}'"


def metric_queries(file_name: str, *, activate: bool = True, module: str = MODULE) -> dict[str, str]:
    """One IoT Hub query per metric: the modules whose reported ``ModelUpdate`` answers this package."""
    queries = {}
    for metric, states in METRICS.items():
        if metric == "applied" and not activate:
            states = ("stored",)
        state = (f"= {_literal(states[0])}" if len(states) == 1
                 else f"IN [{', '.join(map(_literal, states))}]")
        queries[metric] = (
            f"SELECT deviceId FROM devices.modules WHERE moduleId = {_literal(module)}"
            f" AND properties.reported.ModelUpdate.FileName = {_literal(file_name)}"
            f" AND properties.reported.ModelUpdate.State {state}"
        )
    return queries


def deployment(
    desired: dict[str, Any],
    *,
    deployment_id: str,
    target_condition: str,
    priority: int,
    module: str = MODULE,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The layered deployment (an IoT Hub configuration) that sets ``desired`` on ``module``."""
    model = DesiredModel.parse(desired)  # what the device will make of it: refuse what it would refuse
    if model is None:
        raise ValueError("the desired properties ask for no package (FileName and DownloadUrl are needed)")
    if not _ID.fullmatch(deployment_id):
        raise ValueError(f"deployment id {deployment_id!r}: lowercase letters, digits and -:+%_#*?!(),=@;$' "
                         "only, at most 128")
    if priority < 0:
        raise ValueError("the priority must be 0 or more")
    if not target_condition.strip():
        raise ValueError("a target condition is needed (e.g. \"tags.modelRing='canary'\")")
    # Empty is what the device reads as absent (and what deployment.template.json starts from).
    document = {field: desired.get(field, True if field == "Activate" else "") for field in TWIN_FIELDS}
    return {
        "id": deployment_id,
        "labels": {"app": "edge-model-loader", "fileName": model.file_name, **(labels or {})},
        "content": {"modulesContent": {module: {"properties.desired": document}}},
        "metrics": {"queries": metric_queries(model.file_name, activate=model.activate, module=module)},
        "targetCondition": target_condition,
        "priority": priority,
    }


def _shell_word(text: str) -> str:
    """``text`` quoted for a POSIX shell, in double quotes when that reads better (conditions hold ')."""
    if "'" in text and not any(c in text for c in '"$`\\!'):
        return f'"{text}"'
    return shlex.quote(text)


def default_id(file_name: str, priority: int) -> str:
    stem = file_name.rsplit(".", 1)[0].lower()
    return re.sub(r"[^a-z0-9-]+", "-", f"eml-{stem}-p{priority}").strip("-")[:128]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="edgeloader rollout",
        description="Write a layered IoT Edge deployment that makes the devices matching a target condition "
        "download PACKAGE, with metrics that count the devices per update state (docs/deployment.md).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("package", type=Path, nargs="?", help="the package file, as uploaded (with --url)")
    source.add_argument("--patch", type=Path, help="the desired properties `edgeloader twin-patch` printed")
    parser.add_argument("--url", help="where devices download PACKAGE (usually a blob SAS URL)")
    parser.add_argument("--name", help="ModelName, used when the package's manifest names none")
    parser.add_argument("--version", dest="model_version", help="ModelVersion, as --name")
    parser.add_argument("--file-name", help="FileName on the device (default: the package's file name)")
    parser.add_argument("--no-activate", action="store_true", help="install it, but keep the active model")
    parser.add_argument("--target-condition", required=True,
                        help="which devices, e.g. \"tags.modelRing='canary'\" (IoT Hub twin query syntax)")
    parser.add_argument("--priority", type=int, required=True,
                        help="the highest priority of the deployments that target a device wins")
    parser.add_argument("--id", dest="deployment_id", help="deployment id (default: eml-<file>-p<priority>)")
    parser.add_argument("--module", default=MODULE, help=f"the module's name in the manifest (default {MODULE})")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a deployment label")
    parser.add_argument("-o", "--output", type=Path, help="write the deployment here (default: stdout)")
    parser.add_argument("--hub-name", default="<hub>", help="IoT hub name, for the printed az command")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"edgeloader rollout: {message}", file=sys.stderr)
        return 2

    if args.patch is not None:
        if args.url or args.name or args.model_version or args.file_name or args.no_activate:
            return fail("--patch carries the desired properties already: no --url, --name, --version, "
                        "--file-name or --no-activate with it")
        try:
            desired = json.loads(args.patch.read_text())
        except (OSError, ValueError) as exc:
            return fail(f"--patch {args.patch}: {exc}")
        if isinstance(desired, dict) and set(desired) == {"properties"}:  # twin-patch --wrap
            desired = desired["properties"].get("desired")
        if not isinstance(desired, dict):
            return fail(f"--patch {args.patch}: not a JSON object of desired properties")
    else:
        if not args.package.is_file():
            return fail(f"no such file: {args.package}")
        if not args.url or urlsplit(args.url).scheme not in ("http", "https"):
            return fail("--url (an http(s) URL) is needed with PACKAGE")
        desired = desired_properties(
            args.package, args.url, name=args.name, version=args.model_version,
            activate=not args.no_activate, file_name=args.file_name,
        )
    labels = {}
    for label in args.label:
        key, sep, value = label.partition("=")
        if not sep or not key:
            return fail(f"--label {label!r}: KEY=VALUE")
        labels[key] = value
    file_name = str(desired.get("FileName") or "")
    deployment_id = args.deployment_id or default_id(file_name or "model", args.priority)
    try:
        document = deployment(desired, deployment_id=deployment_id, target_condition=args.target_condition,
                              priority=args.priority, module=args.module, labels=labels)
    except ValueError as exc:
        return fail(str(exc).splitlines()[0])

    text = json.dumps(document, indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        quoted = "FILE"
    else:
        args.output.write_text(text)
        quoted = _shell_word(str(args.output))
    print(f"edgeloader rollout: {file_name} from {redact_url(str(desired.get('DownloadUrl', '')))} for "
          f"{args.target_condition} at priority {args.priority}. Create it with:\n"
          f"  az iot edge deployment create --layered --hub-name {args.hub_name} --deployment-id {deployment_id}"
          f" --content {quoted} --metrics {quoted} --target-condition {_shell_word(args.target_condition)}"
          f" --priority {args.priority}\n"
          f"and count devices with: az iot edge deployment show-metric --hub-name {args.hub_name} "
          f"--deployment-id {deployment_id} --metric-id applied  (or downloading, installing, failed)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
