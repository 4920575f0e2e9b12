"""The weather classifier on ONNX Runtime.

    bentoml serve bentos.onnx_service:OnnxClassifier

The graph takes the 224x224 uint8 RGB crop (NHWC) and does the rest itself (scaling,
normalization, the network, softmax), so this service only decodes and crops. It
must not import torch or torchvision, nor may its bento install them.
"""

from __future__ import annotations

import bentoml
import numpy as np
from bentoml.models import BentoModel
from PIL import Image

from bentos import common, settings
from weather.registry import ONNX_MODEL

with bentoml.importing():
    import onnxruntime as ort


def load_pipeline(model: bentoml.Model) -> common.Pipeline:
    """The request pipeline on an ONNX Runtime session for ``model`` (also the benchmark's ceiling)."""
    metadata = model.info.metadata
    contract = metadata["input_contract"]
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

    def probabilities(image: Image.Image) -> np.ndarray:
        # The uint8 pixels go to the graph as they are: no float copy, no transpose here.
        return session.run(["probabilities"], {input_name: np.asarray(image)[np.newaxis]})[0][0]

    return common.Pipeline.from_metadata(metadata, probabilities)


@bentoml.service(**common.service_options())
@bentoml.asgi_app(common.predict_app())
class OnnxClassifier:
    model = BentoModel(ONNX_MODEL.latest)

    def __init__(self) -> None:
        self.classifier = common.Classifier(lambda: load_pipeline(self.model))

    def __is_ready__(self) -> bool:
        return self.classifier.ready

    def __is_alive__(self) -> bool:
        return not self.classifier.failed
