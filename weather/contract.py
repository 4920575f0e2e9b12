"""The weather classifier's labels and the input contract of its ONNX graph.

Torch-free on purpose: the ONNX service, the model importer and the benchmark all
import this, and the ONNX service must not pull in torch.

The split of work between code and graph:

* before the graph (service code): decode to RGB, resize the shorter side to 256
  with Pillow's bilinear filter (which antialiases), center-crop 224x224, and hand
  the graph the uint8 pixels as NHWC;
* inside the graph: cast to float32, scale by 1/255, normalize with the ImageNet
  mean/std, transpose to NCHW, run MobileNetV3-small, softmax.

The steps before the graph are exactly what torchvision's
``MobileNet_V3_Small_Weights.DEFAULT.transforms()`` does to a PIL image, so the
uint8 pixels are bit-identical to the reference pipeline's and only float math
differs. The Rust service reads the same contract from the model's metadata.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

LABELS = (
    "dew",
    "fogsmog",
    "frost",
    "glaze",
    "hail",
    "lightning",
    "rain",
    "rainbow",
    "rime",
    "sandstorm",
    "snow",
)

RESIZE_SHORTER_SIDE = 256
CROP_SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# The three ways to send an image (docs/contract.md); each answers the same.
PREDICT_ROUTE = "/predict"  # JSON {"image": "<standard base64>"}
UPLOAD_ROUTE = "/predict/upload"  # multipart/form-data, one file part named IMAGE_FIELD
RAW_ROUTE = "/predict/raw"  # the file itself, with one of RAW_CONTENT_TYPES
IMAGE_FIELD = "image"
RAW_CONTENT_TYPES = ("image/jpeg", "image/png", "application/octet-stream")

# The HTTP contract's limits (docs/contract.md); each service's default, overridable there.
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_PIXELS = 40_000_000

# The parity rule every service is held to against the PyTorch reference (docs/contract.md):
# probabilities within PROBABILITY_TOLERANCE, and the same top-1 wherever the reference's
# top-2 margin exceeds TOP2_MARGIN; the probabilities sum to 1 within SUM_TOLERANCE.
PROBABILITY_TOLERANCE = 0.02
TOP2_MARGIN = 0.05
SUM_TOLERANCE = 1e-4

INPUT_NAME = "pixels"
LOGITS_NAME = "logits"
PROBABILITIES_NAME = "probabilities"

# Written into every model's metadata; the services read it from there.
INPUT_CONTRACT = {
    "version": 1,
    "input": {
        "name": INPUT_NAME,
        "dtype": "uint8",
        "layout": "NHWC",
        "shape": ["batch", CROP_SIZE, CROP_SIZE, 3],
        "color": "RGB",
    },
    "outputs": {
        LOGITS_NAME: {"dtype": "float32", "shape": ["batch", len(LABELS)]},
        PROBABILITIES_NAME: {"dtype": "float32", "shape": ["batch", len(LABELS)]},
    },
    "before_graph": {
        "convert": "RGB (grayscale, palette, RGBA, CMYK are converted)",
        "resize": {
            "shorter_side": RESIZE_SHORTER_SIDE,
            "longer_side": "floor(shorter_side * long / short)",
            "filter": "bilinear",
            "antialias": True,
            "reference": "PIL.Image.resize(size, Image.BILINEAR)",
        },
        "center_crop": {
            "height": CROP_SIZE,
            "width": CROP_SIZE,
            "top": "round_half_even((height - 224) / 2)",
            "left": "round_half_even((width - 224) / 2)",
        },
    },
    "in_graph": {
        "cast": "float32",
        "scale": 1 / 255,
        "mean": list(MEAN),
        "std": list(STD),
        "transpose": "NHWC -> NCHW",
        "softmax": True,
    },
}


def resized_size(width: int, height: int) -> tuple[int, int]:
    """Size after scaling the shorter side to 256, as torchvision computes it."""
    short, long = sorted((width, height))
    new_long = int(RESIZE_SHORTER_SIDE * long / short)
    if width <= height:
        return RESIZE_SHORTER_SIDE, new_long
    return new_long, RESIZE_SHORTER_SIDE


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the 224x224 center crop, as torchvision rounds it."""
    left = round((width - CROP_SIZE) / 2.0)
    top = round((height - CROP_SIZE) / 2.0)
    return left, top, left + CROP_SIZE, top + CROP_SIZE


def prepare_pixels(image: Image.Image) -> np.ndarray:
    """The graph's input for one RGB image: uint8, shape (224, 224, 3)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    resized = image.resize(resized_size(*image.size), Image.BILINEAR)
    cropped = resized.crop(center_crop_box(*resized.size))
    return np.asarray(cropped, dtype=np.uint8)


# Admission control and slow clients (docs/contract.md, "Under load, slow clients, shutdown").
# Per inference worker (a bento worker process; a Rust inference thread): at most
# QUEUE_CAPACITY predict requests held at once (body being read, waiting, or running). Up to
# MAX_WAITING_REQUESTS more wait for a place at their headers, their bodies not read beyond
# the server's buffers (so that clients beyond what a worker can hold are slowed by TCP, not
# refused in a loop); one more gets 503 as soon as its headers arrive, its body discarded
# unparsed.
QUEUE_CAPACITY = 64
MAX_WAITING_REQUESTS = 1024
# Every predict request is answered within this of its headers' arrival, or refused with 503: when it
# is still waiting for a place then, or when its run would end later (by the recent mean). A
# freed place passes over a waiting request the QUEUE_CAPACITY runs ahead would make late.
REQUEST_TIMEOUT_SECONDS = 2
# Places and runs are given only to requests that can be answered this long before that
# deadline, so that the answer still reaches its client within it: a client reads an answer
# some time after it leaves (the benchmark's Locust, one process for 600 clients on one core,
# tens of ms at its p99).
ANSWER_HEADROOM_MS = 50
# Every 503 for load or readiness says when to come back.
RETRY_AFTER_SECONDS = 1
# A request's headers must arrive within this of the connection opening or the previous
# response on it; its body within BODY_TIMEOUT_SECONDS of its headers. Otherwise 408.
HEADER_TIMEOUT_SECONDS = 5
BODY_TIMEOUT_SECONDS = 30
# Bodies still arriving hold at most this much memory per worker; a request whose declared
# length would exceed it gets 503 at its headers, one that outgrows it (chunked) 503 then.
MAX_PENDING_BODY_BYTES = 64 * 1024 * 1024
# After refusing a body (413, or a 503 at the headers), the server reads and discards up to
# this much more of it before closing, so a client that writes its whole body before
# reading (Python's urllib, requests) still reads the answer.
DISCARD_BODY_BYTES = 64 * 1024 * 1024

# How long a service may take to stop after SIGTERM: it stops accepting, then finishes the
# requests in flight for at most this long. The Rust service's actix-web shutdown_timeout
# (rust_service/src/main.rs) and the bentos' `--timeout-graceful-shutdown` (deploy/k8s) are
# this value, and every Kubernetes grace period covers it; tests/test_k8s.py checks all three.
GRACEFUL_TIMEOUT_SECONDS = 30
