"""The services' shared pure functions: request parsing, decoding, cropping, the response."""

from __future__ import annotations

import base64
import copy
import io
import json
import zlib

import numpy as np
import pytest
from bentoml.exceptions import InvalidArgument
from PIL import Image

from bentos import common, imaging
from weather import contract


def _encode(image: Image.Image, image_format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **params)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


# --- request body -------------------------------------------------------------------------


def test_image_bytes_decodes_standard_base64():
    assert common.image_bytes(base64.b64encode(b"\xfb\xff\x00").decode()) == b"\xfb\xff\x00"


# The JSON around it (not JSON, not an object, no string) is BentoML's to parse and
# bentos.http's to report: tests/test_bentos_http.py and the contract suite.
@pytest.mark.parametrize("encoded", ["a-_b", "aGk", "aGk=\n", "aGk=aGk=", "éééé", " aGk="])
def test_image_bytes_rejects_anything_but_standard_base64(encoded):
    with pytest.raises(InvalidArgument, match="not valid standard base64") as caught:
        common.image_bytes(encoded)
    assert caught.value.error_code == 400


def test_prediction_body():
    labels = ("a", "b", "c")
    body = common.prediction(labels, np.array([0.2, 0.7, 0.1], dtype=np.float32))
    assert body.prediction == "b"
    assert body.probability == body.probabilities["b"]
    assert list(body.probabilities) == list(labels)
    assert all(type(value) is float for value in body.probabilities.values())
    json.loads(body.model_dump_json())  # plain JSON types only


# --- decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "1", "I;16"])
def test_png_modes_become_rgb_like_the_reference(mode):
    data = _encode(_noise(40, 30).convert(mode), "PNG")
    decoded = imaging.decode_rgb(data)
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_modes_become_rgb_like_the_reference(mode):
    data = _encode(_noise(40, 30).convert(mode), "JPEG", quality=90)
    decoded = imaging.decode_rgb(data)
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_rgba_alpha_is_dropped():
    rgba = Image.new("RGBA", (8, 8), (200, 10, 30, 0))
    assert imaging.decode_rgb(_encode(rgba, "PNG")).getpixel((0, 0)) == (200, 10, 30)


@pytest.mark.parametrize("image_format", ["GIF", "BMP", "TIFF", "WEBP"])
def test_other_formats_are_refused(image_format):
    with pytest.raises(imaging.ImageError, match="not a JPEG or PNG"):
        imaging.decode_rgb(_encode(_noise(16, 16), image_format))


@pytest.mark.parametrize("data", [b"", b"hello", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0"])
def test_garbage_is_refused(data):
    with pytest.raises(imaging.ImageError):
        imaging.decode_rgb(data)


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_truncated_images_are_refused(image_format):
    data = _encode(_noise(64, 64), image_format)
    with pytest.raises(imaging.ImageError, match="truncated or corrupt"):
        imaging.decode_rgb(data[: len(data) * 2 // 3])


def test_pixel_limit():
    data = _encode(Image.new("1", (1000, 1000)), "PNG")
    assert imaging.decode_rgb(data, max_pixels=1_000_000).size == (1000, 1000)
    with pytest.raises(imaging.ImageError, match="more than 999999"):
        imaging.decode_rgb(data, max_pixels=999_999)


def test_pixel_limit_refuses_a_header_alone():
    # Only the first 100 bytes: decoding would fail as truncated; the guard answers first.
    data = _encode(Image.new("1", (1000, 1001)), "PNG")[:100]
    with pytest.raises(imaging.ImageError, match="pixels, more than 1000000"):
        imaging.decode_rgb(data, max_pixels=1_000_000)


def test_pillow_bomb_error_is_mapped():
    # A header claiming 4e10 pixels trips Pillow's own guard inside Image.open.
    data = bytearray(_encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = (200_000).to_bytes(4, "big") + (200_000).to_bytes(4, "big")
    data[ihdr + 17 : ihdr + 21] = zlib.crc32(bytes(data[ihdr : ihdr + 17])).to_bytes(4, "big")
    with pytest.raises(imaging.ImageError, match="pixels"):
        imaging.decode_rgb(bytes(data))


# --- resize and crop ----------------------------------------------------------------------

SIZES = [
    (224, 224),
    (256, 256),
    (225, 300),
    (300, 225),
    (640, 427),
    (1200, 727),
    (727, 1200),
    (1411, 1411),
    (31, 17),
    (1, 1),
    (3, 900),
    (2001, 240),
]


@pytest.mark.parametrize("size", SIZES)
def test_exact_crop_is_the_reference_bit_for_bit(size):
    image = _noise(*size, seed=sum(size))
    assert np.array_equal(np.asarray(imaging.center_crop(image, exact=True)), contract.prepare_pixels(image))


@pytest.mark.parametrize("size", SIZES)
def test_window_crop_is_within_one_level(size):
    image = _noise(*size, seed=sum(size))
    window = np.asarray(imaging.center_crop(image)).astype(int)
    assert window.shape == (224, 224, 3)
    assert np.abs(window - contract.prepare_pixels(image)).max() <= 1


def test_window_crop_handles_extreme_aspect_ratios():
    image = Image.new("RGB", (1, 30_000), (10, 20, 30))  # resized would be 256 x 7,680,000
    assert np.asarray(imaging.center_crop(image, exact=True)).shape == (224, 224, 3)


# --- the model's input contract -------------------------------------------------------------


def test_input_contract_of_this_code_is_accepted():
    imaging.check_input_contract(copy.deepcopy(contract.INPUT_CONTRACT))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("version",), 2),
        (("input", "dtype"), "float32"),
        (("input", "layout"), "NCHW"),
        (("input", "shape"), ["batch", 3, 224, 224]),
        (("before_graph", "resize", "shorter_side"), 232),
        (("before_graph", "resize", "filter"), "bicubic"),
        (("before_graph", "center_crop", "height"), 256),
    ],
)
def test_other_input_contracts_are_refused(path, value):
    changed = copy.deepcopy(contract.INPUT_CONTRACT)
    target = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValueError, match="not the one this service implements"):
        imaging.check_input_contract(changed)


def test_malformed_input_contract_is_refused():
    with pytest.raises(ValueError, match="malformed"):
        imaging.check_input_contract({"version": 1})
