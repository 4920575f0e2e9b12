"""Export the torch classifier to ONNX with the in-graph half of the preprocessing.

The graph takes uint8 RGB pixels (NHWC, already resized and cropped, see
``weather.contract``) and returns logits and probabilities. No graph optimization
is baked into the file: ONNX Runtime optimizes at load time for the CPU it runs on.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch

from weather import contract

log = logging.getLogger(__name__)

OPSET = 18


class PixelsToProbabilities(torch.nn.Module):
    """uint8 NHWC pixels -> (logits, probabilities)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(contract.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(contract.STD).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        logits = self.model((x - self.mean) / self.std)
        return logits, torch.softmax(logits, dim=1)


def export_onnx(model: torch.nn.Module, path: str | Path) -> None:
    """Write ``model`` (in eval mode) to ``path`` as a self-contained ONNX file."""
    wrapper = PixelsToProbabilities(model).eval()
    # A batch of 2, so the exporter does not specialise the batch dimension to 1.
    example = torch.zeros(2, contract.CROP_SIZE, contract.CROP_SIZE, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter is chatty about internals
        program = torch.onnx.export(
            wrapper,
            (example,),
            input_names=[contract.INPUT_NAME],
            output_names=[contract.LOGITS_NAME, contract.PROBABILITIES_NAME],
            dynamic_shapes={"pixels": {0: batch}},
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    log.info("exported ONNX model to %s", path)
