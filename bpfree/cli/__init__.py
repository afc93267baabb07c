"""`bpfree` command line: one subcommand per job, each in its own module.

A subcommand module provides `add_arguments(parser)`, which imports nothing heavy (so `--help` is
instant), and `run(args) -> int`, which imports the job. Only the subcommand being run is loaded.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import time

from bpfree.cli.common import HelpFormatter
from bpfree_core.errors import BpfreeError
from bpfree_core.paths import absolute_env_paths
from bpfree_core.run.clock import LAUNCHED_ENV

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("bpfree.cli.train", "train a stack in one process (the golden reference)"),
    "worker": ("bpfree.client.worker_cli", "serve one pipeline stage over gRPC"),
    "pipeline": ("bpfree.cli.pipeline", "train one client's pipeline of stage workers"),
    "simulate": ("bpfree.cli.simulate", "federated run: K clients x S stages on this machine"),
    "continual": ("bpfree.cli.continual", "continual learning: tasks that arrive one after another"),
    "predict": ("bpfree.cli.predict", "class and scores of a trained run for new inputs"),
    "evaluate": ("bpfree.cli.evaluate", "a trained run's accuracy on any dataset"),
    "export": ("bpfree.cli.export", "a trained run as a self-contained torch.export program"),
    "bench": ("bpfree.bench.cli", "benchmarks: accuracy, pipeline, throughput sweeps"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bpfree", description="Backprop-free training, pipelined and federated.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"bpfree {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        if name in argv[:2]:  # import only the subcommand that runs
            _load(module).add_arguments(p)
    return parser


def _load(module: str):  # noqa: ANN202
    return importlib.import_module(module)


def version() -> str:
    """The installed distribution's version, else pyproject's (a checkout run without installing)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("bpfree")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        text = pyproject.read_text() if pyproject.is_file() else ""
        found = re.search(r'^version = "([^"]+)"', text, re.M)
        return found.group(1) if found else "unknown"


class BarSafeHandler(logging.StreamHandler):
    """Log lines printed above a live progress bar (tqdm.write), never into it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: every `finally` runs, so children are stopped and the run
    directory is left resumable."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    # gRPC core's own INFO lines (an idle connection closed, say) are not bpfree's to print
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    absolute_env_paths()   # e.g. BPFREE_DATA_DIR=../shared/datasets, for every process it starts
    launched = os.environ.get(LAUNCHED_ENV)
    os.environ[LAUNCHED_ENV] = repr(started)   # one clock for this command and all it starts
    try:
        return _run(args)
    finally:
        if launched is None:
            os.environ.pop(LAUNCHED_ENV, None)
        else:
            os.environ[LAUNCHED_ENV] = launched


def _run(args: argparse.Namespace) -> int:
    handler = BarSafeHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
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
