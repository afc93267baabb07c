"""`bpfree simulate`: K federated clients x S pipeline stages on this machine (server.simulate).

    bpfree simulate                                   # MNIST, 2 clients x 2 stages, 4 rounds
    bpfree simulate --partition dirichlet:0.3 --out runs/noniid
    bpfree simulate --resume runs/noniid              # after a crash: continue from the checkpoint
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from bpfree.cli.common import (
    SIMULATE_DEFAULTS,
    add_config_arguments,
    progress_from_args,
    report,
    show_defaults,
)
from bpfree_core.config import PLACEMENTS, ExperimentConfig

SHORTCUTS = {"clients": "federation.clients", "rounds": "federation.rounds",
             "local_epochs": "federation.local_epochs", "partition": "federation.partition",
             "executor": "federation.executor", "min_clients": "federation.min_clients",
             "proximal_mu": "federation.proximal_mu", "stages": "pipeline.stages",
             "backend": "federation.backend", "address": "federation.ray_address",
             "placement": "federation.placement", "strategy": "federation.strategy",
             "strategy_args": "federation.strategy_args", "fraction_train": "federation.fraction_train",
             "pool": "pipeline.pool"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, SIMULATE_DEFAULTS, epochs=False)
    parser.add_argument("--clients", type=int, help="K federated clients (federation.clients)")
    parser.add_argument("--stages", type=int, help="S stage workers per client (pipeline.stages)")
    parser.add_argument("--pool", type=int, metavar="P",
                        help="P pipelines (P x S workers) that the sampled clients take in turn "
                             "(pipeline.pool; default one pipeline per client)")
    parser.add_argument("--rounds", type=int, help="federated rounds (federation.rounds)")
    parser.add_argument("--local-epochs", type=int, help="epochs per client per round")
    parser.add_argument("--partition", help="iid | dirichlet:ALPHA | shards:N | natural (by your data's "
                                            "group ids) | natural:label")
    parser.add_argument("--executor", choices=("pipeline", "inprocess"),
                        help="pipeline: S worker processes per client over gRPC; "
                             "inprocess: all layers inside the ClientApp")
    parser.add_argument("--min-clients", type=int, help="usable replies a round needs (0 = all sampled)")
    parser.add_argument("--fraction-train", type=float,
                        help="share of the clients sampled to train each round (1 = all)")
    parser.add_argument("--strategy", help="server strategy: fedavg, fedprox, fedavgm, fedadam, "
                                           "fedyogi, fedadagrad, fedmedian, fedtrimmedavg, krum, multikrum")
    parser.add_argument("--strategy-args", metavar="K=V,K=V",
                        help="its hyper-parameters, Flower's names (e.g. eta=0.01,beta_1=0.9)")
    parser.add_argument("--proximal-mu", type=float, help="FedProx proximal term (0 = FedAvg)")
    parser.add_argument("--backend", choices=("flower", "ray"),
                        help="flower: Flower simulation engine; ray: every stage a Ray "
                             "actor placed on a Ray cluster (see --address, --placement)")
    parser.add_argument("--address", help="ray backend: auto | HEAD_IP:PORT of a running Ray "
                                          "cluster (default: start Ray on this machine)")
    parser.add_argument("--placement", choices=PLACEMENTS,
                        help="ray backend: how each client's stages spread over nodes")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue RUN_DIR from its last checkpoint (its config.json is used; "
                             "--set may change only how it runs, e.g. train.threads)")
    parser.add_argument("--no-plot", action="store_true",
                        help="skip RUN_DIR/accuracy.png and layers.png")
    show_defaults(parser, SHORTCUTS, SIMULATE_DEFAULTS)


def resolve(args: argparse.Namespace) -> tuple[ExperimentConfig, Path, bool]:
    """(config, run directory, resume?) from the command line."""
    from bpfree.cli.common import config_from_args, env_overrides, shortcut_overrides
    from bpfree_core.errors import ConfigError
    from bpfree_core.run.rundir import trusted_rule

    extra = shortcut_overrides(args, SHORTCUTS)
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
        trusted_rule(base, args.algorithm, saved)   # its rule runs only if named here too
        return env_token(base.with_overrides(extra + list(args.set) + env_overrides())), args.resume, True
    args.set = list(args.set) + extra
    cfg = env_token(config_from_args(args, SIMULATE_DEFAULTS))
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
    from bpfree.server.simulate import simulate

    cfg, run_dir, resume = resolve(args)
    summary = simulate(cfg, run_dir, resume=resume, progress=progress_from_args(args),
                       overwrite=args.overwrite)
    summary.pop("weights", None)
    plots = []
    if not args.no_plot:
        from bpfree.server.plot import plot_accuracy, plot_layers

        plots.append(str(plot_accuracy(run_dir)))
        plots += [str(p) for p in [plot_layers(run_dir)] if p]
    report(args, summary, run_dir, plots)
    return 0


