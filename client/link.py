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
from collections.abc import Callable

import grpc

from bpfree.client.transport import PULL_METHOD, PUSH_METHOD, Security, describe
from bpfree.client.wire import WireBatch, decode_frames, encode_batch, end_frame, parse_meta, unpack_frame
from bpfree.protos import stage_pb2 as pb
from bpfree_core.errors import BpfreeError, PeerUnavailableError, ProtocolError, StageTimeoutError

log = logging.getLogger(__name__)

STALL_AFTER = 10.0   # seconds without progress before a send reports a stall
_POLL = 0.1   # seconds between checks of error/closed flags while waiting


def rpc_exception(address: str, exc: grpc.RpcError, what: str) -> BpfreeError:
    """Turn a failed RPC into the project's error that says which peer and what happened."""
    code = exc.code() if hasattr(exc, "code") else None
    msg = f"{what} stage worker at {address} failed: {describe(exc)}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return PeerUnavailableError(msg + "; is the worker still running and reachable?")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return StageTimeoutError(msg + "; raise pipeline.rpc_timeout if the stage is just slow")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        return ProtocolError(msg)
    return BpfreeError(msg)


class Link:
    """A bidi Push stream to one stage, opened on first use."""

    def __init__(self, address: str, security: Security, *, window: int, chunk_bytes: int,
                 wire_dtype: str, timeout: float, channel: grpc.Channel | None = None,
                 on_stall: Callable[[float], None] | None = None):
        """`on_stall(seconds)` is called once per send that has waited STALL_AFTER seconds."""
        self.on_stall = on_stall
        self.address = address
        self.window = window
        self.chunk_bytes = chunk_bytes
        self.wire_dtype = wire_dtype
        self.timeout = timeout
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
    def _frames(self):  # noqa: ANN202 - consumed by gRPC's sender thread
        while True:
            try:
                item = self._out.get(timeout=_POLL)
            except queue.Empty:
                if self._closed or self._error is not None:
                    return
                continue
            if item is None:
                return
            frames = [item] if isinstance(item, bytes) else encode_batch(item, self.chunk_bytes,
                                                                         self.wire_dtype)
            for frame in frames:
                self.bytes_out += len(frame)
                yield frame

    def _open(self) -> None:
        method = self._channel.stream_stream(PUSH_METHOD)   # no serializers: raw bytes
        self._call = method(self._frames(), metadata=self.security.metadata())
        self._reader = threading.Thread(target=self._read_acks, name=f"acks-{self.address}",
                                        daemon=True)
        self._reader.start()

    def _read_acks(self) -> None:
        try:
            for frame in self._call:
                kind, meta, _ = unpack_frame(frame)
                if kind == pb.ACK:
                    parse_meta(pb.Ack, meta, "ack")
                    with self._lock:
                        self.unacked -= 1
                    self._credit.release()
            if not self._closed:
                self._error = BpfreeError(f"stage worker at {self.address} ended the data stream")
        except grpc.RpcError as exc:
            if not self._closed:
                self._error = rpc_exception(self.address, exc, "data stream to")
        except BpfreeError as exc:
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

    def __init__(self, address: str, channel: grpc.Channel, security: Security, run_id: str):
        self.address = address
        self._items: queue.Queue[WireBatch | pb.EndOfEpoch] = queue.Queue()
        self._error: BpfreeError | None = None
        self._closed = False
        method = channel.unary_stream(PULL_METHOD)
        self._call = method(pb.PullRequest(run_id=run_id).SerializeToString(),
                            metadata=security.metadata())
        self._thread = threading.Thread(target=self._run, name=f"pull-{address}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in decode_frames(self._call):
                self._items.put(item)
            if not self._closed:
                self._error = BpfreeError(f"last stage at {self.address} ended its output stream")
        except grpc.RpcError as exc:
            if not self._closed:
                self._error = rpc_exception(self.address, exc, "output stream of the last")
        except BpfreeError as exc:
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
