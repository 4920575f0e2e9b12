"""What both BentoML services share: the typed API, the request pipeline, model loading.

The HTTP contract is docs/contract.md. ``ClassifierAPI`` holds the three ``@bentoml.api``
methods both services expose (JSON with base64, a multipart upload, a raw body); each
service subclasses it and differs only in how it loads its model. ``bentos.http``
keeps BentoML's HTTP layer to the contract on those routes. BentoML serves /livez,
/readyz (from ``__is_ready__``), /metrics, /docs.json and the Swagger UI.

Torch-free: the ONNX service imports this.
"""

from __future__ import annotations

import binascii
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument, ServiceUnavailable
from bentoml.validators import ContentType
from PIL import Image
from pydantic import BaseModel, Field

from bentos import imaging, settings
from bentos.http import ContractGate
from weather import contract
from weather.registry import STARTUP_LOG_PREFIX, STARTUP_STEPS

log = logging.getLogger("bentoml.weather")


def service_options() -> dict:
    """Keyword arguments for ``@bentoml.service``; ``BENTOML_CONFIG_OPTIONS`` still overrides them."""
    return {
        "workers": settings.WORKERS,
        "threads": settings.WORKER_THREADS,
        "logging": {"access": {"enabled": settings.ACCESS_LOG}},
    }


class Prediction(BaseModel):
    """The response of every predict endpoint."""

    prediction: str = Field(description="the most probable label")
    probability: float = Field(description="its probability")
    probabilities: dict[str, float] = Field(description="every label's probability, in the model's label order")


def image_bytes(encoded: str) -> bytes:
    """The bytes of ``image`` in ``{"image": "<standard base64>"}``."""
    try:
        # strict: the standard alphabet only, correct padding, no whitespace or other characters
        return binascii.a2b_base64(encoded, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise InvalidArgument(f"'{contract.IMAGE_FIELD}' is not valid standard base64") from None


def prediction(labels: tuple[str, ...], probabilities: np.ndarray) -> Prediction:
    """The response for one image's probabilities (in label order)."""
    values = probabilities.tolist()
    best = max(range(len(values)), key=values.__getitem__)
    return Prediction(
        prediction=labels[best],
        probability=values[best],
        probabilities=dict(zip(labels, values, strict=True)),
    )


@dataclass(frozen=True)
class Pipeline:
    """One loaded model: image file in, prediction out. Runs in a worker thread."""

    labels: tuple[str, ...]
    # A batch of 224x224 RGB crops, uint8 NHWC -> probabilities float32 (batch, len(labels)).
    probabilities: Callable[[np.ndarray], np.ndarray]
    # Resize-then-crop bit for bit as torchvision does (the torch service), or the faster window.
    exact_crop: bool = False

    @classmethod
    def from_metadata(
        cls, metadata: dict, probabilities: Callable[[np.ndarray], np.ndarray], exact_crop: bool = False
    ) -> Pipeline:
        """Labels and preprocessing from a model's metadata (written by model_import)."""
        imaging.check_input_contract(metadata["input_contract"])
        labels = tuple(metadata["labels"])
        if not labels or not all(isinstance(label, str) for label in labels):
            raise ValueError(f"the model's labels metadata is not a list of names: {metadata['labels']!r}")
        return cls(labels=labels, probabilities=probabilities, exact_crop=exact_crop)

    def crop(self, image: bytes) -> np.ndarray:
        """The model's input for one JPEG or PNG file: 224x224x3 uint8 RGB."""
        try:
            return np.asarray(imaging.center_crop(imaging.decode_rgb(image), exact=self.exact_crop))
        except imaging.ImageError as exc:
            raise InvalidArgument(str(exc)) from None

    def predict(self, image: bytes) -> Prediction:
        return prediction(self.labels, self.probabilities(self.crop(image)[np.newaxis])[0])

    def warm_up(self) -> None:
        """Run every stage once per image format, and check the model's output against the labels."""
        for image in _warm_up_images():
            result = self.predict(image)
            total = sum(result.probabilities.values())
            if len(result.probabilities) != len(self.labels) or abs(total - 1.0) > contract.SUM_TOLERANCE:
                raise ValueError(f"the model's output does not match its {len(self.labels)} labels (sum {total:.6f})")


def _warm_up_images() -> list[bytes]:
    image = Image.linear_gradient("L").resize((320, 240)).convert("RGB")
    files = []
    for image_format in imaging.FORMATS:
        buffer = io.BytesIO()
        image.save(buffer, image_format)
        files.append(buffer.getvalue())
    return files


def process_age() -> float:
    """Seconds since this process started, from the kernel's own clock (Linux).

    Not psutil's create_time: that adds the boot time, which /proc gives in whole seconds
    and which drifts from the wall clock on a VM."""
    start_ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


class StartupTimeline:
    """When each start-up step of this process ended, in seconds since the process started.

    Logged once the model is ready (``startup {...}``), so the benchmark can show where a
    worker's start-up goes: imports, the runtime's import, the model's load, the warm-up.
    """

    def __init__(self) -> None:
        self.process_started = time.time() - process_age()  # seconds since the epoch
        self.steps: dict[str, float] = {}

    def mark(self, step: str) -> None:
        assert step in STARTUP_STEPS, step
        self.steps.setdefault(step, round(time.time() - self.process_started, 3))

    def log(self) -> None:
        log.info("%s%s", STARTUP_LOG_PREFIX, json.dumps({"process_started": self.process_started, **self.steps}))


STARTUP = StartupTimeline()


class Classifier:
    """A model loaded and warmed up in a background thread, so /livez answers at once and
    /readyz says 503 until the model can serve."""

    def __init__(self, load: Callable[[], Pipeline]) -> None:
        STARTUP.mark("service_created")  # BentoML and the service module imported
        self._pipeline: Pipeline | None = None
        self._failure: str | None = None
        self._done = threading.Event()
        threading.Thread(target=self._load, args=(load,), name="model-loader", daemon=True).start()

    def _load(self, load: Callable[[], Pipeline]) -> None:
        started = time.perf_counter()
        try:
            pipeline = load()
        except Exception as exc:  # reported through /livez, /readyz and 503s
            log.exception("loading the model failed")
            self._failure = f"{type(exc).__name__}: {exc}"
        else:
            self._pipeline = pipeline
            log.info("ready to serve in %.2f s (model loaded and warmed up)", time.perf_counter() - started)
            STARTUP.mark("ready")
            STARTUP.log()
        finally:
            self._done.set()

    @property
    def ready(self) -> bool:
        return self._pipeline is not None

    @property
    def pipeline(self) -> Pipeline | None:
        """The loaded pipeline, None until then (or for good, if loading failed)."""
        return self._pipeline

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def not_ready_reason(self) -> str:
        return f"the model failed to load ({self._failure})" if self._failure else "the model is still loading"

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for loading to end (ready or failed); False on timeout."""
        return self._done.wait(timeout)

    def predict(self, image: bytes) -> Prediction:
        pipeline = self._pipeline
        if pipeline is None:
            raise ServiceUnavailable(self.not_ready_reason())
        return pipeline.predict(image)


class Runtime:
    """A runtime's model and how to load it: what its classifier and its model service share.

    Each service module subclasses it once: ``model`` (a ``BentoModel``, so the bento
    bundles it), ``load_probabilities`` and, for the reference path, ``exact_crop``.
    """

    model: bentoml.Model
    # Resize-then-crop bit for bit as torchvision does, or the faster window.
    exact_crop: bool = False

    def load_probabilities(self) -> Callable[[np.ndarray], np.ndarray]:
        raise NotImplementedError

    def local_pipeline(self) -> Pipeline:
        """The model in this process, warmed up (its output checked against the labels)."""
        pipeline = Pipeline.from_metadata(self.model.info.metadata, self.load_probabilities(), self.exact_crop)
        STARTUP.mark("model_loaded")
        pipeline.warm_up()
        STARTUP.mark("warmed_up")
        return pipeline


class ClassifierAPI(Runtime):
    """The endpoints of docs/contract.md, shared by both services.

    With ``MAX_BATCH_SIZE`` > 1 a service also declares ``batch = bentoml.depends(...)``
    of its ``ModelAPI`` service, and the model runs there, fed one image at a time by
    each request.
    """

    def __init__(self) -> None:
        self.classifier = Classifier(self._load_pipeline)

    def _load_pipeline(self) -> Pipeline:
        # Not self.batch here: resolving the dependency in this thread races BentoML's own
        # first access on the event loop, and the proxy it sets up may not be the one kept.
        if settings.BATCHING:
            # The model service warms the model up; its readiness is part of /readyz (BentoML's runner probe).
            return Pipeline.from_metadata(self.model.info.metadata, self._batched, exact_crop=self.exact_crop)
        return self.local_pipeline()

    def _batched(self, crops: np.ndarray) -> np.ndarray:
        """The model service's batchable method, for one request's crop."""
        try:
            return self.batch.probabilities(crops)
        except OSError as exc:  # aiohttp's connection errors: the model service is still starting
            raise ServiceUnavailable(f"the model service is not reachable ({exc})") from exc

    def __is_ready__(self) -> bool:
        return self.classifier.ready

    def __is_alive__(self) -> bool:
        return not self.classifier.failed

    @bentoml.api(route=contract.PREDICT_ROUTE)
    def predict(
        self, image: Annotated[str, Field(description="the JPEG or PNG file, in standard base64")]
    ) -> Prediction:
        """Classify an image sent as base64 in JSON: {"image": "..."}."""
        return self.classifier.predict(image_bytes(image))

    @bentoml.api(route=contract.UPLOAD_ROUTE)
    def predict_upload(self, image: Annotated[Path, Field(description="the JPEG or PNG file")]) -> Prediction:
        """Classify an image uploaded as multipart/form-data (curl -F image=@photo.jpg)."""
        return self.classifier.predict(image.read_bytes())

    @bentoml.api(route=contract.RAW_ROUTE)
    def predict_raw(self, image: Annotated[Path, ContentType("image/*")], /) -> Prediction:
        """Classify an image sent as the body itself (Content-Type image/jpeg, image/png)."""
        return self.classifier.predict(image.read_bytes())


def add_contract_gate(service: bentoml.Service) -> None:
    """The contract on the predict routes (see bentos.http)."""
    service.add_asgi_middleware(ContractGate, max_body_bytes=settings.MAX_BODY_BYTES)


def batch_options() -> dict:
    """``@bentoml.api`` options of a model service's batchable method."""
    return {
        "batchable": True,
        # BentoML refuses 1; with batching off the model service is defined but never served.
        "max_batch_size": max(settings.MAX_BATCH_SIZE, 2),
        "max_latency_ms": settings.MAX_BATCH_LATENCY_MS,
    }


class ModelAPI(Runtime):
    """The model alone, batchable: a classifier's dependency when MAX_BATCH_SIZE > 1."""

    def __init__(self) -> None:
        self._probabilities = self.local_pipeline().probabilities

    @bentoml.api(**batch_options())
    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """A batch of 224x224 RGB crops (uint8, NHWC) -> their probabilities in label order."""
        return self._probabilities(crops)
