"""What a service's /metrics say about its predict requests."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from weather import contract

from . import rawhttp

PREDICT_ROUTES = (contract.PREDICT_ROUTE, contract.UPLOAD_ROUTE, contract.RAW_ROUTE)


def metrics(port: int) -> dict:
    """GET /metrics, parsed: family name -> family."""
    response = rawhttp.exchange(port, rawhttp.head("GET", "/metrics", port=port), timeout_s=10)
    assert response.status == 200, f"GET /metrics: {response.status}"
    return {family.name: family for family in text_string_to_metric_families(response.body.decode())}


def predict_total(families: dict, code: str) -> float:
    """Predict requests answered ``code`` so far, over the three routes."""
    family = families.get("bentoml_service_request")
    assert family is not None, f"no bentoml_service_request_total in /metrics; found {sorted(families)}"
    return sum(
        sample.value
        for sample in family.samples
        if sample.name == "bentoml_service_request_total"
        and sample.labels.get("endpoint") in PREDICT_ROUTES
        and sample.labels.get("http_response_code") == code
    )


def in_progress(port: int) -> float | None:
    """Predict requests in progress (the metrics' gauge), or None if there is no gauge."""
    family = metrics(port).get("bentoml_service_request_in_progress")
    if family is None:
        return None
    return sum(s.value for s in family.samples if s.labels.get("endpoint") in PREDICT_ROUTES)


def wait_idle(port: int, timeout_s: float = 5.0) -> float | None:
    """Until no predict request is in progress, so that a test starts with an empty queue; after
    ``timeout_s`` it goes on anyway (a gauge that never comes down is the metrics' fault, reported
    by the test that left it up). Returns the last count seen."""
    deadline = time.monotonic() + timeout_s
    busy = in_progress(port)
    while busy and time.monotonic() < deadline:
        time.sleep(0.1)
        busy = in_progress(port)
    return busy
