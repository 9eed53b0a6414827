"""The IoT Edge packaging: Dockerfile (hadolint and the contract the deployment relies on), module.json,
the deployment template expanded by the real ``iotedgedev`` and validated offline against the SchemaStore
schemas, and the model-update examples (layered deployment, twin patch) parsed by the service's own code.

A missing tool skips these tests, or fails them when env ``CI`` is set.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, NoReturn

import pytest

from supervisor.twin.service import OUTPUT_NAME, DesiredModel

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
MODULE_JSON = REPO / "docker" / "module.json"
TEMPLATE = REPO / "deployment.template.json"
LAYERED = REPO / "config" / "deployment.layered.example.json"
TWIN_PATCH = REPO / "config" / "twin-patch.example.json"
SCHEMAS = Path(__file__).resolve().parent / "data" / "schemas"

MODULE = "edgemodelloader"  # the module's name in the manifest: routes and docs use it
DATA_DIR = "/iotedge/storage"
HOST_DATA_DIR = "/var/lib/edge-model-loader"
REGISTRY = "registry.example.com:5000"
TWIN_FIELDS = {"FileName", "DownloadUrl", "ContentMD5", "ContentSHA256", "ContentLength", "ModelName",
               "ModelVersion", "Activate"}


def missing(message: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def tool(name: str) -> str:
    """A console script of this virtual environment (or on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        missing(f"{name} is not installed (pip install -e '.[dev]')")
    return str(found)


def jsonschema_module() -> Any:
    try:
        import jsonschema
    except ImportError:
        missing("jsonschema is not installed (pip install -e '.[dev]')")
    return jsonschema


# --- Dockerfile -----------------------------------------------------------------------------------


def parse_dockerfile(path: Path = DOCKERFILE) -> list[list[tuple[str, str]]]:
    """Instructions per stage, as (INSTRUCTION, arguments) with continuation lines joined. The global
    ARGs before the first FROM are left out (``global_args``)."""
    return _parse_dockerfile(path)[1:]


def global_args(path: Path = DOCKERFILE) -> dict[str, str]:
    """The ARGs declared before the first FROM, with their defaults."""
    (preamble, *_) = _parse_dockerfile(path)
    args: dict[str, str] = {}
    for instruction, value in preamble:
        assert instruction == "ARG", f"only ARG may come before the first FROM, not {instruction}"
        key, _, default = value.partition("=")
        args[key] = default
    return args


def _parse_dockerfile(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = [[]]
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        instruction, _, args = logical.partition(" ")
        logical = ""
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    assert len(stages) > 1, "no FROM in the Dockerfile"
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [args for instruction, args in stage if instruction == name]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions(stage, "ENV"):
        for pair in shlex.split(args):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form instruction (fails on the shell form)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_command(stage: list[tuple[str, str]]) -> list[str]:
    (args,) = instructions(stage, "HEALTHCHECK")
    return exec_form(args.split(" CMD ", 1)[1])


def test_hadolint_passes() -> None:
    result = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint found problems:\n{result.stdout}{result.stderr}"


def test_dockerfile_runs_the_installed_wheel_as_non_root_with_storage_and_healthcheck() -> None:
    builder, runtime = parse_dockerfile()
    # Both stages on one base, a build argument whose default is the official slim Python image.
    assert global_args() == {"BASE_IMAGE": "python:3.11-slim-bookworm"}
    assert instructions(builder, "FROM") == ["${BASE_IMAGE} AS builder"]
    assert instructions(runtime, "FROM") == ["${BASE_IMAGE}"]

    # The builder copies only what the wheel is made of, and the build context lets exactly that in.
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for args in instructions(builder, "COPY"):
        for source in args.split()[:-1]:
            assert source in allowed, f"{source} is copied but .dockerignore keeps it out of the context"
            assert (REPO / source).exists(), source
    build = " ".join(instructions(builder, "RUN"))
    assert "pip wheel" in build and "edge_model_loader-*.whl" in build
    assert " -e " not in build and "--editable" not in build
    assert "[dev]" not in build and "optional-dependencies" not in build, "the image installs no dev tools"
    # The dependencies' layer comes from pyproject.toml alone, before the code is copied in.
    copies = [args.split()[:-1] for args in instructions(builder, "COPY")]
    assert copies[0] == ["pyproject.toml"] and "supervisor" not in copies[0]

    runtime_run = " ".join(instructions(runtime, "RUN"))
    assert "apt-get" not in runtime_run and "curl" not in runtime_run
    assert instructions(runtime, "COPY") == ["--from=builder /opt/venv /opt/venv"]

    (user,) = instructions(runtime, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "run as a numeric non-root uid (Kubernetes runAsNonRoot can check it)"

    env = env_of(runtime)
    assert env["EDGELOADER_DATA_DIR"] == DATA_DIR
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert json.loads(instructions(runtime, "VOLUME")[0]) == [DATA_DIR]
    assert instructions(runtime, "EXPOSE") == [f"{env['EDGELOADER_PORT']}"]

    health = healthcheck_command(runtime)
    assert health[:2] == ["python", "-c"] and "/healthz" in health[2] and "EDGELOADER_PORT" in health[2]

    # Exec form, no shell in between: the service is PID 1 and receives SIGTERM itself.
    (entrypoint,) = instructions(runtime, "ENTRYPOINT")
    (cmd,) = instructions(runtime, "CMD")
    assert exec_form(entrypoint) + exec_form(cmd) == ["edgeloader", "serve"]
    assert instructions(runtime, "STOPSIGNAL") in ([], ["SIGTERM"])


def test_module_json_matches_the_package() -> None:
    module = json.loads(MODULE_JSON.read_text())
    image = module["image"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert image["tag"]["version"] == project["version"], "image tags follow the package version"
    assert image["repository"] == "${CONTAINER_REGISTRY_SERVER}/edge-model-loader"
    assert set(image["tag"]["platforms"]) == {"amd64", "arm64v8"}
    for dockerfile in image["tag"]["platforms"].values():
        assert (MODULE_JSON.parent / dockerfile).resolve() == DOCKERFILE
    assert (MODULE_JSON.parent / image["contextPath"]).resolve() == REPO


# --- deployment manifest --------------------------------------------------------------------------


def load_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS / name).read_text())
    return schema


def validator(name: str) -> Any:
    """A draft-04 validator for a vendored schema; references between them resolve offline only."""
    jsonschema = jsonschema_module()
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4

    registry: Registry[Any] = Registry().with_resources(
        (schema["id"], Resource.from_contents(schema, default_specification=DRAFT4))
        for schema in map(load_schema, sorted(p.name for p in SCHEMAS.glob("*.json")))
    )
    return jsonschema.Draft4Validator(load_schema(name), registry=registry)


def schema_errors(name: str, document: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator(name).iter_errors(document)]


def manifest_errors(manifest: dict[str, Any]) -> list[str]:
    content = manifest["modulesContent"]
    return (schema_errors("azure-iot-edge-deployment-2.0.json", manifest)
            + schema_errors("azure-iot-edgeagent-deployment-1.1.json", {"$edgeAgent": content["$edgeAgent"]})
            + schema_errors("azure-iot-edgehub-deployment-1.2.json", {"$edgeHub": content["$edgeHub"]}))


def genconfig(tmp_path: Path, platform: str) -> tuple[dict[str, Any], str]:
    """Run the real `iotedgedev solution genconfig` on a copy of the template; the manifest and the log."""
    iotedgedev = tool("iotedgedev")
    work = tmp_path / "solution"
    (work / "docker").mkdir(parents=True)
    shutil.copy(TEMPLATE, work / TEMPLATE.name)
    for name in ("module.json", "Dockerfile"):
        shutil.copy(MODULE_JSON.parent / name, work / "docker" / name)
    (work / ".env").write_text(f"CONTAINER_REGISTRY_SERVER={REGISTRY}\n"
                               "CONTAINER_REGISTRY_USERNAME=puller\nCONTAINER_REGISTRY_PASSWORD=secret\n")
    home = tmp_path / "home"
    (home / ".iotedgedev").mkdir(parents=True)
    # Without this file iotedgedev prints a banner and turns Microsoft telemetry on.
    (home / ".iotedgedev" / "setting.ini").write_text("[DEFAULT]\nfirsttime = no\ncollect_telemetry = no\n")
    dead = "http://127.0.0.1:9"  # nothing leaves the machine: the online schema check reports "skip"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LC_ALL": "C.UTF-8",
           "LANG": "C.UTF-8", "http_proxy": dead, "https_proxy": dead, "HTTP_PROXY": dead, "HTTPS_PROXY": dead}
    result = subprocess.run(
        [iotedgedev, "solution", "genconfig", "-f", TEMPLATE.name, "-P", platform, "--fail-on-validation-error"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    generated = work / "config" / f"deployment.{platform}.json"
    assert generated.is_file(), log
    return json.loads(generated.read_text()), log


@pytest.mark.parametrize("platform", ["amd64", "arm64v8"])
def test_genconfig_expands_the_template_into_a_valid_manifest(tmp_path: Path, platform: str) -> None:
    manifest, log = genconfig(tmp_path, platform)
    assert "createOptions of module edgemodelloader validation passed" in log, log
    text = json.dumps(manifest)
    assert "${" not in text and "$CONTAINER" not in text, "unexpanded placeholders left in the manifest"
    assert manifest_errors(manifest) == []

    agent = manifest["modulesContent"]["$edgeAgent"]["properties.desired"]
    assert agent["runtime"]["settings"]["registryCredentials"]["registry"] == {
        "username": "puller", "password": "secret", "address": REGISTRY}
    assert agent["systemModules"]["edgeAgent"]["settings"]["image"] == "mcr.microsoft.com/azureiotedge-agent:1.6"
    assert agent["systemModules"]["edgeHub"]["settings"]["image"] == "mcr.microsoft.com/azureiotedge-hub:1.6"
    # IoT Edge 1.6 keeps the 1.5 manifest format: edgeAgent reads schema 1.1, edgeHub 1.2 (priorities and
    # time-to-live on routes); the SchemaStore schemas above are those versions.
    assert agent["schemaVersion"] == "1.1"
    assert manifest["modulesContent"]["$edgeHub"]["properties.desired"]["schemaVersion"] == "1.2"

    module = agent["modules"][MODULE]
    version = json.loads(MODULE_JSON.read_text())["image"]["tag"]["version"]
    assert module["settings"]["image"] == f"{REGISTRY}/edge-model-loader:{version}-{platform}"
    assert (module["status"], module["restartPolicy"]) == ("running", "always")

    create = module["settings"]["createOptions"]
    assert isinstance(create, str), "iotedgedev turns createOptions into the string the agent expects"
    options = json.loads(create)
    env = {key: value["value"] for key, value in module["env"].items()}
    assert env["EDGELOADER_DATA_DIR"] == DATA_DIR
    assert env["EDGELOADER_LOG_FORMAT"] == "json"
    port = env["EDGELOADER_PORT"]
    assert options["HostConfig"]["Binds"] == [f"{HOST_DATA_DIR}:{DATA_DIR}"]
    assert options["HostConfig"]["PortBindings"] == {f"{port}/tcp": [{"HostPort": port}]}
    assert f"{port}/tcp" in options["ExposedPorts"]
    assert options["HostConfig"]["LogConfig"]["Config"]["max-size"], "bounded logs on small disks"

    # What the image declares and what the manifest sets must agree.
    _, runtime = parse_dockerfile()
    assert env_of(runtime)["EDGELOADER_DATA_DIR"] == env["EDGELOADER_DATA_DIR"]
    assert instructions(runtime, "EXPOSE") == [port]

    hub = manifest["modulesContent"]["$edgeHub"]["properties.desired"]
    assert f"FROM /messages/modules/{MODULE}/outputs/{OUTPUT_NAME} INTO $upstream" in hub["routes"].values()

    desired = manifest["modulesContent"][MODULE]["properties.desired"]
    assert set(desired) == TWIN_FIELDS
    assert DesiredModel.parse(desired) is None, "the initial twin asks for no download: the bundled model serves"


def test_template_validates_against_the_template_schema() -> None:
    template = json.loads(TEMPLATE.read_text())
    assert template["$schema-template"] == "4.0.0"
    assert schema_errors("azure-iot-edge-deployment-template-4.0.json", template) == []
    assert template["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"][MODULE]["settings"][
        "image"] == "${MODULEDIR<docker>}"


def test_offline_schema_validation_catches_a_broken_manifest(tmp_path: Path) -> None:
    """The validation above must be able to fail (and must resolve the template's remote $refs offline)."""
    manifest, _ = genconfig(tmp_path, "amd64")
    broken = copy.deepcopy(manifest)
    module = broken["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"][MODULE]
    del module["restartPolicy"]
    module["settings"]["createOptions"] = {"HostConfig": {}}  # an object: the agent wants a string
    broken["modulesContent"]["$edgeHub"]["properties.desired"]["routes"]["bad.name"] = "FROM /* INTO $upstream"
    errors = manifest_errors(broken)
    assert any("restartPolicy" in e for e in errors), errors
    assert any("createOptions" in e for e in errors), errors
    assert any("bad.name" in e for e in errors), errors

    template = json.loads(TEMPLATE.read_text())
    template["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"][MODULE]["status"] = "paused"
    assert schema_errors("azure-iot-edge-deployment-template-4.0.json", template)


# --- model updates ---------------------------------------------------------------------------------


def test_layered_deployment_example_sets_only_the_model_twin() -> None:
    layered = json.loads(LAYERED.read_text())
    content = layered["content"]["modulesContent"]
    # A layered deployment that leaves the modules, routes and the runtime to the base deployment.
    assert list(content) == [MODULE]
    assert list(content[MODULE]) == ["properties.desired"]
    twin_schema = load_schema("azure-iot-edge-deployment-2.0.json")["properties"]["modulesContent"][
        "patternProperties"]["^[a-zA-Z0-9_-]+$"]
    assert list(jsonschema_module().Draft4Validator(twin_schema).iter_errors(content[MODULE])) == []

    desired = content[MODULE]["properties.desired"]
    # It overwrites the module's whole desired document, so it must carry every field the base sets.
    template = json.loads(TEMPLATE.read_text())
    assert set(desired) == set(template["modulesContent"][MODULE]["properties.desired"]) == TWIN_FIELDS
    model = DesiredModel.parse(desired)
    assert model is not None and model.sha256 and model.md5 and model.length and model.activate


def test_twin_patch_example_is_what_the_service_accepts() -> None:
    desired = json.loads(TWIN_PATCH.read_text())
    assert set(desired) == TWIN_FIELDS
    model = DesiredModel.parse(desired)
    assert model is not None and model.file_name == desired["FileName"] and model.length == desired["ContentLength"]
    layered = json.loads(LAYERED.read_text())["content"]["modulesContent"][MODULE]["properties.desired"]
    assert layered == desired, "the two examples describe the same update"


def test_env_example_names_what_the_templates_expand() -> None:
    names = set(re.findall(r"^([A-Z_]+)=", (REPO / ".env.example").read_text(), re.MULTILINE))
    used = set(re.findall(r"\$\{([A-Z_]+)\}", TEMPLATE.read_text() + MODULE_JSON.read_text()))
    assert used <= names, f".env.example lacks {used - names}"
