"""Probes (docs/contract.md): /readyz answers 200 once the model is loaded and warmed up. Once it
has said so, the service is ready: /readyz does not fall back to 503 (a load balancer would send
traffic, then withdraw it), as it must only while stopping or replacing a dead worker."""

from __future__ import annotations

import pytest


def test_readyz_stays_200_once_ready(service):
    if service.running is None:
        pytest.skip("someone else started the service: its first second is gone")
    flaps = [(at, answer) for at, answer in service.after_ready if answer != "200"]
    assert not flaps, (
        f"/readyz after it first answered 200 (seconds after, answer): {flaps[:10]} "
        f"of {len(service.after_ready)} answers in the first second"
    )
