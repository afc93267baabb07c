"""A configured stage's compute: its layers, queues, compute thread, downstream link and counters.

One `StageRun` per Configure call, replaced wholesale by the next. Its compute thread takes
batches from the inbox (filled by the service's Push handler), trains or evaluates them on the
Stage, and hands the outputs on: to the downstream Link, or to the outbox the driver pulls when
this is the last stage. Queues are bounded by pipeline.window, so memory stays flat however long
the epoch is. No gRPC here; failures go to the stage's Admission (sticky error).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from bpfree.client import staging
from bpfree.client.admission import Admission, EndMarker, StateError
from bpfree.client.link import Link
from bpfree.client.transport import Security, check_chunk_bytes, wait_for_peer
from bpfree.client.wire import Schema, WireBatch, encode_batch, end_frame, schema_of
from bpfree.protos import stage_pb2 as pb
from bpfree_core.config import ExperimentConfig
from bpfree_core.data.batches import mark_reference
from bpfree_core.errors import BpfreeError, ConfigError
from bpfree_core.evaluation import prediction_modes
from bpfree_core.frozen import caches
from bpfree_core.layers import INDEX, add_proximal_term
from bpfree_core.metrics import RunningMeans
from bpfree_core.model import OPTIMIZER, Stage, build_layers, pipelined_objective
from bpfree_core.objectives import Objective
from bpfree_core.runtime import resolve_device, rss_mb

POLL = 0.1                    # seconds between checks while waiting on a queue
_TIMELINE_MAX = 3 * 10_000    # per-batch timing kept per epoch: 3 doubles a batch, 240 KB at most


@dataclass
class Counters:
    """What one epoch of this stage did (reset by StartEpoch)."""

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
    gpu_steps: list = field(default_factory=list)   # (start, end) CUDA events per step on a GPU

    def busy_seconds(self) -> float:
        """Time in train/eval steps: on a GPU the device's own (CUDA events, read once here), so
        a batch's kernels are not billed to the next batch's upload; else the host's."""
        if not self.gpu_steps:
            return self.busy
        self.gpu_steps[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in self.gpu_steps) / 1e3


def parse_config(config_json: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.from_dict(json.loads(config_json))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config_json is not valid JSON ({exc})") from exc
    except (TypeError, AttributeError, OverflowError) as exc:   # valid JSON, wrong shape
        raise ConfigError(f"config_json is not a bpfree config ({exc})") from exc


def packet_schema(cfg: ExperimentConfig, objective: Objective, first: int) -> Schema:
    """The tensors (names, dtypes, shapes after the batch dimension) of the train and eval
    batches that reach layer `first`: a 2-sample batch encoded as the driver encodes it, run
    through fresh copies of layers 0 .. first-1 (weights change no name, dtype or shape)."""
    c, h, w = objective.spec.shape
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, c * h * w, generator=gen), torch.tensor([0, 1])
    train = objective.encode_train(x, y, gen)
    if cfg.continual.strategy == "agem":   # its train packets carry the reference marker
        train = mark_reference(train, False)
    if caches(cfg, objective):   # a staged run's batches carry each sample's index
        train[INDEX] = torch.tensor([0, 1])
    evals = objective.encode_eval(x, prediction_modes(objective, cfg)[1])
    if first > 0:
        if cfg.train.compile:   # names, dtypes and shapes are eager's: no CPU compile at Configure
            cfg = cfg.with_overrides(["train.compile=false"])
        with torch.random.fork_rng(devices=[]):
            before = Stage(build_layers(cfg, range(first), objective))
            train, _ = before.train_step(train)
            evals = before.eval_step(evals)
    return {pb.TRAIN: schema_of(train), pb.EVAL: schema_of(evals)}


def _cuda_events(device: torch.device) -> tuple | None:
    """A (start, end) pair of CUDA events, start recorded now; None off the GPU."""
    if device.type != "cuda":
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    return start, end


class StageRun:
    """Everything one Configure call builds, and the compute thread that runs it."""

    def __init__(self, req: pb.ConfigureRequest, default_device: str, security: Security,
                 admission: Admission, threads: int, address: str):
        if not req.run_id:
            raise ConfigError("Configure needs a run_id")
        cfg = parse_config(req.config_json)
        try:
            objective = pipelined_objective(cfg)
        except ConfigError as exc:   # a well-formed request this stage cannot serve
            raise StateError(str(exc)) from None
        check_chunk_bytes(cfg.pipeline.chunk_bytes)
        n = len(objective.layer_sizes())
        layers = list(req.layers)
        if layers and (layers != list(range(layers[0], layers[-1] + 1)) or layers[0] < 0
                       or layers[-1] >= n):
            raise ConfigError(f"layers {layers} must be contiguous, ascending indices in 0 .. {n - 1}")
        try:
            device = resolve_device(req.device or default_device)
        except ConfigError as exc:
            raise StateError(str(exc)) from exc
        self.indices = range(layers[0], layers[-1] + 1) if layers else range(0)
        self.run_id, self.cfg, self.index, self.num_stages = req.run_id, cfg, req.stage, req.num_stages
        self.security, self.admission, self.threads = security, admission, threads
        self.address, self.downstream = address, req.downstream
        self.stage = Stage(build_layers(cfg, self.indices, objective), device)
        self.schema = packet_schema(cfg, objective, self.indices.start) if layers else {}
        self.link: Link | None = None
        if req.downstream:
            # Raises PeerUnavailableError naming the address after retries with backoff.
            wait_for_peer(req.downstream, security, cfg.pipeline.connect_timeout)
            self.link = self._open_link(req.downstream)
        self.inbox: queue.Queue = queue.Queue(maxsize=cfg.pipeline.window)
        self.outbox: queue.Queue = queue.Queue(maxsize=cfg.pipeline.window)
        self.stop_event = threading.Event()
        self.step_lock = threading.Lock()   # held during a train/eval step and weight transfers
        self.counters = Counters()
        self.pullers = 0                    # pull streams opened; only the newest is served
        self.proximal: list = []            # FedProx gradient hooks (SetProximal)
        self.thread = threading.Thread(target=self._run, name="compute", daemon=True)

    def _open_link(self, address: str) -> Link:
        p = self.cfg.pipeline
        return Link(address, self.security, window=p.window, chunk_bytes=p.chunk_bytes,
                    wire_dtype=p.wire_dtype, timeout=p.rpc_timeout, data_plane=p.data_plane)

    def describe(self) -> str:
        return f"stage {self.index} (layers {list(self.stage.indices)}) at {self.address}"

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self, grace: float | None = None) -> None:
        self.stop_event.set()
        if grace is None:   # the process is going away: no draining
            if self.link is not None:
                self.link.close(grace=0)
            return
        self.thread.join(timeout=grace)
        if self.link is not None:
            self.link.close()

    def in_flight(self) -> bool:
        return self.admission.in_flight(queued=not self.inbox.empty())

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        """Called under the admission lock by StartEpoch, after its checks."""
        if self.admission.error:   # a failed epoch: drop whatever it left in the queues
            for q in (self.inbox, self.outbox):
                while not q.empty():
                    q.get_nowait()
        if self.link is not None and self.link.error is not None:
            # A broken stream is reopened, not reused.
            self.link.close(grace=0)
            wait_for_peer(self.link.address, self.security, self.cfg.pipeline.connect_timeout)
            self.link = self._open_link(self.link.address)
        with self.step_lock:
            self.stage.set_epoch(epoch, total_epochs)
        self.counters = Counters(link_base=self.link.bytes_out if self.link else 0)

    # -- weights -------------------------------------------------------------------------------
    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        with self.step_lock:
            if self.in_flight():
                raise StateError(f"batches of epoch {self.admission.epoch} are still being trained; "
                                 "load weights between epochs")
            self.admission.end_epoch()        # an unfinished (failed) epoch is given up
            self._remove_proximal()       # anchored at the old weights: meaningless now
            optimizer = {k: v for k, v in state.items() if k.startswith(OPTIMIZER)}
            self.stage.load_state_dict({k: v for k, v in state.items() if k not in optimizer})
            for layer in self.stage.layers:
                layer.finish_init()       # fresh optimiser state bound to the loaded parameters
            # ... or the state that came with them (a checkpoint); EWC / SI state likewise
            self.stage.load_optimizer_tensors(optimizer)

    def end_task(self) -> dict[int, float]:
        with self.step_lock:
            if self.in_flight():
                raise StateError(f"batches of epoch {self.admission.epoch} are still being trained; "
                                 "end the task after FinishEpoch")
            return self.stage.end_task()

    def set_proximal(self, mu: float) -> int:
        with self.step_lock:
            if self.in_flight():
                raise StateError(f"batches of epoch {self.admission.epoch} are still being trained; "
                                 "set the proximal term right after LoadWeights")
            self._remove_proximal()
            self.proximal = add_proximal_term(self.stage.layers, mu)
        return len(self.proximal)

    def _remove_proximal(self) -> None:
        for handle in self.proximal:
            handle.remove()
        self.proximal = []

    def weights(self, with_optimizer: bool = False) -> dict[str, torch.Tensor]:
        with self.step_lock:   # CPU copies: safe to stream after the lock
            state = self.stage.state_dict()
            if with_optimizer:
                state.update(self.stage.optimizer_tensors())
            return state

    # -- the queues ----------------------------------------------------------------------------
    def enqueue(self, item: WireBatch | EndMarker, alive: Callable[[], bool]) -> None:
        """Queue `item` for the compute thread; wait while the inbox is full (backpressure)."""
        t0 = time.monotonic()
        while True:
            try:
                self.inbox.put(item, timeout=POLL)
                return
            except queue.Full:
                pass
            self.admission.check_running()
            if not alive():
                raise StateError("the upstream closed the stream")
            if time.monotonic() - t0 > self.cfg.pipeline.rpc_timeout:
                raise StateError(f"{self.describe()} did not take a batch within "
                                 f"{self.cfg.pipeline.rpc_timeout:g} s; it is stuck")

    def output_frames(self, alive: Callable[[], bool]) -> Iterator[bytes]:
        """The last stage's eval outputs and end markers, as frames, until the stream closes."""
        p = self.cfg.pipeline
        while alive() and not self.stop_event.is_set():
            if self.admission.error:
                raise StateError(f"the pipeline stopped: {self.admission.error}")
            try:
                item = self.outbox.get(timeout=POLL)
            except queue.Empty:
                continue
            if not alive():   # this reader was closed or superseded while it waited: the item
                with self.outbox.mutex:   # goes back first in line for the reader that follows
                    self.outbox.queue.appendleft(item)
                    self.outbox.not_empty.notify()
                return
            frames = ([end_frame(item.run_id, item.epoch, item.batches)]
                      if isinstance(item, EndMarker) else encode_batch(item, p.chunk_bytes, p.wire_dtype))
            for frame in frames:
                self.counters.bytes_out += len(frame)
                yield frame

    # -- the compute thread --------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(True)
        # Set here: OpenMP keeps a thread count per thread, and a new thread starts at the
        # machine's default, so set_num_threads in the main thread alone would not reach it.
        torch.set_num_threads(self.threads)
        adm = self.admission
        while not self.stop_event.is_set():
            t0 = time.perf_counter()
            try:
                item = self.inbox.get(timeout=POLL)
            except queue.Empty:
                if adm.active and not adm.ended.is_set():
                    self.counters.idle += time.perf_counter() - t0
                continue
            c = self.counters
            if adm.active:
                c.idle += time.perf_counter() - t0
            if adm.error:
                continue   # a failed stage drops everything until StartEpoch / Configure
            try:
                self._process(item, c)
            except Exception as exc:  # noqa: BLE001 - any failure stops the stage loudly
                what = f"batch {item.seq}" if isinstance(item, WireBatch) else "the end marker"
                adm.fail(f"{self.describe()} failed on {what}: {type(exc).__name__}: {exc}")

    def _process(self, item: WireBatch | EndMarker, c: Counters) -> None:
        if isinstance(item, EndMarker):
            self._forward(item, c)
            self.admission.ended.set()
            return
        t0 = time.perf_counter()
        wall0 = time.time()   # Unix time: stages' timelines line up (bench/timeline.py)
        events = _cuda_events(self.stage.device)
        with self.step_lock:
            staging.wait_ready(item.tensors, item.ready, self.stage.device)
            if item.kind == pb.TRAIN:
                out, metrics = self.stage.train_step(item.tensors)
                c.means.add(metrics)
                c.train_batches += 1
            else:
                out = self.stage.eval_step(item.tensors)
                c.eval_batches += 1
        if events is not None:   # no wait here: read at the epoch's stats
            events[1].record()
            c.gpu_steps.append(events)
        busy = time.perf_counter() - t0
        c.busy += busy
        record = item.kind == pb.TRAIN and len(c.timeline) < _TIMELINE_MAX
        if item.kind == pb.TRAIN and self.link is None:
            if record:
                c.timeline += (wall0, wall0 + busy, wall0 + busy)
            return   # the last stage's training output is not needed by anyone
        self._forward(WireBatch(item.run_id, item.seq, item.kind, item.epoch, out,
                                staging.mark_ready(self.stage.device)), c)
        if record:
            c.timeline += (wall0, wall0 + busy, time.time())

    def _forward(self, item: WireBatch | EndMarker, c: Counters) -> None:
        t0 = time.perf_counter()
        if self.link is not None:
            if isinstance(item, EndMarker):
                self.link.send_end(item.run_id, item.epoch, item.batches)
            else:
                self.link.send(item)
        else:
            timeout = self.cfg.pipeline.rpc_timeout
            while True:
                try:
                    self.outbox.put(item, timeout=POLL)
                    break
                except queue.Full:
                    if self.stop_event.is_set():
                        return
                    if time.perf_counter() - t0 > timeout:
                        raise BpfreeError(f"the driver did not read the last stage's output within "
                                          f"{timeout:g} s; is it still running?") from None
        c.blocked += time.perf_counter() - t0

    # -- statistics ----------------------------------------------------------------------------
    def stats(self) -> pb.StageStats:
        c = self.counters
        return pb.StageStats(
            address=self.address, layers=list(self.stage.indices), epoch=self.admission.epoch,
            train_batches=c.train_batches, eval_batches=c.eval_batches, busy_seconds=c.busy_seconds(),
            idle_seconds=c.idle, blocked_seconds=c.blocked, bytes_in=c.bytes_in,
            bytes_out=c.bytes_out + (self.link.bytes_out - c.link_base if self.link else 0),
            layer_metrics_json=json.dumps(c.means.means()), error=self.admission.error,
            rss_mb=rss_mb(), timeline=c.timeline)
