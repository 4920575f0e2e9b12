"""`bentoml build` of both bentos, and each bento's source tree working on its own.

Builds go to a scratch BENTOML_HOME whose models/ is the real store's (read only), so
the user's store gets no bentos from the tests. Locking the requirements needs PyPI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import REPO
from weather.contract import LABELS
from weather.registry import BENTOS

STORE = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))

SHARED_SOURCES = {
    "bentos/common.py",
    "bentos/http.py",
    "bentos/server.py",
    "bentos/imaging.py",
    "bentos/settings.py",
    "weather/contract.py",
    "weather/errors.py",
    "weather/registry.py",
}
# The source files each bento must carry, besides the shared ones.
OWN_SOURCES = {"onnx": {"bentos/onnx_service.py"}, "torch": {"bentos/torch_service.py", "weather/torch_model.py"}}

# Run inside a bento's src/ only: the repository is not importable, torch may be blocked.
_RUN_FROM_SRC = """
import importlib, io, sys
from pathlib import Path
if {block_torch}:
    import importlib.abc
    class _Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {{"torch", "torchvision"}}:
                raise ImportError(name + " is blocked")
    sys.meta_path.insert(0, _Blocker())
module = importlib.import_module("{module}")
assert Path(module.__file__).resolve().is_relative_to(Path.cwd()), module.__file__
for name in ("weather", "bentos"):
    assert Path(sys.modules[name].__file__).resolve().is_relative_to(Path.cwd()), sys.modules[name].__file__
from PIL import Image
buffer = io.BytesIO()
Image.linear_gradient("L").convert("RGB").save(buffer, "JPEG")
service = getattr(module, "{cls}")()
assert service.classifier.wait(300) and service.classifier.ready, "the model did not load"
print(service.classifier.predict(buffer.getvalue()).prediction)
"""


@pytest.fixture(scope="module")
def bentoml_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("bentoml-home")
    (home / "models").symlink_to(STORE / "models", target_is_directory=True)
    return home


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "1"}


@pytest.fixture(scope="module", params=sorted(BENTOS))
def built(request, bentoml_home) -> tuple[str, Path]:
    bentofile = BENTOS[request.param].bento.bentofile
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-f", bentofile, "--output", "tag", "."],
        cwd=REPO,
        env=_env(bentoml_home),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    match = re.search(r"__tag__:([^:\s]+):(\S+)", result.stdout)
    assert match, result.stdout[-2000:]
    return request.param, bentoml_home / "bentos" / match[1] / match[2]


def test_bento_declares_its_model_and_service(built):
    name, path = built
    bento = yaml.safe_load((path / "bento.yaml").read_text())
    assert bento["service"] == BENTOS[name].bento.service
    [service] = bento["services"]
    assert [entry["tag"].split(":")[0] for entry in service["models"]] == [BENTOS[name].model.name]


def test_bento_carries_its_source(built):
    name, path = built
    files = {str(file.relative_to(path / "src")) for file in (path / "src").rglob("*.py")}
    missing = (SHARED_SOURCES | OWN_SOURCES[name]) - files
    assert not missing, f"missing from the bento: {sorted(missing)}"
    assert not any(file.startswith(("tests/", "model_import/", "rust_service/")) for file in files), sorted(files)


def test_requirements(built):
    name, path = built
    requirements = (path / "env" / "python" / "requirements.txt").read_text()
    pinned = {line.split("==")[0].lower() for line in requirements.splitlines() if "==" in line}
    assert {"bentoml", "onnxruntime" if name == "onnx" else "torch", "pillow", "numpy"} <= pinned
    if name == "onnx":
        assert not pinned & {"torch", "torchvision"}, "the ONNX bento must not install torch"


def test_bento_source_serves_on_its_own(built, bentoml_home):
    name, path = built
    bento = BENTOS[name].bento
    code = _RUN_FROM_SRC.format(block_torch=name == "onnx", module=bento.module, cls=bento.cls)
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=path / "src",
        env=_env(bentoml_home),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] in LABELS
