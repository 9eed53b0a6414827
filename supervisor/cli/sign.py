"""``edgeloader sign PACKAGE --key KEY.pem``: sign a package in the model-signing format.

The signature (``model.sig``, a Sigstore bundle over every file's SHA-256) becomes a member of the
package, so one file still travels: a zip is rewritten through ``PACKAGE.part`` and renamed over the
original (a drop folder's watcher ignores the ``.part``), a folder gets the file. Signing again
replaces the signature. The private key stays with whoever signs; devices get the public key
(``trusted_keys``). Exit status 0: signed, 1: the package or the key cannot be used, 2: usage.

Makes a key pair for a try-out with OpenSSL (P-256)::

    openssl ecparam -name prime256v1 -genkey -noout -out ops.key
    openssl ec -in ops.key -pubout -out ops.pub
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from supervisor.package.paths import PackageError
from supervisor.package.signature import TrustError, short, sign_package

__all__ = ["sign_main"]


def sign_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="edgeloader sign",
        description="Sign a model package (zip or folder) with an elliptic-curve private key, in the OpenSSF "
        "model-signing format. The signature is added to the package as model.sig; devices with "
        "require_signature install it only when the matching public key is one of their trusted_keys.",
    )
    parser.add_argument("package", type=Path, metavar="PACKAGE")
    parser.add_argument("--key", type=Path, required=True, metavar="KEY.pem", help="the private key (PEM)")
    parser.add_argument("--password-env", metavar="VAR", help="environment variable holding the key's password")
    args = parser.parse_args(argv)
    package: Path = args.package
    if not package.exists():
        print(f"edgeloader: {package}: no such file or folder", file=sys.stderr)
        return 2
    password = None
    if args.password_env:
        password = os.environ.get(args.password_env)
        if password is None:
            print(f"edgeloader: {args.password_env} is not set", file=sys.stderr)
            return 2
    try:
        signer = sign_package(package, args.key, password)
    except (PackageError, TrustError, OSError) as exc:
        print(f"edgeloader: cannot sign {package}: {exc}", file=sys.stderr)
        return 1
    print(f"signed {package} with {args.key.name} ({short(signer.fingerprint)})")
    print(f"  key fingerprint {signer.fingerprint}: trust it on devices with its public key file")
    return 0

