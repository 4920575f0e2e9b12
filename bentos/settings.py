"""Everything the services read from the environment, read once at import.

The names are the Rust service's where they mean the same thing, so one set of
variables configures any of the three services:

    WORKERS          worker processes; default one per CPU this process may use: the CPUs
                     it may run on (taskset, docker --cpuset-cpus), bounded by a cgroup CPU
                     quota (docker --cpus), as Rust's available_parallelism counts them.
                     BentoML's own BENTOML_CONFIG_OPTIONS='services.OnnxClassifier.workers=N'
                     overrides it.
    WORKER_THREADS   requests one worker decodes and runs at the same time (default 1)
    INTRA_THREADS    ONNX Runtime intra-op threads / torch threads, per worker (default 1)
    MAX_BODY_BYTES   larger request bodies get 413 (default 16 MiB, the contract's limit)
    MAX_PIXELS       larger images get 400, judged from the header (default 40,000,000)
    MAX_BATCH_SIZE   adaptive batching: up to this many images per model call (default 1: off);
                     the model then runs in a second, batchable service (docs/contract.md)
    MAX_BATCH_LATENCY_MS  BentoML's max_latency_ms for that service (default 60,000): its
                     dispatcher answers 503 to a request it expects to wait longer
    ACCESS_LOG       1 writes BentoML's access log line per request (default 0: off; it costs
                     measurably on one core, and /metrics counts every request and its latency)

Load, slow clients and shutdown (docs/contract.md, "Under load, slow clients, shutdown");
each defaults to weather/contract.py's value of the same name, per worker process:

    QUEUE_CAPACITY           predict requests one worker holds at once (body arriving,
                             waiting or running); one more gets 503 at its headers
    REQUEST_TIMEOUT_SECONDS  a request whose body is in waits at most this long to start (503)
    ANSWER_HEADROOM_MS       answers are planned to leave this long before that deadline
    RETRY_AFTER_SECONDS      the Retry-After of every 503
    HEADER_TIMEOUT_SECONDS   request line and headers must arrive within this (408)
    BODY_TIMEOUT_SECONDS     the body must arrive within this of the headers (408)
    MAX_PENDING_BODY_BYTES   bytes of bodies still arriving one worker holds (503 beyond)
    DISCARD_BODY_BYTES       after refusing a body, this much more is read and discarded
                             before the connection is closed
    GRACEFUL_TIMEOUT_SECONDS after SIGTERM, requests in flight get this long to finish
                             (`bentoml serve --timeout-graceful-shutdown` overrides it)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from weather import contract


def env_int(name: str, default: int) -> int:
    """A positive integer from the environment; unset or empty means ``default``."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdecimal() or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def env_flag(name: str, default: bool) -> bool:
    """0 or 1 from the environment; unset or empty means ``default``."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def usable_cpus() -> int:
    """The CPUs this process may run on, bounded by its cgroup (v2) CPU quota; at least 1."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, math.floor(int(quota) / int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to respect
    return max(cpus, 1)


WORKERS = env_int("WORKERS", 0) or usable_cpus()
WORKER_THREADS = env_int("WORKER_THREADS", 1)
INTRA_THREADS = env_int("INTRA_THREADS", 1)
MAX_BODY_BYTES = env_int("MAX_BODY_BYTES", contract.MAX_BODY_BYTES)
MAX_PIXELS = env_int("MAX_PIXELS", contract.MAX_PIXELS)
MAX_BATCH_SIZE = env_int("MAX_BATCH_SIZE", 1)
MAX_BATCH_LATENCY_MS = env_int("MAX_BATCH_LATENCY_MS", 60_000)
BATCHING = MAX_BATCH_SIZE > 1
ACCESS_LOG = env_flag("ACCESS_LOG", False)
QUEUE_CAPACITY = env_int("QUEUE_CAPACITY", contract.QUEUE_CAPACITY)
MAX_WAITING_REQUESTS = env_int("MAX_WAITING_REQUESTS", contract.MAX_WAITING_REQUESTS)
REQUEST_TIMEOUT_SECONDS = env_int("REQUEST_TIMEOUT_SECONDS", contract.REQUEST_TIMEOUT_SECONDS)
ANSWER_HEADROOM_MS = env_int("ANSWER_HEADROOM_MS", contract.ANSWER_HEADROOM_MS)
RETRY_AFTER_SECONDS = env_int("RETRY_AFTER_SECONDS", contract.RETRY_AFTER_SECONDS)
HEADER_TIMEOUT_SECONDS = env_int("HEADER_TIMEOUT_SECONDS", contract.HEADER_TIMEOUT_SECONDS)
BODY_TIMEOUT_SECONDS = env_int("BODY_TIMEOUT_SECONDS", contract.BODY_TIMEOUT_SECONDS)
MAX_PENDING_BODY_BYTES = env_int("MAX_PENDING_BODY_BYTES", contract.MAX_PENDING_BODY_BYTES)
DISCARD_BODY_BYTES = env_int("DISCARD_BODY_BYTES", contract.DISCARD_BODY_BYTES)
GRACEFUL_TIMEOUT_SECONDS = env_int("GRACEFUL_TIMEOUT_SECONDS", contract.GRACEFUL_TIMEOUT_SECONDS)
