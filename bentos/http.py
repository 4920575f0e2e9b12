"""The HTTP edge of both BentoML services: docs/contract.md on every predict route.

BentoML parses and validates the requests of its ``@bentoml.api`` methods itself and
answers bad input in its own shapes: pydantic detail lists, a list ``[{"error": ...}]``
for ``InvalidArgument``, 500 for a multipart body without a boundary or for a binary
part it tries to read as JSON. It also fetches a URL given where a file is expected,
and reads bodies of any size. ``ContractGate`` is an ASGI middleware, added with
``Service.add_asgi_middleware`` (BentoML's supported hook; it runs inside BentoML's
metrics middleware, so the metrics count the status the client gets). On the predict
routes it:

* admits a request only if this worker holds fewer than QUEUE_CAPACITY (503 at its
  headers otherwise, with Retry-After; its body is left to the server to discard);
* refuses before BentoML sees the request: a model that is not ready (503), a body over
  the limit (413), one that would take the bytes of bodies still arriving past
  MAX_PENDING_BODY_BYTES (503), one slower than BODY_TIMEOUT_SECONDS (408), a
  Content-Type the route does not take (415), for uploads anything but one file part
  named ``image``, and for raw bodies anything but a JPEG or PNG (400);
* lets it run only once one of the worker's threads is free, in arrival order: 503 if
  that has not happened within REQUEST_TIMEOUT_SECONDS, nothing run if the client left;
* rewrites every error BentoML answers into ``{"error": "..."}``, with a message that
  names the problem where BentoML's body allows it.

On /readyz it answers 503 while the worker is stopping or another worker of the service
is not ready (bentos.server, which also holds what lies below ASGI: the header timeout,
the errors of the HTTP layer, discarding refused bodies, shutdown, crashes, memory).

The shapes it relies on are pinned by tests/test_bentos_http.py, so a BentoML upgrade
that changes them fails there instead of leaking to clients.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

import anyio
import anyio.to_thread
import bentoml
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from bentos import imaging, server, settings
from weather import contract

server.install()  # before BentoML builds the server this module's service runs in

log = logging.getLogger("bentoml.weather")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

INTERNAL_ERROR = "internal error, see the server log"
# How long a request waits for this worker's model to finish loading before it gets 503.
MODEL_WAIT_SECONDS = 60.0
READYZ_ROUTE = "/readyz"  # BentoML's, answered by its app behind the gate


class RequestError(Exception):
    """Bad input: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.message = message
        self.status = int(status)


class ContractGate:
    """ASGI middleware; see the module docstring. One per worker process (BentoML builds one
    app per worker), so its admission counts are the worker's."""

    def __init__(
        self,
        app: Callable[..., Awaitable[None]],
        max_body_bytes: int,
        queue_capacity: int = settings.QUEUE_CAPACITY,
        run_slots: int | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.admission = Admission(
            queue_capacity,
            # As many requests run as the worker has threads to run them (BentoML's
            # `threads`), so none waits inside BentoML, where no deadline applies.
            run_slots or _service_threads(),
            settings.REQUEST_TIMEOUT_SECONDS,
            settings.MAX_PENDING_BODY_BYTES,
        )
        self._announcer: asyncio.Task | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                send = self._on_lifespan(send)
            await self.app(scope, receive, send)
            return
        check = _CHECKS.get(scope["path"])
        if check is None or scope["method"] != "POST":
            if scope["path"] == READYZ_ROUTE and (reason := server.not_ready_reason()) is not None:
                await send_error(send, HTTPStatus.SERVICE_UNAVAILABLE, reason)
                return
            # Not a request to check, but its errors too are JSON (404, 405, /readyz's 503).
            await self.app(scope, receive, _ContractErrors(send))
            return
        admission = self.admission
        if admission.held >= admission.capacity:
            await send_error(send, HTTPStatus.SERVICE_UNAVAILABLE, admission.full_message)
            return
        admission.held += 1
        errors = _ContractErrors(send)
        try:
            try:
                await _check_ready()
                headers = _headers(scope)
                content_type = check.content_type(headers)
                body = await self._read_body(headers, receive)
                check.body(body, content_type)
                await admission.start(receive)
            except RequestError as exc:
                await send_error(send, exc.status, exc.message, close=exc.status == HTTPStatus.REQUEST_TIMEOUT)
                return
            errors.admission = admission  # it gives the run slot back when the answer starts
            if check.forced_content_type is not None:
                scope = dict(scope, headers=_with_content_type(scope["headers"], check.forced_content_type))
            await self.app(scope, _replay(body, receive), errors)
        finally:
            if errors.admission is not None:
                errors.admission = None
                admission.finish()
            admission.held -= 1
        if len(body) >= server.LARGE_BODY_BYTES:
            server.large_body_done()

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        """The body: 413 as soon as it is known to exceed the limit, 503 if the bytes of bodies
        still arriving in this worker would exceed theirs (a declared length is reserved at
        the headers, a chunked body as it grows), 408 if it is slower than BODY_TIMEOUT_SECONDS."""
        limit, admission = self.max_body_bytes, self.admission
        declared = headers.get(b"content-length", b"")
        # The server has checked it is a number below 2^63 (bentos.server).
        reserved = int(declared) if declared.isdigit() else 0
        if reserved > limit:
            raise _too_large(limit)
        admission.reserve(reserved)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(settings.BODY_TIMEOUT_SECONDS):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise RequestError("the client disconnected before sending the whole body")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit)
                    if size > reserved:  # no Content-Length (h11 holds a declared one to its word)
                        admission.reserve(size - reserved, reserved)
                        reserved = size
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise RequestError(
                f"the request body did not arrive within {settings.BODY_TIMEOUT_SECONDS} s",
                HTTPStatus.REQUEST_TIMEOUT,
            ) from None
        finally:
            admission.pending -= reserved
            if size >= server.LARGE_BODY_BYTES:  # refused too (413, 408): its chunks are freed now
                server.large_body_done()

    def _on_lifespan(self, send: Send) -> Send:
        """``send`` of the lifespan: once the app has started, watch for its model to be warm."""

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete" and self._announcer is None:
                server.watch_for_sigterm()
                self._announcer = asyncio.get_running_loop().create_task(_announce_when_loaded())
            elif message["type"].startswith("lifespan.shutdown") and self._announcer is not None:
                self._announcer.cancel()  # stopped before the model loaded
            await send(message)

        return lifespan_send


async def _announce_when_loaded() -> None:
    """Tell the other workers (bentos.server.WorkerBoard) once this one's model has loaded."""
    classifier = getattr(bentoml.get_current_service(), "classifier", None)
    while classifier is not None and not classifier.wait(0):
        await asyncio.sleep(0.05)
    server.worker_loaded(ready=classifier is None or classifier.ready)


def _service_threads() -> int:
    """BentoML's `threads` of the service being served, else the setting it is made from."""
    from bentoml._internal.context import server_context

    threads = server.service_config(server_context.service_name).get("threads") if server_context.service_name else None
    return threads if isinstance(threads, int) and threads > 0 else settings.WORKER_THREADS


class Admission:
    """One worker's predict requests: how many it holds, the bytes of bodies still arriving,
    and its run slots, granted in arrival order.

    Nothing here allocates for a request that finds a slot free; a request that waits gets
    a future, a timer for its deadline and a task that notices its client leaving.
    """

    def __init__(self, capacity: int, slots: int, timeout: float, max_pending: int) -> None:
        self.capacity = capacity
        self.held = 0  # headers in, answer not yet complete
        self.free = slots  # while > 0, nobody waits
        self.waiters: deque[asyncio.Future] = deque()
        self.timeout = timeout
        self.max_pending = max_pending
        self.pending = 0  # bytes reserved by bodies still arriving
        self.full_message = f"the worker is full ({capacity} requests); retry later"

    def reserve(self, size: int, already: int = 0) -> None:
        """Reserve ``size`` more bytes for a body that holds ``already``. A body alone may go
        past the bound (it is bounded by MAX_BODY_BYTES, and refusing it could never end)."""
        if self.pending > already and self.pending + size > self.max_pending:
            raise RequestError(
                f"the worker is full (bodies still arriving would exceed {self.max_pending} bytes); retry later",
                HTTPStatus.SERVICE_UNAVAILABLE,
            )
        self.pending += size

    async def start(self, receive: Receive) -> None:
        """Take a run slot: at once if one is free, else in turn; RequestError if that takes
        longer than the deadline, or if the client disconnects meanwhile."""
        if self.free:
            self.free -= 1
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.waiters.append(waiter)
        deadline = loop.call_later(self.timeout, _settle, waiter, _TIMED_OUT)
        # The body has been read, so receive() returns only when the client disconnects.
        gone = loop.create_task(_disconnected(receive))
        gone.add_done_callback(lambda _: _settle(waiter, _GONE))
        try:
            outcome = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result() is _GRANTED:
                self.finish()
            raise
        finally:
            deadline.cancel()
            gone.cancel()
        if outcome is _GRANTED:
            return
        if outcome is _GONE:
            raise RequestError("the client disconnected before the request could start", HTTPStatus.SERVICE_UNAVAILABLE)
        raise RequestError(
            f"the request could not start within {self.timeout:g} s; retry later", HTTPStatus.SERVICE_UNAVAILABLE
        )

    def finish(self) -> None:
        """A run slot is free again: to the first request still waiting, else back to the pool."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(_GRANTED)
                return
        self.free += 1


_GRANTED, _TIMED_OUT, _GONE = "granted", "timed out", "gone"


def _settle(waiter: asyncio.Future, outcome: str) -> None:
    if not waiter.done():
        waiter.set_result(outcome)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


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


def _too_large(limit: int) -> RequestError:
    return RequestError(f"the request body is larger than {limit} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


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
    """A ``send`` that passes successes through and rewrites error responses; for a request
    that holds a run slot, the slot is given back as soon as its answer starts."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 0
        self.chunks: list[bytes] = []
        self.admission: Admission | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            if self.admission is not None:
                self.admission, admission = None, self.admission
                admission.finish()
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


_RETRY_AFTER = (b"retry-after", str(settings.RETRY_AFTER_SECONDS).encode())
_CLOSE = (b"connection", b"close")


async def send_error(send: Send, status: int, message: str, close: bool = False) -> None:
    """``{"error": message}`` with ``status``; every 503 says when to retry. ``close`` ends the
    connection after it (a client too slow to send its body is not waited for again)."""
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        headers.append(_RETRY_AFTER)
    if close:
        headers.append(_CLOSE)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
