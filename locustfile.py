"""Load test for the weather classifier: one image, sent by one endpoint, no think time.

    locust -f locustfile.py --headless -u 16 -r 16 -t 60s --host http://127.0.0.1:3000 [--endpoint raw]

Endpoints (docs/contract.md): ``json`` POST /predict with {"image": "<base64>"} (the
default), ``upload`` POST /predict/upload as multipart/form-data, ``raw`` POST
/predict/raw with the file as the body.

Environment:
  ENDPOINT       the endpoint, like --endpoint
  PAYLOAD_PATH   a JPEG/PNG image or a JSON payload {"image": "<base64>"}
                 (default: the generated benchmark image, see benchmark/payload.py)
  LATENCY_LOG    write every request's end time, latency and outcome to this CSV file
                 (the benchmark computes exact percentiles from it)
  REQUEST_LIMIT  stop after this many requests (e.g. 40000, like the original project)

Every response is checked: status 200 and a valid prediction, else it counts as a failure.
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
VALID_LABELS = frozenset(LABELS)


@events.init_command_line_parser.add_listener
def _endpoint_option(parser):
    parser.add_argument(
        "--endpoint",
        choices=sorted(ENDPOINTS),
        default="json",
        env_var="ENDPOINT",
        help="how the image is sent: json (base64), upload (multipart) or raw (the body)",
    )


@functools.cache
def prepared(endpoint: str) -> Request:
    """The request body and headers, built once per process (sending must not re-encode)."""
    return ENDPOINTS[endpoint].request(IMAGE)


class WeatherClassifierUser(FastHttpUser):
    # No wait_time: each user sends its next request as soon as the last one is answered.

    @task
    def predict(self):
        endpoint = self.environment.parsed_options.endpoint
        request = prepared(endpoint)
        with self.client.post(
            ENDPOINTS[endpoint].route, data=request.body, headers=dict(request.headers), catch_response=True
        ) as response:
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
