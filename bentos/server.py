"""Below the ASGI app: the processes and the HTTP server of ``bentoml serve``, held to
docs/contract.md ("Under load, slow clients, shutdown").

``bentoml serve`` (BentoML 1.4.39) is a circus arbiter that binds one listening TCP socket
and hands it to every worker process it spawns (``_bentoml_impl.worker.service``, passed as
``--fd``; no SO_REUSEPORT, so the kernel gives each new connection to whichever process
accepts first). Each worker runs uvicorn on it, speaking HTTP/1.1 with h11 (httptools is not
installed), and answers /readyz for itself. What the contract needs there and neither has:

* ``ContractProtocol`` (each worker's connections): uvicorn's h11 protocol with a header
  timeout (408), the contract's status and JSON body for the errors of the HTTP layer (400,
  431, and a Content-Length below 2^63), a bounded discard of a body answered before it was
  read, graceful closes (stop writing, then read and discard what the client still sends,
  so that it reads the answer instead of a reset), and the shutdown: responses carry
  ``Connection: close``, idle keep-alive connections are closed (never reset), and requests
  cut off by the graceful timeout get a JSON 503 instead of uvicorn's plain-text 500. A
  predict request that must wait for a place (bentos.http.FrontDoor) is held back at its
  head, read here with h11's grammar (``door_head``); refused, it is answered and its body
  counted off here, with no uvicorn cycle, task or h11 work for it. Reads go into one
  buffer of the worker's (``_Reader``), a head's worth at a time while the worker is full,
  so that such a body is only ever counted off in it, never copied out. A request's
  deadline counts from when its head reached the kernel (``received_ago``, asked just
  before the read that takes it), not from when the worker got round to reading it.
* ``WorkerBoard``: which workers have loaded their model, so any worker answers /readyz
  for the whole service (503 while one is missing, e.g. dead and being replaced).
* The arbiter (``_patch_arbiter``): on SIGTERM it closes its copy of the listening socket
  first, so new connections are refused instead of waiting in a backlog no worker accepts
  from; a worker that dies is logged as an error, reaped and replaced at once (SIGCHLD),
  even in a container; and while no worker has loaded its model, the arbiter answers on
  the port itself (``_Standby``): 503 for /readyz, instead of no answer at all.
* BentoML's TimeoutMiddleware, replaced by one that cancels its timer once a request is
  over: BentoML's kept every request's future, context and tracing span for its 60 s.
* Memory: soon after large requests, their garbage is collected and the free memory glibc
  still holds is given back (``reclaim_memory``). glibc's own mmap threshold is left
  alone: fixing it at 1 MiB, as this module once did, made every decoded photo (2.6 MB for
  the benchmark's) a fresh mapping, page-faulted in on every request: 1.3 ms a request in
  the ONNX worker, 11% of its throughput, and no better memory after a spike.

``install()`` runs when bentos.http is imported, i.e. when ``load()`` imports the service
module: in the arbiter before it is created (serve_http), in a worker before it builds its
``uvicorn.Config`` (_bentoml_impl/worker/service.py). Each reliance on BentoML's, circus'
or uvicorn's internals is commented where it is made, and tests/test_bentos_reliability.py
fails if one of them no longer holds.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any, NamedTuple

import h11
import uvicorn.config
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # uvicorn's h11_impl imports it too
from h11._readers import ContentLengthReader, header_field_re, request_line_re  # h11's grammar
from uvicorn.protocols.http.flow_control import CLOSE_HEADER
from uvicorn.protocols.http.h11_impl import H11Protocol

from bentos import settings

log = logging.getLogger("bentoml.weather")

# A closing connection (see ContractProtocol._close_gracefully) is closed for good once the
# client has sent nothing for this long: it has read the answer and will not close its side.
LINGER_SECONDS = 1.0
# At shutdown, a keep-alive connection between requests may have the next one in flight;
# it gets this long to arrive (and is answered, with Connection: close) before the close.
SHUTDOWN_IDLE_SECONDS = 0.5
# Bodies at least this large leave garbage worth collecting once answered (reclaim_memory).
LARGE_BODY_BYTES = 1 << 20
# The most a Content-Length may say (docs/contract.md: a decimal number below 2^63).
CONTENT_LENGTH_LIMIT = 1 << 63
# struct tcp_info (linux/tcp.h): the offset of tcpi_last_data_recv, milliseconds since the
# connection last received data, and how much of the struct to ask for to get it.
_LAST_DATA_RECV = 52
_TCP_INFO_BYTES = _LAST_DATA_RECV + 4
# The sockets received_ago can ask about (none where the platform has no TCP_INFO).
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6) if hasattr(socket, "TCP_INFO") else ()
# Wraps the app a worker's connections serve: bentos.http sets its FrontDoor (this module
# does not import bentos.http, which imports it).
front_door: Any = None


# --- one worker process's state --------------------------------------------------------------

_stopping = False


def _mark_stopping() -> None:
    global _stopping
    if not _stopping:
        _stopping = True
        if _board is not None:
            _board.withdraw()
        log.info("stopping: /readyz answers 503, responses close their connections")


def _begin_stopping(server_state: Any) -> None:
    """Called by uvicorn's shutdown (through ContractProtocol.shutdown), for each connection."""
    _mark_stopping()
    if CLOSE_HEADER not in server_state.default_headers:
        # Every response from now on, on every connection, says the connection ends with it.
        server_state.default_headers = [*server_state.default_headers, CLOSE_HEADER]


def watch_for_sigterm() -> None:
    """Mark this worker stopping the moment SIGTERM arrives, then let uvicorn's handler run.

    Called at the app's startup, when uvicorn has put its own handler in place (Server.serve
    captures the signals before it starts the lifespan); uvicorn only acts on it at its next
    tick (up to 0.1 s later), and /readyz must say 503 at once. Without this (another uvicorn),
    ContractProtocol.shutdown still marks it, at that tick.
    """
    from bentoml._internal.context import server_context

    if server_context.worker_index is None or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return  # not uvicorn's handler: leave the signal alone

    def on_sigterm(signum: int, frame: Any) -> None:
        _mark_stopping()
        previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def not_ready_reason() -> str | None:
    """Why /readyz must answer 503 whatever this worker's model says, or None."""
    if _stopping:
        return "the service is stopping"
    if _board is None and os.environ.get(BOARD_ENV):
        # Not announced yet: until it is, the arbiter may still answer on the port itself.
        return "the model is still loading"
    if _board is not None:
        missing = _board.missing()
        if missing is not None:
            return f"worker {missing} is not ready (starting, or replacing one that died)"
    return None


class WorkerBoard:
    """Which workers of one `bentoml serve` have loaded their model: a file per worker slot,
    in a directory that arbiter made for them (``BOARD_ENV``).

    A worker writes its slot's file (its pid, start time, and whether its model is ready or
    failed) once loading has ended, and removes it when it stops. A worker killed outright
    leaves its file behind, so a file counts only while that very process is alive: its pid
    runs, is not a zombie, and started when the file says. circus gives a replacement the
    same slot (the lowest free worker id); it writes the file again once it has loaded.
    """

    def __init__(self, directory: Path, service: str, worker: int, workers: int) -> None:
        self.directory = directory
        self.service = service
        self.worker = worker
        self.workers = workers

    def _path(self, worker: int) -> Path:
        return self.directory / f"{self.service}.{worker}"

    def announce(self, ready: bool) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        pid = os.getpid()
        path = self._path(self.worker)
        scratch = path.with_name(f".{path.name}.{pid}")
        scratch.write_text(f"{pid} {_start_time(pid)} {'ready' if ready else 'failed'}")
        scratch.replace(path)  # atomic: a reader sees the old file or the new one

    def withdraw(self) -> None:
        path = self._path(self.worker)
        try:
            if path.read_text().split()[0] == str(os.getpid()):
                path.unlink()
        except (OSError, IndexError):
            pass  # not announced (or already replaced by another process)

    def missing(self) -> int | None:
        """The first worker slot whose worker is not ready, or None when all are."""
        for worker in range(1, self.workers + 1):
            if _announced(self._path(worker)) != "ready":
                return worker
        return None


def any_worker_loaded(directory: Path) -> bool:
    """Whether a live worker of any service of this board has loaded its model (or failed to)."""
    try:
        return any(_announced(path) for path in directory.iterdir() if not path.name.startswith("."))
    except OSError:
        return False


def _announced(path: Path) -> str | None:
    """What a live worker announced in ``path`` ("ready" or "failed"), or None."""
    try:
        pid, started, state = path.read_text().split()
    except (OSError, ValueError):
        return None
    return state if _start_time(int(pid)) == started else None


def _start_time(pid: int) -> str | None:
    """The start time of a live (not zombie) process, from /proc; None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return None if fields[0] in ("Z", "X") else fields[19]  # state; starttime (field 22)


# The board's directory, made private by each arbiter and given to its workers in their environment.
BOARD_ENV = "BENTOS_WORKER_BOARD"


_board: WorkerBoard | None = None


def service_config(name: str) -> dict:
    """BentoML's resolved configuration of a service (its workers, threads, ...), or {}."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    try:
        return dict(BentoMLContainer.config.services[name].get() or {})
    except (KeyError, TypeError):  # no BentoML configuration loaded (not a served service)
        return {}


def worker_loaded(ready: bool) -> None:
    """Called once this worker's model has loaded (or failed to): tidy memory, then tell the
    other workers and the arbiter."""
    from bentoml._internal.context import server_context

    if server_context.worker_index is None:
        return  # not a `bentoml serve` worker (a test client, a script)
    # Freezing what start-up made (the modules, the model) keeps later full collections,
    # reclaim_memory's included, from walking it again: they take milliseconds, not the
    # 100 ms (ONNX) to 340 ms (torch) measured here. Only the young garbage is collected
    # first, which is quick; a full collection now would delay readiness as long.
    gc.collect(1)
    gc.freeze()
    global _board
    if _board is None and os.environ.get(BOARD_ENV):  # set by the arbiter (_patch_arbiter)
        name = server_context.service_name
        workers = service_config(name).get("workers") or settings.WORKERS
        if not isinstance(workers, int):  # "cpu_count": BentoML counts the CPUs it may use
            workers = settings.usable_cpus()
        _board = WorkerBoard(Path(os.environ[BOARD_ENV]), name, server_context.worker_index, workers)
    if _board is not None and not _stopping:
        _board.announce(ready)


# --- memory ----------------------------------------------------------------------------------

_libc: Any = None
_reclaim_pending = False


def _load_libc() -> Any:
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            _libc = libc if hasattr(libc, "malloc_trim") else False
        except OSError:  # not glibc (musl, macOS): nothing to trim
            _libc = False
    return _libc


def large_body_done() -> None:
    """A request with a large body has been answered: reclaim its memory soon, once for a burst."""
    global _reclaim_pending
    if not _reclaim_pending:
        _reclaim_pending = True
        asyncio.get_running_loop().call_later(1.0, reclaim_memory)


def reclaim_memory() -> None:
    """Free what large requests left: their garbage (BentoML and anyio keep a failed request's
    exception, its frames and so its body in reference cycles, which only the cycle collector
    frees) and the free memory glibc still holds."""
    global _reclaim_pending
    _reclaim_pending = False
    gc.collect()
    libc = _load_libc()
    if libc:
        libc.malloc_trim(0)


# --- the HTTP protocol -----------------------------------------------------------------------


RETRY_AFTER_HEADER = (b"retry-after", str(settings.RETRY_AFTER_SECONDS).encode())


def received_ago(sock: Any) -> float | None:
    """Seconds (to the kernel's clock tick) since the TCP socket ``sock`` last received
    data, or None if it cannot tell (not TCP, not Linux). Asked before a read, while data
    waits unread, it says how long the newest of that data has waited: no longer than the
    oldest, so a deadline counted from it is never shortened by more than the wait. Once
    the read has opened the receive window, the rest of a body floods in and the answer
    is about 0."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCP_INFO_BYTES:
        return None
    return int.from_bytes(info[_LAST_DATA_RECV:_TCP_INFO_BYTES], sys.byteorder) / 1000


def error_message(status: int, message: str, close: bool = False) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The contract's error answer: its headers and its ``{"error": message}`` body. Every 503
    says when to retry; ``close`` ends the connection after it."""
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        headers.append(RETRY_AFTER_HEADER)
    if close:
        headers.append(CLOSE_HEADER)
    return headers, body


def error_response(status: int, message: str, close: bool = True, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """A complete HTTP/1.1 response with the contract's JSON error body after ``headers``,
    closing the connection unless ``close`` is False."""
    own, body = error_message(status, message, close)
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode("latin-1")]
    head += [name + b": " + value + b"\r\n" for name, value in (*headers, *own)]
    return b"".join(head) + b"\r\n" + body


# The refusals at the front door, by (status, message, kept alive): uvicorn's default headers
# they were made with, and their bytes.
_door_responses: dict[tuple[int, str, bool], tuple[list, bytes]] = {}


class DoorHead(NamedTuple):
    """A request head read by ContractProtocol itself, for the front door (``door_head``)."""

    raw: bytes  # the request line and headers, through the blank line
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # names in lower case, as in an ASGI scope
    length: int  # the body's (Content-Length)
    keep_alive: bool  # whether the connection may go on after the answer, as h11 would judge


# Headers after which h11 and uvicorn do more than frame a body of a declared length.
_BEYOND_THE_DOOR = frozenset((b"transfer-encoding", b"upgrade", b"expect"))


def door_head(raw: bytes) -> DoorHead | None:
    """The POST request of ``raw`` (a request line and headers ending in a blank line, all
    CRLF), if h11 would parse it alike and frame its body by its Content-Length alone; None
    otherwise (h11 then reads it: it may fold a line, or answer 400). Checked with h11's own
    grammar, as h11 checks it; the rest (hosts, lengths) is checked more strictly than h11."""
    lines = raw[:-4].split(b"\r\n")
    line = request_line_re.fullmatch(lines[0])
    if line is None or line["method"] != b"POST" or line["http_version"] not in (b"1.1", b"1.0"):
        return None
    keep_alive = line["http_version"] == b"1.1"
    headers, length, hosts = [], None, 0
    for text in lines[1:]:
        field = header_field_re.fullmatch(text)
        if field is None:
            return None
        name, value = field["field_name"].lower(), field["field_value"]
        if name == b"content-length":
            if length is not None or not content_length_allowed(value):
                return None
            length = int(value)
        elif name == b"host":
            hosts += 1
        elif name == b"connection":
            keep_alive = keep_alive and b"close" not in [token.strip().lower() for token in value.split(b",")]
        elif name in _BEYOND_THE_DOOR:
            return None
        headers.append((name, value))
    if length is None:
        length = 0  # as h11 frames a request without one
    if hosts > 1 or (hosts == 0 and line["http_version"] == b"1.1"):
        return None
    return DoorHead(raw, line["method"], line["target"], headers, length, keep_alive)


def content_length_allowed(value: bytes) -> bool:
    """Whether a Content-Length can frame a body: a decimal number below 2^63. h11 checks it
    is decimal but cannot say how large (a 5,000-digit one would even fail int())."""
    return value.isdigit() and len(value) <= 19 and int(value) < CONTENT_LENGTH_LIMIT


class _Connection(h11.Connection):
    """h11's server side, which also has the protocol check each request's head as it is
    parsed, and keeps the protocol error it raised (uvicorn drops it)."""

    def __init__(self, protocol: ContractProtocol, max_incomplete_event_size: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size)
        self.protocol: ContractProtocol | None = protocol
        self.error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            event = super().next_event()
            if type(event) is h11.Request and self.protocol is not None:
                self.protocol.request_head(event)
        except h11.RemoteProtocolError as exc:
            self.error = exc
            raise
        return event


# Where every connection of a worker reads (the transport calls _Reader). What is kept is
# copied out at once; what is only counted off (a body refused at the front door, what a
# closing connection is still sent) is not copied out at all. As large as uvloop's own reads.
_READ_BUFFER = memoryview(bytearray(256_000))


class _Reader(asyncio.BufferedProtocol):
    """What the transport calls for a ContractProtocol, which picks the buffer each read goes
    to (ContractProtocol.read_into). uvloop reads into a protocol's buffer only if that
    protocol is not an asyncio.Protocol, which uvicorn's is, hence this one."""

    def __init__(self, protocol: ContractProtocol) -> None:
        # Bound once: the transport calls them with no extra frame.
        self.get_buffer = protocol.read_into
        self.buffer_updated = protocol.have_read
        self.eof_received = protocol.eof_received
        self.connection_lost = protocol.connection_lost
        self.pause_writing = protocol.pause_writing
        self.resume_writing = protocol.resume_writing


class _Transport:
    """The transport as uvicorn's code sees it: every close it asks for is a graceful one."""

    def __init__(self, transport: asyncio.Transport, protocol: ContractProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        # The calls of every request, bound once: no extra frame on the hot path.
        self.write = transport.write
        self.get_extra_info = transport.get_extra_info
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading

    def close(self) -> None:
        self._protocol._close_gracefully()

    def is_closing(self) -> bool:
        return self._protocol._closing or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class ContractProtocol(H11Protocol):
    """uvicorn's h11 protocol held to the contract's HTTP layer (see the module docstring).

    A connection is in one of these states: waiting for a request head (the header timeout
    runs once the client has started one, or from the connection's opening), in a request
    (uvicorn's), discarding the rest of a body the app answered early (bounded by
    DISCARD_BODY_BYTES and BODY_TIMEOUT_SECONDS), or closing (nothing more is written; what
    the client sends is read and discarded until it closes, goes quiet, or sends too much).
    """

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict, _loop: Any = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        if config.timeout_graceful_shutdown is None:
            # `bentoml serve` passes None unless --timeout-graceful-shutdown is given, and
            # uvicorn then waits for requests in flight for ever.
            config.timeout_graceful_shutdown = settings.GRACEFUL_TIMEOUT_SECONDS
        self.header_limit = config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        self.conn = _Connection(self, self.header_limit)
        self.door = None if front_door is None else front_door(self.app)
        if self.door is not None:
            self.app = self.door
        self._raw: asyncio.Transport = None  # type: ignore[assignment]
        self._socket: Any = None  # the connection's, to ask the kernel when data came (None: not TCP)
        # When the bytes of the read being parsed reached the kernel, if that read was of a
        # request head (read_into); else None, and a head in it counts from its parsing.
        self._read_arrived_at: float | None = None
        self._head_since = 0.0  # when the wait for the current request head began
        self._timer: asyncio.TimerHandle | None = None  # header timeout, or the discard's deadline
        self._discard_left = 0  # > 0 while discarding a body answered early
        self._door_head: DoorHead | None = None  # the request waiting at the front door
        self._door_rest: memoryview | bytes = b""  # what came after its head, kept from h11
        self._door_skip = 0  # > 0 while counting off a body refused at the front door
        self._idle_timer: asyncio.TimerHandle | None = None  # shutdown's wait for a last request
        self._cutoff_timer: asyncio.TimerHandle | None = None  # shutdown's end of a request in flight
        self._closing = False
        self._close_left = 0
        self._close_quiet_since = 0.0
        self._close_until = 0.0

    # -- uvicorn's protocol interface --

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        sock = transport.get_extra_info("socket")
        self._socket = sock if sock is not None and sock.family in _TCP_FAMILIES else None
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]
        transport.set_protocol(_Reader(self))
        self._head_since = self.loop.time()
        self._timer = self.loop.call_later(settings.HEADER_TIMEOUT_SECONDS, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self._leave_door()
        self.conn.protocol = None  # the reference cycle would keep both alive until a collection
        super().connection_lost(exc)

    def read_into(self, sizehint: int) -> memoryview:
        """Where the transport reads next (_Reader.get_buffer): while the worker is full and
        the connection awaits a request head, a head's worth (header_limit), so that the body
        of a request that waits at the front door stays in the kernel until it is let in (and
        read) or refused (and counted off in the buffer, never copied out); else the whole buffer.
        A read that may hold a request head first asks the kernel how long ago what it will
        read arrived (``_read_arrived_at``)."""
        awaits_head = self.conn.their_state is h11.IDLE and not self._door_skip and not self._closing
        self._read_arrived_at = self._arrival() if awaits_head else None
        door = self.door
        if awaits_head and door is not None and door.full():
            return _READ_BUFFER[: self.header_limit]
        return _READ_BUFFER

    def _arrival(self) -> float | None:
        """When what the next read takes arrived, in loop time, if the kernel can tell. From the
        clock, not loop.time(): uvloop's is the time its current iteration began, which at
        hundreds of connections is long past by the last of their reads."""
        if self._socket is None:
            return None
        ago = received_ago(self._socket)
        return None if ago is None else time.monotonic() - ago

    def have_read(self, size: int) -> None:
        """``size`` bytes have been read into the buffer (_Reader.buffer_updated)."""
        data = _READ_BUFFER[:size]
        self.data_received(data if self._closing or self._door_skip else bytes(data))

    def data_received(self, data: bytes | memoryview) -> None:  # type: ignore[override]
        """What the client sent; a view of the read buffer only while it is to be counted off."""
        if self._closing:
            self._discard_while_closing(len(data))
            return
        if self._idle_timer is not None:  # stopping, and the last request has come
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._door_skip:
            self._skip_door_body(data)
            return
        if self._discard_left:
            self._discard_left -= len(data)
            if self._discard_left <= 0:  # more than DISCARD_BODY_BYTES: give up on this client
                self._abort()
                return
            data = self._skip_refused_body(data)
            if not data:
                return
        if self._door_head is not None:  # reading is paused, but what was read waits with it
            self._door_rest = bytes(self._door_rest) + data
            return
        if self.door is not None and self.door.full() and self._wait_at_door(data):
            return
        super().data_received(data)
        self._after_events()

    def _wait_at_door(self, data: bytes) -> bool:
        """With the worker full, a predict request whose head begins ``data`` whole waits at
        the front door, read here (door_head) and not by h11: refused, it costs no h11 work
        at all, its body no copy into h11's buffer. Let in, h11 gets it as it came. True if
        it waits. Any other request (its head split across reads, h11 already holding bytes,
        a head door_head leaves to h11) goes to uvicorn, where the gate's own wait takes it."""
        conn = self.conn
        if conn.their_state is not h11.IDLE or conn.trailing_data[0] or self.limit_concurrency is not None:
            # uvicorn's own concurrency limit (BentoML sets none) might not hand a request let
            # in to the door, which gives the place back once the request it let in is answered.
            return False
        end = data.find(b"\r\n\r\n", 0, self.header_limit)
        head = door_head(data[: end + 4]) if end >= 0 else None
        if head is None or not self.door.holds(head, self._head_arrived_at(), self._door_done):
            return False
        self._unset_keepalive_if_required()
        self._cancel_timer()  # the header timeout: the head is in
        self._door_head, self._door_rest = head, memoryview(data)[end + 4 :]
        self.flow.pause_reading()  # TCP holds the client back while it waits
        return True

    def _after_events(self) -> None:
        """What follows uvicorn's handling of the events h11 parsed."""
        conn = self.conn
        if self._discard_left and (conn.their_state is not h11.SEND_BODY or conn.our_state is not h11.DONE):
            # The refused body has ended (the next request may have begun in the same data,
            # and h11 moved on to it): the connection goes on, kept alive as after any response.
            self._discard_left = 0
            self._idle_again()
        self._watch_head()

    def _idle_again(self) -> None:
        """A refused body has ended: the connection is kept alive as after any response."""
        self._cancel_timer()
        self._head_since = self.loop.time()
        if self.conn.their_state is h11.IDLE and self.timeout_keep_alive_task is None:
            handler = self.timeout_keep_alive_handler
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, handler)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._closing:
            return
        self._head_since = self.loop.time()
        conn = self.conn
        if conn.our_state is h11.DONE and conn.their_state is h11.SEND_BODY:
            # Answered before its body ended (413, 503, 408): uvicorn reads the rest and
            # drops it, as it would any amount for any time; the contract bounds both.
            self._discard_left = settings.DISCARD_BODY_BYTES + 1
            self._cancel_timer()
            self._timer = self.loop.call_later(settings.BODY_TIMEOUT_SECONDS, self._abort)
        else:
            self._watch_head()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to an h11.RemoteProtocolError: the contract's status and JSON body."""
        error = self.conn.error
        status = error.error_status_hint if error is not None else HTTPStatus.BAD_REQUEST
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self._close_gracefully()  # a response is under way or done: nothing more to say
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The app is reading this request's body: it stops there, and what it answers is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        if status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE:
            message = f"the request line and headers are larger than {self.header_limit} bytes"
        else:
            message = f"the request is not valid HTTP/1.1 ({error or msg})"
        self._respond_and_close(status, message)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown, for each open connection once the listener is closed."""
        _begin_stopping(self.server_state)
        if self._closing or self._door_head is not None:
            return  # a request at the door: its answer, or _door_done, sees to it
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
            if not cycle.response_started:  # it will say so; connections opened since do too
                cycle.default_headers = [*cycle.default_headers, CLOSE_HEADER]
                # uvicorn cancels what still runs timeout_graceful_shutdown after this (and
                # after the 0.1 s it sleeps first), answering a plain-text 500; just before,
                # the contract's JSON 503 goes out instead.
                timeout = self.config.timeout_graceful_shutdown
                if timeout is not None and self._cutoff_timer is None:
                    self._cutoff_timer = self.loop.call_later(timeout, self._cut_off, cycle)
        elif self._discard_left or self._door_skip:
            self._close_gracefully()  # still discarding a refused body: the close reads on
        elif self._idle_timer is None:
            self._idle_timer = self.loop.call_later(SHUTDOWN_IDLE_SECONDS, self._close_gracefully)

    def _cut_off(self, cycle: Any) -> None:
        self._cutoff_timer = None
        if cycle is not self.cycle or cycle.response_started or self._closing:
            return
        cycle.disconnected = True  # what the app still sends is dropped, uvicorn's 500 too
        cycle.message_event.set()
        self._respond_and_close(HTTPStatus.SERVICE_UNAVAILABLE, "the service stopped before this request completed")

    def timeout_keep_alive_handler(self) -> None:
        self._close_gracefully()

    # -- the contract's additions --

    def request_head(self, event: h11.Request) -> None:
        """A request's line and headers are in (called from h11's next_event): 400 or 431 if
        they go past what h11 checks. Tells the front door when they arrived."""
        self._cancel_timer()
        if self.door is not None:
            self.door.headers_at = self._head_arrived_at()
        size = len(event.method) + len(event.target) + 13  # "M T HTTP/1.1\r\n" ... "\r\n"
        for name, value in event.headers:
            size += len(name) + len(value) + 4
            if name == b"content-length" and not content_length_allowed(value):
                raise h11.RemoteProtocolError("Content-Length is not a number below 2^63", 400)
        # h11 enforces its limit only on a head still incomplete when data runs out.
        if size > self.header_limit:
            raise h11.RemoteProtocolError("request head too large", HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)

    def _head_arrived_at(self) -> float:
        """When the head being parsed reached the kernel: that of the read it came in, if the
        read was asked (a head pipelined behind a body, say, counts from now)."""
        arrived_at = self._read_arrived_at
        return self.loop.time() if arrived_at is None else arrived_at

    def _door_done(self, refusal: tuple[int, str] | None) -> None:
        """The wait at the front door is over: the request goes on to uvicorn, given to h11
        as it came, or is refused with ``refusal`` (status, message)."""
        head, rest = self._door_head, self._door_rest
        self._door_head, self._door_rest = None, b""
        self.flow.resume_reading()
        if refusal is not None:
            self._refuse_at_door(head, rest, *refusal)
            return
        cycle = self.cycle
        self.conn.receive_data(head.raw)
        if rest:  # (no data at all would tell h11 the client has closed)
            self.conn.receive_data(rest)
        self.handle_events()
        if self.cycle is cycle:  # h11 refused what door_head took (never seen): no app call will
            self.door.unplace()
        self._after_events()
        if _stopping and not self._closing:
            self.shutdown()  # it came before the stop: it is answered, then the connection closes

    def _refuse_at_door(self, head: DoorHead, rest: memoryview | bytes, status: int, message: str) -> None:
        """Answer a request at the door, its body unread, without uvicorn or h11: under
        overload nearly all refusals are these. Its answer is written as bytes made once a
        second; its body (the rest of what came with its head, and what follows) is counted
        off, and the connection waits for its next request."""
        keep_alive = not _stopping and head.keep_alive
        self._raw.write(self._door_response(status, message, keep_alive))
        self.server_state.total_requests += 1  # as uvicorn counts a response
        if not keep_alive:
            self._close_gracefully()
            return
        self._door_skip = head.length
        self._timer = self.loop.call_later(settings.BODY_TIMEOUT_SECONDS, self._abort)
        self._skip_door_body(rest)

    def _skip_door_body(self, data: bytes | memoryview) -> None:
        """Count ``data`` off the body refused at the door; once it has ended, the connection
        waits for its next request, which may have begun in ``data``."""
        if len(data) < self._door_skip:
            self._door_skip -= len(data)
            return
        rest, self._door_skip = data[self._door_skip :], 0
        self._idle_again()
        if rest:
            self.data_received(bytes(rest))

    def _door_response(self, status: int, message: str, keep_alive: bool) -> bytes:
        """The refusal's bytes, with uvicorn's default headers (its Date changes each second)."""
        default_headers = self.server_state.default_headers
        made = _door_responses.get((status, message, keep_alive))
        if made is None or made[0] is not default_headers:
            close = not keep_alive and CLOSE_HEADER not in default_headers  # at shutdown they say it
            response = error_response(status, message, close=close, headers=default_headers)
            made = _door_responses[status, message, keep_alive] = (default_headers, response)
        return made[1]

    def _leave_door(self) -> None:
        if self._door_head is not None:
            self._door_head, self._door_rest = None, b""
            self.door.abandon()

    def _skip_refused_body(self, data: bytes) -> bytes:
        """What of ``data`` h11 must still parse while a refused body with a declared length
        is discarded: its bytes are counted off h11's reader instead of going through h11, which
        copies each of them twice and hands them to uvicorn to drop (0.16 ms of the one core
        for the benchmark's 324 KB body, measured in-process). The body's last byte is left
        to h11, so that h11 itself ends the message and goes on to the next. (A body refused
        at the front door is counted off without h11: _skip_door_body.)"""
        reader = self.conn._reader  # h11 0.16: the current body's reader, by its class
        if type(reader) is not ContentLengthReader or self.conn.trailing_data[0]:
            return data  # chunked, or h11 holds bytes not yet parsed: h11 reads on
        skip = min(len(data), reader._remaining - 1)
        if skip <= 0:
            return data
        reader._remaining -= skip
        return data[skip:]

    def _watch_head(self) -> None:
        """Start the header timeout if the client has begun a request head and it is incomplete."""
        if self._timer is None and self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._timer = self.loop.call_at(self._head_since + settings.HEADER_TIMEOUT_SECONDS, self._head_timeout)

    def _head_timeout(self) -> None:
        self._timer = None
        if self._closing or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is still being made (its next request is pipelined)
        self._respond_and_close(
            HTTPStatus.REQUEST_TIMEOUT,
            f"the request line and headers did not arrive within {settings.HEADER_TIMEOUT_SECONDS} s",
        )

    def _respond_and_close(self, status: int, message: str) -> None:
        if not self._raw.is_closing():
            self._raw.write(error_response(status, message))
        self._close_gracefully()

    def _close_gracefully(self) -> None:
        """Stop writing (FIN after what is queued), read and discard what the client still
        sends until it closes, goes quiet for LINGER_SECONDS, sends more than
        DISCARD_BODY_BYTES or BODY_TIMEOUT_SECONDS pass, then close. Closing a socket with
        unread data in it makes the kernel answer with a reset, which can destroy the
        response the client has not read yet."""
        if self._closing:
            return
        self._closing = True
        self._cancel_timers()
        self._leave_door()
        raw = self._raw
        if raw is None or raw.is_closing():
            return
        if not raw.can_write_eof():
            raw.close()
            return
        raw.resume_reading()
        raw.write_eof()
        now = self.loop.time()
        self._close_left = settings.DISCARD_BODY_BYTES
        self._close_quiet_since = now
        self._close_until = now + settings.BODY_TIMEOUT_SECONDS
        self._timer = self.loop.call_later(LINGER_SECONDS, self._close_check)

    def _discard_while_closing(self, size: int) -> None:
        self._close_left -= size
        self._close_quiet_since = self.loop.time()
        if self._close_left < 0:
            self._abort()

    def _close_check(self) -> None:
        quiet_until = self._close_quiet_since + LINGER_SECONDS
        if self.loop.time() >= min(quiet_until, self._close_until):
            self._abort()
        else:
            self._timer = self.loop.call_at(min(quiet_until, self._close_until), self._close_check)

    def _abort(self) -> None:
        self._closing = True
        self._cancel_timers()
        self._raw.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _cancel_timers(self) -> None:
        self._cancel_timer()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._cutoff_timer is not None:
            self._cutoff_timer.cancel()
            self._cutoff_timer = None


# --- the arbiter -----------------------------------------------------------------------------


def _log_reaped(watcher: Any, arbiter: Any, hook_name: str, **info: Any) -> bool:
    """circus' after_reap hook: a worker process has exited (circus itself logs this at debug)."""
    exit_code = info.get("exit_code")
    if getattr(arbiter, "_stopping", False) or watcher.is_stopping():
        return True
    if isinstance(exit_code, int) and exit_code < 0:
        how = f"was killed by signal {signal.Signals(-exit_code).name}"
    else:
        how = f"exited with status {exit_code}"
    log.error(
        "worker process %s of %s %s; a replacement is starting, /readyz answers 503 until it is ready",
        info.get("process_pid"),
        watcher.name,
        how,
    )
    return True


STANDBY_MESSAGE = "no worker is ready: one is starting (or replacing one that died); retry later"
_LIVEZ_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 1\r\nconnection: close\r\n\r\n\n"
)


class _Standby:
    """In the arbiter: answers on the service's port while none of its workers can, that is
    until one has loaded its model: at start, and after a worker died until its replacement
    has loaded. The arbiter holds the listening socket, so without this a connection made
    then waits unanswered in its backlog (a replacement takes seconds to import BentoML, and
    longer to load the model). /livez gets 200 (the service runs), anything else 503.

    It accepts only while no worker has loaded, so it never takes connections from a worker
    that can serve; while a worker is starting, either may answer, both with 503.
    """

    def __init__(self, listener: socket.socket, board: Path) -> None:
        self.listener = listener
        self.board = board
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="standby-responder", daemon=True)

    def _run(self) -> None:
        listener, stopped = self.listener, self.stopped
        while not stopped.is_set():
            try:
                if any_worker_loaded(self.board) or not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    stopped.wait(0.1)
                    continue
                # Checked again just before accepting: a worker that has loaded since may
                # already have answered /readyz 200, and its clients must not meet this.
                if not select.select([listener], [], [], 0.1)[0] or any_worker_loaded(self.board):
                    continue
                connection, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue  # a worker accepted it first
            except (OSError, ValueError):  # not listening yet, or closed: the arbiter is stopping
                stopped.wait(0.1)
                continue
            with connection:
                _answer_standby(connection)


def _answer_standby(connection: socket.socket) -> None:
    """Read the request head, answer, then read and discard the rest until the client closes;
    all within a few seconds, since this thread answers one connection at a time."""
    deadline = time.monotonic() + 2 * LINGER_SECONDS
    head = b""
    try:
        while b"\r\n\r\n" not in head and len(head) <= DEFAULT_MAX_INCOMPLETE_EVENT_SIZE:
            connection.settimeout(max(deadline - time.monotonic(), 0.01))
            data = connection.recv(4096)
            if not data:
                return
            head += data
        request_line = head.split(b"\r\n", 1)[0].split(b" ")
        path = request_line[1].split(b"?", 1)[0] if len(request_line) == 3 else b""
        answer = (
            _LIVEZ_RESPONSE if path == b"/livez" else error_response(HTTPStatus.SERVICE_UNAVAILABLE, STANDBY_MESSAGE)
        )
        connection.sendall(answer)
        connection.shutdown(socket.SHUT_WR)
        left = settings.DISCARD_BODY_BYTES
        while left > 0 and time.monotonic() < deadline:
            connection.settimeout(max(deadline - time.monotonic(), 0.01))
            data = connection.recv(1 << 16)
            if not data:
                return
            left -= len(data)
    except OSError:
        pass  # the client went, or was too slow: nothing more to do for it


def _manage_watchers(arbiter: Any) -> None:
    """On SIGCHLD: reap the worker that exited and start its replacement now. circus does it
    on its periodic check, every check_delay seconds, which BentoML sets to 10."""
    from circus.exc import ConflictError

    if getattr(arbiter, "_stopping", False):
        return
    try:
        arbiter.manage_watchers()
    except ConflictError:  # another arbiter command is running (circus runs one at a time)
        arbiter.loop.call_later(0.1, _manage_watchers, arbiter)


def _patch_arbiter() -> None:
    """Wrap start and stop of BentoML's circus arbiter (bentoml/_internal/utils/circus, which
    serve_http in _bentoml_impl/server/serving.py creates after loading the service).

    * stop: the arbiter holds the listening socket (``_bento_api_server``) until every
      worker has exited; once the workers close their copies at their shutdown, connections
      still complete the handshake on it and wait in its backlog, then are reset when the
      arbiter finally closes it. Closing the arbiter's copy first leaves the socket to the
      workers: it goes away with the last worker's copy, and the kernel refuses new
      connections from then on.
    * start: log each worker's death (circus only logs it at debug level) through the
      watchers' after_reap hook, as soon as it happens (SIGCHLD); respawn workers even in a
      container (BentoML turns
      respawning off when BENTOML_CONTAINERIZED is set, as in its images, which leaves the
      service a worker short for good, and /readyz answering 503 for ever); and answer on
      the port while no worker can (``_Standby``).
    """
    from _bentoml_impl.server.serving import API_SERVER_NAME
    from bentoml._internal.utils import circus

    arbiter_class = circus.Arbiter
    if getattr(arbiter_class, "_contract_patched", False):
        return
    start, stop = arbiter_class.start, arbiter_class.stop

    def start_arbiter(self: Any, cb: Any = None) -> None:
        board = Path(tempfile.mkdtemp(prefix="bentos-workers-"))
        self.exit_stack.callback(shutil.rmtree, board, ignore_errors=True)
        for watcher in self.watchers:
            watcher.hooks["after_reap"] = _log_reaped
            watcher.respawn = True
            if watcher.env is not None:  # every spawn gets it (os.environ, copied when BentoML made the watcher)
                watcher.env[BOARD_ENV] = str(board)
        listener = self.sockets.get(API_SERVER_NAME)  # bound by start(), before any worker runs
        if listener is not None:
            self._contract_standby = _Standby(listener, board)
            self._contract_standby.thread.start()
        if threading.current_thread() is threading.main_thread():  # not a ThreadedArbiter
            # Thread-safe scheduling wakes the loop up (what circus' own signal handling does,
            # through tornado's deprecated add_callback_from_signal).
            wake = self.loop.asyncio_loop.call_soon_threadsafe
            signal.signal(signal.SIGCHLD, lambda *_: wake(_manage_watchers, self))
        return start(self, cb)

    def stop_arbiter(self: Any) -> Any:
        standby = getattr(self, "_contract_standby", None)
        if standby is not None:
            standby.stopped.set()
        listener = self.sockets.get(API_SERVER_NAME)
        if listener is not None:
            listener.close()
        return stop(self)

    arbiter_class.start = start_arbiter
    arbiter_class.stop = stop_arbiter
    arbiter_class._contract_patched = True


# --- BentoML's request timeout --------------------------------------------------------------


class TimeoutMiddleware:
    """BentoML's TimeoutMiddleware (bentoml/_internal/server/http/traffic.py; BentoML's apps
    import it from there as they are built): 504 if a request has not begun its answer within
    the service's traffic timeout (60 s by default; a request the contract admits is answered
    within REQUEST_TIMEOUT_SECONDS). Unlike BentoML's, its timer is cancelled once the request
    is over, and an app that ends without answering is not waited on until the timeout.
    BentoML's timer runs out instead, holding the request's future and context (its tracing
    span: some 20 objects) for the whole timeout: at 90 requests a second, some 100,000
    objects, walked by each full garbage collection and kept in memory a minute after a burst."""

    def __init__(self, app: Any, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        begun = loop.create_future()  # done once the answer begins, or the app has ended

        async def send_begun(message: Any) -> None:
            settle(begun, None)
            await send(message)

        app = asyncio.ensure_future(self.app(scope, receive, send_begun))
        app.add_done_callback(lambda _: settle(begun, None))
        timer = loop.call_later(self.timeout, settle, begun, _TIMED_OUT)
        try:
            if await begun is _TIMED_OUT and app.cancel():  # and the app still runs
                from starlette.responses import JSONResponse

                body = {"error": f"Not able to process the request in {self.timeout} seconds"}
                await JSONResponse(body, status_code=HTTPStatus.GATEWAY_TIMEOUT)(scope, receive, send)
                return
        finally:
            timer.cancel()
        await app


_TIMED_OUT = "timed out"


def settle(future: asyncio.Future, outcome: Any) -> None:
    """Give ``future`` its ``outcome`` unless it has one already."""
    if not future.done():
        future.set_result(outcome)


# --- installation ----------------------------------------------------------------------------

PROTOCOL = f"{__name__}:ContractProtocol"


def install() -> None:
    """Set up this process for the contract if `bentoml serve` started it; idempotent."""
    from bentoml._internal.context import server_context

    if server_context.worker_index is None:
        # The arbiter, or any other process (which never starts an arbiter: harmless).
        _patch_arbiter()
        return
    # A worker: BentoML builds uvicorn.Config without `http=`, i.e. "auto", which uvicorn
    # resolves through this table when the server starts (uvicorn/config.py, Config.load).
    uvicorn.config.HTTP_PROTOCOLS["auto"] = PROTOCOL
    from bentoml._internal.server.http import traffic

    traffic.TimeoutMiddleware = TimeoutMiddleware
