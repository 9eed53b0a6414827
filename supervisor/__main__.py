"""The command line: ``edgeloader serve | pack | verify | twin-patch | rollout | status | activate | rollback``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from supervisor import __version__

__all__ = ["main"]


def _fail(message: object) -> int:
    """A start-up problem: one line on stderr and exit status 2, never a traceback."""
    print(f"edgeloader: {message}", file=sys.stderr)
    return 2


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="edgeloader serve",
        description="Serve the active model over HTTP and watch for new ones. Flags beat EDGELOADER_* "
        "environment variables, which beat the settings file (config/settings.toml). Exit status 2: "
        "it could not start (a bad setting, a busy port, a rejected --model), with one line saying why.",
    )
    parser.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8080; 0: any free port)")
    parser.add_argument("--data-dir", type=Path, help="model repository and drop folders (default ./var)")
    parser.add_argument("--model", type=Path, help="import this model file, folder or zip and activate it")
    parser.add_argument("--config", type=Path, help="a settings file instead of config/settings.toml")
    parser.add_argument("--twin", choices=["auto", "off"], help="IoT Hub twin watcher (default auto)")
    args = parser.parse_args(argv)

    from supervisor.errors import StartupError
    from supervisor.listen import bind
    from supervisor.settings import SettingsError, load_settings, unknown_environment

    for warning in unknown_environment():  # before logging is set up: it may be what is misspelt
        print(f"edgeloader: warning: {warning}", file=sys.stderr)
    try:
        settings = load_settings(
            {"host": args.host, "port": args.port, "data_dir": args.data_dir, "twin": args.twin},
            config_file=args.config,
        )
    except SettingsError as exc:
        return _fail(exc)
    if args.model is not None and not args.model.exists():
        return _fail(f"--model {args.model}: no such file or folder")
    try:
        sock = bind(settings.host, settings.port)
    except StartupError as exc:
        return _fail(exc)

    from aiohttp import web

    from supervisor.app import build_app, serving_logger
    from supervisor.logs import configure_logging
    from supervisor.memory import pin_mmap_threshold

    configure_logging(settings.log_format, settings.log_level)
    pin_mmap_threshold()  # before any model is loaded
    app = build_app(settings, import_path=args.model)
    try:
        # run_app turns SIGTERM/SIGINT into a graceful stop: listeners close, in-flight requests
        # get shutdown_timeout seconds, then cleanup_ctx leaves the services in reverse order.
        # 8 s leaves room for that cleanup inside Docker's default 10 s before SIGKILL. Its print
        # hook runs once the socket listens: that is when the service says it is serving.
        # keepalive_timeout is also the time a new connection has to send its first request's headers
        # (aiohttp arms it when the connection opens; trickled bytes do not reset it): slowloris guard.
        web.run_app(app, sock=sock, access_log=None, shutdown_timeout=8.0, print=serving_logger(app, sock),
                    keepalive_timeout=settings.header_timeout_seconds)
    except StartupError as exc:
        return _fail(exc)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "serve": "serve the active model over HTTP (the module's main process)",
        "pack": "build a model package (zip with manifest and SHA-256 of each file) from a folder",
        "verify": "validate a model package without activating it (and say who signed it)",
        "sign": "sign a model package with a private key (OpenSSF model-signing format)",
        "twin-patch": "print the module-twin desired properties that point devices at a package",
        "rollout": "write a layered IoT Edge deployment that rolls a package out to a group of devices",
        "status": "show the running service's models, downloads and twin (--url, EDGELOADER_API_TOKEN)",
        "activate": "make a stored version of the running service active: activate NAME VERSION",
        "rollback": "make the running service go back to the version active before",
    }
    if not argv or argv[0] in ("-h", "--help"):
        print(f"edgeloader {__version__}\n\nusage: edgeloader COMMAND [options]\n\ncommands:")
        for name, text in commands.items():
            print(f"  {name:<11} {text}")
        print("\n'edgeloader COMMAND --help' tells more.")
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return _serve(rest)
    if command == "pack":
        from supervisor.cli.pack import pack_main

        return pack_main(rest)
    if command == "verify":
        from supervisor.cli.pack import verify_main

        return verify_main(rest)
    if command == "sign":
        from supervisor.cli.sign import sign_main

        return sign_main(rest)
    if command == "twin-patch":
        from supervisor.cli.twinpatch import main as twin_patch_main

        return twin_patch_main(rest)
    if command == "rollout":
        from supervisor.cli.rollout import main as rollout_main

        return rollout_main(rest)
    if command in ("status", "activate", "rollback"):
        from supervisor.cli.remote import main as remote_main

        return remote_main(rest, command)
    print(f"edgeloader: unknown command {command!r}; try 'edgeloader --help'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
