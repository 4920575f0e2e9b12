"""Errors of the HTTP layer (docs/contract.md): the same status from all three services, with a
body {"error": ...} (but for the exceptions the contract lists, in policy.NO_JSON_BODY and
policy.MAY_RESET), and answered promptly: a malformed request is refused when it is seen, not
when a timeout passes."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from weather.contract import RAW_ROUTE

from . import rawhttp
from .policy import MAY_RESET, check_error, exception

PROMPT_S = 1.0  # the suite's header timeout is 1 s, its body timeout 3 s: an answer by then is not a timeout's
BODY = b"\xff\xd8\xff\xe0" + b"\x00" * 60


def post(*headers: tuple[str, str], body: bytes = BODY) -> bytes:
    return rawhttp.head("POST", RAW_ROUTE, [("Host", "127.0.0.1"), ("Content-Type", "image/jpeg"), *headers]) + body


def chunked(size_line: bytes) -> bytes:
    return post(("Transfer-Encoding", "chunked"), body=size_line + b"\r\n" + BODY + b"\r\n0\r\n\r\n")


# case -> (request bytes, status)
CASES = {
    "header-of-1-mib": (post(("X-Filler", "a" * (1 << 20)), ("Content-Length", str(len(BODY)))), 431),
    "request-line-malformed": (b"POST /predict/raw HTTP/1.1 extra\r\nHost: 127.0.0.1\r\n\r\n", 400),
    "request-line-garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", 400),
    "header-line-without-colon": (post(("Content-Length", str(len(BODY)))).replace(b"Host:", b"Host", 1), 400),
    "content-length-negative": (post(("Content-Length", "-1")), 400),
    "content-length-not-a-number": (post(("Content-Length", "abc")), 400),
    "content-length-2^80": (post(("Content-Length", str(2**80))), 400),
    "content-length-two-values": (
        post(("Content-Length", str(len(BODY))), ("Content-Length", str(len(BODY) + 1))),
        400,
    ),
    "chunk-size-not-hex": (chunked(b"zz"), 400),
    "chunk-size-2^80": (chunked(b"%x" % 2**80), 400),
}


@pytest.mark.parametrize("case", CASES)
def test_http_layer_error(service, target, case):
    data, status = CASES[case]
    with rawhttp.connect(service.port) as sock:
        # Written from another thread: a server may answer (and stop reading) before all of it is sent.
        sender = threading.Thread(target=_send_all, args=(sock, data), daemon=True)
        started = time.monotonic()
        sender.start()
        try:
            response = rawhttp.read_response(sock, timeout_s=service.policy.BODY_TIMEOUT_SECONDS + 5)
        except rawhttp.Failure as failure:
            if failure.kind == "reset" and exception(MAY_RESET, target, case):
                return  # the contract allows it here
            raise
        sender.join(10)
    check_error(response, status, target, case)
    took = response.received_at - started
    assert took < PROMPT_S, f"{status} after {took:.2f} s: not when the error was seen"


def _send_all(sock, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the server answered and closed: the answer is what the test reads
        sock.sendall(data)
