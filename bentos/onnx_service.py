"""The weather classifier on ONNX Runtime.

    bentoml serve bentos.onnx_service:OnnxClassifier

The graph takes the 224x224 uint8 RGB crop (NHWC) and does the rest itself (scaling,
normalization, the network, softmax), so this service only decodes and crops. It
must not import torch or torchvision, nor may its bento install them.
"""

from __future__ import annotations

from collections.abc import Callable

import bentoml
import numpy as np
from bentoml.models import BentoModel

from bentos import common, settings
from weather.registry import ONNX_MODEL


def load_probabilities(model: bentoml.Model) -> Callable[[np.ndarray], np.ndarray]:
    """An ONNX Runtime session for ``model``: a batch of crops in, probabilities out."""
    # Imported here, in the worker's loader thread: `bentoml serve` imports this module only
    # to read the service's configuration.
    import onnxruntime as ort

    common.STARTUP.mark("runtime_imported")

    contract = model.info.metadata["input_contract"]
    if "probabilities" not in contract["outputs"]:
        raise ValueError(f"the model has no 'probabilities' output: {sorted(contract['outputs'])}")
    input_name = contract["input"]["name"]

    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.INTRA_THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Optimizing at load time for this CPU; an optimized file would not be portable.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model.path_of(ONNX_MODEL.file), options, providers=["CPUExecutionProvider"])

    def probabilities(crops: np.ndarray) -> np.ndarray:
        # The uint8 pixels go to the graph as they are: no float copy, no transpose here.
        return session.run(["probabilities"], {input_name: crops})[0]

    return probabilities


class OnnxRuntime(common.Runtime):
    model = BentoModel(ONNX_MODEL.latest)

    def load_probabilities(self) -> Callable[[np.ndarray], np.ndarray]:
        return load_probabilities(self.model)


def load_pipeline(model: bentoml.Model) -> common.Pipeline:
    """The whole request pipeline in this process (also the benchmark's ceiling)."""
    return common.Pipeline.from_metadata(model.info.metadata, load_probabilities(model), OnnxRuntime.exact_crop)


@bentoml.service(**common.service_options())
class OnnxModel(OnnxRuntime, common.ModelAPI):
    pass


@bentoml.service(**common.service_options())
class OnnxClassifier(OnnxRuntime, common.ClassifierAPI):
    if settings.BATCHING:
        batch = bentoml.depends(OnnxModel)


common.add_contract_gate(OnnxClassifier)
