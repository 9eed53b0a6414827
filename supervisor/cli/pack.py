"""``edgeloader pack`` and ``edgeloader verify``: build a model package, check one without a device.

``pack DIR -o model.zip`` writes a zip holding the folder's files and a ``model.json`` whose
``files`` maps each file to its SHA-256 (the pipeline checks them), then runs ``verify`` on it.
The zip is written as ``model.zip.part`` and renamed when complete and verified, so ``-o`` may
point straight into a drop folder.

``verify PACKAGE`` makes every check the pipeline makes before activation (``validate_package``:
checksums, archive safety, manifest, hashes, model load, handler, labels, warm-up on a blank
image) in a temporary folder, touching no repository. Exit status 0: valid, 1: invalid, 2: usage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from handlers.runtimes import RuntimeMissing
from supervisor.errors import ModelInvalid
from supervisor.package.chunking import ChunkParams, chunk_bytes, chunk_file
from supervisor.package.indexed import CHUNKED_MIN_BYTES, write_package
from supervisor.package.manifest import parse_manifest
from supervisor.package.reader import MANIFEST_NAME, PackageError, file_sha256, read_manifest

if TYPE_CHECKING:
    from supervisor.updates.verify import Validated

__all__ = ["pack_main", "verify_main"]

# Fixed timestamp and modes: packing the same folder twice gives the same bytes (the same SHA-256).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_SKIP_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def _fail(message: str, code: int = 1) -> int:
    print(f"edgeloader: {message}", file=sys.stderr)
    return code


# -- pack ------------------------------------------------------------------------------------------


def _package_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_symlink():
            raise PackageError(f"{rel} is a symlink; packages hold regular files only")
        if path.is_dir() or rel.name in _SKIP_NAMES or any(p.startswith(".") for p in rel.parts):
            continue
        if not path.is_file():
            raise PackageError(f"{rel} is not a regular file")
        if rel.as_posix() != MANIFEST_NAME:
            files.append(path)
    return files


def build_manifest(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """model.json for the package: the folder's own one (if any), completed and with hashes."""
    raw: dict[str, Any] = {}
    if (folder / MANIFEST_NAME).is_file():
        raw = json.loads((folder / MANIFEST_NAME).read_text("utf-8"))
        if not isinstance(raw, dict):
            raise PackageError("model.json must hold a JSON object")
    for key in ("name", "version", "handler"):
        value = getattr(args, key)
        if value:
            raw[key] = value
    if args.no_activate:
        raw["activate"] = False
    if args.score_threshold is not None:
        if not 0.0 <= args.score_threshold <= 1.0:
            raise PackageError("--score-threshold must be between 0 and 1")
        raw["score_threshold"] = args.score_threshold
    # read_manifest finds the model and labels files and checks the fields as the pipeline will.
    manifest = read_manifest(folder, fallback_name=str(raw.get("name") or folder.name))
    files = {f.relative_to(folder).as_posix(): file_sha256(f) for f in _package_files(folder)}
    manifest_out = {
        **raw,
        "name": raw.get("name") or manifest.name,
        # No version given: one from the files' contents, so the same files always pack to the same
        # version and different ones never collide (the device does the same from the zip's SHA-256).
        "version": raw.get("version") or content_version(files),
        "model": manifest.model_file,
        "files": files,
    }
    if manifest.labels_file:
        manifest_out["labels"] = manifest.labels_file
    parse_manifest(manifest_out)  # the flags' values (--handler ...) checked as the device will
    return manifest_out


def content_version(files: dict[str, str]) -> str:
    """A version from the files' paths and SHA-256s: 12 hex digits."""
    digest = hashlib.sha256("".join(f"{path}\0{sha}\n" for path, sha in sorted(files.items())).encode())
    return digest.hexdigest()[:12]


def _folder_manifest_has_version(folder: Path) -> bool:
    try:
        raw = json.loads((folder / MANIFEST_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and bool(raw.get("version"))


def write_zip(folder: Path, manifest: dict[str, Any], out: Path, *, index: bool = True,
              compression: str = "chunked") -> None:
    """The package: model.json first, then the files, deterministic, deflated. With ``index`` (the
    default) big files are deflated chunk by chunk and listed in a last member, so that a device
    holding an earlier version fetches only the chunks it lacks (package/indexed.py); it is a plain
    zip all the same, which any release of the module installs."""
    entries: list[tuple[str, bytes | Path]] = [(MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())]
    entries += [(rel, folder / rel) for rel in manifest["files"]]
    if not index:
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, source in entries:
                info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o100644 << 16
                zf.writestr(info, source.read_bytes() if isinstance(source, Path) else source)
        return
    with out.open("wb") as f:
        write_package(f, entries, compression=compression)


def reusable_fraction(folder: Path, files: list[str], previous: Path) -> float:
    """Share of the big files' bytes a device holding the package ``previous`` would not fetch."""
    params = ChunkParams()
    held: set[str] = set()
    with zipfile.ZipFile(previous) as zf:
        for info in zf.infolist():
            if info.file_size >= CHUNKED_MIN_BYTES:
                held.update(c.digest for c in chunk_bytes(zf.read(info), params))
    total = reused = 0
    for rel in files:
        path = folder / rel
        if path.stat().st_size >= CHUNKED_MIN_BYTES:
            for chunk in chunk_file(path, params):
                total += chunk.length
                reused += chunk.length if chunk.digest in held else 0
    return reused / total if total else 0.0


def _choose_compression(args: argparse.Namespace, folder: Path, files: list[str]) -> str:
    if args.compression != "auto":
        return str(args.compression)
    if args.previous is None:
        return "chunked"
    reusable = reusable_fraction(folder, files, args.previous)
    choice = "chunked" if reusable >= 0.10 else "lzma"
    print(f"{reusable:.0%} of the model is in {args.previous.name}: {choice} "
          f"({'devices holding it fetch only the rest' if choice == 'chunked' else 'smallest whole download'})")
    return choice


def pack_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="edgeloader pack",
        description="Build a model package: a zip of DIR with a model.json listing each file's SHA-256. "
        "The package is verified (loaded and warmed up) before it is written.",
    )
    parser.add_argument("folder", type=Path, metavar="DIR", help="folder with the model file and labels")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the zip to write (e.g. model.zip)")
    parser.add_argument("--name", help="model name (default: model.json, else the folder name)")
    parser.add_argument("--version", help="version (default: model.json's, else 12 hex digits from the files' "
                        "contents)")
    parser.add_argument("--handler", help="handler to use (default: matched by the model's signature)")
    parser.add_argument("--score-threshold", type=float, help="default score threshold of the model")
    parser.add_argument("--no-activate", action="store_true", help="install without activating it")
    parser.add_argument("--sha256", action="store_true", help="also write OUTPUT.sha256 beside the zip")
    parser.add_argument("--no-index", action="store_true", help="a zip without the chunk index (devices then "
                        "always download it whole)")
    parser.add_argument("--compression", choices=("auto", "chunked", "lzma"), default="auto",
                        help="chunked: deflated chunk by chunk with an index, so devices fetch only what they lack "
                        "(default); lzma: ~8%% smaller for a device that reuses nothing (a full retrain), fetched "
                        "whole; auto: lzma when --previous shares under 10%% of the model, else chunked")
    parser.add_argument("--previous", type=Path, metavar="PACKAGE",
                        help="the package devices hold now, for --compression auto")
    parser.add_argument("--no-verify", action="store_true", help="skip loading and warming up the model")
    parser.add_argument("--config", type=Path, help="settings file with the package limits")
    args = parser.parse_args(argv)

    folder: Path = args.folder
    out: Path = args.output
    if not folder.is_dir():
        return _fail(f"{folder} is not a folder", 2)
    if out.resolve().is_relative_to(folder.resolve()):
        return _fail("write the package outside the folder being packed", 2)
    versioned = bool(args.version) or _folder_manifest_has_version(folder)
    try:
        manifest = build_manifest(folder, args)
    except (PackageError, ValueError, OSError) as exc:
        return _fail(f"cannot pack {folder}: {exc}")
    out.parent.mkdir(parents=True, exist_ok=True)
    # ".part" until complete and verified: a drop folder's watcher ignores it meanwhile.
    part = out.with_name(out.name + ".part")
    try:
        compression = _choose_compression(args, folder, list(manifest["files"]))
        write_zip(folder, manifest, part, index=not args.no_index, compression=compression)
        if not args.no_verify:
            code = _verify(part, args.config, as_json=False, label=str(out), runtime_optional=True)
            if code != 0:
                return code
        sha = file_sha256(part)
        if args.sha256:
            out.with_name(out.name + ".sha256").write_text(f"{sha}  {out.name}\n", "utf-8")
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    print(f"packed {out}: {manifest['name']} {manifest['version']}, {len(manifest['files'])} files, "
          f"{out.stat().st_size} bytes, sha256 {sha}")
    if not versioned:
        print(f"  version {manifest['version']} is made from the files' contents; --version (or 'version' in "
              "model.json) sets one")
    return 0


# -- verify ----------------------------------------------------------------------------------------


def _verify(
    package: Path, config: Path | None, as_json: bool, label: str | None = None, runtime_optional: bool = False,
    keys: list[Path] | None = None,
) -> int:
    """Exit status of verifying ``package``. ``runtime_optional`` (pack): where the model's runtime is
    not installed (a build machine), every other check still runs, and the package passes with a warning."""
    # Imported here: the runtimes are heavy and `pack --help` should not wait for them.
    from supervisor.package.signature import Trust, TrustError
    from supervisor.settings import load_settings
    from supervisor.updates.verify import validate_package

    try:
        settings = load_settings(config_file=config)
        # --key adds to the settings' trusted keys (a build machine has none configured).
        trust = Trust.load([*settings.trusted_keys, *(keys or [])], settings.require_signature)
    except (ValueError, TrustError) as exc:
        return _fail(str(exc), 2)
    label = label or str(package)
    if not package.exists():
        return _fail(f"{package}: no such file or folder", 2)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeloader-verify-") as tmp:
        try:
            checked = validate_package(package, Path(tmp), settings, trust=trust)
        except ModelInvalid as exc:
            if runtime_optional and isinstance(exc.__cause__, RuntimeMissing):
                print(f"edgeloader: warning: {exc}; the other checks passed (archive, model.json, hashes, "
                      "labels file); run 'edgeloader verify' where the runtime is installed", file=sys.stderr)
                return 0
            return _invalid(label, exc, as_json)
        except (PackageError, OSError) as exc:
            return _invalid(label, exc, as_json)
        checked.model.runtime.close()
    return _report_valid(label, checked, start, as_json)


def _invalid(label: str, exc: Exception, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"package": label, "valid": False, "reason": str(exc)}))
    else:
        print(f"{label}: INVALID: {exc}", file=sys.stderr)
    return 1


def _report_valid(label: str, checked: Validated, start: float, as_json: bool) -> int:
    info, manifest = checked.model.info, checked.manifest
    activate = manifest.activate if checked.intent.activate is None else checked.intent.activate
    report = {
        "package": label,
        "valid": True,
        "name": info.name,
        "version": info.version,
        "handler": info.handler,
        "model_file": info.model_file,
        "model_sha256": info.model_sha256,
        "labels": len(info.labels),
        "labels_source": info.labels_source,
        "files_checked": len(manifest.files),
        "activate": activate,
        "package_sha256": checked.sha256,
        "signer": manifest.signer,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if as_json:
        print(json.dumps(report))
        return 0
    print(f"{label}: valid")
    print(f"  model     {info.name} {info.version} ({info.model_file}, handler {info.handler})")
    names = ", ".join(info.labels[:5]) + (", …" if len(info.labels) > 5 else "")
    if info.labels_source == "none":
        print("  labels    none: detections are labelled class_<id> (add labels.txt to name them)")
    else:
        where = "" if info.labels_source == "file" else " (from the model file)"
        print(f"  labels    {len(info.labels)}{where}: {names}")
    hashes = f"{len(manifest.files)} files match model.json" if manifest.files else "none listed in model.json"
    print(f"  hashes    {hashes}")
    print(f"  activates {'yes' if activate else 'no (stored only)'}")
    print(f"  signed by {_signer_line(manifest.signer)}")
    print(f"  sha256    {checked.sha256}")
    return 0


def _signer_line(signer: Any) -> str:
    if not signer:
        return "nobody (unsigned)"
    fingerprint = signer["fingerprint"]
    if signer.get("verified"):
        return f"{signer['key']} (key sha256:{fingerprint}), signature and files checked"
    return (f"an unknown key (sha256:{fingerprint}): not checked; pass its public key with --key or list it "
            "in trusted_keys")


def verify_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="edgeloader verify",
        description="Check a model package (zip, folder or model file) as the device would before "
        "activating it: archive safety, checksums (model.json and a .sha256/.md5 beside it), model load, "
        "handler, labels, warm-up. Nothing is installed. Exit status 0: valid, 1: invalid.",
    )
    parser.add_argument("package", type=Path, metavar="PACKAGE")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--config", type=Path, help="settings file with the package limits")
    parser.add_argument("--key", type=Path, action="append", metavar="PUB.pem",
                        help="a public key to check the signature against (besides the settings' trusted_keys); "
                        "may be given more than once")
    args = parser.parse_args(argv)
    return _verify(args.package, args.config, args.json, keys=args.key)

