"""Slow and stalled clients (docs/contract.md, "Under load, slow clients"): headers within
HEADER_TIMEOUT_SECONDS, a body within BODY_TIMEOUT_SECONDS of its headers, else 408; bodies
still arriving hold at most MAX_PENDING_BODY_BYTES, beyond which a request gets 503 at once."""

from __future__ import annotations

import contextlib
import select
import time

import pytest

from weather.contract import RAW_ROUTE

from . import rawhttp
from .observe import wait_idle
from .policy import NOT_REQUIRED, check_busy, check_error, exception

SLACK_S = 2.0  # how late after its timeout a 408 may come, on a shared machine
EARLY_S = 0.5  # how early: actix checks its header timer coarsely and fires up to ~0.4 s early
DECLARED = 1000  # bytes of body a slow request promises


def expect_408_in(sock, timeout_s: float, since: float, target: str | None = None, case: str | None = None) -> float:
    """Reads the 408 and returns how long after ``since`` it came."""
    response = rawhttp.read_response(sock, timeout_s=timeout_s + SLACK_S + 5)
    check_error(response, 408, target, case)
    return response.received_at - since


def test_headers_one_byte_a_second_get_408(service, target):
    timeout_s = service.policy.HEADER_TIMEOUT_SECONDS
    request = rawhttp.post_head(RAW_ROUTE, service.port, DECLARED) + b"\xff" * DECLARED
    with rawhttp.connect(service.port) as sock:
        opened = time.monotonic()
        trickle = rawhttp.Trickle(sock, request, interval_s=1.0)
        trickle.start()
        try:
            after = expect_408_in(sock, timeout_s, since=opened, target=target, case="slow-headers")
        finally:
            trickle.stop()
    assert timeout_s - EARLY_S <= after <= timeout_s + SLACK_S, f"408 after {after:.2f} s, timeout {timeout_s} s"


def test_slow_headers_on_a_keep_alive_connection_get_408(service, target):
    """The header timeout restarts with each request on a kept-alive connection: from the previous
    response, once the client has started sending."""
    why_not = exception(NOT_REQUIRED, target, "slow-headers-keep-alive")
    if why_not:
        pytest.skip(why_not)
    timeout_s = service.policy.HEADER_TIMEOUT_SECONDS
    with rawhttp.connect(service.port) as sock:
        sock.sendall(rawhttp.head("GET", "/livez", port=service.port))
        first = rawhttp.read_response(sock, timeout_s=10)
        assert first.status == 200
        assert not first.closes(), "GET /livez closed the connection: nothing to keep alive"
        trickle = rawhttp.Trickle(sock, rawhttp.head("GET", "/livez", port=service.port), interval_s=1.0)
        trickle.start()
        try:
            after = expect_408_in(sock, timeout_s, since=first.received_at)
        finally:
            trickle.stop()
    assert timeout_s - EARLY_S <= after <= timeout_s + SLACK_S, f"408 after {after:.2f} s, timeout {timeout_s} s"


@pytest.mark.parametrize("pace", ["one-byte-a-second", "stalled"])
def test_slow_body_gets_408(service, pace):
    timeout_s = service.policy.BODY_TIMEOUT_SECONDS
    with rawhttp.connect(service.port) as sock:
        sock.sendall(rawhttp.post_head(RAW_ROUTE, service.port, DECLARED) + b"\xff\xd8\xff")
        headers_sent = time.monotonic()
        trickle = rawhttp.Trickle(sock, b"\x00" * (DECLARED - 3), interval_s=1.0 if pace != "stalled" else 3600)
        if pace != "stalled":
            trickle.start()
        try:
            after = expect_408_in(sock, timeout_s, since=headers_sent)
        finally:
            if pace != "stalled":
                trickle.stop()
    assert timeout_s - EARLY_S <= after <= timeout_s + SLACK_S, f"408 after {after:.2f} s, timeout {timeout_s} s"


@contextlib.contextmanager
def stalled_uploads(port: int, declared: int, count: int):
    """``count`` connections that sent their headers (Content-Length ``declared``) and 1 KiB of body, then stall."""
    socks = []
    try:
        for _ in range(count):
            sock = rawhttp.connect(port)
            socks.append(sock)
            sock.sendall(rawhttp.post_head(RAW_ROUTE, port, declared) + b"\xff\xd8\xff" + b"\x00" * 1021)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def pending_plan(service) -> tuple[int, int]:
    """(bytes each stalled upload declares, how many fit under MAX_PENDING_BODY_BYTES)."""
    policy = service.policy
    declared = policy.MAX_PENDING_BODY_BYTES * 3 // 8
    held = policy.MAX_PENDING_BODY_BYTES // declared
    assert declared <= policy.MAX_BODY_BYTES, "the stalled uploads must not be refused for their size"
    assert held + 2 <= policy.QUEUE_CAPACITY, "the queue must have room: only the pending bytes may refuse"
    return declared, held


def still_waiting(sock) -> bool:
    """Nothing came back on this connection yet: no response, no close."""
    return not select.select([sock], [], [], 0)[0]


def test_pending_bodies_are_bounded_at_the_headers(service, target):
    """Stalled uploads fill MAX_PENDING_BODY_BYTES with their declared lengths; the next ones get
    503 (JSON, Retry-After) as soon as their headers arrive, long before any body timeout."""
    if why_not := exception(NOT_REQUIRED, target, "pending-bound"):
        pytest.skip(why_not)
    declared, held = pending_plan(service)
    wait_idle(service.port)
    with stalled_uploads(service.port, declared, held) as waiting:
        time.sleep(0.3)
        assert all(still_waiting(sock) for sock in waiting), "an upload within the bound was answered or dropped"
        for _ in range(2):
            sent = time.monotonic()
            with stalled_uploads(service.port, declared, 1) as (over,):
                response = rawhttp.read_response(over, timeout_s=service.policy.BODY_TIMEOUT_SECONDS + SLACK_S)
            check_busy(response, service.policy)
            after = response.received_at - sent
            assert after < 1.0, f"the 503 came {after:.2f} s after the headers, not at once"


def test_a_chunked_body_that_outgrows_the_pending_bound_gets_503(service, target):
    """With the bound nearly full of stalled uploads, a chunked upload that grows past it gets 503
    then (before its body is complete), and the stalled ones are left waiting."""
    if why_not := exception(NOT_REQUIRED, target, "chunked-over-bound"):
        pytest.skip(why_not)
    declared, held = pending_plan(service)
    room = service.policy.MAX_PENDING_BODY_BYTES - held * declared
    wait_idle(service.port)
    with stalled_uploads(service.port, declared, held) as waiting, rawhttp.connect(service.port) as sock:
        headers = rawhttp.post_head(RAW_ROUTE, service.port, None, **{"Transfer-Encoding": "chunked"})
        chunk = b"\xff\xd8\xff" + b"\x00" * (64 * 1024 - 3)
        sock.sendall(headers)
        for _ in range(room // len(chunk) + 2):  # past the bound; the last chunk is never sent
            sock.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        sent = time.monotonic()
        response = rawhttp.read_response(sock, timeout_s=service.policy.BODY_TIMEOUT_SECONDS + SLACK_S)
        check_busy(response, service.policy)
        assert response.received_at - sent < 1.0, "the 503 waited for a timeout"
        assert all(still_waiting(other) for other in waiting), "an upload within the bound was answered or dropped"
