"""The targets the contract suite starts itself, by name (``CONTRACT_TARGETS``).

    torch, onnx, rust                       each service as a local process (the default)
    docker-torch, docker-onnx, docker-rust  each image `make images` built (``:latest``)

Each comes from its entry in ``weather.registry`` and is started by ``harness.launch``
on a free port; the suite waits for ``/readyz`` and stops it afterwards. The images are
not in the default set: building them takes minutes and the torch image is several GB;
tests/test_containers.py builds the images and runs this suite against each.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from harness.launch import Running, service_container, service_process
from weather.registry import SERVICES

Launcher = Callable[[int], Running]

LAUNCHERS: dict[str, Launcher] = {
    name: functools.partial(service_process, service) for name, service in SERVICES.items()
}
DOCKER_LAUNCHERS: dict[str, Launcher] = {
    f"docker-{name}": functools.partial(service_container, service) for name, service in SERVICES.items()
}
