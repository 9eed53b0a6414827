"""The README says what the code does: its error table lists every status and code the API answers
with, and its examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from supervisor import errors
from supervisor.http.openapi import openapi_document

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _error_table() -> dict[int, str]:
    rows = re.findall(r"^\| (\d{3}) \| (.+?) \| .+ \|$", README, re.MULTILINE)
    return {int(status): codes for status, codes in rows}


def test_the_error_table_lists_every_status_the_api_answers_with() -> None:
    documented = _error_table()
    in_openapi = {int(code) for path in openapi_document()["paths"].values() for op in path.values()
                  for code in op["responses"] if code != "200"}
    # aiohttp's own: a route that exists for another method.
    assert set(documented) == in_openapi | {405}
    typed = {cls.status: cls.code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.EdgeLoaderError) and cls.status >= 400}
    for status, code in typed.items():
        assert f"`{code}`" in documented[status], (status, code)
    for status, code in ((401, "unauthorized"), (405, "method_not_allowed"), (500, "internal_error")):
        assert f"`{code}`" in documented[status]


def test_the_readme_pack_example_runs_as_written(tmp_path: Path) -> None:
    block = re.search(r"```sh\n(\.venv/bin/edgeloader pack .+?)```", README, re.DOTALL)
    assert block is not None
    for line in block.group(1).strip().splitlines():
        argv = line.split()
        assert argv[0] == ".venv/bin/edgeloader"
        # The same entry point as .venv/bin/edgeloader, from this checkout.
        argv = [a.replace("/tmp/", f"{tmp_path}/") for a in argv[1:]]
        proc = subprocess.run([sys.executable, "-m", "supervisor", *argv], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, (line, proc.stderr)
    assert (tmp_path / "faces.zip").is_file() and (tmp_path / "faces.zip.sha256").is_file()
