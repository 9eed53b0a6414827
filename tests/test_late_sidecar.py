"""A `.sha256` copied after its zip: within the settle time it is read with the package; later, it is
never silently left behind in the inbox: once it has waited `incomplete_timeout` (3 s here) for a
package, a matching one is taken as a late confirmation, anything else is reported (quarantined with a
reason that shows in /models). Real watcher, real pipeline."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from packages import last, ssd_files, zip_bytes

from supervisor.serving.engine import Engine
from supervisor.settings import Settings
from supervisor.updates.events import EventBus
from supervisor.updates.pipeline import Pipeline

if TYPE_CHECKING:
    from conftest import StartWatcher, WaitUntil


def _inbox(settings: Settings) -> Path:
    return settings.inbox_dir


async def test_a_sidecar_within_the_settle_time_is_checked_with_its_package(
    pipeline: Pipeline, settings: Settings, events: EventBus, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    await start_watcher(pipeline, settle_seconds=1.0)
    (_inbox(settings) / "m.zip").write_bytes(zip_bytes(ssd_files("tiny-ssd", "2")))
    (_inbox(settings) / "m.zip.sha256").write_text("ab" * 32 + "  m.zip\n")  # a moment later, and wrong
    rejected = await wait_until(lambda: last(events, "rejected"), what="the rejection")
    assert rejected.package == "m.zip" and "package SHA-256" in (rejected.reason or "")


async def test_a_late_matching_sidecar_is_taken_and_removed(
    pipeline: Pipeline, engine: Engine, settings: Settings, events: EventBus, start_watcher: StartWatcher,
    wait_until: WaitUntil,
) -> None:
    await start_watcher(pipeline)
    data = zip_bytes(ssd_files("tiny-ssd", "2"))
    (_inbox(settings) / "m.zip").write_bytes(data)
    # Late means after the package has been installed and has left the inbox.
    await wait_until(lambda: engine.active and engine.active.info.name == "tiny-ssd"
                     and not (_inbox(settings) / "m.zip").exists(), what="the activation")
    late = _inbox(settings) / "m.zip.sha256"
    late.write_text(f"{hashlib.sha256(data).hexdigest()}  m.zip\n")
    await wait_until(lambda: not late.exists(), within=10, what="the late sidecar to be taken")
    assert last(events, "rejected") is None and not pipeline.quarantine.entries()


async def test_a_late_sidecar_that_does_not_match_is_reported(
    pipeline: Pipeline, engine: Engine, settings: Settings, events: EventBus, start_watcher: StartWatcher,
    wait_until: WaitUntil,
) -> None:
    await start_watcher(pipeline)
    (_inbox(settings) / "m.zip").write_bytes(zip_bytes(ssd_files("tiny-ssd", "2")))
    # Late means after the package has been installed and has left the inbox.
    await wait_until(lambda: engine.active and engine.active.info.name == "tiny-ssd"
                     and not (_inbox(settings) / "m.zip").exists(), what="the activation")
    (_inbox(settings) / "m.zip.sha256").write_text("ab" * 32 + "  m.zip\n")
    rejected = await wait_until(lambda: last(events, "rejected"), within=10, what="the report")
    assert rejected.package == "m.zip.sha256"
    assert rejected.reason is not None and rejected.reason.startswith(
        "m.zip.sha256 arrived after m.zip was installed (as tiny-ssd 2) and does not match it")
    assert [e["package"] for e in pipeline.quarantine.entries()] == ["m.zip.sha256"]
    assert list(_inbox(settings).iterdir()) == []


async def test_a_sidecar_without_any_package_is_reported(
    pipeline: Pipeline, settings: Settings, events: EventBus, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    (_inbox(settings) / "other.zip.md5").write_text("0" * 32 + "\n")  # there before the service starts
    await start_watcher(pipeline)
    rejected = await wait_until(lambda: last(events, "rejected"), within=10, what="the report")
    assert rejected.reason == ("other.zip.md5 has no package beside it: no other.zip was seen; copy the package "
                               "together with its sidecar")
