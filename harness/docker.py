"""Small wrappers around the docker CLI (no SDK: the CLI is all a user needs too)."""

from __future__ import annotations

import json
import shutil
import subprocess

# Labels on the images `make images` builds (containers/build.py).
BASE_ID_LABEL = "org.model-serving.base-image-id"  # the ID of the base image it was built on
BENTO_LABEL = "org.model-serving.bento"  # the bento (name:version) it packages
MODEL_LABEL = "org.model-serving.model"  # the model (name:version) it serves


def available() -> str | None:
    """None when a Docker engine answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    try:
        result = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer within 30 s"
    if result.returncode != 0 or not result.stdout.strip():
        return f"no Docker engine: {result.stderr.strip() or 'docker version failed'}"
    return None


def buildx_available() -> bool:
    return subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0


def inspect_image(image: str) -> dict | None:
    result = subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)[0]


def image_id(image: str) -> str | None:
    info = inspect_image(image)
    return info["Id"] if info else None


def label(image: str, key: str) -> str | None:
    info = inspect_image(image)
    return None if info is None else (info["Config"].get("Labels") or {}).get(key)


def size_mb(image: str) -> float | None:
    info = inspect_image(image)
    return None if info is None else info["Size"] / 1e6


def tag(source: str, target: str) -> None:
    subprocess.run(["docker", "tag", source, target], check=True)


def remove_image_if_unused(image: str) -> None:
    """Remove an image that lost its tag, unless a container or another image still uses it."""
    subprocess.run(["docker", "image", "rm", image], capture_output=True)


def pull(image: str, timeout: float = 600) -> bool:
    try:
        return (
            subprocess.run(["docker", "pull", "--quiet", image], capture_output=True, timeout=timeout).returncode == 0
        )
    except subprocess.TimeoutExpired:
        return False


def container_pid(container: str) -> int | None:
    """The host PID of the container's first process, None once it is gone."""
    result = subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", container], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return int(result.stdout.strip() or 0) or None  # 0 once the container has stopped


def container_state(container: str) -> tuple[bool, str]:
    """(running, exit code) of a container; (False, "gone") when it no longer exists."""
    result = subprocess.run(
        ["docker", "inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", container],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        return False, "gone"
    running, _, code = result.stdout.strip().partition(" ")
    return running == "true", code


def logs(container: str, lines: int | None = None) -> str:
    tail = ["--tail", str(lines)] if lines else []
    result = subprocess.run(["docker", "logs", *tail, container], capture_output=True, text=True)
    return result.stdout + result.stderr


def remove(container: str) -> None:
    subprocess.run(["docker", "rm", "--force", container], capture_output=True)
