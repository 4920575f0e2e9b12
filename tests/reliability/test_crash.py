"""Crashes (docs/contract.md): a worker that dies is logged as an error with its exit status or
signal, and the service answers /readyz with 503 until its replacement has loaded and warmed up
the model, then 200 again.

BentoML services only: their workers are processes, replaced by ``bentoml serve``. The Rust
service's workers are threads of its one process, which a crash ends (its supervisor restarts it).
The service is the test's own: one of its workers is killed."""

from __future__ import annotations

import itertools
import re
import time

import pytest

from . import rawhttp
from .control import bento_workers, log_lines
from .policy import prediction_problem

SETTLE_S = 0.5  # after the kill, by when the service knows
REPLACEMENT_TIMEOUT_S = 180.0
EXIT_WORDS = re.compile(r"SIGKILL|signal\s*:?\s*9\b|-9\b|killed|exit", re.IGNORECASE)


def readyz(port: int) -> str:
    try:
        return str(rawhttp.exchange(port, rawhttp.head("GET", "/readyz", port=port), timeout_s=2).status)
    except rawhttp.Failure as failure:
        return failure.kind


def test_a_killed_worker_is_logged_and_replaced(own_service, photo):
    if not own_service.is_bento:
        pytest.skip("a BentoML service's workers are processes; the Rust service's are threads of its one process")
    running, port = own_service.running, own_service.port
    workers = bento_workers(running)
    assert len(workers) == 1, f"expected the one worker (WORKERS=1): {[w.cmdline() for w in workers]}"
    worker = workers[0]
    lines_before = len(log_lines(running))

    killed = time.monotonic()
    worker.kill()
    observed: list[tuple[float, str]] = []
    while time.monotonic() < killed + REPLACEMENT_TIMEOUT_S:
        at = time.monotonic()
        observed.append((at - killed, readyz(port)))
        if observed[-1][1] == "200" and at > killed + SETTLE_S:
            break
        time.sleep(0.1)
    # (from s, to s, answer) for each run of the same answer
    runs = [
        (round(group[0][0], 1), round(group[-1][0], 1), answer)
        for answer, group in ((answer, list(group)) for answer, group in itertools.groupby(observed, lambda o: o[1]))
    ]
    assert observed[-1][1] == "200", f"/readyz not 200 again within {REPLACEMENT_TIMEOUT_S:.0f} s: {runs}"
    replacing = [answer for at, answer in observed[:-1] if at >= SETTLE_S]
    assert replacing, (
        f"/readyz was 200 again {observed[-1][0]:.1f} s after the kill: faster than a model loads ({runs})"
    )
    assert set(replacing) == {"503"}, f"/readyz while the worker was replaced (from s, to s, answer): {runs}"

    replacements = bento_workers(running)
    assert [w.pid for w in replacements] != [worker.pid], "the killed worker is still listed"
    request = rawhttp.raw_post(port, photo)
    response = rawhttp.exchange(port, request, timeout_s=60)
    assert response.status == 200, response.body[:200]
    assert prediction_problem(response.body) is None

    new_lines = log_lines(running)[lines_before:]
    logged = [
        line
        for line in new_lines
        if "error" in line.lower() and (str(worker.pid) in line or EXIT_WORDS.search(line) is not None)
    ]
    assert logged, "no error line naming the worker's exit in the log; new lines:\n" + "\n".join(new_lines[-30:])
