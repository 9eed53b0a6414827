"""Settings: defaults < config/settings.toml (or ``--config FILE``) < ``EDGELOADER_*`` environment
variables < command-line flags, each layer read by pydantic-settings and resolved in one place
(``load_settings``). Every field says what it means; a bad value fails with one line naming the
setting where the user set it (the flag, the variable, the file) and the form it must have."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from supervisor.twin.gate import parse_window
from supervisor.typed_input import describe_errors, nearest

__all__ = [
    "API_TOKEN_SCOPES",
    "ENV_PREFIX",
    "Settings",
    "SettingsError",
    "load_settings",
    "unknown_environment",
]

ENV_PREFIX = "EDGELOADER_"
# Who needs the API token when one is set (supervisor/http/auth.py): model switching only, or every route.
API_TOKEN_SCOPES = ("admin", "all")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_PACKAGE_DIR = Path(__file__).resolve().parent
# Installed wheels carry a copy of the defaults; a checkout reads config/ beside the package.
_DEFAULTS_CANDIDATES = (_PACKAGE_DIR.parent / "config" / "settings.toml", _PACKAGE_DIR / "settings.toml")
BUNDLED_MODEL_DIR = _PACKAGE_DIR / "bundled" / "blazeface-short-range"
# EDGELOADER_* variables read elsewhere, not settings: not "unknown".
_ENV_NOT_SETTINGS = frozenset({"CA_CERT"})
# Settings whose value never appears in a message.
_SECRETS = frozenset({"connection_string", "api_token"})
# Flags of `edgeloader serve`, by setting.
FLAGS = {"host": "--host", "port": "--port", "data_dir": "--data-dir", "twin": "--twin"}


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _windows(value: Any) -> Any:
    """A list of "HH:MM-HH:MM"; from the environment also JSON (``["01:00-05:00"]``) or comma-separated."""
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text.startswith("[") else [p for p in text.split(",") if p.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(w, str) for w in value):
        raise ValueError("must be a list of time windows like [\"01:00-05:00\"]")
    return [str(parse_window(w)) for w in value]


def _path_list(value: Any) -> Any:
    """A list of paths from the environment: a JSON list, or paths separated by commas."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            try:
                return json.loads(text)
            except ValueError:
                return value  # pydantic names the setting and the form expected
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # 0 or less would make a loop spin
Count = Annotated[int, Field(ge=1)]


class SettingsError(ValueError):
    """A setting the service cannot run with; the message is one line naming it and what to set."""


class Settings(BaseSettings):
    """Every setting of the service (documented with its default in config/settings.toml)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, use_attribute_docstrings=True,
        env_ignore_empty=True, validate_default=True,
    )

    host: str = "0.0.0.0"
    """Address to listen on."""
    port: int = Field(8080, ge=0, le=65535)
    """TCP port to listen on (0: any free port)."""
    data_dir: Path = Path("./var")
    """Local storage: models/, current, inbox/, staging/, quarantine/. On IoT Edge, bind host storage here."""
    max_body_bytes: Count = 20_000_000
    """Largest request body accepted by /detect and /score, in bytes."""
    max_image_pixels: Count = 50_000_000
    """Images above this many pixels are refused (decompression bombs)."""
    decode_memory_bytes: Count = 256 * 1024 * 1024
    """Memory, in bytes, the image decodes in flight may use together; one that alone needs more is
    refused (413), others wait for room (handlers/decodecost.py estimates each from its header)."""
    decode_wait_seconds: Seconds = 10.0
    """Seconds a request waits for decode memory before it is answered 503 (busy)."""
    max_multipart_parts: Count = 8
    """Parts a multipart body may have (the image is one; a form may add a few)."""
    body_timeout_seconds: Seconds = 30.0
    """Seconds a client has to send its whole request body (a trickling upload is answered 408)."""
    workers: int = Field(0, ge=0)
    """Worker threads running inference (0 = one per CPU core, at most 4)."""
    runtime_threads: int = Field(0, ge=0)
    """Threads each runtime call may use inside the model when several requests run at once (0 = cores / workers)."""
    wide_lane: bool = True
    """Give a lone request every core (one more session or interpreter per model; false saves its memory)."""
    score_threshold: float = Field(0.5, ge=0.0, le=1.0)
    """Default score threshold when a request and the manifest give none."""
    keep_versions: Count = 3
    """Versions kept per model name (the active and the previous one are never deleted)."""
    max_package_files: Count = 64
    """Most files a model package may hold (zip-bomb and sneakernet-mistake guard)."""
    max_package_bytes: Count = 1_000_000_000
    """Most bytes a model package may unpack to."""
    max_compression_ratio: float = Field(200.0, gt=1.0, allow_inf_nan=False)
    """Highest compression ratio accepted in a zip (zip bombs have thousands)."""
    settle_seconds: Seconds = 1.0
    """Seconds a dropped file must stay unchanged before it counts as completely copied."""
    incomplete_timeout_seconds: Seconds = 120.0
    """Seconds a zip that stopped growing without its end is waited for before it is quarantined."""
    rescan_seconds: Seconds = 15.0
    """Seconds between rescans of inbox/ and staging/ when no file notification arrived."""
    rollback_after_failures: Count = 3
    """Consecutive failed inferences right after an activation that trigger an automatic rollback."""
    log_format: Annotated[Literal["auto", "json", "console"], BeforeValidator(_lower)] = "auto"
    """"auto" (console on a TTY, JSON otherwise), "json" or "console"."""
    log_level: Annotated[Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(_lower)] = "info"
    """Lowest level logged."""
    twin: Annotated[Literal["auto", "off"], BeforeValidator(_lower)] = "auto"
    """IoT Hub: "auto" connects when IoT Edge or a connection string says how, "off" never does."""
    twin_progress_seconds: Seconds = 30.0
    """Seconds between twin progress reports while downloading (IoT Hub throttles chatty devices)."""
    twin_timeout_seconds: Seconds = 30.0
    """Seconds to wait for an IoT Hub answer before treating the link as down."""
    download_retries: Count = 5
    """Attempts for one download before it is reported failed (each resumes where the last stopped)."""
    download_read_timeout_seconds: Seconds = 30.0
    """Seconds without a byte from the blob server before an attempt is cut and resumed."""
    download_rate_limit: int = Field(0, ge=0)
    """Bytes per second all model downloads together may use (0 = no limit): the link is shared."""
    download_windows: Annotated[list[str], NoDecode, BeforeValidator(_windows)] = []
    """Device-local times when downloads may run, e.g. ["01:00-05:00"] (an end before the start runs
    past midnight); outside them a download pauses and resumes later. Empty: any time."""
    connection_string: str | None = Field(None, repr=False)
    """IoT Hub module connection string, for development against a hub without IoT Edge. A secret."""
    api_token: str | None = Field(None, repr=False)
    """Bearer token the HTTP API requires (see api_token_scope). A secret: set it in the environment."""
    api_token_scope: Annotated[Literal["admin", "all"], BeforeValidator(_lower)] = "admin"
    """Routes that need the token: "admin" (model switching) or "all" (all but the health probes)."""
    bundled_model: Path = BUNDLED_MODEL_DIR
    """The model served when the repository holds none."""
    # -- trust and limits (issue 16) --
    trusted_keys: Annotated[list[Path], NoDecode, BeforeValidator(_path_list)] = Field(default_factory=list)
    """Public keys (PEM files, or folders of *.pub / *.pem files) whose signatures a package may carry,
    separated by commas in the environment. On IoT Edge: files bound into the container read-only."""
    require_signature: bool = False
    """Install only packages signed (model-signing format, model.sig) by one of trusted_keys: an unsigned
    package, one signed by another key, or one changed after signing is quarantined with that reason."""
    quarantine_keep: Count = 20
    """Rejected packages whose bytes quarantine/ keeps (the oldest go first; their reasons stay longer)."""
    quarantine_max_bytes: int = Field(200_000_000, ge=0)
    """Most bytes the packages kept in quarantine/ may take together (a larger package is not kept)."""
    max_queued_requests: Count = 32
    """Requests admitted at once (waiting for or in inference); beyond, 503 busy with Retry-After."""
    header_timeout_seconds: Seconds = 15.0
    """Seconds a client has to send a request's headers; also how long an idle keep-alive connection stays."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Settings(...) is exactly what it is given over the defaults; load_settings adds the file,
        # the environment and the flags, in their order, itself.
        return (init_settings,)

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
        """A copy with ``changes``, validated like any other."""
        return Settings(**{**self._values(), **changes})

    def _values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in type(self).model_fields}


# The expected form of settings whose pydantic message would read poorly.
_FORMS = {
    **{name: "a number of seconds above 0" for name in Settings.model_fields if name.endswith("_seconds")},
    "port": "a port number from 0 to 65535",
    "log_level": f"one of {', '.join(LOG_LEVELS)}",
    "api_token_scope": f"one of {', '.join(API_TOKEN_SCOPES)}",
    "download_windows": 'a list of time windows like ["01:00-05:00"]',
    "download_rate_limit": "a whole number of bytes per second, 0 for no limit",
}


class _EnvironmentSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of ``os.environ`` (the
    same override its dotenv source makes), so that callers and tests can pass the environment."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._given = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._given.items() if not (self.env_ignore_empty and v == "")}


def _config_file(path: Path | None) -> Path | None:
    """The settings file to read: the one given (which must exist), else the defaults if found."""
    if path is not None:
        if not path.is_file():
            raise SettingsError(f"--config {path}: no such file")
        return path
    return next((c for c in _DEFAULTS_CANDIDATES if c.is_file()), None)


def _read_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with path.open("rb") as f:
            values = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"cannot read {path}: {exc.strerror}") from None
    for key in values:
        if key not in Settings.model_fields:
            hint = nearest(key, Settings.model_fields)
            raise SettingsError(f"unknown setting {key!r} in {path}" + (f"; did you mean {hint!r}?" if hint else ""))
    return values


def unknown_environment(env: Mapping[str, str] | None = None) -> list[str]:
    """One warning per ``EDGELOADER_*`` variable that is no setting (a typo is otherwise silently
    ignored), naming the closest setting."""
    env = os.environ if env is None else env
    warnings = []
    for key in sorted(env):
        if not key.upper().startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name in Settings.model_fields or name.upper() in _ENV_NOT_SETTINGS:
            continue
        hint = nearest(name, Settings.model_fields)
        suggestion = f"; did you mean {ENV_PREFIX}{hint.upper()}?" if hint else ""
        warnings.append(f"{key} is not a setting and is ignored{suggestion}")
    return warnings


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Defaults < config file < environment < overrides (flags; None values are ignored).
    Raises SettingsError (a ValueError) with one line naming the bad setting where it was set."""
    env = os.environ if env is None else env
    path = _config_file(config_file)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key in flags:
        if key not in Settings.model_fields:
            raise SettingsError(f"unknown setting {key!r}")
    layers = {
        "file": _read_file(path),
        "env": _EnvironmentSource(Settings, env)(),
        "flag": flags,
    }
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for layer, layer_values in layers.items():
        for key, value in layer_values.items():
            values[key], origin[key] = value, layer

    def label(name: str) -> str:
        where = origin.get(name)
        if where == "flag" and name in FLAGS:
            return f"{name} ({FLAGS[name]})"
        if where == "file":
            return f"{name} (in {path})"
        return f"{name} ({ENV_PREFIX}{name.upper()})"

    try:
        return Settings(**values)
    except ValidationError as exc:
        message = describe_errors(exc, known=list(Settings.model_fields), label=label, forms=_FORMS,
                                  secrets=_SECRETS, what="setting", note_text=False)
        raise SettingsError(f"bad setting: {message}") from None
