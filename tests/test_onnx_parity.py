"""The ONNX model (preprocessing in the graph) agrees with the torch reference pipeline,
and the demo model is decisive and looks at its input."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from weather import contract, synthetic
from weather.demo import MIN_ACCURACY, MIN_MEAN_TOP1, build_demo
from weather.photos import photo_paths
from weather.torch_model import load_model, reference_probabilities, reference_transform


@pytest.fixture(scope="module")
def demo():
    return build_demo()


@pytest.fixture(scope="module")
def torch_model(demo):
    return load_model(demo.state_dict_path)


@pytest.fixture(scope="module")
def session(demo):
    return ort.InferenceSession(str(demo.onnx_path), providers=["CPUExecutionProvider"])


def onnx_probabilities(session, images: list[Image.Image]) -> np.ndarray:
    pixels = np.stack([contract.prepare_pixels(image.convert("RGB")) for image in images])
    return session.run([contract.PROBABILITIES_NAME], {contract.INPUT_NAME: pixels})[0]


def test_real_photos_are_available():
    # Parity on generated images alone would prove little; make a missing wheel loud.
    assert len(photo_paths()) >= 8


def parity_images() -> dict[str, Image.Image]:
    images = {name: Image.open(path) for name, path in photo_paths().items()}
    for image, label in synthetic.generate_set(per_class=2, seed=11):
        images[f"generated-{contract.LABELS[label]}-{len(images)}"] = image
    coffee = Image.open(photo_paths()["coffee"])
    images["coffee-palette"] = coffee.convert("P")
    images["coffee-rgba"] = coffee.convert("RGBA")
    images["coffee-cmyk"] = coffee.convert("CMYK")
    images["coffee-portrait-odd"] = coffee.transpose(Image.Transpose.ROTATE_90).resize((301, 457))
    images["tiny"] = coffee.resize((40, 27))
    return images


def test_onnx_matches_the_torch_reference(torch_model, session):
    images = parity_images()
    reference = reference_probabilities(torch_model, list(images.values()))
    candidate = onnx_probabilities(session, list(images.values()))

    for name, ref, got in zip(images, reference, candidate, strict=True):
        assert np.abs(got - ref).max() <= contract.PROBABILITY_TOLERANCE, name
        top2 = np.sort(ref)[-2:]
        if top2[1] - top2[0] > contract.TOP2_MARGIN:
            assert got.argmax() == ref.argmax(), name


def test_pixels_before_the_graph_are_those_of_torchvision():
    """The service-side steps reproduce torchvision's transforms exactly (before normalization)."""
    transform = reference_transform()
    mean, std = torch.tensor(contract.MEAN).view(3, 1, 1), torch.tensor(contract.STD).view(3, 1, 1)
    for name, image in parity_images().items():
        rgb = image.convert("RGB")
        expected = (transform(rgb) * std + mean) * 255
        ours = torch.tensor(contract.prepare_pixels(rgb)).permute(2, 0, 1).float()
        assert (ours - expected).abs().max() < 1e-3, name


def test_probabilities_sum_to_one_for_a_batch(session):
    images = [image for image, _ in synthetic.generate_set(per_class=1, seed=5)]
    probabilities = onnx_probabilities(session, images)
    assert probabilities.shape == (11, 11)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=contract.SUM_TOLERANCE)


def test_graph_is_portable(demo):
    """No hardware-specific fused ops (what ORT_ENABLE_ALL writes) in the published file."""
    model = onnx.load(str(demo.onnx_path))
    domains = {node.domain for node in model.graph.node}
    assert domains <= {"", "ai.onnx"}, domains


def test_demo_model_is_decisive_and_input_dependent(demo, session):
    assert demo.held_out_accuracy >= MIN_ACCURACY
    assert demo.mean_top1_probability >= MIN_MEAN_TOP1
    # An independent check on images the model never saw, through the ONNX path.
    samples = synthetic.generate_set(per_class=5, seed=99)
    probabilities = onnx_probabilities(session, [image for image, _ in samples])
    labels = np.array([label for _, label in samples])
    assert (probabilities.argmax(1) == labels).mean() >= MIN_ACCURACY
    assert probabilities.max(1).mean() >= MIN_MEAN_TOP1
    assert len(set(probabilities.argmax(1))) == len(contract.LABELS)
