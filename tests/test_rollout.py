"""``edgeloader rollout``: the layered deployment it writes is valid (SchemaStore's deployment schema, as a
layer), sets what the device accepts, and its metrics count what the module really reports."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from packages import BUNDLED, blazeface_files, write_zip
from test_deployment import LAYERED, MODULE, REPO, TWIN_FIELDS, TWIN_PATCH, jsonschema_module, load_schema
from test_packcli import _WITHOUT_RUNTIMES

from supervisor.__main__ import main
from supervisor.cli.rollout import METRICS, deployment, metric_queries
from supervisor.cli.twinpatch import desired_properties
from supervisor.twin.desired import DesiredModel
from supervisor.twin.reporter import active_patch, merge_patch, status_patch
from supervisor.twin.service import _REPORTED_STATE
from supervisor.updates.events import ModelEvent

URL = "https://examplestorage.blob.core.windows.net/models/faces-2.zip?sv=2024-08-04&sr=b&sp=r&sig=SECRET"
CANARY = "tags.modelRing='canary'"


def layered_errors(document: dict[str, Any]) -> list[str]:
    """SchemaStore's deployment 2.0 schema, as a layer: a layered deployment need not carry $edgeAgent and
    $edgeHub (the base deployment does), everything it does carry follows the same rules."""
    schema = copy.deepcopy(load_schema("azure-iot-edge-deployment-2.0.json"))
    schema["properties"]["modulesContent"].pop("required")
    validator = jsonschema_module().Draft4Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document["content"])]


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return write_zip(tmp_path / "faces-2.zip", blazeface_files("faces", "2"))


def rollout(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any] | None, str]:
    code = main(["rollout", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 and out.strip() else None), err


def test_rollout_writes_a_valid_layered_deployment_of_the_twin_patch(
    package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "canary.json"
    code, _, err = rollout(capsys, str(package), "--url", URL, "--target-condition", CANARY, "--priority", "30",
                           "-o", str(out), "--hub-name", "MyHub")
    assert code == 0, err
    document = json.loads(out.read_text())
    assert layered_errors(document) == []
    assert (document["id"], document["targetCondition"], document["priority"]) == ("eml-faces-2-p30", CANARY, 30)

    # Only the module twin: modules, routes and the runtime stay with the base deployment.
    content = document["content"]["modulesContent"]
    assert list(content) == [MODULE] and list(content[MODULE]) == ["properties.desired"]
    desired = content[MODULE]["properties.desired"]
    assert set(desired) == TWIN_FIELDS, "it replaces the module's whole desired document"
    assert desired == {**desired_properties(package, URL), "ModelName": "", "ModelVersion": ""}
    model = DesiredModel.parse(desired)
    assert model is not None and model.file_name == "faces-2.zip" and model.activate and model.name is None

    # What the az extension reads from the one file: content.modulesContent and metrics.queries.
    assert set(document["metrics"]["queries"]) == set(METRICS) == {"applied", "downloading", "installing", "failed"}
    assert "sig=SECRET" not in err and "?REDACTED" in err
    assert (f"az iot edge deployment create --layered --hub-name MyHub --deployment-id eml-faces-2-p30 "
            f"--content {out} --metrics {out} --target-condition \"{CANARY}\" --priority 30") in err
    assert "az iot edge deployment show-metric" in err


def test_rollout_from_a_twin_patch_file_is_the_same(
    package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["twin-patch", str(package), "--url", URL, "--name", "faces", "--version", "2", "--wrap"]) == 0
    (tmp_path / "patch.json").write_text(capsys.readouterr().out)
    args = ("--target-condition", "tags.modelRing='fleet'", "--priority", "20", "--id", "faces-2-fleet")
    _, from_patch, _ = rollout(capsys, "--patch", str(tmp_path / "patch.json"), *args)
    _, from_package, _ = rollout(capsys, str(package), "--url", URL, "--name", "faces", "--version", "2", *args)
    assert from_patch == from_package is not None
    assert from_patch["content"]["modulesContent"][MODULE]["properties.desired"]["ModelName"] == "faces"


def test_the_layered_example_is_what_rollout_makes_of_the_twin_patch_example(
    capsys: pytest.CaptureFixture[str],
) -> None:
    example = json.loads(LAYERED.read_text())
    code, made, err = rollout(capsys, "--patch", str(TWIN_PATCH), "--target-condition", example["targetCondition"],
                              "--priority", str(example["priority"]), "--id", example["id"])
    assert code == 0, err
    assert made == example, "regenerate config/deployment.layered.example.json with edgeloader rollout"
    assert layered_errors(example) == []


@pytest.mark.parametrize(("argv", "says"), [
    (["--target-condition", "", "--priority", "1"], "a target condition is needed"),
    (["--target-condition", CANARY, "--priority", "-1"], "priority must be 0 or more"),
    (["--target-condition", CANARY, "--priority", "1", "--id", "Faces 2"], "deployment id 'Faces 2'"),
    (["--target-condition", CANARY, "--priority", "1", "--file-name", "it's.zip"], "quotes"),
])
def test_rollout_refuses_what_iot_hub_or_the_device_would(
    package: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    code, document, err = rollout(capsys, str(package), "--url", URL, *argv)
    assert (code, document) == (2, None) and says in err, err


def test_rollout_refuses_a_patch_the_device_would_refuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    patch = json.loads(TWIN_PATCH.read_text())
    patch["DownloadURL"] = patch.pop("DownloadUrl")  # misspelt: the device would fail the update
    (tmp_path / "patch.json").write_text(json.dumps(patch))
    code, _, err = rollout(capsys, "--patch", str(tmp_path / "patch.json"), "--target-condition", CANARY,
                           "--priority", "1")
    assert code == 2 and "did you mean 'DownloadUrl'" in err, err


# --- the metrics, evaluated against what the module reports ------------------------------------------------

_CONDITION = re.compile(r"([\w.]+) (?:= '([^']*)'|IN \[((?:'[^']*'(?:, )?)+)\])")


def matches(query: str, twin: dict[str, Any]) -> bool:
    """Whether a module twin is counted by ``query``: the subset of IoT Hub's query language the metrics use
    (``SELECT deviceId FROM devices.modules WHERE`` conditions ``path = 'x'`` or ``path IN ['x', ...]`` joined
    by AND). Anything else in the query fails the test rather than being guessed at."""
    head, _, where = query.partition(" WHERE ")
    assert head == "SELECT deviceId FROM devices.modules", query
    for condition in where.split(" AND "):
        match = _CONDITION.fullmatch(condition)
        assert match, f"not understood: {condition!r}"
        path, value, values = match.groups()
        allowed = {value} if value is not None else set(re.findall(r"'([^']*)'", values))
        node: Any = twin
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node not in allowed:
            return False
    return True


def module_twin(reported: dict[str, Any], module: str = MODULE) -> dict[str, Any]:
    return {"deviceId": "rig-7", "moduleId": module, "properties": {"reported": reported}}


REPORTED_STATES = sorted(set(_REPORTED_STATE.values()) | {"rolled_back"})


@pytest.mark.parametrize("activate", [True, False])
def test_every_reported_state_is_counted_by_one_metric(activate: bool) -> None:
    """The states are what twin/service.py reports (through twin/reporter.py's status_patch)."""
    queries = metric_queries("faces-2.zip", activate=activate)
    counted = {}
    for state in REPORTED_STATES:
        reported = status_patch(state, file_name="faces-2.zip", desired_version=7, reason=None)
        if state == "active":  # as the module reports an activation: the status and the active model
            event = ModelEvent(state="active", source="twin", package="faces-2.zip", name="faces", version="2")
            reported = merge_patch(reported, active_patch(event))
        hits = [metric for metric, query in queries.items() if matches(query, module_twin(reported))]
        assert len(hits) <= 1, (state, hits)
        counted[state] = hits[0] if hits else None
        # Another package's status, or another module's, is not this rollout's.
        other = status_patch(state, file_name="faces-1.zip", desired_version=6)
        assert not any(matches(q, module_twin(other)) for q in queries.values())
        assert not any(matches(q, module_twin(reported, "othermodule")) for q in queries.values())
    applied = "active" if activate else "stored"
    assert counted == {
        "downloading": "downloading", "verifying": "installing", "activating": "installing",
        "active": "applied" if activate else None, "stored": None if activate else "applied",
        "failed": "failed", "rolled_back": "failed",
    }, counted
    assert counted[applied] == "applied"


def test_deployment_builds_on_the_module_name_given() -> None:
    desired = json.loads(TWIN_PATCH.read_text())
    document = deployment(desired, deployment_id="x", target_condition=CANARY, priority=5, module="loader2")
    assert list(document["content"]["modulesContent"]) == ["loader2"]
    assert all("moduleId = 'loader2'" in q for q in document["metrics"]["queries"].values())


def test_rollout_runs_without_the_runtimes_or_aiohttp(tmp_path: Path) -> None:
    """Like pack and twin-patch, on a build machine or in a release pipeline."""
    package = write_zip(tmp_path / "faces-2.zip", {p.name: p.read_bytes() for p in BUNDLED.iterdir()})
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_RUNTIMES, str(REPO), "rollout", str(package), "--url", URL,
         "--target-condition", CANARY, "--priority", "10"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["content"]["modulesContent"][MODULE]["properties.desired"]["FileName"] == (
        "faces-2.zip")
