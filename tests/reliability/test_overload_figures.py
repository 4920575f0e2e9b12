"""The overload benchmark's figures (benchmark/overload.py), from a request log made up here:
useful throughput counts only valid 200s, the 503 share all 503s, latency only accepted requests."""

from __future__ import annotations

import pytest

from benchmark.overload import OverloadSettings, markdown, overload_onset, summarize


def write_log(path, rows):
    path.write_text("end_time_s,response_time_ms,status,kind\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def test_summary_counts_only_valid_200s_as_useful(tmp_path):
    # 10 s window: the first request starts at t=100 (ends 100.5 after 500 ms), the last ends at 110.
    rows = [(100.5, 500, 200, "ok")]
    rows += [(101 + i * 0.1, 100 + i, 200, "ok") for i in range(19)]  # 20 ok, latencies 100..118 and 500
    rows += [(102 + i * 0.01, 1, 503, "busy") for i in range(70)]
    rows += [(103, 2, 503, "bad_503"), (104, 3, 200, "bad_200"), (105, 4, 0, "connection_ConnectionResetError")]
    rows += [(110, 5, 400, "http_400")]
    figures = summarize(write_log(tmp_path / "log.csv", rows))

    assert figures["requests"] == 94
    assert figures["window_s"] == pytest.approx(10.0)
    assert figures["useful_rps"] == pytest.approx(2.0)
    assert figures["share_503"] == pytest.approx(71 / 94, abs=1e-4)
    assert figures["connection_errors"] == 1
    assert figures["kinds"] == {
        "busy": 70,
        "ok": 20,
        "bad_503": 1,
        "bad_200": 1,
        "connection_ConnectionResetError": 1,
        "http_400": 1,
    }
    assert figures["max_ms_accepted"] == 500
    assert 118 <= figures["p99_ms_accepted"] <= 500
    assert figures["p50_ms_accepted"] == pytest.approx(109.5)


def test_overload_starts_at_the_full_queue_or_the_deadline():
    settings = OverloadSettings(
        mode="process", services=[], env={"QUEUE_CAPACITY": "64", "REQUEST_TIMEOUT_SECONDS": "2"}
    )
    assert overload_onset(10.0, settings)["overload_starts_at_users"] == 20  # 20 waiting = 2 s at 10 req/s
    assert overload_onset(100.0, settings)["overload_starts_at_users"] == 200  # 2 s at 100 req/s
    settings.env["MAX_WAITING_REQUESTS"] = "16"
    assert overload_onset(100.0, settings)["overload_starts_at_users"] == 80  # 64 held, 16 waiting: full first


def test_report_marks_the_target():
    run = {"users": 40, "useful_rps": 95.0, "useful_rps_vs_peak": 0.95, "share_503": 0.5, "connection_errors": 0}
    run.update(unloaded_users=4, unloaded_rps_before_after=[98.0, 102.0])
    run.update(p50_ms_accepted=300.0, p99_ms_accepted=1900.0, kinds={"ok": 10, "busy": 10}, meets_target=True)
    results = {
        "setup": {
            "run_id": "x",
            "mode": "process",
            "settings": {"cpus_per_service": 1, "endpoint": "json", "honor_retry_after": False},
            "policy": {"QUEUE_CAPACITY": 64, "REQUEST_TIMEOUT_SECONDS": 2},
        },
        "services": {
            "rust": {
                "status": "ok",
                "peak": {"users": 2, "useful_rps": 100.0, "overload_starts_at_users": 64},
                "overload": [run, {**run, "useful_rps_vs_peak": 0.5, "meets_target": False}],
            },
            "torch": {"status": "failed", "error": "did not start"},
        },
    }
    table = markdown(results)
    assert "| rust | 40 | 95.0 | 98.0 / 102.0 (4 users) | 0.95 | 50.0% | 300 / 1,900 | 0 | — | yes |" in table
    assert "| rust | 40 | 95.0 | 98.0 / 102.0 (4 users) | 0.50 |" in table
    assert table.count("| no |") == 1
    assert "failed: did not start" in table


def test_each_overload_run_is_compared_with_the_unloaded_runs_around_it(tmp_path, monkeypatch):
    """Unloaded, overloaded, unloaded, overloaded, unloaded: each overload run's ratio is to the
    mean of the unloaded runs either side, made at the concurrency of the sweep's best."""
    from benchmark import overload

    calls = []
    rps = iter([80.0, 85.0, 90.0, 60.0, 100.0])  # in the order of the runs

    def fake_locust(port, users, seconds, settings, image_path, prefix):
        calls.append((users, seconds))
        return {"useful_rps": next(rps), "share_503": 0.0, "p99_ms_accepted": 900.0, "connection_errors": 0}

    class NoSampler:
        def __init__(self, running) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def summary(self) -> dict:
            return {}

    monkeypatch.setattr(overload, "run_locust", fake_locust)
    monkeypatch.setattr(overload, "ResourceSampler", NoSampler)
    settings = OverloadSettings(mode="process", services=[], duration_s=30, env={"REQUEST_TIMEOUT_SECONDS": "2"})
    peak = {"users": 4, "best_users": 8, "useful_rps": 120.0}
    runs = overload.overload_runs(type("R", (), {"port": 1})(), peak, settings, tmp_path, tmp_path, "rust")

    assert calls == [(8, 30), (20, 30), (8, 30), (80, 30), (8, 30)]
    assert [run["users"] for run in runs] == [20, 80]
    assert [run["unloaded_rps_before_after"] for run in runs] == [[80.0, 90.0], [90.0, 100.0]]
    assert [run["useful_rps_vs_peak"] for run in runs] == [
        pytest.approx(1.0),
        pytest.approx(60 / 95, abs=1e-3),
    ]
    assert [run["meets_target"] for run in runs] == [True, False]


@pytest.mark.parametrize("name", ["onnx", "rust"])
def test_the_cost_of_a_refusal_is_measured_on_refusals_only(tmp_path, name):
    """With its one place held by a stalled upload, every request the clients send waits at
    its headers and is refused: only 503s come back, and the service's CPU time is shared
    out over them, less what it uses idle."""
    from benchmark import overload
    from benchmark.payload import load_image
    from harness.launch import free_port, service_process
    from weather.registry import SERVICES

    settings = OverloadSettings(mode="process", services=[SERVICES[name]], refusal_s=2)

    def make_running(log_name, env):
        return service_process(SERVICES[name], free_port(), workers=1, log_path=tmp_path / f"{log_name}.log", env=env)

    found = overload.refusal_cost(make_running, settings, load_image(), name)
    refused = found["answers"].pop("503", 0)
    assert found["answers"] == {}, found
    assert refused >= overload.REFUSAL_CONNECTIONS  # each refused at least once in 2 s, at the deadline
    assert 0 <= found["idle_cpu_s_per_s"] < 0.5  # idle, with the place held, it does next to nothing
    refusing_cpu_s = found["cpu_s"] - found["idle_cpu_s_per_s"] * found["seconds"]
    assert found["cpu_ms_per_503"] == pytest.approx(1000 * refusing_cpu_s / refused, abs=0.001)
    assert found["cpu_ms_per_503"] > 0
