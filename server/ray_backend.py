"""`bpfree simulate --backend ray`: every client's stages as Ray actors, placed on a Ray cluster.

    with ray_session(cfg):                       # join federation.ray_address, or start Ray here
        with StageCluster(cfg) as cluster:       # K placement groups of S bundles, K x S actors
            Coordinator(cfg, run_dir).run(RayTransport(cfg, cluster.addresses))

Placement: client k's S stages form one placement group of S bundles {CPU: stage_num_cpus,
GPU: stage_num_gpus}; federation.placement (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD) says how
that group spreads over nodes (PACK keeps a client's activations on one node when it fits;
SPREAD puts its stages on different machines). Each actor serves its stage's gRPC service
(client.ray_stage) and reports its address; the coordinator here drives each client's pipeline
over gRPC (bpfree_core.federation.client.local_round on a PipelineExecutor) and aggregates
(bpfree_core.federation.round_fold) through the same Coordinator as the Flower backend: one
round loop, one aggregation.

Start-up is bounded: a request the cluster can never hold (e.g. a GPU stage on a GPU-less
cluster) fails before anything is created, naming what is missing; a request that does not fit
within pipeline.connect_timeout (resources held by others) fails naming what is free; any failure
removes every actor and placement group this run created.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bpfree.client.executor import PipelineExecutor
from bpfree.client.ray_stage import RAY_ENV, StageActor
from bpfree.server.coordinator import Coordinator, Receive, RoundReplies
from bpfree_core.config import ExperimentConfig
from bpfree_core.data.splits import run_splits
from bpfree_core.errors import BpfreeError, ConfigError, PeerUnavailableError
from bpfree_core.federation.aggregate import ClientUpdate, Weights
from bpfree_core.federation.client import client_split, local_round, train_split
from bpfree_core.federation.client_evaluation import ClientEvaluation, evaluate_partitions
from bpfree_core.federation.strategies import ClientTerms
from bpfree_core.model import pipelined_objective
from bpfree_core.run.callbacks import Callback

log = logging.getLogger(__name__)

NAMESPACE = "bpfree"          # Ray namespace of every stage actor this backend creates
STOP_GRACE = 10.0             # seconds to let actors stop serving before they are killed


class PlacementError(BpfreeError):
    """The Ray cluster cannot (or did not in time) hold the stages asked for."""


# ---------------------------------------------------------------------------------------------
# Joining or starting Ray


@contextmanager
def ray_session(cfg: ExperimentConfig) -> Iterator[None]:
    """Connect to federation.ray_address (auto | HOST:PORT), or start a private Ray here ("").

    A driver that is already connected (a notebook, a test) is used as is and left connected.
    """
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)   # before Ray starts: read by its processes
    import ray

    if ray.is_initialized():
        yield
        return
    address = cfg.federation.ray_address
    scratch = None
    try:
        if address:
            check_reachable(address)   # ray.init retries a dead address for minutes
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=True)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise PeerUnavailableError(
                    f"cannot join the Ray cluster at federation.ray_address = {address!r} ({exc}); "
                    "start its head with deploy/ray/head.sh, or drop --address to run Ray on this "
                    "machine only") from None
        else:
            # A fresh, short temp dir: Ray's unix sockets live under it (paths <= 107 bytes), and
            # a reused one can make ray.init connect to a stale cluster.
            scratch = tempfile.mkdtemp(prefix="bpfree-ray-", dir="/tmp")
            bundle = stage_bundle(cfg)
            stages = cfg.federation.clients * cfg.pipeline.stages
            # Logical CPUs: enough for every stage, like `bpfree simulate`'s local processes.
            cpus = max(os.cpu_count() or 1, math.ceil(bundle.get("CPU", 0.0) * stages))
            # RAY_TMPDIR (public) instead of ray.init's private _temp_dir argument.
            with _environ(RAY_TMPDIR=scratch):
                ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True)
            log.info("started a local Ray instance (%d logical CPUs, temp dir %s)", cpus, scratch)
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the address, unless the Ray head's GCS port accepts a TCP connection."""
    # The one private Ray API bpfree uses: Ray has no public way to resolve "auto" (the address
    # `ray start` recorded on this machine) before ray.init; best effort, ray.init decides.
    try:
        from ray._private.services import canonicalize_bootstrap_address

        resolved = canonicalize_bootstrap_address(address) or ""
    except Exception:  # noqa: BLE001 - leave it to ray.init
        return
    if not resolved:
        raise PeerUnavailableError(
            f"federation.ray_address = {address!r} but no running Ray cluster was found on this "
            "machine; start one (deploy/ray/head.sh) or pass --address HEAD_IP:6379")
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise PeerUnavailableError(
            f"the Ray head at {resolved} (federation.ray_address = {address!r}) does not answer "
            f"({exc}); is `ray start --head` running there and the port open?") from None


# ---------------------------------------------------------------------------------------------
# What the stages need, and whether the cluster can ever hold it


def stage_bundle(cfg: ExperimentConfig) -> dict[str, float]:
    """One stage's Ray resource bundle (zero entries left out: Ray rejects them in bundles)."""
    bundle = {"CPU": float(cfg.pipeline.stage_num_cpus), "GPU": float(cfg.pipeline.stage_num_gpus)}
    return {k: v for k, v in bundle.items() if v > 0}


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items())) or "nothing"


def _fits(bundle: dict[str, float], node: dict[str, float], times: int = 1) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v * times for k, v in bundle.items())


def check_capacity(cfg: ExperimentConfig, nodes: list[dict[str, float]]) -> None:
    """Raise PlacementError if a cluster of `nodes` (total resources per alive node) can never
    hold K clients x S stages under federation.placement, naming what is missing."""
    k, s = cfg.federation.clients, cfg.pipeline.stages
    bundle, placement = stage_bundle(cfg), cfg.federation.placement
    shape = f"{k} client(s) x {s} stage(s) x {{{_fmt(bundle)}}} per stage"
    for res, per_stage in sorted(bundle.items()):
        need = per_stage * k * s
        have = sum(n.get(res, 0.0) for n in nodes)
        if need > have + 1e-9:
            raise PlacementError(
                f"placement needs {need:g} {res} ({shape}), cluster has {have:g} {res} "
                f"over {len(nodes)} node(s); add nodes with {res} (`ray start ... --num-"
                f"{res.lower()}s=N`) or lower pipeline.stage_num_{res.lower()}s")
    if not any(_fits(bundle, n) for n in nodes):
        raise PlacementError(
            f"one stage needs {{{_fmt(bundle)}}} on a single node but no node has that (nodes: "
            f"{'; '.join('{' + _fmt(n) + '}' for n in nodes)}); lower pipeline.stage_num_cpus / "
            "stage_num_gpus")
    if placement == "STRICT_PACK" and not any(_fits(bundle, n, s) for n in nodes):
        raise PlacementError(
            f"federation.placement = STRICT_PACK puts a client's {s} stages on one node, which "
            f"needs {{{_fmt({r: v * s for r, v in bundle.items()})}}}, and no node has that; use "
            "PACK or SPREAD")
    if placement == "STRICT_SPREAD" and sum(_fits(bundle, n) for n in nodes) < s:
        raise PlacementError(
            f"federation.placement = STRICT_SPREAD puts a client's {s} stages on {s} different "
            f"nodes, but only {sum(_fits(bundle, n) for n in nodes)} node(s) can hold a stage "
            f"{{{_fmt(bundle)}}}; add nodes or use SPREAD")


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


# ---------------------------------------------------------------------------------------------
# The stage actors


class StageCluster:
    """K x S stage actors in K placement groups; `addresses[k]` lists client k's stages in order."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.run_tag = f"bpfree-{uuid.uuid4().hex[:8]}"
        self.groups: list[Any] = []
        self.actors: list[Any] = []            # flat, client-major
        self.names: list[str] = []
        self.infos: dict[int, list[dict[str, Any]]] = {}
        self.addresses: dict[int, list[str]] = {}

    def __enter__(self) -> StageCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.cfg
        k_clients, s_stages = cfg.federation.clients, cfg.pipeline.stages
        bundle = stage_bundle(cfg)
        check_capacity(cfg, alive_nodes())   # the never-fits cases: fail before creating anything

        deadline = time.monotonic() + cfg.pipeline.connect_timeout
        for k in range(k_clients):
            self.groups.append(placement_group([dict(bundle)] * s_stages,
                                               strategy=cfg.federation.placement,
                                               name=f"{self.run_tag}-client{k}"))
        for k, group in enumerate(self.groups):
            # Ray waits forever on a request that cannot be met: always wait with a deadline.
            if not group.wait(timeout_seconds=max(math.ceil(deadline - time.monotonic()), 1)):
                available, cluster = ray.available_resources(), ray.cluster_resources()
                free = {r: available.get(r, 0.0) for r in bundle}
                total = {r: cluster.get(r, 0.0) for r in bundle}
                raise PlacementError(
                    f"Ray could not place client {k}'s {s_stages} stage(s) ({{{_fmt(bundle)}}} "
                    f"each, {cfg.federation.placement}) within pipeline.connect_timeout = "
                    f"{cfg.pipeline.connect_timeout:g} s: free now {{{_fmt(free)}}} of "
                    f"{{{_fmt(total)}}}; other jobs or placement groups hold the rest: free "
                    "them, add nodes, or lower pipeline.stage_num_cpus / stage_num_gpus")

        threads = max(cfg.train.threads, 1)
        remote = ray.remote(StageActor)
        env = {**RAY_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        for k, group in enumerate(self.groups):
            for s in range(s_stages):
                name = f"{self.run_tag}-c{k}-s{s}"
                actor = remote.options(
                    name=name, namespace=NAMESPACE, max_restarts=0,
                    num_cpus=cfg.pipeline.stage_num_cpus, num_gpus=cfg.pipeline.stage_num_gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=group, placement_group_bundle_index=s),
                    runtime_env={"env_vars": env},
                ).remote(cfg.pipeline.bind_host, cfg.pipeline.token, cfg.pipeline.tls_ca, threads)
                self.actors.append(actor)
                self.names.append(name)

        calls = [a.start.remote() for a in self.actors]
        wait_s = max(deadline - time.monotonic(), 0.0) + cfg.pipeline.connect_timeout
        try:
            infos = ray.get(calls, timeout=wait_s)
        except ray.exceptions.GetTimeoutError:
            ready, _ = ray.wait(calls, num_returns=len(calls), timeout=0)
            started = {ref.hex() for ref in ready}
            late = [name for name, call in zip(self.names, calls, strict=True)
                    if call.hex() not in started]
            # A cold node starts one Python process per actor (Ray + torch imports): on a busy
            # machine that alone can take a minute.
            raise PeerUnavailableError(
                f"{len(late)} of the {len(calls)} stage actors were placed but did not start "
                f"serving within {wait_s:.3g} s ({', '.join(late)}); raise "
                "pipeline.connect_timeout if the nodes are busy, or check the Ray worker logs "
                "on the nodes") from None
        except ray.exceptions.RayError as exc:
            raise PeerUnavailableError(f"a stage actor failed to start: {_root_cause(exc)}") from None
        for i, info in enumerate(infos):
            k, s = divmod(i, s_stages)
            info.update(client=k, stage=s, name=self.names[i])
            self.infos.setdefault(k, []).append(info)
            self.addresses.setdefault(k, []).append(info["address"])
        for k in range(k_clients):
            log.info("client %d: stages %s", k, ", ".join(
                f"{i['address']} ({i['device']}, node {i['node_id'][:8]})" for i in self.infos[k]))

    def close(self) -> None:
        """Stop every actor (gracefully, then ray.kill) and remove every placement group."""
        import ray

        if not ray.is_initialized():
            return
        if self.actors:
            try:
                ray.get([a.stop.remote() for a in self.actors], timeout=STOP_GRACE)
            except Exception as exc:  # noqa: BLE001 - killing them below is the fallback
                log.debug("graceful stop of stage actors failed (%s); killing them", exc)
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
        from ray.util.placement_group import remove_placement_group

        for group in self.groups:
            try:
                remove_placement_group(group)
            except Exception as exc:  # noqa: BLE001 - keep removing the others
                log.warning("could not remove placement group %s: %s", group.id, exc)
        self._wait_gone(self.names)
        self.actors, self.groups = [], []

    @staticmethod
    def _wait_gone(names: list[str], timeout: float = STOP_GRACE) -> None:
        """ray.kill is asynchronous: wait (bounded) until the names no longer resolve."""
        import ray

        deadline = time.monotonic() + timeout
        left = list(names)
        while left and time.monotonic() < deadline:
            still = []
            for name in left:
                try:
                    ray.get_actor(name, namespace=NAMESPACE)
                    still.append(name)
                except ValueError:
                    pass
            left = still
            if left:
                time.sleep(0.1)   # polling Ray's actor table with a deadline
        if left:
            log.warning("stage actors %s were killed but still listed after %.0f s", left, timeout)


def _root_cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # Ray wraps the actor's own error in a long traceback; its last line says what went wrong.
    return next((line.strip() for line in reversed(text) if line.strip()), repr(exc))


# ---------------------------------------------------------------------------------------------
# The round transport: K client pipelines driven from here, in parallel


class RayTransport:
    """Each round, every sampled client trains its partition on its own stage actors (over gRPC)."""

    def __init__(self, cfg: ExperimentConfig, addresses: dict[int, list[str]]):
        self.cfg = cfg
        self.addresses = addresses
        train = train_split(cfg)
        self.parts = {k: client_split(cfg, train, k) for k in range(cfg.federation.clients)}
        # ClientUpdate.state between rounds: each client's pipeline is driven from here, so its
        # own EWC / SI state is kept here, beside its partition, and never aggregated
        self.client_state: dict[int, Weights] = {}

    def _client(self, k: int, rnd: int, weights: Weights, executors: dict[int, Any],
                terms: ClientTerms) -> Any:
        executor = PipelineExecutor(self.cfg, self.addresses[k])   # configures client k's stages
        executors[k] = executor
        try:
            update = local_round(executor, self.cfg, self.parts[k], k, rnd, weights, terms,
                                 self.client_state.get(k))
            self.client_state[k] = update.state
            return update
        finally:
            executor.close()

    def evaluate_round(self, rnd: int, weights: Weights, clients: list[int]) -> list[ClientEvaluation]:
        """Here: the coordinator drives Ray clients and holds their test partitions."""
        return evaluate_partitions(self.cfg, run_splits(self.cfg)[2], weights, clients)

    def train_round(self, rnd: int, weights: Weights, clients: list[int],
                    terms: ClientTerms, receive: Receive) -> RoundReplies:
        """Every sampled client in its own thread; each update goes to `receive` (in this
        thread) as soon as its client finishes, and is not kept (a queue, not futures' results)."""
        out = RoundReplies(sent=len(clients))
        executors: dict[int, Any] = {}
        finished: queue.Queue[tuple[int, ClientUpdate | BaseException]] = queue.Queue()

        def client(k: int) -> None:
            try:
                finished.put((k, self._client(k, rnd, weights, executors, terms)))
            except BaseException as exc:   # reported, as a failed client, by the round
                finished.put((k, exc))

        pool = futures.ThreadPoolExecutor(max_workers=len(clients), thread_name_prefix="client")
        for k in clients:
            pool.submit(client, k)
        late, deadline = set(clients), time.monotonic() + self.cfg.federation.round_timeout
        while late:
            try:
                k, result = finished.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            late.discard(k)
            if isinstance(result, BaseException):
                out.failed[f"client {k}"] = f"client {k}: {type(result).__name__}: {result}"
            else:
                receive(result)
            del result
        out.timed_out = len(late)
        for k in late:
            if k in executors:
                executors[k].close()   # aborts its streams: the client's thread ends with an error
        pool.shutdown(wait=not late, cancel_futures=True)
        return out


# ---------------------------------------------------------------------------------------------
# The whole run


def check_ray_config(cfg: ExperimentConfig) -> None:
    """Refuse, before Ray starts, what the Ray backend cannot run."""
    if cfg.federation.executor != "pipeline":
        raise ConfigError("federation.backend = ray runs every stage as a Ray actor, so it needs "
                          "federation.executor = pipeline; use backend flower for inprocess")
    pipelined_objective(cfg, "stage actors")
    if cfg.train.device != "cpu" and cfg.pipeline.stage_num_gpus <= 0:   # would train on the CPU
        raise ConfigError(f"train.device = {cfg.train.device} with the ray backend: its stages use "
                          "the GPUs Ray assigns them, and pipeline.stage_num_gpus = 0 asks for none; "
                          "set --set pipeline.stage_num_gpus=1 (or 0.5 to share a GPU), or --device cpu")


def simulate_ray(cfg: ExperimentConfig, run_dir: Path, resume: bool = False,
                 progress: bool = False, overwrite: bool = False,
                 callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """The federation with stage actors on Ray; returns the summary with "weights"."""
    check_ray_config(cfg)
    log.info("ray backend: %d client(s) x %d stage(s), {%s} per stage, placement %s; stages use "
             "the devices Ray assigns, the coordinator evaluates on train.device = %s",
             cfg.federation.clients, cfg.pipeline.stages, _fmt(stage_bundle(cfg)),
             cfg.federation.placement, cfg.train.device)
    with ray_session(cfg):
        coordinator = Coordinator(cfg, run_dir, resume=resume, progress=progress,
                                  overwrite=overwrite, callbacks=callbacks)
        try:
            cluster = StageCluster(cfg)
            with cluster:
                if coordinator.rd is not None:
                    coordinator.rd.write_json("ray_stages.json",
                                              {str(k): v for k, v in sorted(cluster.infos.items())})
                summary = coordinator.run(RayTransport(cfg, cluster.addresses))
        finally:
            coordinator.close()
    summary["backend"] = "ray"
    summary["stage_actors"] = json.loads(json.dumps(cluster.infos))
    return summary


__all__ = ["PlacementError", "RayTransport", "StageCluster", "check_capacity", "check_ray_config",
           "ray_session", "simulate_ray", "stage_bundle"]
