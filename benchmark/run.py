"""One benchmark run: every service in turn on the same CPUs, then the in-process ceilings.

Results are data first: results.json holds the setup and every figure (units in
the key names); report.md and the charts are rendered from it. A service that
cannot start or answers wrongly is recorded as failed, with the reason, and the
run goes on with the others.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmark.measure import (
    ResourceSampler,
    ServiceFailed,
    check_prediction,
    describe,
    run_locust,
    startup_times,
)
from benchmark.payload import load_image
from harness import REPO, docker
from harness.launch import (
    LaunchError,
    Running,
    free_port,
    resolve,
    service_container,
    service_environment,
    service_process,
)
from weather import contract
from weather.endpoints import json_request
from weather.registry import TORCH_MODEL, Service

READY_TIMEOUT_S = 180


class SettingsError(Exception):
    """The run cannot be set up as asked; the message says why."""


@dataclass
class Settings:
    profile: str
    mode: str
    services: list[Service]
    cpus_per_service: int
    users: int
    duration_s: int
    warmup_s: int
    startup_runs: int
    ceiling_s: int
    request_limit: int | None
    payload: Path | None
    out: Path
    # The first endpoint is measured as above; the others, and batching, for compare_s each.
    endpoints: tuple[str, ...] = ("json", "upload", "raw")
    max_batch_size: int = 8  # batching on, compared with off; 1 skips that comparison
    compare_s: int = 20

    @property
    def service_cpus(self) -> str:
        return ",".join(str(cpu) for cpu in self._cpus()[: self.cpus_per_service])

    @property
    def locust_cpus(self) -> str:
        return ",".join(str(cpu) for cpu in self._cpus()[self.cpus_per_service :])

    def _cpus(self) -> list[int]:
        available = sorted(os.sched_getaffinity(0))
        if len(available) <= self.cpus_per_service:
            raise SettingsError(
                f"{self.cpus_per_service} CPU(s) per service leaves none of the {len(available)} for Locust"
            )
        return available


@dataclass(frozen=True)
class Traffic:
    """What every measurement of one run sends, and to whom it must answer what."""

    settings: Settings
    image: bytes
    image_path: Path
    acceptable: list[str]
    out: Path


PROFILES = {
    "quick": {
        "users": 50,
        "duration_s": 20,
        "warmup_s": 5,
        "startup_runs": 3,
        "ceiling_s": 8,
        "request_limit": None,
        "compare_s": 20,
    },
    "full": {
        "users": 50,
        "duration_s": 3600,
        "warmup_s": 15,
        "startup_runs": 15,
        "ceiling_s": 20,
        "request_limit": 40_000,
        "compare_s": 120,
    },
}


def progress(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def run(settings: Settings) -> dict:
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = settings.out / run_id
    out.mkdir(parents=True)
    image = load_image(settings.payload)
    image_path = out / "image"
    image_path.write_bytes(image)
    payload_path = out / "payload.json"  # the ceilings do the JSON endpoint's work
    payload_path.write_bytes(json_request(image).body)
    acceptable = acceptable_labels(image)
    progress(
        f"run {run_id}: {settings.mode} mode, services on CPU {settings.service_cpus}, "
        f"Locust on CPU {settings.locust_cpus}, results in {out}"
    )

    traffic = Traffic(settings, image, image_path, acceptable, out)
    results = {"setup": setup(settings, run_id, image, acceptable), "services": {}, "ceilings": {}}
    for index, service in enumerate(settings.services, 1):
        progress(f"[{index}/{len(settings.services)}] {service.title}")
        results["services"][service.name] = measure_service(service, traffic)
        # Right after the service, on the same CPU, so both saw the same machine; a ceiling says
        # what serving costs: only for a service that served.
        if "load" in results["services"][service.name]:
            progress(f"  ceiling: in-process on CPU {settings.service_cpus.split(',')[0]}")
            results["ceilings"][service.name] = measure_ceiling(service, settings, payload_path)
        write(out, results)
    results["ratios"] = ratios(results)
    write(out, results)

    from benchmark.report import render

    render(out)
    progress(f"done: {out / 'report.md'}")
    return results


def acceptable_labels(image: bytes) -> list[str]:
    """Labels a correct service may answer: the reference's top-1, and any within TOP2_MARGIN of it."""
    import bentoml

    from bentos.imaging import decode_rgb
    from weather.torch_model import load_model, reference_probabilities

    model = load_model(bentoml.models.get(TORCH_MODEL.latest).path_of(TORCH_MODEL.file))
    probabilities = reference_probabilities(model, [decode_rgb(image)])[0]
    return [
        label
        for label, p in zip(contract.LABELS, probabilities, strict=True)
        if p >= probabilities.max() - contract.TOP2_MARGIN
    ]


def run_identity(run_id: str) -> dict:
    """What every results file starts with: which run, when, of which commit, on what machine."""
    return {
        "run_id": run_id,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_sha": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        "host": {
            "cpu_model": cpu_model(),
            "cores": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(),
        },
    }


def setup(settings: Settings, run_id: str, image: bytes, acceptable: list[str]) -> dict:
    from importlib.metadata import version

    return {
        **run_identity(run_id),
        "mode": settings.mode,
        "versions": {
            "python": platform.python_version(),
            **{p: version(p) for p in ("bentoml", "torch", "onnxruntime", "locust")},
        },
        "settings": {
            "profile": settings.profile,
            "services": [service.name for service in settings.services],
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
            "endpoints": list(settings.endpoints),
            "compare_s": settings.compare_s,
            "max_batch_size": settings.max_batch_size,
        },
        "payload": {
            "bytes": len(image),
            "json_bytes": len(json_request(image).body),
            "sha256": hashlib.sha256(image).hexdigest(),
            "source": str(settings.payload or "generated (benchmark/payload.py)"),
            "acceptable_labels": acceptable,
        },
    }


def measured_version(service: Service, mode: str) -> dict:
    """What exactly is measured: the model version (tag, sha256 of its file) and, in containers, the image."""
    import bentoml

    found: dict = {}
    if mode == "container":
        image = f"{service.image}:latest"
        found["image"] = image
        found["image_id"] = docker.image_id(image)
        tag = docker.label(image, docker.MODEL_LABEL) if found["image_id"] else None
    else:
        tag = service.model.latest
    if tag is None:
        return found
    try:
        model = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        found["model_tag"] = tag  # not in this store (an image built from another one)
        return found
    found["model_tag"] = str(model.tag)
    found["model_sha256"] = model.info.metadata["files"][service.model.file]["sha256"]
    return found


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# A throughput run keeps every user's request queued, however long: shedding load is what
# `python -m benchmark overload` measures. With the contract's 2 s start deadline the torch
# bento would refuse part of 50 users' requests on one core.
THROUGHPUT_ENV = {"REQUEST_TIMEOUT_SECONDS": "600"}


def measure_service(service: Service, traffic: Traffic) -> dict:
    """Load on each endpoint, then with batching on, then cold starts; ``load`` is the first endpoint's."""
    settings, out, name = traffic.settings, traffic.out, service.name
    result: dict = {"title": service.title, "status": "failed", "measured": measured_version(service, settings.mode)}
    if settings.mode == "container":
        size = docker.size_mb(f"{service.image}:latest")
        result["image_size_mb"] = None if size is None else round(size, 1)
        if size is None:
            result["error"] = f"image {service.image}:latest not found: build it with `make images`"
            progress(f"  FAILED: {result['error']}")
            return result

    def make_running(env: dict[str, str] | None = None, log_name: str = name) -> Running:
        cpus, workers, log = settings.service_cpus, settings.cpus_per_service, out / f"{log_name}.log"
        env = {**THROUGHPUT_ENV, **(env or {})}
        if settings.mode == "container":
            return service_container(service, free_port(), cpuset=cpus, workers=workers, log_path=log, env=env)
        return service_process(service, free_port(), cpus=cpus, workers=workers, log_path=log, env=env)

    def load(running: Running, endpoint: str, seconds: float, prefix: str, limit: int | None = None) -> dict:
        with ResourceSampler(running) as sampler:
            figures = run_locust(
                running.port,
                settings.users,
                seconds,
                settings.locust_cpus,
                traffic.image_path,
                out / prefix,
                limit,
                endpoint,
            )
        resources = sampler.summary()
        progress(
            f"  {endpoint}: {figures['rps']} req/s, p50 {figures.get('p50_ms')} ms, p99 {figures.get('p99_ms')} ms, "
            f"{figures['failures']} failures, peak RSS {resources.get('rss_mb_peak')} MB"
        )
        return {"load": figures, "resources": resources}

    first, *others = settings.endpoints
    try:
        with started(make_running(), traffic, settings.endpoints, name) as running:
            progress(
                f"  load: {settings.users} users for {settings.request_limit or settings.duration_s}"
                f"{' requests' if settings.request_limit else ' s'} on {first}, {settings.compare_s} s on "
                + (", ".join(others) or "no other endpoint")
            )
            measured = {first: load(running, first, settings.duration_s, name, settings.request_limit)}
            for endpoint in others:
                measured[endpoint] = load(running, endpoint, settings.compare_s, f"{name}_{endpoint}")
        result.update(measured[first])
        result["endpoints"] = measured
        if settings.max_batch_size > 1:
            batching = {"MAX_BATCH_SIZE": str(settings.max_batch_size)}
            progress(f"  batching on (MAX_BATCH_SIZE={settings.max_batch_size}): {settings.compare_s} s on {first}")
            with started(make_running(batching, f"{name}_batching"), traffic, (first,), f"{name}_batching") as running:
                result["batching"] = {
                    "max_batch_size": settings.max_batch_size,
                    **load(running, first, settings.compare_s, f"{name}_batching"),
                }
    except (LaunchError, ServiceFailed) as failure:
        result["error"] = str(failure)
        progress(f"  FAILED: {failure}")
        return result

    try:
        progress(f"  start-up: {settings.startup_runs} cold starts")
        result["startup"] = startup_times(
            make_running, settings.startup_runs, traffic.image, traffic.acceptable, READY_TIMEOUT_S
        )
        progress(f"  start to /readyz: median {result['startup']['readyz_s_median']:.3f} s")
        if settings.mode == "container":
            result["startup"].update(
                docker_exit_times(service, f"{service.image}:latest", settings.startup_runs, settings.service_cpus)
            )
            progress(
                f"  docker run of its image, exiting at once: median {result['startup']['docker_exit_s_median']:.3f} s"
            )
    except (LaunchError, ServiceFailed) as failure:
        result["error"] = f"start-up: {failure}"
        progress(f"  FAILED: {result['error']}")
        return result
    failures = sum(
        section["load"]["failures"] for section in [*measured.values(), result.get("batching", {})] if section
    )
    result["status"] = "ok" if failures == 0 else "failed requests"
    return result


@contextlib.contextmanager
def started(running: Running, traffic: Traffic, endpoints: tuple[str, ...], prefix: str) -> Iterator[Running]:
    """The service started, answering correctly on every endpoint, warmed up on the first; stopped afterwards."""
    settings = traffic.settings
    try:
        ready_s = running.wait_ready(running.start(), READY_TIMEOUT_S)
        for endpoint in endpoints:
            check_prediction(running.port, traffic.image, traffic.acceptable, endpoint)
        progress(f"  ready in {ready_s:.2f} s and answering correctly; warm-up {settings.warmup_s} s")
        run_locust(
            running.port,
            settings.users,
            settings.warmup_s,
            settings.locust_cpus,
            traffic.image_path,
            traffic.out / f"{prefix}_warmup",
            endpoint=endpoints[0],
        )
        yield running
    finally:
        running.stop()


def docker_exit_times(service: Service, image: str, runs: int, cpuset: str) -> dict:
    """`docker run --rm` of the service's image with a command that exits at once: Docker's
    own share of the container's start-up (create, start, stop, remove)."""
    argv = [
        "docker", "run", "--rm", "--init", "--cpuset-cpus", cpuset,
        *resolve(service.exit_at_once, image=image),
    ]  # fmt: skip
    times = []
    for _ in range(runs):
        started = time.monotonic()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise LaunchError(f"{' '.join(argv)} failed: {result.stderr.strip()[:300]}")
        times.append(time.monotonic() - started)
    return describe("docker_exit_s", times)


def measure_ceiling(service: Service, settings: Settings, payload_path: Path) -> dict:
    """The service's request pipeline in-process on the first of its CPUs (its registry ``ceiling`` command)."""
    cpu = settings.service_cpus.split(",")[0]
    try:
        command = resolve(service.ceiling, payload=str(payload_path), seconds=str(settings.ceiling_s))
        env = {**os.environ, **service_environment(service)}
    except LaunchError as failure:
        return {"error": str(failure)}
    result = subprocess.run(
        ["taskset", "--cpu-list", cpu, *command],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=settings.ceiling_s + 180,
    )
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
    for name, service in results["services"].items():
        by_endpoint = {key: section["load"]["rps"] for key, section in service.get("endpoints", {}).items()}
        for endpoint in by_endpoint.keys() - {"json"}:
            if by_endpoint.get("json"):
                found[f"{name}_{endpoint}_vs_json_rps"] = round(by_endpoint[endpoint] / by_endpoint["json"], 3)
        batched = service.get("batching", {}).get("load", {}).get("rps")
        if batched and rps(name):
            found[f"{name}_batching_vs_off_rps"] = round(batched / rps(name), 3)
    cpus = results["setup"]["settings"]["cpus_per_service"]
    for name in results["services"]:
        ceiling = results["ceilings"].get(name, {}).get("rps")
        if rps(name) and ceiling:
            found[f"{name}_vs_ceiling_per_core"] = round(rps(name) / (ceiling * cpus), 3)
    return found


def write(out: Path, results: dict) -> None:
    staging = out / "results.json.tmp"
    staging.write_text(json.dumps(results, indent=2) + "\n")
    staging.rename(out / "results.json")
