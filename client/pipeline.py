"""The pipeline driver: feeds stage 0, collects per-stage stats, reads the last stage's output.

    with Pipeline.launch_local(cfg) as pipe:            # S `bpfree worker` processes on loopback
        pipe.train_epoch(train_packets(objective, split, cfg, 0), epoch=0, total_epochs=1)
        acc = evaluate(pipe.eval_forward, objective, test_split, cfg)

Data flows driver -> stage 0 -> ... -> stage S-1 over Push streams (each stage forwards its
outputs itself, so stage i works on batch t while stage i+1 works on t-1), and the last stage's
eval outputs and end-of-epoch markers come back to the driver over a Pull stream.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
import torch

from bpfree.client.admission import configure_digest
from bpfree.client.link import Link, PullReader, rpc_exception
from bpfree.client.memory import tune_malloc
from bpfree.client.supervisor import LocalWorkers
from bpfree.client.transport import Security, check_chunk_bytes, split_address, wait_for_peer
from bpfree.client.wire import WireBatch, decode_state, encode_state
from bpfree.protos import stage_pb2 as pb
from bpfree.protos import stage_pb2_grpc as pb_grpc
from bpfree_core.balance import stage_ranges
from bpfree_core.config import ExperimentConfig, stage_device
from bpfree_core.data.datasets import bind_data
from bpfree_core.errors import BpfreeError, ConfigError, PeerUnavailableError, StageTimeoutError
from bpfree_core.layers import LABELS, Packet
from bpfree_core.model import OPTIMIZER, pipelined_objective
from bpfree_core.objectives import Objective
from bpfree_core.run.executor import epoch_stats

log = logging.getLogger(__name__)

# A driver process's own session, when its run spans no other process (pipeline.session = "").
PROCESS_SESSION = uuid.uuid4().hex

_STATUS_POLL = 1.0   # seconds between stage health checks while waiting for an epoch to drain


def _check_pipelinable(cfg: ExperimentConfig) -> Objective:
    """The run's objective, once it is known to split into stages."""
    objective = pipelined_objective(cfg)
    check_chunk_bytes(cfg.pipeline.chunk_bytes)
    return objective


def _wire_config(cfg: ExperimentConfig) -> str:
    """The config a worker receives: the token never travels inside it."""
    return json.dumps(cfg.to_dict(), sort_keys=True)


class Pipeline:
    """S stage workers, configured for one run, driven from this process."""

    def __init__(self, cfg: ExperimentConfig, addresses: list[str], security: Security,
                 workers: LocalWorkers | None = None, device: str = "", attach: bool = False):
        """`attach`: stages this session left configured as this driver would configure them are
        used as they are (their layers keep their weights: for a driver that loads weights before
        it trains, as every federated round does); else every stage is configured afresh."""
        cfg = bind_data(cfg)   # workers learn the data's shape from the config, not the files
        self.cfg = cfg
        self.addresses = list(addresses)
        self.security = security
        self.workers = workers     # the processes behind `addresses`, when this process started them
        self.device = device
        self._closed = False
        self.run_id = uuid.uuid4().hex
        self._channels: list[grpc.Channel] = []
        self._stubs: list[pb_grpc.StageControlStub] = []
        self._link: Link | None = None
        self._pull: PullReader | None = None
        self._eval_seq = 0
        tune_malloc()   # frames and received tensors reuse heap pages instead of page-faulting
        try:
            objective = _check_pipelinable(cfg)
            if not addresses:
                raise ConfigError("a pipeline needs at least one stage worker address")
            for address in self.addresses:
                split_address(address, "stage worker address")
            self.ranges = stage_ranges(cfg, len(addresses), objective,
                                       device=stage_device(device, 0) or cfg.train.device)
            for address in self.addresses:
                channel = security.channel(address)
                self._channels.append(channel)
                self._stubs.append(pb_grpc.StageControlStub(channel))
                wait_for_peer(address, security, cfg.pipeline.connect_timeout, channel)
            self._configure(device, fresh=not attach)
        except BaseException:
            self.close()
            raise

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def launch_local(cls, cfg: ExperimentConfig, *, device: str = "cpu", threads: int = 1,
                     log_dir: Path | None = None) -> Pipeline:
        """Spawn cfg.pipeline.stages `bpfree worker` processes on 127.0.0.1 and configure them, on
        `device` or, where set, pipeline.devices (one per stage, e.g. cuda:0,cuda:1)."""
        device = cfg.pipeline.devices or device
        _check_pipelinable(cfg)
        security = Security(token=cfg.pipeline.token, tls_ca=cfg.pipeline.tls_ca)
        workers = LocalWorkers(cfg.pipeline.stages, device=device, threads=threads, log_dir=log_dir,
                               token=cfg.pipeline.token, timeout=cfg.pipeline.connect_timeout)
        return cls(cfg, list(workers.addresses), security, workers=workers, device=device)

    @property
    def processes(self) -> list[subprocess.Popen]:
        """The worker processes this pipeline launched (none when it connected to addresses)."""
        return self.workers.processes if self.workers is not None else []

    @classmethod
    def connect(cls, cfg: ExperimentConfig, addresses: list[str], attach: bool = False) -> Pipeline:
        """Use stage workers already running at `addresses` (in stage order) and configure them
        (`attach`: reuse them as an earlier driver of this run left them, see __init__)."""
        security = Security(token=cfg.pipeline.token, tls_ca=cfg.pipeline.tls_ca)
        return cls(cfg, addresses, security, attach=attach)

    def _configure(self, device: str, fresh: bool = False) -> None:
        """Configure every stage, or (unless `fresh`) attach to stages an earlier driver of this
        session left configured exactly so (the previous round's): a run configures its stages
        once, and again only after a failure (`recover`)."""
        config_json = _wire_config(self.cfg)
        n = len(self.addresses)
        requests = [pb.ConfigureRequest(
            run_id=self.run_id, layers=list(self.ranges[s]), config_json=config_json,
            device=stage_device(device, s), downstream=self.addresses[s + 1] if s + 1 < n else "",
            stage=s,
            num_stages=n, session=self.cfg.pipeline.session or PROCESS_SESSION) for s in range(n)]
        if not fresh and self._attach(requests):
            return
        for s in reversed(range(n)):   # last stage first: each checks that its downstream answers
            self._call(s, "Configure", requests[s],
                       timeout=self.cfg.pipeline.connect_timeout + self.cfg.pipeline.rpc_timeout)
        log.info("pipeline %s: %d stage(s) %s, layers %s", self.run_id[:8], n, self.addresses,
                 [list(r) for r in self.ranges])

    def _attach(self, requests: list[pb.ConfigureRequest]) -> bool:
        """True if every stage already runs one run of this session set up as `requests` say."""
        health = [self._call(s, "Health", pb.HealthRequest(), timeout=self.cfg.pipeline.rpc_timeout)
                  for s in range(len(requests))]
        runs = {h.run_id for h in health}
        if len(runs) != 1 or "" in runs or any(
                h.setup != configure_digest(r) for h, r in zip(health, requests, strict=True)):
            return False
        self.run_id = runs.pop()
        log.debug("pipeline %s: attached to %d configured stage(s) %s", self.run_id[:8],
                  len(requests), self.addresses)
        return True

    def _call(self, s: int, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self._stubs[s], method)(
                request, timeout=timeout or self.cfg.pipeline.rpc_timeout,
                metadata=self.security.metadata())
        except grpc.RpcError as exc:
            raise rpc_exception(self.addresses[s], exc, f"{method} on") from None

    # -- data plane -----------------------------------------------------------------------------
    def _ensure_streams(self) -> tuple[Link, PullReader]:
        p = self.cfg.pipeline
        if self._link is None or self._link.error is not None:
            if self._link is not None:
                self._link.close()
            self._link = Link(self.addresses[0], self.security, window=p.window,
                              chunk_bytes=p.chunk_bytes, wire_dtype=p.wire_dtype,
                              timeout=p.rpc_timeout, channel=self._channels[0],
                              on_stall=self._report_stall, data_plane=p.data_plane)
        if self._pull is None or self._pull.error is not None:
            if self._pull is not None:
                self._pull.close()
            self._pull = PullReader(self.addresses[-1], self._channels[-1], self.security,
                                    self.run_id, p.data_plane, p.connect_timeout)
        return self._link, self._pull

    def _report_stall(self, seconds: float) -> None:
        """Say in the log that the pipeline stopped moving, and which stages do not answer."""
        silent = []
        for s, stub in enumerate(self._stubs):
            try:
                stub.Health(pb.HealthRequest(), timeout=2.0, metadata=self.security.metadata())
            except grpc.RpcError:
                silent.append(f"stage {s} at {self.addresses[s]}")
        log.warning("the pipeline has made no progress for %.0f s: %s; waiting up to "
                    "pipeline.rpc_timeout = %g s", seconds,
                    f"not answering: {', '.join(silent)} (stopped, hung or overloaded?)" if silent
                    else "every stage answers (a slow stage?)", self.cfg.pipeline.rpc_timeout)

    def _stage_failure(self, cause: BpfreeError) -> BpfreeError:
        """The most specific error: the first failing stage's own sticky error, else `cause`."""
        for s, stub in enumerate(self._stubs):
            try:
                stats = stub.Stats(pb.StatsRequest(), timeout=5.0, metadata=self.security.metadata())
            except grpc.RpcError as exc:
                return PeerUnavailableError(f"stage {s} at {self.addresses[s]} stopped answering "
                                            f"({exc.code().name}) after: {cause}")
            if stats.error:
                return BpfreeError(f"stage {s} failed: {stats.error}")
        return cause

    def train_epoch(self, packets: Iterable[Packet], epoch: int, total_epochs: int) -> dict[str, Any]:
        """Stream one epoch of first-layer packets through the stages; return the epoch's stats."""
        self._check_open()
        link, pull = self._ensure_streams()
        for s in range(len(self.addresses)):
            self._call(s, "StartEpoch", pb.EpochRequest(run_id=self.run_id, epoch=epoch,
                                                        total_epochs=total_epochs))
        t0 = time.perf_counter()
        n, samples, blocked = 0, 0, 0.0
        sends: list[list[float]] = []   # per batch [send start, send returned], Unix seconds
        try:
            for packet in packets:
                sent = time.time()
                blocked += link.send(WireBatch(self.run_id, n, pb.TRAIN, epoch, packet))
                sends.append([sent, time.time()])
                samples += int(packet[LABELS].shape[0]) if LABELS in packet else 0
                n += 1
            link.send_end(self.run_id, epoch, n)
            self._wait_end(pull, epoch)
        except BpfreeError as exc:
            raise self._stage_failure(exc) from exc
        seconds = time.perf_counter() - t0
        stats = [self._call(s, "FinishEpoch", pb.EpochRequest(run_id=self.run_id, epoch=epoch,
                                                              timeout=self.cfg.pipeline.rpc_timeout))
                 for s in range(len(self.addresses))]
        layers: dict[str, dict[str, float]] = {}
        for st in stats:
            layers.update(json.loads(st.layer_metrics_json))
        return epoch_stats(dict(sorted(layers.items(), key=lambda kv: int(kv[0]))), n, samples,
                           seconds, epoch=epoch, driver_blocked_seconds=blocked,
                           driver_timeline=sends,
                           stages=[_stage_dict(s, st) for s, st in enumerate(stats)])

    def _wait_end(self, pull: PullReader, epoch: int) -> None:
        """Wait for the end marker from the last stage; check the stages while waiting."""
        deadline = time.monotonic() + self.cfg.pipeline.rpc_timeout
        while True:
            try:
                item = pull.get(_STATUS_POLL, f"the end of epoch {epoch}")
            except StageTimeoutError:
                if self._link is not None and self._link.error is not None:
                    raise self._link.error from None
                failure = self._stage_failure(StageTimeoutError("no progress"))
                if not isinstance(failure, StageTimeoutError):
                    raise failure from None
                if time.monotonic() > deadline:
                    raise StageTimeoutError(
                        f"the end of epoch {epoch} did not come out of the last stage at "
                        f"{self.addresses[-1]} within {self.cfg.pipeline.rpc_timeout:g} s after the "
                        "last batch was sent (pipeline.rpc_timeout)") from None
                continue
            if isinstance(item, pb.EndOfEpoch) and item.epoch == epoch:
                return
            deadline = time.monotonic() + self.cfg.pipeline.rpc_timeout   # progress: reset
            log.warning("dropping an unexpected item from the last stage: %s", type(item).__name__)

    def eval_forward(self, packet: Packet) -> Packet:
        """Run one evaluation packet through every stage (Stage.eval_step) and return the output."""
        self._check_open()
        link, pull = self._ensure_streams()
        seq = self._eval_seq
        self._eval_seq += 1
        try:
            link.send(WireBatch(self.run_id, seq, pb.EVAL, -1, packet))
            while True:
                item = pull.get(self.cfg.pipeline.rpc_timeout, f"evaluation batch {seq}")
                if isinstance(item, WireBatch) and item.seq == seq:
                    return item.tensors
                log.warning("dropping a stale item from the last stage")
        except BpfreeError as exc:
            raise self._stage_failure(exc) from exc

    # -- weights --------------------------------------------------------------------------------
    def load_weights(self, state: dict[str, torch.Tensor], proximal_mu: float = 0.0) -> None:
        """Load `layers.<i>.<name>` weights into the stages that own them; resets optimiser state.

        `proximal_mu` > 0 adds FedProx's proximal term, anchored at these weights, to every
        layer's local loss until the next load."""
        self._check_open()
        for s, r in enumerate(self.ranges):
            own = {k: v for k, v in state.items() if _layer_of(k.removeprefix(OPTIMIZER)) in r}
            missing = [i for i in r if not any(_layer_of(k) == i for k in own
                                               if not k.startswith(OPTIMIZER))]
            if missing:
                raise ConfigError(f"load_weights: no weights for layer(s) {missing} (stage {s}); "
                                  "keys must look like layers.<index>.<name>")
            chunks = encode_state(own, self.cfg.pipeline.chunk_bytes)
            what = "LoadWeights on"
            try:
                self._stubs[s].LoadWeights(chunks, timeout=self.cfg.pipeline.rpc_timeout,
                                           metadata=self.security.metadata())
                if proximal_mu > 0:
                    what = "SetProximal on"
                    self._stubs[s].SetProximal(pb.ProximalRequest(mu=proximal_mu),
                                               timeout=self.cfg.pipeline.rpc_timeout,
                                               metadata=self.security.metadata())
            except grpc.RpcError as exc:
                raise rpc_exception(self.addresses[s], exc, what) from None

    def end_task(self) -> dict[int, float]:
        """Continual learning's task boundary: every stage stores its layers' EWC / SI importance
        (Stage.end_task); the penalty per layer, in layer order."""
        self._check_open()
        out: dict[int, float] = {}
        for s in range(len(self._stubs)):
            reply = self._call(s, "EndTask", pb.EndTaskRequest(run_id=self.run_id))
            out.update(zip(reply.layers, reply.penalties, strict=True))
        return out

    def get_weights(self, with_optimizer: bool = False) -> dict[str, torch.Tensor]:
        """Every stage's weights, keyed as Stage.state_dict() (`layers.<i>.<name>`); with the
        optimiser state too (`optimizer.layers...`; load_weights restores both) if asked."""
        self._check_open()
        state: dict[str, torch.Tensor] = {}
        for s, stub in enumerate(self._stubs):
            try:
                state.update(decode_state(stub.GetWeights(
                    pb.GetWeightsRequest(with_optimizer=with_optimizer),
                    timeout=self.cfg.pipeline.rpc_timeout,
                    metadata=self.security.metadata())))
            except grpc.RpcError as exc:
                raise rpc_exception(self.addresses[s], exc, "GetWeights on") from None
        return state

    # -- recovery -------------------------------------------------------------------------------
    def recover(self) -> list[int]:
        """Make a failed pipeline usable again; return the stages whose process was restarted.

        Stages this pipeline launched that died or stopped answering are killed (by PID) and
        respawned; stages at fixed addresses (connect) must answer again within
        pipeline.connect_timeout (someone else restarts them). Then every stage is reconfigured
        under a new run id, so nothing of the failed epoch (queued batches, open streams) can
        leak into the next one; weights and optimiser state start afresh (load_weights next).
        """
        self._check_open()
        for thing in (self._link, self._pull):
            if thing is not None:
                thing.close()
        self._link = self._pull = None
        restarted = []
        for s in range(len(self.addresses)):
            if self.workers is not None and not self._answers(s):
                self.addresses[s] = self.workers.respawn(s)
                restarted.append(s)
        for s, address in enumerate(self.addresses):
            self._channels[s].close()
            self._channels[s] = self.security.channel(address)
            self._stubs[s] = pb_grpc.StageControlStub(self._channels[s])
            # a stage restarted elsewhere refuses connections until it serves: wait it out
            timeout = self.cfg.pipeline.connect_timeout
            wait_for_peer(address, self.security, timeout, self._channels[s], refused_for=timeout)
        self.run_id = uuid.uuid4().hex
        self._eval_seq = 0
        self._configure(self.device, fresh=True)
        return restarted

    def _answers(self, s: int) -> bool:
        assert self.workers is not None
        if not self.workers.alive(s):
            return False
        try:
            self._stubs[s].Health(pb.HealthRequest(), timeout=5.0, metadata=self.security.metadata())
            return True
        except grpc.RpcError:
            return False   # alive but hung (or refusing): it is replaced like a dead one

    def stats(self) -> list[dict[str, Any]]:
        return [_stage_dict(s, self._call(s, "Stats", pb.StatsRequest()))
                for s in range(len(self.addresses))]

    # -- lifecycle ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise BpfreeError("this pipeline is closed")

    def close(self) -> None:
        """Close streams and channels; stop the worker processes this pipeline launched."""
        if self._closed:
            return
        self._closed = True
        for thing in (self._link, self._pull):
            if thing is not None:
                thing.close()
        for channel in self._channels:
            channel.close()
        if self.workers is not None:
            self.workers.close()   # stops the processes by PID

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _layer_of(key: str) -> int:
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "layers" or not parts[1].isdigit():
        raise ConfigError(f"weight key {key!r} is not of the form layers.<index>.<name>")
    return int(parts[1])


def _stage_dict(s: int, st: pb.StageStats) -> dict[str, Any]:
    return {"stage": s, "address": st.address, "layers": list(st.layers),
            "train_batches": st.train_batches, "eval_batches": st.eval_batches,
            "busy_seconds": st.busy_seconds, "idle_seconds": st.idle_seconds,
            "blocked_seconds": st.blocked_seconds, "bytes_in": st.bytes_in, "bytes_out": st.bytes_out,
            "rss_mb": st.rss_mb,
            # per train batch [start, step end, handed off] in Unix seconds (bench/timeline.py)
            "timeline": [list(st.timeline[i:i + 3]) for i in range(0, len(st.timeline), 3)]}
