"""A short end-to-end benchmark run (process mode, seconds per service).

Real services are measured; a service that answers wrongly, and one that never
starts, are reported as failed instead of measured.
"""

from __future__ import annotations

import io
import json

import bentoml
import pytest
from PIL import Image

from benchmark import payload
from benchmark.measure import startup_steps
from benchmark.payload import load_image
from benchmark.report import render
from benchmark.run import Settings, run
from weather.registry import ONNX_MODEL, SERVICES, STARTUP_STEPS, Service


def bad_service(name: str, behaviour: str) -> Service:
    """A stand-in (tests/fakes/bad_service.py) described like a real service."""
    return Service(
        name=name,
        title=f"Fake that {behaviour.replace('-', ' ')}",
        model=ONNX_MODEL,
        image="none",
        command=("{python}", "tests/fakes/bad_service.py", "--behaviour", behaviour),
        ceiling=(),
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    services = [SERVICES["onnx"], SERVICES["rust"], bad_service("wrong", "wrong-label"), bad_service("dead", "dead")]
    settings = Settings(
        profile="quick",
        mode="process",
        services=services,
        cpus_per_service=1,
        users=4,
        duration_s=4,
        warmup_s=1,
        startup_runs=2,
        ceiling_s=2,
        request_limit=None,
        payload=None,
        out=out,
        compare_s=3,
        max_batch_size=4,
    )
    found = run(settings)
    (run_dir,) = out.iterdir()
    return found, run_dir


def test_results_file_is_complete(results):
    found, run_dir = results
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == found
    setup = on_disk["setup"]
    for key in ("date", "git_sha", "mode", "versions", "settings", "payload"):
        assert setup[key], key
    # What was measured, from the store itself: the model's version and its file's hash.
    model = bentoml.models.get(ONNX_MODEL.latest)
    for name in ("onnx", "rust"):
        measured = on_disk["services"][name]["measured"]
        assert measured["model_tag"] == str(model.tag)
        assert measured["model_sha256"] == model.info.metadata["files"][ONNX_MODEL.file]["sha256"]
    assert setup["host"]["cores"] >= 2
    assert setup["host"]["cpu_model"]
    assert setup["settings"]["service_cpus"] != setup["settings"]["locust_cpus"]


@pytest.mark.parametrize("name", ["onnx", "rust"])
def test_a_working_service_is_measured_consistently(results, name):
    service = results[0]["services"][name]
    assert service["status"] == "ok", service.get("error")
    load = service["load"]
    assert load["requests"] > 0
    assert load["failures"] == 0
    assert load["rps"] > 0
    assert 0 < load["p50_ms"] <= load["p90_ms"] <= load["p95_ms"] <= load["p99_ms"] <= load["max_ms"]
    assert service["resources"]["rss_mb_peak"] >= service["resources"]["rss_mb_mean"] > 0
    startup = service["startup"]
    assert startup["runs"] == 2
    assert 0 < startup["readyz_s_median"] <= startup["first_predict_s_median"]


@pytest.mark.parametrize("name", ["onnx", "rust"])
def test_every_endpoint_and_batching_are_measured(results, name):
    found = results[0]
    service = found["services"][name]
    assert list(service["endpoints"]) == ["json", "upload", "raw"]
    assert service["endpoints"]["json"]["load"] == service["load"], "the first endpoint is the main measurement"
    for section in [*service["endpoints"].values(), service["batching"]]:
        assert section["load"]["rps"] > 0
        assert section["load"]["failures"] == 0
        assert section["resources"]["rss_mb_peak"] > 0
    assert service["batching"]["max_batch_size"] == 4
    for key in (f"{name}_upload_vs_json_rps", f"{name}_raw_vs_json_rps", f"{name}_batching_vs_off_rps"):
        assert found["ratios"][key] > 0, key


def test_a_service_that_answers_wrongly_is_failed_not_measured(results):
    service = results[0]["services"]["wrong"]
    assert service["status"] == "failed"
    assert "wrong answer" in service["error"]
    assert "load" not in service


def test_a_service_that_never_starts_is_failed(results):
    service = results[0]["services"]["dead"]
    assert service["status"] == "failed"
    assert "exited with code 3" in service["error"]


def test_ceilings_and_ratios(results):
    found = results[0]
    for name in ("onnx", "rust"):
        ceiling = found["ceilings"][name]
        assert len(ceiling["window_rps"]) == 5, ceiling
        assert ceiling["rps"] == max(ceiling["window_rps"]), "the best window counts"
    assert found["ratios"]["onnx_vs_ceiling_per_core"] > 0
    assert "wrong_vs_ceiling_per_core" not in found["ratios"]
    assert set(found["ceilings"]) == {"onnx", "rust"}, "a ceiling only for a service that served"


def test_report_and_charts_are_rendered_from_the_results(results):
    _, run_dir = results
    report = render(run_dir).read_text()
    assert SERVICES["onnx"].title in report
    assert "## Failures" in report
    assert "wrong answer" in report
    assert f"`{bentoml.models.get(ONNX_MODEL.latest).tag}`" in report, "the report names the model measured"
    assert "`raw` endpoint: req/s / p99 ms (× json)" in report
    assert "batching on (max 4)" in report
    for chart in ("throughput.png", "latency.png", "memory.png", "startup.png"):
        assert (run_dir / chart).stat().st_size > 1000
        assert f"]({chart})" in report


def test_the_default_payload_is_as_large_as_the_originals():
    """The original project's 1200x727 JPEG was 232 KB; decoding cost grows with the file."""
    image = load_image()
    with Image.open(io.BytesIO(image)) as decoded:
        assert (decoded.format, decoded.size) == ("JPEG", (payload.WIDTH, payload.HEIGHT))
    assert len(image) >= payload.ORIGINAL_JPEG_BYTES
    assert image == payload.benchmark_jpeg(), "the generated payload must be the same every time"


def test_a_bentos_start_up_is_broken_down_into_its_steps(results):
    steps = results[0]["services"]["onnx"]["startup"]["steps_s_median"]
    assert list(steps) == ["serve", *STARTUP_STEPS, "readyz"]
    assert all(seconds >= 0 for seconds in steps.values()), steps
    assert sum(steps.values()) == pytest.approx(results[0]["services"]["onnx"]["startup"]["readyz_s_median"], abs=0.5)


def test_start_up_steps_are_read_from_the_startup_log_line():
    log = 'INFO [entry_service] startup {"process_started": 100.5, "service_created": 0.75, "ready": 2.0}\n'
    steps = startup_steps("other line\n" + log, launched=100.0, readyz_s=2.75)
    assert steps == {"serve": 0.5, "service_created": 0.75, "ready": 1.25, "readyz": 0.25}
    assert startup_steps("no such line", launched=0.0, readyz_s=1.0) is None
