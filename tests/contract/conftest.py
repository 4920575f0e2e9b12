"""Fixtures of the contract suite: which targets, their base URL, a client, the reference."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import pytest

from harness.launch import free_port
from weather.endpoints import ENDPOINTS, Endpoint

from .images import Reference
from .launchers import DOCKER_LAUNCHERS, LAUNCHERS

EXTERNAL = "external"
ALL_LAUNCHERS = {**LAUNCHERS, **DOCKER_LAUNCHERS}


def selected_targets() -> list[str]:
    if os.environ.get("CONTRACT_BASE_URL"):
        return [EXTERNAL]
    names = [name.strip() for name in os.environ.get("CONTRACT_TARGETS", "").split(",") if name.strip()]
    unknown = sorted(set(names) - set(ALL_LAUNCHERS))
    if unknown:
        raise pytest.UsageError(f"CONTRACT_TARGETS: unknown {unknown}; known: {sorted(ALL_LAUNCHERS)}")
    return names or list(LAUNCHERS)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Session scope: pytest runs all tests of one target, stops it, then starts the next.
    if "target" in metafunc.fixturenames:
        metafunc.parametrize("target", selected_targets(), scope="session")


def wait_ready(base_url: str, timeout: float) -> None:
    """Poll GET /readyz of a service someone else started until it answers 200."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    with httpx.Client(base_url=base_url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            try:
                response = client.get("/readyz")
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                last = type(exc).__name__
            time.sleep(0.1)
    pytest.fail(f"{base_url}/readyz was not 200 within {timeout:.0f} s (last: {last})")


@pytest.fixture(scope="session")
def base_url(target: str) -> Iterator[str]:
    if target == EXTERNAL:
        url = os.environ["CONTRACT_BASE_URL"].rstrip("/")
        wait_ready(url, timeout=float(os.environ.get("CONTRACT_READY_TIMEOUT", "60")))
        yield url
        return
    with ALL_LAUNCHERS[target](free_port()) as running:
        yield running.base_url


@pytest.fixture(scope="session")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120.0) as client:
        yield client


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference()


@pytest.fixture(params=list(ENDPOINTS))
def endpoint(request: pytest.FixtureRequest) -> Endpoint:
    """Each way to send an image (docs/contract.md): JSON with base64, upload, raw body."""
    return ENDPOINTS[request.param]
