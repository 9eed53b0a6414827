"""Every check the pipeline makes, without a repository: ``edgeloader verify`` and ``pack`` run it.

The package checks (package/checks.py) and then the model loaded and warmed up (serving/loader.py).
Blocking; no event loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from supervisor.package.archive import ArchiveLimits
from supervisor.package.checks import Intent, check_package_checksums, package_sha256, read_intent, stage_package
from supervisor.package.reader import Manifest, PackageError
from supervisor.package.signature import Trust
from supervisor.serving.loader import LoadedModel, load_and_warm
from supervisor.settings import Settings

__all__ = ["Validated", "validate_package"]


@dataclass(frozen=True)
class Validated:
    """A package that passed every check (``validate_package``); its model is loaded and warm."""

    sha256: str
    intent: Intent
    manifest: Manifest
    model: LoadedModel


def validate_package(
    package: Path, workdir: Path, settings: Settings, source: str = "cli", trust: Trust | None = None
) -> Validated:
    """Every check the pipeline makes before a package may become active, without a repository:
    checksums, archive safety, manifest, per-file hashes, model load, handler, labels, warm-up.
    Blocking (``edgeloader verify``). The caller owns ``workdir`` and closes ``model.runtime``."""
    if package.is_symlink():
        raise PackageError("the package is a symlink; drop the file or folder itself")
    intent = read_intent(package, source)
    sha = package_sha256(package)
    check_package_checksums(package, sha, intent)
    limits = ArchiveLimits(settings.max_package_files, settings.max_package_bytes, settings.max_compression_ratio)
    if trust is None:
        trust = Trust.load(settings.trusted_keys, settings.require_signature)
    manifest = stage_package(package, workdir, limits, intent, sha, trust)
    model = load_and_warm(workdir, settings.score_threshold, settings.runtime_threads or 1, manifest)
    return Validated(sha, intent, manifest, model)


