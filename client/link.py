"""Both ends of the data plane as seen by a sender and by the driver.

`Link` streams batches to one stage's Push method and keeps at most `window` batches
unacknowledged (backpressure: a slow stage blocks its upstream, memory stays flat).
`PullReader` reads the last stage's output frames for the driver.
Every wait has a deadline; a broken stream surfaces as an exception naming the peer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import grpc

from bpfree.client.tcp_plane import PULL, PUSH, TcpCall
from bpfree.client.transport import PULL_METHOD, PUSH_METHOD, Security, rpc_status, status_error
from bpfree.client.wire import (
    WireBatch,
    decode_frames,
    encode_batch_parts,
    end_frame,
    parse_meta,
    unpack_frame,
)
from bpfree.protos import stage_pb2 as pb
from bpfree.protos import stage_pb2_grpc as pb_grpc
from bpfree_core.errors import BpfreeError, StageTimeoutError

log = logging.getLogger(__name__)

STALL_AFTER = 10.0   # seconds without progress before a send reports a stall
_POLL = 0.1   # seconds between checks of error/closed flags while waiting


def rpc_exception(address: str, exc: grpc.RpcError, what: str) -> BpfreeError:
    """Turn a failed RPC into the project's error that says which peer and what happened."""
    return status_error(address, *rpc_status(exc), what)


def _grpc_frames(call: Iterable[bytes], address: str, what: str) -> Iterator[bytes]:
    """A gRPC stream's messages, its failure turned into the project's error."""
    try:
        yield from call
    except grpc.RpcError as exc:
        raise rpc_exception(address, exc, what) from None


def _open_tcp(address: str, channel: grpc.Channel, security: Security, method: int,
              request: bytes, timeout: float, what: str) -> TcpCall:
    """A TCP data-plane call to the worker at `address`, whose port its Health reply names."""
    try:
        health = pb_grpc.StageControlStub(channel).Health(
            pb.HealthRequest(), timeout=min(timeout, 30.0), metadata=security.metadata())
    except grpc.RpcError as exc:
        raise rpc_exception(address, exc, "Health of") from None
    return TcpCall(address, health.data_port, security, method, request, timeout, what)


class Link:
    """A bidi Push stream to one stage, opened on first use."""

    def __init__(self, address: str, security: Security, *, window: int, chunk_bytes: int,
                 wire_dtype: str, timeout: float, channel: grpc.Channel | None = None,
                 on_stall: Callable[[float], None] | None = None, data_plane: str = "grpc"):
        """`on_stall(seconds)` is called once per send that has waited STALL_AFTER seconds."""
        self.on_stall = on_stall
        self.address = address
        self.window = window
        self.chunk_bytes = chunk_bytes
        self.wire_dtype = wire_dtype
        self.timeout = timeout
        self.data_plane = data_plane
        self.security = security
        self._own_channel = channel is None
        self._channel = channel or security.channel(address)
        self._credit = threading.Semaphore(window)
        self._out: queue.Queue[WireBatch | bytes | None] = queue.Queue()
        self._error: BpfreeError | None = None
        self._closed = False
        self._call = None
        self._reader: threading.Thread | None = None
        self.bytes_out = 0
        self.unacked = 0
        self._lock = threading.Lock()

    # -- sending ------------------------------------------------------------------------------
    def _frames(self) -> Iterator[list[memoryview | bytes]]:
        """Frames (as pieces) of what send() queued, until close() or an error."""
        while True:
            try:
                item = self._out.get(timeout=_POLL)
            except queue.Empty:
                if self._closed or self._error is not None:
                    return
                continue
            if item is None:
                return
            frames = [[item]] if isinstance(item, bytes) else encode_batch_parts(
                item, self.chunk_bytes, self.wire_dtype)
            for parts in frames:
                self.bytes_out += sum(len(p) for p in parts)
                yield parts

    def _open(self) -> None:
        what = "data stream to"
        if self.data_plane == "tcp":
            self._call = _open_tcp(self.address, self._channel, self.security, PUSH, b"",
                                   self.timeout, what)
            threading.Thread(target=self._send_tcp, name=f"send-{self.address}",
                             daemon=True).start()
            acks: Iterable[bytes | memoryview] = self._call.frames()
        else:
            method = self._channel.stream_stream(PUSH_METHOD)   # no serializers: raw bytes
            self._call = method((b"".join(parts) for parts in self._frames()),
                                metadata=self.security.metadata())
            acks = _grpc_frames(self._call, self.address, what)
        self._reader = threading.Thread(target=self._read_acks, args=(acks,),
                                        name=f"acks-{self.address}", daemon=True)
        self._reader.start()

    def _send_tcp(self) -> None:
        try:
            for parts in self._frames():
                self._call.send(parts)
            self._call.send_bye()
        except BpfreeError as exc:   # a batch that cannot be framed: fail the link, not hang it
            self._error = exc
            self._call.cancel()
        except (OSError, ValueError):
            pass   # the connection broke: the ack reader sees it too, with the worker's reason

    def _read_acks(self, acks: Iterable[bytes | memoryview]) -> None:
        try:
            for frame in acks:
                kind, meta, _ = unpack_frame(frame)
                if kind == pb.ACK:
                    parse_meta(pb.Ack, meta, "ack")
                    with self._lock:
                        self.unacked -= 1
                    self._credit.release()
            if not self._closed and self._error is None:
                self._error = BpfreeError(f"stage worker at {self.address} ended the data stream")
        except BpfreeError as exc:
            if not self._closed and self._error is None:   # the first cause is the one to name
                self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise BpfreeError(f"the data stream to {self.address} is closed")

    def send(self, batch: WireBatch) -> float:
        """Queue one batch; block while `window` batches are unacknowledged. Returns seconds blocked."""
        self._check()
        if self._call is None:
            self._open()
        t0 = time.monotonic()
        stalled = False
        while not self._credit.acquire(timeout=_POLL):
            self._check()
            if not stalled and self.on_stall is not None and time.monotonic() - t0 > STALL_AFTER:
                stalled = True
                self.on_stall(time.monotonic() - t0)
            if time.monotonic() - t0 > self.timeout:
                raise StageTimeoutError(
                    f"stage worker at {self.address} acknowledged none of its {self.window} in-flight "
                    f"batches within {self.timeout:g} s; it is stuck or too slow (pipeline.rpc_timeout)")
        with self._lock:
            self.unacked += 1
        self._out.put(batch)
        return time.monotonic() - t0

    def send_end(self, run_id: str, epoch: int, batches: int) -> None:
        self._check()
        if self._call is None:
            self._open()
        self._out.put(end_frame(run_id, epoch, batches))

    @property
    def error(self) -> BpfreeError | None:
        return self._error

    def close(self, grace: float = 2.0) -> None:
        """End the stream: let the stage drain what was sent for up to `grace` s, then cancel."""
        if self._closed:
            return
        self._closed = True
        self._out.put(None)
        if self._call is not None:
            if self._reader is not None and grace > 0:
                self._reader.join(timeout=grace)
            self._call.cancel()
        if self._own_channel:
            self._channel.close()


class PullReader:
    """Reads the last stage's output (eval packets, end-of-epoch markers) into a queue."""

    def __init__(self, address: str, channel: grpc.Channel, security: Security, run_id: str,
                 data_plane: str = "grpc", timeout: float = 30.0):
        self.address = address
        self._items: queue.Queue[WireBatch | pb.EndOfEpoch] = queue.Queue()
        self._error: BpfreeError | None = None
        self._closed = False
        request, what = pb.PullRequest(run_id=run_id).SerializeToString(), "output stream of the last"
        if data_plane == "tcp":
            self._call = _open_tcp(address, channel, security, PULL, request, timeout, what)
            frames: Iterable[bytes | memoryview] = self._call.frames()
        else:
            self._call = channel.unary_stream(PULL_METHOD)(request, metadata=security.metadata())
            frames = _grpc_frames(self._call, address, what)
        self._thread = threading.Thread(target=self._run, args=(frames,), name=f"pull-{address}",
                                        daemon=True)
        self._thread.start()

    def _run(self, frames: Iterable[bytes | memoryview]) -> None:
        try:
            for item in decode_frames(frames):
                self._items.put(item)
            if not self._closed:
                self._error = BpfreeError(f"last stage at {self.address} ended its output stream")
        except BpfreeError as exc:
            if not self._closed:
                self._error = exc

    def get(self, timeout: float, what: str) -> WireBatch | pb.EndOfEpoch:
        """The next output item; raises if the stream broke or nothing came within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._items.get(timeout=_POLL)
            except queue.Empty:
                if self._error is not None:
                    raise self._error from None
                if time.monotonic() > deadline:
                    raise StageTimeoutError(
                        f"no output from the last stage at {self.address} within {timeout:g} s while "
                        f"waiting for {what}; a stage is stuck or too slow (pipeline.rpc_timeout)"
                    ) from None

    @property
    def error(self) -> BpfreeError | None:
        return self._error

    def close(self) -> None:
        self._closed = True
        self._call.cancel()
        self._thread.join(timeout=2.0)
