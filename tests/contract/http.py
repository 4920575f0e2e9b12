"""Sending an image through an endpoint, and what every error response must look like."""

from __future__ import annotations

import httpx

from weather.endpoints import Endpoint


def send(client: httpx.Client, endpoint: Endpoint, image: bytes) -> httpx.Response:
    request = endpoint.request(image)
    return client.post(endpoint.route, content=request.body, headers=dict(request.headers))


def check_error(response: httpx.Response, status: int) -> str:
    """The response is ``status`` with a body ``{"error": "<message>"}``; returns the message."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text[:300]}"
    assert response.headers["content-type"].startswith("application/json"), response.headers["content-type"]
    body = response.json()
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str), body
    assert body["error"].strip(), body
    assert "Traceback" not in body["error"]
    return body["error"]
