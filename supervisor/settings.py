"""Settings: defaults from config/settings.toml, overridden by EDGELOADER_* environment variables,
overridden by command-line flags. Each level is resolved in one place (``load_settings``)."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["API_TOKEN_SCOPES", "ENV_PREFIX", "Settings", "load_settings"]

ENV_PREFIX = "EDGELOADER_"
# Who needs the API token when one is set (supervisor/auth.py): model switching only, or every route.
API_TOKEN_SCOPES = ("admin", "all")
_TYPE_WORDS = {"int": "a whole number", "float": "a number"}
_PACKAGE_DIR = Path(__file__).resolve().parent
# Installed wheels carry a copy of the defaults; a checkout reads config/ beside the package.
_DEFAULTS_CANDIDATES = (_PACKAGE_DIR.parent / "config" / "settings.toml", _PACKAGE_DIR / "settings.toml")
BUNDLED_MODEL_DIR = _PACKAGE_DIR / "bundled" / "blazeface-short-range"
# Durations the drop-folder watcher sleeps or waits for: 0 or less would make it spin.
_POSITIVE_SECONDS = ("settle_seconds", "incomplete_timeout_seconds", "rescan_seconds", "body_timeout_seconds",
                     "decode_wait_seconds")


@dataclass(frozen=True)
class Settings:
    """Every setting of the service; see config/settings.toml for what each one means."""

    host: str = "0.0.0.0"
    port: int = 8080
    data_dir: Path = Path("./var")
    max_body_bytes: int = 20_000_000
    max_image_pixels: int = 50_000_000
    decode_memory_bytes: int = 256 * 1024 * 1024
    decode_wait_seconds: float = 10.0
    max_multipart_parts: int = 8
    body_timeout_seconds: float = 30.0
    workers: int = 0
    runtime_threads: int = 0
    score_threshold: float = 0.5
    keep_versions: int = 3
    max_package_files: int = 64
    max_package_bytes: int = 1_000_000_000
    max_compression_ratio: float = 200.0
    settle_seconds: float = 1.0
    incomplete_timeout_seconds: float = 120.0
    rescan_seconds: float = 15.0
    rollback_after_failures: int = 3
    log_format: str = "auto"
    log_level: str = "info"
    twin: str = "auto"
    twin_progress_seconds: float = 5.0
    twin_timeout_seconds: float = 30.0
    download_retries: int = 5
    download_read_timeout_seconds: float = 30.0
    connection_string: str | None = dataclasses.field(default=None, repr=False)  # a secret: never logged
    api_token: str | None = dataclasses.field(default=None, repr=False)
    api_token_scope: str = "admin"
    bundled_model: Path = BUNDLED_MODEL_DIR

    def __post_init__(self) -> None:
        for name in _POSITIVE_SECONDS:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} ({ENV_PREFIX}{name.upper()}) must be a number of seconds above 0, "
                                 f"not {value!r}")
        if self.api_token_scope not in API_TOKEN_SCOPES:
            raise ValueError(f"api_token_scope ({ENV_PREFIX}API_TOKEN_SCOPE) must be one of "
                             f"{', '.join(API_TOKEN_SCOPES)}, not {self.api_token_scope!r}")

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else min(4, os.cpu_count() or 1)

    # The on-disk layout, in one place.
    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def current_link(self) -> Path:
        return self.data_dir / "current"

    @property
    def inbox_dir(self) -> Path:
        return self.data_dir / "inbox"

    @property
    def staging_dir(self) -> Path:
        return self.data_dir / "staging"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _coerce(value: Any, target: Any) -> Any:
    if target in ("int", int):
        return int(value)
    if target in ("float", float):
        return float(value)
    if target in ("Path", Path):
        return Path(value)
    if target in ("Path | None", "str | None") and value in ("", None):
        return None
    return value


def _read_defaults(path: Path | None) -> dict[str, Any]:
    for candidate in (path,) if path else _DEFAULTS_CANDIDATES:
        if candidate and candidate.is_file():
            with candidate.open("rb") as f:
                return tomllib.load(f)
    return {}


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Defaults < config file < environment < overrides (flags; None values are ignored)."""
    env = os.environ if env is None else env
    types = {f.name: f.type for f in fields(Settings)}
    values: dict[str, Any] = {}
    for key, value in _read_defaults(config_file).items():
        if key not in types:
            raise ValueError(f"unknown setting {key!r} in {config_file or 'config/settings.toml'}")
        values[key] = value
    for key in types:
        env_value = env.get(ENV_PREFIX + key.upper())
        if env_value is not None:
            values[key] = env_value
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    coerced: dict[str, Any] = {}
    for key, value in values.items():
        try:
            coerced[key] = _coerce(value, types[key])
        except ValueError:
            raise ValueError(f"bad setting: {key} ({ENV_PREFIX}{key.upper()}) must be "
                             f"{_TYPE_WORDS.get(str(types[key]), str(types[key]))}, not {value!r}") from None
    try:
        return Settings(**coerced)
    except ValueError as exc:
        raise ValueError(f"bad setting: {exc}") from exc
