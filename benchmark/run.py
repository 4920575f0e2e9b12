"""One benchmark run: every service in turn on the same CPUs, then the in-process ceilings.

Results are data first: results.json holds the setup and every figure (units in
the key names); report.md and the charts are rendered from it. A service that
cannot start or answers wrongly is recorded as failed, with the reason, and the
run goes on with the others.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmark.measure import ResourceSampler, run_locust, startup_times
from benchmark.payload import load_payload
from benchmark.services import (
    REPO, RUST_BINARY, RUST_CEILING, SERVICES, Running, ServiceFailed, check_prediction, free_port, image_size_mb,
    onnxruntime_library,
)

READY_TIMEOUT_S = 180


@dataclass
class Settings:
    profile: str
    mode: str
    services: list[str]
    cpus_per_service: int
    users: int
    duration_s: int
    warmup_s: int
    startup_runs: int
    ceiling_s: int
    request_limit: int | None
    payload: Path | None
    out: Path

    @property
    def service_cpus(self) -> str:
        return ",".join(str(cpu) for cpu in self._cpus()[: self.cpus_per_service])

    @property
    def locust_cpus(self) -> str:
        return ",".join(str(cpu) for cpu in self._cpus()[self.cpus_per_service :])

    def _cpus(self) -> list[int]:
        available = sorted(os.sched_getaffinity(0))
        if len(available) <= self.cpus_per_service:
            raise SystemExit(
                f"error: {self.cpus_per_service} CPU(s) per service leaves none of the {len(available)} for Locust"
            )
        return available


PROFILES = {
    "quick": dict(users=16, duration_s=20, warmup_s=5, startup_runs=3, ceiling_s=8, request_limit=None),
    "full": dict(users=50, duration_s=3600, warmup_s=15, startup_runs=15, ceiling_s=20, request_limit=40_000),
}


def progress(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def run(settings: Settings) -> dict:
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = settings.out / run_id
    out.mkdir(parents=True)
    payload = load_payload(settings.payload)
    payload_path = out / "payload.json"
    payload_path.write_bytes(payload)
    acceptable = acceptable_labels(payload)
    progress(f"run {run_id}: {settings.mode} mode, services on CPU {settings.service_cpus}, "
             f"Locust on CPU {settings.locust_cpus}, results in {out}")

    results = {"setup": setup(settings, run_id, payload, acceptable), "services": {}, "ceilings": {}}
    for index, name in enumerate(settings.services, 1):
        progress(f"[{index}/{len(settings.services)}] {SERVICES[name].title}")
        results["services"][name] = measure_service(name, settings, out, payload, payload_path, acceptable)
        write(out, results)
    for runtime in sorted({SERVICES[name].runtime for name in settings.services}):
        progress(f"ceiling: {runtime} in-process on CPU {settings.service_cpus.split(',')[0]}")
        results["ceilings"][runtime] = measure_ceiling(runtime, settings, payload_path)
    results["ratios"] = ratios(results)
    write(out, results)

    from benchmark.report import render

    render(out)
    progress(f"done: {out / 'report.md'}")
    return results


def acceptable_labels(payload: bytes) -> list[str]:
    """Labels a correct service may answer: the reference's top-1, and any within 0.05 of it."""
    import bentoml

    from bentos.common import image_bytes
    from bentos.imaging import decode_rgb
    from weather.contract import LABELS
    from weather.torch_model import load_model, reference_probabilities

    model = load_model(bentoml.models.get("weather-torch:latest").path_of("model.pt"))
    probabilities = reference_probabilities(model, [decode_rgb(image_bytes(payload))])[0]
    return [label for label, p in zip(LABELS, probabilities) if p >= probabilities.max() - 0.05]


def setup(settings: Settings, run_id: str, payload: bytes, acceptable: list[str]) -> dict:
    from importlib.metadata import version

    return {
        "run_id": run_id,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "host": {
            "cpu_model": cpu_model(),
            "cores": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(),
        },
        "mode": settings.mode,
        "versions": {"python": platform.python_version(),
                     **{p: version(p) for p in ("bentoml", "torch", "onnxruntime", "locust")}},
        "settings": {
            "profile": settings.profile,
            "services": settings.services,
            "cpus_per_service": settings.cpus_per_service,
            "service_cpus": settings.service_cpus,
            "locust_cpus": settings.locust_cpus,
            "workers_per_service": settings.cpus_per_service,
            "intra_op_threads_per_worker": 1,
            "users": settings.users,
            "duration_s": settings.duration_s,
            "warmup_s": settings.warmup_s,
            "request_limit": settings.request_limit,
            "startup_runs": settings.startup_runs,
            "ceiling_s": settings.ceiling_s,
        },
        "payload": {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
                    "source": str(settings.payload or "generated (benchmark/payload.py)"),
                    "acceptable_labels": acceptable},
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def measure_service(name: str, settings: Settings, out: Path, payload: bytes, payload_path: Path,
                    acceptable: list[str]) -> dict:
    service = SERVICES[name]
    result: dict = {"title": service.title, "status": "failed"}
    if settings.mode == "container":
        result["image_size_mb"] = image_size_mb(service.image)
        if result["image_size_mb"] is None:
            result["error"] = f"image {service.image}:latest not found: build it with `make images`"
            progress(f"  FAILED: {result['error']}")
            return result
    elif name == "rust" and not RUST_BINARY.exists():
        result["error"] = f"{RUST_BINARY} not found: build it with `cargo build --release` in rust_service/"
        progress(f"  FAILED: {result['error']}")
        return result

    def make_running() -> Running:
        return Running(service, settings.mode, free_port(), settings.service_cpus, out / f"{name}.log")

    running = make_running()
    try:
        started = running.start()
        ready_s = running.wait_ready(started, READY_TIMEOUT_S)
        check_prediction(running.port, payload, acceptable)
        progress(f"  ready in {ready_s:.2f} s and answering correctly; warm-up {settings.warmup_s} s")
        run_locust(running.port, settings.users, settings.warmup_s, settings.locust_cpus, payload_path,
                   out / f"{name}_warmup")
        progress(f"  load: {settings.users} users for {settings.request_limit or settings.duration_s}"
                 f"{' requests' if settings.request_limit else ' s'}")
        with ResourceSampler(running) as sampler:
            result["load"] = run_locust(running.port, settings.users, settings.duration_s, settings.locust_cpus,
                                        payload_path, out / name, settings.request_limit)
        result["resources"] = sampler.summary()
        load = result["load"]
        progress(f"  {load['rps']} req/s, p50 {load.get('p50_ms')} ms, p99 {load.get('p99_ms')} ms, "
                 f"{load['failures']} failures, peak RSS {result['resources'].get('rss_mb_peak')} MB")
    except ServiceFailed as failure:
        result["error"] = str(failure)
        progress(f"  FAILED: {failure}")
        return result
    finally:
        running.stop()

    try:
        progress(f"  start-up: {settings.startup_runs} cold starts")
        result["startup"] = startup_times(make_running, settings.startup_runs, payload, acceptable, READY_TIMEOUT_S)
        progress(f"  start to /readyz: median {result['startup']['readyz_s_median']:.3f} s")
    except ServiceFailed as failure:
        result["error"] = f"start-up: {failure}"
        progress(f"  FAILED: {result['error']}")
        return result
    result["status"] = "ok" if result["load"]["failures"] == 0 else "failed requests"
    return result


def measure_ceiling(runtime: str, settings: Settings, payload_path: Path) -> dict:
    cpu = settings.service_cpus.split(",")[0]
    env = dict(os.environ)
    if runtime == "rust":
        if not RUST_CEILING.exists():
            return {"error": f"{RUST_CEILING} not found: `cargo build --release --example ceiling` in rust_service/"}
        command = [str(RUST_CEILING), str(payload_path), str(settings.ceiling_s)]
        env["ORT_DYLIB_PATH"] = onnxruntime_library()
    else:
        command = [sys.executable, "-m", "benchmark.ceiling", "--runtime", runtime,
                   "--payload", str(payload_path), "--seconds", str(settings.ceiling_s)]
    result = subprocess.run(["taskset", "--cpu-list", cpu, *command], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=settings.ceiling_s + 180)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def ratios(results: dict) -> dict:
    def rps(name):
        service = results["services"].get(name, {})
        return service.get("load", {}).get("rps") if service.get("status") == "ok" else None

    found = {}
    if rps("onnx") and rps("torch"):
        found["onnx_vs_torch_rps"] = round(rps("onnx") / rps("torch"), 3)
    if rps("rust") and rps("onnx"):
        found["rust_vs_onnx_rps"] = round(rps("rust") / rps("onnx"), 3)
    cpus = results["setup"]["settings"]["cpus_per_service"]
    for name, service in results["services"].items():
        ceiling = results["ceilings"].get(SERVICES[name].runtime, {}).get("rps")
        if rps(name) and ceiling:
            found[f"{name}_vs_ceiling_per_core"] = round(rps(name) / (ceiling * cpus), 3)
    return found


def write(out: Path, results: dict) -> None:
    staging = out / "results.json.tmp"
    staging.write_text(json.dumps(results, indent=2) + "\n")
    staging.rename(out / "results.json")
