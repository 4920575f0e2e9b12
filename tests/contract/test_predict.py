"""Good images through every endpoint: the response shape, agreement with the PyTorch reference,
and the same answer whichever way the image travels."""

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
from weather.endpoints import ENDPOINTS, Endpoint, multipart

from .http import send
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


def check_case(client: httpx.Client, endpoint: Endpoint, reference: Reference, name: str) -> None:
    data = image_bytes(name)
    response = send(client, endpoint, data)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    check_against_reference(response.json(), reference.probabilities(data), reference.labels)


@pytest.mark.parametrize("name", PHOTO_CASES)
def test_photo(client, endpoint, reference, name):
    check_case(client, endpoint, reference, name)


@pytest.mark.parametrize("name", SYNTHETIC_CASES)
def test_generated_image(client, endpoint, reference, name):
    check_case(client, endpoint, reference, name)


@pytest.mark.parametrize("name", MODE_CASES)
def test_mode_and_encoding(client, endpoint, reference, name):
    check_case(client, endpoint, reference, name)


def test_alpha_is_dropped_not_composited(client, endpoint, reference):
    data = image_bytes("rgba-png")
    rgba = Image.open(io.BytesIO(data))
    on_white = Image.new("RGB", rgba.size, "white")
    on_white.paste(rgba, mask=rgba.getchannel("A"))
    composited = reference.probabilities(_png(on_white))
    dropped = reference.probabilities(data)
    assert np.abs(composited - dropped).max() > 2 * PROBABILITY_TOLERANCE, "the test image cannot tell the two apart"

    response = send(client, endpoint, data)
    assert response.status_code == 200, response.text
    check_against_reference(response.json(), dropped, reference.labels)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_concurrent_requests_get_their_own_answers(client, reference):
    names = list(SYNTHETIC_CASES)[:8]
    asks = [(name, endpoint) for name, endpoint in zip(names * 3, list(ENDPOINTS.values()) * 8, strict=True)]

    def ask(name_and_endpoint: tuple[str, Endpoint]) -> tuple[str, httpx.Response]:
        name, endpoint = name_and_endpoint
        return name, send(client, endpoint, image_bytes(name))

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        results = list(pool.map(ask, asks))
    for name, response in results:
        assert response.status_code == 200, response.text
        check_against_reference(response.json(), reference.probabilities(image_bytes(name)), reference.labels)


def test_image_of_exactly_max_pixels_is_accepted(client, endpoint):
    response = send(client, endpoint, bilevel_png(8000, MAX_PIXELS // 8000))
    assert response.status_code == 200, response.text


def test_body_of_exactly_max_bytes_is_accepted(client, reference):
    data = small_png()
    body = json.dumps({"image": base64.b64encode(data).decode("ascii")}).encode()
    body += b" " * (MAX_BODY_BYTES - len(body))  # JSON allows trailing whitespace
    assert len(body) == MAX_BODY_BYTES
    response = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    check_against_reference(response.json(), reference.probabilities(data), reference.labels)


@pytest.mark.parametrize("name", PHOTO_CASES)
def test_every_endpoint_gives_the_same_response(client, name):
    data = image_bytes(name)
    bodies = {key: send(client, endpoint, data) for key, endpoint in ENDPOINTS.items()}
    assert all(response.status_code == 200 for response in bodies.values()), bodies
    assert len({json.dumps(response.json(), sort_keys=True) for response in bodies.values()}) == 1, bodies


@pytest.mark.parametrize("content_type", ["image/jpeg", "image/png", "IMAGE/JPEG; q=1", "application/octet-stream"])
def test_raw_body_takes_each_content_type_whatever_the_format(client, content_type):
    response = client.post(ENDPOINTS["raw"].route, content=small_png(), headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text


def test_upload_takes_any_file_name_and_part_type(client, reference):
    data = image_bytes(next(iter(PHOTO_CASES)))
    request = multipart([("image", "photo.unknown-extension", data)])
    body = request.body.replace(b"application/octet-stream", b"text/plain", 1)
    response = client.post(ENDPOINTS["upload"].route, content=body, headers=dict(request.headers))
    assert response.status_code == 200, response.text
    check_against_reference(response.json(), reference.probabilities(data), reference.labels)


def test_every_case_is_distinct():
    # Guards the suite itself: a builder returning the same bytes twice would hide a gap.
    digests = {name: hash(image_bytes(name)) for name in IMAGE_CASES}
    assert len(set(digests.values())) == len(digests)
