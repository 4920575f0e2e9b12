"""The weather classifier on PyTorch: the reference pipeline behind the HTTP contract.

    bentoml serve bentos.torch_service:TorchClassifier

torchvision MobileNetV3-small from the ``weather-torch`` state dict, in eval mode
under ``torch.inference_mode()``. Preprocessing is torchvision's
``MobileNet_V3_Small_Weights.DEFAULT.transforms()`` step by step: Pillow resize then
center crop (the exact path of ``bentos.imaging.center_crop``), then the preset's own
``pil_to_tensor``, ``convert_image_dtype`` and ``normalize``, with the mean and std
from the model's metadata.
"""

from __future__ import annotations

import contextlib

import bentoml
import numpy as np
from bentoml.models import BentoModel
from PIL import Image

from bentos import common, settings
from weather.registry import TORCH_MODEL

with bentoml.importing():
    import torch
    import torchvision.transforms.functional as F

    from weather.torch_model import load_model


def load_pipeline(model: bentoml.Model) -> common.Pipeline:
    """The request pipeline on the torch model for ``model`` (also the benchmark's ceiling)."""
    torch.set_num_threads(settings.INTRA_THREADS)
    metadata = model.info.metadata
    in_graph = metadata["input_contract"]["in_graph"]
    mean, std = list(in_graph["mean"]), list(in_graph["std"])
    network = load_model(model.path_of(TORCH_MODEL.file))  # eval mode

    def probabilities(image: Image.Image) -> np.ndarray:
        with torch.inference_mode():
            pixels = F.convert_image_dtype(F.pil_to_tensor(image), torch.float)
            batch = F.normalize(pixels, mean=mean, std=std).unsqueeze(0)
            return torch.softmax(network(batch), dim=1)[0].numpy()

    return common.Pipeline.from_metadata(metadata, probabilities, exact_crop=True)


@bentoml.service(**common.service_options())
@bentoml.asgi_app(common.predict_app())
class TorchClassifier:
    model = BentoModel(TORCH_MODEL.latest)

    def __init__(self) -> None:
        # The model runs one operator at a time anyway. Only allowed once, before any parallel
        # work: in a worker this is first; in a process that already ran torch it raises.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
        self.classifier = common.Classifier(lambda: load_pipeline(self.model))

    def __is_ready__(self) -> bool:
        return self.classifier.ready

    def __is_alive__(self) -> bool:
        return not self.classifier.failed
