"""POST /predict on good images: the response shape and agreement with the PyTorch reference."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from weather.contract import MAX_BODY_BYTES, MAX_PIXELS, PROBABILITY_TOLERANCE

from .images import (
    IMAGE_CASES,
    MODE_CASES,
    PHOTO_CASES,
    SYNTHETIC_CASES,
    Reference,
    bilevel_png,
    check_against_reference,
    image_bytes,
    small_png,
)


def predict(client: httpx.Client, data: bytes) -> httpx.Response:
    body = json.dumps({"image": base64.b64encode(data).decode("ascii")})
    return client.post("/predict", content=body, headers={"Content-Type": "application/json"})


def check_case(client: httpx.Client, reference: Reference, name: str) -> None:
    data = image_bytes(name)
    response = predict(client, data)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    check_against_reference(response.json(), reference.probabilities(data), reference.labels)


@pytest.mark.parametrize("name", PHOTO_CASES)
def test_photo(client, reference, name):
    check_case(client, reference, name)


@pytest.mark.parametrize("name", SYNTHETIC_CASES)
def test_generated_image(client, reference, name):
    check_case(client, reference, name)


@pytest.mark.parametrize("name", MODE_CASES)
def test_mode_and_encoding(client, reference, name):
    check_case(client, reference, name)


def test_alpha_is_dropped_not_composited(client, reference):
    data = image_bytes("rgba-png")
    rgba = Image.open(io.BytesIO(data))
    on_white = Image.new("RGB", rgba.size, "white")
    on_white.paste(rgba, mask=rgba.getchannel("A"))
    composited = reference.probabilities(_png(on_white))
    dropped = reference.probabilities(data)
    assert np.abs(composited - dropped).max() > 2 * PROBABILITY_TOLERANCE, "the test image cannot tell the two apart"

    response = predict(client, data)
    assert response.status_code == 200, response.text
    check_against_reference(response.json(), dropped, reference.labels)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_concurrent_requests_get_their_own_answers(client, reference):
    names = list(SYNTHETIC_CASES)[:8]

    def ask(name: str) -> tuple[str, httpx.Response]:
        return name, predict(client, image_bytes(name))

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        results = list(pool.map(ask, names * 2))
    for name, response in results:
        assert response.status_code == 200, response.text
        check_against_reference(response.json(), reference.probabilities(image_bytes(name)), reference.labels)


def test_image_of_exactly_max_pixels_is_accepted(client):
    response = predict(client, bilevel_png(8000, MAX_PIXELS // 8000))
    assert response.status_code == 200, response.text


def test_body_of_exactly_max_bytes_is_accepted(client, reference):
    data = small_png()
    body = json.dumps({"image": base64.b64encode(data).decode("ascii")}).encode()
    body += b" " * (MAX_BODY_BYTES - len(body))  # JSON allows trailing whitespace
    assert len(body) == MAX_BODY_BYTES
    response = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    check_against_reference(response.json(), reference.probabilities(data), reference.labels)


def test_every_case_is_distinct():
    # Guards the suite itself: a builder returning the same bytes twice would hide a gap.
    digests = {name: hash(image_bytes(name)) for name in IMAGE_CASES}
    assert len(set(digests.values())) == len(digests)
