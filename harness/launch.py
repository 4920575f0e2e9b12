"""Start a service as a local process or a container, wait until it is ready, stop it.

    with service_process(SERVICES["onnx"], free_port()) as running:
        httpx.post(running.base_url + "/predict", ...)

    running = service_container(SERVICES["rust"], free_port(), cpuset="0", workers=1)
    started = running.start()                # the clock starts just before the launch
    seconds = running.wait_ready(started, timeout_s=180)
    ...
    running.stop()

A process runs in a process group of its own (its workers are stopped with it), with
its output in a log file; a container is started detached and always removed.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from harness import REPO, docker
from weather.contract import GRACEFUL_TIMEOUT_SECONDS
from weather.registry import Service

CONTAINER_PORT = 3000  # every image listens here (its EXPOSE)
POLL_S = 0.01  # how often /readyz is asked while a service starts
# A stopped service may finish its requests in flight for GRACEFUL_TIMEOUT_SECONDS
# (docs/contract.md); it is killed only once that, and a margin to exit, has passed.
STOP_MARGIN_S = 10.0
STOP_GRACE_S = GRACEFUL_TIMEOUT_SECONDS + STOP_MARGIN_S


class LaunchError(Exception):
    """A service did not start, or was not ready in time; the message says why (with its log)."""


def free_port() -> int:
    """A port free on 127.0.0.1, below the kernel's ephemeral range. A port from bind(0) would
    come from that range, where other programs keep taking ports after it is released: the
    local ends of outgoing connections, and the ZeroMQ endpoints a bento's circus binds as it
    starts (its greeting once answered a /readyz poll in CI)."""
    ephemeral_from = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = list(range(min(20_000, ephemeral_from // 2), ephemeral_from))
    random.shuffle(ports)
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise LaunchError(f"no free port below {ephemeral_from}")


def wait_for_port(port: int, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Return once something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise LaunchError(f"the process exited with code {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise LaunchError(f"nothing listened on port {port} within {timeout_s:.0f} s")


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, bytes]:
    """(status, body) of one request to 127.0.0.1:port; status 0 when nothing answered."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        return 0, b""
    finally:
        connection.close()


def onnxruntime_library() -> str:
    """$ORT_DYLIB_PATH, or the ONNX Runtime library inside the installed onnxruntime wheel."""
    if os.environ.get("ORT_DYLIB_PATH"):
        return os.environ["ORT_DYLIB_PATH"]
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        raise LaunchError("the onnxruntime package is not installed; set ORT_DYLIB_PATH")
    capi = Path(spec.origin).parent / "capi"
    found = sorted(capi.glob("libonnxruntime.so.1.*"))
    if not found:
        raise LaunchError(f"no libonnxruntime.so.1.* in {capi}; set ORT_DYLIB_PATH")
    return str(found[-1])


def resolve(arguments: Sequence[str], **values: str) -> list[str]:
    """A registry command with its placeholders filled in and a relative program made a repository path."""
    known = {"python": sys.executable, **values}
    if any("{onnxruntime_library}" in argument for argument in arguments):
        known["onnxruntime_library"] = onnxruntime_library()
    try:
        resolved = [argument.format(**known) for argument in arguments]
    except KeyError as missing:
        raise LaunchError(f"no value for {missing} in {' '.join(arguments)}") from None
    program = Path(resolved[0])
    if not program.is_absolute() and "/" in resolved[0]:
        if not (REPO / program).exists():
            raise LaunchError(f"{program} is missing: build it with `make setup`")
        resolved[0] = str(REPO / program)
    return resolved


class Running:
    """A started service; use as a context manager (start, wait until ready, stop)."""

    ready_timeout_s = 180.0

    def __init__(self, port: int) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.started: float | None = None
        self.ready_s: float | None = None  # launch to the first /readyz 200, once known

    def start(self) -> float:
        """Launch it; returns the monotonic time taken just before the launch."""
        raise NotImplementedError

    def exited(self) -> str | None:
        """Why it is no longer running, or None while it runs."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        """The service's processes (for CPU and memory sampling)."""
        raise NotImplementedError

    def logs(self, lines: int = 60) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def wait_ready(self, started: float, timeout_s: float) -> float:
        """Seconds from ``started`` to the first 200 from GET /readyz."""
        deadline = started + timeout_s
        checked = 0.0
        last = "no answer"
        while time.monotonic() < deadline:
            if time.monotonic() - checked > 0.5:  # cheap for a process, a docker call for a container
                checked = time.monotonic()
                reason = self.exited()
                if reason:
                    raise LaunchError(f"{reason} before it was ready\n{self._log_tail()}")
            status, _ = request(self.port, "GET", "/readyz", timeout=1)
            if status == 200:
                return time.monotonic() - started
            last = f"HTTP {status}" if status else "no answer"
            time.sleep(POLL_S)
        raise LaunchError(
            f"{self.base_url}/readyz was not 200 within {timeout_s:.0f} s (last: {last})\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        return f"--- its last log lines ---\n{self.logs(40)}"

    def __enter__(self) -> Running:
        started = self.start()
        try:
            self.ready_s = self.wait_ready(started, self.ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()


class LocalProcess(Running):
    """``argv`` as a local process group, on ``cpus`` (taskset) if given, logging to ``log_path``."""

    def __init__(
        self,
        argv: Sequence[str],
        port: int,
        env: Mapping[str, str] | None = None,
        cpus: str | None = None,
        log_path: Path | None = None,
    ) -> None:
        super().__init__(port)
        self.argv = list(argv)
        self.env = dict(env or {})
        self.cpus = cpus
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="service-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        argv = ["taskset", "--cpu-list", self.cpus, *self.argv] if self.cpus else self.argv
        self.started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv,
                cwd=REPO,
                env={**os.environ, "BENTOML_DO_NOT_TRACK": "1", **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.started

    def exited(self) -> str | None:
        if self.process is None or self.process.poll() is None:
            return None
        return f"it exited with code {self.process.returncode}"

    def pids(self) -> list[int]:
        return _process_tree(self.process.pid) if self.process else []

    def logs(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL to whatever is left after the grace period."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(STOP_GRACE_S)
        # Workers that outlived the parent, or a hung parent.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class Container(Running):
    """``docker run --detach --init -p 127.0.0.1:PORT:3000 [OPTIONS] IMAGE [ARGS]``, always removed by ``stop``."""

    def __init__(
        self,
        image: str,
        port: int,
        env: Mapping[str, str] | None = None,
        cpuset: str | None = None,
        cpus: str | None = None,
        log_path: Path | None = None,
        options: Sequence[str] = (),
        args: Sequence[str] = (),
    ) -> None:
        super().__init__(port)
        self.image = image
        self.env = dict(env or {})
        self.cpuset, self.cpus = cpuset, cpus
        self.log_path = log_path
        self.options, self.args = list(options), list(args)
        self.id: str | None = None

    def start(self) -> float:
        argv = ["docker", "run", "--detach", "--init", "--publish", f"127.0.0.1:{self.port}:{CONTAINER_PORT}"]
        if self.cpuset:
            argv += ["--cpuset-cpus", self.cpuset]
        if self.cpus:
            argv += ["--cpus", self.cpus]
        for key, value in self.env.items():
            argv += ["--env", f"{key}={value}"]
        self.started = time.monotonic()
        result = subprocess.run([*argv, *self.options, self.image, *self.args], capture_output=True, text=True)
        if result.returncode != 0:
            raise LaunchError(f"docker run {self.image} failed: {result.stderr.strip()[:500]}")
        self.id = result.stdout.strip()
        return self.started

    def exited(self) -> str | None:
        if self.id is None:
            return None
        running, code = docker.container_state(self.id)
        return None if running else f"the container exited with code {code}"

    def pids(self) -> list[int]:
        pid = docker.container_pid(self.id) if self.id else None
        return _process_tree(pid) if pid else []

    def logs(self, lines: int = 60) -> str:
        return docker.logs(self.id, lines) if self.id else ""

    def stop(self) -> None:
        if self.id is None:
            return
        if self.log_path is not None:
            with self.log_path.open("a") as log:
                log.write(docker.logs(self.id))
        docker.remove(self.id)
        self.id = None


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants; empty once it is gone."""
    try:
        root = psutil.Process(pid)
        return [root.pid] + [child.pid for child in root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def service_environment(service: Service) -> dict[str, str]:
    """The variables the service's registry entry asks for, placeholders filled in."""
    return {key: resolve([value])[0] for key, value in service.environment.items()}


def service_process(
    service: Service,
    port: int,
    cpus: str | None = None,
    workers: int | None = None,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> LocalProcess:
    """The service from its registry entry, listening on 127.0.0.1:port; ``env`` adds settings."""
    argv = [*resolve(service.command), "--host", "127.0.0.1", "--port", str(port)]
    env = {**service_environment(service), **_concurrency(workers), **(env or {})}
    return LocalProcess(argv, port, env=env, cpus=cpus, log_path=log_path)


def service_container(
    service: Service,
    port: int,
    tag: str = "latest",
    cpuset: str | None = None,
    workers: int | None = None,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Container:
    """The service's image (``make images``) with its port published on 127.0.0.1:port; ``env`` adds settings."""
    env = {**_concurrency(workers), **(env or {})}
    return Container(f"{service.image}:{tag}", port, env=env, cpuset=cpuset, log_path=log_path)


def _concurrency(workers: int | None) -> dict[str, str]:
    """Every service reads the same variables: ``workers`` workers of one intra-op thread each."""
    return {} if workers is None else {"WORKERS": str(workers), "INTRA_THREADS": "1"}
