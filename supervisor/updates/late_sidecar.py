"""A checksum sidecar (``x.zip.sha256``, ``x.zip.md5``) that arrived after its package was taken.

A sidecar copied within the settle time of its package is read with it (the watcher restarts the
package's timer). One copied later found the package already processed and gone; it used to stay in
the inbox for ever, unexplained, and the package went in unchecked. Now the watcher hands such an
orphan over once it has settled, and this module judges it: a SHA-256 that matches the package as it
was installed is removed quietly (the check passed, late); anything else goes to quarantine with a
reason saying what happened, so that it shows in ``/models``.
"""

from __future__ import annotations

from pathlib import Path

from supervisor.formats import CHECKSUM_SUFFIXES
from supervisor.updates.quarantine import Quarantine
from supervisor.updates.repository import Repository

__all__ = ["is_checksum_sidecar", "judge_late_sidecar"]


def is_checksum_sidecar(name: str) -> bool:
    lower = name.lower()
    return any(lower.endswith(s) and len(name) > len(s) for s in CHECKSUM_SUFFIXES)


def judge_late_sidecar(sidecar: Path, repo: Repository, quarantine: Quarantine) -> str | None:
    """None when the sidecar confirms the installed package (nothing to report); else the reason to
    report it with. Blocking (reads the sidecar and the install records)."""
    name = sidecar.name
    suffix = next(s for s in CHECKSUM_SUFFIXES if name.lower().endswith(s))
    owner = name[: -len(suffix)]
    with sidecar.open("rb") as f:  # a checksum line; whatever else a file of that name holds is not read
        words = f.read(4096).decode("utf-8", "replace").split()
    given = words[0].lower() if words else ""
    installed = [v for v in repo.versions() if v.record.get("package") == owner]
    if installed:
        newest = installed[-1]
        if suffix == ".sha256" and any(v.package_sha256 == given for v in installed):
            return None
        if suffix == ".sha256":
            return (f"{name} arrived after {owner} was installed (as {newest.name} {newest.version}) and does "
                    f"not match it: the package's SHA-256 is {(newest.package_sha256 or '?')[:12]}…, the sidecar "
                    f"says {given[:12]}…; check that copy of the package")
        return (f"{name} arrived after {owner} was installed (as {newest.name} {newest.version}), too late to be "
                "checked; copy the sidecar first, or within the settle time")
    if any(e.get("package") == owner for e in quarantine.entries()):
        return f"{name} arrived after {owner} had been rejected (see its quarantine entry)"
    return f"{name} has no package beside it: no {owner} was seen; copy the package together with its sidecar"
