"""python -m model_import against a real GCS-compatible server (gcp-storage-emulator).

Every import runs the real command in a subprocess with its own model store, so
exit codes, messages and what lands in the store are what a user would see.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
import yaml

from harness.launch import free_port, wait_for_port
from weather.demo import build_demo
from weather.registry import ONNX_MODEL, TORCH_MODEL
from weather.torch_model import build_model

BUCKET = "models"
SECRET_TOKEN = "ya29.test-token-that-must-never-be-stored"


@pytest.fixture(scope="session")
def demo():
    return build_demo()


class Emulator:
    def __init__(self, data_dir: Path, port: int):
        self.data_dir, self.port = data_dir, port
        self.host = f"http://127.0.0.1:{port}"

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        os.environ["STORAGE_EMULATOR_HOST"] = self.host
        try:
            return storage.Client(project="test", credentials=AnonymousCredentials())
        finally:
            del os.environ["STORAGE_EMULATOR_HOST"]

    def upload(self, name: str, data: bytes) -> str:
        self.client().bucket(BUCKET).blob(name).upload_from_file(io.BytesIO(data), size=len(data))
        return f"gs://{BUCKET}/{name}"

    def corrupt(self, name: str) -> None:
        """Flip a byte of the stored object; its recorded checksums stay as uploaded."""
        path = next(self.data_dir.rglob(f"{BUCKET}/{name}"))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("gcs")
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gcp_storage_emulator",
            "--data-dir",
            str(data_dir),
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--default-bucket",
            BUCKET,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, timeout_s=30, process=server)
        yield Emulator(data_dir, port)
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def store(tmp_path):
    home = tmp_path / "bentoml"
    home.mkdir()
    return home


def run_import(store: Path, gcs: Emulator | None, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.endswith("_MODEL_URI")}
    environment.update(BENTOML_HOME=str(store), BENTOML_DO_NOT_TRACK="1", **env)
    if gcs is not None:
        environment["STORAGE_EMULATOR_HOST"] = gcs.host
    return subprocess.run(
        [sys.executable, "-m", "model_import", *args], env=environment, capture_output=True, text=True, timeout=300
    )


def stored_models(store: Path) -> dict[str, dict]:
    """Model name -> metadata of every model version in the store."""
    found = {}
    for model_yaml in (store / "models").glob("*/*/model.yaml"):
        info = yaml.safe_load(model_yaml.read_text())
        found[info["name"]] = info["metadata"]
    return found


def assert_failed_cleanly(result: subprocess.CompletedProcess, store: Path, message: str) -> None:
    assert result.returncode == 1, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1, result.stderr
    assert message in error_lines[0]
    assert "Traceback" not in result.stderr
    assert stored_models(store) == {}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_imports_both_models_from_gcs_with_provenance(gcs, store, demo):
    torch_bytes, onnx_bytes = demo.state_dict_path.read_bytes(), demo.onnx_path.read_bytes()
    torch_uri = gcs.upload("run1/torch_model", torch_bytes)
    onnx_uri = gcs.upload("run1/onnx_model", onnx_bytes)

    result = run_import(
        store,
        gcs,
        TORCH_MODEL_URI=torch_uri,
        ONNX_MODEL_URI=onnx_uri,
        CLOUDSDK_AUTH_ACCESS_TOKEN=SECRET_TOKEN,
        GOOGLE_CLOUD_PROJECT="weather-project",
    )

    assert result.returncode == 0, result.stderr
    models = stored_models(store)
    assert set(models) == {TORCH_MODEL.name, ONNX_MODEL.name}
    torch_meta, onnx_meta = models[TORCH_MODEL.name], models[ONNX_MODEL.name]
    assert torch_meta["source_uri"] == torch_uri
    assert torch_meta["files"][TORCH_MODEL.file]["sha256"] == sha256(torch_bytes)
    assert onnx_meta["source_uri"] == onnx_uri
    assert onnx_meta["files"][ONNX_MODEL.file]["sha256"] == sha256(onnx_bytes)
    assert onnx_meta["torch_state_dict_sha256"] == sha256(torch_bytes)
    for meta in (torch_meta, onnx_meta):
        assert meta["labels"][:3] == ["dew", "fogsmog", "frost"]
        assert len(meta["labels"]) == 11
        assert meta["input_contract"]["input"] == {
            "name": "pixels",
            "dtype": "uint8",
            "layout": "NHWC",
            "shape": ["batch", 224, 224, 3],
            "color": "RGB",
        }
        assert {"torch", "onnx", "onnxruntime"} <= set(meta["versions"])
    # The bearer token was used, but is nowhere: not in the store, not in the output.
    for path in store.rglob("*"):
        if path.is_file():
            assert SECRET_TOKEN.encode() not in path.read_bytes(), path
    assert SECRET_TOKEN not in result.stdout + result.stderr


def test_torch_weights_alone_from_a_local_path_also_give_an_onnx_model(store, demo):
    result = run_import(store, None, "--torch-uri", str(demo.state_dict_path))

    assert result.returncode == 0, result.stderr
    models = stored_models(store)
    assert models[ONNX_MODEL.name]["source_uri"] == f"exported from {demo.state_dict_path}"
    assert models[ONNX_MODEL.name]["max_abs_diff_vs_torch"] < 1e-3


def test_missing_object(gcs, store):
    result = run_import(store, gcs, "--torch-uri", f"gs://{BUCKET}/no/such/object")
    assert_failed_cleanly(result, store, "no such object")


def test_corrupted_object_fails_its_checksum(gcs, store, demo):
    uri = gcs.upload("corrupt/torch_model", demo.state_dict_path.read_bytes())
    gcs.corrupt("corrupt/torch_model")

    result = run_import(store, gcs, "--torch-uri", uri)

    assert_failed_cleanly(result, store, "checksum mismatch")


def test_state_dict_with_the_wrong_number_of_classes(gcs, store):
    model = build_model()
    model.classifier[-1] = torch.nn.Linear(1024, 10)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    uri = gcs.upload("shape/torch_model", buffer.getvalue())

    result = run_import(store, gcs, "--torch-uri", uri)

    assert_failed_cleanly(result, store, "10 classes, expected 11")


def test_a_file_that_is_not_a_state_dict(gcs, store):
    uri = gcs.upload("garbage/torch_model", b"this is not a pickle" * 100)
    result = run_import(store, gcs, "--torch-uri", uri)
    assert_failed_cleanly(result, store, "not a loadable torch state dict")


def test_onnx_model_with_the_wrong_input_signature(gcs, store, tmp_path):
    path = tmp_path / "float_input.onnx"
    torch.onnx.export(
        torch.nn.Linear(3, 11),
        (torch.zeros(1, 3),),
        str(path),
        input_names=["input"],
        dynamo=False,
    )
    uri = gcs.upload("signature/onnx_model", path.read_bytes())

    result = run_import(store, gcs, "--onnx-uri", uri)

    assert_failed_cleanly(result, store, "wrong input signature")


def test_a_file_that_is_not_an_onnx_model(gcs, store):
    uri = gcs.upload("garbage/onnx_model", b"\x08\x07garbage" * 500)
    result = run_import(store, gcs, "--onnx-uri", uri)
    assert_failed_cleanly(result, store, "not a loadable ONNX model")


def test_onnx_model_that_disagrees_with_the_torch_weights(gcs, store, demo, tmp_path):
    tampered = onnx.load(str(demo.onnx_path))
    head_bias = next(t for t in tampered.graph.initializer if list(t.dims) == [11])
    bias = onnx.numpy_helper.to_array(head_bias).copy()
    bias[0] += 5.0  # every image now leans towards "dew"
    head_bias.CopyFrom(onnx.numpy_helper.from_array(bias, head_bias.name))
    torch_uri = gcs.upload("tampered/torch_model", demo.state_dict_path.read_bytes())
    onnx_uri = gcs.upload("tampered/onnx_model", tampered.SerializeToString())

    result = run_import(store, gcs, "--torch-uri", torch_uri, "--onnx-uri", onnx_uri)

    assert_failed_cleanly(result, store, "disagrees with the torch weights")


def test_no_partial_import_when_the_second_artifact_fails(gcs, store, demo):
    """A good torch model and a corrupt ONNX model: neither ends up in the store."""
    torch_uri = gcs.upload("partial/torch_model", demo.state_dict_path.read_bytes())
    onnx_uri = gcs.upload("partial/onnx_model", demo.onnx_path.read_bytes())
    gcs.corrupt("partial/onnx_model")

    result = run_import(store, gcs, "--torch-uri", torch_uri, "--onnx-uri", onnx_uri)

    assert_failed_cleanly(result, store, "checksum mismatch")
    leftovers = [p for p in store.rglob("*") if p.is_file() and p.suffix in (".pt", ".onnx")]
    assert leftovers == []


def test_without_any_uri_it_explains_itself(store):
    result = run_import(store, None)
    assert result.returncode == 2
    assert "TORCH_MODEL_URI" in result.stderr


def test_help_documents_the_environment():
    result = subprocess.run([sys.executable, "-m", "model_import", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for name in ("TORCH_MODEL_URI", "ONNX_MODEL_URI", "CLOUDSDK_AUTH_ACCESS_TOKEN", "STORAGE_EMULATOR_HOST", "demo"):
        assert name in result.stdout


def test_the_first_model_is_removed_when_the_second_cannot_be_saved(store, demo):
    """All or nothing in the store itself: the torch model is saved first, then saving the ONNX
    model fails for real (a file stands where the store needs its directory)."""
    blocker = store / "models" / ONNX_MODEL.name
    blocker.parent.mkdir()
    blocker.write_text("not a directory")

    result = run_import(store, None, "--torch-uri", str(demo.state_dict_path), "--onnx-uri", str(demo.onnx_path))

    assert f"imported {TORCH_MODEL.name}:" in result.stderr, "the torch model should have been saved first"
    assert_failed_cleanly(result, store, f"cannot save {ONNX_MODEL.name}")
    assert [path.name for path in (store / "models").iterdir()] == [ONNX_MODEL.name], "only the blocker is left"
    assert blocker.read_text() == "not a directory"


DEMO_THAT_MISSES_ITS_TARGETS = """
import sys
import weather.demo
from weather.torch_model import build_model
weather.demo._train = lambda: build_model().eval()  # untrained: no better than chance
from model_import.__main__ import main
sys.exit(main(["demo"]))
"""


def test_a_demo_model_that_misses_its_targets_fails_in_one_line_and_leaves_nothing(store, tmp_path):
    cache = tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-c", DEMO_THAT_MISSES_ITS_TARGETS],
        env={**os.environ, "BENTOML_HOME": str(store), "XDG_CACHE_HOME": str(cache)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert_failed_cleanly(result, store, "the demo model missed its targets")
    assert [path.name for path in (cache / "model-serving").iterdir()] == []
