"""The desired-properties contract of a model update, both ways.

- ``edgeloader twin-patch PACKAGE --url URL`` (``main``) writes it: JSON for
  ``az iot hub module-twin update --desired`` (or, with ``--wrap``, the ``{"properties": {"desired": ...}}``
  form of a deployment manifest), with the package's SHA-256, its MD5 in the base64 form Azure Blob
  Storage uses, and its length.
- ``DesiredModel.parse`` reads it on the device, with a reportable reason for what is malformed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from supervisor.formats import parse_md5, parse_sha256
from supervisor.redact import redact_url

__all__ = ["DesiredModel", "desired_properties", "main"]


def _as_bool(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"{field} must be true or false")


@dataclass(frozen=True)
class DesiredModel:
    """The model package the desired properties ask for."""

    file_name: str
    url: str
    sha256: str | None
    md5: bytes | None
    length: int | None
    name: str | None
    version: str | None
    activate: bool
    desired_version: int | None

    @classmethod
    def parse(cls, desired: Mapping[str, Any]) -> DesiredModel | None:
        """None when no model is asked for; ValueError with a reportable reason when malformed."""
        file_name, url = desired.get("FileName"), desired.get("DownloadUrl")
        if not file_name and not url:
            return None
        if not isinstance(file_name, str) or not file_name:
            raise ValueError("FileName is missing")
        if (
            "/" in file_name or "\\" in file_name or file_name.startswith(".") or len(file_name) > 200
            or file_name.endswith((".part", ".intent.json")) or not file_name.isprintable()
        ):
            raise ValueError("FileName must be a plain file name")
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("DownloadUrl must be an http(s) URL")
        if not urlsplit(url).hostname:
            raise ValueError("DownloadUrl must be an http(s) URL")
        sha = desired.get("ContentSHA256")
        md5 = desired.get("ContentMD5")
        if not sha and not md5:
            raise ValueError("ContentSHA256 or ContentMD5 is required")
        length = desired.get("ContentLength")
        if length is not None:
            if isinstance(length, bool) or not re.fullmatch(r"\d+", str(length)) or int(length) == 0:
                raise ValueError("ContentLength must be a positive whole number of bytes")
            length = int(length)
        version = desired.get("$version")
        return cls(
            file_name=file_name,
            url=url,
            sha256=parse_sha256(str(sha)) if sha else None,
            md5=parse_md5(str(md5)) if md5 else None,
            length=length,
            name=str(desired["ModelName"]) if desired.get("ModelName") else None,
            version=str(desired["ModelVersion"]) if desired.get("ModelVersion") else None,
            activate=_as_bool(desired.get("Activate", True), "Activate"),
            desired_version=version if isinstance(version, int) else None,
        )

    def same_target(self, other: DesiredModel) -> bool:
        """The same request, whatever ``$version`` carries it."""
        return replace(self, desired_version=None) == replace(other, desired_version=None)


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
