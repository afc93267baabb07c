"""One pipeline stage's gRPC service: decode requests, call the stage, map errors to status codes.

A stage worker has three rooms: this service (gRPC, and the data plane's handlers, which the TCP
plane of client.tcp_plane calls too), its admission rules (client.admission: the epoch / sequence
/ error state machine) and its compute (client.compute: the Stage, queues, compute thread,
downstream link and counters, rebuilt by every Configure).

Threads in a worker process:
* gRPC handler threads: control RPCs, and on the gRPC plane the upstream's Push stream (decode,
  check, enqueue, ack) and the driver's Pull stream (last stage only).
* on the TCP plane (the default): an accept thread and one thread per Push or Pull connection,
  running the same push_stream / pull_stream.
* one compute thread: inbox -> Stage.train_step / eval_step -> downstream Link (or the outbox
  that the driver pulls when this is the last stage).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import torch

from bpfree.client.admission import Admission, Lease, StateError, configure_digest
from bpfree.client.compute import StageRun
from bpfree.client.tcp_plane import FrameServer
from bpfree.client.transport import (
    IDLE_TIMEOUT,
    RateLimitedLog,
    Security,
    TokenInterceptor,
    check_port_free,
    server_options,
)
from bpfree.client.wire import (
    PROTOCOL_VERSION,
    LimitError,
    WireBatch,
    ack_frame,
    check_schema,
    decode_frames,
    decode_state,
    encode_state,
    parse_meta,
)
from bpfree.protos import stage_pb2 as pb
from bpfree.protos import stage_pb2_grpc as pb_grpc
from bpfree_core.errors import BpfreeError, ConfigError, PeerUnavailableError, ProtocolError
from bpfree_core.runtime import rss_mb

log = logging.getLogger(__name__)

__all__ = ["StageWorker", "StateError", "build_server"]

_REJECTED = RateLimitedLog(log)   # a fuzzer or a broken peer must not flood the log


class StageWorker(pb_grpc.StageControlServicer):
    """The RPC handlers (control + raw data plane) of one stage worker."""

    def __init__(self, device: str, security: Security, address: str = "", threads: int = 0,
                 data_listen: str = ""):
        """`data_listen`: HOST:PORT of the TCP data plane, opened when a run asks for it ("" = the
        host of `address`, any free port)."""
        self.default_device = device
        self.data_listen = data_listen
        self.frame_server: FrameServer | None = None
        self.threads = threads or torch.get_num_threads()   # the compute thread's (0 = ours now)
        self.security = security
        self.address = address
        self.admission = Admission()
        self.lease = Lease()
        self.run: StageRun | None = None
        self.setup = ""        # what the run was configured with (configure_digest)
        self.configures = 0    # Configure calls accepted since this worker started
        self._configure_lock = threading.Lock()

    def _require(self, run_id: str | None = None) -> StageRun:
        self.admission.require(run_id)
        assert self.run is not None
        self.lease.touch()
        return self.run

    def _describe(self) -> str:
        return self.run.describe() if self.run is not None else f"stage worker {self.address}"

    @staticmethod
    def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
        context.abort(status_of(exc), str(exc))

    # -- control plane --------------------------------------------------------------------------
    def Configure(self, request: pb.ConfigureRequest, context: grpc.ServicerContext) -> pb.ConfigureReply:
        try:
            with self._configure_lock:
                self.lease.take(request.session, f"stage worker {self.address}")
                run = StageRun(request, self.default_device, self.security, self.admission,
                               self.threads, self.address)
                with self.admission.lock:
                    old, self.run = self.run, run
                    self.admission.configure(
                        request.run_id, lambda header: check_schema(header, run.schema))
                if old is not None:
                    old.stop(grace=5.0)
                if run.cfg.pipeline.data_plane == "tcp" and self.frame_server is None:
                    self.frame_server = FrameServer(
                        self.data_listen or f"{self.address.rpartition(':')[0] or '127.0.0.1'}:0",
                        self.security, self.push_stream, self.pull_stream,
                        lambda exc: status_of(exc).name)
                run.start()
                self.setup, self.configures = configure_digest(request), self.configures + 1
        except (BpfreeError, ValueError) as exc:
            self._abort(context, exc if isinstance(exc, BpfreeError) else ConfigError(str(exc)))
        log.info("configured run %s: stage %d/%d, layers %s on %s, downstream %s", request.run_id,
                 request.stage, request.num_stages, list(run.indices), run.stage.device,
                 request.downstream or "(driver pulls)")
        params = sum(p.numel() for layer in run.stage.layers for p in layer.parameters())
        return pb.ConfigureReply(device=str(run.stage.device), parameters=params)

    def LoadWeights(self, request_iterator: Iterator[pb.TensorChunk],
                    context: grpc.ServicerContext) -> pb.WeightsReply:
        try:
            run = self._require()
            state = decode_state(request_iterator)
            run.load_weights(state)
        except BpfreeError as exc:
            self._abort(context, exc)
        return pb.WeightsReply(tensors=len(state))

    def SetProximal(self, request: pb.ProximalRequest,
                    context: grpc.ServicerContext) -> pb.WeightsReply:
        try:
            run = self._require()
            mu = request.mu
            if not math.isfinite(mu) or mu < 0:
                raise ProtocolError(f"SetProximal mu = {mu}: give a finite mu >= 0 (0 removes the "
                                    "proximal term)")
            hooks = run.set_proximal(mu)
        except BpfreeError as exc:
            self._abort(context, exc)
        return pb.WeightsReply(tensors=hooks)

    def EndTask(self, request: pb.EndTaskRequest, context: grpc.ServicerContext) -> pb.EndTaskReply:
        try:
            penalties = self._require(request.run_id).end_task()
        except BpfreeError as exc:
            self._abort(context, exc)
        return pb.EndTaskReply(layers=list(penalties), penalties=list(penalties.values()))

    def GetWeights(self, request: pb.GetWeightsRequest,
                   context: grpc.ServicerContext) -> Iterator[pb.TensorChunk]:
        try:
            run = self._require()
        except BpfreeError as exc:
            self._abort(context, exc)
        yield from encode_state(run.weights(request.with_optimizer), run.cfg.pipeline.chunk_bytes)

    def StartEpoch(self, request: pb.EpochRequest, context: grpc.ServicerContext) -> pb.EpochReply:
        adm = self.admission
        try:
            run = self._require(request.run_id)
            if not 0 <= request.epoch < request.total_epochs:
                raise ProtocolError(f"StartEpoch epoch = {request.epoch} of total_epochs = "
                                    f"{request.total_epochs}: need 0 <= epoch < total_epochs")
            with adm.lock:
                if run.in_flight() and not adm.error:
                    raise StateError(f"batches of epoch {adm.epoch} are still being trained; wait "
                                     "for FinishEpoch first")
                run.start_epoch(request.epoch, request.total_epochs)
                adm.begin_epoch(request.epoch)
        except BpfreeError as exc:
            self._abort(context, exc)
        return pb.EpochReply()

    def FinishEpoch(self, request: pb.EpochRequest, context: grpc.ServicerContext) -> pb.StageStats:
        adm = self.admission
        try:
            run = self._require(request.run_id)
            adm.check_finish(request.epoch)
            if not math.isfinite(request.timeout) or request.timeout < 0:
                raise ProtocolError(f"FinishEpoch timeout = {request.timeout} must be a finite "
                                    "number of seconds >= 0 (0 = the default 60 s)")
            timeout = request.timeout or 60.0
            remaining = context.time_remaining()
            if remaining is not None:
                timeout = min(timeout, remaining)
            if not adm.ended.wait(timeout):
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"{self._describe()} did not see the end of epoch {request.epoch} within "
                              f"{timeout:g} s ({adm.expected_seq} batches arrived)")
            if adm.error:
                raise StateError(adm.error)
            adm.end_epoch()
        except BpfreeError as exc:
            self._abort(context, exc)
        return run.stats()

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StageStats:
        run = self.run
        if run is None:
            return pb.StageStats(address=self.address, epoch=self.admission.epoch,
                                 error=self.admission.error, rss_mb=rss_mb())
        stats = run.stats()
        stats.configures = self.configures
        return stats

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        run = self.run
        return pb.HealthReply(
            status="SERVING", host=socket.gethostname(), pid=os.getpid(),
            device=str(run.stage.device) if run else self.default_device,
            layers=list(run.stage.indices) if run else [], run_id=run.run_id if run else "",
            protocol_version=PROTOCOL_VERSION,
            data_port=self.frame_server.port if self.frame_server else 0,
            session=self.lease.session if run else "", setup=self.setup if run else "")

    # -- data plane (gRPC here; client.tcp_plane calls push_stream / pull_stream directly) -------
    def push(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """Bidi Push handler."""
        try:
            yield from self.push_stream(frames, context.is_active, context.peer())
        except BpfreeError as exc:
            self._abort(context, exc)

    def push_stream(self, frames: Iterator[bytes | memoryview], alive: Callable[[], bool],
                    peer: str) -> Iterator[bytes]:
        """Reassemble and check the upstream's batches, enqueue them, yield an ack for each."""
        adm = self.admission
        try:
            for item in decode_frames(self._count_in(frames), admit=adm.admit,
                                      place=self._stage_device):
                run = self._require()
                if isinstance(item, WireBatch):
                    adm.commit(item.run_id, item.seq, item.kind, item.epoch)
                    run.enqueue(item, alive)
                    yield ack_frame(item.seq)
                else:
                    run.enqueue(adm.admit_end(item), alive)
        except BpfreeError as exc:
            _REJECTED.warning("rejected data stream from %s: %s", peer, exc)
            raise

    def _stage_device(self) -> torch.device | None:
        """Where received batches go: a CUDA stage has them uploaded as they complete."""
        run = self.run
        return run.stage.device if run is not None else None

    def _count_in(self, frames: Iterator[bytes | memoryview]) -> Iterator[bytes | memoryview]:
        for frame in frames:
            if self.run is not None:
                self.run.counters.bytes_in += len(frame)
            self.lease.touch()
            yield frame

    def pull(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Server-stream Pull handler."""
        try:
            yield from self.pull_stream(request, context.is_active)
        except BpfreeError as exc:
            self._abort(context, exc)

    def pull_stream(self, request: bytes, alive: Callable[[], bool]) -> Iterator[bytes]:
        """The last stage's eval outputs and end markers, for the one driver that pulls."""
        req = parse_meta(pb.PullRequest, memoryview(request), "pull")
        run = self._require(req.run_id)
        if run.link is not None:
            raise StateError(f"{self._describe()} is not the last stage; pull from the last one")
        with self.admission.lock:   # the newest driver of the run reads; an older stream stops
            run.pullers += 1        # (a driver that attached right after the last one closed)
            mine = run.pullers
        yield from run.output_frames(lambda: alive() and run.pullers == mine)

    def shutdown(self) -> None:
        if self.frame_server is not None:
            self.frame_server.close()
        if self.run is not None:
            self.run.stop()   # no draining: the process is going away


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status a stage answers a failed request with (both data planes use the names)."""
    if isinstance(exc, StateError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, LimitError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, ProtocolError | ConfigError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, PeerUnavailableError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def build_server(worker: StageWorker, listen: str, security: Security,
                 max_workers: int = 16, idle_timeout: float = IDLE_TIMEOUT) -> tuple[grpc.Server, int]:
    """A gRPC server serving `worker`'s control and data planes; returns it and its bound port.
    Connections idle for `idle_timeout` seconds (no handshake, no RPC) are closed."""
    check_port_free(listen)   # names a taken port before gRPC core logs its own error line
    interceptors = [TokenInterceptor(security.token)] if security.token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
                         options=server_options(idle_timeout), interceptors=interceptors)
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
