"""``edgeloader twin-patch PACKAGE --url URL``: the desired properties that point devices at a package.

JSON for ``az iot hub module-twin update --desired`` (or, with ``--wrap``, the
``{"properties": {"desired": ...}}`` form of a deployment manifest), with the package's SHA-256, its
MD5 in the base64 form Azure Blob Storage uses, and its length. The device side of the contract is
twin/desired.py."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from supervisor.redact import redact_url

__all__ = ["desired_properties", "main"]


def desired_properties(
    package: Path,
    url: str,
    *,
    name: str | None = None,
    version: str | None = None,
    activate: bool = True,
    file_name: str | None = None,
) -> dict[str, Any]:
    """The desired-properties document for ``package`` served at ``url``."""
    sha256, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with package.open("rb") as f:
        while block := f.read(1 << 20):
            sha256.update(block)
            md5.update(block)
            size += len(block)
    desired: dict[str, Any] = {
        "FileName": file_name or package.name,
        "DownloadUrl": url,
        "ContentSHA256": sha256.hexdigest(),
        "ContentMD5": base64.b64encode(md5.digest()).decode(),
        "ContentLength": size,
        "Activate": activate,
    }
    if name:
        desired["ModelName"] = name
    if version:
        desired["ModelVersion"] = version
    return desired


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="edgeloader twin-patch",
        description="Print the module-twin desired properties that make devices download PACKAGE.",
    )
    parser.add_argument("package", type=Path, help="the package file, as uploaded")
    parser.add_argument("--url", required=True, help="where devices download it (usually a blob SAS URL)")
    parser.add_argument("--name", help="ModelName, used when the package's manifest names none")
    parser.add_argument("--version", dest="model_version", help="ModelVersion, as --name")
    parser.add_argument("--file-name", help="FileName on the device (default: the package's file name)")
    parser.add_argument("--no-activate", action="store_true", help="install it, but keep the active model")
    parser.add_argument("--wrap", action="store_true", help='print {"properties": {"desired": ...}}')
    args = parser.parse_args(argv)

    if not args.package.is_file():
        print(f"edgeloader twin-patch: no such file: {args.package}", file=sys.stderr)
        return 2
    if urlsplit(args.url).scheme not in ("http", "https"):
        print("edgeloader twin-patch: --url must be an http(s) URL", file=sys.stderr)
        return 2
    desired = desired_properties(
        args.package, args.url, name=args.name, version=args.model_version,
        activate=not args.no_activate, file_name=args.file_name,
    )
    if "sig=" not in args.url and urlsplit(args.url).hostname and ".blob." in args.url:
        print("edgeloader twin-patch: warning: the URL has no SAS signature (sig=); a private container "
              "will answer 403", file=sys.stderr)
    document = {"properties": {"desired": desired}} if args.wrap else desired
    print(json.dumps(document, indent=2))
    print(f"edgeloader twin-patch: {desired['FileName']} ({desired['ContentLength']} bytes) from "
          f"{redact_url(args.url)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
