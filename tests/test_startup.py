"""Starting `edgeloader serve` as an operator would: a setting it cannot run with is one line on stderr
and exit status 2 (never a traceback); a misspelt EDGELOADER_* variable is named, with the setting
meant; once it says `serving`, the port answers. Real processes, real sockets on loopback."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.settings import load_settings, unknown_environment

REPO = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOADER_")}
    return {**env, **extra}


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`edgeloader serve ARGS` that is expected to stop at start-up."""
    return subprocess.run([sys.executable, "-m", "supervisor", "serve", *args], cwd=REPO, env=env or _env(),
                          capture_output=True, text=True, timeout=60)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("edgeloader: warning:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_a_busy_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        line = one_line_error(serve("--host", "127.0.0.1", "--port", str(port), "--data-dir", str(tmp_path)))
    assert f"port {port} on 127.0.0.1 is already in use" in line and "--port or EDGELOADER_PORT" in line
    assert time.monotonic() - started < 30, "checked before any model is loaded"
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(("variable", "value", "words"), [
    ("EDGELOADER_PORT", "99999", "port (EDGELOADER_PORT) must be a port number from 0 to 65535, not '99999'"),
    ("EDGELOADER_LOG_LEVEL", "verbose",
     "log_level (EDGELOADER_LOG_LEVEL) must be one of debug, info, warning, error, critical, not 'verbose'"),
    ("EDGELOADER_TWIN", "on", "twin (EDGELOADER_TWIN) must be 'auto' or 'off', not 'on'"),
])
def test_a_bad_environment_value_is_one_line(variable: str, value: str, words: str, tmp_path: Path) -> None:
    line = one_line_error(serve("--data-dir", str(tmp_path), env=_env(**{variable: value})))
    assert line == f"edgeloader: bad setting: {words}"


def test_a_bad_flag_value_names_the_flag(tmp_path: Path) -> None:
    line = one_line_error(serve("--port", "70000", "--data-dir", str(tmp_path)))
    assert "port (--port) must be a port number from 0 to 65535, not 70000" in line


def test_a_missing_config_file_is_an_error_not_the_defaults(tmp_path: Path) -> None:
    line = one_line_error(serve("--config", "missing.toml", "--data-dir", str(tmp_path)))
    assert line == "edgeloader: --config missing.toml: no such file"


def test_a_config_file_with_an_unknown_or_bad_key(tmp_path: Path) -> None:
    conf = tmp_path / "s.toml"
    conf.write_text("worker = 2\n")
    assert "unknown setting 'worker' in" in one_line_error(serve("--config", str(conf)))
    assert "did you mean 'workers'?" in one_line_error(serve("--config", str(conf)))
    conf.write_text('settle_seconds = "soon"\n')
    line = one_line_error(serve("--config", str(conf)))
    assert f"settle_seconds (in {conf}) must be a number of seconds above 0, not 'soon'" in line
    conf.write_text("port = \n")
    assert "is not valid TOML" in one_line_error(serve("--config", str(conf)))


def test_a_model_flag_that_cannot_be_used_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(serve("--model", "missing.zip", "--port", "0", "--data-dir", str(tmp_path)))
    assert line == "edgeloader: --model missing.zip: no such file or folder"
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    proc = serve("--model", str(bad), "--host", "127.0.0.1", "--port", "0", "--twin", "off",
                 "--data-dir", str(tmp_path / "data"), env=_env(EDGELOADER_LOG_FORMAT="json"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (f"edgeloader: --model {bad} was rejected: not a valid zip file "
                                                    "(truncated, or not a zip at all)")


def test_a_misspelt_variable_is_named_with_the_setting_meant(tmp_path: Path) -> None:
    assert unknown_environment({"EDGELOADER_WORKER": "1", "EDGELOADER_CA_CERT": "ca.pem", "HOME": "/root"}) == [
        "EDGELOADER_WORKER is not a setting and is ignored; did you mean EDGELOADER_WORKERS?"]
    # Through the command line (stopped by a bad port, so nothing starts): the warning comes first.
    proc = serve("--data-dir", str(tmp_path), env=_env(EDGELOADER_WORKER="1", EDGELOADER_PORT="-1"))
    one_line_error(proc)
    assert proc.stderr.splitlines()[0] == ("edgeloader: warning: EDGELOADER_WORKER is not a setting and is "
                                           "ignored; did you mean EDGELOADER_WORKERS?")


def test_the_connection_string_never_appears_in_a_settings_error(tmp_path: Path) -> None:
    secret = "HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey=c2VjcmV0"
    with pytest.raises(ValueError) as caught:
        load_settings({"data_dir": tmp_path}, env={"EDGELOADER_CONNECTION_STRING": secret, "EDGELOADER_PORT": "x"})
    assert "SharedAccessKey" not in str(caught.value)
    assert secret not in repr(load_settings({"data_dir": tmp_path}, env={"EDGELOADER_CONNECTION_STRING": secret}))


# -- a service that starts -------------------------------------------------------------------------


class Running:
    """`edgeloader serve` in the background; its stdout (JSON log lines) read by a thread."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor", "serve", *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, event: str, within: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.seen[-5:]}"
                continue
            record = self._record(line)
            if record.get("event") == event:
                return record
        raise AssertionError(f"no {event!r} line within {within} s; saw {[r.get('event') for r in self.seen]}")

    def _record(self, line: str) -> dict[str, Any]:
        try:
            record = json.loads(line)
        except ValueError:  # a runtime's own stderr ("INFO: Created TensorFlow Lite XNNPACK delegate")
            record = {"event": "<not json>", "line": line}
        self.seen.append(record)
        return record

    def drain(self) -> None:
        """Read the rest of the output (call after the process ended)."""
        self._reader.join(timeout=10)
        while not self.lines.empty():
            self._record(self.lines.get())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def close(self) -> None:
        """Kill the process if it still runs; end the reader and close the pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    service = Running("--host", "127.0.0.1", "--port", "0", "--data-dir", str(tmp_path / "data"), "--twin", "off",
                      env=_env(EDGELOADER_LOG_FORMAT="json", EDGELOADER_SETTLE_SECONDS="0.2"))
    try:
        yield service
    finally:
        service.close()


def test_serving_is_said_once_the_port_answers_and_names_it(running: Running, tmp_path: Path) -> None:
    record = running.wait_for("serving")
    assert record["host"] == "127.0.0.1" and record["port"] > 0
    assert record["url"] == f"http://127.0.0.1:{record['port']}/" and record["model"] == "blazeface-short-range"
    events = [r.get("event") for r in running.seen]
    assert events.index("model_ready") < events.index("serving")
    # No wait: the moment it says so, the port answers.
    with urllib.request.urlopen(f"{record['url']}readyz", timeout=5) as response:
        assert response.status == 200
    # File events in the drop folder: watchfiles' "N changes detected" is debug detail, not info.
    running.wait_for("watcher_started")
    time.sleep(1.0)  # the OS watch starts just after that line; a file written before it raises no event
    (tmp_path / "data" / "inbox" / "notes.txt").write_text("not a model\n")
    running.wait_for("model_event")  # the watcher handed it over (and the pipeline refused it)
    assert running.stop() == 0
    running.drain()
    chatter = [r for r in running.seen if re.fullmatch(r"\d+ changes? detected.*", str(r.get("event")))]
    assert not chatter
