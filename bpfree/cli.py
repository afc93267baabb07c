"""`bpfree` command line: one subcommand per job, each implemented in its own module.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`; it is imported
only when its subcommand runs, so `bpfree train` never pays for importing gRPC or Flower.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys

from bpfree_core.errors import BpfreeError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("bpfree_core.cli_train", "train a stack in one process (the golden reference)"),
    "worker": ("bpfree.client.worker_cli", "serve one pipeline stage over gRPC"),
    "pipeline": ("bpfree.client.pipeline_cli", "train one client's pipeline of stage workers"),
    "simulate": ("bpfree.server.simulate", "federated run: K clients x S stages on this machine"),
    "continual": ("bpfree.server.continual", "continual learning: tasks that arrive one after another"),
    "predict": ("bpfree_core.cli_predict", "class and scores of a trained run for new inputs"),
    "evaluate": ("bpfree_core.cli_evaluate", "a trained run's accuracy on any dataset"),
    "export": ("bpfree_core.cli_export", "a trained run as a self-contained TorchScript module"),
    "bench": ("bpfree.bench.cli", "benchmarks: accuracy, pipeline, throughput sweeps"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bpfree", description="Backprop-free training, pipelined and federated.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name in argv[:2]:  # import only the subcommand that runs
            _load(module).add_arguments(p)
    return parser


def _load(module: str):  # noqa: ANN202
    return importlib.import_module(module)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: every `finally` runs, so children are stopped and the run
    directory is left resumable."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    # gRPC core's own INFO lines (an idle connection closed, say) are not bpfree's to print
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)   # its font-cache notes are not ours
    if args.command != "worker":   # a worker has its own clean stop on SIGTERM
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(_load(args._module).run(args) or 0)
    except BpfreeError as exc:
        print(f"bpfree {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:   # a disk or path error no module turned into a sentence
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"bpfree {args.command}: error: {exc.strerror or exc}{where}; check the path and "
              "the free space there", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        how = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
        print(f"bpfree {args.command}: stopped by {how}; everything it started is stopped "
              "(a run with --out continues with --resume)", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
