"""HTTP/1.1 over plain sockets: requests no client library sends, and exactly what came back.

Client libraries retry, reconnect, fix up or refuse to send what these tests need (a header
one byte a second, two Content-Lengths, a chunk size of 2^80, a socket closed while queued),
and they blur how a connection ended. Here every outcome is explicit: a ``Response``, or a
``Failure`` naming how the connection failed (refused, reset, closed, timed out).
"""

from __future__ import annotations

import contextlib
import errno
import json
import select
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from weather.contract import RAW_ROUTE

HOST = "127.0.0.1"


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    received_at: float  # time.monotonic() when the whole response had arrived

    def json(self):
        return json.loads(self.body)

    def closes(self) -> bool:
        """It says the server closes the connection after it (``Connection: close``)."""
        return "close" in self.headers.get("connection", "").lower()


@dataclass
class Failure(Exception):
    """No (complete) response: ``kind`` is refused, reset, broken-pipe, closed, timeout or other."""

    kind: str
    detail: str = ""
    at: float = field(default_factory=time.monotonic)

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


@dataclass
class Outcome:
    """One request of many: when it was sent, and its response or how it failed."""

    endpoint: str
    sent_at: float
    response: Response | None = None
    failure: Failure | None = None


def failure(exc: BaseException) -> Failure:
    """The Failure an exception from a socket call stands for."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, ConnectionRefusedError):
        return Failure("refused", str(exc))
    if isinstance(exc, ConnectionResetError):
        return Failure("reset", str(exc))
    if isinstance(exc, BrokenPipeError):
        return Failure("broken-pipe", str(exc))
    if isinstance(exc, TimeoutError | socket.timeout):
        return Failure("timeout", str(exc))
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return Failure("refused", str(exc))
    return Failure("other", f"{type(exc).__name__}: {exc}")


def connect(port: int, timeout_s: float = 10.0) -> socket.socket:
    """A connected socket; raises Failure (refused, timeout, ...) if none could be made."""
    try:
        return socket.create_connection((HOST, port), timeout=timeout_s)
    except OSError as exc:
        raise failure(exc) from None


def head(
    method: str, path: str, headers: Mapping[str, str] | Iterable[tuple[str, str]] = (), port: int | None = None
) -> bytes:
    """A request line and headers, ending with the blank line; ``headers`` may repeat a name."""
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    if port is not None and not any(name.lower() == "host" for name, _ in pairs):
        pairs.insert(0, ("Host", f"{HOST}:{port}"))
    lines = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in pairs)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def post_head(path: str, port: int, content_length: int | None, content_type: str = "image/jpeg", **extra) -> bytes:
    headers = {"Content-Type": content_type, **extra}
    if content_length is not None:
        headers["Content-Length"] = str(content_length)
    return head("POST", path, headers, port=port)


def raw_post(port: int, image: bytes) -> bytes:
    """The bytes of POST /predict/raw carrying ``image``."""
    return post_head(RAW_ROUTE, port, len(image)) + image


class _Reader:
    """Buffered reads from a socket, each bounded by one overall deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline, self.buffer = sock, deadline, b""

    def _fill(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise Failure("timeout", f"no complete response in time (got {self.buffer[:80]!r})")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except OSError as exc:
            raise failure(exc) from None
        if not chunk:
            raise Failure("closed", f"the server closed the connection (got {self.buffer[:80]!r})")
        self.buffer += chunk

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self._fill()
        found, _, self.buffer = self.buffer.partition(marker)
        return found

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        found, self.buffer = self.buffer[:size], self.buffer[size:]
        return found

    def to_end(self) -> bytes:
        with contextlib.suppress(Failure):
            while True:
                self._fill()
        found, self.buffer = self.buffer, b""
        return found


def read_response(sock: socket.socket, timeout_s: float = 30.0) -> Response:
    """The next response on ``sock`` (1xx skipped), or a Failure."""
    reader = _Reader(sock, time.monotonic() + timeout_s)
    while True:
        status_line, *header_lines = reader.until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise Failure("other", f"not an HTTP response: {status_line[:80]!r}")
        status = int(parts[1])
        if status >= 200:
            break
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    if status in (204, 304):
        body = b""
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size = int(reader.until(b"\r\n").split(b";")[0], 16)
            if size == 0:
                while reader.until(b"\r\n"):  # trailers, up to the blank line
                    pass
                break
            body += reader.exactly(size)
            reader.exactly(2)
    elif "content-length" in headers:
        body = reader.exactly(int(headers["content-length"]))
    else:
        body = reader.to_end()
    return Response(status, headers, body, time.monotonic())


def exchange(port: int, data: bytes, timeout_s: float = 30.0) -> Response:
    """Connect, send ``data`` whole, read one response, close; a Failure if any step fails."""
    with connect(port) as sock:
        try:
            sock.sendall(data)
        except OSError as exc:
            raise failure(exc) from None
        return read_response(sock, timeout_s)


def peer_closed(sock: socket.socket) -> Failure | None:
    """Without blocking: how the server ended this idle connection (closed or reset), or None if open."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return None
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except OSError as exc:
        return failure(exc)
    return Failure("closed") if not data else None


def wait_closed(sock: socket.socket, timeout_s: float) -> Failure | None:
    """Block until the server ends this idle connection: Failure closed or reset; None if still open."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ended = peer_closed(sock)
        if ended is not None:
            return ended
        select.select([sock], [], [], min(0.1, max(deadline - time.monotonic(), 0)))
    return None


class Trickle(threading.Thread):
    """Sends ``data`` on ``sock`` ``step`` bytes every ``interval_s``; stops when done, told to, or the socket fails."""

    def __init__(self, sock: socket.socket, data: bytes, interval_s: float = 1.0, step: int = 1) -> None:
        super().__init__(daemon=True)
        self.sock, self.data, self.interval_s, self.step = sock, data, interval_s, step
        self.sent = 0
        self.error: Failure | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while self.sent < len(self.data) and not self._stop_event.is_set():
            try:
                self.sock.send(self.data[self.sent : self.sent + self.step])
            except OSError as exc:
                self.error = failure(exc)
                return
            self.sent += self.step
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
