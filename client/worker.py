"""One pipeline stage: owns layers, trains them on batches from upstream, streams outputs on.

Threads in a worker process:
* gRPC handler threads: control RPCs, the upstream's Push stream (decode, check, enqueue, ack),
  and the driver's Pull stream (last stage only).
* one compute thread: inbox -> Stage.train_step / eval_step -> downstream Link (or the outbox
  that the driver pulls when this is the last stage).
Queues are bounded by pipeline.window, so memory stays flat however long the epoch is.
A failed step makes the stage's error sticky: every stream and FinishEpoch report it until the
next StartEpoch or Configure.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import resource
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import torch

from bpfree_core.config import ExperimentConfig
from bpfree_core.errors import BpfreeError, ConfigError, PeerUnavailableError, ProtocolError
from bpfree_core.layers import add_proximal_term
from bpfree_core.metrics import RunningMeans
from bpfree_core.model import Stage, build_layers, build_objective
from bpfree_core.runtime import resolve_device
from client.link import Link
from client.transport import Security, TokenInterceptor, check_chunk_bytes, server_options, wait_for_peer
from client.wire import (
    PROTOCOL_VERSION,
    BatchAssembler,
    LimitError,
    WireBatch,
    ack_frame,
    decode_state,
    encode_batch,
    encode_state,
    end_frame,
    parse_meta,
    unpack_frame,
)
from protos import stage_pb2 as pb
from protos import stage_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_POLL = 0.1
_TIMELINE_MAX = 3 * 10_000   # per-batch timing kept per epoch: 3 doubles a batch, 240 KB at most


def _remove_proximal(setup: _Setup) -> None:
    for handle in setup.proximal:
        handle.remove()
    setup.proximal = []


class StateError(ProtocolError):
    """A well-formed message that does not fit the worker's state (FAILED_PRECONDITION)."""


@dataclass
class _End:
    run_id: str
    epoch: int
    batches: int


@dataclass
class _Counters:
    train_batches: int = 0
    eval_batches: int = 0
    busy: float = 0.0
    idle: float = 0.0
    blocked: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    link_base: int = 0           # the downstream link's byte count when these counters started
    means: RunningMeans = field(default_factory=RunningMeans)
    timeline: list[float] = field(default_factory=list)   # (start, end, handed off) per batch


@dataclass
class _Setup:
    """Everything one Configure call builds; replaced wholesale by the next one."""

    run_id: str
    cfg: ExperimentConfig
    stage: Stage
    index: int
    num_stages: int
    downstream: str
    link: Link | None
    inbox: queue.Queue
    outbox: queue.Queue
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    pulling: bool = False          # a driver is reading this (last) stage's output
    proximal: list = field(default_factory=list)   # FedProx gradient hooks (SetProximal)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: peak instead of current
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StageWorker(pb_grpc.StageControlServicer):
    """The state of one stage worker and its RPC handlers (control + raw data plane)."""

    def __init__(self, device: str, security: Security, address: str = "", threads: int = 0):
        self.default_device = device
        # The compute thread's torch thread count (0 = this thread's now). Set inside that thread:
        # OpenMP keeps a count per thread, and a new thread starts at the machine's default, so
        # `torch.set_num_threads` in the main thread alone would not reach the GEMMs it runs.
        self.threads = threads or torch.get_num_threads()
        self.security = security
        self.address = address
        self._lock = threading.RLock()      # guards the fields below
        self._step_lock = threading.Lock()  # held during a train/eval step and weight transfers
        self._setup: _Setup | None = None
        self._epoch = -1
        self._epoch_active = False
        self._expected_seq = 0
        self._ended = threading.Event()
        self._error = ""
        self._counters = _Counters()

    # -- helpers ------------------------------------------------------------------------------
    def _require(self, run_id: str | None = None) -> _Setup:
        setup = self._setup
        if setup is None:
            raise StateError("this worker is not configured yet; call Configure first")
        if run_id is not None and run_id != setup.run_id:
            raise StateError(f"unknown run {run_id!r}: this worker is configured for run "
                             f"{setup.run_id!r}; reconfigure it for the new run")
        return setup

    def _in_flight(self, setup: _Setup) -> bool:
        """Whether an epoch is running with batches still queued here (an idle one may be dropped)."""
        return self._epoch_active and not self._ended.is_set() and not setup.inbox.empty()

    def _describe(self) -> str:
        setup = self._setup
        if setup is None:
            return f"stage worker {self.address}"
        return f"stage {setup.index} (layers {list(setup.stage.indices)}) at {self.address}"

    def _fail(self, message: str) -> None:
        with self._lock:
            if not self._error:
                self._error = message
                log.error("%s", message)
            self._ended.set()

    @staticmethod
    def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, StateError):
            code = grpc.StatusCode.FAILED_PRECONDITION
        elif isinstance(exc, LimitError):
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
        elif isinstance(exc, ProtocolError | ConfigError):
            code = grpc.StatusCode.INVALID_ARGUMENT
        elif isinstance(exc, PeerUnavailableError):
            code = grpc.StatusCode.UNAVAILABLE
        else:
            code = grpc.StatusCode.INTERNAL
        context.abort(code, str(exc))

    # -- control plane --------------------------------------------------------------------------
    def Configure(self, request: pb.ConfigureRequest, context: grpc.ServicerContext) -> pb.ConfigureReply:
        try:
            setup = self._configure(request)
        except (BpfreeError, ValueError) as exc:
            self._abort(context, exc if isinstance(exc, BpfreeError) else ConfigError(str(exc)))
        params = sum(p.numel() for layer in setup.stage.layers for p in layer.parameters())
        return pb.ConfigureReply(device=str(setup.stage.device), parameters=params)

    def _configure(self, req: pb.ConfigureRequest) -> _Setup:
        if not req.run_id:
            raise ConfigError("Configure needs a run_id")
        try:
            cfg = ExperimentConfig.from_dict(json.loads(req.config_json))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config_json is not valid JSON ({exc})") from exc
        except (TypeError, AttributeError, OverflowError) as exc:   # valid JSON, wrong shape
            raise ConfigError(f"config_json is not a bpfree config ({exc})") from exc
        objective = build_objective(cfg)
        if not objective.pipelinable:
            raise StateError(f"model.algorithm = {cfg.model.algorithm!r} needs gradients across "
                             "layers and cannot run as pipeline stages; use bpfree train")
        check_chunk_bytes(cfg.pipeline.chunk_bytes)
        n = len(objective.layer_sizes())
        layers = list(req.layers)
        if layers and (layers != list(range(layers[0], layers[-1] + 1)) or layers[0] < 0
                       or layers[-1] >= n):
            raise ConfigError(f"layers {layers} must be contiguous, ascending indices in 0 .. {n - 1}")
        try:
            device = resolve_device(req.device or self.default_device)
        except ConfigError as exc:
            raise StateError(str(exc)) from exc
        indices = range(layers[0], layers[-1] + 1) if layers else range(0)
        stage = Stage(build_layers(cfg, indices, objective), device)
        link = None
        if req.downstream:
            # Raises PeerUnavailableError naming the address after retries with backoff.
            wait_for_peer(req.downstream, self.security, cfg.pipeline.connect_timeout)
            link = Link(req.downstream, self.security, window=cfg.pipeline.window,
                        chunk_bytes=cfg.pipeline.chunk_bytes, wire_dtype=cfg.pipeline.wire_dtype,
                        timeout=cfg.pipeline.rpc_timeout)
        setup = _Setup(run_id=req.run_id, cfg=cfg, stage=stage, index=req.stage,
                       num_stages=req.num_stages, downstream=req.downstream, link=link,
                       inbox=queue.Queue(maxsize=cfg.pipeline.window),
                       outbox=queue.Queue(maxsize=cfg.pipeline.window))
        with self._lock:
            old = self._setup
            self._setup = setup
            self._epoch, self._epoch_active, self._expected_seq = -1, False, 0
            self._error = ""
            self._ended.clear()
            self._counters = _Counters()
        if old is not None:
            old.stop.set()
            if old.thread is not None:
                old.thread.join(timeout=5.0)
            if old.link is not None:
                old.link.close()
        setup.thread = threading.Thread(target=self._compute, args=(setup,), name="compute", daemon=True)
        setup.thread.start()
        log.info("configured run %s: stage %d/%d, layers %s on %s, downstream %s", req.run_id,
                 req.stage, req.num_stages, list(indices), device, req.downstream or "(driver pulls)")
        return setup

    def _renew_link(self, setup: _Setup) -> Link:
        old = setup.link
        assert old is not None
        old.close(grace=0)
        p = setup.cfg.pipeline
        wait_for_peer(old.address, self.security, p.connect_timeout)
        return Link(old.address, self.security, window=p.window, chunk_bytes=p.chunk_bytes,
                    wire_dtype=p.wire_dtype, timeout=p.rpc_timeout)

    def LoadWeights(self, request_iterator: Iterator[pb.TensorChunk],
                    context: grpc.ServicerContext) -> pb.WeightsReply:
        try:
            setup = self._require()
            state = decode_state(request_iterator)
            with self._step_lock:
                if self._in_flight(setup):
                    raise StateError(f"batches of epoch {self._epoch} are still being trained; load "
                                     "weights between epochs")
                self._epoch_active = False   # an unfinished (failed) epoch is abandoned
                _remove_proximal(setup)      # anchored at the old weights: meaningless now
                setup.stage.load_state_dict(state)
                for layer in setup.stage.layers:
                    layer.finish_init()   # fresh optimiser state bound to the loaded parameters
        except BpfreeError as exc:
            self._abort(context, exc)
        return pb.WeightsReply(tensors=len(state))

    def SetProximal(self, request: pb.ProximalRequest,
                    context: grpc.ServicerContext) -> pb.WeightsReply:
        try:
            setup = self._require()
            mu = request.mu
            if not math.isfinite(mu) or mu < 0:
                raise ProtocolError(f"SetProximal mu = {mu}: give a finite mu >= 0 (0 removes the "
                                    "proximal term)")
            with self._step_lock:
                if self._in_flight(setup):
                    raise StateError(f"batches of epoch {self._epoch} are still being trained; set "
                                     "the proximal term right after LoadWeights")
                _remove_proximal(setup)
                setup.proximal = add_proximal_term(setup.stage.layers, mu)
        except BpfreeError as exc:
            self._abort(context, exc)
        return pb.WeightsReply(tensors=len(setup.proximal))

    def GetWeights(self, request: pb.GetWeightsRequest,
                   context: grpc.ServicerContext) -> Iterator[pb.TensorChunk]:
        try:
            setup = self._require()
        except BpfreeError as exc:
            self._abort(context, exc)
        with self._step_lock:
            state = setup.stage.state_dict()   # a CPU copy: safe to stream after the lock
        yield from encode_state(state, setup.cfg.pipeline.chunk_bytes)

    def StartEpoch(self, request: pb.EpochRequest, context: grpc.ServicerContext) -> pb.EpochReply:
        try:
            setup = self._require(request.run_id)
            if not 0 <= request.epoch < request.total_epochs:
                raise ProtocolError(f"StartEpoch epoch = {request.epoch} of total_epochs = "
                                    f"{request.total_epochs}: need 0 <= epoch < total_epochs")
            with self._lock:
                if self._in_flight(setup) and not self._error:
                    raise StateError(f"batches of epoch {self._epoch} are still being trained; wait "
                                     "for FinishEpoch first")
                if self._error:   # a failed epoch: drop whatever it left in the queues
                    for q in (setup.inbox, setup.outbox):
                        while not q.empty():
                            q.get_nowait()
                if setup.link is not None and setup.link.error is not None:
                    setup.link = self._renew_link(setup)   # a broken stream is reopened, not reused
                with self._step_lock:
                    setup.stage.set_epoch(request.epoch, request.total_epochs)
                self._epoch, self._epoch_active, self._expected_seq = request.epoch, True, 0
                self._error = ""
                self._ended.clear()
                self._counters = _Counters(link_base=setup.link.bytes_out if setup.link else 0)
        except BpfreeError as exc:
            self._abort(context, exc)
        return pb.EpochReply()

    def FinishEpoch(self, request: pb.EpochRequest, context: grpc.ServicerContext) -> pb.StageStats:
        try:
            self._require(request.run_id)
            if not self._epoch_active or request.epoch != self._epoch:
                raise StateError(f"epoch {request.epoch} is not running on this stage (current: "
                                 f"{self._epoch}); call StartEpoch first")
            if not math.isfinite(request.timeout) or request.timeout < 0:
                raise ProtocolError(f"FinishEpoch timeout = {request.timeout} must be a finite "
                                    "number of seconds >= 0 (0 = the default 60 s)")
            timeout = request.timeout or 60.0
            remaining = context.time_remaining()
            if remaining is not None:
                timeout = min(timeout, remaining)
            if not self._ended.wait(timeout):
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"{self._describe()} did not see the end of epoch {request.epoch} within "
                              f"{timeout:g} s ({self._expected_seq} batches arrived)")
            if self._error:
                raise StateError(self._error)
            with self._lock:
                self._epoch_active = False
        except BpfreeError as exc:
            self._abort(context, exc)
        return self._stats()

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StageStats:
        return self._stats()

    def _stats(self) -> pb.StageStats:
        c, setup = self._counters, self._setup
        return pb.StageStats(
            address=self.address, layers=list(setup.stage.indices) if setup else [], epoch=self._epoch,
            train_batches=c.train_batches, eval_batches=c.eval_batches, busy_seconds=c.busy,
            idle_seconds=c.idle, blocked_seconds=c.blocked, bytes_in=c.bytes_in,
            bytes_out=c.bytes_out + (setup.link.bytes_out - c.link_base if setup and setup.link else 0),
            layer_metrics_json=json.dumps(c.means.means()), error=self._error, rss_mb=_rss_mb(),
            timeline=c.timeline)

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        setup = self._setup
        return pb.HealthReply(
            status="SERVING", host=socket.gethostname(), pid=os.getpid(),
            device=str(setup.stage.device) if setup else self.default_device,
            layers=list(setup.stage.indices) if setup else [], run_id=setup.run_id if setup else "",
            protocol_version=PROTOCOL_VERSION)

    # -- data plane: upstream -> this stage -------------------------------------------------------
    def push(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """Bidi Push handler: reassemble and check batches, enqueue them, ack each one."""
        asm: BatchAssembler | None = None
        try:
            for frame in frames:
                self._counters.bytes_in += len(frame)
                kind, meta, payload = unpack_frame(frame)
                if kind == pb.BATCH:
                    if asm is not None:
                        asm.batch()   # raises: the previous batch is incomplete
                    header = parse_meta(pb.BatchHeader, meta, "batch")
                    self._admit(header)
                    asm = BatchAssembler(header)
                    asm.add(0, payload)
                elif kind == pb.CHUNK:
                    if asm is None:
                        raise ProtocolError("a CHUNK frame arrived without a BATCH frame before it")
                    ch = parse_meta(pb.ChunkHeader, meta, "chunk")
                    if ch.seq != asm.header.seq:
                        raise ProtocolError(f"a chunk of batch {ch.seq} arrived while batch "
                                            f"{asm.header.seq} was incomplete")
                    asm.add(ch.offset, payload)
                elif kind == pb.END:
                    if asm is not None:
                        asm.batch()
                    end = parse_meta(pb.EndOfEpoch, meta, "end-of-epoch")
                    self._enqueue(self._admit_end(end), context)
                else:
                    raise ProtocolError(f"frame kind {kind} is not valid on the Push stream "
                                        "(expected BATCH, CHUNK or END)")
                if asm is not None and asm.complete:
                    batch = asm.batch()
                    asm = None
                    self._enqueue(self._commit(batch), context)
                    yield ack_frame(batch.seq)
            if asm is not None:
                raise ProtocolError(f"the stream ended inside batch {asm.header.seq} after "
                                    f"{asm.received} of {asm.header.total_bytes} bytes")
        except BpfreeError as exc:
            log.warning("rejected data stream from %s: %s", context.peer(), exc)
            self._abort(context, exc)

    def _admit(self, h: pb.BatchHeader) -> None:
        with self._lock:
            self._require(h.run_id)
            if self._error:
                raise StateError(f"this stage has stopped: {self._error}")
            if h.kind == pb.TRAIN:
                if not self._epoch_active or self._ended.is_set():
                    raise StateError(f"train batch {h.seq} of epoch {h.epoch} arrived but no epoch is "
                                     "running on this stage; call StartEpoch first")
                if h.epoch != self._epoch:
                    raise StateError(f"train batch {h.seq} belongs to epoch {h.epoch} but epoch "
                                     f"{self._epoch} is running")
                if h.seq != self._expected_seq:
                    raise StateError(f"train batch {h.seq} arrived but batch {self._expected_seq} was "
                                     "expected next; batches must arrive in order, none missing")
            elif h.kind != pb.EVAL:
                raise ProtocolError(f"batch {h.seq} has unknown kind {h.kind}; expected TRAIN or EVAL")

    def _commit(self, batch: WireBatch) -> WireBatch:
        with self._lock:
            self._admit(pb.BatchHeader(run_id=batch.run_id, seq=batch.seq, kind=batch.kind,
                                       epoch=batch.epoch))
            if batch.kind == pb.TRAIN:
                self._expected_seq += 1
        return batch

    def _admit_end(self, end: pb.EndOfEpoch) -> _End:
        with self._lock:
            self._require(end.run_id)
            if not self._epoch_active or end.epoch != self._epoch:
                raise StateError(f"end of epoch {end.epoch} arrived but epoch {self._epoch} is "
                                 f"{'running' if self._epoch_active else 'not running'}")
            if end.batches != self._expected_seq:
                raise ProtocolError(f"end of epoch {end.epoch} says {end.batches} batches were sent "
                                    f"but {self._expected_seq} arrived")
        return _End(end.run_id, end.epoch, end.batches)

    def _enqueue(self, item: WireBatch | _End, context: grpc.ServicerContext) -> None:
        setup = self._require()
        t0 = time.monotonic()
        while True:
            try:
                setup.inbox.put(item, timeout=_POLL)
                return
            except queue.Full:
                pass
            if self._error:
                raise StateError(f"this stage has stopped: {self._error}")
            if not context.is_active():
                raise StateError("the upstream closed the stream")
            if time.monotonic() - t0 > setup.cfg.pipeline.rpc_timeout:
                raise StateError(f"{self._describe()} did not take a batch within "
                                 f"{setup.cfg.pipeline.rpc_timeout:g} s; it is stuck")

    # -- data plane: last stage -> driver ---------------------------------------------------------
    def pull(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Server-stream Pull handler: the last stage's eval outputs and end markers."""
        try:
            req = parse_meta(pb.PullRequest, memoryview(request), "pull")
            setup = self._require(req.run_id)
            if setup.link is not None:
                raise StateError(f"{self._describe()} is not the last stage; pull from the last one")
            with self._lock:
                if setup.pulling:
                    raise StateError("another driver is already pulling this stage's output")
                setup.pulling = True
        except BpfreeError as exc:
            self._abort(context, exc)
        try:
            while context.is_active() and not setup.stop.is_set():
                if self._error:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"the pipeline stopped: {self._error}")
                try:
                    item = setup.outbox.get(timeout=_POLL)
                except queue.Empty:
                    continue
                if isinstance(item, _End):
                    frame = end_frame(item.run_id, item.epoch, item.batches)
                    self._counters.bytes_out += len(frame)
                    yield frame
                else:
                    for frame in encode_batch(item, setup.cfg.pipeline.chunk_bytes,
                                              setup.cfg.pipeline.wire_dtype):
                        self._counters.bytes_out += len(frame)
                        yield frame
        finally:
            with self._lock:
                setup.pulling = False

    # -- compute ----------------------------------------------------------------------------------
    def _compute(self, setup: _Setup) -> None:
        torch.set_grad_enabled(True)
        torch.set_num_threads(self.threads)
        while not setup.stop.is_set():
            t0 = time.perf_counter()
            try:
                item = setup.inbox.get(timeout=_POLL)
            except queue.Empty:
                if self._epoch_active and not self._ended.is_set():
                    self._counters.idle += time.perf_counter() - t0
                continue
            c = self._counters
            if self._epoch_active:
                c.idle += time.perf_counter() - t0
            if self._error:
                continue   # a failed stage drops everything until StartEpoch / Configure
            try:
                self._process(setup, item, c)
            except Exception as exc:  # noqa: BLE001 - any failure stops the stage loudly
                what = f"batch {item.seq}" if isinstance(item, WireBatch) else "the end marker"
                self._fail(f"{self._describe()} failed on {what}: {type(exc).__name__}: {exc}")

    def _process(self, setup: _Setup, item: WireBatch | _End, c: _Counters) -> None:
        if isinstance(item, _End):
            self._forward(setup, item, c)
            self._ended.set()
            return
        t0 = time.perf_counter()
        wall0 = time.time()   # Unix time: stages' timelines line up (bench/timeline.py)
        with self._step_lock:
            if item.kind == pb.TRAIN:
                out, metrics = setup.stage.train_step(item.tensors)
                c.means.add(metrics)
                c.train_batches += 1
            else:
                out = setup.stage.eval_step(item.tensors)
                c.eval_batches += 1
        busy = time.perf_counter() - t0
        c.busy += busy
        record = item.kind == pb.TRAIN and len(c.timeline) < _TIMELINE_MAX
        if item.kind == pb.TRAIN and setup.link is None:
            if record:
                c.timeline += (wall0, wall0 + busy, wall0 + busy)
            return   # the last stage's training output is not needed by anyone
        self._forward(setup, WireBatch(item.run_id, item.seq, item.kind, item.epoch, out), c)
        if record:
            c.timeline += (wall0, wall0 + busy, time.time())

    def _forward(self, setup: _Setup, item: WireBatch | _End, c: _Counters) -> None:
        t0 = time.perf_counter()
        if setup.link is not None:
            if isinstance(item, _End):
                setup.link.send_end(item.run_id, item.epoch, item.batches)
            else:
                setup.link.send(item)
        else:
            timeout = setup.cfg.pipeline.rpc_timeout
            while True:
                try:
                    setup.outbox.put(item, timeout=_POLL)
                    break
                except queue.Full:
                    if setup.stop.is_set():
                        return
                    if time.perf_counter() - t0 > timeout:
                        raise BpfreeError(f"the driver did not read the last stage's output within "
                                          f"{timeout:g} s; is it still running?") from None
        c.blocked += time.perf_counter() - t0

    def shutdown(self) -> None:
        setup = self._setup
        if setup is not None:
            setup.stop.set()
            if setup.link is not None:
                setup.link.close(grace=0)   # the process is going away: no draining


def build_server(worker: StageWorker, listen: str, security: Security,
                 max_workers: int = 16) -> tuple[grpc.Server, int]:
    """A gRPC server serving `worker`'s control and data planes; returns it and its bound port."""
    interceptors = [TokenInterceptor(security.token)] if security.token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
                         options=server_options(), interceptors=interceptors)
    pb_grpc.add_StageControlServicer_to_server(worker, server)
    data = grpc.method_handlers_generic_handler("bpfree.v1.StageData", {
        "Push": grpc.stream_stream_rpc_method_handler(worker.push),
        "Pull": grpc.unary_stream_rpc_method_handler(worker.pull),
    })
    server.add_generic_rpc_handlers((data,))
    try:
        port = security.add_port(server, listen)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {listen} ({exc}); pick a free HOST:PORT") from exc
    if port == 0:
        raise ConfigError(f"cannot listen on {listen}; pick a free HOST:PORT")
    return server, port
