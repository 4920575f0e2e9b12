"""The benchmark's image, shaped like the original project's payload.

The original sent one 1200x727 baseline JPEG at quality 75 (~232 KB, ~310 KB as
base64 JSON). No such photo can be downloaded here, so the default image is made
deterministically from a real photo that ships in matplotlib's wheel, cropped to
the same aspect ratio and resized to the same size. The photos here are small, so
scaled up they compress far better than a camera's (~100 KB): a fixed film grain
gives the file the detail, and the size, of the original's (at least
ORIGINAL_JPEG_BYTES; decoding cost grows with it). Users can pass their own
JPEG/PNG image, or a JSON payload {"image": "<base64>"}, instead. Each endpoint
sends it its own way (``weather.endpoints``).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from weather.cache import cache_root
from weather.photos import photo_paths

WIDTH, HEIGHT = 1200, 727
JPEG_QUALITY = 75
SOURCE_PHOTO = "grace_hopper"
ORIGINAL_JPEG_BYTES = 232_000
# Gaussian luminance grain (standard deviation in 8-bit levels) from a fixed seed.
GRAIN_SIGMA = 15
GRAIN_SEED = 0


def default_image_path() -> Path:
    name = f"payload-{SOURCE_PHOTO}-{WIDTH}x{HEIGHT}-q{JPEG_QUALITY}-grain{GRAIN_SIGMA}s{GRAIN_SEED}.jpg"
    return cache_root() / name


def benchmark_jpeg() -> bytes:
    """The default payload's JPEG: a real photo at the original's size and quality."""
    photo = Image.open(photo_paths()[SOURCE_PHOTO]).convert("RGB")
    # Center-crop to 1200:727, then scale up to exactly 1200x727.
    target_ratio = WIDTH / HEIGHT
    width, height = photo.size
    crop_height = round(width / target_ratio)
    if crop_height <= height:
        top = (height - crop_height) // 2
        photo = photo.crop((0, top, width, top + crop_height))
    else:
        crop_width = round(height * target_ratio)
        left = (width - crop_width) // 2
        photo = photo.crop((left, 0, left + crop_width, height))
    pixels = np.asarray(photo.resize((WIDTH, HEIGHT), Image.LANCZOS), dtype=np.int16)
    grain = np.random.default_rng(GRAIN_SEED).normal(0, GRAIN_SIGMA, (HEIGHT, WIDTH, 1)).round()
    grainy = Image.fromarray((pixels + grain.astype(np.int16)).clip(0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    grainy.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def load_image(path: str | Path | None = None) -> bytes:
    """The image file: from a JPEG/PNG file, a .json payload, or (default) the generated one."""
    if path is None:
        default = default_image_path()
        if not default.exists():
            default.parent.mkdir(parents=True, exist_ok=True)
            staging = default.with_suffix(".tmp")
            staging.write_bytes(benchmark_jpeg())
            staging.rename(default)
        return default.read_bytes()
    data = Path(path).read_bytes()
    if Path(path).suffix.lower() == ".json":
        body = json.loads(data)
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise ValueError(f'{path}: expected a JSON object {{"image": "<base64>"}}')
        data = base64.b64decode(body["image"], validate=True)
    Image.open(io.BytesIO(data)).verify()  # fail here, not as 400s under load
    return data
