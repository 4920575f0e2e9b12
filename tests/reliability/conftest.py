"""Fixtures of the reliability suite: which targets, their services (started with the suite's
policy values), the images the tests send, and what the services' metrics say.

Targets are chosen like the contract suite's: ``RELIABILITY_TARGETS`` (comma-separated; default
the three local processes torch, onnx, rust; docker-torch, docker-onnx, docker-rust run the images
`make images` built), or ``RELIABILITY_BASE_URL`` for a service someone else started, with the
policy values given to this process in the variables the service reads (QUEUE_CAPACITY, ...);
the tests that stop or break a service skip that one.

Every target runs one worker (WORKERS=1), so "a worker holds at most QUEUE_CAPACITY" is the
whole service. Two services per target: the shared one (SHARED policy), and one for the tests
that may leave it broken or stopped (``own_service``, OWN policy: clients leaving, a killed
worker, SIGTERM, in that order), started again only if the last of them left it unusable.
With the contract suite in the same run, pytest groups both suites' tests by target.
"""

from __future__ import annotations

import functools
import io
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image

from benchmark.payload import load_image
from harness.launch import Running, free_port, service_container, service_process
from weather import contract
from weather.photos import photo_paths
from weather.registry import SERVICES

from . import rawhttp
from .policy import OWN, SHARED, Policy

EXTERNAL = "external"
READY_WATCH_S = 1.0  # how long /readyz is watched once it first answers 200
LAUNCHERS: dict[str, Callable[..., Running]] = {
    name: functools.partial(service_process, service) for name, service in SERVICES.items()
}
DOCKER_LAUNCHERS: dict[str, Callable[..., Running]] = {
    f"docker-{name}": functools.partial(service_container, service) for name, service in SERVICES.items()
}
ALL_LAUNCHERS = {**LAUNCHERS, **DOCKER_LAUNCHERS}


@dataclass
class Target:
    """A service under test: where it listens, the policy it runs with, and (if started here) its process."""

    name: str
    port: int
    policy: Policy
    running: Running | None  # None: someone else started it
    # /readyz in the second after it first answered 200: (seconds after, answer)
    after_ready: list[tuple[float, str]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{rawhttp.HOST}:{self.port}"

    @property
    def is_bento(self) -> bool:
        return self.name != EXTERNAL and SERVICES[self.name.removeprefix("docker-")].bento is not None


def selected_targets() -> list[str]:
    if os.environ.get("RELIABILITY_BASE_URL"):
        return [EXTERNAL]
    names = [name.strip() for name in os.environ.get("RELIABILITY_TARGETS", "").split(",") if name.strip()]
    unknown = sorted(set(names) - set(ALL_LAUNCHERS))
    if unknown:
        raise pytest.UsageError(f"RELIABILITY_TARGETS: unknown {unknown}; known: {sorted(ALL_LAUNCHERS)}")
    return names or list(LAUNCHERS)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Session scope: pytest runs all tests of one target, stops it, then starts the next.
    if "target" in metafunc.fixturenames:
        metafunc.parametrize("target", selected_targets(), scope="session")


def launch(target: str, policy: Policy, log_path: Path) -> Running:
    """The target's service with one worker and ``policy``, not yet started."""
    return ALL_LAUNCHERS[target](free_port(), workers=1, env=policy.env(), log_path=log_path)


@pytest.fixture(scope="session")
def service(target: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    if target == EXTERNAL:
        url = httpx.URL(os.environ["RELIABILITY_BASE_URL"])
        assert url.host in ("127.0.0.1", "localhost"), "the suite speaks raw sockets to 127.0.0.1 only"
        wait_steadily_ready(url.port or 80)
        yield Target(EXTERNAL, url.port or 80, Policy.from_environment(), None)
        return
    log_path = tmp_path_factory.mktemp(f"reliability-{target}") / "service.log"
    with launch(target, SHARED, log_path) as running:
        after_ready = watch_readyz(running.port, READY_WATCH_S)
        wait_steadily_ready(running.port)
        yield Target(target, running.port, SHARED, running, after_ready)


class Spare:
    """The target's service for the tests that break or stop it (OWN policy): started on first
    use, and again whenever the last test left it stopped or not ready. The crash test leaves
    it recovered (a worker replaced), so the shutdown test may take it over: one start fewer."""

    def __init__(self, target: str, log_dir: Path) -> None:
        self.target, self.log_dir = target, log_dir
        self.running: Running | None = None
        self.starts = 0

    def get(self) -> Target:
        if self.running is None or self.running.exited() or not _ready(self.running.port):
            self.close()
            self.starts += 1
            running = launch(self.target, OWN, self.log_dir / f"service-{self.starts}.log")
            self.running = running.__enter__()  # started and ready, or stopped again and raising
            wait_steadily_ready(self.running.port)
        return Target(self.target, self.running.port, OWN, self.running)

    def close(self) -> None:
        if self.running is not None:
            self.running.stop()
            self.running = None


def readyz(port: int, timeout_s: float = 5.0) -> str:
    """GET /readyz: its status, or how the connection failed."""
    try:
        return str(rawhttp.exchange(port, rawhttp.head("GET", "/readyz", port=port), timeout_s=timeout_s).status)
    except rawhttp.Failure as failure:
        return failure.kind


def _ready(port: int) -> bool:
    return readyz(port) == "200"


def watch_readyz(port: int, seconds: float) -> list[tuple[float, str]]:
    """/readyz every 50 ms for ``seconds``: (seconds since the start, answer)."""
    started = time.monotonic()
    seen = []
    while time.monotonic() - started < seconds:
        seen.append((round(time.monotonic() - started, 2), readyz(port, timeout_s=2)))
        time.sleep(0.05)
    return seen


def wait_steadily_ready(port: int, timeout_s: float = 60.0) -> None:
    """Until /readyz has answered 200 for half a second running, so one flap after start-up (reported
    by test_readiness) does not fail every test that follows."""
    deadline = time.monotonic() + timeout_s
    since = None
    while time.monotonic() < deadline:
        if readyz(port, timeout_s=2) != "200":
            since = None
        elif since is None:
            since = time.monotonic()
        elif time.monotonic() - since >= 0.5:
            return
        time.sleep(0.05)
    pytest.fail(f"/readyz did not stay 200 for 0.5 s within {timeout_s:.0f} s of the service first being ready")


@pytest.fixture(scope="session")
def spare(target: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spare | None]:
    if target == EXTERNAL:
        yield None
        return
    found = Spare(target, tmp_path_factory.mktemp(f"reliability-{target}-own"))
    yield found
    found.close()


@pytest.fixture
def own_service(spare: Spare | None) -> Target:
    """A service the test may break or stop (OWN policy), ready when handed over."""
    if spare is None:
        pytest.skip("needs a service this suite started (it signals the process)")
    return spare.get()


def _jpeg(width: int, height: int, quality: int) -> bytes:
    photo = Image.open(photo_paths()["grace_hopper"]).convert("RGB")
    buffer = io.BytesIO()
    photo.resize((width, height), Image.BILINEAR).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photo() -> bytes:
    """The benchmark's image: a 1200x727 JPEG, a typical request."""
    return load_image()


@pytest.fixture(scope="session")
def medium() -> bytes:
    """A 4000x3000 JPEG (12 megapixels): a few times the work of a typical request."""
    return _jpeg(4000, 3000, quality=85)


@pytest.fixture(scope="session")
def heavy() -> bytes:
    """A 7000x5600 JPEG (39.2 megapixels, just under MAX_PIXELS): the costliest image a request may
    carry, so a few of them keep one worker busy for longer than the suite's queue deadline."""
    width, height = 7000, 5600
    assert width * height <= contract.MAX_PIXELS
    return _jpeg(width, height, quality=85)


@pytest.fixture(scope="session")
def cost_s(service: Target, medium: bytes, heavy: bytes) -> dict[str, float]:
    """Seconds a medium and a heavy request take on the idle service, alone (the best of three)."""
    found = {}
    for name, image in (("medium", medium), ("heavy", heavy)):
        times = []
        for _ in range(3):
            started = time.monotonic()
            response = rawhttp.exchange(service.port, rawhttp.raw_post(service.port, image), timeout_s=60)
            assert response.status == 200, f"a {name} image alone: {response.status} {response.body[:200]!r}"
            times.append(response.received_at - started)
        found[name] = min(times)
    return found
