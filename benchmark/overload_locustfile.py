"""Locust users for the overload benchmark (benchmark/overload.py): like locustfile.py, but every
answer is classified instead of a non-200 being a failure, because under overload a 503 is the
contract's answer (docs/contract.md, "Under load"), not an error.

    locust -f benchmark/overload_locustfile.py --headless -u 80 -r 80 -t 30s --host URL

Each request is logged to STATUS_LOG (CSV: end time, latency, status, kind) with kind one of
  ok                 200 with a valid prediction
  busy               503 with a JSON {"error"} body and a Retry-After header
  bad_200, bad_503   the same statuses with a body or headers the contract does not allow
  http_<status>      any other status
  connection_<Name>  no complete response: the exception (reset, broken pipe, closed, ...)
Only ok and busy count as successes in Locust's own statistics.

Environment:
  ENDPOINT           json (default), upload or raw
  PAYLOAD_PATH       a JPEG/PNG image or a JSON payload (default: the generated benchmark image)
  STATUS_LOG         the CSV file to write (required)
  HONOR_RETRY_AFTER  1: a user that gets a 503 waits Retry-After seconds before its next request
                     (a well-behaved client); default 0: it retries at once (the harshest load)
"""

from __future__ import annotations

import functools
import json
import os
import time

import gevent
from locust import FastHttpUser, events, task

from benchmark.payload import load_image
from weather.contract import LABELS
from weather.endpoints import ENDPOINTS, Request

IMAGE = load_image(os.environ.get("PAYLOAD_PATH"))
ENDPOINT = os.environ.get("ENDPOINT", "json")
HONOR_RETRY_AFTER = os.environ.get("HONOR_RETRY_AFTER", "0") == "1"
VALID_LABELS = frozenset(LABELS)
HEADER = "end_time_s,response_time_ms,status,kind\n"


@functools.cache
def prepared() -> Request:
    return ENDPOINTS[ENDPOINT].request(IMAGE)


def classify(response) -> str:
    status = response.status_code
    if not status:  # no response at all (for a status other than 2xx, `error` is set too: not this)
        error = getattr(response, "error", None)
        return f"connection_{type(error).__name__ if error is not None else 'error'}"
    try:
        body = json.loads(response.content)
    except (ValueError, TypeError):
        body = None
    if status == 200:
        try:
            valid = body["prediction"] in VALID_LABELS and set(body["probabilities"]) == VALID_LABELS
        except (KeyError, TypeError):
            valid = False
        return "ok" if valid else "bad_200"
    if status == 503:
        valid = isinstance(body, dict) and set(body) == {"error"} and bool(response.headers.get("retry-after"))
        return "busy" if valid else "bad_503"
    return f"http_{status}"


_rows: list[str] = []


class OverloadUser(FastHttpUser):
    # No wait_time: each user sends its next request as soon as the last one is answered.

    @task
    def predict(self):
        request = prepared()
        retry_after = 0.0
        with self.client.post(
            ENDPOINTS[ENDPOINT].route, data=request.body, headers=dict(request.headers), catch_response=True
        ) as response:
            try:
                kind = classify(response)
            except Exception as exc:  # a body that failed to arrive
                kind = f"connection_{type(exc).__name__}"
            _rows.append(
                f"{time.time():.6f},{response.request_meta['response_time']:.3f},{response.status_code},{kind}\n"
            )
            if kind in ("ok", "busy"):
                response.success()
            else:
                response.failure(kind)
            if kind == "busy" and HONOR_RETRY_AFTER:
                try:
                    retry_after = float(response.headers.get("retry-after", "1"))
                except ValueError:
                    retry_after = 1.0
        if retry_after:
            gevent.sleep(retry_after)


@events.quitting.add_listener
def _write_log(**_kwargs):
    with open(os.environ["STATUS_LOG"], "w") as log:
        log.write(HEADER)
        log.writelines(_rows)
