"""The HTTP edge of both BentoML services: docs/contract.md on every predict route.

BentoML parses and validates the requests of its ``@bentoml.api`` methods itself and
answers bad input in its own shapes: pydantic detail lists, a list ``[{"error": ...}]``
for ``InvalidArgument``, 500 for a multipart body without a boundary or for a binary
part it tries to read as JSON. It also fetches a URL given where a file is expected,
and reads bodies of any size. ``ContractGate`` is an ASGI middleware, added with
``Service.add_asgi_middleware`` (BentoML's supported hook; it runs inside BentoML's
metrics middleware, so the metrics count the status the client gets). On the predict
routes it:

* refuses before BentoML sees the request: a model that is not ready (503), a body over
  the limit (413), a Content-Type the route does not take (415), for uploads anything
  but one file part named ``image``, and for raw bodies anything but a JPEG or PNG (400);
* rewrites every error BentoML answers into ``{"error": "..."}``, with a message that
  names the problem where BentoML's body allows it.

The shapes it relies on are pinned by tests/test_bentos_http.py, so a BentoML upgrade
that changes them fails there instead of leaking to clients.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

import anyio
import anyio.to_thread
import bentoml
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from bentos import imaging
from weather import contract

log = logging.getLogger("bentoml.weather")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

INTERNAL_ERROR = "internal error, see the server log"
# How long a request waits for this worker's model to finish loading before it gets 503.
MODEL_WAIT_SECONDS = 60.0
RETRY_AFTER_SECONDS = "1"


class RequestError(Exception):
    """Bad input: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.message = message
        self.status = int(status)


class ContractGate:
    """ASGI middleware; see the module docstring."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        check = _CHECKS.get(scope["path"])
        if check is None or scope["method"] != "POST":
            # Not a request to check, but its errors too are JSON (404, 405, /readyz's 503).
            await self.app(scope, receive, _ContractErrors(send))
            return
        try:
            await _check_ready()
            headers = _headers(scope)
            content_type = check.content_type(headers)
            body = await read_body(headers, receive, self.max_body_bytes)
            check.body(body, content_type)
        except RequestError as exc:
            await send_error(send, exc.status, exc.message)
            return
        if check.forced_content_type is not None:
            scope = dict(scope, headers=_with_content_type(scope["headers"], check.forced_content_type))
        await self.app(scope, _replay(body, receive), _ContractErrors(send))


async def _check_ready() -> None:
    """503 if the model failed to load, or is still loading after MODEL_WAIT_SECONDS; decided
    before the body is read. The wait is for a worker still loading while another one already
    answers /readyz (a request may reach either)."""
    classifier = getattr(bentoml.get_current_service(), "classifier", None)
    if classifier is None or classifier.ready:
        return
    await anyio.to_thread.run_sync(classifier.wait, MODEL_WAIT_SECONDS)
    if not classifier.ready:
        raise RequestError(classifier.not_ready_reason(), HTTPStatus.SERVICE_UNAVAILABLE)


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in scope["headers"]}


def _with_content_type(headers: list[tuple[bytes, bytes]], content_type: bytes) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in headers if name.lower() != b"content-type"] + [
        (b"content-type", content_type)
    ]


async def read_body(headers: dict[bytes, bytes], receive: Receive, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = RequestError(f"the request body is larger than {limit} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    declared = headers.get(b"content-length", b"")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError("the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the body already read, then waits on the client."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


class _Check:
    """What one route accepts, checked before BentoML parses the request."""

    forced_content_type: bytes | None = None

    def content_type(self, headers: dict[bytes, bytes]) -> tuple[str, dict[bytes, bytes]]:
        kind, options = parse_options_header(headers.get(b"content-type", b""))
        return kind.decode("latin-1").lower(), options

    def body(self, body: bytes, content_type: tuple[str, dict[bytes, bytes]]) -> None:
        """Raise RequestError if BentoML must not see this body."""


class _JsonCheck(_Check):
    # The body is JSON whatever the client declares, as before the typed API: BentoML
    # picks its parser by Content-Type (multipart or pickle for some, JSON for others).
    forced_content_type = b"application/json"

    def content_type(self, headers: dict[bytes, bytes]) -> tuple[str, dict[bytes, bytes]]:
        return "application/json", {}


class _UploadCheck(_Check):
    def content_type(self, headers: dict[bytes, bytes]) -> tuple[str, dict[bytes, bytes]]:
        kind, options = super().content_type(headers)
        if kind != "multipart/form-data":
            raise RequestError(
                f"the body must be multipart/form-data with a file part named '{contract.IMAGE_FIELD}'",
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            )
        if not options.get(b"boundary"):
            raise RequestError("the multipart/form-data Content-Type has no boundary")
        return kind, options

    def body(self, body: bytes, content_type: tuple[str, dict[bytes, bytes]]) -> None:
        check_upload(body, content_type[1][b"boundary"])


class _RawCheck(_Check):
    def content_type(self, headers: dict[bytes, bytes]) -> tuple[str, dict[bytes, bytes]]:
        kind, options = super().content_type(headers)
        if kind not in contract.RAW_CONTENT_TYPES:
            accepted = ", ".join(contract.RAW_CONTENT_TYPES)
            raise RequestError(
                f"the body must be the image file itself, with Content-Type {accepted}",
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            )
        return kind, options

    def body(self, body: bytes, content_type: tuple[str, dict[bytes, bytes]]) -> None:
        # BentoML would fetch a body that reads as a URL; no image file starts like one.
        if not body.startswith(imaging.SIGNATURES):
            raise RequestError(imaging.NOT_AN_IMAGE)


_CHECKS: dict[str, _Check] = {
    contract.PREDICT_ROUTE: _JsonCheck(),
    contract.UPLOAD_ROUTE: _UploadCheck(),
    contract.RAW_ROUTE: _RawCheck(),
}


class _Parts:
    """The headers of each part of a multipart body (the data is not kept)."""

    def __init__(self) -> None:
        self.parts: list[dict[bytes, bytes]] = []
        self.ended = False
        self._field = b""
        self._value = b""

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": lambda: self.parts.append({}),
            "on_header_field": self._on_field,
            "on_header_value": self._on_value,
            "on_header_end": self._on_header_end,
            "on_end": self._on_end,
        }

    def _on_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        self.parts[-1][self._field.lower()] = self._value
        self._field = self._value = b""

    def _on_end(self) -> None:
        self.ended = True


def check_upload(body: bytes, boundary: bytes) -> None:
    """One part, a file (with a filename) named ``image``; anything else is a RequestError.

    Uploads get here before BentoML parses them: BentoML would download a URL given in a
    text field, and answer 500 for a binary part under another name.
    """
    parts = _Parts()
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise RequestError(f"the body is not valid multipart/form-data ({exc})") from None
    if not parts.ended:
        raise RequestError("the multipart/form-data body ends before its closing boundary")
    field = contract.IMAGE_FIELD
    names = []
    for headers in parts.parts:
        disposition, options = parse_options_header(headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or name != field:
            raise RequestError(f"unexpected part {name!r}: the body must hold one file part named '{field}'")
        if b"filename" not in options:
            raise RequestError(f"'{field}' must be a file part (with a filename), not a text field")
        names.append(name)
    if not names:
        raise RequestError(f"'{field}' is missing")
    if len(names) > 1:
        raise RequestError(f"the body holds {len(names)} parts named '{field}'; send one")


class _ContractErrors:
    """A ``send`` that passes successes through and rewrites error responses."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 0
        self.chunks: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.status < 400:
                await self.send(message)
            return
        if self.status < 400 or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            await send_error(self.send, self.status, contract_error(self.status, b"".join(self.chunks)))


# pydantic error types of a JSON body -> the contract's message (as in the Rust service).
_JSON_ERRORS = {
    "json_invalid": "the body is not valid JSON",
    "model_type": "the body must be a JSON object",
    "model_attributes_type": "the body must be a JSON object",
    "dict_type": "the body must be a JSON object",
    "missing": f"'{contract.IMAGE_FIELD}' is missing",
    "string_type": f"'{contract.IMAGE_FIELD}' must be a string (standard base64)",
}


def contract_error(status: int, body: bytes) -> str:
    """The message for an error BentoML answered with ``status`` and ``body``."""
    if status >= 500:
        return _unavailable_or_internal(status)
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("detail"), list) and payload["detail"]:
        return _validation_message(payload["detail"][0])  # pydantic's ValidationError
    if isinstance(payload, list) and payload and isinstance(payload[0], dict):
        payload = payload[0]  # what BentoML makes of a BentoMLException with a 4xx code
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return payload["error"]
    return HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else f"HTTP {status}"


def _validation_message(error: dict) -> str:
    if error.get("type") in _JSON_ERRORS:
        return _JSON_ERRORS[error["type"]]
    location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    message = str(error.get("msg", "is not valid"))
    return f"'{location}': {message}" if location else message


def _unavailable_or_internal(status: int) -> str:
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        # BentoML replaces every 5xx message: this is /readyz before the model (or the model
        # service) is ready, or the batch dispatcher refusing a request it expects to miss
        # MAX_BATCH_LATENCY_MS. The gate answers a model still loading itself, by name.
        return "the service is not ready or is overloaded; retry later"
    return INTERNAL_ERROR


async def send_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        headers.append((b"retry-after", RETRY_AFTER_SECONDS.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
