"""Both services in-process (``Service.to_asgi()`` and a test client): quick feedback.

The full contract over real HTTP is tests/contract/; this covers what is easier to see
from inside: readiness while the model loads, a model that fails to load, the
configuration knobs, and that the ONNX service never imports torch.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import warnings

import pytest

with warnings.catch_warnings():  # starlette would like httpx2; httpx works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from bentos import http, onnx_service, settings
from bentos.onnx_service import OnnxClassifier
from bentos.torch_service import TorchClassifier
from harness import REPO
from weather import synthetic
from weather.endpoints import ENDPOINTS
from weather.photos import photo_paths

SERVICES = {"onnx": OnnxClassifier, "torch": TorchClassifier}


def _body(data: bytes) -> bytes:
    return json.dumps({"image": base64.b64encode(data).decode("ascii")}).encode()


def _photo() -> bytes:
    photos = photo_paths()
    if "rocket" in photos:
        return photos["rocket"].read_bytes()
    buffer = io.BytesIO()
    synthetic.generate_set(per_class=1, seed=1)[0][0].save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module", autouse=True)
def _without_metrics():
    # BentoML registers its request metrics in prometheus_client's global registry each time an
    # app is built, so a second app in one process fails; /metrics is checked over HTTP instead.
    options = " ".join(f"services.{service.name}.metrics.enabled=false" for service in SERVICES.values())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BENTOML_CONFIG_OPTIONS", f"{os.environ.get('BENTOML_CONFIG_OPTIONS', '')} {options}".strip())
        yield


def _wait_ready(client: TestClient, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "not ready in time"
        time.sleep(0.05)


@pytest.fixture(scope="module", params=sorted(SERVICES))
def client(request, _without_metrics):
    with TestClient(SERVICES[request.param].to_asgi()) as client:
        _wait_ready(client)
        yield client


def test_predict(client):
    response = client.post("/predict", content=_body(_photo()), headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["probability"] == max(body["probabilities"].values())
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 400),
        (b"{}", 400),
        (b'{"image": 3}', 400),
        (b'{"image": "%%%"}', 400),
        (b'{"image": "aGVsbG8="}', 400),
        (b" " * (settings.MAX_BODY_BYTES + 1), 413),
    ],
)
def test_errors_are_json(client, body, status):
    response = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    assert set(response.json()) == {"error"}


@pytest.mark.parametrize("content_type", ["text/plain", "multipart/form-data", "application/vnd.bentoml+pickle", None])
def test_content_type_does_not_matter(client, content_type):
    # BentoML picks a deserializer from the Content-Type; /predict always reads JSON (bentos.http).
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/predict", content=_body(_photo()), headers=headers)
    assert response.status_code == 200, response.text


# --- loading --------------------------------------------------------------------------------


@pytest.fixture
def gated_load(monkeypatch):
    """The ONNX service's model loading held until the test opens the gate."""
    gate = threading.Event()
    original = onnx_service.load_probabilities

    def load(model):
        assert gate.wait(30)
        return original(model)

    monkeypatch.setattr(onnx_service, "load_probabilities", load)
    yield gate
    gate.set()


def test_not_ready_until_loaded_and_warm(gated_load, monkeypatch):
    monkeypatch.setattr(http, "MODEL_WAIT_SECONDS", 0.2)
    with TestClient(OnnxClassifier.to_asgi()) as client:
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").status_code == 503
        for endpoint in ENDPOINTS.values():
            # Refused before the body is read, once the wait is over: a client retries or goes elsewhere.
            request = endpoint.request(_photo())
            response = client.post(endpoint.route, content=request.body, headers=dict(request.headers))
            assert response.status_code == 503
            assert response.json() == {"error": "the model is still loading"}
            assert response.headers["retry-after"] == "1"

        gated_load.set()
        _wait_ready(client)
        assert client.post("/predict", content=_body(_photo())).status_code == 200


def test_requests_wait_for_a_loading_model(gated_load):
    # Another worker may already answer /readyz 200 while this one loads: its requests wait.
    with TestClient(OnnxClassifier.to_asgi()) as client:
        threading.Timer(0.5, gated_load.set).start()
        response = client.post("/predict", content=_body(_photo()))
        assert response.status_code == 200, response.text


def test_a_model_that_fails_to_load(monkeypatch):
    def load(model):
        raise ValueError("no such model")

    monkeypatch.setattr(onnx_service, "load_probabilities", load)
    with TestClient(OnnxClassifier.to_asgi()) as client:
        deadline = time.monotonic() + 30
        while client.get("/livez").status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/livez").status_code == 503  # so an orchestrator restarts it
        assert client.get("/readyz").status_code == 503
        response = client.post("/predict", content=_body(_photo()))
        assert response.status_code == 503
        assert "no such model" in response.json()["error"]


# --- the process: imports and configuration -----------------------------------------------


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "BENTOML_DO_NOT_TRACK": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


# Makes `import torch` (and torchvision) fail, so using them anywhere is an error, not a slowdown.
_BLOCK_TORCH = """
import importlib.abc, sys
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "torchvision"}:
            raise ImportError(f"{name} is blocked: the ONNX service must not use it")
sys.meta_path.insert(0, _Blocker())
"""


def test_onnx_service_never_imports_torch():
    code = (
        _BLOCK_TORCH
        + """
import bentos.onnx_service as module
service = module.OnnxClassifier()  # loads the model and warms it up
assert service.classifier.wait(120) and service.classifier.ready, "model did not load"
print(sorted(name for name in sys.modules if name.split(".")[0] in {"torch", "torchvision"}))
"""
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


# What each runtime imports that `bentoml serve` (which imports the service module only to
# read the service's configuration) must not: seconds of start-up, paid twice otherwise.
_RUNTIME_MODULES = {"onnx": {"onnxruntime"}, "torch": {"torch", "torchvision"}}


@pytest.mark.parametrize("name", sorted(_RUNTIME_MODULES))
def test_importing_a_service_module_leaves_its_runtime_to_the_worker(name):
    heavy = sorted(set().union(*_RUNTIME_MODULES.values()))
    result = _python(
        f"import sys, bentos.{name}_service;print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_torch_threads_hold_in_the_threads_that_run_requests():
    """torch.set_num_threads runs in the model's loader thread; requests run in BentoML's
    worker threads. The setting must be the process's, not the loader thread's."""
    result = _python(
        """
import threading, torch
from bentos.torch_service import TorchClassifier
service = TorchClassifier()
assert service.classifier.wait(300) and service.classifier.ready, "model did not load"
seen = []
thread = threading.Thread(target=lambda: seen.append((torch.get_num_threads(), torch.get_num_interop_threads())))
thread.start(); thread.join()
print(seen[0])
""",
        INTRA_THREADS="2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "(2, 1)"


def test_concurrency_defaults():
    result = _python(
        "from bentos import settings; from bentos.onnx_service import OnnxClassifier as S;"
        "print(S.config['workers'], settings.WORKER_THREADS, settings.INTRA_THREADS)",
        WORKERS="",
        WORKER_THREADS="",
        INTRA_THREADS="",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(settings.usable_cpus()), "1", "1"]


def test_default_workers_follow_the_cpus_the_process_may_use():
    result = _python(
        "import os; os.sched_setaffinity(0, {0}); from bentos import settings; print(settings.WORKERS)", WORKERS=""
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["1"]


def test_concurrency_from_the_environment():
    result = _python(
        "from bentos import settings; from bentos.torch_service import TorchClassifier as S;"
        "import torch; s = S(); print(S.config['workers'], settings.WORKER_THREADS, torch.get_num_threads())",
        WORKERS="3",
        WORKER_THREADS="2",
        INTRA_THREADS="2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-3:] == ["3", "2", "2"]


def test_bad_concurrency_setting_fails_loudly():
    result = _python("import bentos.onnx_service", WORKERS="many")
    assert result.returncode != 0
    assert "WORKERS must be a positive integer" in result.stderr


@pytest.mark.parametrize(("value", "enabled"), [("", False), ("0", False), ("1", True)])
def test_access_log_is_off_unless_asked_for(value, enabled):
    result = _python(
        "from bentos.onnx_service import OnnxClassifier as S; print(S.config['logging']['access']['enabled'])",
        ACCESS_LOG=value,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(enabled)
