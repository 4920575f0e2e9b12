"""Graceful shutdown (docs/contract.md): on SIGTERM, /readyz answers 503, the requests already
received complete (responses carry ``Connection: close``), idle keep-alive connections are
closed (never reset), new connections are refused, and the process exits once idle, within
GRACEFUL_TIMEOUT_SECONDS.

The service is the test's own: it is stopped. SIGTERM goes to the service's main process only,
as Kubernetes and Docker send it (for a bento, the ``bentoml serve`` process)."""

from __future__ import annotations

import math
import signal
import threading
import time

import pytest

from . import rawhttp
from .control import send_signal, wait_exit
from .policy import prediction_problem

MIN_CLIENTS = 16  # requests in flight at the signal: at least this many, more if they are cheap
IDLE_CONNECTIONS = 3
SETTLE_S = 0.5  # after the signal, by when the service has acted on it
EXIT_MARGIN_S = 1.0  # beyond GRACEFUL_TIMEOUT_SECONDS
IDLE_EXIT_S = 5.0  # "exits once idle": at most this long after its last response
MIN_DRAIN_S = 2.0  # the requests in flight keep the worker busy this long after the signal, if they can
SHORTEST_DRAIN_S = 2 * SETTLE_S  # and at least this long


def cost_of(port: int, data: bytes) -> float:
    started = time.monotonic()
    response = rawhttp.exchange(port, data, timeout_s=60)
    assert response.status == 200, f"{response.status}: {response.body[:200]!r}"
    return response.received_at - started


def test_sigterm_under_load(own_service, photo, medium, heavy, target):
    service, policy, port = own_service, own_service.policy, own_service.port
    behind_proxy = target.startswith("docker-")  # docker-proxy accepts connections on the container's behalf
    # The cheapest image whose requests, as many as the worker holds at most, keep it busy
    # long enough to watch it stop; else the one that keeps it busy longest (on a fast
    # machine the medium image's are too cheap to fill that time, the heavy one's too large
    # for enough of them to be in flight at once).
    chosen = None
    for image in (photo, medium, heavy):
        data = rawhttp.raw_post(port, image)
        cost_s = min(cost_of(port, data) for _ in range(2))
        # All in flight at once: places for each, and their bodies within the pending bound.
        most = min(policy.QUEUE_CAPACITY, policy.MAX_PENDING_BODY_BYTES // len(data))
        clients = min(max(MIN_CLIENTS, math.ceil(MIN_DRAIN_S / cost_s)), most)
        if clients >= MIN_CLIENTS and (chosen is None or clients * cost_s > chosen[0] * chosen[1]):
            chosen = clients, cost_s, data
        if chosen is not None and chosen[0] * chosen[1] >= MIN_DRAIN_S:
            break
    if chosen is None:
        pytest.fail(f"no image lets {MIN_CLIENTS} requests be in flight at once")
    clients, cost_s, data = chosen
    drain_s = clients * cost_s
    if drain_s < SHORTEST_DRAIN_S or drain_s >= policy.GRACEFUL_TIMEOUT_SECONDS - IDLE_EXIT_S:
        pytest.fail(
            f"{clients} requests of {cost_s:.2f} s take {drain_s:.1f} s: no time to watch, or no time to finish"
        )

    idle = []
    for _ in range(IDLE_CONNECTIONS + 1):
        sock = rawhttp.connect(port)
        sock.sendall(rawhttp.head("GET", "/livez", port=port))
        response = rawhttp.read_response(sock, timeout_s=10)
        assert response.status == 200, response.status
        assert not response.closes(), "GET /livez did not keep the connection alive"
        idle.append(sock)
    readyz_connection = idle.pop()

    outcomes = [rawhttp.Outcome("raw", 0.0) for _ in range(clients)]
    all_sent = threading.Barrier(clients + 1)

    def client(outcome: rawhttp.Outcome) -> None:
        try:
            with rawhttp.connect(port) as sock:
                sock.sendall(data)
                outcome.sent_at = time.monotonic()
                all_sent.wait(30)
                outcome.response = rawhttp.read_response(sock, timeout_s=policy.GRACEFUL_TIMEOUT_SECONDS + 30)
        except (OSError, rawhttp.Failure, threading.BrokenBarrierError) as exc:
            outcome.failure = rawhttp.failure(exc)
            all_sent.abort()  # not all in flight: no signal

    threads = [threading.Thread(target=client, args=(outcome,), daemon=True) for outcome in outcomes]
    for thread in threads:
        thread.start()
    try:
        all_sent.wait(30)
    except threading.BrokenBarrierError:
        pytest.fail(f"could not put {clients} requests in flight: {[str(o.failure) for o in outcomes if o.failure]}")
    time.sleep(0.2)  # every request has been received
    signalled = time.monotonic()
    send_signal(service.running, signal.SIGTERM)

    # While it drains: new connections, and /readyz on a connection kept alive from before.
    attempts: list[tuple[float, str]] = []
    done = threading.Event()

    def connect_repeatedly() -> None:
        while not done.is_set():
            at = time.monotonic()
            try:
                with rawhttp.connect(port, timeout_s=2) as sock:
                    sock.sendall(rawhttp.head("GET", "/readyz", port=port))
                    answer = rawhttp.read_response(sock, timeout_s=2)
                    attempts.append((at, f"accepted, answered {answer.status}"))
            except rawhttp.Failure as failure:
                attempts.append((at, "refused" if failure.kind == "refused" else f"accepted, then {failure.kind}"))
            except OSError as exc:
                attempts.append((at, f"accepted, then {rawhttp.failure(exc).kind}"))
            done.wait(0.1)

    time.sleep(SETTLE_S)
    prober = threading.Thread(target=connect_repeatedly, daemon=True)
    prober.start()
    readyz_answer: rawhttp.Response | rawhttp.Failure
    ended = rawhttp.peer_closed(readyz_connection)
    if ended is not None:
        readyz_answer = ended  # closed as idle already: /readyz is out of reach, as it may be
    else:
        try:
            readyz_connection.sendall(rawhttp.head("GET", "/readyz", port=port))
            readyz_answer = rawhttp.read_response(readyz_connection, timeout_s=5)
        except (OSError, rawhttp.Failure) as exc:
            readyz_answer = rawhttp.failure(exc)

    exited = wait_exit(service.running, policy.GRACEFUL_TIMEOUT_SECONDS + 10)
    done.set()
    prober.join(10)
    for thread in threads:
        thread.join(10)
    idle_ends = [rawhttp.wait_closed(sock, timeout_s=2) for sock in idle]
    for sock in [*idle, readyz_connection]:
        sock.close()

    # Every request sent before the signal: a complete 200 with a valid prediction.
    summary = [
        f"+{o.response.received_at - signalled:.2f}s {o.response.status}{' close' if o.response.closes() else ''}"
        if o.response
        else str(o.failure)
        for o in outcomes
    ]
    assert all(o.response is not None for o in outcomes), f"requests in flight lost: {summary}"
    assert all(o.response.status == 200 for o in outcomes), f"requests in flight not served: {summary}"
    assert all(prediction_problem(o.response.body) is None for o in outcomes)
    # A response sent while stopping says the connection closes.
    late = [o.response for o in outcomes if o.response.received_at > signalled + SETTLE_S]
    assert late, f"every request was answered within {SETTLE_S} s of the signal: nothing to observe ({summary})"
    assert all(response.closes() for response in late), f"responses while stopping without Connection: close: {summary}"
    # /readyz: 503 while stopping, if it can still be reached at all.
    if isinstance(readyz_answer, rawhttp.Response):
        assert readyz_answer.status == 503, f"/readyz while stopping: {readyz_answer.status}"
    else:
        assert readyz_answer.kind == "closed", f"the kept-alive connection asking /readyz: {readyz_answer}"
    # Idle keep-alive connections: closed, never reset.
    assert all(end is not None and end.kind == "closed" for end in idle_ends), f"idle connections: {idle_ends}"
    # New connections: refused, not accepted and dropped.
    if not behind_proxy:
        wrong = [(round(at - signalled, 2), what) for at, what in attempts if what != "refused"]
        assert attempts, "no connection was attempted while it stopped"
        assert not wrong, f"connections after the signal (seconds after it): {wrong[:10]}"
    # Exit: once idle, and within the graceful timeout.
    assert exited is not None, f"still running {policy.GRACEFUL_TIMEOUT_SECONDS + 10} s after SIGTERM"
    assert exited - signalled <= policy.GRACEFUL_TIMEOUT_SECONDS + EXIT_MARGIN_S, (
        f"exited {exited - signalled:.1f} s after SIGTERM (GRACEFUL_TIMEOUT_SECONDS {policy.GRACEFUL_TIMEOUT_SECONDS})"
    )
    last_response = max(o.response.received_at for o in outcomes)
    assert exited - last_response <= IDLE_EXIT_S, (
        f"exited {exited - last_response:.1f} s after its last response: it waited on idle connections"
    )
