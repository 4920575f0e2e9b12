"""python -m benchmark plan: the queueing arithmetic, and the command on results.json files
shaped like the real one (docs/benchmark/results.json), whole, partial and failed."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from benchmark.plan import (
    Measured,
    Plan,
    PlanError,
    erlang_c,
    hpa_cpu_target,
    in_flight_at,
    plan,
    replica_latency,
)
from harness import REPO

REAL = json.loads((REPO / "docs" / "benchmark" / "results.json").read_text())


@pytest.fixture(scope="session")
def demo_models_in_store():
    """Overrides conftest.py's: nothing here needs a model store, so no demo import."""


def synthetic_results(services: dict[str, dict]) -> dict:
    """A results.json with only what the plan reads, in the real one's shape.

    ``services``: name -> {"rps": ..., "rss_mb": ...}, or {"error": ...} for a failed service.
    """

    def service(name: str, figures: dict) -> dict:
        if "error" in figures:
            return {"title": f"Service {name}", "status": "failed", "error": figures["error"]}
        return {
            "title": f"Service {name}",
            "status": "ok",
            "load": {"rps": figures["rps"]},
            "resources": {"rss_mb_peak": figures["rss_mb"]},
        }

    return {
        "setup": {
            "run_id": "20270101-000000",
            "host": {"cpu_model": "Test CPU"},
            "mode": "process",
            "settings": {"cpus_per_service": 1, "workers_per_service": 1},
        },
        "services": {name: service(name, figures) for name, figures in services.items()},
    }


def keys(tree, prefix=()) -> set[tuple]:
    if not isinstance(tree, dict):
        return {prefix}
    return {path for key, value in tree.items() for path in keys(value, (*prefix, key))} | {prefix}


def test_synthetic_results_have_the_real_shape():
    synthetic = synthetic_results({"rust": {"rps": 100.0, "rss_mb": 80.0}})
    assert keys(synthetic) <= keys(REAL)


def run_plan(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmark", "plan", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def write(tmp_path, results: dict, name: str = "results.json"):
    path = tmp_path / name
    path.write_text(json.dumps(results))
    return path


def test_erlang_c():
    assert erlang_c(1, 0.7) == pytest.approx(0.7)  # one worker: a request waits when it is busy
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)  # the textbook case: two workers, one busy on average
    assert erlang_c(8, 4.0) < erlang_c(1, 0.5)  # pooling: same utilization, fewer waits


def test_latency_and_littles_law():
    # M/M/1 at 70%: mean time in system 1 / (mu - lambda), requests in system rho / (1 - rho)
    latency = replica_latency(arrivals=70.0, workers=1, rate=100.0)
    assert latency.mean_s == pytest.approx(1 / 30)
    assert in_flight_at(0.7, workers=1) == pytest.approx(0.7 / 0.3)
    # p99: P(wait > t) = rho * exp(-(mu - lambda) t), plus one service time
    assert latency.p99_s == pytest.approx(math.log(0.7 / 0.01) / 30 + 1 / 100)
    assert replica_latency(arrivals=0.001, workers=1, rate=100.0).p99_s == pytest.approx(0.01, rel=1e-3)


def test_throughput_bound_plan():
    service = Measured("fast", "Fast", rps_per_core=100.0, rss_mb_per_worker=80.0)
    found = plan(service, rps=1000, p99_ms=1000, utilization=0.5, cpus=1)
    assert (found.replicas, found.cores) == (20, 20)
    assert found.utilization == pytest.approx(0.5)
    assert found.memory_gb == pytest.approx(1.6)
    assert found.in_flight == pytest.approx(1.0)  # rho / (1 - rho) at 50%
    bigger = plan(service, rps=1000, p99_ms=1000, utilization=0.5, cpus=4)
    assert (bigger.replicas, bigger.cores) == (5, 20)


def test_a_tighter_p99_costs_replicas():
    service = Measured("slow", "Slow", rps_per_core=35.0, rss_mb_per_worker=1500.0)
    relaxed = plan(service, rps=1000, p99_ms=1000, utilization=0.7, cpus=1)
    tight = plan(service, rps=1000, p99_ms=100, utilization=0.7, cpus=1)
    assert relaxed.replicas == math.ceil(1000 / (0.7 * 35))
    assert tight.replicas > relaxed.replicas
    one_fewer = Plan(service, rps=1000, replicas=tight.replicas - 1, cpus=1)
    assert tight.latency.p99_s <= 0.100 < one_fewer.latency.p99_s  # the fewest that meet it
    with pytest.raises(PlanError, match="cannot be met"):
        plan(service, rps=1000, p99_ms=25, utilization=0.7, cpus=1)  # one request takes 28.6 ms


def test_the_default_utilization_is_the_autoscalers_target():
    assert 0 < hpa_cpu_target() < 1
    result = run_plan("docs/benchmark/results.json", "--rps", "1000", "--p99-ms", "500")
    assert result.returncode == 0, result.stderr
    assert f"no replica over {hpa_cpu_target():.0%} busy" in result.stdout
    for service in REAL["services"].values():
        assert service["title"] in result.stdout


def test_plan_of_a_synthetic_run(tmp_path):
    path = write(
        tmp_path, synthetic_results({"a": {"rps": 100.0, "rss_mb": 80.0}, "b": {"rps": 50.0, "rss_mb": 300.0}})
    )
    result = run_plan(str(path), "--rps", "1000", "--p99-ms", "1000", "--utilization", "0.5")
    assert result.returncode == 0, result.stderr
    lines = {line.split("  ")[0]: line.split() for line in result.stdout.splitlines() if line.startswith("Service ")}
    assert lines["Service a"][3:6] == ["20", "×", "1"]
    assert lines["Service b"][3:6] == ["40", "×", "1"]


def test_newest_run_under_results_by_default(tmp_path):
    for run_id, rps in (("20260101-000000", 10.0), ("20270101-000000", 100.0)):
        (tmp_path / "results" / run_id).mkdir(parents=True)
        results = synthetic_results({"a": {"rps": rps, "rss_mb": 80.0}})
        write(tmp_path / "results" / run_id, results)
    result = run_plan("--rps", "100", "--p99-ms", "1000", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "results/20270101-000000/results.json" in result.stdout
    assert "100.0" in result.stdout


@pytest.mark.parametrize(
    ("services", "extra", "message"),
    [
        ({"a": {"error": "never ready"}}, [], "a failed in this run (never ready)"),
        ({"a": {"rps": 100.0, "rss_mb": 80.0}}, ["--services", "a,rust"], "has no results for rust (it has: a)"),
    ],
    ids=["failed service", "missing service"],
)
def test_a_service_that_cannot_be_planned_is_a_named_error(tmp_path, services, extra, message):
    path = write(tmp_path, synthetic_results(services))
    result = run_plan(str(path), "--rps", "100", "--p99-ms", "500", *extra)
    assert result.returncode == 1
    assert f"plan: error: {path}" in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read"), ("not json", "is not valid JSON"), ("[]", "is not a benchmark's results.json")],
    ids=["missing file", "not JSON", "not results"],
)
def test_unreadable_results_are_a_named_error(tmp_path, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    result = run_plan(str(path), "--rps", "100", "--p99-ms", "500")
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_no_results_at_all(tmp_path):
    result = run_plan("--rps", "100", "--p99-ms", "500", cwd=tmp_path)
    assert result.returncode == 1
    assert "no results/*/results.json" in result.stderr
    assert "Traceback" not in result.stderr
