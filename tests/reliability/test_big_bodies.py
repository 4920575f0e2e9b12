"""A body over MAX_BODY_BYTES is answered 413 as soon as that is known, and the server reads and
discards up to DISCARD_BODY_BYTES more before closing, so a client that writes its whole body
before reading (a raw socket, Python's requests and urllib) reads the 413, not a broken pipe."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest
import requests

from weather.contract import RAW_ROUTE
from weather.endpoints import ENDPOINTS

from . import rawhttp
from .policy import check_error, refusal_deadline

BIG = 20_000_000  # bytes: over MAX_BODY_BYTES (16 MiB), within the discard allowance


def big_image(policy) -> bytes:
    assert policy.MAX_BODY_BYTES < BIG <= policy.MAX_BODY_BYTES + policy.DISCARD_BODY_BYTES
    return b"\xff\xd8\xff" + b"\x00" * (BIG - 3)


def as_response(status: int, headers, body: bytes) -> rawhttp.Response:
    return rawhttp.Response(status, {k.lower(): v for k, v in headers.items()}, body, time.monotonic())


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_whole_body_written_before_reading_gets_413(service, endpoint):
    request = ENDPOINTS[endpoint].request(big_image(service.policy))
    head = rawhttp.post_head(ENDPOINTS[endpoint].route, service.port, len(request.body), **request.headers)
    check_error(rawhttp.exchange(service.port, head + request.body, timeout_s=60), 413)


def test_whole_chunked_body_written_before_reading_gets_413(service):
    chunk = big_image(service.policy)[: 1 << 20]
    body = b"".join(b"%x\r\n%b\r\n" % (len(chunk), chunk) for _ in range(BIG // len(chunk))) + b"0\r\n\r\n"
    head = rawhttp.post_head(RAW_ROUTE, service.port, None, **{"Transfer-Encoding": "chunked"})
    check_error(rawhttp.exchange(service.port, head + body, timeout_s=60), 413)


def test_python_requests_reads_the_413(service):
    response = requests.post(
        service.base_url + RAW_ROUTE, data=big_image(service.policy), headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    check_error(as_response(response.status_code, response.headers, response.content), 413)


def test_python_urllib_reads_the_413(service):
    request = urllib.request.Request(
        service.base_url + RAW_ROUTE,
        data=big_image(service.policy),
        headers={"Content-Type": "image/jpeg"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    error = raised.value
    check_error(as_response(error.code, error.headers, error.read()), 413)


def test_declared_size_is_answered_before_the_body(service, target):
    """Content-Length over the limit: 413 at the headers, with no byte of the body sent."""
    with rawhttp.connect(service.port) as sock:
        sent = time.monotonic()
        sock.sendall(rawhttp.post_head(RAW_ROUTE, service.port, BIG))
        response = rawhttp.read_response(sock, timeout_s=service.policy.BODY_TIMEOUT_SECONDS + 5)
    check_error(response, 413)
    deadline = refusal_deadline(service.policy, target, "declared-413")
    assert response.received_at - sent < deadline, "the 413 waited for the body"
