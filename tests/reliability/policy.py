"""The policy values the suite runs the services with, and what every answer must look like.

docs/contract.md, "Under load, slow clients, shutdown": each value is defined in
weather/contract.py and every service reads an environment variable of the same name.
The suite starts its services with small values so that queues fill with a few
requests and timeouts pass in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from weather import contract
from weather.contract import LABELS, SUM_TOLERANCE

from .rawhttp import Response

MIB = 1024 * 1024


@dataclass(frozen=True)
class Policy:
    QUEUE_CAPACITY: int = contract.QUEUE_CAPACITY
    MAX_WAITING_REQUESTS: int = contract.MAX_WAITING_REQUESTS
    REQUEST_TIMEOUT_SECONDS: int = contract.REQUEST_TIMEOUT_SECONDS
    RETRY_AFTER_SECONDS: int = contract.RETRY_AFTER_SECONDS
    HEADER_TIMEOUT_SECONDS: int = contract.HEADER_TIMEOUT_SECONDS
    BODY_TIMEOUT_SECONDS: int = contract.BODY_TIMEOUT_SECONDS
    MAX_PENDING_BODY_BYTES: int = contract.MAX_PENDING_BODY_BYTES
    DISCARD_BODY_BYTES: int = contract.DISCARD_BODY_BYTES
    GRACEFUL_TIMEOUT_SECONDS: int = contract.GRACEFUL_TIMEOUT_SECONDS
    MAX_BODY_BYTES: int = contract.MAX_BODY_BYTES

    def env(self) -> dict[str, str]:
        """The variables that give a service these values."""
        return {field.name: str(getattr(self, field.name)) for field in dataclasses.fields(self)}

    @classmethod
    def from_environment(cls) -> Policy:
        """The values a service someone else started runs with: the same variables here, else the defaults."""
        found = {}
        for field in dataclasses.fields(cls):
            value = os.environ.get(field.name, "").strip()
            if value:
                found[field.name] = int(value)
        return cls(**found)


# The service every test of a target shares (one worker). A queue of 8 lets a handful of
# 40-megapixel images (the heaviest a request may carry) wait longer than the 1 s deadline,
# and a line of 8 waiting for a place lets a few dozen clients overflow it.
# The pending-body bound is above MAX_BODY_BYTES (as the defaults are), so that one body alone
# meets the size limit (413) first, and only several bodies arriving together meet the bound.
SHARED = Policy(
    QUEUE_CAPACITY=8,
    MAX_WAITING_REQUESTS=8,
    REQUEST_TIMEOUT_SECONDS=1,
    HEADER_TIMEOUT_SECONDS=1,
    BODY_TIMEOUT_SECONDS=3,
    MAX_PENDING_BODY_BYTES=32 * MIB,
    GRACEFUL_TIMEOUT_SECONDS=3,  # it is only stopped at the end: quickly
)
# A service a test stops or breaks (SIGTERM, a killed worker, clients leaving): room for 16
# requests in flight, none timing out in the queue, and the contract's shutdown bound.
OWN = dataclasses.replace(
    SHARED,
    QUEUE_CAPACITY=32,
    REQUEST_TIMEOUT_SECONDS=60,
    GRACEFUL_TIMEOUT_SECONDS=contract.GRACEFUL_TIMEOUT_SECONDS,
)

# The exceptions docs/contract.md lists where a server library writes the response itself
# ("Errors of the HTTP layer": Rust, actix-http), in one place. Keys: service name -> case names
# (those of test_http_layer.CASES, and slow-headers / slow-headers-keep-alive of test_slow_clients).
_ACTIX_EMPTY_400 = frozenset(
    {
        "request-line-malformed",
        "request-line-garbage",
        "header-line-without-colon",
        "content-length-negative",
        "content-length-not-a-number",
        "content-length-2^80",
        "content-length-two-values",
    }
)
# The contract's status, but not the JSON body {"error": ...}.
NO_JSON_BODY: Mapping[str, frozenset[str]] = MappingProxyType(
    {"rust": _ACTIX_EMPTY_400 | {"header-of-1-mib", "slow-headers"}}
)
# A reset instead of the answer is allowed ("the connection may then be reset").
MAY_RESET: Mapping[str, frozenset[str]] = MappingProxyType({"rust": frozenset({"header-of-1-mib"})})
# A refusal decided at the headers may come once the body is discarded, so a client that stalls
# mid-body gets it at BODY_TIMEOUT_SECONDS (docs/contract.md, Errors of the HTTP layer).
DEFERRED_REFUSAL: Mapping[str, frozenset[str]] = MappingProxyType({"rust": frozenset({"declared-413"})})
_DEFERRED = (
    "a refusal at the headers comes once the body is discarded, at BODY_TIMEOUT_SECONDS for a stalled "
    "client (docs/contract.md, Errors of the HTTP layer)"
)
# Not required at all, and why.
NOT_REQUIRED: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "rust": {
            "slow-headers-keep-alive": "actix's header timeout covers a connection's first request only "
            "(docs/contract.md, Errors of the HTTP layer)",
            # The stalled uploads within the bound time out (408) when the refused one is answered.
            "pending-bound": _DEFERRED,
            "chunked-over-bound": _DEFERRED,
        }
    }
)


def exception(table: Mapping, target: str, case: str):
    """The entry of an exception table for (target, case), or None."""
    found = table.get(service_name(target), ())
    if isinstance(found, Mapping):
        return found.get(case)
    return case if case in found else None


def refusal_deadline(policy, target: str, case: str) -> float:
    """How long after the headers a refusal decided there may come: at once (1 s), or, where
    DEFERRED_REFUSAL says so, at the body timeout."""
    return policy.BODY_TIMEOUT_SECONDS + 1.0 if exception(DEFERRED_REFUSAL, target, case) else 1.0


def service_name(target: str) -> str:
    """The registry name behind a target: docker-rust -> rust."""
    return target.removeprefix("docker-")


def check_error(response: Response, status: int, target: str | None = None, case: str | None = None) -> None:
    """``status`` with a body {"error": "<message>"}, unless NO_JSON_BODY exempts (target, case)."""
    assert response.status == status, f"expected {status}, got {response.status}: {response.body[:300]!r}"
    if target is not None and case is not None and exception(NO_JSON_BODY, target, case):
        return
    content_type = response.headers.get("content-type", "")
    assert content_type.startswith("application/json"), f"Content-Type {content_type!r}: {response.body[:300]!r}"
    body = json.loads(response.body)
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str), body
    assert body["error"].strip(), body
    assert "Traceback" not in body["error"], body


def check_busy(response: Response, policy: Policy) -> None:
    """A 503 for load: {"error"} and Retry-After."""
    check_error(response, 503)
    assert response.headers.get("retry-after") == str(policy.RETRY_AFTER_SECONDS), response.headers


def prediction_problem(body: bytes) -> str | None:
    """Why a 200 body is not a valid prediction, or None."""
    try:
        answer = json.loads(body)
        probabilities = answer["probabilities"]
        valid = (
            answer["prediction"] in LABELS
            and set(probabilities) == set(LABELS)
            and abs(sum(probabilities.values()) - 1) <= SUM_TOLERANCE
            and abs(answer["probability"] - max(probabilities.values())) <= 1e-6
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"malformed: {body[:200]!r}"
    return None if valid else f"not a valid prediction: {body[:200]!r}"
