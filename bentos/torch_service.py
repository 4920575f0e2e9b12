"""The weather classifier on PyTorch: the reference pipeline behind the HTTP contract.

    bentoml serve bentos.torch_service:TorchClassifier

torchvision MobileNetV3-small from the ``weather-torch`` state dict, in eval mode
under ``torch.inference_mode()``. Preprocessing is torchvision's
``MobileNet_V3_Small_Weights.DEFAULT.transforms()`` step by step: Pillow resize then
center crop (the exact path of ``bentos.imaging.center_crop``), then the preset's own
``pil_to_tensor`` (as an NHWC->NCHW view of the crops), ``convert_image_dtype`` and ``normalize``, with the mean and std
from the model's metadata.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import bentoml
import numpy as np
from bentoml.models import BentoModel

from bentos import common, settings
from weather.registry import TORCH_MODEL


def load_probabilities(model: bentoml.Model) -> Callable[[np.ndarray], np.ndarray]:
    """The torch model for ``model``: a batch of crops in, probabilities out."""
    # Imported here, in the worker's loader thread, not at module level: `bentoml serve`
    # imports this module only to read the service's configuration, and torch with
    # torchvision takes seconds to import.
    import torch
    import torchvision.transforms.functional as F

    from weather.torch_model import load_model

    common.STARTUP.mark("runtime_imported")

    torch.set_num_threads(settings.INTRA_THREADS)
    # The model runs one operator at a time anyway. Only allowed once, before any parallel
    # work: in a worker this is first; in a process that already ran torch it raises.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    in_graph = model.info.metadata["input_contract"]["in_graph"]
    mean, std = list(in_graph["mean"]), list(in_graph["std"])
    network = load_model(model.path_of(TORCH_MODEL.file))  # eval mode

    def probabilities(crops: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            # NHWC uint8 -> NCHW, as the preset's pil_to_tensor does per image.
            pixels = F.convert_image_dtype(torch.from_numpy(crops).permute(0, 3, 1, 2), torch.float)
            return torch.softmax(network(F.normalize(pixels, mean=mean, std=std)), dim=1).numpy()

    return probabilities


class TorchRuntime(common.Runtime):
    model = BentoModel(TORCH_MODEL.latest)
    exact_crop = True  # the reference pipeline: torchvision's resize, then its crop

    def load_probabilities(self) -> Callable[[np.ndarray], np.ndarray]:
        return load_probabilities(self.model)


def load_pipeline(model: bentoml.Model) -> common.Pipeline:
    """The whole request pipeline in this process (also the benchmark's ceiling)."""
    return common.Pipeline.from_metadata(model.info.metadata, load_probabilities(model), TorchRuntime.exact_crop)


@bentoml.service(**common.service_options())
class TorchModel(TorchRuntime, common.ModelAPI):
    pass


@bentoml.service(**common.service_options())
class TorchClassifier(TorchRuntime, common.ClassifierAPI):
    if settings.BATCHING:
        batch = bentoml.depends(TorchModel)


common.add_contract_gate(TorchClassifier)
