"""What both BentoML services share: settings, the /predict route, errors, model loading.

The HTTP contract is docs/contract.md. ``POST /predict`` is a plain Starlette route
mounted into the service (``@bentoml.asgi_app``) rather than a ``@bentoml.api``:
BentoML 1.4.39 answers bad input on its API routes in its own formats (pydantic
details for malformed JSON, a list ``[{"error": ...}]`` for ``InvalidArgument``, 500
for an unexpected Content-Type), while the contract wants ``{"error": ...}`` and a 4xx
every time. BentoML still serves /livez, /readyz (from ``__is_ready__``), /metrics,
and its request metrics count /predict like any other route.

Torch-free: the ONNX service imports this.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.to_thread
import bentoml
import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bentos import imaging, settings
from weather import contract

log = logging.getLogger("bentoml.weather")


# How long a request waits for a worker whose model is still loading before it gets 503.
MODEL_WAIT_SECONDS = 60.0


def service_options() -> dict:
    """Keyword arguments for ``@bentoml.service``; ``BENTOML_CONFIG_OPTIONS`` still overrides them."""
    return {"workers": settings.WORKERS}


class RequestError(Exception):
    """Bad input: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class NotReady(Exception):
    """The model is not loaded (yet, or at all): 503."""


def image_bytes(body: bytes) -> bytes:
    """The decoded ``image`` of a request body ``{"image": "<standard base64>"}``."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError; deeply nested arrays
        raise RequestError("the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise RequestError("the body must be a JSON object")
    if "image" not in payload:
        raise RequestError("'image' is missing")
    encoded = payload["image"]
    if not isinstance(encoded, str):
        raise RequestError("'image' must be a string (standard base64)")
    try:
        # strict: the standard alphabet only, correct padding, no whitespace or other characters
        return binascii.a2b_base64(encoded, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise RequestError("'image' is not valid standard base64") from None


def prediction(labels: tuple[str, ...], probabilities: np.ndarray) -> dict:
    """The response body for one image's probabilities (in label order)."""
    values = probabilities.tolist()
    best = max(range(len(values)), key=values.__getitem__)
    return {
        "prediction": labels[best],
        "probability": values[best],
        "probabilities": dict(zip(labels, values, strict=True)),
    }


@dataclass(frozen=True)
class Pipeline:
    """One loaded model: request body in, response body out. Runs in a worker thread."""

    labels: tuple[str, ...]
    # The 224x224 RGB input -> probabilities in label order, float32 of shape (len(labels),).
    probabilities: Callable[[Image.Image], np.ndarray]
    # Resize-then-crop bit for bit as torchvision does (the torch service), or the faster window.
    exact_crop: bool = False

    @classmethod
    def from_metadata(
        cls, metadata: dict, probabilities: Callable[[Image.Image], np.ndarray], exact_crop: bool = False
    ) -> Pipeline:
        """Labels and preprocessing from a model's metadata (written by model_import)."""
        imaging.check_input_contract(metadata["input_contract"])
        labels = tuple(metadata["labels"])
        if not labels or not all(isinstance(label, str) for label in labels):
            raise ValueError(f"the model's labels metadata is not a list of names: {metadata['labels']!r}")
        return cls(labels=labels, probabilities=probabilities, exact_crop=exact_crop)

    def predict(self, body: bytes) -> dict:
        try:
            image = imaging.decode_rgb(image_bytes(body))
        except imaging.ImageError as exc:
            raise RequestError(str(exc)) from None
        return prediction(self.labels, self.probabilities(imaging.center_crop(image, exact=self.exact_crop)))

    def warm_up(self) -> None:
        """Run every stage once per image format, and check the model's output against the labels."""
        for body in _warm_up_bodies():
            result = self.predict(body)
            total = sum(result["probabilities"].values())
            if len(result["probabilities"]) != len(self.labels) or abs(total - 1.0) > contract.SUM_TOLERANCE:
                raise ValueError(f"the model's output does not match its {len(self.labels)} labels (sum {total:.6f})")


def _warm_up_bodies() -> list[bytes]:
    image = Image.linear_gradient("L").resize((320, 240)).convert("RGB")
    bodies = []
    for image_format in imaging.FORMATS:
        buffer = io.BytesIO()
        image.save(buffer, image_format)
        bodies.append(json.dumps({"image": base64.b64encode(buffer.getvalue()).decode()}).encode())
    return bodies


class Classifier:
    """A model loaded and warmed up in a background thread, so /livez answers at once and
    /readyz says 503 until the model can serve."""

    def __init__(self, load: Callable[[], Pipeline]) -> None:
        self._pipeline: Pipeline | None = None
        self._failure: str | None = None
        self._done = threading.Event()
        self.limiter: anyio.CapacityLimiter | None = None  # made on the event loop, on first use
        threading.Thread(target=self._load, args=(load,), name="model-loader", daemon=True).start()

    def _load(self, load: Callable[[], Pipeline]) -> None:
        started = time.perf_counter()
        try:
            pipeline = load()
            pipeline.warm_up()
        except Exception as exc:  # reported through /livez, /readyz and 503s
            log.exception("loading the model failed")
            self._failure = f"{type(exc).__name__}: {exc}"
        else:
            self._pipeline = pipeline
            log.info("model loaded and warmed up in %.2f s", time.perf_counter() - started)
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

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for loading to end (ready or failed); False on timeout."""
        return self._done.wait(timeout)

    def predict_json(self, body: bytes) -> bytes:
        if not self._done.wait(MODEL_WAIT_SECONDS):
            raise NotReady("the model is still loading")
        if self._pipeline is None:
            raise NotReady(f"the model failed to load ({self._failure})")
        return json.dumps(self._pipeline.predict(body)).encode()


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or RequestError(413) as soon as it is known to exceed ``limit`` bytes."""
    too_large = RequestError(f"the request body is larger than {limit} bytes", status=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def predict(request: Request) -> Response:
    """POST /predict: {"image": base64} -> {"prediction", "probability", "probabilities"}."""
    try:
        body = await read_body(request, settings.MAX_BODY_BYTES)
        classifier: Classifier = bentoml.get_current_service().classifier
        if classifier.limiter is None:
            classifier.limiter = anyio.CapacityLimiter(settings.WORKER_THREADS)
        content = await anyio.to_thread.run_sync(classifier.predict_json, body, limiter=classifier.limiter)
    except RequestError as exc:
        return error_response(exc.status, exc.message)
    except ClientDisconnect:
        return error_response(400, "the client disconnected before sending the whole body")
    except NotReady as exc:
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})
    except Exception:
        log.exception("/predict failed")
        return error_response(500, "internal error, see the server log")
    return Response(content, media_type="application/json")


def predict_app() -> Starlette:
    """The app each service mounts for POST /predict."""
    return Starlette(routes=[Route("/predict", predict, methods=["POST"])])
