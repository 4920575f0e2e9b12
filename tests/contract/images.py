"""Test images (encoded files, built on first use) and the PyTorch reference for them."""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from weather import synthetic
from weather.contract import LABELS, PROBABILITY_TOLERANCE, SUM_TOLERANCE, TOP2_MARGIN
from weather.photos import photo_paths
from weather.registry import TORCH_MODEL


def encode(image: Image.Image, image_format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **params)
    return buffer.getvalue()


@functools.cache
def _photos() -> dict[str, Image.Image]:
    return {name: Image.open(path) for name, path in sorted(photo_paths().items())}


@functools.cache
def _synthetic() -> list[Image.Image]:
    return [image for image, _ in synthetic.generate_set(per_class=2, seed=2027)]


def _photo_file(name: str) -> bytes:
    return photo_paths()[name].read_bytes()


def _photo_resized(name: str, size: tuple[int, int], quality: int) -> bytes:
    return encode(_photos()[name].convert("RGB").resize(size, Image.BICUBIC), "JPEG", quality=quality)


def _synthetic_file(index: int) -> bytes:
    image = _synthetic()[index]
    return encode(image, "PNG") if index % 2 == 0 else encode(image, "JPEG", quality=90)


def _mode_source() -> Image.Image:
    return _synthetic()[LABELS.index("rainbow")]  # the most colourful scene


def _with_alpha(image: Image.Image) -> Image.Image:
    """RGBA with a ramp of alpha (0 at the left edge), so compositing would change the picture."""
    rgba = image.convert("RGBA")
    ramp = np.tile(np.linspace(0, 255, rgba.width, dtype=np.uint8), (rgba.height, 1))
    rgba.putalpha(Image.fromarray(ramp))
    return rgba


def _palette_with_transparency() -> bytes:
    image = _mode_source().quantize(colors=64)
    return encode(image, "PNG", transparency=0)


def _cmyk_jpeg() -> bytes:
    return encode(_mode_source().convert("CMYK"), "JPEG", quality=90)


# Name -> builder of the encoded file. Names are fixed at collection time, bytes built lazily.
PHOTO_CASES: dict[str, Callable[[], bytes]] = {
    f"photo-{name}": functools.partial(_photo_file, name) for name in sorted(photo_paths())
}
for _name in ("hubble", "coffee"):
    if _name in photo_paths():  # the benchmark's kind of payload: 1200x727 baseline JPEG, quality 75
        PHOTO_CASES[f"photo-{_name}-1200x727-q75"] = functools.partial(_photo_resized, _name, (1200, 727), 75)

SYNTHETIC_CASES: dict[str, Callable[[], bytes]] = {
    f"synthetic-{index:02d}-{LABELS[index % len(LABELS)]}-{'png' if index % 2 == 0 else 'jpeg'}": functools.partial(
        _synthetic_file, index
    )
    for index in range(2 * len(LABELS))
}

MODE_CASES: dict[str, Callable[[], bytes]] = {
    "grayscale-png": lambda: encode(_mode_source().convert("L"), "PNG"),
    "grayscale-jpeg": lambda: encode(_mode_source().convert("L"), "JPEG", quality=90),
    "grayscale-alpha-png": lambda: encode(_with_alpha(_mode_source()).convert("LA"), "PNG"),
    "bilevel-png": lambda: encode(_mode_source().convert("1"), "PNG"),
    "palette-png": lambda: encode(_mode_source().quantize(colors=64), "PNG"),
    "palette-transparency-png": _palette_with_transparency,
    "rgba-png": lambda: encode(_with_alpha(_mode_source()), "PNG"),
    "cmyk-jpeg": _cmyk_jpeg,
    "progressive-jpeg": lambda: encode(_mode_source(), "JPEG", quality=80, progressive=True),
    "subsampling-444-jpeg": lambda: encode(_mode_source(), "JPEG", quality=95, subsampling=0),
    "tiny-png": lambda: encode(_mode_source().resize((7, 5)), "PNG"),
    "tall-png": lambda: encode(_mode_source().resize((90, 1500)), "PNG"),
    "wide-jpeg": lambda: encode(_mode_source().resize((1500, 90)), "JPEG", quality=90),
}

IMAGE_CASES: dict[str, Callable[[], bytes]] = {**PHOTO_CASES, **SYNTHETIC_CASES, **MODE_CASES}


@functools.cache
def image_bytes(name: str) -> bytes:
    return IMAGE_CASES[name]()


# --- files that are not acceptable images ---------------------------------------------------


@functools.cache
def small_jpeg() -> bytes:
    return encode(_mode_source(), "JPEG", quality=85)


@functools.cache
def small_png() -> bytes:
    return encode(_mode_source(), "PNG")


def bilevel_png(width: int, height: int) -> bytes:
    """A blank 1-bit PNG: a few kilobytes whatever its size, many pixels once decoded."""
    return encode(Image.new("1", (width, height)), "PNG", optimize=True)


def png_with_header_size(width: int, height: int) -> bytes:
    """A small PNG whose IHDR claims another size (CRC fixed): only the header says it is huge."""
    data = bytearray(small_png())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def jpeg_segment(data: bytes, marker: int) -> int:
    """Offset of the first JPEG segment with this marker (walking the segments, not searching bytes)."""
    offset = 2  # after SOI
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            break
        if data[offset + 1] == marker:
            return offset
        offset += 2 + struct.unpack(">H", data[offset + 2 : offset + 4])[0]
    raise ValueError(f"no segment 0xFF{marker:02X}")


def jpeg_with_header_size(width: int, height: int) -> bytes:
    """A small baseline JPEG whose SOF0 claims another size (at most 65535 a side)."""
    data = bytearray(small_jpeg())
    sof = jpeg_segment(data, 0xC0)  # FF C0, length, precision, height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def corrupt_png() -> bytes:
    """A PNG whose compressed pixel data is garbage (chunk CRC recomputed, so only zlib fails)."""
    data = bytearray(small_png())
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4 : idat])[0]
    data[idat + 4 : idat + 4 + length] = bytes((i * 37 + 11) % 256 for i in range(length))
    data[idat + 4 + length : idat + 8 + length] = struct.pack(">I", zlib.crc32(bytes(data[idat : idat + 4 + length])))
    return bytes(data)


NOT_AN_IMAGE: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "text": lambda: b"hello, this is not an image",
    "gif": lambda: encode(_mode_source(), "GIF"),
    "bmp": lambda: encode(_mode_source(), "BMP"),
    "tiff": lambda: encode(_mode_source(), "TIFF"),
    "jpeg-magic-then-garbage": lambda: b"\xff\xd8\xff" + bytes(range(256)) * 4,
    "png-signature-only": lambda: small_png()[:8],
}

TRUNCATED_OR_CORRUPT: dict[str, Callable[[], bytes]] = {
    "jpeg-half": lambda: small_jpeg()[: len(small_jpeg()) // 2],
    "jpeg-header-only": lambda: small_jpeg()[: jpeg_segment(small_jpeg(), 0xDA)],
    "png-half": lambda: small_png()[: len(small_png()) // 2],
    "png-header-only": lambda: small_png()[: small_png().index(b"IDAT") - 4],
    "png-corrupt-data": corrupt_png,
}

TOO_MANY_PIXELS: dict[str, Callable[[], bytes]] = {
    # A real, decodable image one row over the limit: only a guard refuses it.
    "png-8000x5001": lambda: bilevel_png(8000, 5001),
    # Headers that claim gigapixels over tiny files: the guard must act before decoding.
    "png-header-100000x100000": lambda: png_with_header_size(100_000, 100_000),
    "jpeg-header-65000x65000": lambda: jpeg_with_header_size(65_000, 65_000),
}


# --- the reference ------------------------------------------------------------------------


class Reference:
    """The PyTorch reference pipeline on the store's ``weather-torch`` model (torch is imported here only)."""

    def __init__(self) -> None:
        import bentoml

        from weather.torch_model import load_model

        stored = bentoml.models.get(TORCH_MODEL.latest)
        self.labels = tuple(stored.info.metadata["labels"])
        self._model = load_model(stored.path_of(TORCH_MODEL.file))
        self._computed: dict[bytes, np.ndarray] = {}

    def probabilities(self, data: bytes) -> np.ndarray:
        if data not in self._computed:
            self._computed[data] = self._compute(data)
        return self._computed[data]

    def _compute(self, data: bytes) -> np.ndarray:
        import torch

        from weather.torch_model import reference_probabilities

        # One image at a time: one thread is as fast, and does not fight the server for the cores.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return reference_probabilities(self._model, [Image.open(io.BytesIO(data))])[0]
        finally:
            torch.set_num_threads(threads)


def check_against_reference(body: dict, reference: np.ndarray, labels: tuple[str, ...]) -> None:
    """Assert a 200 body is well-formed and agrees with the reference probabilities."""
    assert set(body) == {"prediction", "probability", "probabilities"}, body
    probabilities = body["probabilities"]
    assert set(probabilities) == set(labels), sorted(probabilities)
    assert all(isinstance(value, float) for value in probabilities.values()), probabilities
    served = np.array([probabilities[label] for label in labels])
    assert abs(served.sum() - 1.0) <= SUM_TOLERANCE, served.sum()
    assert body["prediction"] in labels
    assert body["probability"] == probabilities[body["prediction"]]
    assert body["probability"] == served.max(), "the prediction is not the most probable label"

    difference = np.abs(served - reference)
    worst = labels[int(difference.argmax())]
    assert difference.max() <= PROBABILITY_TOLERANCE, (
        f"{worst}: served {served[labels.index(worst)]:.4f}, reference {reference[labels.index(worst)]:.4f}"
    )
    second, first = np.sort(reference)[-2:]
    if first - second > TOP2_MARGIN:
        assert body["prediction"] == labels[int(reference.argmax())], (
            f"served {body['prediction']}, reference {labels[int(reference.argmax())]} (margin {first - second:.3f})"
        )
