"""Unpacking packages safely (supervisor/package/archive.py): what is refused, and why, in words."""

from __future__ import annotations

import io
import os
import struct
import zipfile
from pathlib import Path

import pytest
from packages import BAD_PACKAGES, ssd_files, write_folder, zip_bytes

from supervisor.package.archive import ArchiveLimits, is_complete_zip, unpack_package
from supervisor.package.reader import PackageError

LIMITS = ArchiveLimits(max_files=16, max_bytes=20_000_000, max_ratio=200.0)


def unpack(tmp_path: Path, data: bytes, name: str = "p.zip", limits: ArchiveLimits = LIMITS) -> Path:
    src = tmp_path / name
    src.write_bytes(data)
    dest = tmp_path / "out"
    dest.mkdir()
    unpack_package(src, dest, limits)
    return dest


def refused(tmp_path: Path, data: bytes, limits: ArchiveLimits = LIMITS) -> str:
    with pytest.raises(PackageError) as info:
        unpack(tmp_path, data, limits=limits)
    assert not any((tmp_path / "out").parent.glob("evil*")), "something was written outside"
    return str(info.value)


def zip_of(entries: dict[str | zipfile.ZipInfo, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for info, data in entries.items():
            zf.writestr(info, data)
    return buf.getvalue()


def test_a_zip_of_a_folder_unpacks_without_its_top_folder(tmp_path: Path) -> None:
    files = ssd_files("m", "1")
    out = unpack(tmp_path, zip_bytes(files, folder="my-model"))
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    assert (out / "model.onnx").read_bytes() == files["model.onnx"]


def test_subfolders_are_kept(tmp_path: Path) -> None:
    out = unpack(tmp_path, zip_of({"model.onnx": b"m", "extra/labels.txt": b"a\n"}))
    assert (out / "extra" / "labels.txt").read_text() == "a\n"


@pytest.mark.parametrize(
    ("member", "words"),
    [
        ("../evil.txt", "leaves the package folder"),
        ("a/../../evil.txt", "leaves the package folder"),
        ("..\\evil.txt", "leaves the package folder"),
        ("/evil.txt", "is absolute"),
        ("C:/evil.txt", "is absolute"),
        ("\\evil.txt", "is absolute"),
    ],
)
def test_paths_leaving_the_folder_are_refused(tmp_path: Path, member: str, words: str) -> None:
    reason = refused(tmp_path, zip_of({"model.onnx": b"m", member: b"x"}))
    assert "unsafe path" in reason and words in reason


@pytest.mark.parametrize(("mode", "words"), [(0o120777, "is a symlink"), (0o010644, "special file"),
                                             (0o060644, "special file")])
def test_symlinks_and_special_files_are_refused(tmp_path: Path, mode: int, words: str) -> None:
    entry = zipfile.ZipInfo("labels.txt")
    entry.external_attr = mode << 16  # what `zip --symlinks` stores; a fifo; a block device
    assert words in refused(tmp_path, zip_of({"model.onnx": b"m", entry: b"/etc/passwd"}))


def test_file_count_limit(tmp_path: Path) -> None:
    reason = refused(tmp_path, zip_of({f"f{i}.txt": b"x" for i in range(17)}))
    assert "17 files" in reason and "limit is 16" in reason


def test_size_limit(tmp_path: Path) -> None:
    data = os.urandom(1_000_000)
    limits = ArchiveLimits(max_files=16, max_bytes=2_500_000, max_ratio=200.0)
    reason = refused(tmp_path, zip_of({"a": data, "b": data, "c": data}, zipfile.ZIP_STORED), limits)
    assert "3000000 bytes" in reason and "limit is 2500000" in reason


def test_zip_bomb_by_ratio(tmp_path: Path) -> None:
    _, make, _, _ = BAD_PACKAGES["zip-bomb"]
    reason = refused(tmp_path, make(), ArchiveLimits())  # under the default size limit
    assert "compression ratio" in reason and "zip bomb" in reason


def test_small_highly_compressible_files_are_fine(tmp_path: Path) -> None:
    # A labels file of repeated names compresses well; only big unpacked sizes count as bombs.
    out = unpack(tmp_path, zip_of({"labels.txt": b"person\n" * 100_000}))
    assert (out / "labels.txt").stat().st_size == 700_000


def test_duplicate_entries_are_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("labels.txt", b"a")
        zf.writestr("labels.txt", b"b")
    assert "twice" in refused(tmp_path, buf.getvalue())


def test_corrupt_entry_is_refused(tmp_path: Path) -> None:
    data = bytearray(zip_of({"model.onnx": b"0123456789" * 1000}, zipfile.ZIP_STORED))
    at = data.index(b"0123456789")
    data[at : at + 4] = b"XXXX"  # the CRC no longer matches
    assert "corrupt" in refused(tmp_path, bytes(data))


def test_encrypted_entry_is_refused_with_a_reason(tmp_path: Path) -> None:
    # zipfile cannot write encrypted entries: set the "encrypted" flag bit in both headers.
    data = bytearray(zip_of({"model.onnx": b"m"}, zipfile.ZIP_STORED))
    local, central = data.index(b"PK\x03\x04"), data.index(b"PK\x01\x02")
    data[local + 6] |= 0x1
    data[central + 8] |= 0x1
    assert "encrypted" in refused(tmp_path, bytes(data))


def test_not_a_zip_truncated_and_empty(tmp_path: Path) -> None:
    for i, (data, words) in enumerate([
        (b"just text\n" * 10, "not a valid zip"),
        (zip_bytes(ssd_files())[:-100], "not a valid zip"),
        (b"", "empty"),
    ]):
        (tmp_path / str(i)).mkdir()
        assert words in refused(tmp_path / str(i), data)


def test_is_complete_zip_tells_a_copy_in_progress(tmp_path: Path) -> None:
    data = zip_bytes(ssd_files())
    path = tmp_path / "p.zip"
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        assert not is_complete_zip(path), cut
    path.write_bytes(data)
    assert is_complete_zip(path)
    assert not is_complete_zip(tmp_path / "missing.zip")


def test_folder_packages_are_copied_and_checked(tmp_path: Path) -> None:
    src = write_folder(tmp_path / "pkg", ssd_files())
    dest = tmp_path / "out"
    dest.mkdir()
    unpack_package(src, dest, LIMITS)
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in src.iterdir())
    os.symlink("/etc/passwd", src / "labels2.txt")
    dest2 = tmp_path / "out2"
    dest2.mkdir()
    with pytest.raises(PackageError, match="symlink"):
        unpack_package(src, dest2, LIMITS)


def test_a_bare_model_file_is_taken_as_is(tmp_path: Path) -> None:
    src = tmp_path / "detector.onnx"
    src.write_bytes(b"model bytes")
    dest = tmp_path / "out"
    dest.mkdir()
    unpack_package(src, dest, LIMITS)
    assert (dest / "detector.onnx").read_bytes() == b"model bytes"


def test_a_folder_package_is_refused_one_byte_over_the_size_limit(tmp_path: Path) -> None:
    files = {"model.onnx": os.urandom(600_000), "labels.txt": b"a\n" * 200_000}
    total = sum(len(d) for d in files.values())
    src = write_folder(tmp_path / "pkg", files)
    for limit, ok in ((total, True), (total - 1, False)):
        dest = tmp_path / f"out-{limit}"
        dest.mkdir()
        limits = ArchiveLimits(max_files=16, max_bytes=limit, max_ratio=200.0)
        if ok:
            unpack_package(src, dest, limits)
            assert sum(p.stat().st_size for p in dest.iterdir()) == total
        else:
            with pytest.raises(PackageError, match=f"holds more than {limit} bytes; the limit is {limit}"):
                unpack_package(src, dest, limits)
            assert list(dest.iterdir()) == [], "nothing is copied from a package that is refused"


def understated(data: bytes, declared: int, method: int) -> bytes:
    """A zip of one entry whose headers (local and central) say it unpacks to ``declared`` bytes."""
    raw = bytearray(zip_of({"model.onnx": data}, method))
    local, central = raw.index(b"PK\x03\x04"), raw.index(b"PK\x01\x02")
    struct.pack_into("<I", raw, local + 22, declared)
    struct.pack_into("<I", raw, central + 24, declared)
    return bytes(raw)


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_a_zip_whose_headers_understate_its_size_writes_no_more_than_they_say(tmp_path: Path, method: int) -> None:
    """5 MB of content under headers that say 1,000 bytes, with a 1 MB limit. The declared sizes pass
    the limit and the ratio check; Python's zipfile never yields more than the declared size of an entry
    (and then finds the CRC of the whole content wrong), so the package is refused as corrupt and at
    most the declared bytes were ever written. (The unpacker also counts the bytes it really writes
    against the limits; with this reader that count cannot pass them: docs/testing.md.)"""
    limits = ArchiveLimits(max_files=16, max_bytes=1_000_000, max_ratio=200.0)
    package = tmp_path / "p.zip"
    package.write_bytes(understated(bytes(5_000_000), 1000, method))
    with zipfile.ZipFile(package) as zf:
        assert [i.file_size for i in zf.infolist()] == [1000]  # what the reader believes
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(PackageError, match=r"model\.onnx' is corrupt"):
        unpack_package(package, dest, limits)
    assert sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) <= 1000


def test_a_folder_with_a_special_file_too_many_files_or_too_many_folders_is_refused(tmp_path: Path) -> None:
    def refused_folder(name: str, make: object) -> str:
        src = write_folder(tmp_path / name, {"model.onnx": b"m"})
        make(src)  # type: ignore[operator]
        dest = tmp_path / f"{name}-out"
        dest.mkdir()
        with pytest.raises(PackageError) as err:
            unpack_package(src, dest, LIMITS)
        assert list(dest.iterdir()) == [], "nothing is copied from a package that is refused"
        return str(err.value)

    assert "notes.fifo is a special file" in refused_folder("fifo", lambda d: os.mkfifo(d / "notes.fifo"))
    many = refused_folder("many", lambda d: [(d / f"f{i:02}.txt").write_text("x") for i in range(16)])
    assert many == "package folder holds more than 16 files; the limit is 16"
    folders = refused_folder("folders", lambda d: [(d / f"d{i:03}").mkdir() for i in range(300)])
    assert folders == "the package holds more than 256 files and folders"


def test_a_folder_keeps_its_hidden_files_but_not_a_runtime_cache(tmp_path: Path) -> None:
    """An optimised-model cache (.ort-cache/, made per device) is left out of a folder package, and
    only it: the files after it, hidden or in subfolders, are all taken."""
    src = write_folder(tmp_path / "pkg", {
        ".notes": b"by hand", ".ort-cache/model-abc.ortopt": b"derived", "model.onnx": b"m",
        "sub/labels.txt": b"a\n",
    })
    dest = tmp_path / "out"
    dest.mkdir()
    unpack_package(src, dest, LIMITS)
    taken = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert taken == [".notes", "model.onnx", "sub/labels.txt"]


def test_a_compression_method_zipfile_lacks_is_refused_with_a_reason(tmp_path: Path) -> None:
    raw = bytearray(zip_of({"model.onnx": b"m" * 100}, zipfile.ZIP_STORED))
    local, central = raw.index(b"PK\x03\x04"), raw.index(b"PK\x01\x02")
    struct.pack_into("<H", raw, local + 8, 9)  # 9: deflate64, which zipfile cannot read
    struct.pack_into("<H", raw, central + 10, 9)
    reason = refused(tmp_path, bytes(raw))
    assert reason.startswith("archive entry 'model.onnx': ") and reason.endswith("; zip it with deflate")
