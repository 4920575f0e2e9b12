"""Signals to a service under test, and what became of its processes and its log."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import psutil

from harness.launch import Container, LocalProcess, Running

# How a BentoML worker process is started (BentoML 1.4: `python -m _bentoml_impl.worker.service ...`).
BENTO_WORKER_MODULE = "_bentoml_impl.worker"


def send_signal(running: Running, sig: signal.Signals) -> None:
    """``sig`` to the service's main process only, as Kubernetes and Docker send it (not to its group)."""
    if isinstance(running, LocalProcess):
        assert running.process is not None
        running.process.send_signal(sig)
    elif isinstance(running, Container):
        subprocess.run(["docker", "kill", "--signal", sig.name, running.id], check=True, capture_output=True)
    else:
        raise TypeError(f"cannot signal a {type(running).__name__}")


@contextlib.contextmanager
def frozen(running: Running) -> Iterator[None]:
    """The service's processes stopped (SIGSTOP, or ``docker pause``) for the block, then let
    go on: meanwhile the kernel still accepts its connections and takes in what clients send."""
    if isinstance(running, Container):
        subprocess.run(["docker", "pause", running.id], check=True, capture_output=True)
        try:
            yield
        finally:
            subprocess.run(["docker", "unpause", running.id], check=True, capture_output=True)
        return
    pids = running.pids()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def wait_exit(running: Running, timeout_s: float) -> float | None:
    """time.monotonic() once the service has exited, or None if it still runs after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if running.exited():
            return time.monotonic()
        time.sleep(0.02)
    return None


def bento_workers(running: Running) -> list[psutil.Process]:
    """The BentoML worker processes among the service's descendants."""
    found = []
    for pid in running.pids():
        try:
            process = psutil.Process(pid)
            if any(BENTO_WORKER_MODULE in argument for argument in process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def log_lines(running: Running) -> list[str]:
    return running.logs(100_000).splitlines()
