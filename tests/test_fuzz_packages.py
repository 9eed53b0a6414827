"""Fuzzed packages (issue 16): Hypothesis builds hostile zips and folders (zip-slip, absolute and drive
paths, symlink entries, duplicate names, forged declared sizes, deep nesting, non-UTF-8 names, junk
manifests and signatures) and manifests, and feeds them to the staging step the pipeline runs
(unpack, signature, manifest, hashes). Each one is accepted or refused with a PackageError: never
another exception, never a file outside the staging folder, never a symlink inside it.

Bounded and deterministic for CI: fixed example counts, derandomized, no example database."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import tempfile
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packages import SSD_LABELS, ssd_onnx

from supervisor.diskspace import DiskFull
from supervisor.package.archive import ArchiveLimits
from supervisor.package.checks import Intent, package_sha256, stage_package
from supervisor.package.manifest import parse_manifest
from supervisor.package.reader import PackageError, read_manifest
from supervisor.package.signature import Trust

EXAMPLES = int(os.environ.get("FUZZ_PACKAGE_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMITS = ArchiveLimits(max_files=16, max_bytes=2_000_000, max_ratio=200.0)
OUTCOMES: Counter[str] = Counter()

# -- what goes into a package ---------------------------------------------------------------------------

_NON_UTF8 = "NONUTF8-PLACEHOLDER"  # replaced by raw bytes that are no UTF-8, after the zip is written

segment = st.sampled_from(["a", "b", "model", "..", ".", "", " ", "labels.txt", "x" * 200, "\u00e9t\u00e9",
                           ".hidden", ".ort-cache", "con", "a\\b", "C:", _NON_UTF8])
member_name = st.one_of(
    st.sampled_from(["model.onnx", "labels.txt", "model.json", "model.sig", "weights.bin", "../evil.txt",
                     "/etc/evil.txt", "C:\\evil.txt", "a/../../evil.txt", "top/model.onnx", "top/labels.txt",
                     _NON_UTF8, f"dir/{_NON_UTF8}.txt"]),
    st.lists(segment, min_size=1, max_size=40).map("/".join),  # deep nesting, empty and dot segments
    st.text(min_size=1, max_size=30),
)
manifest_value: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
manifest_key = st.sampled_from(["name", "version", "handler", "model", "labels", "score_threshold", "activate",
                                "description", "files", "handler_options", "$schema", "score_treshold"])
manifest = st.dictionaries(manifest_key, manifest_value | st.sampled_from(
    ["model.onnx", "../evil", "/etc/passwd", "onnx_ssd", {"model.onnx": "0" * 64}, {"../x": "a" * 64}]), max_size=6)


def content(kind: str, draw_bytes: bytes) -> bytes:
    if kind == "model":
        return ssd_onnx()
    if kind == "labels":
        return SSD_LABELS.encode()
    if kind == "deep-json":
        return b"[" * 100_000 + b"]" * 100_000
    if kind == "signature":
        return json.dumps({"mediaType": "x", "verificationMaterial": {"publicKey": {"hint": "ab" * 32}},
                           "dsseEnvelope": {"payload": "!!", "signatures": []}}).encode()
    return draw_bytes


entry = st.tuples(member_name, st.sampled_from(["model", "labels", "bytes", "deep-json", "signature"]),
                  st.binary(max_size=64), st.sampled_from(["file", "symlink", "dir", "fifo"]),
                  st.sampled_from([None, 0, 1 << 31, 0xFFFFFFFF, 10]))


@st.composite
def hostile_zip(draw: st.DrawFn) -> bytes:
    entries = draw(st.lists(entry, max_size=8))
    if draw(st.booleans()):  # often a plausible package around the hostile parts
        entries = [("model.onnx", "model", b"", "file", None), ("labels.txt", "labels", b"", "file", None), *entries]
    if draw(st.integers(0, 9)) == 0:
        entries.append(("model.sig", draw(st.sampled_from(["deep-json", "signature", "bytes"])), b"", "file", None))
    if draw(st.booleans()):
        raw = json.dumps(draw(manifest), default=str).encode() if draw(st.booleans()) else draw(st.binary(max_size=64))
        entries.append(("model.json", "bytes", raw, "file", None))
    buf = io.BytesIO()
    forged: list[tuple[str, int]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names: they are the point
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, kind, data, mode, size in entries:
                info = zipfile.ZipInfo(name + ("/" if mode == "dir" else ""), (2024, 1, 1, 0, 0, 0))
                info.external_attr = {"file": 0o100644, "symlink": 0o120777, "dir": 0o040755,
                                      "fifo": 0o010644}[mode] << 16
                zf.writestr(info, b"" if mode == "dir" else content(kind, data), zipfile.ZIP_DEFLATED)
                if size is not None:
                    forged.append((info.filename, size))
    data = buf.getvalue()
    # Raw names that are no UTF-8 (zipfile itself writes only ASCII or flagged UTF-8).
    data = data.replace(_NON_UTF8.encode(), b"\xff\xfe\x80bad\xc3(name\xed\xa0\x80x"[: len(_NON_UTF8)].ljust(
        len(_NON_UTF8), b"\x99"))
    # Forged declared (uncompressed) sizes in the central directory.
    for _name, size in forged:
        at = data.find(b"PK\x01\x02")
        if at >= 0:
            data = data[: at + 24] + struct.pack("<I", size) + data[at + 28:]
    return data


# -- the properties ---------------------------------------------------------------------------------------


def check_staged(sandbox: Path, package: Path, workdir: Path) -> None:
    """Nothing outside ``workdir`` but the package; nothing in it but regular files and folders."""
    allowed = {package, package.parent, workdir, workdir.parent}
    for root, dirs, files in os.walk(sandbox):
        for name in dirs + files:
            path = Path(root) / name
            inside = path == package or path.is_relative_to(package) or path.is_relative_to(workdir)
            assert inside or path in allowed, f"written outside staging: {path}"
            if path.is_relative_to(workdir):
                mode = os.lstat(path).st_mode
                assert stat.S_ISREG(mode) or stat.S_ISDIR(mode), f"not a regular file in staging: {path}"


def stage(sandbox: Path, package: Path) -> str:
    workdir = sandbox / "staging" / ".tmp-work"
    workdir.mkdir(parents=True)
    try:
        sha = package_sha256(package)
        stage_package(package, workdir, LIMITS, Intent("inbox"), sha, Trust())
        outcome = "accepted"
    except PackageError as exc:
        assert str(exc) and "\n" not in str(exc)[:200]
        outcome = "refused"
    except DiskFull:  # the sandbox is on a real disk with room: this must not happen
        raise
    check_staged(sandbox, package, workdir)
    OUTCOMES[outcome] += 1
    return outcome


@FUZZ
@given(hostile_zip())
def test_hostile_zips_are_refused_or_staged_inside_staging(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = Path(tmp) / "sandbox"
        (sandbox / "inbox").mkdir(parents=True)
        package = sandbox / "inbox" / "package.zip"
        package.write_bytes(data)
        stage(sandbox, package)


folder_entry = st.tuples(st.lists(st.sampled_from(["a", "b", "deep", ".hidden", "model.onnx"]), min_size=1,
                                  max_size=20),
                         st.sampled_from(["file", "model", "symlink-out", "symlink-in", "hardlink-out", "fifo",
                                          "non-utf8"]))


@FUZZ
@given(st.lists(folder_entry, max_size=6), st.booleans())
def test_hostile_folders_are_refused_or_staged_inside_staging(entries: list[tuple[list[str], str]],
                                                              plausible: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = Path(tmp) / "sandbox"
        package = sandbox / "inbox" / "package"
        package.mkdir(parents=True)
        secret = Path(tmp) / "secret.txt"
        secret.write_text("outside")
        if plausible:
            (package / "model.onnx").write_bytes(ssd_onnx())
            (package / "labels.txt").write_text(SSD_LABELS)
        for parts, kind in entries:
            path = package.joinpath(*parts)
            if path.exists() or path.is_symlink():
                continue
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                continue
            if kind == "file":
                path.write_bytes(b"data")
            elif kind == "model":
                path.write_bytes(ssd_onnx())
            elif kind == "symlink-out":
                path.symlink_to(secret)
            elif kind == "symlink-in":
                path.symlink_to(package)
            elif kind == "hardlink-out":
                os.link(secret, path)
            elif kind == "fifo":
                os.mkfifo(path)
            else:
                (path.parent / os.fsdecode(b"\xff\xfename")).write_bytes(b"x")
        stage(sandbox, package)
        assert secret.read_text() == "outside"


@FUZZ
@given(manifest_value | manifest)
def test_manifest_parsing_never_raises_anything_but_a_one_line_refusal(raw: Any) -> None:
    try:
        parse_manifest(raw)
        OUTCOMES["manifest-ok"] += 1
    except ValueError as exc:
        assert "\n" not in str(exc)
        OUTCOMES["manifest-refused"] += 1


@FUZZ
@given(st.one_of(st.binary(max_size=200), manifest.map(lambda m: json.dumps(m, default=str).encode()),
                 st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),
                 st.integers(1, 200_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n)))
def test_reading_a_model_json_from_disk_refuses_junk_in_one_line(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "model.onnx").write_bytes(b"onnx")
        (folder / "model.json").write_bytes(raw)
        try:
            read_manifest(folder, "fallback", "1")
        except PackageError as exc:
            assert "\n" not in str(exc)[:300]


def test_the_fuzzers_ran_and_saw_both_outcomes() -> None:
    """Printed for the closing note (run with -s); fails if a strategy never produced a valid or an
    invalid package (a fuzzer that only ever sees one kind tests little)."""
    if not OUTCOMES:
        pytest.skip("run with the fuzz tests above")
    print(f"\nhypothesis: {EXAMPLES} examples per property; outcomes {dict(OUTCOMES)}")
    assert OUTCOMES["accepted"] > 0 and OUTCOMES["refused"] > 0
