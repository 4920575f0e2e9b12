"""How the contract suite starts the implementations it checks.

A launcher takes a free TCP port and returns a context manager that starts the
target listening on 127.0.0.1:PORT, yields its base URL once ``/readyz`` answers
200, and always stops it on exit. Most targets are one command line:

    LAUNCHERS["rust"] = process_launcher(
        lambda port: [str(REPO / "rust_service/target/release/rust_service"), "--host", "127.0.0.1", "--port", str(port)],
        env={"ORT_DYLIB_PATH": "..."},
    )
    LAUNCHERS["onnx-container"] = process_launcher(
        lambda port: ["docker", "run", "--rm", "--init", "-p", f"127.0.0.1:{port}:3000", "IMAGE"],
        ready_timeout=300,
    )

Anything else can be a ``contextlib.contextmanager`` of its own with the same shape.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ContextManager

import httpx

from benchmark.services import RUST_BINARY, free_port, onnxruntime_library  # noqa: F401  (free_port re-exported)

REPO = Path(__file__).resolve().parents[2]

Launcher = Callable[[int], ContextManager[str]]


class LaunchError(RuntimeError):
    pass


def wait_ready(base_url: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll GET /readyz until 200; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    with httpx.Client(base_url=base_url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise LaunchError(f"the target exited with code {process.returncode} before it was ready{_tail(log)}")
            try:
                response = client.get("/readyz")
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                last = type(exc).__name__
            time.sleep(0.1)
    raise LaunchError(f"{base_url}/readyz was not 200 within {timeout:.0f} s (last: {last}){_tail(log)}")


def _tail(log: Path | None, lines: int = 40) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {log} ---\n" + "\n".join(text)


@contextlib.contextmanager
def run_process(argv: list[str], port: int, env: dict[str, str] | None = None, cwd: Path = REPO, ready_timeout: float = 120.0) -> Iterator[str]:
    """Run ``argv`` in its own process group, yield its base URL when ready, then stop the group."""
    log = Path(tempfile.mkstemp(prefix="contract-target-", suffix=".log")[1])
    base_url = f"http://127.0.0.1:{port}"
    with log.open("wb") as output:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, "BENTOML_DO_NOT_TRACK": "1", **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: workers are stopped with it
        )
        try:
            wait_ready(base_url, ready_timeout, process, log)
            yield base_url
        finally:
            _stop(process)


def _stop(process: subprocess.Popen, grace: float = 20.0) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # Whatever is left of the group (workers that outlived the parent, or a hung parent).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def process_launcher(argv: Callable[[int], list[str]], env: dict[str, str] | None = None, ready_timeout: float = 120.0) -> Launcher:
    """A launcher for a target that is one command line, given the port to listen on."""
    return lambda port: run_process(argv(port), port, env=env, ready_timeout=ready_timeout)


def bentoml_serve(service: str, env: dict[str, str] | None = None) -> Launcher:
    """``bentoml serve SERVICE`` from the repo root, on the models in the local store."""
    return process_launcher(
        lambda port: [sys.executable, "-m", "bentoml", "serve", service, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
    )


def rust_binary(port: int) -> ContextManager[str]:
    """The Rust service's release binary (`cargo build --release` in rust_service/)."""
    if not RUST_BINARY.exists():
        raise LaunchError(f"{RUST_BINARY} is missing: run `cargo build --release --locked` in rust_service/")
    argv = [str(RUST_BINARY), "--host", "127.0.0.1", "--port", str(port)]
    return run_process(argv, port, env={"ORT_DYLIB_PATH": onnxruntime_library()}, ready_timeout=60)


# Name -> launcher; CONTRACT_TARGETS picks some of them (default: all).
LAUNCHERS: dict[str, Launcher] = {
    "bentoml-onnx": bentoml_serve("bentos.onnx_service:OnnxClassifier"),
    "bentoml-torch": bentoml_serve("bentos.torch_service:TorchClassifier"),
    "rust": rust_binary,
}
