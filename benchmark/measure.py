"""Measurements of one running service: load (via Locust), resources, start-up."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from harness import REPO
from harness.launch import Running, request
from weather import contract
from weather.endpoints import ENDPOINTS
from weather.registry import STARTUP_LOG_PREFIX, STARTUP_STEPS

PERCENTILES = (50, 90, 95, 99)


class ServiceFailed(Exception):
    """The service answered wrongly, or the load generator failed."""


def check_prediction(port: int, image: bytes, acceptable_labels: list[str], endpoint: str = "json") -> None:
    """One request that must succeed with the expected answer before anything is timed."""
    route, sent = ENDPOINTS[endpoint].route, ENDPOINTS[endpoint].request(image)
    status, body = request(port, "POST", route, sent.body, headers=dict(sent.headers))
    if status != 200:
        raise ServiceFailed(f"POST {route} answered {status or 'nothing'}: {body[:200]!r}")
    try:
        answer = json.loads(body)
        prediction, probabilities = answer["prediction"], answer["probabilities"]
    except (ValueError, KeyError, TypeError):
        raise ServiceFailed(f"POST {route} returned a malformed body: {body[:200]!r}") from None
    if prediction not in acceptable_labels:
        raise ServiceFailed(
            f"wrong answer: predicted {prediction!r}, the reference says {' or '.join(acceptable_labels)}"
        )
    if abs(sum(probabilities.values()) - 1) > contract.SUM_TOLERANCE:
        raise ServiceFailed("wrong answer: probabilities do not sum to 1")


def usage(running: Running) -> tuple[float, int]:
    """CPU seconds used so far and resident bytes now, of the service's process tree."""
    cpu_seconds, rss = 0.0, 0
    for pid in running.pids():
        try:
            process = psutil.Process(pid)
            times = process.cpu_times()
            cpu_seconds += times.user + times.system + times.children_user + times.children_system
            rss += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return cpu_seconds, rss


class ResourceSampler:
    """Samples CPU use and resident memory of the service's process tree every half second."""

    def __init__(self, running: Running, interval_s: float = 0.5):
        self.running, self.interval_s = running, interval_s
        self.cpu_percent: list[float] = []
        self.rss_mb: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        previous_cpu, previous_time = None, None
        while not self._stop.wait(self.interval_s):
            cpu_seconds, rss = usage(self.running)
            now = time.monotonic()
            if rss:
                self.rss_mb.append(rss / 1e6)
            if previous_cpu is not None and cpu_seconds >= previous_cpu:
                self.cpu_percent.append(100 * (cpu_seconds - previous_cpu) / (now - previous_time))
            previous_cpu, previous_time = cpu_seconds, now

    def summary(self) -> dict:
        if not self.rss_mb:
            return {"error": "no samples of the service's processes"}
        return {
            "cpu_percent_mean": round(statistics.fmean(self.cpu_percent), 1) if self.cpu_percent else None,
            "cpu_percent_peak": round(max(self.cpu_percent), 1) if self.cpu_percent else None,
            "rss_mb_mean": round(statistics.fmean(self.rss_mb), 1),
            "rss_mb_peak": round(max(self.rss_mb), 1),
            "samples": len(self.rss_mb),
        }


def run_locust(
    port: int,
    users: int,
    seconds: float,
    cpus: str,
    image_path: Path,
    out_prefix: Path,
    request_limit: int | None = None,
    endpoint: str = "json",
) -> dict:
    """One headless Locust run sending the image through ``endpoint``; exact figures from every request."""
    latency_log = out_prefix.with_name(out_prefix.name + "_latencies.csv")
    env = {**os.environ, "PAYLOAD_PATH": str(image_path), "LATENCY_LOG": str(latency_log), "ENDPOINT": endpoint}
    if request_limit:
        env["REQUEST_LIMIT"] = str(request_limit)
    command = [
        "taskset",
        "--cpu-list",
        cpus,
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(REPO / "locustfile.py"),
        "--headless",
        "--users",
        str(users),
        "--spawn-rate",
        str(users),
        "--run-time",
        f"{int(seconds)}s",
        "--host",
        f"http://127.0.0.1:{port}",
        "--csv",
        str(out_prefix),
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--exit-code-on-error",
        "0",
        "--stop-timeout",
        "10",
    ]
    with out_prefix.with_name(out_prefix.name + "_locust.log").open("w") as log:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=seconds + 120)
    if result.returncode != 0 or not latency_log.exists():
        raise ServiceFailed(f"locust failed with exit code {result.returncode} (see {log.name})")
    return summarize_latencies(latency_log, failures_csv=Path(f"{out_prefix}_failures.csv"))


def summarize_latencies(latency_log: Path, failures_csv: Path) -> dict:
    rows = np.loadtxt(latency_log, delimiter=",", skiprows=1, ndmin=2)
    if rows.size == 0:
        raise ServiceFailed("no request completed")
    end, latency_ms, ok = rows[:, 0], rows[:, 1], rows[:, 2].astype(bool)
    window_s = float(end.max() - (end - latency_ms / 1000).min())
    succeeded = latency_ms[ok]
    summary = {
        "requests": len(rows),
        "failures": int((~ok).sum()),
        "failure_kinds": failure_kinds(failures_csv),
        "window_s": round(window_s, 2),
        "rps": round(len(succeeded) / window_s, 2),
    }
    if len(succeeded):
        summary.update({f"p{p}_ms": round(float(np.percentile(succeeded, p)), 2) for p in PERCENTILES})
        summary.update(mean_ms=round(float(succeeded.mean()), 2), max_ms=round(float(succeeded.max()), 2))
    return summary


def failure_kinds(failures_csv: Path) -> dict[str, int]:
    if not failures_csv.exists():
        return {}
    with failures_csv.open() as file:
        return {row["Error"]: int(row["Occurrences"]) for row in csv.DictReader(file)}


def startup_times(make_running, runs: int, image: bytes, acceptable_labels: list[str], timeout_s: float) -> dict:
    """Cold starts: launch -> first /readyz 200, and launch -> first successful /predict.

    Where the service logs its start-up steps (the bentos' ``startup {...}`` line), also the
    median of each step, so the report shows where the time goes."""
    ready, first_predict, timelines = [], [], []
    for _ in range(runs):
        running: Running = make_running()
        try:
            launched = time.time()
            started = running.start()
            ready.append(running.wait_ready(started, timeout_s))
            check_prediction(running.port, image, acceptable_labels)
            first_predict.append(time.monotonic() - started)
            timeline = startup_steps(running.logs(200), launched, ready[-1])
            if timeline:
                timelines.append(timeline)
        finally:
            running.stop()
    found = {"runs": runs, **describe("readyz_s", ready), **describe("first_predict_s", first_predict)}
    if timelines and len(timelines) == runs:
        found["steps_s_median"] = {
            step: round(statistics.median(timeline[step] for timeline in timelines), 4) for step in timelines[0]
        }
    return found


def startup_steps(log: str, launched: float, readyz_s: float) -> dict[str, float] | None:
    """How long each start-up step took, from the service's ``startup {...}`` log line:
    ``serve`` (launch -> the worker process starts: `bentoml serve` itself), then each of
    the worker's steps, then ``readyz`` (the worker ready -> the first /readyz 200)."""
    lines = [line for line in log.splitlines() if STARTUP_LOG_PREFIX + "{" in line]
    if not lines:
        return None
    marks = json.loads(lines[-1].split(STARTUP_LOG_PREFIX, 1)[1])
    steps = {"serve": marks["process_started"] - launched}
    previous = 0.0
    for step in STARTUP_STEPS:
        if step in marks:
            steps[step] = marks[step] - previous
            previous = marks[step]
    steps["readyz"] = readyz_s - steps["serve"] - previous
    return {step: round(seconds, 4) for step, seconds in steps.items()}


def describe(name: str, values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        f"{name}_mean": round(statistics.fmean(ordered), 4),
        f"{name}_median": round(statistics.median(ordered), 4),
        f"{name}_p95": round(float(np.percentile(ordered, 95)), 4),
        f"{name}_min": round(ordered[0], 4),
        f"{name}_max": round(ordered[-1], 4),
    }
