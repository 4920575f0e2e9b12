"""Small wrappers around the docker CLI (no SDK: the CLI is all a user needs too)."""

from __future__ import annotations

import json
import shutil
import subprocess


def available() -> str | None:
    """None when a Docker engine answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    try:
        result = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True, timeout=30)
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


def size_mb(image: str) -> float:
    info = inspect_image(image)
    return 0.0 if info is None else info["Size"] / 1e6


def tag(source: str, target: str) -> None:
    subprocess.run(["docker", "tag", source, target], check=True)


def remove_image_if_unused(image: str) -> None:
    """Remove an image that lost its tag, unless a container or another image still uses it."""
    subprocess.run(["docker", "image", "rm", image], capture_output=True)


def pull(image: str, timeout: float = 600) -> bool:
    try:
        return subprocess.run(["docker", "pull", "--quiet", image], capture_output=True, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False
