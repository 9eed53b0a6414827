"""Signed packages (issue 16): `edgeloader sign` adds a model-signing signature (model.sig) to a package;
a device with `require_signature` installs only packages signed by one of its `trusted_keys`, and
quarantines unsigned ones, ones signed by another key and ones changed after signing with that reason,
from the drop folder and the twin alike, while the active model keeps serving."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from packages import last, ssd_files, states, write_folder, write_zip

from supervisor.__main__ import main
from supervisor.errors import StartupError
from supervisor.formats import INTENT_SUFFIX, SIGNATURE_NAME
from supervisor.package.signature import Trust, TrustError, sign_package
from supervisor.serving.engine import Engine
from supervisor.settings import Settings
from supervisor.twin.reporter import active_patch
from supervisor.updates.events import EventBus
from supervisor.updates.pipeline import Pipeline
from supervisor.updates.repository import Repository

FIGURES = {"signed_installed": 0, "rejected_as_expected": 0}


def make_key(folder: Path, name: str, curve: ec.EllipticCurve | None = None) -> tuple[Path, Path]:
    """A key pair as an operator would keep it: NAME.key (private, PEM) and NAME.pub."""
    secret = ec.generate_private_key(curve or ec.SECP256R1())
    private = folder / f"{name}.key"
    private.write_bytes(secret.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    public = folder / f"{name}.pub"
    public.write_bytes(secret.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("keys")
    return {"ops": make_key(folder, "ops"), "stranger": make_key(folder, "stranger"),
            "vendor": make_key(folder, "vendor", ec.SECP384R1())}


@pytest.fixture
def signed_settings(settings: Settings, keys: dict[str, tuple[Path, Path]]) -> Settings:
    return settings.replace(trusted_keys=[keys["ops"][1], keys["vendor"][1]], require_signature=True)


@pytest.fixture
async def strict(signed_settings: Settings, engine: Engine, events: EventBus) -> AsyncIterator[Pipeline]:
    """A started pipeline that requires signatures by ops or vendor."""
    repo = Repository(signed_settings.data_dir)
    repo.ensure_layout()
    pipeline = Pipeline(signed_settings, repo, engine, events)
    await pipeline.start()
    yield pipeline
    await pipeline.close()


def signed_zip(path: Path, key: Path, name: str = "tiny-ssd", version: str = "1") -> Path:
    write_zip(path, ssd_files(name, version))
    sign_package(path, key)
    return path


def rewrite_member(package: Path, member: str, data: bytes | None) -> None:
    """Change (or, with None, remove; or add) one member of a zip after it was signed."""
    with zipfile.ZipFile(package) as zf:
        files = {i.filename: zf.read(i) for i in zf.infolist()}
    if data is None:
        files.pop(member)
    else:
        files[member] = data
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    package.write_bytes(buf.getvalue())


async def expect_rejected(pipeline: Pipeline, package: Path, source: str, *words: str) -> str:
    before = pipeline.engine.active
    assert await pipeline.process(package, source=source) is None
    event = last(pipeline.events, "rejected")
    assert event is not None and event.package == package.name, states(pipeline.events)
    reason = event.reason or ""
    assert all(w in reason for w in words), reason
    assert pipeline.engine.active is before, "the active model must keep serving"
    entry = next(e for e in pipeline.quarantine.entries() if e["package"] == package.name)
    assert entry["reason"] == reason
    FIGURES["rejected_as_expected"] += 1
    return reason


async def test_a_package_signed_by_a_trusted_key_installs_and_shows_its_signer(
    strict: Pipeline, keys: dict[str, tuple[Path, Path]], aiohttp_client, signed_settings: Settings,
) -> None:
    package = signed_zip(strict.repo.inbox_dir / "signed.zip", keys["ops"][0])
    version = await strict.process(package, source="inbox")
    assert version is not None and strict.engine.active is not None
    assert strict.engine.active.info.version == "1"
    signer = version.record["signer"]
    assert signer["key"] == "ops" and signer["verified"] is True
    assert signer["fingerprint"] == Trust.load([keys["ops"][1]]).keys[0].fingerprint
    active = last(strict.events, "active")
    assert active is not None and active.signer is not None and active.signer.startswith("ops (sha256:")
    assert active_patch(active)["ModelUpdate"]["ActiveModel"]["Signer"] == active.signer
    # A P-384 key works the same.
    other = signed_zip(strict.repo.inbox_dir / "vendor.zip", keys["vendor"][0], version="2")
    version = await strict.process(other, source="inbox")
    assert version is not None and version.record["signer"]["key"] == "vendor"
    FIGURES["signed_installed"] += 2


async def test_models_route_shows_the_signer(
    signed_settings: Settings, keys: dict[str, tuple[Path, Path]], aiohttp_client,
) -> None:
    from supervisor.app import build_app
    from supervisor.http.keys import PIPELINE

    client = await aiohttp_client(build_app(signed_settings, services=False))
    pipeline = client.app[PIPELINE]
    package = signed_zip(signed_settings.inbox_dir / "signed.zip", keys["ops"][0])
    assert await pipeline.process(package, source="inbox") is not None
    body = await (await client.get("/models")).json()
    assert body["active"]["signer"]["key"] == "ops"
    signed = next(v for v in body["versions"] if v["name"] == "tiny-ssd")
    assert signed["signer"] == body["active"]["signer"]
    bundled = next(v for v in body["versions"] if v["name"] == "blazeface-short-range")
    assert bundled["signer"] is None
    FIGURES["signed_installed"] += 1


@pytest.mark.parametrize("source", ["inbox", "twin"])
async def test_unsigned_unknown_key_and_changed_packages_are_quarantined(
    strict: Pipeline, keys: dict[str, tuple[Path, Path]], source: str,
) -> None:
    folder = strict.repo.inbox_dir if source == "inbox" else strict.repo.staging_dir

    def arrive(name: str) -> Path:
        """As the twin leaves a download: an intent (with the package's hash) beside the file."""
        path = folder / name
        if source == "twin":
            import hashlib

            intent = {"source": "twin", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            path.with_name(name + INTENT_SUFFIX).write_text(json.dumps(intent))
        return path

    ok = signed_zip(folder / "good.zip", keys["ops"][0])
    assert await strict.process(arrive("good.zip"), source=source) is not None
    FIGURES["signed_installed"] += 1

    write_zip(folder / "unsigned.zip", ssd_files("tiny-ssd", "2"))
    await expect_rejected(strict, arrive("unsigned.zip"), source, "unsigned")

    signed_zip(folder / "stranger.zip", keys["stranger"][0], version="3")
    reason = await expect_rejected(strict, arrive("stranger.zip"), source, "signed by an unknown key", "sha256:")
    assert "ops (sha256:" in reason  # names the keys it trusts

    changed = signed_zip(folder / "changed.zip", keys["ops"][0], version="4")
    rewrite_member(changed, "labels.txt", b"background\nburglar\n")
    await expect_rejected(strict, arrive("changed.zip"), source, "changed after signing", "labels.txt")

    added = signed_zip(folder / "added.zip", keys["ops"][0], version="5")
    rewrite_member(added, "extra.txt", b"slipped in later")
    await expect_rejected(strict, arrive("added.zip"), source, "changed after signing", "extra.txt")

    removed = signed_zip(folder / "removed.zip", keys["ops"][0], version="6")
    rewrite_member(removed, "labels.txt", None)
    await expect_rejected(strict, arrive("removed.zip"), source, "changed after signing")

    # The signed statement itself edited to match a changed file: the signature no longer verifies.
    forged = signed_zip(folder / "forged.zip", keys["ops"][0], version="7")
    with zipfile.ZipFile(forged) as zf:
        bundle = json.loads(zf.read(SIGNATURE_NAME))
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "0" * 64
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    rewrite_member(forged, SIGNATURE_NAME, json.dumps(bundle).encode())
    await expect_rejected(strict, arrive("forged.zip"), source, "changed after signing")

    rewrite_member(signed_zip(folder / "junk.zip", keys["ops"][0], version="8"), SIGNATURE_NAME, b"not json")
    await expect_rejected(strict, arrive("junk.zip"), source, "model.sig is not a model-signing signature")

    assert strict.engine.active is not None and strict.engine.active.info.version == "1"
    assert [v.version for v in strict.repo.versions() if v.name == "tiny-ssd"] == ["1"]
    del ok


async def test_a_signed_folder_package_and_a_zip_with_a_top_folder(
    strict: Pipeline, keys: dict[str, tuple[Path, Path]], tmp_path: Path,
) -> None:
    folder = write_folder(strict.repo.inbox_dir / "folder-pkg", ssd_files("tiny-ssd", "10"))
    sign_package(folder, keys["ops"][0])
    assert (folder / SIGNATURE_NAME).is_file()
    version = await strict.process(folder, source="inbox")
    assert version is not None and version.record["signer"]["key"] == "ops"

    from packages import zip_bytes

    nested = strict.repo.inbox_dir / "nested.zip"
    nested.write_bytes(zip_bytes(ssd_files("tiny-ssd", "11"), folder="exported"))
    sign_package(nested, keys["ops"][0])
    with zipfile.ZipFile(nested) as zf:
        assert "exported/model.sig" in zf.namelist()  # beside the files, so the top folder is still stripped
    sign_package(nested, keys["ops"][0])  # signing again replaces the signature
    with zipfile.ZipFile(nested) as zf:
        assert zf.namelist().count("exported/model.sig") == 1
    version = await strict.process(nested, source="inbox")
    assert version is not None and version.record["signer"]["key"] == "ops"
    FIGURES["signed_installed"] += 2


async def test_signatures_not_required_unsigned_installs_but_tampering_is_refused(
    settings: Settings, keys: dict[str, tuple[Path, Path]], engine: Engine, events: EventBus,
) -> None:
    relaxed = settings.replace(trusted_keys=[keys["ops"][1]])
    repo = Repository(relaxed.data_dir)
    repo.ensure_layout()
    pipeline = Pipeline(relaxed, repo, engine, events)
    await pipeline.start()
    unsigned = await pipeline.process(write_zip(repo.inbox_dir / "plain.zip", ssd_files("tiny-ssd", "1")), "inbox")
    assert unsigned is not None and unsigned.record["signer"] is None
    stranger = await pipeline.process(signed_zip(repo.inbox_dir / "s.zip", keys["stranger"][0], version="2"), "inbox")
    assert stranger is not None and stranger.record["signer"]["verified"] is False
    assert stranger.record["signer"]["key"] is None
    changed = signed_zip(repo.inbox_dir / "changed.zip", keys["ops"][0], version="3")
    rewrite_member(changed, "labels.txt", b"x\ny\n")
    await expect_rejected(pipeline, changed, "inbox", "changed after signing", "labels.txt")


def test_trust_settings_fail_with_one_line(tmp_path: Path, keys: dict[str, tuple[Path, Path]],
                                           settings: Settings) -> None:
    with pytest.raises(TrustError, match="require_signature is set but trusted_keys names no public key"):
        Trust.load([], required=True)
    with pytest.raises(TrustError, match="not a PEM public key"):
        Trust.load([keys["ops"][0]])  # the private key by mistake
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(TrustError, match="elliptic-curve"):
        Trust.load([rsa_pub])
    with pytest.raises(TrustError, match="cannot read it"):
        Trust.load([tmp_path / "missing.pub"])
    # A folder of keys (a bind mount of /keys) is read whole.
    trust = Trust.load([keys["ops"][1].parent])
    assert sorted(k.name for k in trust.keys) == ["ops", "stranger", "vendor"]
    with pytest.raises(StartupError, match="require_signature"):
        Pipeline(settings.replace(require_signature=True), Repository(settings.data_dir), None, EventBus())  # type: ignore[arg-type]


def test_cli_sign_then_verify_says_who_signed(tmp_path: Path, keys: dict[str, tuple[Path, Path]],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    package = write_zip(tmp_path / "model.zip", ssd_files("tiny-ssd", "1"))
    assert main(["sign", str(package), "--key", str(keys["ops"][0])]) == 0
    assert "signed" in capsys.readouterr().out
    assert main(["verify", str(package), "--json", "--key", str(keys["ops"][1])]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["valid"] and report["signer"]["key"] == "ops" and report["signer"]["verified"]
    assert main(["verify", str(package)]) == 0  # no key given: who signed, unchecked
    assert "an unknown key (sha256:" in capsys.readouterr().out
    rewrite_member(package, "labels.txt", b"a\nb\n")
    assert main(["verify", str(package), "--key", str(keys["ops"][1])]) == 1
    assert "changed after signing: labels.txt differ" in capsys.readouterr().err
    assert main(["sign", str(tmp_path / "nope.zip"), "--key", str(keys["ops"][0])]) == 2
    bare = tmp_path / "model.onnx"
    bare.write_bytes(b"onnx")
    assert main(["sign", str(bare), "--key", str(keys["ops"][0])]) == 1
    assert "bare model file" in capsys.readouterr().err


def test_figures() -> None:
    """Printed for the closing note (run with -s)."""
    print(f"\nsigning: {FIGURES['signed_installed']} signed packages installed, "
          f"{FIGURES['rejected_as_expected']} rejected with the expected reason")
