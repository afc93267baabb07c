"""A stage's admission rules: does this batch, end marker or control call fit the stage's state?

The epoch / sequence / error state machine of one stage worker, with no gRPC and no torch: the
service (client.worker) asks it before it queues anything, and the compute loop
(client.compute) reports failures to it. A well-formed message that does not fit the state is a
StateError (FAILED_PRECONDITION on the wire); a malformed one a ProtocolError (INVALID_ARGUMENT).
A failure is sticky: every stream and FinishEpoch report it until the next StartEpoch or Configure.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from bpfree.protos import stage_pb2 as pb
from bpfree_core.errors import ProtocolError

log = logging.getLogger(__name__)


class StateError(ProtocolError):
    """A well-formed message that does not fit the worker's state (FAILED_PRECONDITION)."""


LEASE_SECONDS = 30.0   # a session that sends nothing for this long has let its workers go


class Lease:
    """Which session (one run's drivers) holds this worker. Another session's Configure is refused
    while the holder was heard from in the last LEASE_SECONDS, so two runs never share a stage;
    a crashed driver frees it by going quiet."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self.session, self.seen, self._now = "", 0.0, now

    def take(self, session: str, where: str) -> None:
        quiet = self._now() - self.seen
        if session and self.session and session != self.session and quiet < LEASE_SECONDS:
            raise StateError(
                f"{where} is in use by another run (session {self.session[:8]}, heard from {quiet:.0f} s "
                f"ago); a worker serves one run at a time: wait for that run to end, stop it, or use "
                f"other workers (a run that is gone frees it after {LEASE_SECONDS:g} s)")
        if session:
            self.session = session
        self.seen = self._now()

    def touch(self) -> None:
        """The holder was heard from (any control call or frame of its run)."""
        self.seen = self._now()


def configure_digest(request: pb.ConfigureRequest) -> str:
    """What a stage was configured with, as a digest: the same session's next driver with the
    same digest finds the stage ready and attaches to it instead of configuring it again."""
    text = "\n".join([request.config_json, ",".join(map(str, request.layers)), request.downstream,
                      request.device, request.session, str(request.stage), str(request.num_stages)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class EndMarker:
    """The end of an epoch, queued behind its batches."""

    run_id: str
    epoch: int
    batches: int


class Admission:
    """Which run is configured, which epoch runs, which batch comes next, and the sticky error."""

    def __init__(self) -> None:
        self.lock = threading.RLock()   # guards the fields below
        self.run_id: str | None = None  # None: not configured
        self.epoch = -1
        self.active = False             # an epoch is running (StartEpoch .. FinishEpoch)
        self.expected_seq = 0           # the next train batch's sequence number
        self.ended = threading.Event()  # the epoch's end marker went through the compute loop
        self.error = ""
        self.check_contents: Callable[[pb.BatchHeader], None] = lambda header: None

    # -- run and epoch -----------------------------------------------------------------------
    def configure(self, run_id: str,
                  check_contents: Callable[[pb.BatchHeader], None] | None = None) -> None:
        """A new run; `check_contents(header)` refuses batches the stage cannot work on."""
        with self.lock:
            self.run_id = run_id
            self.check_contents = check_contents or (lambda header: None)
            self.epoch, self.active, self.expected_seq, self.error = -1, False, 0, ""
            self.ended.clear()

    def require(self, run_id: str | None = None) -> None:
        if self.run_id is None:
            raise StateError("this worker is not configured yet; call Configure first")
        if run_id is not None and run_id != self.run_id:
            raise StateError(f"unknown run {run_id!r}: this worker is configured for run "
                             f"{self.run_id!r}; reconfigure it for the new run")

    def in_flight(self, queued: bool) -> bool:
        """Whether an epoch is running with batches still `queued` (an idle one may be dropped)."""
        return self.active and not self.ended.is_set() and queued

    def begin_epoch(self, epoch: int) -> None:
        with self.lock:
            self.epoch, self.active, self.expected_seq, self.error = epoch, True, 0, ""
            self.ended.clear()

    def check_finish(self, epoch: int) -> None:
        if not self.active or epoch != self.epoch:
            raise StateError(f"epoch {epoch} is not running on this stage (current: "
                             f"{self.epoch}); call StartEpoch first")

    def end_epoch(self) -> None:
        """FinishEpoch, or new weights (an unfinished, failed epoch is given up)."""
        with self.lock:
            self.active = False

    def fail(self, message: str) -> None:
        with self.lock:
            if not self.error:
                self.error = message
                log.error("%s", message)
            self.ended.set()

    def check_running(self) -> None:
        if self.error:
            raise StateError(f"this stage has stopped: {self.error}")

    # -- the data plane ------------------------------------------------------------------------
    def admit(self, h: pb.BatchHeader) -> None:
        """Refuse a batch header that does not fit (before any of its bytes are copied)."""
        with self.lock:
            self._admit_state(h)
            self.check_contents(h)

    def _admit_state(self, h: pb.BatchHeader) -> None:
        with self.lock:
            self.require(h.run_id)
            self.check_running()
            if h.kind == pb.TRAIN:
                if not self.active or self.ended.is_set():
                    raise StateError(f"train batch {h.seq} of epoch {h.epoch} arrived but no epoch is "
                                     "running on this stage; call StartEpoch first")
                if h.epoch != self.epoch:
                    raise StateError(f"train batch {h.seq} belongs to epoch {h.epoch} but epoch "
                                     f"{self.epoch} is running")
                if h.seq != self.expected_seq:
                    raise StateError(f"train batch {h.seq} arrived but batch {self.expected_seq} was "
                                     "expected next; batches must arrive in order, none missing")
            elif h.kind != pb.EVAL:
                raise ProtocolError(f"batch {h.seq} has unknown kind {h.kind}; expected TRAIN or EVAL")

    def commit(self, run_id: str, seq: int, kind: int, epoch: int) -> None:
        """A whole batch arrived: check it again (the state may have moved) and count it."""
        with self.lock:
            self._admit_state(pb.BatchHeader(run_id=run_id, seq=seq, kind=kind, epoch=epoch))
            if kind == pb.TRAIN:
                self.expected_seq += 1

    def admit_end(self, end: pb.EndOfEpoch) -> EndMarker:
        with self.lock:
            self.require(end.run_id)
            if not self.active or end.epoch != self.epoch:
                raise StateError(f"end of epoch {end.epoch} arrived but epoch {self.epoch} is "
                                 f"{'running' if self.active else 'not running'}")
            if end.batches != self.expected_seq:
                raise ProtocolError(f"end of epoch {end.epoch} says {end.batches} batches were sent "
                                    f"but {self.expected_seq} arrived")
        return EndMarker(end.run_id, end.epoch, end.batches)
