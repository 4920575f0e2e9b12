"""The embedded demo model: MobileNetV3-small trained briefly on synthetic weather.

No pretrained weights can be downloaded, and a randomly initialised network
outputs an exactly uniform distribution, so the demo trains one: fixed seeds,
so repeatable on one machine (float rounding differs between CPUs, so the weights
differ slightly between machines), a couple of minutes on two CPU cores, cached so
it trains once.
It writes the artifacts the real pipeline publishes (a state dict and an ONNX
model), which then go through the ordinary import path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from weather import contract, synthetic
from weather.cache import cache_root
from weather.errors import first_line
from weather.onnx_export import export_onnx
from weather.registry import ONNX_MODEL, TORCH_MODEL
from weather.torch_model import build_model, reference_probabilities

log = logging.getLogger(__name__)

# Bump when the recipe changes in a way the cache key below would not notice.
RECIPE = "demo-v1"
TRAIN_PER_CLASS = 100
HELD_OUT_PER_CLASS = 30
EPOCHS = 3
BATCH_SIZE = 32
LEARNING_RATE = 2e-3
TRAIN_SEED, HELD_OUT_SEED = 0, 1

MIN_ACCURACY = 0.90
MIN_MEAN_TOP1 = 0.80

REPORT_FILE = "demo.json"


class DemoFailed(Exception):
    """The demo model could not be made; the message is meant for the user, on one line."""


@dataclass(frozen=True)
class DemoModel:
    directory: Path
    held_out_accuracy: float
    mean_top1_probability: float
    train_seconds: float

    @property
    def state_dict_path(self) -> Path:
        return self.directory / TORCH_MODEL.file

    @property
    def onnx_path(self) -> Path:
        return self.directory / ONNX_MODEL.file

    def metadata(self) -> dict:
        return {
            "demo": True,
            "description": "demo model trained briefly on procedurally generated (synthetic) weather images; "
            "not a real weather classifier",
            "recipe": RECIPE,
            "held_out_accuracy": round(self.held_out_accuracy, 4),
            "mean_top1_probability": round(self.mean_top1_probability, 4),
        }


def recipe_key() -> str:
    """Changes whenever the code that shapes the demo model changes."""
    digest = hashlib.sha256(RECIPE.encode())
    for module in (synthetic, contract):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(Path(__file__).read_bytes())
    digest.update(torch.__version__.encode())
    return digest.hexdigest()[:16]


def build_demo(cache_dir: Path | None = None) -> DemoModel:
    """The demo model's artifacts, trained now or reused from the cache."""
    directory = (cache_dir or cache_root()) / f"{RECIPE}-{recipe_key()}"
    report = directory / REPORT_FILE
    if report.exists():
        log.info("reusing the demo model in %s", directory)
        return DemoModel(directory=directory, **json.loads(report.read_text()))

    staging = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    try:
        return _build_into(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after success (renamed) or failure


def _build_into(staging: Path, directory: Path) -> DemoModel:
    started = time.perf_counter()
    model = _train()
    accuracy, mean_top1 = _evaluate(model)
    demo = DemoModel(staging, accuracy, mean_top1, round(time.perf_counter() - started, 1))
    log.info(
        "demo model: held-out accuracy %.1f%% (target >= %.0f%%), mean top-1 probability %.3f (target >= %.2f), "
        "trained in %.0f s",
        100 * accuracy,
        100 * MIN_ACCURACY,
        mean_top1,
        MIN_MEAN_TOP1,
        demo.train_seconds,
    )
    if accuracy < MIN_ACCURACY or mean_top1 < MIN_MEAN_TOP1:
        raise DemoFailed(
            f"the demo model missed its targets (held-out accuracy {accuracy:.3f} < {MIN_ACCURACY} "
            f"or mean top-1 probability {mean_top1:.3f} < {MIN_MEAN_TOP1})"
        )

    torch.save(model.state_dict(), demo.state_dict_path)
    try:
        export_onnx(model, demo.onnx_path)
    except Exception as exc:  # the exporter raises many kinds; the user needs one line
        raise DemoFailed(f"exporting the demo model to ONNX failed ({type(exc).__name__}: {first_line(exc)})") from None
    fields = asdict(demo)
    del fields["directory"]
    (staging / REPORT_FILE).write_text(json.dumps(fields, indent=2))
    try:
        staging.rename(directory)  # atomic: a half-written cache entry is never reused
    except OSError:
        if not (directory / REPORT_FILE).exists():
            raise
        # Another process built the same recipe at the same time and finished first: use its entry.
        log.info("reusing the demo model another process just built in %s", directory)
        return DemoModel(directory=directory, **json.loads((directory / REPORT_FILE).read_text()))
    return DemoModel(directory=directory, **fields)


def _train() -> torch.nn.Module:
    torch.manual_seed(TRAIN_SEED)
    log.info("generating %d synthetic training images", TRAIN_PER_CLASS * len(contract.LABELS))
    samples = synthetic.generate_set(TRAIN_PER_CLASS, seed=TRAIN_SEED)
    pixels = torch.from_numpy(np.stack([contract.prepare_pixels(image) for image, _ in samples]))
    targets = torch.tensor([label for _, label in samples])
    mean = torch.tensor(contract.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(contract.STD).view(1, 3, 1, 1)

    model = build_model().train()
    steps = EPOCHS * (len(samples) // BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, total_steps=steps)
    generator = torch.Generator().manual_seed(TRAIN_SEED)
    step = 0
    for epoch in range(EPOCHS):
        order = torch.randperm(len(samples), generator=generator)
        for start in range(0, len(order) - BATCH_SIZE + 1, BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            x = pixels[batch].permute(0, 3, 1, 2).float() / 255.0
            flip = torch.rand(len(batch), generator=generator) < 0.5
            x[flip] = x[flip].flip(3)
            loss = torch.nn.functional.cross_entropy(model((x - mean) / std), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
        log.info("epoch %d/%d: step %d/%d, last loss %.3f", epoch + 1, EPOCHS, step, steps, loss.item())
    _recalibrate_batch_norm(model, (pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std)
    return model.eval()


@torch.no_grad()
def _recalibrate_batch_norm(model: torch.nn.Module, inputs: torch.Tensor) -> None:
    """Replace the running BatchNorm statistics by exact averages over the training set.

    torchvision's MobileNetV3 updates them with momentum 0.01, so after a short
    training run they still mostly reflect the random initialisation and the
    model in eval mode would be no better than chance.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over every batch below
    model.train()
    for start in range(0, len(inputs), 2 * BATCH_SIZE):
        model(inputs[start : start + 2 * BATCH_SIZE])


def _evaluate(model: torch.nn.Module) -> tuple[float, float]:
    """Accuracy and mean top-1 probability on held-out images, through the reference pipeline."""
    samples = synthetic.generate_set(HELD_OUT_PER_CLASS, seed=HELD_OUT_SEED)
    probabilities = np.concatenate(
        [
            reference_probabilities(model, [image for image, _ in samples[i : i + 64]])
            for i in range(0, len(samples), 64)
        ]
    )
    targets = np.array([label for _, label in samples])
    accuracy = float((probabilities.argmax(1) == targets).mean())
    return accuracy, float(probabilities.max(1).mean())
