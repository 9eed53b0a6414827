"""Signed packages in the OpenSSF model-signing format, with keys (no Sigstore log, no network).

A signed package carries ``model.sig`` at its root: a Sigstore bundle whose DSSE envelope holds an
in-toto statement listing every file of the package with its SHA-256 (model-signing's ``files``
serialization), signed with an elliptic-curve private key (P-256, P-384 or P-521). The
``model_signing`` library (sigstore/model-transparency) makes and checks it, so a package signed here
verifies with ``model_signing verify key`` and the reverse.

What is signed is the package as the device sees it once unpacked (a zip's common top folder
stripped, an optimised-model cache left out): ``edgeloader sign`` unpacks it with the device's own
``unpack_package`` and signs that folder. The device checks the signature on its unpacked copy in
staging, before anything of the package is loaded.

A signer is known by its key's fingerprint: the SHA-256 of the public key as PEM
(SubjectPublicKeyInfo), which model-signing records in the bundle as the key hint. For a key file in
that form, ``sha256sum key.pub`` prints the same digest.

Blocking; no runtime, no event loop. ``model_signing`` is imported when a signature is made or
checked (it brings sigstore and its dependencies along: ~0.4 s).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from supervisor.formats import SIGNATURE_NAME
from supervisor.package.archive import ArchiveLimits, unpack_package
from supervisor.package.paths import PackageError, walk_files

__all__ = [
    "SIGNATURE_NAME",
    "Signer",
    "Trust",
    "TrustError",
    "check_signature",
    "key_fingerprint",
    "sign_package",
]

log = structlog.get_logger(__name__)

# A bundle for a package of 64 files is ~10 kB; anything much bigger is not one.
MAX_SIGNATURE_BYTES = 1 << 20
_KEY_SUFFIXES = (".pub", ".pem")
# What the device never takes from a package (archive.py): not signed either.
_NEVER_SIGNED = (SIGNATURE_NAME,)


class TrustError(ValueError):
    """A trusted key that cannot be used (missing, unreadable, not an EC public key); one line."""


def key_fingerprint(public_pem: bytes) -> str:
    """The SHA-256 (hex) of a public key as canonical PEM: model-signing's key hint."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_pem)
    canonical = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(canonical).hexdigest()


def short(fingerprint: str) -> str:
    return f"sha256:{fingerprint[:16]}"


@dataclass(frozen=True)
class TrustedKey:
    name: str  # the key file's name without its suffix: "ops-team" for ops-team.pub
    fingerprint: str
    path: Path


@dataclass(frozen=True)
class Signer:
    """Who signed a package: the key's fingerprint and, when it is a trusted key, its name."""

    fingerprint: str
    key: str | None = None  # the trusted key's name; None: a key this device does not know
    verified: bool = False  # the signature was checked against that key and the files

    def to_record(self) -> dict[str, Any]:
        return {"key": self.key, "fingerprint": self.fingerprint, "verified": self.verified}

    def describe(self) -> str:
        who = self.key if self.key else "an unknown key"
        return f"{who} ({short(self.fingerprint)})" + ("" if self.verified else ", not verified")


@dataclass(frozen=True)
class Trust:
    """The keys whose signatures this device accepts, and whether it accepts only signed packages."""

    keys: tuple[TrustedKey, ...] = ()
    required: bool = False

    @classmethod
    def load(cls, paths: Iterable[Path], required: bool = False) -> Trust:
        """Read the public keys (files, or folders of ``*.pub`` / ``*.pem``). Raises TrustError naming
        the file that cannot be used, or when signatures are required and there is no key."""
        keys: dict[str, TrustedKey] = {}
        for path in paths:
            try:
                files = sorted(p for p in path.iterdir() if p.suffix in _KEY_SUFFIXES and p.is_file()) \
                    if path.is_dir() else [path]
            except OSError as exc:
                raise TrustError(f"trusted keys folder {path}: cannot list it ({exc.strerror})") from None
            for file in files:
                try:
                    pem = file.read_bytes()
                except OSError as exc:
                    raise TrustError(f"trusted key {file}: cannot read it ({exc.strerror})") from None
                try:
                    fingerprint = key_fingerprint(pem)
                except (ValueError, TypeError):
                    raise TrustError(f"trusted key {file}: not a PEM public key (expected '-----BEGIN PUBLIC "
                                     "KEY-----'; a private key stays with whoever signs)") from None
                _check_key_type(file, pem)
                keys.setdefault(fingerprint, TrustedKey(file.stem, fingerprint, file))
        if required and not keys:
            raise TrustError("require_signature is set but trusted_keys names no public key: no package could "
                             "be installed")
        return cls(tuple(keys.values()), required)

    def find(self, fingerprint: str) -> TrustedKey | None:
        return next((k for k in self.keys if k.fingerprint == fingerprint), None)

    def names(self) -> str:
        return ", ".join(f"{k.name} ({short(k.fingerprint)})" for k in self.keys) or "none"


def _check_key_type(file: Path, pem: bytes) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1",
                                                                                   "secp521r1"):
        raise TrustError(f"trusted key {file}: model-signing keys are elliptic-curve P-256, P-384 or P-521")


# -- checking ---------------------------------------------------------------------------------------


def _bundle_key_hint(sig: Path) -> str | None:
    """The key fingerprint a bundle names (model-signing's hint), read as plain JSON. PackageError when
    the file is no bundle at all."""
    try:
        bundle = json.loads(sig.read_bytes())
        material = bundle["verificationMaterial"]
        envelope = bundle["dsseEnvelope"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise PackageError(f"{SIGNATURE_NAME} is not a model-signing signature (a Sigstore bundle)") from None
    if not isinstance(material, dict) or not isinstance(envelope, dict):
        raise PackageError(f"{SIGNATURE_NAME} is not a model-signing signature (a Sigstore bundle)")
    if "publicKey" not in material:
        raise PackageError(f"{SIGNATURE_NAME} was not made with a key (keyless or certificate signatures are "
                           "not supported on the device); sign with 'edgeloader sign --key'")
    hint = material["publicKey"].get("hint") if isinstance(material["publicKey"], dict) else None
    return hint.lower() if isinstance(hint, str) and len(hint) == 64 else None


def _signed_resources(sig: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The serialization and the per-file digests of a verified bundle's statement."""
    bundle = json.loads(sig.read_bytes())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    predicate = statement["predicate"]
    files = {str(r["name"]): str(r["digest"]) for r in predicate["resources"] if r.get("algorithm") == "sha256"}
    return dict(predicate.get("serialization") or {}), files


def _visible_files(folder: Path) -> dict[str, Path]:
    return {str(rel): folder / rel for rel, st in walk_files(folder, skip_hidden=True)
            if stat.S_ISREG(st.st_mode) and str(rel) not in _NEVER_SIGNED}


def _what_changed(folder: Path, signed: Mapping[str, str]) -> str:
    from supervisor.package.reader import file_sha256

    present = _visible_files(folder)
    changed = sorted(name for name, path in present.items() if name in signed and file_sha256(path) != signed[name])
    added = sorted(set(present) - set(signed))
    removed = sorted(name for name in signed if name not in present and not PurePosixPath(name).name.startswith("."))
    parts = [f"{', '.join(changed[:3])} differ" if changed else "",
             f"{', '.join(added[:3])} added" if added else "",
             f"{', '.join(removed[:3])} removed" if removed else ""]
    return "; ".join(p for p in parts if p) or "the files differ from what was signed"


def check_signature(folder: Path, trust: Trust) -> tuple[Signer | None, dict[str, str] | None]:
    """Check the signature of the unpacked package in ``folder`` against ``trust``.

    Returns the signer (None: unsigned) and, for a verified signature, the SHA-256 of every visible
    file as signed and checked (so they need not be hashed again), else None. Raises PackageError
    when the package is unsigned, signed by an unknown key (signatures required), or changed after
    signing (whatever ``trust`` requires: a signature that does not match is evidence of tampering)."""
    sig = folder / SIGNATURE_NAME
    try:
        st = sig.lstat()
    except FileNotFoundError:
        if trust.required:
            raise PackageError(f"unsigned: this device installs only signed packages ({SIGNATURE_NAME} from "
                               "'edgeloader sign')") from None
        return None, None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SIGNATURE_BYTES:
        raise PackageError(f"{SIGNATURE_NAME} must be a regular file of at most {MAX_SIGNATURE_BYTES} bytes")
    hint = _bundle_key_hint(sig)
    key = trust.find(hint) if hint else None
    if key is None:
        if trust.required:
            who = f"an unknown key ({short(hint)})" if hint else "a key it does not name"
            raise PackageError(f"signed by {who}; trusted keys: {trust.names()}")
        return (Signer(hint) if hint else None), None
    _verify(folder, sig, key)
    serialization, signed = _signed_resources(sig)
    present = _visible_files(folder)
    missing = sorted(set(present) - set(signed))
    if missing:  # a path the signer chose to ignore, or a hash type we do not read
        raise PackageError(f"changed after signing: {', '.join(missing[:3])} not covered by the signature")
    hashes = None
    if serialization.get("method") == "files" and serialization.get("hash_type") == "sha256":
        from supervisor.package.reader import file_sha256

        hashes = {name: signed[name] for name in present}
        hashes[SIGNATURE_NAME] = file_sha256(sig)
    return Signer(key.fingerprint, key.name, verified=True), hashes


def _verify(folder: Path, sig: Path, key: TrustedKey) -> None:
    from cryptography.exceptions import InvalidSignature
    from model_signing import verifying

    try:
        verifying.Config().use_elliptic_key_verifier(public_key=key.path).verify(folder, sig)
    except InvalidSignature:
        raise PackageError(f"changed after signing: {SIGNATURE_NAME} does not verify with key {key.name} "
                           f"({short(key.fingerprint)}); it was altered") from None
    except ValueError as exc:
        if str(exc).startswith("Signature mismatch"):
            try:
                _, signed = _signed_resources(sig)
            except (ValueError, KeyError, TypeError, RecursionError):
                signed = {}
            raise PackageError(f"changed after signing: {_what_changed(folder, signed)}") from None
        log.info("signature_unreadable", detail=str(exc)[:500])
        raise PackageError(f"{SIGNATURE_NAME} cannot be read as a model-signing signature") from None
    except Exception as exc:  # the library parsing untrusted JSON/protobuf: KeyError, ParseError...
        log.info("signature_unreadable", detail=f"{type(exc).__name__}: {exc}"[:500])
        raise PackageError(f"{SIGNATURE_NAME} cannot be read as a model-signing signature") from None


# -- signing ------------------------------------------------------------------------------------------


def _zip_prefix(names: list[str]) -> str:
    """The top folders all of a zip's files share ("" when none), as archive.py strips them."""
    parts = [PurePosixPath(n.replace("\\", "/")).parts for n in names]
    if not parts:
        return ""
    first, depth = parts[0], 0
    while depth < len(first) - 1 and all(len(p) > depth + 1 and p[depth] == first[depth] for p in parts):
        depth += 1
    return "".join(f"{part}/" for part in first[:depth])


def sign_package(package: Path, private_key: Path, password: str | None = None,
                 limits: ArchiveLimits | None = None) -> Signer:
    """Sign a package (zip or folder) in place: ``model.sig`` is added as a member (a zip is rewritten
    through a temporary file beside it; a folder gets the file). What is signed is the package as the
    device will unpack it. Raises PackageError (a package the device would refuse) or TrustError (the key)."""
    from cryptography.hazmat.primitives import serialization
    from model_signing import hashing, signing

    try:
        secret = serialization.load_pem_private_key(private_key.read_bytes(), password.encode() if password else None)
    except OSError as exc:
        raise TrustError(f"cannot read the key {private_key}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise TrustError(f"{private_key} is not a usable PEM private key: {exc}") from None
    public_pem = secret.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    _check_key_type(private_key, public_pem)
    if not (package.is_dir() or zipfile.is_zipfile(package)):
        raise PackageError(f"{package.name} is neither a zip nor a folder: a bare model file cannot carry its "
                           "signature; make a package first (edgeloader pack)")
    with tempfile.TemporaryDirectory(prefix="edgeloader-sign-") as tmp:
        view = Path(tmp) / (package.name.split(".")[0] or "model")
        view.mkdir()
        unpack_package(package, view, limits or ArchiveLimits())
        (view / SIGNATURE_NAME).unlink(missing_ok=True)  # signing again replaces the old signature
        sig = Path(tmp) / SIGNATURE_NAME
        config = hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME], ignore_git_paths=False)
        config.use_file_serialization(hashing_algorithm="sha256")
        signer_config = signing.Config().use_elliptic_key_signer(private_key=private_key, password=password)
        signer_config.set_hashing_config(config).sign(view, sig)
        data = sig.read_bytes()
    if package.is_dir():
        part = package / f".{SIGNATURE_NAME}.part"
        part.write_bytes(data)
        os.replace(part, package / SIGNATURE_NAME)
    else:
        _rewrite_zip_with(package, data)
    return Signer(hashlib.sha256(public_pem).hexdigest(), private_key.stem.removesuffix(".key"), verified=True)


def _rewrite_zip_with(package: Path, signature: bytes) -> None:
    part = package.with_name(package.name + ".part")
    try:
        with zipfile.ZipFile(package) as src, zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as out:
            members = [i for i in src.infolist() if not i.is_dir()]
            prefix = _zip_prefix([i.filename for i in members])
            target = prefix + SIGNATURE_NAME
            for info in members:
                if info.filename.replace("\\", "/") == target:
                    continue
                out.writestr(info, src.read(info), compress_type=info.compress_type)
            entry = zipfile.ZipInfo(target, date_time=(1980, 1, 1, 0, 0, 0))
            entry.external_attr = 0o100644 << 16
            out.writestr(entry, signature, compress_type=zipfile.ZIP_DEFLATED)
        os.replace(part, package)
    finally:
        part.unlink(missing_ok=True)
    sidecar = package.with_name(package.name + ".sha256")
    if sidecar.is_file():  # `pack --sha256` wrote one: it names the zip as it was
        from supervisor.package.reader import file_sha256

        sidecar.write_text(f"{file_sha256(package)}  {package.name}\n", "utf-8")
