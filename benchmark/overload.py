"""python -m benchmark overload: does each service keep serving at its full rate when overloaded,
and does its memory come back after a spike? (docs/contract.md, "Under load, slow clients, shutdown")

For each service, alone on its CPUs (taskset, like `benchmark run`), with Locust on the others:

1. the unloaded peak: useful throughput (200s per second) at rising concurrency (1, 2, 4, ...),
   until more users no longer help; the saturating concurrency is the smallest within
   PEAK_TOLERANCE of the best (or --peak-users, measured once);
2. overload: Locust at 5x and 20x that concurrency (--multiples), or at --users: useful
   throughput and its ratio to the peak, the share of 503s, the p99 latency of the accepted
   (200) requests, connection errors. The target: ratio >= 0.90 and accepted p99 <= the
   request deadline (REQUEST_TIMEOUT_SECONDS). Each overload run comes between two runs as
   long at the concurrency of the sweep's best, and its ratio is to their mean: this
   machine's speed drifts (the Rust service at 16 users gave 75.4 and 93.2 req/s three
   minutes apart), and a ratio to a peak measured minutes before, or to the best of several
   short windows, measures the drift as much as the overload;
3. with --refusal-seconds N, on a fresh start: what one refusal costs the service, in CPU
   time per 503, with its one place (QUEUE_CAPACITY 1) held by a stalled upload while
   REFUSAL_CONNECTIONS clients send the benchmark's request again as soon as each is refused:
   every request waits at its headers and is refused at the deadline, as most are under
   overload, so that cost times the 503s per second is the core the overload runs lose to them.
   What the service uses idle (measured first, as long, with the upload stalled and no client)
   is taken off: BentoML's processes use some CPU with no traffic at all;
4. with --soak-seconds N, on a fresh start: resident memory of all the service's processes,
   sampled every second, idle, under steady load at the saturating concurrency for N seconds with
   a spike of large uploads and many connections in its middle, and idle again afterwards.

Users send their next request as soon as they have an answer; with --honor-retry-after a user
that gets a 503 first waits its Retry-After. Results go to OUT/<timestamp>-overload/:
results.json (units in the key names), report.md (the tables printed at the end), logs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import csv
import datetime
import http.client
import io
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from benchmark.measure import ResourceSampler, ServiceFailed, check_prediction, usage
from benchmark.payload import load_image
from benchmark.run import READY_TIMEOUT_S, acceptable_labels, measured_version, progress, run_identity, write
from harness import REPO, docker
from harness.launch import LaunchError, Running, free_port, service_container, service_process
from weather import contract
from weather.endpoints import ENDPOINTS
from weather.photos import photo_paths
from weather.registry import SERVICES, Service

LOCUSTFILE = Path(__file__).with_name("overload_locustfile.py")
SWEEP_USERS = (1, 2, 4, 8, 16, 32)
PEAK_TOLERANCE = 0.05  # the saturating concurrency: the smallest within 5% of the best throughput
TARGET_RATIO = 0.90  # useful throughput under overload, relative to the unloaded peak
SOAK_IDLE_S = 10  # idle sampling before and after the soak's load
SPIKE_UPLOADERS = 4  # clients sending large uploads during the spike
SPIKE_CONNECTIONS = 200  # extra connections opened (and left silent) during the spike
REFUSAL_CONNECTIONS = 200  # clients refused in turn while the refusal cost is measured
REFUSAL_WARMUP_S = 3  # of those clients' traffic, before the CPU time is counted
REFUSAL_IDLE_S = 5  # at least, of the service idle before them, for the CPU time it uses anyway


@dataclass
class OverloadSettings:
    mode: str
    services: list[Service]
    cpus_per_service: int = 1
    users: list[int] | None = None  # overload concurrencies; None: multiples of the saturating one
    multiples: tuple[int, ...] = (5, 20)
    peak_users: int | None = None  # the saturating concurrency, if known
    duration_s: int = 30  # per overload run
    probe_s: int = 8  # per step of the peak sweep
    warmup_s: int = 5
    endpoint: str = "json"
    payload: Path | None = None
    out: Path = Path("results")
    soak_s: int = 0
    refusal_s: int = 0
    overload: bool = True
    honor_retry_after: bool = False
    env: dict[str, str] = field(default_factory=dict)  # policy overrides for the services (QUEUE_CAPACITY=...)

    def check(self) -> None:
        """Raises ValueError if the services' CPUs leave none for Locust."""
        self._cpus()

    def _cpus(self) -> list[int]:
        available = sorted(os.sched_getaffinity(0))
        if len(available) <= self.cpus_per_service:
            raise ValueError(
                f"{self.cpus_per_service} CPU(s) per service leaves none of the {len(available)} for Locust"
            )
        return available

    @property
    def service_cpus(self) -> str:
        return ",".join(map(str, self._cpus()[: self.cpus_per_service]))

    @property
    def locust_cpus(self) -> str:
        return ",".join(map(str, self._cpus()[self.cpus_per_service :]))

    def policy(self, name: str) -> int:
        """A policy value the services run with: the override given, else the contract's."""
        return int(self.env.get(name, getattr(contract, name)))


# --- Locust -------------------------------------------------------------------------------------


def run_locust(
    port: int, users: int, seconds: float, settings: OverloadSettings, image_path: Path, prefix: Path
) -> dict:
    """One headless run of the overload locustfile; figures from its per-request log."""
    status_log = prefix.with_name(prefix.name + "_requests.csv")
    env = {
        **os.environ,
        "PAYLOAD_PATH": str(image_path),
        "STATUS_LOG": str(status_log),
        "ENDPOINT": settings.endpoint,
        "HONOR_RETRY_AFTER": "1" if settings.honor_retry_after else "0",
    }
    command = [
        *("taskset", "--cpu-list", settings.locust_cpus, sys.executable, "-m", "locust"),
        *("-f", str(LOCUSTFILE), "--headless", "--users", str(users), "--spawn-rate", str(users)),
        *("--run-time", f"{int(seconds)}s", "--host", f"http://127.0.0.1:{port}", "--only-summary"),
        *("--loglevel", "WARNING", "--exit-code-on-error", "0", "--stop-timeout", "10"),
    ]
    with prefix.with_name(prefix.name + "_locust.log").open("w") as log:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=seconds + 120)
    if result.returncode != 0 or not status_log.exists():
        raise ServiceFailed(f"locust failed with exit code {result.returncode} (see {prefix.name}_locust.log)")
    return summarize(status_log)


def summarize(status_log: Path) -> dict:
    """Useful throughput, 503 share, accepted latency and errors from one run's request log."""
    with status_log.open() as file:
        rows = list(csv.DictReader(file))
    if not rows:
        raise ServiceFailed("no request completed")
    end = np.array([float(row["end_time_s"]) for row in rows])
    latency_ms = np.array([float(row["response_time_ms"]) for row in rows])
    kinds = collections.Counter(row["kind"] for row in rows)
    window_s = float(end.max() - (end - latency_ms / 1000).min())
    accepted = np.array([latency for latency, row in zip(latency_ms, rows, strict=True) if row["kind"] == "ok"])
    summary = {
        "requests": len(rows),
        "window_s": round(window_s, 2),
        "useful_rps": round(kinds["ok"] / window_s, 2),
        "requests_per_s": round(len(rows) / window_s, 2),
        "share_503": round(sum(row["status"] == "503" for row in rows) / len(rows), 4),
        "connection_errors": sum(count for kind, count in kinds.items() if kind.startswith("connection_")),
        "kinds": dict(kinds.most_common()),
    }
    if accepted.size:
        summary.update({f"p{p}_ms_accepted": round(float(np.percentile(accepted, p)), 1) for p in (50, 90, 99)})
        summary["max_ms_accepted"] = round(float(accepted.max()), 1)
    return summary


# --- one service ---------------------------------------------------------------------------------


def find_peak(running: Running, settings: OverloadSettings, image_path: Path, out: Path, name: str) -> dict:
    """The unloaded peak: the best useful throughput, and the smallest concurrency within PEAK_TOLERANCE of it."""
    if settings.peak_users:
        figures = run_locust(
            running.port, settings.peak_users, settings.probe_s, settings, image_path, out / f"{name}_peak"
        )
        progress(f"  peak at {settings.peak_users} users (given): {figures['useful_rps']} req/s")
        return {
            **overload_onset(figures["useful_rps"], settings),
            "users": settings.peak_users,
            "useful_rps": figures["useful_rps"],
            "best_users": settings.peak_users,
            "sweep": [{"users": settings.peak_users, **figures}],
        }
    limit = settings.policy("QUEUE_CAPACITY") * settings.cpus_per_service  # beyond it 503s start: not unloaded
    sweep: list[dict] = []
    for users in (u for u in SWEEP_USERS if u <= limit):
        figures = run_locust(running.port, users, settings.probe_s, settings, image_path, out / f"{name}_sweep_{users}")
        sweep.append({"users": users, **figures})
        progress(
            f"  {users} users: {figures['useful_rps']} req/s, p99 {figures.get('p99_ms_accepted')} ms, "
            f"503s {figures['share_503']:.1%}"
        )
        if figures["share_503"] > 0:
            break  # the queue is full: this is load already
        if len(sweep) >= 3:
            before = max(step["useful_rps"] for step in sweep[:-2])
            if max(step["useful_rps"] for step in sweep[-2:]) < before * (1 + PEAK_TOLERANCE):
                break  # two more steps of concurrency did not help
    best_step = max(sweep, key=lambda step: step["useful_rps"])
    best = best_step["useful_rps"]
    saturating = next(step for step in sweep if step["useful_rps"] >= best * (1 - PEAK_TOLERANCE))
    found = {
        "users": saturating["users"],
        "useful_rps": best,
        "best_users": best_step["users"],
        **overload_onset(best, settings),
        "sweep": sweep,
    }
    progress(
        f"  peak: {best} req/s, reached at {saturating['users']} users; 503s expected beyond "
        f"{found['overload_starts_at_users']} users"
    )
    return found


def overload_onset(peak_rps: float, settings: OverloadSettings) -> dict:
    """From how many users on the policy sends 503s: when the queues and the lines waiting for a
    place in them are full (QUEUE_CAPACITY + MAX_WAITING_REQUESTS), or when the wait for a worker
    (users ahead ÷ peak rate) would pass the deadline, whichever comes first."""
    places = settings.policy("QUEUE_CAPACITY") + settings.policy("MAX_WAITING_REQUESTS")
    queue = places * settings.cpus_per_service
    deadline = math.ceil(peak_rps * settings.policy("REQUEST_TIMEOUT_SECONDS"))
    return {
        "queue_full_at_users": queue,
        "deadline_at_users": deadline,
        "overload_starts_at_users": min(queue, deadline),
    }


def overload_runs(
    running: Running, peak: dict, settings: OverloadSettings, image_path: Path, out: Path, name: str
) -> list[dict]:
    """The overload runs, each between two unloaded runs as long at the concurrency of the
    peak (the sweep's best), its ratio to their mean (see the module docstring)."""
    deadline_ms = settings.policy("REQUEST_TIMEOUT_SECONDS") * 1000
    if settings.users:
        plan = [(users, None) for users in settings.users]
    else:
        plan = [(peak["users"] * multiple, multiple) for multiple in settings.multiples]
    unloaded_users = peak["best_users"]

    def unloaded(index: int) -> float:
        figures = run_locust(
            running.port, unloaded_users, settings.duration_s, settings, image_path, out / f"{name}_unloaded_{index}"
        )
        progress(f"  {unloaded_users} users (unloaded): {figures['useful_rps']} req/s, 503s {figures['share_503']:.1%}")
        return figures["useful_rps"]

    runs = []
    before = unloaded(0)
    for index, (users, multiple) in enumerate(plan, 1):
        with ResourceSampler(running) as sampler:
            figures = run_locust(
                running.port, users, settings.duration_s, settings, image_path, out / f"{name}_overload_{users}"
            )
        after = unloaded(index)
        reference = (before + after) / 2
        ratio = round(figures["useful_rps"] / reference, 3) if reference else None
        p99 = figures.get("p99_ms_accepted")
        found = {
            "users": users,
            "users_vs_peak_users": multiple or round(users / peak["users"], 2),
            "duration_s": settings.duration_s,
            **figures,
            "unloaded_users": unloaded_users,
            "unloaded_rps_before_after": [before, after],
            "useful_rps_vs_peak": ratio,
            "deadline_ms": deadline_ms,
            "meets_target": bool(
                ratio is not None and ratio >= TARGET_RATIO and p99 is not None and p99 <= deadline_ms
            ),
            "resources": sampler.summary(),
        }
        runs.append(found)
        before = after
        progress(
            f"  {users} users: {figures['useful_rps']} useful req/s (×{ratio} of peak), "
            f"503s {figures['share_503']:.1%}, accepted p99 {p99} ms, {figures['connection_errors']} connection errors"
        )
    return runs


def heavy_jpeg() -> bytes:
    """A 7000x5600 JPEG: 39.2 megapixels, just under MAX_PIXELS, 117 MB once decoded."""
    photo = Image.open(photo_paths()["grace_hopper"]).convert("RGB")
    buffer = io.BytesIO()
    photo.resize((7000, 5600), Image.BILINEAR).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


class RssSampler(threading.Thread):
    """The summed RSS of the service's processes every second, each sample tagged with the current phase."""

    def __init__(self, running: Running) -> None:
        super().__init__(daemon=True)
        self.running = running
        self.phase = "idle"
        self.samples: list[tuple[float, str, float]] = []  # (seconds since start, phase, MB)
        self._stopping = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while not self._stopping.is_set():
            rss = 0
            for pid in self.running.pids():
                with contextlib.suppress(psutil.NoSuchProcess):
                    rss += psutil.Process(pid).memory_info().rss
            if rss:
                self.samples.append((round(time.monotonic() - started, 1), self.phase, round(rss / 1e6, 1)))
            self._stopping.wait(1.0)

    def stop(self) -> None:
        self._stopping.set()
        self.join()

    def of(self, *phases: str, last_s: float | None = None) -> list[float]:
        chosen = [(t, mb) for t, phase, mb in self.samples if phase in phases]
        if last_s is not None and chosen:
            chosen = [(t, mb) for t, mb in chosen if t >= chosen[-1][0] - last_s]
        return [mb for _, mb in chosen]


def spike(port: int, seconds: float, max_body: int) -> dict:
    """Large uploads from SPIKE_UPLOADERS clients (a 39-megapixel JPEG, and a body just under
    MAX_BODY_BYTES that is not an image) and SPIKE_CONNECTIONS silent connections, for ``seconds``."""
    heavy = heavy_jpeg()
    junk = b"\xff\xd8\xff" + b"\x00" * (max_body - 3)
    uploads: dict[str, int] = {}
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def uploader(index: int) -> None:
        turn = index
        while time.monotonic() < end:
            body = heavy if turn % 2 == 0 else junk
            turn += 1
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                connection.request("POST", contract.RAW_ROUTE, body=body, headers={"Content-Type": "image/jpeg"})
                response = connection.getresponse()
                response.read()
                outcome = str(response.status)
            except OSError as exc:
                outcome = type(exc).__name__
            finally:
                connection.close()
            with lock:
                uploads[outcome] = uploads.get(outcome, 0) + 1

    silent = []
    for _ in range(SPIKE_CONNECTIONS):
        with contextlib.suppress(OSError):
            silent.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    threads = [threading.Thread(target=uploader, args=(index,), daemon=True) for index in range(SPIKE_UPLOADERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
    for sock in silent:
        sock.close()
    return {"seconds": seconds, "connections_opened": len(silent), "uploads_by_outcome": uploads}


def refusal_cost(make_running, settings: OverloadSettings, image: bytes, name: str) -> dict:
    """CPU time per refusal at the headers (see the module docstring, 3.)."""
    endpoint = ENDPOINTS[settings.endpoint]
    sent = endpoint.request(image)
    fields = "".join(f"{key}: {value}\r\n" for key, value in sent.headers.items())
    head = f"POST {endpoint.route} HTTP/1.1\r\nHost: 127.0.0.1\r\n{fields}Content-Length: {len(sent.body)}\r\n\r\n"
    request = head.encode() + sent.body
    # The stalled upload holds the place for the whole measurement, not BODY_TIMEOUT_SECONDS.
    hold_s = max(REFUSAL_IDLE_S, settings.refusal_s) + REFUSAL_WARMUP_S + settings.refusal_s + 60
    running = make_running(f"{name}_refusals", env={"QUEUE_CAPACITY": "1", "BODY_TIMEOUT_SECONDS": str(hold_s)})
    try:
        running.wait_ready(running.start(), READY_TIMEOUT_S)
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as stalled:
            stalled.sendall(request[: len(head) + 1000])
            time.sleep(0.5)  # it holds the place
            found = _refusals(running, request, settings)
    finally:
        running.stop()
    refused = found["answers"].get("503", 0)
    refusing_cpu_s = found["cpu_s"] - found["idle_cpu_s_per_s"] * found["seconds"]
    found["cpu_ms_per_503"] = round(1000 * refusing_cpu_s / refused, 3) if refused else None
    progress(
        f"  refusals: {refused} 503s in {found['seconds']} s from {REFUSAL_CONNECTIONS} connections, "
        f"{found['cpu_ms_per_503']} ms of the service's CPU each, beyond the "
        f"{1000 * found['idle_cpu_s_per_s']:.1f} ms a second it uses idle (all answers: {_kinds(found['answers'])})"
    )
    return found


def _refusals(running: Running, request: bytes, settings: OverloadSettings) -> dict:
    """REFUSAL_CONNECTIONS clients on one thread (on Locust's CPUs), each sending ``request`` again
    as soon as it is answered, for REFUSAL_WARMUP_S and then settings.refusal_s more, counted."""
    answers: collections.Counter = collections.Counter()

    async def client(until: float, counted: bool) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        try:
            while time.monotonic() < until:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                fields = http.client.parse_headers(io.BytesIO(head.split(b"\r\n", 1)[1]))
                await reader.readexactly(int(fields.get("content-length", 0)))
                if counted:
                    answers[head.split(b" ", 2)[1].decode()] += 1
                if "close" in fields.get("connection", "").lower():
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        except (OSError, asyncio.IncompleteReadError) as error:  # this client ends; the others go on
            if counted:
                answers[f"connection_{type(error).__name__}"] += 1
        finally:
            writer.close()

    async def clients(seconds: float, counted: bool) -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(client(until, counted) for _ in range(REFUSAL_CONNECTIONS)))

    found: dict = {}

    def measure() -> None:
        os.sched_setaffinity(0, {int(cpu) for cpu in settings.locust_cpus.split(",")})  # this thread only
        idle_s = max(REFUSAL_IDLE_S, settings.refusal_s)
        cpu_before, started = usage(running)[0], time.monotonic()
        time.sleep(idle_s)
        found["idle_cpu_s_per_s"] = round((usage(running)[0] - cpu_before) / (time.monotonic() - started), 4)
        asyncio.run(clients(REFUSAL_WARMUP_S, counted=False))
        cpu_before, started = usage(running)[0], time.monotonic()
        asyncio.run(clients(settings.refusal_s, counted=True))
        found["cpu_s"] = round(usage(running)[0] - cpu_before, 3)
        found["seconds"] = round(time.monotonic() - started, 2)

    thread = threading.Thread(target=measure)
    thread.start()
    thread.join()
    return {"connections": REFUSAL_CONNECTIONS, **found, "answers": dict(answers)}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def soak(make_running, settings: OverloadSettings, users: int, image_path: Path, out: Path, name: str) -> dict:
    """RSS idle, under steady load with a spike of large uploads in its middle, and idle again."""
    seconds = settings.soak_s
    spike_at, spike_s = seconds / 3, min(15.0, seconds / 3)
    running = make_running(f"{name}_soak")
    try:
        running.wait_ready(running.start(), READY_TIMEOUT_S)
        # Warmed up first: "idle" is a service that has served, not one that never has.
        run_locust(running.port, 2, settings.warmup_s, settings, image_path, out / f"{name}_soak_warmup")
        sampler = RssSampler(running)
        sampler.start()
        time.sleep(SOAK_IDLE_S)
        sampler.phase = "steady"
        results: dict = {}

        def steady_load() -> None:
            try:
                results["load"] = run_locust(running.port, users, seconds, settings, image_path, out / f"{name}_soak")
            except ServiceFailed as failure:
                results["error"] = str(failure)

        load = threading.Thread(target=steady_load, daemon=True)
        load.start()
        time.sleep(spike_at)
        sampler.phase = "spike"
        spiked = spike(running.port, spike_s, settings.policy("MAX_BODY_BYTES"))
        sampler.phase = "after_spike"
        load.join(seconds + 180)
        sampler.phase = "idle_after"
        time.sleep(SOAK_IDLE_S)
        sampler.stop()
    finally:
        running.stop()
    idle, after = sampler.of("idle"), sampler.of("idle_after", last_s=5)
    summary = {
        "seconds": seconds,
        "users": users,
        "rss_mb_idle": _median(idle),
        "rss_mb_steady": _median(sampler.of("steady")),
        "rss_mb_peak": max(mb for _, _, mb in sampler.samples) if sampler.samples else None,
        "rss_mb_after_spike": _median(sampler.of("after_spike", last_s=5)),
        "rss_mb_idle_after": _median(after),
        "spike": spiked,
        "load": results.get("load"),
        "load_error": results.get("error"),
        "samples": [{"t_s": t, "phase": phase, "rss_mb": mb} for t, phase, mb in sampler.samples],
    }
    if summary["rss_mb_idle"] and summary["rss_mb_idle_after"]:
        summary["idle_after_vs_idle"] = round(summary["rss_mb_idle_after"] / summary["rss_mb_idle"], 3)
    progress(
        f"  soak: RSS idle {summary['rss_mb_idle']} MB, peak {summary['rss_mb_peak']} MB, "
        f"after the spike {summary['rss_mb_after_spike']} MB, idle again {summary['rss_mb_idle_after']} MB; "
        f"spike uploads {spiked['uploads_by_outcome']}"
    )
    return summary


def measure_service(
    service: Service, settings: OverloadSettings, out: Path, image: bytes, acceptable: list[str]
) -> dict:
    name = service.name
    result: dict = {"title": service.title, "status": "failed", "measured": measured_version(service, settings.mode)}
    image_path = out / "image"

    def make_running(log_name: str = name, env: dict[str, str] | None = None) -> Running:
        cpus, workers, log = settings.service_cpus, settings.cpus_per_service, out / f"{log_name}.log"
        env = {**settings.env, **(env or {})}
        if settings.mode == "container":
            return service_container(service, free_port(), cpuset=cpus, workers=workers, log_path=log, env=env)
        return service_process(service, free_port(), cpus=cpus, workers=workers, log_path=log, env=env)

    try:
        running = make_running()
        try:
            ready_s = running.wait_ready(running.start(), READY_TIMEOUT_S)
            check_prediction(running.port, image, acceptable, settings.endpoint)
            progress(f"  ready in {ready_s:.2f} s and answering correctly; warm-up {settings.warmup_s} s")
            run_locust(running.port, 2, settings.warmup_s, settings, image_path, out / f"{name}_warmup")
            result["peak"] = find_peak(running, settings, image_path, out, name)
            if settings.overload:
                result["overload"] = overload_runs(running, result["peak"], settings, image_path, out, name)
        finally:
            running.stop()
        if settings.refusal_s:
            result["refusals"] = refusal_cost(make_running, settings, image, name)
        if settings.soak_s:
            result["soak"] = soak(make_running, settings, result["peak"]["users"], image_path, out, name)
    except (LaunchError, ServiceFailed) as failure:
        result["error"] = str(failure)
        progress(f"  FAILED: {failure}")
        return result
    result["status"] = "ok"
    return result


# --- the run -------------------------------------------------------------------------------------


def run(settings: OverloadSettings) -> dict:
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-overload"
    out = settings.out / run_id
    out.mkdir(parents=True)
    image = load_image(settings.payload)
    (out / "image").write_bytes(image)
    acceptable = acceptable_labels(image)
    progress(
        f"overload run {run_id}: {settings.mode} mode, services on CPU {settings.service_cpus}, "
        f"Locust on CPU {settings.locust_cpus}, results in {out}"
    )
    from importlib.metadata import version

    results: dict = {
        "setup": {
            **run_identity(run_id),
            "mode": settings.mode,
            "versions": {p: version(p) for p in ("bentoml", "onnxruntime", "locust")},
            "settings": {
                "services": [s.name for s in settings.services],
                "cpus_per_service": settings.cpus_per_service,
                "service_cpus": settings.service_cpus,
                "locust_cpus": settings.locust_cpus,
                "workers_per_service": settings.cpus_per_service,
                "endpoint": settings.endpoint,
                "users": settings.users,
                "multiples_of_peak_users": list(settings.multiples),
                "peak_users": settings.peak_users,
                "duration_s": settings.duration_s,
                "probe_s": settings.probe_s,
                "warmup_s": settings.warmup_s,
                "soak_s": settings.soak_s,
                "refusal_s": settings.refusal_s,
                "honor_retry_after": settings.honor_retry_after,
                "target": {"useful_rps_vs_peak_min": TARGET_RATIO, "p99_ms_accepted_max": "deadline_ms"},
            },
            "policy": {
                name: settings.policy(name)
                for name in (
                    "QUEUE_CAPACITY",
                    "MAX_WAITING_REQUESTS",
                    "REQUEST_TIMEOUT_SECONDS",
                    "RETRY_AFTER_SECONDS",
                    "MAX_PENDING_BODY_BYTES",
                    "MAX_BODY_BYTES",
                )
            },
            "payload": {"bytes": len(image), "source": str(settings.payload or "generated (benchmark/payload.py)")},
        },
        "services": {},
    }
    for index, service in enumerate(settings.services, 1):
        progress(f"[{index}/{len(settings.services)}] {service.title}")
        results["services"][service.name] = measure_service(service, settings, out, image, acceptable)
        write(out, results)
    report = markdown(results)
    (out / "report.md").write_text(report)
    print(report)
    progress(f"done: {out / 'report.md'}")
    return results


def _cell(value, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{suffix}" if isinstance(value, float) else f"{value:,}{suffix}"


def _row(cells: list) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind}: {count}" for kind, count in counts.items()) or "—"


OVERLOAD_COLUMNS = [
    "service",
    "users",
    "useful req/s",
    "unloaded req/s before / after",
    "× unloaded",
    "503s",
    "accepted p50 / p99 ms",
    "connection errors",
    "other answers",
    "target",
]
REFUSAL_COLUMNS = ["service", "seconds", "503s", "CPU ms per 503", "CPU ms/s idle (taken off)", "all answers"]
SOAK_COLUMNS = [
    "service",
    "soak s",
    "RSS idle MB",
    "steady MB",
    "peak MB",
    "after spike MB",
    "idle again MB",
    "idle again ÷ idle",
    "spike uploads",
]


def markdown(results: dict) -> str:
    setup = results["setup"]
    settings, policy = setup["settings"], setup["policy"]
    lines = [
        f"# Overload {setup['run_id']}",
        "",
        f"{setup['mode']} mode, {settings['cpus_per_service']} CPU per service, endpoint `{settings['endpoint']}`, "
        f"QUEUE_CAPACITY {policy['QUEUE_CAPACITY']} (+{policy.get('MAX_WAITING_REQUESTS', 0)} waiting), "
        f"deadline {policy['REQUEST_TIMEOUT_SECONDS']} s, "
        f"{'clients honour Retry-After' if settings['honor_retry_after'] else 'clients retry at once'}. "
        f"Target: useful req/s ≥ {TARGET_RATIO:.2f} × unloaded and accepted p99 ≤ the deadline. "
        "Unloaded: the runs at the peak's concurrency just before and after each overload run, as long; "
        "× unloaded is to their mean.",
        "",
        _row(OVERLOAD_COLUMNS),
        _row(["---"] * len(OVERLOAD_COLUMNS)),
    ]
    for name, service in results["services"].items():
        if service.get("status") != "ok":
            lines.append(_row([name, "", "", "", "", "", "", "", f"failed: {service.get('error', '')[:80]}", ""]))
            continue
        peak = service["peak"]
        onset = f"503s expected from {peak['overload_starts_at_users']} users"
        lines.append(_row([name, f"{peak['users']} (peak)", _cell(peak["useful_rps"]), "", "", "", "", "", onset, ""]))
        for found in service.get("overload", []):
            latency = f"{_cell(found.get('p50_ms_accepted'), 0)} / {_cell(found.get('p99_ms_accepted'), 0)}"
            other = {k: v for k, v in found["kinds"].items() if k not in ("ok", "busy")}
            unloaded = " / ".join(_cell(rps) for rps in found["unloaded_rps_before_after"])
            lines.append(
                _row(
                    [
                        name,
                        found["users"],
                        _cell(found["useful_rps"]),
                        f"{unloaded} ({found['unloaded_users']} users)",
                        _cell(found["useful_rps_vs_peak"], 2),
                        _cell(100 * found["share_503"], 1, "%"),
                        latency,
                        found["connection_errors"],
                        _kinds(other),
                        "yes" if found["meets_target"] else "no",
                    ]
                )
            )
    refusals = {name: s["refusals"] for name, s in results["services"].items() if s.get("refusals")}
    if refusals:
        lines += ["", _row(REFUSAL_COLUMNS), _row(["---"] * len(REFUSAL_COLUMNS))]
        for name, found in refusals.items():
            refused = found["answers"].get("503", 0)
            lines.append(
                _row(
                    [
                        name,
                        found["seconds"],
                        refused,
                        _cell(found["cpu_ms_per_503"], 3),
                        _cell(1000 * found["idle_cpu_s_per_s"], 1),
                        _kinds(found["answers"]),
                    ]
                )
            )
    soaks = {name: s["soak"] for name, s in results["services"].items() if s.get("soak")}
    if soaks:
        lines += ["", _row(SOAK_COLUMNS), _row(["---"] * len(SOAK_COLUMNS))]
        for name, soaked in soaks.items():
            lines.append(
                _row(
                    [
                        name,
                        soaked["seconds"],
                        _cell(soaked["rss_mb_idle"]),
                        _cell(soaked["rss_mb_steady"]),
                        _cell(soaked["rss_mb_peak"]),
                        _cell(soaked["rss_mb_after_spike"]),
                        _cell(soaked["rss_mb_idle_after"]),
                        _cell(soaked.get("idle_after_vs_idle"), 2),
                        _kinds(soaked["spike"]["uploads_by_outcome"]),
                    ]
                )
            )
    return "\n".join(lines) + "\n"


# --- command line ----------------------------------------------------------------------------------


def _integers(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--services", default=",".join(SERVICES), help="comma-separated subset of: %(default)s")
    parser.add_argument("--mode", choices=("process", "container"), default="process", help="default: %(default)s")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs (and workers) per service (default 1)")
    parser.add_argument(
        "--users", type=_integers, help="overload concurrencies, e.g. 20,80 (default: --multiples × the peak's)"
    )
    parser.add_argument(
        "--multiples", type=_integers, default=[5, 20], help="of the saturating concurrency (default 5,20)"
    )
    parser.add_argument("--peak-users", type=int, help="the saturating concurrency, measured once instead of swept")
    parser.add_argument("--duration", type=int, default=30, help="seconds per overload run (default 30)")
    parser.add_argument("--probe-seconds", type=int, default=8, help="seconds per step of the peak sweep (default 8)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up seconds (default 5)")
    parser.add_argument("--endpoint", choices=list(ENDPOINTS), default="json")
    parser.add_argument("--payload", type=Path, help="a JPEG/PNG image or a JSON payload (default: generated)")
    parser.add_argument(
        "--soak-seconds", type=int, default=0, help="also soak for this long (RSS under load and a spike)"
    )
    parser.add_argument(
        "--refusal-seconds", type=int, default=0, help="also measure the CPU time of a refusal for this long"
    )
    parser.add_argument("--no-overload", action="store_true", help="only the peak (and the soak, if asked)")
    parser.add_argument("--honor-retry-after", action="store_true", help="users wait Retry-After after a 503")
    parser.add_argument(
        "--env",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="policy override for the services (repeatable), e.g. QUEUE_CAPACITY=16",
    )
    parser.add_argument("--out", type=Path, default=Path("results"), help="output folder (default results/)")


def main(args: argparse.Namespace) -> int:
    names = [name.strip() for name in args.services.split(",") if name.strip()]
    unknown = set(names) - set(SERVICES)
    if unknown:
        print(f"benchmark overload: unknown services: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if args.mode == "container" and docker.available() is not None:
        print(f"benchmark overload: {docker.available()}", file=sys.stderr)
        return 2
    settings = OverloadSettings(
        mode=args.mode,
        services=[SERVICES[name] for name in names],
        cpus_per_service=args.cpus,
        users=args.users,
        multiples=tuple(args.multiples),
        peak_users=args.peak_users,
        duration_s=args.duration,
        probe_s=args.probe_seconds,
        warmup_s=args.warmup,
        endpoint=args.endpoint,
        payload=args.payload,
        out=args.out,
        soak_s=args.soak_seconds,
        refusal_s=args.refusal_seconds,
        overload=not args.no_overload,
        honor_retry_after=args.honor_retry_after,
        env=dict(args.env),
    )
    try:
        settings.check()
    except ValueError as error:
        print(f"benchmark overload: error: {error}", file=sys.stderr)
        return 2
    results = run(settings)
    failed = {name: s.get("error") for name, s in results["services"].items() if s["status"] != "ok"}
    for name, reason in failed.items():
        print(f"benchmark overload: {name} FAILED: {reason}", file=sys.stderr)
    return 1 if failed else 0
