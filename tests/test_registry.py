"""Facts written once stay true where they cannot be imported: bentofiles, the Makefile,
the Rust service, BentoML's store layout; and the Locust process stays free of torch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import bentoml
import pytest
import yaml

from containers.base import UV_VERSION
from harness import REPO
from harness.launch import free_port, resolve, service_process
from weather import contract
from weather.registry import BENTOS, ONNX_MODEL, SERVICES


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return dict(requirement.split("==") for requirement in requirements)


def bentofile_text(name: str) -> str:
    return (REPO / BENTOS[name].bento.bentofile).read_text()


def pin_drift(bentofile: str, pins: dict[str, str]) -> list[str]:
    """The bentofile's packages that are unpinned or pinned unlike pyproject.toml."""
    drift = []
    for requirement in yaml.safe_load(bentofile)["python"]["packages"]:
        package, _, version = requirement.partition("==")
        if not version or pins.get(package) != version:
            drift.append(f"{requirement} (pyproject.toml: {pins.get(package)})")
    return drift


@pytest.mark.parametrize("name", sorted(BENTOS))
def test_bento_pins_are_the_projects(name):
    assert pin_drift(bentofile_text(name), pyproject_pins()) == []


def test_the_pin_check_can_fail():
    pins = pyproject_pins()
    drifted = bentofile_text("onnx").replace("pillow==", "pillow==0.0.1.")
    assert pin_drift(drifted, pins) == [f"pillow==0.0.1.{pins['pillow']} (pyproject.toml: {pins['pillow']})"]
    unpinned = bentofile_text("onnx").replace("numpy==", "numpy>=")
    assert len(pin_drift(unpinned, pins)) == 1


def test_the_installed_bentoml_is_the_pinned_one():
    # `bentoml build` pins the bentos to the BentoML that builds them.
    assert bentoml.__version__ == pyproject_pins()["bentoml"]


def test_uv_pin_of_the_makefile_is_the_base_images():
    pinned = re.search(r"uv==([\d.]+)", (REPO / "Makefile").read_text())
    assert pinned
    assert pinned[1] == UV_VERSION


@pytest.mark.parametrize("name", sorted(BENTOS))
def test_bentofile_serves_the_registered_service(name):
    assert yaml.safe_load(bentofile_text(name))["service"] == BENTOS[name].bento.service


def test_locust_never_imports_torch(tmp_path):
    """The load generator shares a core budget with nothing heavy: importing the locustfile
    (which builds the default payload) loads neither torch nor BentoML."""
    code = (
        "import sys; sys.path.insert(0, '.'); import locustfile; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'bentoml', 'onnxruntime'}))"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("PAYLOAD_PATH", None)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_bentoml_store_layout_is_what_the_rust_service_reads():
    """The Rust service finds its model through BentoML's private store layout
    (``models/NAME/latest`` holds the version; rust_service/src/config.rs). Pinned here
    against the installed BentoML: the file is there and names the version
    ``bentoml.models.get`` returns, and the service, given only BENTOML_HOME, serves it."""
    model = bentoml.models.get(ONNX_MODEL.latest)
    home = Path(os.environ["BENTOML_HOME"])
    assert (home / "models" / ONNX_MODEL.name / "latest").read_text().strip() == model.tag.version
    assert Path(model.path) == home / "models" / ONNX_MODEL.name / model.tag.version

    running = service_process(SERVICES["rust"], free_port())
    running.env["LOG_FORMAT"] = "json"
    with running:
        events = [json.loads(line) for line in running.logs(200).splitlines() if line.startswith("{")]
    ready = [event for event in events if event.get("message") == "ready"]
    assert ready, running.logs(200)
    assert ready[0]["model_name"] == ONNX_MODEL.name
    assert ready[0]["model_version"] == model.tag.version


# The contract's values the Rust service takes as a flag and an environment variable of the
# same name (MAX_BODY_BYTES: --max-body-bytes, MAX_BODY_BYTES), defaulting to the contract's.
RUST_FLAGS = (
    "MAX_BODY_BYTES",
    "MAX_PIXELS",
    "QUEUE_CAPACITY",
    "MAX_WAITING_REQUESTS",
    "REQUEST_TIMEOUT_SECONDS",
    "ANSWER_HEADROOM_MS",
    "RETRY_AFTER_SECONDS",
    "HEADER_TIMEOUT_SECONDS",
    "BODY_TIMEOUT_SECONDS",
    "MAX_PENDING_BODY_BYTES",
    "DISCARD_BODY_BYTES",
    "GRACEFUL_TIMEOUT_SECONDS",
)


def test_rust_defaults_are_the_contracts_limits():
    result = subprocess.run([*resolve(SERVICES["rust"].command), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    for name in RUST_FLAGS:
        flag, value = name.lower().replace("_", "-"), getattr(contract, name)
        described = re.search(rf"--{flag} <\w+>(.*?)(?=--|$)", help_text)
        assert described, f"--{flag} is not in --help"
        assert f"[env: {name}=" in described[1], f"--{flag} should be settable as {name}"
        assert f"[default: {value}]" in described[1], f"--{flag} should default to {value}"
