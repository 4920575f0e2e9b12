"""Launchers that run a container image (``docker run -p PORT:3000``) for the contract suite.

    from .docker_launchers import DOCKER_LAUNCHERS, docker_launcher
    LAUNCHERS["my-image"] = docker_launcher("weather-onnx-service:latest")

``DOCKER_LAUNCHERS`` holds the three images ``make images`` builds (``:latest``), under the
names ``docker-torch``, ``docker-onnx`` and ``docker-rust``. They are not in ``LAUNCHERS`` by
default (building the images takes minutes and the torch image is several GB); see
tests/test_containers.py, which builds the images and runs this suite against each.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator

from .launchers import Launcher, LaunchError, wait_ready


class Container:
    """A running container: its id, base URL and how long it took to become ready."""

    def __init__(self, container_id: str, base_url: str, started: float) -> None:
        self.id = container_id
        self.base_url = base_url
        self.started = started
        self.ready_seconds: float | None = None

    def logs(self, lines: int = 60) -> str:
        result = subprocess.run(["docker", "logs", "--tail", str(lines), self.id], capture_output=True, text=True)
        return result.stdout + result.stderr


@contextlib.contextmanager
def run_container(image: str, port: int, ready_timeout: float = 180.0, cpus: str | None = None, env: dict[str, str] | None = None) -> Iterator[Container]:
    """``docker run -d -p 127.0.0.1:PORT:3000 IMAGE``; yields once /readyz is 200; always removes it."""
    argv = ["docker", "run", "--detach", "--init", "--publish", f"127.0.0.1:{port}:3000"]
    if cpus:
        argv += ["--cpus", cpus]
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    started = time.monotonic()
    result = subprocess.run([*argv, image], capture_output=True, text=True)
    if result.returncode != 0:
        raise LaunchError(f"docker run {image} failed: {result.stderr.strip()}")
    container = Container(result.stdout.strip(), f"http://127.0.0.1:{port}", started)
    try:
        _wait_ready(container, ready_timeout)
        container.ready_seconds = time.monotonic() - started
        yield container
    finally:
        subprocess.run(["docker", "rm", "--force", container.id], capture_output=True)


def _wait_ready(container: Container, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = subprocess.run(["docker", "inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", container.id], capture_output=True, text=True)
        running, _, code = state.stdout.strip().partition(" ")
        if running != "true":
            raise LaunchError(f"the container exited with code {code} before it was ready\n--- docker logs ---\n{container.logs()}")
        try:
            wait_ready(container.base_url, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            return
        except LaunchError:
            if time.monotonic() >= deadline:
                raise LaunchError(f"{container.base_url}/readyz was not 200 within {timeout:.0f} s\n--- docker logs ---\n{container.logs()}") from None


def docker_launcher(image: str, ready_timeout: float = 180.0) -> Launcher:
    """A launcher (see launchers.py) for an image that serves the contract on port 3000."""

    @contextlib.contextmanager
    def launch(port: int) -> Iterator[str]:
        with run_container(image, port, ready_timeout) as container:
            yield container.base_url

    return launch


DOCKER_LAUNCHERS: dict[str, Launcher] = {
    f"docker-{key}": docker_launcher(f"weather-{key}-service:latest") for key in ("torch", "onnx", "rust")
}
