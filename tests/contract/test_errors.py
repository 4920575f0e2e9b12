"""POST /predict on bad input: always a 4xx with a body {"error": "..."}, never a 5xx."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from weather.contract import MAX_BODY_BYTES

from .images import NOT_AN_IMAGE, TOO_MANY_PIXELS, TRUNCATED_OR_CORRUPT, small_jpeg, small_png


def post(client: httpx.Client, body: bytes) -> httpx.Response:
    return client.post("/predict", content=body, headers={"Content-Type": "application/json"})


def image_body(data: bytes) -> bytes:
    return json.dumps({"image": base64.b64encode(data).decode("ascii")}).encode()


def check_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text[:300]}"
    assert response.headers["content-type"].startswith("application/json"), response.headers["content-type"]
    body = response.json()
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str), body
    assert body["error"].strip(), body
    assert "Traceback" not in body["error"]


NOT_JSON = {
    "empty": b"",
    "text": b"not json",
    "unterminated-object": b'{"image": "abc"',
    "single-quotes": b"{'image': 'abc'}",
    "trailing-comma": b'{"image": "abc",}',
    "invalid-utf8": b'{"image": "\xff\xfe"}',
    "deeply-nested": b"[" * 100_000,
}

NOT_AN_OBJECT = {
    "array": b"[]",
    "string": b'"image"',
    "number": b"42",
    "null": b"null",
    "array-of-object": b'[{"image": "aGVsbG8="}]',
}

IMAGE_MISSING_OR_NOT_A_STRING = {
    "empty-object": b"{}",
    "other-key": b'{"picture": "aGVsbG8="}',
    "wrong-case": b'{"Image": "aGVsbG8="}',
    "number": b'{"image": 42}',
    "null": b'{"image": null}',
    "boolean": b'{"image": true}',
    "array": b'{"image": ["aGVsbG8="]}',
    "object": b'{"image": {"data": "aGVsbG8="}}',
}


def _standard(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _url_safe_jpeg() -> str:
    encoded = _standard(small_jpeg())
    assert "+" in encoded or "/" in encoded  # so the URL-safe alphabet differs
    return encoded.replace("+", "-").replace("/", "_")


def _unpadded_png() -> str:
    encoded = _standard(small_png() + b"\x00")  # 1 more byte so the length is not a multiple of 3
    if not encoded.endswith("="):
        encoded = _standard(small_png() + b"\x00\x00")
    assert encoded.endswith("=")
    return encoded.rstrip("=")


BAD_BASE64 = {
    "punctuation": lambda: "this is not base64!",
    "url-safe-alphabet": _url_safe_jpeg,
    "missing-padding": _unpadded_png,
    "data-after-padding": lambda: "QQ==QQ==",
    "line-breaks": lambda: base64.encodebytes(small_png()).decode("ascii"),
    "non-ascii": lambda: _standard(small_png())[:-8] + "éééééééé",
    "lone-character": lambda: "Q",
}


@pytest.mark.parametrize("name", NOT_JSON)
def test_body_not_json(client, name):
    check_error(post(client, NOT_JSON[name]), 400)


@pytest.mark.parametrize("name", NOT_AN_OBJECT)
def test_body_not_an_object(client, name):
    check_error(post(client, NOT_AN_OBJECT[name]), 400)


@pytest.mark.parametrize("name", IMAGE_MISSING_OR_NOT_A_STRING)
def test_image_missing_or_not_a_string(client, name):
    check_error(post(client, IMAGE_MISSING_OR_NOT_A_STRING[name]), 400)


@pytest.mark.parametrize("name", BAD_BASE64)
def test_image_not_standard_base64(client, name):
    check_error(post(client, json.dumps({"image": BAD_BASE64[name]()}).encode()), 400)


@pytest.mark.parametrize("name", NOT_AN_IMAGE)
def test_not_a_jpeg_or_png(client, name):
    check_error(post(client, image_body(NOT_AN_IMAGE[name]())), 400)


@pytest.mark.parametrize("name", TRUNCATED_OR_CORRUPT)
def test_truncated_or_corrupt_image(client, name):
    check_error(post(client, image_body(TRUNCATED_OR_CORRUPT[name]())), 400)


@pytest.mark.parametrize("name", TOO_MANY_PIXELS)
def test_too_many_pixels(client, name):
    check_error(post(client, image_body(TOO_MANY_PIXELS[name]())), 400)


def test_body_over_limit_is_413(client):
    check_error(post(client, b" " * (MAX_BODY_BYTES + 1)), 413)


def test_body_far_over_limit_is_413(client):
    check_error(post(client, b'{"image": "' + b"A" * (3 * MAX_BODY_BYTES) + b'"}'), 413)


def test_chunked_body_over_limit_is_413(client):
    def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 2):
            yield b" " * (1 << 20)

    check_error(client.post("/predict", content=chunks(), headers={"Content-Type": "application/json"}), 413)


def test_still_serving_after_bad_input(client):
    response = post(client, image_body(small_png()))
    assert response.status_code == 200, response.text
