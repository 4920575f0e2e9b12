"""Import the classifier's artifacts into the BentoML model store.

All or nothing: both artifacts are fetched and checked in a scratch folder first
(a torch state dict that loads into the architecture, an ONNX model with the
expected signature, and, with both, that they agree), and only then written to
the store. A model is only visible in the store once it is complete.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import bentoml
import numpy as np

from model_import.errors import ImportFailure
from model_import.sources import Fetched, fetch
from weather import contract
from weather.errors import first_line
from weather.registry import ONNX_MODEL, TORCH_MODEL, Model

log = logging.getLogger(__name__)


@dataclass
class _Artifact:
    model: Model
    path: Path
    metadata: dict


def import_models(
    torch_uri: str | None = None,
    onnx_uri: str | None = None,
    extra_metadata: dict | None = None,
) -> list[bentoml.Model]:
    """Import a torch state dict and/or an ONNX model; returns the new store models.

    Given only the torch weights, the ONNX model is exported from them, so both
    services always serve the same weights.
    """
    if not torch_uri and not onnx_uri:
        raise ImportFailure("nothing to import: give a torch and/or an ONNX model URI")
    with tempfile.TemporaryDirectory(prefix="model-import-") as scratch:
        artifacts = _prepare(Path(scratch), torch_uri, onnx_uri, extra_metadata or {})
        return _save(artifacts)


def _prepare(scratch: Path, torch_uri: str | None, onnx_uri: str | None, extra: dict) -> list[_Artifact]:
    artifacts = []
    model = None
    if torch_uri:
        fetched = fetch(torch_uri, scratch / TORCH_MODEL.file)
        model = _load_torch(fetched)
        artifacts.append(_Artifact(TORCH_MODEL, fetched.path, _metadata(fetched, TORCH_MODEL, extra)))
    if onnx_uri:
        fetched = fetch(onnx_uri, scratch / ONNX_MODEL.file)
    else:
        from weather.onnx_export import export_onnx

        log.info("no ONNX model given: exporting one from the torch weights")
        export_onnx(model, scratch / ONNX_MODEL.file)
        fetched = _describe_local(scratch / ONNX_MODEL.file, uri=f"exported from {torch_uri}")
    onnx_metadata = _metadata(fetched, ONNX_MODEL, extra)
    session = _load_onnx(fetched)
    if model is not None:
        onnx_metadata["max_abs_diff_vs_torch"] = _check_parity(model, session, fetched.uri)
        onnx_metadata["torch_state_dict_sha256"] = artifacts[0].metadata["files"][TORCH_MODEL.file]["sha256"]
    artifacts.append(_Artifact(ONNX_MODEL, fetched.path, onnx_metadata))
    return artifacts


def _save(artifacts: list[_Artifact]) -> list[bentoml.Model]:
    saved: list[bentoml.Model] = []
    try:
        for artifact in artifacts:
            saved.append(_save_one(artifact))
    except BaseException:
        for model in saved:  # all or nothing across the pair, too
            bentoml.models.delete(model.tag)
        raise
    return saved


def _save_one(artifact: _Artifact) -> bentoml.Model:
    labels = {"task": "weather-classification", "framework": artifact.model.framework}
    if artifact.metadata.get("demo"):
        labels["demo"] = "true"
    try:
        with bentoml.models.create(artifact.model.name, labels=labels, metadata=artifact.metadata) as model:
            # A rename within one filesystem would be cheaper, but the scratch folder may be elsewhere.
            Path(model.path_of(artifact.model.file)).write_bytes(artifact.path.read_bytes())
    except (OSError, bentoml.exceptions.BentoMLException) as exc:
        raise ImportFailure(f"cannot save {artifact.model.name} to the BentoML store ({first_line(exc)})") from None
    log.info("imported %s", model.tag)
    return model


def _describe_local(path: Path, uri: str) -> Fetched:
    return Fetched(uri, path, hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size)


def _metadata(fetched: Fetched, model: Model, extra: dict) -> dict:
    return {
        "framework": model.framework,
        "source_uri": fetched.uri,
        "files": {fetched.path.name: {"sha256": fetched.sha256, "size_bytes": fetched.size_bytes}},
        "labels": list(contract.LABELS),
        "input_contract": contract.INPUT_CONTRACT,
        "versions": _versions(),
        **extra,
    }


def _versions() -> dict:
    from importlib.metadata import version

    packages = ("torch", "torchvision", "onnx", "onnxruntime", "bentoml")
    return {"python": platform.python_version(), **{name: version(name) for name in packages}}


def _load_torch(fetched: Fetched):
    from weather.torch_model import load_model

    try:
        return load_model(fetched.path)
    except ValueError as exc:
        raise ImportFailure(f"{fetched.uri}: {exc}") from None


def _load_onnx(fetched: Fetched):
    """An ONNX Runtime session for the file, after checking its signature and one inference."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(fetched.path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for every kind of bad file
        raise ImportFailure(f"{fetched.uri}: not a loadable ONNX model ({first_line(exc)})") from None
    _check_signature(session, fetched.uri)
    probabilities = _onnx_probabilities(session, np.zeros((1, contract.CROP_SIZE, contract.CROP_SIZE, 3), np.uint8))
    if not np.isclose(probabilities.sum(), 1.0, atol=contract.SUM_TOLERANCE):
        raise ImportFailure(f"{fetched.uri}: output {contract.PROBABILITIES_NAME!r} does not sum to 1")
    return session


def _check_signature(session, uri: str) -> None:
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    expected = f"input {contract.INPUT_NAME!r} uint8 [batch, 224, 224, 3]"
    pixels = inputs.get(contract.INPUT_NAME)
    if (
        len(inputs) != 1
        or pixels is None
        or pixels.type != "tensor(uint8)"
        or list(pixels.shape[1:]) != [contract.CROP_SIZE, contract.CROP_SIZE, 3]
    ):
        found = ", ".join(f"{i.name!r} {i.type} {i.shape}" for i in inputs.values())
        raise ImportFailure(f"{uri}: wrong input signature: expected {expected}, found {found}")
    for name in (contract.LOGITS_NAME, contract.PROBABILITIES_NAME):
        output = outputs.get(name)
        if output is None or output.type != "tensor(float)" or output.shape[-1] != len(contract.LABELS):
            found = ", ".join(f"{o.name!r} {o.type} {o.shape}" for o in outputs.values())
            raise ImportFailure(
                f"{uri}: wrong outputs: expected {name!r} float [batch, {len(contract.LABELS)}], found {found}"
            )


def _onnx_probabilities(session, pixels: np.ndarray) -> np.ndarray:
    return session.run([contract.PROBABILITIES_NAME], {contract.INPUT_NAME: pixels})[0]


def _check_parity(model, session, uri: str) -> float:
    """The largest probability difference between the ONNX model and the torch weights."""
    from weather import synthetic
    from weather.torch_model import reference_probabilities

    images = [image for image, _ in synthetic.generate_set(per_class=1, seed=2024)]
    reference = reference_probabilities(model, images)
    pixels = np.stack([contract.prepare_pixels(image) for image in images])
    difference = float(np.abs(_onnx_probabilities(session, pixels) - reference).max())
    if difference > contract.PROBABILITY_TOLERANCE:
        raise ImportFailure(
            f"{uri}: the ONNX model disagrees with the torch weights (max probability difference "
            f"{difference:.3f} > {contract.PROBABILITY_TOLERANCE})"
        )
    log.info("ONNX model matches the torch weights (max probability difference %.2e)", difference)
    return round(difference, 6)
