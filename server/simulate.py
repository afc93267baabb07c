"""`bpfree simulate`: K federated clients x S pipeline stages on this machine.

The coordinator (server.app) and the K ClientApps run in Flower's simulation engine (Ray, one CPU
per ClientApp); each client's S stage workers are local `bpfree worker` processes on loopback gRPC,
started here before the run and stopped (by PID) after it. `--executor inprocess` runs every
client's layers inside its ClientApp instead (faster; identical weights).

    bpfree simulate                                   # MNIST, 3 clients x 2 stages, 5 rounds
    bpfree simulate --partition dirichlet:0.3 --out runs/noniid
    bpfree simulate --resume runs/noniid              # after a crash: continue from the checkpoint
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bpfree_core.cli_train import add_config_arguments, config_from_args
from bpfree_core.config import PLACEMENTS, ExperimentConfig
from bpfree_core.errors import BpfreeError, ConfigError

log = logging.getLogger(__name__)

# Without --config: an algorithm that learns fast, and a run that fits in minutes on 2 cores.
SIMULATE_DEFAULTS = ["model.algorithm=symba", "federation.rounds=5", "train.threads=1"]

SHORTCUTS = {"clients": "federation.clients", "rounds": "federation.rounds",
             "local_epochs": "federation.local_epochs", "partition": "federation.partition",
             "executor": "federation.executor", "min_clients": "federation.min_clients",
             "proximal_mu": "federation.proximal_mu", "stages": "pipeline.stages",
             "backend": "federation.backend", "address": "federation.ray_address",
             "placement": "federation.placement"}

# Unix socket paths are limited to 107 bytes; Ray puts its sockets ~60 bytes below _temp_dir.
RAY_TEMP_MAX = 40
CLIENT_ACTOR_RESTARTS = 100   # Ray restarts of one ClientApp actor over a run
CLIENT_TASK_RETRIES = 1       # reruns of a client's round after its actor died mid-round


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--clients", type=int, help="K federated clients (federation.clients)")
    parser.add_argument("--stages", type=int, help="S stage workers per client (pipeline.stages)")
    parser.add_argument("--rounds", type=int, help="federated rounds (federation.rounds)")
    parser.add_argument("--local-epochs", type=int, help="epochs per client per round")
    parser.add_argument("--partition", help="iid | dirichlet:ALPHA | shards:N")
    parser.add_argument("--executor", choices=("pipeline", "inprocess"),
                        help="pipeline: S worker processes per client over gRPC (default); "
                             "inprocess: all layers inside the ClientApp")
    parser.add_argument("--min-clients", type=int, help="usable replies a round needs (0 = all)")
    parser.add_argument("--proximal-mu", type=float, help="FedProx proximal term (0 = FedAvg)")
    parser.add_argument("--backend", choices=("flower", "ray"),
                        help="flower: Flower simulation engine (default); ray: every stage a Ray "
                             "actor placed on a Ray cluster (see --address, --placement)")
    parser.add_argument("--address", help="ray backend: auto | HEAD_IP:PORT of a running Ray "
                                          "cluster (default: start Ray on this machine)")
    parser.add_argument("--placement", choices=PLACEMENTS,
                        help="ray backend: how each client's stages spread over nodes (PACK)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue RUN_DIR from its last checkpoint (its config.json is used; "
                             "--set may change only how it runs, e.g. train.threads)")
    parser.add_argument("--no-plot", action="store_true", help="skip RUN_DIR/accuracy.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve(args: argparse.Namespace) -> tuple[ExperimentConfig, Path, bool]:
    """(config, run directory, resume?) from the command line."""
    extra = [f"{key}={getattr(args, flag)}" for flag, key in SHORTCUTS.items()
             if getattr(args, flag, None) is not None]
    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the config from RUN_DIR/config.json; drop --config "
                              "(use --set for what may change, e.g. train.threads)")
        saved = args.resume / "config.json"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.json there; is it a run directory "
                              "written by `bpfree simulate --out`?")
        if args.out and args.out.resolve() != args.resume.resolve():
            raise ConfigError("--resume RUN_DIR continues RUN_DIR in place; drop --out")
        base = ExperimentConfig.from_dict(json.loads(saved.read_text()))
        return env_token(base.with_overrides(extra + list(args.set))), args.resume, True
    if not args.config:
        args.set = SIMULATE_DEFAULTS + list(args.set)
    args.set = list(args.set) + extra
    cfg = env_token(config_from_args(args))
    run_dir = args.out or Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S")
    return cfg, run_dir, False


def env_token(cfg: ExperimentConfig) -> ExperimentConfig:
    """pipeline.token from $BPFREE_TOKEN unless --set gave one: the token is never saved in
    RUN_DIR (config.json and checkpoints blank it), so a resumed run gets it from here."""
    token = os.environ.get("BPFREE_TOKEN", "")
    if token and not cfg.pipeline.token:
        return dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, token=token))
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg, run_dir, resume = resolve(args)
    summary = simulate(cfg, run_dir, resume=resume, progress=not args.no_progress)
    summary.pop("weights", None)
    if not args.no_plot:
        from server.plot import plot_accuracy

        summary["plot"] = str(plot_accuracy(run_dir))
    print(json.dumps(summary, indent=2))
    return 0


def simulate(cfg: ExperimentConfig, run_dir: Path, resume: bool = False, progress: bool = False,
             mods: Sequence[Any] = ()) -> dict[str, Any]:
    """Run the federation in Flower's simulation engine; return the summary with "weights".

    `mods` are Flower client mods wrapped around every ClientApp (tests use them to corrupt a
    reply on the way out).
    """
    preflight(cfg)
    if cfg.federation.backend == "ray":   # stage actors on a Ray cluster: server/ray_backend.py
        from server.ray_backend import simulate_ray

        return simulate_ray(cfg, run_dir, resume=resume, progress=progress)
    from client.app import ClientSettings, make_client_app
    from server.app import ServerSettings, make_server_app

    for key, value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                       ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
                       ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"), ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(key, value)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir = run_dir / "logs"
    log.info("simulating %d clients x %d stages (%s), %d rounds of %d local epoch(s), %s partition; "
             "run dir %s", cfg.federation.clients, cfg.pipeline.stages, cfg.federation.executor,
             cfg.federation.rounds, cfg.federation.local_epochs, cfg.federation.partition, run_dir)
    workers: list[Any] = []
    result: dict[str, Any] = {}
    engine = FlowerSimulation(run_dir / "tmp", cfg.federation.clients,
                              actors=client_actors(cfg))
    try:
        engine.start_ray()  # before the stage workers load the cores with torch imports
        addresses = launch_stage_workers(cfg, log_dir, workers)
        server_app = make_server_app(ServerSettings(cfg, run_dir, resume=resume, progress=progress),
                                     on_done=result.update)
        client_app = make_client_app(ClientSettings(addresses, str(log_dir), cfg.pipeline.token), mods)
        engine.run(server_app, client_app)
    finally:
        for local in workers:
            local.close()  # stops its worker processes by PID
        engine.close()
    if not result:
        raise BpfreeError("the simulation ended without a result from the coordinator; see the "
                          "log above for the client or server error")
    return result


def preflight(cfg: ExperimentConfig) -> None:
    """Refuse in a second what would otherwise fail after Ray, Flower and the workers started."""
    from bpfree_core.data import dataset_dir
    from bpfree_core.model import build_objective, split_stages

    if cfg.train.data_dir or os.environ.get("BPFREE_DATA_DIR"):
        dataset_dir(cfg.model.dataset, cfg.train.data_dir or None)   # names the missing dir/file
    if cfg.federation.executor == "pipeline" and build_objective(cfg).pipelinable:
        split_stages(len(build_objective(cfg).layer_sizes()), cfg.pipeline.stages)


def launch_stage_workers(cfg: ExperimentConfig, log_dir: Path,
                         launched: list[Any]) -> dict[int, list[str]]:
    """Start S `bpfree worker` processes per client (pipeline executor); {client: addresses}.

    Each ClientApp connects to and configures its own workers; this only owns their processes
    (client.supervisor.LocalWorkers, appended to `launched` so the caller stops them)."""
    if cfg.federation.executor != "pipeline":
        return {}
    from client.supervisor import LocalWorkers

    def launch(k: int) -> Any:
        return LocalWorkers(cfg.pipeline.stages, device=cfg.train.device,
                            threads=max(cfg.train.threads, 1), log_dir=log_dir / f"client{k}",
                            token=cfg.pipeline.token, timeout=cfg.pipeline.connect_timeout)

    # In parallel: each worker spends seconds importing torch; K clients need not wait in line.
    with ThreadPoolExecutor(max_workers=cfg.federation.clients) as pool:
        futures = [pool.submit(launch, k) for k in range(cfg.federation.clients)]
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
        log.info("client %d: stage workers %s", k, a)
    return addresses


def client_actors(cfg: ExperimentConfig) -> int:
    """ClientApps that run at once. A pipeline ClientApp only feeds its stage workers (separate
    processes, outside Ray) and waits on gRPC, so all K run in one wave; an in-process ClientApp
    trains the layers itself, so at most one per core."""
    if cfg.federation.executor == "pipeline":
        return cfg.federation.clients
    return min(os.cpu_count() or 2, cfg.federation.clients)


class FlowerSimulation:
    """The one place that drives Flower's simulation engine (its Python API is deprecated in
    favour of `flwr run`; switching is a change here only).

    Ray is started first, on its own and with retries: Ray gives its processes a fixed 30 s to
    come up, which a busy 2-core machine (say, while stage workers import torch) can miss.
    Flower then reuses the running Ray and shuts it down at the end.
    """

    RAY_ATTEMPTS = 3

    def __init__(self, tmp: Path, num_clients: int, actors: int):
        self.num_clients = num_clients
        tmp.mkdir(parents=True, exist_ok=True)
        self.ray_tmp, self.scratch = tmp / "ray", None
        if len(str(self.ray_tmp.resolve())) > RAY_TEMP_MAX:  # too deep for Ray's socket paths
            self.scratch = Path(tempfile.mkdtemp(prefix="bpfree-ray-"))
            self.ray_tmp = self.scratch
        # Ray's CPU count only sets how many ClientApp actors run at once (client_actors).
        self.init_args = {"num_cpus": actors,
                          "_temp_dir": str(self.ray_tmp.resolve()), "include_dashboard": False,
                          "logging_level": "WARNING", "log_to_driver": True}

    def start_ray(self) -> None:
        import ray

        # As Flower's Ray backend does: actors see this process's import path.
        pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
        for attempt in range(1, self.RAY_ATTEMPTS + 1):
            try:
                ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **self.init_args)
                return
            except Exception as exc:  # noqa: BLE001 - Ray raises plain Exception on a slow start
                ray.shutdown()
                if attempt == self.RAY_ATTEMPTS:
                    raise BpfreeError(f"Ray did not start in {attempt} attempts ({exc}); the "
                                      "machine is too busy, retry when it is quieter") from exc
                log.warning("Ray did not start (%s); retrying (%d/%d)", exc, attempt,
                            self.RAY_ATTEMPTS)

    def run(self, server_app: Any, client_app: Any) -> None:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state DB chatter
        from flwr.simulation import run_simulation

        logging.getLogger("flwr").propagate = False  # Flower prints through its own handler
        try:
            run_simulation(
                server_app=server_app, client_app=client_app, num_supernodes=self.num_clients,
                # Ray restarts a ClientApp actor that died (killed, OOM) and reruns the message it
                # was handling once (a round is deterministic: the rerun gives the same reply);
                # a client that dies again is left out of that round (counted) and is back the
                # next round. Without this a dead actor stays in Flower's pool and fails every
                # message it is given for the rest of the run.
                backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0,
                                                     "max_restarts": CLIENT_ACTOR_RESTARTS,
                                                     "max_task_retries": CLIENT_TASK_RETRIES},
                                "init_args": dict(self.init_args)})
        except RuntimeError as exc:  # Flower wraps engine failures this way
            inner = exc.__cause__
            cause = inner.__cause__ if inner is not None and inner.__cause__ else inner
            where = "" if self.scratch is not None else f"; Ray's session logs are in {self.ray_tmp}"
            raise BpfreeError(f"Flower's simulation engine stopped: {cause or exc}{where}") from exc
        shutil.rmtree(self.ray_tmp, ignore_errors=True)  # Ray's session files: kept on failure
        if self.scratch is None:
            with contextlib.suppress(OSError):
                self.ray_tmp.parent.rmdir()  # RUN_DIR/tmp, if nothing else is in it

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
