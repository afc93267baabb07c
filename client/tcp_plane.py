"""The activation stream on a plain TCP socket beside gRPC (pipeline.data_plane = tcp).

The frames are the gRPC data plane's (client/wire.py), and so are admission, acks, the window and
every check; only what carries them changes. grpcio's Python streams reach ~45% of loopback TCP
before a frame is even parsed (bench/results/pipeline.md), so activations go on a socket of
their own and gRPC keeps the control plane. Each call is one connection; on it, records:

    kind u8 | body length u32 LE | body
    HELLO  client -> worker, first: b"BFD1" | method u8 | token length u16 | token | request
    OK     worker -> client: the hello was accepted (empty body)
    FRAME  either way: one data-plane frame
    BYE    client -> worker: no more frames (a half-close would end TLS too)
    ERROR  worker -> client: gRPC status name, a newline, one sentence; then the socket closes

The worker authenticates before it allocates: a HELLO is at most MAX_HELLO_BYTES and must arrive
whole within HELLO_TIMEOUT; its token is compared in constant time before anything else is read.
Connections still saying hello have a room of their own (MAX_PENDING, the oldest shed for a new
one), so strangers cannot keep a driver out; authenticated streams have theirs (MAX_CONNECTIONS),
and a driver refused there is told why. With TLS the socket is wrapped with the worker's
certificate and the client verifies it against pipeline.tls_ca. Frames go out with sendmsg
straight from the tensors' memory and come in through one reused buffer.
"""

from __future__ import annotations

import hmac
import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from bpfree.client.transport import RateLimitedLog, Security, split_address, status_error
from bpfree_core.errors import BpfreeError, ConfigError, PeerUnavailableError, ProtocolError

log = logging.getLogger(__name__)

HELLO, OK, FRAME, BYE, ERROR = 1, 2, 3, 4, 5
PUSH, PULL = 1, 2
_MAGIC = b"BFD1"
_RECORD = struct.Struct("<BI")
_HELLO = struct.Struct("<4sBH")            # magic, method, token length
MAX_RECORD_BYTES = 64 << 20                # one frame: a chunk (<= 32 MiB) plus its headers
MAX_HELLO_BYTES = 4096                     # a HELLO's body: magic, method, the token, a small request
MAX_TOKEN_BYTES = MAX_HELLO_BYTES - 512    # what a token may take of it
HELLO_TIMEOUT = 10.0                       # seconds for a new connection's whole HELLO (TLS included)
MAX_PENDING = 32                           # connections still saying hello (the oldest is shed)
MAX_CONNECTIONS = 64                       # authenticated streams at once (a real pipeline needs 2)
_POLL = 0.2                                # seconds between checks of the stop flag

Parts = list[memoryview | bytes]
PushHandler = Callable[[Iterator[memoryview], Callable[[], bool], str], Iterator[bytes]]
PullHandler = Callable[[bytes, Callable[[], bool]], Iterator[bytes]]


class _Refused(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


# -- records ------------------------------------------------------------------------------------

def send_record(sock: socket.socket, kind: int, parts: Iterable[memoryview | bytes]) -> int:
    """Write one record (header, then `parts` back to back); returns the body's length."""
    parts = [p for p in parts if len(p)]
    size = sum(len(p) for p in parts)
    pieces = [_RECORD.pack(kind, size), *parts]
    if isinstance(sock, ssl.SSLSocket):   # no sendmsg under TLS: one joined buffer
        sock.sendall(b"".join(pieces))
        return size
    views = [memoryview(p).cast("B") for p in pieces]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0], sent = views[0][sent:], 0
    return size


class RecordReader:
    """Records from a socket. A returned body is a view of a reused buffer: valid until the next
    read, which is all the frame reader needs (it copies a payload into its tensor at once)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = bytearray(1 << 16)
        self._head = bytearray(_RECORD.size)
        # One syscall for a whole body where the socket allows it (TLS sockets take no flags):
        # a 1 MiB frame otherwise arrives in dozens of recv calls, each a trip through Python.
        self._flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL

    def _fill(self, view: memoryview) -> bool:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:], len(view) - got, self._flags)
            if n == 0:
                if got:
                    raise ProtocolError(f"the connection closed inside a record ({got} of "
                                        f"{len(view)} bytes)")
                return False
            got += n
        return True

    def read(self) -> tuple[int, memoryview] | None:
        """(kind, body) of the next record, or None at a clean end of the connection."""
        if not self._fill(memoryview(self._head)):
            return None
        kind, size = _RECORD.unpack(self._head)
        if kind not in (HELLO, OK, FRAME, BYE, ERROR):
            raise ProtocolError(f"record kind {kind} is not part of the bpfree TCP data plane; the "
                                "peer does not speak it (is this the worker's gRPC port?)")
        if size > MAX_RECORD_BYTES:
            raise ProtocolError(f"a record of {size} bytes is over the {MAX_RECORD_BYTES}-byte "
                                "limit; lower pipeline.chunk_bytes")
        if size > len(self._buf):
            self._buf = bytearray(size)   # a new buffer: views of the old one stay valid
        body = memoryview(self._buf)[:size]
        if not self._fill(body):
            raise ProtocolError(f"the connection closed before a record's {size}-byte body")
        return kind, body


def _peer_open(peek: socket.socket) -> bool:
    """False once the peer has closed its end (readable with nothing to read)."""
    try:
        readable, _, _ = select.select([peek], [], [], 0)
        return not readable or peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except (OSError, ValueError):
        return False


# -- the worker's side ----------------------------------------------------------------------------

class FrameServer:
    """Accepts data-plane connections for one stage worker and serves each on a thread."""

    def __init__(self, listen: str, security: Security, push: PushHandler, pull: PullHandler,
                 status_of: Callable[[BaseException], str]):
        host, port = split_address(listen, "data-plane address")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise ConfigError(f"the TCP data plane cannot listen on {listen} ({exc.strerror}); "
                              "pick a free port with --data-listen") from None
        self._sock.listen(64)
        self._sock.settimeout(_POLL)
        self.port: int = self._sock.getsockname()[1]
        self._tls = None
        if security.tls_cert:
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(security.tls_cert, security.tls_key)
        self._token = security.token.encode()
        self._push, self._pull, self._status_of = push, pull, status_of
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._pending: dict[socket.socket, float] = {}   # peek handle -> when it connected
        self._lock = threading.Lock()
        self._rejected = RateLimitedLog(log)
        self._thread = threading.Thread(target=self._accept, name="tcp-data", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                shed = None
                if len(self._pending) >= MAX_PENDING:   # strangers saying nothing: shed the oldest
                    shed = min(self._pending, key=self._pending.__getitem__)
                    del self._pending[shed]
                peek = conn.dup()   # the same socket; close() ends it by this
                self._pending[peek] = time.monotonic()
            if shed is not None:
                self._rejected.warning("shed a TCP data-plane connection that had not said hello: "
                                       "%d are waiting already", MAX_PENDING)
                _shutdown(shed)
            threading.Thread(target=self._serve, args=(conn, peek, f"{peer[0]}:{peer[1]}"),
                             name="tcp-data-conn", daemon=True).start()

    def _hello(self, conn: socket.socket, deadline: float) -> tuple[int, bytes]:
        """The HELLO, read into at most MAX_HELLO_BYTES before the deadline, its token checked."""
        kind, size = _RECORD.unpack(_recv_exact(conn, _RECORD.size, deadline))
        if kind != HELLO or not _HELLO.size <= size <= MAX_HELLO_BYTES:
            raise _Refused("INVALID_ARGUMENT", "the connection did not start with a bpfree data "
                                               f"plane HELLO record (of at most {MAX_HELLO_BYTES} bytes)")
        body = _recv_exact(conn, size, deadline)
        magic, method, token_len = _HELLO.unpack_from(body)
        if magic != _MAGIC or method not in (PUSH, PULL):
            raise _Refused("INVALID_ARGUMENT", "HELLO of another protocol version or an unknown "
                                               "method; run the same bpfree version everywhere")
        token = bytes(body[_HELLO.size:_HELLO.size + token_len])
        if self._token and not hmac.compare_digest(token, self._token):   # as gRPC's interceptor
            reason = "missing" if not token else "wrong"
            raise _Refused("UNAUTHENTICATED", f"{reason} access token for the TCP data plane; pass "
                                              "the pipeline's shared token (--token / pipeline.token)")
        return method, bytes(body[_HELLO.size + token_len:])

    def _admit(self, peek: socket.socket) -> None:
        """A connection that said hello moves from the waiting room to the streams, if there is room."""
        with self._lock:
            if peek not in self._pending:
                raise OSError("shed while it said hello")
            del self._pending[peek]
            if len(self._conns) >= MAX_CONNECTIONS:
                raise _Refused("RESOURCE_EXHAUSTED", f"this worker serves {MAX_CONNECTIONS} data "
                               "streams already (the most it serves at once); another driver may "
                               "be using it, or old connections linger: retry, or restart the worker")
            self._conns.add(peek)

    def _serve(self, conn: socket.socket, peek: socket.socket, peer: str) -> None:
        """One connection; `peek` is a second handle on its socket, which sees the peer's FIN
        even under TLS."""
        deadline = time.monotonic() + HELLO_TIMEOUT
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # acks are tiny: no Nagle
            conn.settimeout(HELLO_TIMEOUT)
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            method, request = self._hello(conn, deadline)
            self._admit(peek)
            conn.settimeout(None)
            reader = RecordReader(conn)   # its buffer only for a connection that said hello
            send_record(conn, OK, ())
            alive = lambda: not self._stop.is_set() and _peer_open(peek)  # noqa: E731
            out = (self._push(_frames_until_bye(reader), alive, peer) if method == PUSH
                   else self._pull(request, alive))
            for frame in out:
                send_record(conn, FRAME, (frame,))
        except _Refused as exc:
            self._rejected.warning("refused a TCP data-plane connection from %s: %s", peer, exc)
            _try_send_error(conn, exc.status, str(exc))
            _linger(peek)
        except BpfreeError as exc:   # the stage's own refusal (it logged it): pass it on
            _try_send_error(conn, self._status_of(exc), str(exc))
            _linger(peek)
        except (OSError, ssl.SSLError):
            pass   # the peer went away, said nothing in time or spoke no TLS; nothing to answer
        finally:
            with self._lock:
                self._conns.discard(peek)
                self._pending.pop(peek, None)
            peek.close()
            conn.close()

    @property
    def connections(self) -> int:
        """Connections open now."""
        with self._lock:
            return len(self._conns)

    def close(self) -> None:
        """Stop accepting and end every open connection."""
        self._stop.set()
        self._sock.close()
        with self._lock:
            conns = [*self._conns, *self._pending]
        for conn in conns:
            _shutdown(conn)
        self._thread.join(timeout=2.0)


def _recv_exact(conn: socket.socket, size: int, deadline: float) -> bytes:
    """`size` bytes before `deadline` (one deadline for all of them: a peer that drips a byte at
    a time gets no longer); TimeoutError past it, OSError if the peer closes first."""
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no whole HELLO in time")
        conn.settimeout(left)
        n = conn.recv_into(view[got:], size - got)
        if n == 0:
            raise OSError("closed inside its HELLO")
        got += n
    return bytes(buf)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _frames_until_bye(reader: RecordReader) -> Iterator[memoryview]:
    while True:
        record = reader.read()
        if record is None or record[0] == BYE:
            return
        if record[0] != FRAME:
            raise ProtocolError(f"record kind {record[0]} arrived inside a data stream; only FRAME "
                                "and BYE may follow the HELLO")
        yield record[1]


def _try_send_error(conn: socket.socket, status: str, message: str) -> None:
    try:
        send_record(conn, ERROR, (f"{status}\n{message}".encode(),))
    except (OSError, ValueError):
        pass


def _linger(raw: socket.socket, seconds: float = 1.0, limit: int = 64 << 20) -> None:
    """Close our side gracefully: frames the peer sent before it read our ERROR are read and
    dropped, since closing with unread data would reset the connection and could lose the ERROR."""
    try:
        raw.shutdown(socket.SHUT_WR)
        deadline, drained = time.monotonic() + seconds, 0
        while drained < limit and (left := deadline - time.monotonic()) > 0:
            if not select.select([raw], [], [], left)[0]:
                return
            data = raw.recv(1 << 16, socket.MSG_DONTWAIT)
            if not data:
                return
            drained += len(data)
    except OSError:   # nothing more to read now, or the peer is gone: either way, done
        return


# -- the sender's side ------------------------------------------------------------------------------

def _unreachable(address: str, port: int, exc: OSError) -> str:
    """Why a data-plane connection failed: a port nobody answers on, or a worker that took the
    connection and dropped it (it sheds connections that do not say hello when strangers crowd it)."""
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return (f"the TCP data plane of stage worker at {address} (port {port}) accepted the "
                f"connection and then dropped it ({exc}): it may be crowded by other connections "
                "(its log says so) or be stopping; retry, and check who else connects to it")
    return (f"the TCP data plane of stage worker at {address} (port {port}) is unreachable "
            f"({exc}); open that port between the machines (bpfree worker --data-listen) or "
            "set pipeline.data_plane = grpc")


class TcpCall:
    """One data-plane call (PUSH or PULL) on a connection of its own."""

    def __init__(self, address: str, port: int, security: Security, method: int,
                 request: bytes = b"", timeout: float = 30.0, what: str = "data stream to"):
        self.address, self.what = address, what
        host, _ = split_address(address, "stage worker address")
        if port <= 0:
            raise PeerUnavailableError(
                f"stage worker at {address} serves no TCP data plane (it was configured without "
                "pipeline.data_plane = tcp, or runs an older bpfree)")
        token = security.token.encode()
        if len(token) > MAX_TOKEN_BYTES:
            raise ConfigError(f"pipeline.token is {len(token)} bytes; the TCP data plane carries "
                              f"at most {MAX_TOKEN_BYTES} (use a shorter token)")
        sock = None
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if security.tls_ca:
                ctx = ssl.create_default_context(cafile=str(Path(security.tls_ca)))
                sock = ctx.wrap_socket(sock, server_hostname=host)
            self.sock = sock
            self._reader = RecordReader(sock)
            send_record(sock, HELLO, (_HELLO.pack(_MAGIC, method, len(token)), token, request))
            record = self._reader.read()
        except (OSError, ProtocolError) as exc:   # ssl.SSLError is an OSError
            if sock is not None:
                sock.close()
            if isinstance(exc, ProtocolError):
                raise
            raise PeerUnavailableError(_unreachable(address, port, exc)) from None
        if record is None or record[0] != OK:
            self._raise(record)
        sock.settimeout(None)
        self._send_lock = threading.Lock()

    def _raise(self, record: tuple[int, memoryview] | None) -> None:
        self.cancel()
        if record is not None and record[0] == ERROR:
            status, _, detail = bytes(record[1]).decode(errors="replace").partition("\n")
            raise status_error(self.address, status, detail, self.what)
        if record is None:
            raise BpfreeError(f"stage worker at {self.address} closed the TCP data plane "
                              "connection without answering")
        raise ProtocolError(f"stage worker at {self.address} sent record kind {record[0]} where a "
                            "frame was expected")

    def send(self, parts: Parts) -> int:
        """Send one frame given as pieces; returns its length."""
        with self._send_lock:
            return send_record(self.sock, FRAME, parts)

    def send_bye(self) -> None:
        with self._send_lock:
            send_record(self.sock, BYE, ())

    def frames(self) -> Iterator[memoryview]:
        """Frames from the worker until it ends the call; its ERROR raises the project's error."""
        while True:
            try:
                record = self._reader.read()
            except OSError as exc:
                raise PeerUnavailableError(f"{self.what} stage worker at {self.address} broke "
                                           f"({exc}); is the worker still running?") from None
            if record is None:
                return
            if record[0] != FRAME:
                self._raise(record)
            yield record[1]

    def cancel(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
