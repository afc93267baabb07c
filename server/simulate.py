"""`bpfree simulate`: K federated clients x S pipeline stages on this machine.

The coordinator (server.app) and the K ClientApps run on Flower's simulation runtime, submitted the
supported way (`flwr run` to a SuperLink of our own: server.flower_run); each client's S stage
workers are local `bpfree worker` processes on loopback gRPC, started here before the run and
stopped (by PID) after it. `--executor inprocess` runs every client's layers inside its ClientApp
instead (faster; identical weights). Flower's and Ray's output goes to RUN_DIR/logs.

    bpfree simulate                                   # MNIST, 2 clients x 2 stages, 4 rounds
    bpfree simulate --partition dirichlet:0.3 --out runs/noniid
    bpfree simulate --resume runs/noniid              # after a crash: continue from the checkpoint
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bpfree.client.pool import format_stage_map
from bpfree_core.config import ExperimentConfig, train_sample_size
from bpfree_core.data.readers import is_user_dataset
from bpfree_core.errors import BpfreeError, ConfigError
from bpfree_core.paths import absolute, absolute_env_paths
from bpfree_core.run.callbacks import Callback, stop_asked
from bpfree_core.run.clock import launch_time
from bpfree_core.run.rundir import STOP

log = logging.getLogger(__name__)

def simulate(cfg: ExperimentConfig, run_dir: Path, resume: bool = False, progress: bool = False,
             client_mods: Sequence[str] = (), overwrite: bool = False,
             callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run the federation on Flower's simulation runtime; return the summary with "weights".

    Flower's supported path (server.flower_run): a SuperLink of our own and `flwr run` of this
    app; the coordinator writes RUN_DIR, which this process locks (bpfree_core.run.rundir; a run
    already in it is refused unless `resume` or `overwrite`), follows for progress and reads back.
    `client_mods` ("module:function") are Flower client mods every ClientApp wraps itself in
    (tests use them to corrupt or kill a client on the way). `callbacks` get each round's record
    here, as this process reads it; a truthy answer asks the coordinator to stop after the round
    it is in (RUN_DIR/STOP).
    """
    absolute_env_paths()     # the ServerApp and ClientApps run elsewhere: never a relative path
    if cfg.train.data_dir:
        cfg = cfg.with_overrides([f"train.data_dir={absolute(cfg.train.data_dir)}"])
    from bpfree_core.data.datasets import bind_data

    cfg = bind_data(cfg)   # your own data: an absolute path, its shape, classes and fingerprint
    preflight(cfg)
    if cfg.federation.backend == "ray":   # stage actors on a Ray cluster: server/ray_backend.py
        from bpfree.server.ray_backend import simulate_ray

        return simulate_ray(cfg, run_dir, resume=resume, progress=progress, overwrite=overwrite,
                            callbacks=callbacks)
    from bpfree_core.run.rundir import RunDir

    with RunDir(run_dir, resume=resume, overwrite=overwrite):
        _simulate_flower(cfg, run_dir, resume, progress, client_mods, callbacks)
    return finished_run(run_dir)


def _simulate_flower(cfg: ExperimentConfig, run_dir: Path, resume: bool, progress: bool,
                     client_mods: Sequence[str],
                     callbacks: Sequence[Callback] = ()) -> None:
    from bpfree.client.supervisor import Watchdog
    from bpfree.server.flower_run import FlowerRun

    log_dir = (run_dir / "logs").resolve()
    log.info("simulating %d clients x %d stages (%s), %d rounds of %d local epoch(s), %s partition; "
             "run dir %s", cfg.federation.clients, cfg.pipeline.stages, cfg.federation.executor,
             cfg.federation.rounds, cfg.federation.local_epochs, cfg.federation.partition, run_dir)
    mods = [m for m in os.environ.get("BPFREE_CLIENT_MODS", "").split(",") if m.strip()]
    env = {"BPFREE_CLIENT_MODS": ",".join([*mods, *client_mods])}
    if cfg.pipeline.token:
        env["BPFREE_TOKEN"] = cfg.pipeline.token   # ClientApps read it; it is never serialised
    engine = FlowerRun(log_dir, env)
    workers: list[Any] = []
    watchdog: Watchdog | None = None
    bar = RoundProgress(run_dir, cfg, resume, progress, callbacks)
    try:
        # The SuperLink and the stage workers start side by side: both spend seconds importing.
        with ThreadPoolExecutor(max_workers=1) as starter:
            launching = starter.submit(launch_stage_workers, cfg, log_dir, workers)
            try:
                engine.start()
            finally:
                addresses = launching.result()   # its workers are in `workers` either way
        log.info("Flower SuperLink (simulation runtime) on 127.0.0.1:%d; Flower's and Ray's logs go "
                 "to %s", engine.port, log_dir)
        # A stage that dies is respawned on its port; its ClientApp reruns the round there.
        watchdog = Watchdog(workers, cfg.pipeline.restarts * cfg.federation.rounds).start()
        experiment = engine.home / "experiment.json"
        experiment.write_text(json.dumps(cfg.to_dict()))
        run_config = toml_table({
            "config-json": str(experiment), "out-dir": str(run_dir.resolve()), "resume": resume,
            "log-dir": str(log_dir), "run-dir-locked": True, "pool-dir": str(engine.home / "pool"),
            "stage-pool" if cfg.pipeline.pool else "stage-addresses":
                format_stage_map(addresses)})
        engine.run(run_config, f"num-supernodes={cfg.federation.clients} "
                   f"client-resources-num-cpus=1 init-args-num-cpus={client_actors(cfg)}",
                   on_poll=bar.poll)
    finally:
        bar.close()
        if watchdog is not None:
            watchdog.stop()
        for local in workers:
            local.close()  # stops its worker processes by PID
        engine.close()     # the SuperLink and everything below it, by PID


def toml_table(values: dict[str, str | bool]) -> str:
    """`key = value` lines; JSON's string escapes are TOML's."""
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def finished_run(run_dir: Path) -> dict[str, Any]:
    """The summary a finished run left in RUN_DIR, with its final weights."""
    from bpfree.server.coordinator import latest_checkpoint
    from bpfree.server.flower_run import last_error
    from bpfree_core.run.checkpoint import load_checkpoint

    summary_file, latest = run_dir / "summary.json", latest_checkpoint(run_dir)
    if not summary_file.is_file() or latest is None:
        log_file = run_dir / "logs" / "flwr.log"
        raise BpfreeError(f"the federated run failed: {last_error(log_file)} (the full log is "
                          f"{log_file})")
    return {**json.loads(summary_file.read_text()), "weights": load_checkpoint(latest)["weights"]}


class RoundProgress:
    """Follows RUN_DIR/metrics.jsonl: a live bar on a terminal, one line per round."""

    def __init__(self, run_dir: Path, cfg: ExperimentConfig, resume: bool, enabled: bool,
                 callbacks: Sequence[Callback] = ()):
        from bpfree_core.runtime import progress_bar

        self.path, self.enabled, self.callbacks = run_dir / "metrics.jsonl", enabled, callbacks
        self.rounds = cfg.federation.rounds
        self.seen = len(self._lines()) if resume else 0
        self.start = launch_time()   # the command's launch, as every printed time
        self.bar = progress_bar(total=self.rounds, initial=self.seen, desc="rounds", unit="round",
                                enabled=enabled, leave=False)

    def _lines(self) -> list[str]:
        try:
            return [x for x in self.path.read_text().splitlines() if x.strip()]
        except OSError:
            return []

    def poll(self) -> None:
        lines = self._lines()
        for line in lines[self.seen:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                return   # a line being written: read it next time
            self.seen += 1
            self.bar.update(1)
            clients = record.get("clients", {})
            text = (f"round {record.get('round')}/{self.rounds}  test accuracy "
                    f"{record.get('test_accuracy_headline', float('nan')):.4f}  clients "
                    f"{clients.get('accepted', 0)}/{clients.get('sent', 0)}  "
                    f"{time.time() - self.start:.0f}s")
            for who, why in record.get("left_out", {}).items():   # not only in RUN_DIR/logs
                text += f"\n  round {record.get('round')}: client {who} left out: {why}"
            if record.get("clients", {}).get("timed_out"):
                text += (f"\n  round {record.get('round')}: {record['clients']['timed_out']} client(s) "
                         "sent no reply within federation.round_timeout (a stopped or hung stage?)")
            if self.enabled:
                self.bar.write(text)
            else:
                log.info("%s", text)
            if stop_asked(self.callbacks, record):   # the coordinator stops after the round
                (self.path.parent / STOP).touch()     # it is in

    def close(self) -> None:
        self.bar.close()


def preflight(cfg: ExperimentConfig) -> None:
    """Refuse in a second what would otherwise fail after Ray, Flower and the workers started."""
    from bpfree_core.balance import split_stages
    from bpfree_core.data.datasets import dataset_dir
    from bpfree_core.model import build_objective
    from bpfree_core.runtime import resolve_device

    if cfg.federation.backend != "ray":   # on Ray the stages' devices are the cluster's
        resolve_device(cfg.train.device)   # this machine: the coordinator and in-process clients

    if not is_user_dataset(cfg.model.dataset) and (cfg.train.data_dir
                                                   or os.environ.get("BPFREE_DATA_DIR")):
        dataset_dir(cfg.model.dataset, cfg.train.data_dir or None)   # names the missing dir/file
    objective = build_objective(cfg)
    check_pipelines(cfg)
    if cfg.federation.partition.startswith("natural"):   # the ids fix K: check them here
        from bpfree_core.federation.client import partitions, train_split

        partitions(cfg, train_split(cfg))
    if cfg.federation.executor == "pipeline" and objective.pipelinable:   # enough layers?
        split_stages(len(objective.layer_sizes()), cfg.pipeline.stages)
        for client, stages in cfg.pipeline.stage_counts().items():
            if stages > len(objective.layer_sizes()):
                raise ConfigError(f"pipeline.client_stages gives client {client} {stages} stages but "
                                  f"the model has only {len(objective.layer_sizes())} layer(s); give "
                                  "it fewer stages or add layers to model.hidden")
    if cfg.continual.federated:
        from bpfree_core.continual.stream import check_federated

        check_federated(cfg)


def check_pipelines(cfg: ExperimentConfig) -> None:
    """pipeline.pool and pipeline.client_stages: what this launcher can honour."""
    pipe, fed = cfg.pipeline, cfg.federation
    counts = pipe.stage_counts()
    outside = sorted(k for k in counts if k >= fed.clients)
    if outside:
        raise ConfigError(f"pipeline.client_stages names client {outside[0]}, but federation.clients"
                          f" = {fed.clients} (ids 0..{fed.clients - 1})")
    if (pipe.pool or counts) and fed.executor != "pipeline":
        raise ConfigError("pipeline.pool and pipeline.client_stages place stage workers; they need "
                          "federation.executor = pipeline")
    if (pipe.pool or counts) and fed.backend == "ray":
        raise ConfigError("pipeline.pool and pipeline.client_stages are not built for the ray backend "
                          "(one placement group per client); use backend = flower")
    if pipe.pool and counts:
        raise ConfigError("pipeline.pool serves every client with pipelines of pipeline.stages "
                          "stages; drop pipeline.client_stages or pipeline.pool")


def pipeline_count(cfg: ExperimentConfig) -> int:
    """How many pipelines simulate starts: pipeline.pool of them, else one per client."""
    return min(cfg.pipeline.pool, cfg.federation.clients) or cfg.federation.clients


def launch_stage_workers(cfg: ExperimentConfig, log_dir: Path,
                         launched: list[Any]) -> dict[int, list[str]]:
    """Start the stage workers (pipeline executor); {client or pool slot: addresses}.

    One pipeline per client (client k's `pipeline.stages_of(k)` workers), or pipeline.pool of
    them that the sampled clients take in turn (client.pool). ClientApps connect to and configure
    the workers; this only owns their processes (client.supervisor.LocalWorkers, appended to
    `launched` so the caller stops them)."""
    if cfg.federation.executor != "pipeline":
        return {}
    from bpfree.client.supervisor import LocalWorkers

    name = "pool" if cfg.pipeline.pool else "client"

    def launch(k: int) -> Any:
        return LocalWorkers(cfg.pipeline.stages_of(k), device=cfg.pipeline.devices or cfg.train.device,
                            threads=max(cfg.train.threads, 1), log_dir=log_dir / f"{name}{k}",
                            token=cfg.pipeline.token, timeout=cfg.pipeline.connect_timeout)

    # In parallel: each worker spends seconds importing torch; K clients need not wait in line.
    with ThreadPoolExecutor(max_workers=pipeline_count(cfg)) as pool:
        futures = [pool.submit(launch, k) for k in range(pipeline_count(cfg))]
        errors = []
        for future in futures:
            try:
                launched.append(future.result())
            except Exception as exc:  # noqa: BLE001 - collected, the first is re-raised below
                errors.append(exc)
    if errors:
        raise errors[0]
    addresses = {k: list(w.addresses) for k, w in enumerate(launched)}
    for k, a in addresses.items():
        log.info("%s %d: stage workers %s", "pipeline" if cfg.pipeline.pool else "client", k, a)
    return addresses


def client_actors(cfg: ExperimentConfig) -> int:
    """ClientApps that run at once. A pipeline ClientApp only feeds its stage workers (separate
    processes, outside Ray) and waits on gRPC, so all K run in one wave; an in-process ClientApp
    trains the layers itself, so at most one per core. Only the sampled clients train at once."""
    fed = cfg.federation
    sampled = train_sample_size(fed.clients, fed.fraction_train, fed.min_train_clients)   # train at once
    if fed.executor == "pipeline":
        return min(sampled, pipeline_count(cfg))   # a ClientApp waits while its pipeline is taken
    return min(os.cpu_count() or 2, sampled)
