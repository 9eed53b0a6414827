"""SAS tokens and shared access keys never reach a log line or a reported property."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from supervisor.redact import REDACTED, redact, redact_processor, redact_url
from supervisor.twin.download import Download, DownloadError

pytest_plugins = ["iot_fixtures"]

SAS = "sv=2023-11-03&st=2025-01-01T00%3A00%3A00Z&se=2025-01-02T00%3A00%3A00Z&sr=b&sp=r&sig=AbC%2Bd%2FeF0%3D"
URL = f"https://acct.blob.core.windows.net/models/ssd-1.2.zip?{SAS}"


def test_redact_text() -> None:
    assert redact(URL) == f"https://acct.blob.core.windows.net/models/ssd-1.2.zip?{REDACTED}"
    assert redact(f"GET {URL} failed") == f"GET https://acct.blob.core.windows.net/models/ssd-1.2.zip?{REDACTED} failed"
    assert "AbC" not in redact(f"message='Forbidden', url='{URL}'")
    assert "sig=" not in redact(f"yarl URL('{URL}')")
    assert redact("HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey=c2VjcmV0+/=") == (
        f"HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey={REDACTED}"
    )
    assert "secret" not in redact("SharedAccessSignature sr=h%2Fdevices%2Fd&sig=secret&se=1")
    assert "secret" not in redact("AccountKey=secret;EndpointSuffix=core.windows.net")
    for harmless in ("https://host/model.zip", "signature=fine", "design=x", "?a=1&b=2"):
        assert redact(harmless) == harmless


def test_redact_url_keeps_where_but_not_the_secret() -> None:
    assert redact_url(URL) == f"https://acct.blob.core.windows.net/models/ssd-1.2.zip?{REDACTED}"
    assert redact_url("https://user:pw@host/x.zip?a=1") == "https://host/x.zip?a=1"


def _render(event: dict[str, object]) -> str:
    return json.dumps(redact_processor(None, "info", dict(event)), default=str)


def test_processor_redacts_values_anywhere() -> None:
    class Url:  # an object whose text holds the secret (yarl.URL, a request, an exception)
        def __str__(self) -> str:
            return URL

    out = _render({
        "event": f"fetching {URL}", "url": Url(), "nested": {"list": [URL, (URL,)], "n": 3},
        "count": 7, "ok": True, "none": None,
    })
    assert "AbC" not in out and "sig=" not in out and out.count(REDACTED) == 4
    assert json.loads(out)["count"] == 7


def test_nesting_and_odd_values_never_let_a_secret_through() -> None:
    deep: object = {"url": URL}
    for _ in range(10):
        deep = {"next": [deep]}
    shallow = {"a": {"b": [URL, 3, None]}}
    six: object = {"url": URL}
    for _ in range(6):
        six = {"in": six}
    cycle: dict[str, object] = {"url": URL}
    cycle["self"] = cycle
    loop: list[object] = [URL]
    loop.append(loop)
    event = redact_processor(None, "info", {"event": "e", "deep": deep, "shallow": shallow, "six": six,
                                            "cycle": cycle, "loop": loop})
    assert "sig=" not in json.dumps(event, default=str)
    safe = f"{URL.split('?')[0]}?{REDACTED}"
    assert event["shallow"] == {"a": {"b": [safe, 3, None]}}  # structure kept
    inner = event["six"]
    for _ in range(6):  # structure kept down to the sixth level of nesting...
        inner = inner["in"]
    assert inner == {"url": safe}
    assert isinstance(event["cycle"], dict) and isinstance(event["loop"], list)  # ...and one that contains
    # itself ends, six levels down, as its text, redacted

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    odd = Unprintable()
    assert redact_processor(None, "info", {"event": "e", "odd": odd})["odd"] is odd  # passed through
    # A URL that does not even parse (an unclosed IPv6 bracket) is still redacted as text.
    assert redact_url("https://[::1/models/m.zip?sv=1&sig=AbC%3D") == f"https://[::1/models/m.zip?{REDACTED}"


def test_processor_redacts_tracebacks() -> None:
    try:
        raise RuntimeError(f"request to {URL} failed")
    except RuntimeError:
        event = redact_processor(None, "error", {"event": "boom", "exc_info": True})
    assert "exc_info" not in event and "request to https://acct" in event["exception"]
    assert "sig=" not in event["exception"]


def test_stdlib_and_structlog_logs_go_through_redaction() -> None:
    """The way supervisor/logs.py wires it: structlog events and foreign (stdlib) records alike."""
    shared = [structlog.stdlib.add_log_level, redact_processor]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.JSONRenderer()],
    ))
    logger = logging.getLogger("test.redact.foreign")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("aiohttp says: %s", URL)
        structlog_logger = structlog.wrap_logger(
            logger, processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
            wrapper_class=structlog.stdlib.BoundLogger,
        )
        structlog_logger.warning("download", url=URL)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert text.count(REDACTED) == 2 and "sig=" not in text and "AbC" not in text


async def test_download_failures_log_and_report_no_sas(tmp_path: Path, blob_store) -> None:
    """Even with no redacting processor configured, the download module logs no secret itself."""
    blob_store.upload("m.zip", b"x" * 100)
    url = blob_store.sas_url("m.zip", expires_in=-60)
    assert "sig=" in url
    with capture_logs() as logs, pytest.raises(DownloadError) as err:
        await Download(url, tmp_path / "m.zip.part", retries=0).run()
    assert "sig=" not in err.value.reason
    bad_host = url.replace(f"{blob_store.azurite.host}:{blob_store.azurite.port}", "127.0.0.1:9")
    with capture_logs() as more, pytest.raises(DownloadError) as err2:
        await Download(bad_host, tmp_path / "m.zip.part", retries=1, backoff_base=0.01).run()
    assert "sig=" not in err2.value.reason
    assert logs + more and "sig=" not in json.dumps(logs + more, default=str)


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_the_service_logging_set_up_redacts_every_line(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``configure_logging``, as ``edgeloader serve`` calls it: a structlog event, a stdlib record from
    a library (the IoT SDK, aiohttp) and a traceback, each naming a SAS URL, reach stdout redacted."""
    from supervisor.logs import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(fmt, "info")
        log = structlog.get_logger("supervisor.test_redact")
        log.warning("download_failed", url=URL, reason=f"GET {URL} timed out")
        logging.getLogger("azure.iot.device.test").warning("connect failed: %s", URL)
        try:
            raise ConnectionError(f"cannot reach {URL}")
        except ConnectionError:
            log.exception("download_crashed")
        out = capsys.readouterr().out
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        structlog.reset_defaults()
    assert "download_failed" in out and "connect failed" in out and "cannot reach" in out
    assert "sig=" not in out and "AbC" not in out
    assert out.count(REDACTED) >= 4
    if fmt == "json":
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines[0]["url"] == "https://acct.blob.core.windows.net/models/ssd-1.2.zip?REDACTED"
