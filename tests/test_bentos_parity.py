"""Both services' pipelines against the PyTorch reference on many images, without HTTP.

The rule (docs/contract.md, ``weather.contract``): probabilities within
PROBABILITY_TOLERANCE, and the same top-1 wherever the reference's top-2 margin
exceeds TOP2_MARGIN. The ONNX service resamples only
the crop window (a pixel may differ by one level from resize-then-crop); the torch
service preprocesses exactly as torchvision does, so it must match almost to the bit.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from bentos.onnx_service import OnnxClassifier
from bentos.torch_service import TorchClassifier
from weather import synthetic
from weather.contract import PROBABILITY_TOLERANCE, TOP2_MARGIN
from weather.photos import photo_paths
from weather.registry import TORCH_MODEL
from weather.torch_model import reference_probabilities

# The torch service preprocesses exactly as the reference does: only float rounding may differ.
TORCH_TOLERANCE = 1e-5


def _jpeg(image: Image.Image, quality: int, size: tuple[int, int] | None = None) -> bytes:
    if size is not None:
        image = image.resize(size, Image.BICUBIC)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _cases() -> dict[str, bytes]:
    cases = {}
    for name, path in sorted(photo_paths().items()):
        cases[f"{name}"] = path.read_bytes()
        photo = Image.open(path).convert("RGB")
        cases[f"{name}-1200x727-q75"] = _jpeg(photo, 75, (1200, 727))
        cases[f"{name}-x2-q90"] = _jpeg(photo, 90, (photo.width * 2, photo.height * 2))
    for index, (image, _) in enumerate(synthetic.generate_set(per_class=6, seed=99)):
        cases[f"synthetic-{index}-png"] = _png(image)
        cases[f"synthetic-{index}-q75"] = _jpeg(image, 75)
        if index < 11:
            cases[f"synthetic-{index}-x2.5-q75"] = _jpeg(image, 75, (int(image.width * 2.5), int(image.height * 2.5)))
    return cases


@pytest.fixture(scope="module")
def cases() -> dict[str, bytes]:
    return _cases()


@pytest.fixture(scope="module")
def reference(cases) -> dict[str, np.ndarray]:
    import bentoml

    from weather.torch_model import load_model

    model = load_model(bentoml.models.get(TORCH_MODEL.latest).path_of(TORCH_MODEL.file))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one image at a time: one thread is as fast
    try:
        return {name: reference_probabilities(model, [Image.open(io.BytesIO(data))])[0] for name, data in cases.items()}
    finally:
        torch.set_num_threads(threads)


def _served(service_class, cases: dict[str, bytes]) -> dict[str, np.ndarray]:
    threads = torch.get_num_threads()  # the torch service sets it for the whole process
    service = service_class()
    try:
        assert service.classifier.wait(120), "the model is still loading"
        assert service.classifier.ready, "the model failed to load"
        pipeline = service.classifier.pipeline
        served = {}
        for name, data in cases.items():
            result = pipeline.predict(data)
            served[name] = np.array([result.probabilities[label] for label in pipeline.labels])
        return served
    finally:
        torch.set_num_threads(threads)


def _compare(served: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> tuple[float, str, list[str]]:
    worst, worst_name, flips = 0.0, "", []
    for name, expected in reference.items():
        difference = float(np.abs(served[name] - expected).max())
        if difference > worst:
            worst, worst_name = difference, name
        second, first = np.sort(expected)[-2:]
        if first - second > TOP2_MARGIN and served[name].argmax() != expected.argmax():
            flips.append(name)
    return worst, worst_name, flips


def test_enough_images(cases):
    assert len(cases) >= 140
    assert sum(1 for data in cases.values() if data[:2] == b"\xff\xd8") >= 80  # JPEGs: where decoders differ


def test_onnx_service_matches_the_reference(cases, reference, record_property):
    worst, worst_name, flips = _compare(_served(OnnxClassifier, cases), reference)
    record_property("onnx_max_abs_difference", worst)
    print(f"\nONNX service vs reference on {len(cases)} images: max |dp| {worst:.2e} ({worst_name})")
    assert worst <= PROBABILITY_TOLERANCE, f"{worst_name}: {worst:.4f}"
    assert not flips, f"top-1 differs on {flips}"


def test_torch_service_is_the_reference(cases, reference, record_property):
    worst, worst_name, flips = _compare(_served(TorchClassifier, cases), reference)
    record_property("torch_max_abs_difference", worst)
    print(f"\ntorch service vs reference on {len(cases)} images: max |dp| {worst:.2e} ({worst_name})")
    assert worst <= TORCH_TOLERANCE, f"{worst_name}: {worst:.2e}"
    assert not flips


@pytest.mark.parametrize("service_class", [OnnxClassifier, TorchClassifier], ids=["onnx", "torch"])
def test_a_batch_gives_each_image_its_own_answer(cases, service_class):
    # What adaptive batching relies on: the model run on 8 crops at once answers each as alone.
    threads = torch.get_num_threads()
    service = service_class()
    try:
        assert service.classifier.wait(120), "the model is still loading"
        pipeline = service.classifier.pipeline
        crops = np.stack([pipeline.crop(data) for data in list(cases.values())[:8]])
        together = pipeline.probabilities(crops)
        alone = np.concatenate([pipeline.probabilities(crop[np.newaxis]) for crop in crops])
    finally:
        torch.set_num_threads(threads)
    assert together.shape == alone.shape == (8, len(pipeline.labels))
    assert np.abs(together - alone).max() <= TORCH_TOLERANCE
