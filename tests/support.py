"""Small helpers shared by the test modules."""

from __future__ import annotations

import socket
import time

from benchmark.services import free_port  # noqa: F401  (re-exported for the tests)


def wait_for_port(port: int, timeout_s: float, process=None) -> None:
    """Return once something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} within {timeout_s} s")
