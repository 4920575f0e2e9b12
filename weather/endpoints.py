"""The three ways to send an image (docs/contract.md), as requests a client builds.

Used by everything that sends images to the services: the contract suite, the
locustfile and the benchmark. Torch- and bentoml-free, so the Locust process may
import it.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from weather import contract


@dataclass(frozen=True)
class Request:
    body: bytes
    headers: Mapping[str, str]


def json_request(image: bytes) -> Request:
    body = json.dumps({contract.IMAGE_FIELD: base64.b64encode(image).decode("ascii")}).encode()
    return Request(body, {"Content-Type": "application/json"})


def multipart(parts: list[tuple[str, str | None, bytes]]) -> Request:
    """A multipart/form-data body of (name, filename or None for a text field, data) parts."""
    boundary = f"model-serving-{secrets.token_hex(12)}"
    chunks = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode())
        if filename is not None:
            chunks.append(b"Content-Type: application/octet-stream\r\n")
        chunks += [b"\r\n", data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return Request(b"".join(chunks), {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def upload_request(image: bytes) -> Request:
    return multipart([(contract.IMAGE_FIELD, "image", image)])


def raw_request(image: bytes) -> Request:
    # The declared type does not have to match: services recognise the format from the bytes.
    return Request(image, {"Content-Type": "application/octet-stream"})


@dataclass(frozen=True)
class Endpoint:
    name: str  # the key on command lines and in results.json
    route: str
    request: Callable[[bytes], Request]  # an image file -> the request that sends it


ENDPOINTS: Mapping[str, Endpoint] = MappingProxyType(
    {
        "json": Endpoint("json", contract.PREDICT_ROUTE, json_request),
        "upload": Endpoint("upload", contract.UPLOAD_ROUTE, upload_request),
        "raw": Endpoint("raw", contract.RAW_ROUTE, raw_request),
    }
)
