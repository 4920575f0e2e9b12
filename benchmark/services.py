"""The three services under test, and how to start one on given CPUs.

Every service gets the same settings for its size: one worker per CPU and one
intra-op thread per worker (the best for this small model), set through each
service's own configuration knobs.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
RUST_BINARY = REPO / "rust_service" / "target" / "release" / "rust_service"
RUST_CEILING = REPO / "rust_service" / "target" / "release" / "examples" / "ceiling"
CONTAINER_PORT = 3000


@dataclass(frozen=True)
class Service:
    name: str  # torch, onnx, rust
    title: str
    image: str  # container image name
    runtime: str  # the in-process ceiling it is compared with

    def process_command(self, port: int, workers: int) -> tuple[list[str], dict[str, str]]:
        """argv and extra environment to run the service as a local process."""
        threads = {"INTRA_THREADS": "1"}
        if self.name == "rust":
            argv = [str(RUST_BINARY), "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
            return argv, {**threads, "ORT_DYLIB_PATH": onnxruntime_library()}
        target = {"torch": "bentos.torch_service:TorchClassifier", "onnx": "bentos.onnx_service:OnnxClassifier"}[self.name]
        bentoml = str(Path(sys.executable).with_name("bentoml"))
        return [bentoml, "serve", target, "--host", "127.0.0.1", "--port", str(port)], {**threads, "WORKERS": str(workers)}

    def container_command(self, port: int, cpus: str, workers: int, name: str) -> list[str]:
        return [
            "docker", "run", "--detach", "--rm", "--name", name, "--cpuset-cpus", cpus,
            "--publish", f"127.0.0.1:{port}:{CONTAINER_PORT}",
            "--env", f"WORKERS={workers}", "--env", "INTRA_THREADS=1",
            f"{self.image}:latest",
        ]


def onnxruntime_library() -> str:
    """$ORT_DYLIB_PATH, or the ONNX Runtime library inside the installed onnxruntime wheel."""
    if os.environ.get("ORT_DYLIB_PATH"):
        return os.environ["ORT_DYLIB_PATH"]
    import importlib.util

    capi = Path(importlib.util.find_spec("onnxruntime").origin).parent / "capi"
    found = sorted(capi.glob("libonnxruntime.so.1.*"))
    if not found:
        raise ServiceFailed(f"no libonnxruntime.so.1.* in {capi}; set ORT_DYLIB_PATH")
    return str(found[-1])


SERVICES = {
    "torch": Service("torch", "BentoML + PyTorch", "weather-torch-service", runtime="torch"),
    "onnx": Service("onnx", "BentoML + ONNX Runtime", "weather-onnx-service", runtime="onnx"),
    "rust": Service("rust", "Rust (actix-web + ort)", "weather-rust-service", runtime="rust"),
}


class ServiceFailed(Exception):
    """The service did not start, or answered wrongly."""


class Running:
    """One started service: a local process tree or a container."""

    def __init__(self, service: Service, mode: str, port: int, cpus: str, log_path: Path):
        self.service, self.mode, self.port, self.cpus = service, mode, port, cpus
        self.log_path = log_path
        self.container_name = f"weather-bench-{service.name}-{port}"
        self.process: subprocess.Popen | None = None
        self.root_pid: int | None = None

    def start(self) -> float:
        """Start it; returns the monotonic time just before the launch command."""
        workers = len(parse_cpus(self.cpus))
        started = time.monotonic()
        if self.mode == "process":
            argv, extra_env = self.service.process_command(self.port, workers)
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    ["taskset", "--cpu-list", self.cpus, *argv],
                    cwd=REPO, env={**os.environ, **extra_env}, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.root_pid = self.process.pid
        else:
            command = self.service.container_command(self.port, self.cpus, workers, self.container_name)
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise ServiceFailed(f"docker run failed: {result.stderr.strip()[:300]}")
        return started

    def wait_ready(self, started: float, timeout_s: float) -> float:
        """Seconds from launch to the first /readyz 200 (polled every 10 ms)."""
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServiceFailed(f"exited with code {self.process.returncode} before it was ready (log: {self.log_path})")
            status, _ = request(self.port, "GET", "/readyz", timeout=1)
            if status == 200:
                return time.monotonic() - started
            time.sleep(0.01)
        raise ServiceFailed(f"not ready within {timeout_s:.0f} s (log: {self.log_path})")

    def pids(self) -> list[int]:
        if self.root_pid is None and self.mode == "container":
            result = subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", self.container_name], capture_output=True, text=True)
            self.root_pid = int(result.stdout.strip() or 0) or None
        if self.root_pid is None:
            return []
        try:
            root = psutil.Process(self.root_pid)
            return [root.pid] + [child.pid for child in root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        if self.mode == "container":
            with self.log_path.open("ab") as log:
                subprocess.run(["docker", "logs", self.container_name], stdout=log, stderr=subprocess.STDOUT)
            subprocess.run(["docker", "rm", "--force", self.container_name], capture_output=True)
            return
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, 15)
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()
        except ProcessLookupError:
            pass


def request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """(status, body); status 0 when nothing answered."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        return 0, b""
    finally:
        connection.close()


def check_prediction(port: int, payload: bytes, acceptable_labels: list[str]) -> None:
    """One request that must succeed with the expected answer before anything is timed."""
    status, body = request(port, "POST", "/predict", payload)
    if status != 200:
        raise ServiceFailed(f"POST /predict answered {status or 'nothing'}: {body[:200]!r}")
    try:
        answer = json.loads(body)
        prediction, probabilities = answer["prediction"], answer["probabilities"]
    except (ValueError, KeyError, TypeError):
        raise ServiceFailed(f"POST /predict returned a malformed body: {body[:200]!r}") from None
    if prediction not in acceptable_labels:
        raise ServiceFailed(f"wrong answer: predicted {prediction!r}, the reference says {' or '.join(acceptable_labels)}")
    if abs(sum(probabilities.values()) - 1) > 1e-3:
        raise ServiceFailed("wrong answer: probabilities do not sum to 1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_cpus(cpus: str) -> list[int]:
    """'0-1,3' -> [0, 1, 3]."""
    found = []
    for part in cpus.split(","):
        low, _, high = part.partition("-")
        found.extend(range(int(low), int(high or low) + 1))
    return found


def docker_available() -> bool:
    return shutil.which("docker") is not None and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def image_size_mb(image: str) -> float | None:
    result = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", f"{image}:latest"], capture_output=True, text=True)
    return round(int(result.stdout) / 1e6, 1) if result.returncode == 0 else None
