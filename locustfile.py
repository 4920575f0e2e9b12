"""Load test for the weather classifier: POST /predict with one payload, no think time.

    locust -f locustfile.py --headless -u 16 -r 16 -t 60s --host http://127.0.0.1:3000

Environment:
  PAYLOAD_PATH   a JSON payload {"image": "<base64>"} or a JPEG/PNG image
                 (default: the generated benchmark payload, see benchmark/payload.py)
  LATENCY_LOG    write every request's end time, latency and outcome to this CSV file
                 (the benchmark computes exact percentiles from it)
  REQUEST_LIMIT  stop after this many requests (e.g. 40000, like the original project)

Every response is checked: status 200 and a valid prediction, else it counts as a failure.
"""

from __future__ import annotations

import json
import os
import time

import gevent
from locust import FastHttpUser, events, task

from benchmark.payload import load_payload
from weather.contract import LABELS

PAYLOAD = load_payload(os.environ.get("PAYLOAD_PATH"))
HEADERS = {"Content-Type": "application/json"}
VALID_LABELS = frozenset(LABELS)


class WeatherClassifierUser(FastHttpUser):
    # No wait_time: each user sends its next request as soon as the last one is answered.

    @task
    def predict(self):
        with self.client.post("/predict", data=PAYLOAD, headers=HEADERS, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:120]}")
                return
            try:
                body = json.loads(response.content)
                valid = body["prediction"] in VALID_LABELS and set(body["probabilities"]) == VALID_LABELS
            except (ValueError, KeyError, TypeError):
                valid = False
            if not valid:
                response.failure(f"malformed response: {(response.text or '')[:120]}")


_latencies: list[str] = []
_environment = None


@events.init.add_listener
def _keep_environment(environment, **_kwargs):
    global _environment
    _environment = environment


@events.request.add_listener
def _record(response_time, exception, **_kwargs):
    _latencies.append(f"{time.time():.6f},{response_time:.3f},{0 if exception else 1}\n")
    limit = int(os.environ.get("REQUEST_LIMIT") or 0)
    if limit and len(_latencies) == limit and _environment is not None:
        gevent.spawn(_environment.runner.quit)


@events.quitting.add_listener
def _write_latencies(**_kwargs):
    path = os.environ.get("LATENCY_LOG")
    if path:
        with open(path, "w") as log:
            log.write("end_time_s,response_time_ms,ok\n")
            log.writelines(_latencies)
