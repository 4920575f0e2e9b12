"""The classifier in PyTorch and the reference pipeline every service is checked against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.models import MobileNet_V3_Small_Weights

from weather.contract import LABELS
from weather.errors import first_line


def build_model() -> torch.nn.Module:
    """MobileNetV3-small with the reference 11-class head, randomly initialised."""
    model = torchvision.models.mobilenet_v3_small()
    model.classifier[-1] = torch.nn.Linear(1024, len(LABELS))
    return model


def load_model(state_dict_path: str | Path) -> torch.nn.Module:
    """The classifier with weights from a state dict file, in eval mode.

    Raises ValueError when the file is not a state dict for this architecture.
    """
    try:
        state_dict = torch.load(state_dict_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad file
        raise ValueError(f"not a loadable torch state dict ({type(exc).__name__}: {exc})") from None
    if not isinstance(state_dict, dict):
        raise ValueError(f"expected a state dict, found a {type(state_dict).__name__}")
    model = build_model()
    head = state_dict.get("classifier.3.weight")
    if isinstance(head, torch.Tensor) and head.shape[0] != len(LABELS):
        raise ValueError(f"the classifier head has {head.shape[0]} classes, expected {len(LABELS)}")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ValueError(f"state dict does not fit MobileNetV3-small/11 classes: {first_line(exc)}") from None
    return model.eval()


def reference_transform():
    """torchvision's own preprocessing for MobileNetV3-small."""
    return MobileNet_V3_Small_Weights.DEFAULT.transforms()


@torch.inference_mode()
def reference_probabilities(model: torch.nn.Module, images: list[Image.Image]) -> np.ndarray:
    """Probabilities of the reference pipeline (torchvision transforms + torch, float32)."""
    transform = reference_transform()
    batch = torch.stack([transform(image.convert("RGB")) for image in images])
    return torch.softmax(model(batch), dim=1).numpy()
