"""GET /livez, /readyz and /metrics."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .images import PHOTO_CASES, image_bytes, small_png

# Kubernetes' default probe timeout is 1 s; allow for a loaded 2-core test machine.
PROBE_TIMEOUT_S = 5.0
REQUEST_LABELS = {"endpoint", "http_response_code", "service_name", "service_version"}


def test_probes_answer_while_the_workers_are_busy(base_url):
    """An orchestrator probing a loaded service must not see it as dead or unready: the probes
    are answered (200, within the probe timeout) while every worker is computing predictions."""
    # Photos, not a tiny image: the Rust service answers 32 tiny ones before a probe is sent.
    body = json.dumps({"image": base64.b64encode(image_bytes(next(iter(PHOTO_CASES)))).decode("ascii")})
    with httpx.Client(base_url=base_url, timeout=120.0) as load, ThreadPoolExecutor(max_workers=8) as pool:
        predictions = [
            pool.submit(load.post, "/predict", content=body, headers={"Content-Type": "application/json"})
            for _ in range(64)
        ]
        with httpx.Client(base_url=base_url, timeout=PROBE_TIMEOUT_S) as probe:
            probes = []
            while not all(future.done() for future in predictions):
                probes += [probe.get("/livez").status_code, probe.get("/readyz").status_code]
        assert all(future.result().status_code == 200 for future in predictions)
    assert probes, "the predictions finished before any probe was sent"
    assert set(probes) == {200}, probes


def _metrics(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain"), response.headers["content-type"]
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def _predict_total(families: dict, code: str) -> float:
    family = families.get("bentoml_service_request")
    if family is None:
        return 0.0
    return sum(
        sample.value
        for sample in family.samples
        if sample.name == "bentoml_service_request_total"
        and sample.labels.get("endpoint") == "/predict"
        and sample.labels.get("http_response_code") == code
    )


def test_metrics_count_predictions(client):
    before = _metrics(client)
    body = json.dumps({"image": base64.b64encode(small_png()).decode("ascii")})
    assert client.post("/predict", content=body, headers={"Content-Type": "application/json"}).status_code == 200
    assert client.post("/predict", content=b"not json", headers={"Content-Type": "application/json"}).status_code == 400
    after = _metrics(client)

    assert _predict_total(after, "200") >= _predict_total(before, "200") + 1
    assert _predict_total(after, "400") >= _predict_total(before, "400") + 1


def test_metric_names_types_and_labels(client):
    body = json.dumps({"image": base64.b64encode(small_png()).decode("ascii")})
    assert client.post("/predict", content=body, headers={"Content-Type": "application/json"}).status_code == 200
    families = _metrics(client)
    expected = {
        "bentoml_service_request": ("counter", REQUEST_LABELS),
        "bentoml_service_request_duration_seconds": ("histogram", REQUEST_LABELS),
        "bentoml_service_request_in_progress": ("gauge", REQUEST_LABELS - {"http_response_code"}),
    }
    for name, (kind, labels) in expected.items():
        assert name in families, f"{name} missing; found {sorted(families)}"
        family = families[name]
        assert family.type == kind, f"{name} is a {family.type}, expected a {kind}"
        predict_samples = [sample for sample in family.samples if sample.labels.get("endpoint") == "/predict"]
        assert predict_samples, f"{name} has no sample for /predict"
        for sample in predict_samples:
            missing = labels - set(sample.labels)
            assert not missing, f"{sample.name} lacks labels {missing}"
    buckets = [s for s in families["bentoml_service_request_duration_seconds"].samples if s.name.endswith("_bucket")]
    assert any(sample.labels.get("le") == "+Inf" for sample in buckets)
