"""The HTTP edge of both BentoML services: docs/contract.md on every predict route.

BentoML parses and validates the requests of its ``@bentoml.api`` methods itself and
answers bad input in its own shapes: pydantic detail lists, a list ``[{"error": ...}]``
for ``InvalidArgument``, 500 for a multipart body without a boundary or for a binary
part it tries to read as JSON. It also fetches a URL given where a file is expected,
and reads bodies of any size. ``ContractGate`` is an ASGI middleware, added with
``Service.add_asgi_middleware`` (BentoML's supported hook; it runs inside BentoML's
metrics middleware, so the metrics count the status the client gets). On the predict
routes it:

* gives a request a place if this worker holds fewer than QUEUE_CAPACITY; otherwise it
  waits for one at its headers, its body unread, in arrival order, passed over if the
  requests placed ahead would make it late (503 with Retry-After at once if
  MAX_WAITING_REQUESTS already wait; its body is left to the server to discard). That
  wait, and its 503, happen in ``FrontDoor``, below uvicorn's request cycle and BentoML's
  middleware, since under overload most requests are refused there; BentoML's metrics
  still count them;
* refuses before BentoML sees the request: a model that is not ready (503), a body over
  the limit (413), one that would take the bytes of bodies still arriving past
  MAX_PENDING_BODY_BYTES (503), one slower than BODY_TIMEOUT_SECONDS (408), a
  Content-Type the route does not take (415), for uploads anything but one file part
  named ``image``, and for raw bodies anything but a JPEG or PNG (400);
* lets it run only once one of the worker's threads is free, in arrival order, and only
  if it can be answered within REQUEST_TIMEOUT_SECONDS of its headers' arrival (503 otherwise,
  judging by the recent run times); nothing is run if the client left;
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
import functools
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

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

    def __init__(self, app: Callable[..., Awaitable[None]], max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.admission = worker_admission()
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
        admission, loop = self.admission, asyncio.get_running_loop()
        # Set by the FrontDoor: when the headers reached the server's kernel, and, if the
        # request waited there, when it got its place.
        headers_at = scope.get(HEADERS_AT) or loop.time()
        placed_at = scope.get(PLACED_AT) or 0.0
        placed_at_door = PLACED_AT in scope
        answer_by = headers_at + admission.answer_within
        errors = _ContractErrors(send)
        placed = False
        try:
            try:
                content_type, declared = check.head(scope, self.max_body_bytes)
                if not placed_at_door:
                    await admission.enter(answer_by)
                    placed, placed_at = True, loop.time()
                await _check_ready(answer_by)
                body = await self._read_body(declared, receive, headers_at + settings.BODY_TIMEOUT_SECONDS)
                check.body(body, content_type)
                errors.started = await admission.start(receive, answer_by)
            except RequestError as exc:
                await send_error(send, exc.status, exc.message, close=exc.status == HTTPStatus.REQUEST_TIMEOUT)
                return
            errors.admission = admission  # it gives the run slot back when the answer starts
            if check.forced_content_type is not None:
                scope = dict(scope, headers=_with_content_type(scope["headers"], check.forced_content_type))
            await self.app(scope, _replay(body, receive), errors)
            if errors.status == HTTPStatus.OK:
                admission.answered(placed_at)
        finally:
            if errors.admission is not None:
                errors.admission = None
                admission.finish(errors.started)
            if placed:
                admission.leave()
        if len(body) >= server.LARGE_BODY_BYTES:
            server.large_body_done()

    async def _read_body(self, reserved: int, receive: Receive, body_by: float) -> bytes:
        """The body: 413 as soon as it is known to exceed the limit, 503 if the bytes of bodies
        still arriving in this worker would exceed theirs (a declared length is reserved
        before reading, a chunked body as it grows), 408 if it is not in by ``body_by``
        (BODY_TIMEOUT_SECONDS after its headers). ``reserved``: its declared length, or 0."""
        limit, admission = self.max_body_bytes, self.admission
        admission.reserve(reserved)
        chunks, size = [], 0
        try:
            async with asyncio.timeout_at(body_by):
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


# The scope's keys through which the FrontDoor tells the gate when a request's headers
# reached the kernel (loop time), and, if it placed the request, when it did.
HEADERS_AT = "weather.headers_at"
PLACED_AT = "weather.placed_at"


class FrontDoor:
    """Where a worker's predict requests wait for a place when the worker is full: below
    uvicorn's request cycle and all of BentoML's middleware. One per connection (bentos.server
    puts it in front of the app uvicorn serves); it is the app uvicorn calls.

    While the worker is full, ``ContractProtocol`` reads a request's head itself when the
    head begins a read, and asks whether the request ``holds``: if a place is free, or the
    route is not a predict route, or the gate will refuse its headers anyway (415, 413), it
    goes straight on, and the gate takes it a place. Otherwise it waits here, its body unread
    and h11 unaware of it, with no task: a future and a timer in Admission's line.
    Given a place, it goes on to uvicorn as any request, placed (``PLACED_AT`` in its scope); else
    the protocol answers it 503 itself, with no uvicorn cycle. Under overload most requests
    are refused so (at 600 clients that retry at once, five in six for the torch service):
    each such refusal costs the worker no cycle, task, BentoML middleware (tracing spans, a
    timeout task, wrapped messages) or ASGI messages. It is still counted in BentoML's request
    metrics (``_count_in_bentoml_metrics``), but not traced or access-logged.
    """

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app
        self.admission = worker_admission()
        # When the head of the connection's latest request arrived: given to holds(), else set
        # by the protocol once h11 has parsed it.
        self.headers_at = 0.0
        self.placed: float | None = None  # when the request let in got its place
        self._done: Callable[[tuple[int, str] | None], None] | None = None  # while one waits
        self._route = ""

    def holds(self, head: Any, headers_at: float, done: Callable[[tuple[int, str] | None], None]) -> bool:
        """Whether the request of this head (a bentos.server.DoorHead, which arrived at
        ``headers_at``, loop time) waits here. If it does,
        ``done`` is called once the wait ends (from the event loop, never from within this
        call): with None once it has its place, or with the status and message to refuse it with."""
        if head.method != b"POST" or not self.full():
            return False
        try:  # its scope's path, as uvicorn makes it (a root path is never set here)
            route = unquote(head.target.partition(b"?")[0].decode("ascii"))
        except UnicodeDecodeError:
            return False
        check = _CHECKS.get(route)
        if check is None or not check.acceptable({"headers": head.headers}):
            return False
        loop, admission = asyncio.get_running_loop(), self.admission
        self._done, self._route, self.headers_at = done, route, headers_at
        try:
            admission.queue_for_place(headers_at + admission.answer_within, self._settled)
        except RequestError as exc:  # too many wait already
            loop.call_soon(self._refuse, exc.status, exc.message)
        return True

    def full(self) -> bool:
        """Whether a predict request coming now would wait here (if its headers allow)."""
        admission = self.admission
        return admission.held >= admission.capacity

    def abandon(self) -> None:
        """The connection of the request waiting here is gone: it gives up its wait (or the
        place it was given meanwhile)."""
        self._done = None

    def unplace(self) -> None:
        """The request let in never reached the app (its head failed h11's checks after all):
        the place it was given is free again."""
        if self.placed is not None:
            self.placed = None
            self.admission.leave()

    def _settled(self, granted: bool) -> None:
        if self._done is None:  # abandoned
            if granted:
                self.admission.leave()
            return
        if granted:
            self.placed = asyncio.get_running_loop().time()
            done, self._done = self._done, None
            done(None)
        else:
            self._refuse(HTTPStatus.SERVICE_UNAVAILABLE, self.admission.late_message)

    def _refuse(self, status: int, message: str) -> None:
        done, self._done = self._done, None
        if done is not None:
            done((status, message))
            _count_in_bentoml_metrics(self.app, self._route, status, self.headers_at)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        placed, self.placed = self.placed, None
        scope[HEADERS_AT] = self.headers_at
        if placed is None:
            await self.app(scope, receive, send)
            return
        scope[PLACED_AT] = placed
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.leave()


server.front_door = FrontDoor


def _count_in_bentoml_metrics(app: Any, endpoint: str, status: int, headers_at: float) -> None:
    """Count an answer that never passed BentoML's metrics middleware as that middleware
    (bentoml/_internal/server/http/instruments.py) would have: in its own counter and
    histogram, with its labels. tests/test_bentos_reliability.py checks the count."""
    metrics = _metrics_middleware(app)
    if metrics is None or not getattr(metrics, "_is_setup", False):
        return
    total, duration = _bentoml_metrics(metrics, endpoint, status)
    total.inc()
    duration.observe(max(asyncio.get_running_loop().time() - headers_at, 0.0))


@functools.cache
def _bentoml_metrics(metrics: Any, endpoint: str, status: int) -> tuple[Any, Any]:
    """The request counter and duration histogram of ``metrics`` for these labels (a
    worker's labels are fixed, so each is looked up once)."""
    from bentoml._internal.context import server_context

    labels = {
        "endpoint": endpoint,
        "service_name": server_context.bento_name,
        "service_version": server_context.bento_version,
        "http_response_code": status,
        "runner_name": server_context.service_name,
    }
    return metrics.metrics_request_total.labels(**labels), metrics.metrics_request_duration.labels(**labels)


@functools.cache
def _metrics_middleware(app: Any) -> Any:
    """BentoML's metrics middleware in ``app``, found by following each layer's ``app``
    (``middleware_stack`` for Starlette's); None if metrics are off."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    for _ in range(32):  # a handful of layers; bounded in case of a cycle
        if isinstance(app, RunnerTrafficMetricsMiddleware):
            return app
        app = getattr(app, "middleware_stack", None) or getattr(app, "app", None)
        if app is None:
            break
    return None


@functools.cache
def worker_admission() -> Admission:
    """This worker's Admission, shared by its FrontDoor and its gate."""
    return Admission(
        settings.QUEUE_CAPACITY,
        settings.MAX_WAITING_REQUESTS,
        # As many requests run as the worker has threads to run them (BentoML's `threads`),
        # so none waits inside BentoML, where no deadline applies.
        _service_threads(),
        settings.REQUEST_TIMEOUT_SECONDS,
        settings.MAX_PENDING_BODY_BYTES,
        headroom=settings.ANSWER_HEADROOM_MS / 1000,
    )


def _service_threads() -> int:
    """BentoML's `threads` of the service being served, else the setting it is made from."""
    from bentoml._internal.context import server_context

    threads = server.service_config(server_context.service_name).get("threads") if server_context.service_name else None
    return threads if isinstance(threads, int) and threads > 0 else settings.WORKER_THREADS


class Admission:
    """One worker's predict requests: their places, the bytes of bodies still arriving, and
    the run slots, each granted in arrival order to the requests that can still be answered.

    A request takes a place at its headers, or waits for one there with its body unread
    (uvicorn stops reading a connection once 64 KiB of its body are buffered, so TCP holds
    the client back), and keeps it until answered; then it takes a run slot once its body is
    in. Every request is answered, or refused with 503, by its ``answer_by``: its headers
    plus REQUEST_TIMEOUT_SECONDS less ANSWER_HEADROOM_MS. How long a run takes is the
    recent mean (``expected_run``). A place is not given to a request that could not be
    answered in time behind the requests already placed (``time_to_answer``), nor a slot to
    one whose run would end late: it is passed over, waits on (so that a client retrying at once is held
    back as long as its deadline allows) and gets 503 when a run could no longer end by its
    deadline. Under overload a request that is given a place is then served: none is
    refused after its body was read, which would cost the worker the reading for nothing.

    Nothing here allocates for a request that finds a place and a slot free; one that waits
    gets a future, a timer for its deadline and, for a slot, a task that notices its client
    leaving.
    """

    def __init__(
        self, capacity: int, max_waiting: int, slots: int, timeout: float, max_pending: int, headroom: float = 0.0
    ) -> None:
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.held = 0  # places taken: headers in, answer not yet complete
        self.entering: deque[_Waiter] = deque()  # waiting at their headers for a place
        self.waiting = 0  # waiting at their headers, passed over or not
        self.slots = slots
        self.free = slots  # run slots; while > 0, nobody waits for one
        self.waiters: deque[_Waiter] = deque()
        self.timeout = timeout
        # A request's answer_by: its headers plus this (ANSWER_HEADROOM_MS before the deadline).
        self.answer_within = max(timeout - headroom, 0.0)
        self.expected_run = 0.0  # seconds: the mean of recent runs (slot taken to answer started)
        self.held_for = TimeInPlace()  # of the requests answered
        self.max_pending = max_pending
        self.pending = 0  # bytes reserved by bodies still arriving
        self.full_message = f"the worker is full ({capacity} requests, {max_waiting} more waiting); retry later"
        self.late_message = f"the request could not be answered within {timeout:g} s; retry later"

    async def enter(self, answer_by: float) -> None:
        """Take a place: at once if one is free, else in turn, while a run could still end by
        ``answer_by``. RequestError (503) at once if ``max_waiting`` requests already wait,
        or once no run could."""
        if self.held < self.capacity:
            self.held += 1
            return
        if self.waiting >= self.max_waiting:
            raise RequestError(self.full_message, HTTPStatus.SERVICE_UNAVAILABLE)
        self.waiting += 1
        try:
            outcome = await self._wait(self.entering, answer_by, self.leave)
        finally:
            self.waiting -= 1
        if outcome is not _GRANTED:
            raise RequestError(self.late_message, HTTPStatus.SERVICE_UNAVAILABLE)

    def queue_for_place(self, answer_by: float, settled: Callable[[bool], None]) -> None:
        """Wait for a place as ``enter`` does once none is free, with no task: ``settled`` is
        called with True once the place is given, with False once no run could end by
        ``answer_by``. RequestError (503) at once if ``max_waiting`` requests already wait."""
        if self.waiting >= self.max_waiting:
            raise RequestError(self.full_message, HTTPStatus.SERVICE_UNAVAILABLE)
        self.waiting += 1
        waiter, deadline = self._join(self.entering, answer_by)

        def done(_: asyncio.Future) -> None:
            self.waiting -= 1
            self._part(self.entering, waiter, deadline)
            settled(waiter.granted)

        waiter.future.add_done_callback(done)

    def leave(self) -> None:
        """A request's place is free: to the first request waiting at its headers that could
        be answered in time behind the others placed, else back."""
        entering = self.entering  # the estimate is worked out only when someone waits
        if not (entering and _grant_first(entering, asyncio.get_running_loop().time() + self.time_to_answer())):
            self.held -= 1

    def answered(self, placed_at: float) -> None:
        """A request placed at ``placed_at`` has been answered (before it ``leave``s)."""
        self.held_for.add(asyncio.get_running_loop().time() - placed_at)

    def time_to_answer(self) -> float:
        """How long a request given a place now should expect to wait for its answer: the
        longer of the runs of the requests placed ahead (``capacity`` runs over ``slots``, at
        the mean run), which answers for a load that has just risen, and the bound the recent
        answered requests' time in place gives, which answers for one that has lasted: it
        covers what a count of runs leaves out (reading the body, the HTTP work of the other
        requests on the same core, a run slower than the mean), and its margin keeps nearly
        all, not half, of the requests placed at the last moment within their deadline."""
        return max(self.expected_run * self.capacity / self.slots, self.held_for.bound())

    def reserve(self, size: int, already: int = 0) -> None:
        """Reserve ``size`` more bytes for a body that holds ``already``. A body alone may go
        past the bound (it is bounded by MAX_BODY_BYTES, and refusing it could never end)."""
        if self.pending > already and self.pending + size > self.max_pending:
            raise RequestError(
                f"the worker is full (bodies still arriving would exceed {self.max_pending} bytes); retry later",
                HTTPStatus.SERVICE_UNAVAILABLE,
            )
        self.pending += size

    async def start(self, receive: Receive, answer_by: float) -> float:
        """Take a run slot: at once if one is free, else in turn; RequestError (503) if the run
        could not end by ``answer_by``, or if the client disconnects meanwhile. Returns when
        the run starts, for ``finish``."""
        loop = asyncio.get_running_loop()
        if self.free and loop.time() <= answer_by - self.expected_run:
            self.free -= 1
            return loop.time()
        if not self.free:
            # The body has been read, so receive() returns only when the client disconnects.
            outcome = await self._wait(self.waiters, answer_by, self.finish, receive)
            if outcome is _GONE:
                raise RequestError(
                    "the client disconnected before the request could start", HTTPStatus.SERVICE_UNAVAILABLE
                )
            if outcome is _GRANTED:
                return loop.time()
        raise RequestError(self.late_message, HTTPStatus.SERVICE_UNAVAILABLE)

    def finish(self, started: float | None = None) -> None:
        """A run slot is free again (its run began at ``started``, if it ran): to the first
        request still waiting whose run could end in time, else back to the pool."""
        now = asyncio.get_running_loop().time()
        if started is not None:
            self.expected_run += RUN_WEIGHT * (now - started - self.expected_run)
        if not _grant_first(self.waiters, now + self.expected_run):
            self.free += 1

    async def _wait(
        self, line: deque[_Waiter], answer_by: float, give_back: Callable[[], None], receive: Receive | None = None
    ) -> str:
        """Wait in ``line`` to be granted (_GRANTED), until a run could no longer end by
        ``answer_by`` (_TIMED_OUT), or, given ``receive``, for the client to leave (_GONE)."""
        waiter, deadline = self._join(line, answer_by)
        gone = None
        if receive is not None:
            gone = asyncio.get_running_loop().create_task(_disconnected(receive))
            gone.add_done_callback(lambda _: server.settle(waiter.future, _GONE))
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.granted:
                give_back()
            raise
        finally:
            if gone is not None:
                gone.cancel()
            self._part(line, waiter, deadline)

    def _join(self, line: deque[_Waiter], answer_by: float) -> tuple[_Waiter, asyncio.TimerHandle]:
        """A new waiter at the end of ``line``, and the timer that ends its wait once a run
        could no longer end by ``answer_by``."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(answer_by, loop.create_future())
        line.append(waiter)
        return waiter, loop.call_at(answer_by - self.expected_run, server.settle, waiter.future, _TIMED_OUT)

    @staticmethod
    def _part(line: deque[_Waiter], waiter: _Waiter, deadline: asyncio.TimerHandle) -> None:
        """A wait in ``line`` is over."""
        deadline.cancel()
        if waiter.in_line:  # neither granted nor passed over: it no longer counts as waiting
            waiter.in_line = False
            line.remove(waiter)  # (the first waiters, usually: the line is in deadline order)


# The weight of the latest run in the mean run time (Admission.expected_run).
RUN_WEIGHT = 0.25


class TimeInPlace:
    """How long answered requests held their place: the smoothed mean and mean deviation,
    as TCP keeps a round-trip time (RFC 6298, weights 1/8 and 1/4); ``bound`` is the mean plus
    four deviations, 0 before the first answer (as in the Rust service's admission.rs)."""

    __slots__ = ("deviation", "mean")

    def __init__(self) -> None:
        self.mean: float | None = None
        self.deviation = 0.0

    def add(self, sample: float) -> None:
        if self.mean is None:
            self.mean, self.deviation = sample, sample / 2
            return
        error = sample - self.mean
        self.deviation += (abs(error) - self.deviation) / 4
        self.mean += error / 8

    def bound(self) -> float:
        return 0.0 if self.mean is None else self.mean + 4 * self.deviation


_GRANTED, _TIMED_OUT, _GONE = "granted", "timed out", "gone"


@dataclass(slots=True, eq=False)
class _Waiter:
    """A request waiting in one of Admission's lines."""

    answer_by: float
    future: asyncio.Future
    # Still in its line. A waiter passed over leaves it before its wait ends: searching the
    # line for it then would walk the whole line, and format the error with its repr.
    in_line: bool = True

    @property
    def granted(self) -> bool:
        future = self.future
        return future.done() and not future.cancelled() and future.result() is _GRANTED


def _grant_first(line: deque[_Waiter], answered_at: float) -> bool:
    """Grant the first waiter of ``line`` still waiting that, granted now, would be answered
    by ``answered_at`` within its deadline; False if there is none. Those before it are
    passed over for good (they came first, so their deadlines are the earliest: none of
    them could make it later either) and wait for their deadline's timer."""
    while line:
        waiter = line.popleft()
        waiter.in_line = False
        if not waiter.future.done() and answered_at <= waiter.answer_by:
            waiter.future.set_result(_GRANTED)
            return True
    return False


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _check_ready(answer_by: float) -> None:
    """503 if the model failed to load, or is still loading after MODEL_WAIT_SECONDS or at
    ``answer_by``, whichever is first; decided before the body is read. The wait is for a
    worker still loading while another one already answers /readyz (a request may reach either)."""
    classifier = getattr(bentoml.get_current_service(), "classifier", None)
    if classifier is None or classifier.ready:
        return
    wait = min(MODEL_WAIT_SECONDS, max(answer_by - asyncio.get_running_loop().time(), 0.0))
    await anyio.to_thread.run_sync(classifier.wait, wait)
    if not classifier.ready:
        raise RequestError(classifier.not_ready_reason(), HTTPStatus.SERVICE_UNAVAILABLE)


def _declared_length(headers: dict[bytes, bytes], limit: int) -> int:
    """The body's declared length (0 if chunked); 413 at once if it exceeds ``limit``."""
    declared = headers.get(b"content-length", b"")
    # The server has checked it is a number below 2^63 (bentos.server).
    length = int(declared) if declared.isdigit() else 0
    if length > limit:
        raise _too_large(limit)
    return length


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

    def head(self, scope: Scope, max_body_bytes: int) -> tuple[tuple[str, dict[bytes, bytes]], int]:
        """The request's content type and declared body length, once its headers pass (415,
        400, 413 otherwise)."""
        headers = _headers(scope)
        return self.content_type(headers), _declared_length(headers, max_body_bytes)

    def acceptable(self, scope: Scope) -> bool:
        """Whether its headers pass ``head``, i.e. the gate would let the request wait for a place."""
        try:
            self.head(scope, settings.MAX_BODY_BYTES)
        except RequestError:
            return False
        return True

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
        self.started: float | None = None  # when its run began

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            if self.admission is not None:
                self.admission, admission = None, self.admission
                admission.finish(self.started)
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


async def send_error(send: Send, status: int, message: str, close: bool = False) -> None:
    """``{"error": message}`` with ``status``; every 503 says when to retry. ``close`` ends the
    connection after it (a client too slow to send its body is not waited for again)."""
    headers, body = server.error_message(status, message, close)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
