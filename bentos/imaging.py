"""Image bytes to the model's input: decode, check, convert to RGB, resize, center-crop.

Shared by both services and torch-free (the ONNX service imports it). Every way the
bytes can be wrong raises ``ImageError``, whose message is meant for the client.
The geometry is ``weather.contract``'s; a model's ``input_contract`` metadata is
checked against it when the model is loaded.
"""

from __future__ import annotations

import io

from PIL import Image

from bentos import settings
from weather import contract
from weather.errors import first_line

FORMATS = ("JPEG", "PNG")
# How every file of those formats begins: enough to refuse anything else unparsed.
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
NOT_AN_IMAGE = "the bytes are not a JPEG or PNG image"


class ImageError(ValueError):
    """The bytes are not an image the service accepts; the message says why."""


def decode_rgb(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode a JPEG or PNG into an RGB image, refusing oversized ones from the header.

    ``max_pixels`` defaults to MAX_PIXELS, the contract's decompression-bomb guard.
    """
    max_pixels = settings.MAX_PIXELS if max_pixels is None else max_pixels
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:  # Pillow's own, looser guard can fire in open()
        raise ImageError(f"the image has more than {max_pixels} pixels") from None
    except Exception:  # UnidentifiedImageError, or whatever a broken header makes a plugin raise
        raise ImageError(NOT_AN_IMAGE) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"the image has {width}x{height} = {width * height} pixels, more than {max_pixels}")
    try:
        image.load()
    except Exception as exc:  # OSError (truncated), SyntaxError (broken PNG chunk), ValueError, ...
        raise ImageError(f"the image is truncated or corrupt ({first_line(exc)})") from None
    if image.mode == "RGB":
        return image
    try:
        # As the reference does: palette looked up, alpha dropped (not composited), CMYK converted.
        return image.convert("RGB")
    except Exception as exc:
        raise ImageError(f"cannot convert an image of mode {image.mode} to RGB ({first_line(exc)})") from None


def center_crop(image: Image.Image, exact: bool = False) -> Image.Image:
    """The model's 224x224 RGB input: shorter side to 256 (Pillow bilinear, antialiased),
    then the center crop, with torchvision's sizes and rounding (``weather.contract``).

    By default only the cropped window is resampled (``resize(box=...)``): the same
    filter at the same positions for about half the work of resizing the whole image.
    Pillow passes the box as float32, so a pixel can differ by one level from
    resize-then-crop. ``exact=True`` resizes, then crops: bit for bit what torchvision
    does, except for aspect ratios so extreme that the resized image would exceed
    MAX_PIXELS, where it falls back to the window.
    """
    width, height = image.size
    resized_width, resized_height = contract.resized_size(width, height)
    left, top, right, bottom = contract.center_crop_box(resized_width, resized_height)
    if exact and resized_width * resized_height <= settings.MAX_PIXELS:
        return image.resize((resized_width, resized_height), Image.BILINEAR).crop((left, top, right, bottom))
    scale_x, scale_y = width / resized_width, height / resized_height
    box = (left * scale_x, top * scale_y, min(right * scale_x, width), min(bottom * scale_y, height))
    return image.resize((contract.CROP_SIZE, contract.CROP_SIZE), Image.BILINEAR, box=box)


def check_input_contract(metadata: dict) -> None:
    """Raise ValueError unless a model's ``input_contract`` metadata asks for what this code does."""
    try:
        model_input = metadata["input"]
        resize = metadata["before_graph"]["resize"]
        crop = metadata["before_graph"]["center_crop"]
        found = {
            "version": metadata["version"],
            "input dtype": model_input["dtype"],
            "input layout": model_input["layout"],
            "input color": model_input["color"],
            "input shape": list(model_input["shape"][1:]),
            "resize shorter side": resize["shorter_side"],
            "resize filter": resize["filter"],
            "resize antialias": resize["antialias"],
            "crop": [crop["height"], crop["width"]],
        }
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"malformed input_contract in the model metadata ({type(exc).__name__}: {exc})") from None
    expected = {
        "version": contract.INPUT_CONTRACT["version"],
        "input dtype": "uint8",
        "input layout": "NHWC",
        "input color": "RGB",
        "input shape": [contract.CROP_SIZE, contract.CROP_SIZE, 3],
        "resize shorter side": contract.RESIZE_SHORTER_SIDE,
        "resize filter": "bilinear",
        "resize antialias": True,
        "crop": [contract.CROP_SIZE, contract.CROP_SIZE],
    }
    wrong = [f"{key} is {found[key]!r}, expected {value!r}" for key, value in expected.items() if found[key] != value]
    if wrong:
        raise ValueError("the model's input_contract is not the one this service implements: " + "; ".join(wrong))
