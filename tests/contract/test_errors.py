"""Bad input on every endpoint: always a 4xx with a body {"error": "..."}, never a 5xx."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from weather.contract import MAX_BODY_BYTES, PREDICT_ROUTE, RAW_ROUTE, UPLOAD_ROUTE
from weather.endpoints import json_request, multipart

from .http import check_error, send
from .images import NOT_AN_IMAGE, TOO_MANY_PIXELS, TRUNCATED_OR_CORRUPT, small_jpeg, small_png


def post(client: httpx.Client, body: bytes) -> httpx.Response:
    return client.post(PREDICT_ROUTE, content=body, headers={"Content-Type": "application/json"})


def image_body(data: bytes) -> bytes:
    return json_request(data).body


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
def test_not_a_jpeg_or_png(client, endpoint, name):
    check_error(send(client, endpoint, NOT_AN_IMAGE[name]()), 400)


@pytest.mark.parametrize("name", TRUNCATED_OR_CORRUPT)
def test_truncated_or_corrupt_image(client, endpoint, name):
    check_error(send(client, endpoint, TRUNCATED_OR_CORRUPT[name]()), 400)


@pytest.mark.parametrize("name", TOO_MANY_PIXELS)
def test_too_many_pixels(client, endpoint, name):
    check_error(send(client, endpoint, TOO_MANY_PIXELS[name]()), 400)


def test_body_over_limit_is_413(client, endpoint):
    check_error(client.post(endpoint.route, content=b" " * (MAX_BODY_BYTES + 1), headers=_headers(endpoint)), 413)


def test_body_far_over_limit_is_413(client, endpoint):
    check_error(send(client, endpoint, b"\xff\xd8\xff" + b"A" * (3 * MAX_BODY_BYTES)), 413)


def test_chunked_body_over_limit_is_413(client, endpoint):
    def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 2):
            yield b" " * (1 << 20)

    check_error(client.post(endpoint.route, content=chunks(), headers=_headers(endpoint)), 413)


def _headers(endpoint) -> dict[str, str]:
    return dict(endpoint.request(b"").headers)


# Upload: one file part named "image", nothing else. A URL in a text field is never fetched.
BAD_UPLOADS = {
    "no-parts": lambda: multipart([]),
    "other-name": lambda: multipart([("picture", "photo.jpg", small_jpeg())]),
    "text-field": lambda: multipart([("image", None, small_jpeg())]),
    "url-in-text-field": lambda: multipart([("image", None, b"http://127.0.0.1:9/photo.jpg")]),
    "two-images": lambda: multipart([("image", "a.jpg", small_jpeg()), ("image", "b.png", small_png())]),
    "extra-text-field": lambda: multipart([("image", "a.jpg", small_jpeg()), ("note", None, b"hello")]),
    "extra-binary-file": lambda: multipart([("image", "a.jpg", small_jpeg()), ("other", "b.bin", b"\xff\xfe\x00")]),
}


@pytest.mark.parametrize("name", BAD_UPLOADS)
def test_upload_must_be_one_image_file_part(client, name):
    request = BAD_UPLOADS[name]()
    check_error(client.post(UPLOAD_ROUTE, content=request.body, headers=dict(request.headers)), 400)


def test_upload_that_is_not_multipart_is_415(client):
    for content_type in ["application/json", "image/jpeg", "text/plain", ""]:
        response = client.post(UPLOAD_ROUTE, content=small_jpeg(), headers={"Content-Type": content_type})
        check_error(response, 415)


MALFORMED_MULTIPART = {
    "no-boundary": ("multipart/form-data", lambda: multipart([("image", "a.jpg", small_jpeg())]).body),
    "wrong-boundary": (
        "multipart/form-data; boundary=not-the-one",
        lambda: multipart([("image", "a.jpg", small_jpeg())]).body,
    ),
    "not-multipart-at-all": ("multipart/form-data; boundary=xyz", lambda: b"just some text"),
    "no-closing-boundary": (
        "multipart/form-data; boundary=xyz",
        lambda: b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\n' + small_jpeg(),
    ),
    "empty": ("multipart/form-data; boundary=xyz", lambda: b""),
}


@pytest.mark.parametrize("name", MALFORMED_MULTIPART)
def test_malformed_multipart_is_400(client, name):
    content_type, body = MALFORMED_MULTIPART[name]
    check_error(client.post(UPLOAD_ROUTE, content=body(), headers={"Content-Type": content_type}), 400)


@pytest.mark.parametrize(
    "content_type", ["", "text/plain", "application/json", "multipart/form-data; boundary=x", "image"]
)
def test_raw_body_with_another_content_type_is_415(client, content_type):
    check_error(client.post(RAW_ROUTE, content=small_jpeg(), headers={"Content-Type": content_type}), 415)


def test_raw_body_that_reads_as_a_url_is_not_fetched(client):
    response = client.post(RAW_ROUTE, content=b"http://127.0.0.1:9/photo.jpg", headers={"Content-Type": "image/jpeg"})
    check_error(response, 400)


@pytest.mark.parametrize("route", [PREDICT_ROUTE, UPLOAD_ROUTE, RAW_ROUTE])
def test_wrong_method_is_405(client, route):
    check_error(client.get(route), 405)


def test_unknown_path_is_404(client):
    check_error(client.post("/predict/elsewhere", content=small_jpeg()), 404)


def test_still_serving_after_bad_input(client, endpoint):
    response = send(client, endpoint, small_png())
    assert response.status_code == 200, response.text
