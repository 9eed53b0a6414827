"""The one way a model becomes active: package -> validated -> installed -> warm -> flipped.

Whatever brought the package (drop folder, download, CLI, API activate or rollback), it ends
here. Steps run one at a time (a lock), the blocking ones in the engine's worker pool. The
pipeline emits events; it never talks to IoT Hub itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from supervisor.diskspace import RESERVE_BYTES, is_disk_full
from supervisor.errors import Conflict, ModelInvalid, NotFound, StartupError
from supervisor.formats import ACTIVATED_MARKER, ACTIVATIONS_FILE, TMP_PREFIX
from supervisor.fsutil import remove_tree
from supervisor.package.archive import ArchiveLimits, unpack_package
from supervisor.package.checks import (
    Intent,
    check_package_checksums,
    package_sha256,
    read_intent,
    sidecars,
    stage_package,
)
from supervisor.package.indexed import CHUNKED_MIN_BYTES
from supervisor.package.paths import public_reason
from supervisor.package.reader import PackageError, read_manifest
from supervisor.package.reasons import user_reason
from supervisor.package.signature import Trust, TrustError
from supervisor.serving.engine import Engine
from supervisor.serving.loader import LoadedModel
from supervisor.settings import Settings
from supervisor.updates.events import EventBus, ModelEvent, State
from supervisor.updates.history import ActivationHistory
from supervisor.updates.late_sidecar import is_checksum_sidecar, judge_late_sidecar
from supervisor.updates.quarantine import Quarantine, tree_size
from supervisor.updates.repository import InstalledVersion, Repository
from supervisor.updates.space import SpaceWait

__all__ = ["Pipeline"]

log = structlog.get_logger(__name__)

T = TypeVar("T")


class Pipeline:
    """Stage -> validate -> install -> warm up -> flip, and activation of stored versions."""

    def __init__(self, settings: Settings, repo: Repository, engine: Engine, events: EventBus) -> None:
        self.settings = settings
        self.repo = repo
        self.engine = engine
        self.events = events
        self.quarantine = Quarantine(repo.quarantine_dir, settings.quarantine_keep, settings.quarantine_max_bytes)
        # Packages that met a full disk: tried again when space returns (space.py).
        self.space_wait = SpaceWait(repo.data_dir, self.process)
        self.limits = ArchiveLimits(
            settings.max_package_files, settings.max_package_bytes, settings.max_compression_ratio
        )
        self.history = ActivationHistory(repo.data_dir / ACTIVATIONS_FILE)
        try:
            self.trust = Trust.load(settings.trusted_keys, settings.require_signature)
        except TrustError as exc:
            raise StartupError(str(exc)) from None
        self._lock = asyncio.Lock()
        self._rollback_task: asyncio.Task[None] | None = None
        engine.on_failure_streak = self._on_failure_streak

    # -- the interface other services use ---------------------------------------------------------

    @property
    def staging_dir(self) -> Path:
        return self.repo.staging_dir

    def find_package(self, sha256: str) -> tuple[str, str] | None:
        version = self.repo.find_by_package_sha256(sha256)
        return version.key if version else None

    def stored_files(self) -> list[tuple[Path, str]]:
        """(path, SHA-256) of every stored version's files big enough to be chunked in a package (the
        install record keeps their hashes): what a twin download may reuse. Blocking."""
        found = []
        for version in self.repo.versions():
            hashes = version.record.get("file_sha256")
            if not isinstance(hashes, dict):
                continue
            for rel, sha in sorted(hashes.items()):
                if not (isinstance(rel, str) and isinstance(sha, str)) or any(
                        p in ("", "..") or p.startswith(".") for p in rel.split("/")):
                    continue
                path = version.path / rel
                try:
                    if path.is_file() and not path.is_symlink() and path.stat().st_size >= CHUNKED_MIN_BYTES:
                        found.append((path, sha))
                except OSError:
                    continue
        return found

    def active(self) -> ModelEvent | None:
        model = self.engine.active
        if model is None:
            return None
        stored = self.repo.get(model.info.name, model.info.version)
        record = stored.record if stored else {}
        return self._active_event(model, "startup", record.get("package") or "", record.get("package_sha256"),
                                  record.get("signer"))

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.engine.loader, fn, *args)

    def _emit(self, state: State, source: str, package: str, **fields: Any) -> None:
        self.events.publish(ModelEvent(state=state, source=source, package=package, **fields))

    def _active_event(
        self, model: LoadedModel, source: str, package: str, sha: str | None = None, signer: object = None
    ) -> ModelEvent:
        info = model.info
        rel = info.path.relative_to(self.repo.data_dir)
        return ModelEvent(
            state="active", source=source, package=package, name=info.name, version=info.version,
            sha256=sha, model_sha256=info.model_sha256, model_path=str(rel / info.model_file),
            labels_path=str(rel / info.labels_file) if info.labels_file else None,
            signer=signer_text(signer),
        )

    # -- start-up ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Repair the disk, then serve current, else the newest valid version, else the bundled default."""
        await self._blocking(self.repo.repair)
        current, previous = await self._blocking(lambda: (self.repo.current(), self.repo.previous()))
        try:
            await self._blocking(self.history.seed, [v.key if v else None for v in (previous, current)])
        except OSError as exc:  # a full disk must not keep the service from serving what it has
            log.error("activation_history_not_written", error=str(exc))
        candidates = [current] if current else []
        stored = await self._blocking(self.repo.versions)
        candidates += [v for v in reversed(stored) if current is None or v.key != current.key]
        async with self._lock:
            for version in candidates:
                try:
                    model = await self._load_stored(version)
                except ModelInvalid as exc:
                    log.error("stored_model_unusable", name=version.name, version=version.version, reason=str(exc))
                    continue
                await self._make_active(model, version, "startup", version.record.get("package", ""))
                return
            await self._install_bundled_default()

    async def _install_bundled_default(self) -> None:
        bundled = self.settings.bundled_model
        manifest = await self._blocking(read_manifest, bundled)
        version = await self._blocking(self.repo.get, manifest.name, manifest.version)
        if version is not None:
            model = await self.engine.load(version.path, key=version.key)
        else:
            workdir = await self._blocking(self.repo.new_workdir)
            try:
                await self._blocking(unpack_package, bundled, workdir, self.limits)
                model = await self.engine.load(workdir, manifest)
                record = {"package": "bundled", "source": "bundled", "package_sha256": None, **_model_record(model)}
                version = await self._blocking(self.repo.install, workdir, manifest.name, manifest.version, record)
            except BaseException:
                await self._blocking(remove_tree, workdir)
                raise
            model.info = dataclasses.replace(model.info, path=version.path)
        await self._make_active(model, version, "startup", "bundled")

    # -- packages ---------------------------------------------------------------------------------

    async def process(self, package: Path, source: str) -> InstalledVersion | None:
        """Take one complete package (file or folder): install it, maybe activate it, or
        quarantine it with the reason. Never raises for a bad package."""
        async with self._lock:
            if not (package.exists() or package.is_symlink()):
                return None
            if is_checksum_sidecar(package.name) and package.is_file():
                await self._late_sidecar(package, source)
                return None
            name = package.name
            sha: str | None = None
            reason: str | None
            try:
                # Sidecars and the intent are read in the loader thread: they are untrusted files
                # of any size until checked, and the event loop serves requests meanwhile.
                intent = await self._blocking(read_intent, package, source)
            except PackageError as exc:
                intent, reason = Intent(source=source), str(exc)
            else:
                reason = None
            source = intent.source
            self._emit("received", source, name)
            try:
                if reason is not None:
                    raise PackageError(reason)  # a sidecar that is not what it claims to be
                if package.is_symlink():
                    raise PackageError("the package is a symlink; drop the file or folder itself")
                sha = await self._blocking(package_sha256, package)
                return await self._process_locked(package, name, sha, intent)
            except (PackageError, ModelInvalid, FileExistsError, OSError) as exc:
                if is_disk_full(exc):
                    await self._disk_full(package, source, name, sha, exc)
                    return None
                reason = str(exc) if not isinstance(exc, FileExistsError) else f"{exc}, with other content"
                # The full text (a runtime's own error) for the log; the user gets the short one.
                log.info("package_rejected_detail", package=name, detail=str(exc.__cause__ or exc))
            except Exception as exc:
                if is_disk_full(exc):
                    await self._disk_full(package, source, name, sha, exc)
                    return None
                # A bug of ours or a library's met on this package: quarantine it all the same, with
                # the reason (visible in /models), rather than leave it in the folder unexplained.
                log.exception("package_processing_error", package=name)
                reason = f"unexpected error while processing the package: {type(exc).__name__}: {exc}"
            # Shown in /models, reason.json and the twin: relative to the package, short, printable,
            # no device path; the log keeps the whole text.
            shown = public_reason(user_reason(reason, self.repo.data_dir))
            if shown != reason:
                log.info("package_rejected_detail", package=name, detail=reason)
            reason = shown
            await self._blocking(self.quarantine.add, package, reason, sha, sidecars(package))
            self._emit("rejected", source, name, sha256=sha, reason=reason)
            return None

    async def _disk_full(self, package: Path, source: str, name: str, sha: str | None, exc: BaseException) -> None:
        """The disk filled up (or would have): the device's condition, not the package's defect. The
        package stays where it is, its hash is not remembered as bad, nothing is copied to quarantine,
        and it is tried again when space returns (or dropped again, or after a restart)."""
        needed = getattr(exc, "needed", None)
        if needed is None:
            needed = await self._blocking(tree_size, package) + RESERVE_BYTES  # about what unpacking takes
        where = "staging/" if source in ("twin", "staging") else "inbox/"
        detail = user_reason(str(exc), self.repo.data_dir) if getattr(exc, "needed", None) else "no space left"
        reason = public_reason(f"the device's disk is full ({detail}); not the package's fault: it stays in "
                               f"{where} and is tried again when space returns")
        log.error("package_deferred_disk_full", package=name, detail=str(exc), needed=needed)
        self._emit("failed", source, name, sha256=sha, reason=reason)
        self.space_wait.add(package, source, needed)

    async def _late_sidecar(self, sidecar: Path, source: str) -> None:
        """A checksum sidecar whose package had already been taken (late_sidecar.py)."""
        reason = await self._blocking(judge_late_sidecar, sidecar, self.repo, self.quarantine)
        if reason is None:
            log.info("late_sidecar_matches", sidecar=sidecar.name)
            await self._blocking(sidecar.unlink, True)
            return
        await self._blocking(self.quarantine.add, sidecar, reason, None)
        self._emit("rejected", source, sidecar.name, reason=reason)

    async def _process_locked(self, package: Path, name: str, sha: str, intent: Intent) -> InstalledVersion | None:
        source = intent.source
        await self._blocking(check_package_checksums, package, sha, intent)
        installed, rejected_before = await self._blocking(
            lambda: (self.repo.find_by_package_sha256(sha), self.quarantine.seen(sha)))
        if installed is not None or rejected_before:
            activated = await self._activate_again_if_wanted(installed, intent, name, sha)
            await self._blocking(_remove_package, package)
            if activated:
                return installed
            self._emit("duplicate", source, name, sha256=sha,
                       name=installed.name if installed else None,
                       version=installed.version if installed else None,
                       reason="already installed" if installed else "already rejected (see quarantine)")
            return installed
        self._emit("validating", source, name, sha256=sha)
        workdir = await self._blocking(self.repo.new_workdir)
        try:
            manifest = await self._blocking(stage_package, package, workdir, self.limits, intent, sha, self.trust)
            # Load and warm up from the workdir: a model that fails never reaches models/.
            model = await self.engine.load(workdir, manifest)
        except BaseException:
            await self._blocking(remove_tree, workdir)
            raise
        activate = manifest.activate if intent.activate is None else intent.activate
        record = {"package": name, "package_sha256": sha, "source": source, "activate": activate,
                  **_model_record(model), "file_sha256": dict(manifest.hashes), "signer": manifest.signer}
        try:
            version = await self._blocking(self.repo.install, workdir, manifest.name, manifest.version, record)
        except BaseException:
            await self._blocking(model.runtime.close)
            await self._blocking(remove_tree, workdir)
            raise
        # The runtime was loaded from the workdir; re-point the model's info at its new home.
        model.info = dataclasses.replace(model.info, path=version.path)
        if activate:
            self._emit("activating", source, name, sha256=sha, name=version.name, version=version.version)
            await self._make_active(model, version, source, name, sha)
        else:
            await self._blocking(model.runtime.close)
            self._emit("stored", source, name, sha256=sha, name=version.name, version=version.version)
        await self._blocking(_remove_package, package)
        await self._blocking(self.repo.prune, self.settings.keep_versions)
        return version

    async def _activate_again_if_wanted(
        self, installed: InstalledVersion | None, intent: Intent, name: str, sha: str
    ) -> bool:
        """A package dropped again that is already installed: make its version active again when the
        sender's intent or, failing that, the package's own manifest asks for activation (as ``--model``
        with the same file does). This also finishes an install that a crash interrupted before the flip.
        Returns whether it activated."""
        if installed is None:
            return False
        wanted = intent.activate
        if wanted is None:
            wanted = await self._blocking(_manifest_activates, installed)
        active = self.engine.active
        if not wanted or (active is not None and (active.info.name, active.info.version) == installed.key):
            return False
        self._emit("activating", intent.source, name, sha256=sha, name=installed.name, version=installed.version,
                   reason="already installed: activated again")
        model = await self._load_stored(installed)
        await self._make_active(model, installed, intent.source, name, sha)
        return True

    async def _load_stored(self, version: InstalledVersion) -> LoadedModel:
        """Load a stored version; its install record must name files inside its folder."""
        try:
            version.check_record()
        except PackageError as exc:
            raise ModelInvalid(str(exc)) from exc
        recorded = version.record.get("file_sha256")
        hashes = recorded if isinstance(recorded, dict) else None  # hashed once, at install
        return await self.engine.load(version.path, key=version.key, hashes=hashes)

    async def _make_active(
        self, model: LoadedModel, version: InstalledVersion, source: str, package: str, sha: str | None = None,
        *, rollback: bool = False,
    ) -> None:
        # Flip first: a crash between the two leaves the version current (start-up serves it);
        # the other order would leave it marked but never active, and its package a "duplicate".
        try:
            await self._blocking(self.repo.flip, version)
        except BaseException:
            await self._blocking(model.runtime.close)  # the old model serves on; this one is not used
            raise
        try:
            await self._blocking(_mark_activated, version.path)
            await self._blocking(self.history.rolled_back_to if rollback else self.history.record, version.key)
        except OSError as exc:
            # After the flip the disk says this version is current, so the engine must serve it too:
            # a marker or a history entry a full disk refused costs a less precise rollback, no more.
            log.error("activation_record_not_written", name=version.name, version=version.version, error=str(exc))
        await self.engine.swap(model)
        self.events.publish(self._active_event(model, source, package, sha, version.record.get("signer")))

    # -- activation of stored versions --------------------------------------------------------------

    async def activate(self, name: str, version: str, source: str = "api") -> InstalledVersion:
        """Switch to a stored version (roll back or forward). Raises NotFound / ModelInvalid."""
        async with self._lock:
            return await self._activate_stored(name, version, source)

    async def _activate_stored(self, name: str, version: str, source: str, rollback: bool = False) -> InstalledVersion:
        stored = await self._blocking(self.repo.get, name, version)
        if stored is None:
            raise NotFound(f"model {name} version {version} is not in the repository")
        active = self.engine.active
        if active is not None and (active.info.name, active.info.version) == stored.key:
            return stored
        package = stored.record.get("package", "")
        self._emit("activating", source, package, name=name, version=version)
        try:
            model = await self._load_stored(stored)
        except ModelInvalid as exc:
            self._emit("failed", source, package, name=name, version=version, reason=public_reason(str(exc)))
            raise
        await self._make_active(model, stored, source, package, stored.package_sha256, rollback=rollback)
        return stored

    async def rollback(self, source: str = "api", reason: str | None = None) -> InstalledVersion:
        """Back to the version active before the active one (see history.py); each call goes one
        further back. Raises Conflict when there is nothing older."""
        async with self._lock:
            left = self.engine.active
            current = (left.info.name, left.info.version) if left else None
            target = await self._blocking(self.history.rollback_target, current,
                                          lambda key: self.repo.get(*key) is not None)
            if target is None:
                where = f"{current[0]} {current[1]} is the oldest version still installed that was active here" \
                    if current else "no version was active before"
                raise Conflict(f"nothing older to roll back to: {where}")
            version = await self._activate_stored(*target, source, rollback=True)
        came_from = f"from {left.info.name} {left.info.version}" if left else None
        self._emit("rolled_back", source, version.record.get("package", ""), name=version.name,
                   version=version.version, reason="; ".join(filter(None, [came_from, reason])) or None)
        return version

    def _on_failure_streak(self, model: LoadedModel, streak: int) -> None:
        if streak < self.settings.rollback_after_failures or self._rollback_task is not None:
            return
        reason = f"the first {streak} requests after activation all failed"
        self._emit("failed", "auto-rollback", model.info.path.name, name=model.info.name,
                   version=model.info.version, reason=reason)
        self._rollback_task = asyncio.get_running_loop().create_task(
            self._auto_rollback(reason), name="auto-rollback"
        )

    async def close(self) -> None:
        """Stop what the pipeline started on its own (an automatic rollback under way, the wait for
        disk space): cancelled and awaited, so that shutdown does not leave it half-done behind the
        engine's back."""
        await self.space_wait.close()
        task = self._rollback_task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _auto_rollback(self, reason: str) -> None:
        try:
            await self.rollback("auto-rollback", reason)
        except Exception as exc:
            log.error("auto_rollback_failed", reason=str(exc))
        finally:
            self._rollback_task = None


def signer_text(record: object) -> str | None:
    """An install record's signer as one line for events and the twin: "ops (sha256:…)"."""
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str):
        return None
    name = record.get("key") or "unknown key"
    text = f"{name} (sha256:{record['fingerprint'][:16]})"
    return text if record.get("verified") else f"{text}, not verified"


def _model_record(model: LoadedModel) -> dict[str, Any]:
    """What the install record keeps about a validated model (shown by /models)."""
    info = model.info
    return {"handler": info.handler, "model_file": info.model_file, "labels_file": info.labels_file,
            "model_sha256": info.model_sha256}


def _manifest_activates(version: InstalledVersion) -> bool:
    """What the installed package's own model.json says about activation (its install record keeps
    what was decided then, which a twin intent may have overridden)."""
    try:
        return read_manifest(version.path, *version.key).activate
    except PackageError:
        return bool(version.record.get("activate", True))


def _mark_activated(path: Path) -> None:
    marker = path / ACTIVATED_MARKER
    if not marker.exists():
        marker.write_text(str(time.time()))


def _remove_package(package: Path) -> None:
    for extra in sidecars(package):
        extra.unlink(missing_ok=True)
    if package.is_dir() and not package.is_symlink():
        # Renamed out of sight first: a crash mid-delete must not leave half a folder that the
        # watcher would take for a new (broken) package. Repair removes the leftover.
        doomed = package.with_name(f"{TMP_PREFIX}del-{uuid.uuid4().hex[:8]}")
        os.rename(package, doomed)
        remove_tree(doomed)
    else:
        package.unlink(missing_ok=True)
