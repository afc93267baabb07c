"""Flower's supported path for a local simulation: a SuperLink of our own, then `flwr run`.

`bpfree simulate` starts `flower-superlink --simulation` on a free loopback port with a private
FLWR_HOME, submits this project (a Flower App: server.app / client.app) with `flwr run --stream`,
follows the run through RUN_DIR/metrics.jsonl, and at the end stops the SuperLink and every
process below it (SuperExec, flwr-simulation, Ray) by PID, however the run ended. Flower's and
Ray's own output goes to RUN_DIR/logs (superlink.log, flwr.log), never to the terminal.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bpfree_core.errors import BpfreeError

log = logging.getLogger(__name__)

def app_dir() -> Path:
    """The Flower App `flwr run` submits: a checkout's root (its pyproject.toml), else the
    installed package's own copy (bpfree/flower_app)."""
    above = Path(__file__).resolve().parents[1]   # a checkout's root, or the installed bpfree/
    if (above / "pyproject.toml").is_file() and (above / "bpfree").is_dir():
        return above
    return above / "flower_app"


APP_DIR = app_dir()
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0",
              "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_DEDUP_LOGS": "0"}
START_TIMEOUT = 60.0    # seconds for the SuperLink to answer /health
POLL = 0.25             # seconds between looks at the run (progress, exit)


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when this process dies, even by SIGKILL (Linux), so a
    killed `bpfree simulate` takes its SuperLink (and, through it, the rest) along."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += children.get(p, [])
    return out


def stop_pids(pids: list[int], grace: float = 10.0, reap: Callable[[], object] = lambda: None) -> None:
    """SIGTERM `pids`, wait up to `grace` seconds for them to exit, then SIGKILL what is left."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap()
        if not any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in pids):
            break
        time.sleep(0.05)   # waiting for processes to exit after a signal, with a deadline
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop `proc` and everything below it (collected first: nothing gets re-parented away)."""
    pids = [proc.pid, *descendants(proc.pid)] if proc.poll() is None else descendants(proc.pid)
    stop_pids(pids, grace, reap=proc.poll)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("the SuperLink (pid %d) did not exit after SIGKILL", proc.pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class FlowerRun:
    """One local-simulation SuperLink for one run; `close()` stops it and all below it."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None):
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.home = Path(tempfile.mkdtemp(prefix="bpfree-flwr-", dir="/tmp"))   # FLWR_HOME: ours alone
        self.port = free_port()
        # Ray's session dirs go under FLWR_HOME (removed with it), not /tmp/ray; the path stays
        # short for Ray's unix sockets (<= 107 bytes).
        (self.home / "ray").mkdir()
        self.env = {**os.environ, **(env or {}), **FLOWER_ENV, "FLWR_HOME": str(self.home),
                    "RAY_TMPDIR": str(self.home / "ray"),
                    # the caller's working directory too: a rule named pkg.module:Class
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(APP_DIR), os.getcwd(),
                                                                os.environ.get("PYTHONPATH")]))}
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "bpfree"\n\n'
            f'[superlink.bpfree]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.superlink: subprocess.Popen | None = None

    def start(self) -> None:
        # Under a guard (this module's main): whatever stops it - our close(), our death, a signal -
        # it stops the SuperLink and every process below it (SuperExec, flwr-simulation, Ray).
        cmd = [sys.executable, "-m", "bpfree.server.flower_run", "--remove", str(self.home), "--",
               "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
               "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-runtime-dependency-installation",
               "--log-file", str(self.log_dir / "superlink.log")]
        with open(self.log_dir / "superlink.out", "ab") as out:
            self.superlink = subprocess.Popen(cmd, env=self.env, cwd=self.home, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True,
                                              preexec_fn=die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise BpfreeError(f"Flower's SuperLink exited with code {self.superlink.returncode} "
                                  f"before serving; see {self.log_dir / 'superlink.log'}")
            if self._healthy():
                return
            time.sleep(POLL)   # polling the SuperLink's health endpoint, with a deadline
        raise BpfreeError(f"Flower's SuperLink did not answer on 127.0.0.1:{self.port} within "
                          f"{START_TIMEOUT:g} s; see {self.log_dir / 'superlink.log'}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1.0) as r:
                return 200 <= r.status < 300
        except OSError:
            return False

    def run(self, run_config: str, federation_config: str,
            on_poll: Callable[[], None] = lambda: None, app_dir: Path = APP_DIR) -> None:
        """`flwr run` this app (or the Flower app in `app_dir`) with `run_config` (TOML text);
        wait for it, calling `on_poll`."""
        config_file = self.home / "run-config.toml"
        config_file.write_text(run_config)
        cmd = ["flwr", "run", str(app_dir), "bpfree", "--stream",
               "--federation-config", federation_config, "--run-config", str(config_file)]
        log_file = self.log_dir / "flwr.log"
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(cmd, env=self.env, cwd=self.home, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=die_with_parent)
        try:
            while proc.poll() is None:
                on_poll()
                try:
                    proc.wait(timeout=POLL)
                except subprocess.TimeoutExpired:
                    pass
            on_poll()
        finally:
            if proc.poll() is None:
                stop_tree(proc)
        if proc.returncode != 0:
            raise BpfreeError(f"`flwr run` exited with code {proc.returncode}: "
                              f"{last_error(log_file)}; the full log is {log_file}")

    def close(self) -> None:
        if self.superlink is not None:
            stop_tree(self.superlink)
        shutil.rmtree(self.home, ignore_errors=True)


def guard(cmd: list[str], remove: Path | None = None) -> int:
    """Run `cmd` until it exits or this process is told to stop (SIGTERM, SIGINT, or the death of
    our parent); then stop `cmd` and everything below it, and delete `remove` (its scratch dir).
    Returns `cmd`'s exit code (0 if stopped)."""
    die_with_parent()
    # A subreaper: processes whose parent exits become our children (not init's), so they stay
    # in the tree we stop, and we reap them (no zombies left behind).
    ctypes.CDLL(None, use_errno=True).prctl(36, 1)   # PR_SET_CHILD_SUBREAPER
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    proc = subprocess.Popen(cmd)
    while not stop.wait(POLL):
        _reap_orphans(proc.pid)
        if proc.poll() is not None:
            break
    stop_tree(proc)
    for pid in descendants(os.getpid()):   # anything still below us
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _reap_orphans(proc.pid, block=True)
    if remove is not None:
        shutil.rmtree(remove, ignore_errors=True)
    return proc.returncode if proc.returncode is not None and not stop.is_set() else 0


def _reap_orphans(keep: int, block: bool = False) -> None:
    """Collect exited adopted processes (never `keep`, which Popen reaps)."""
    for pid in descendants(os.getpid()):
        if pid != keep and (block or _zombie(pid)):
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, 0)


def last_error(log_file: Path) -> str:
    """The most telling line of a Flower log: the last Python exception (`KindError: message`),
    else the last error line."""
    try:
        lines = [_ANSI.sub("", x).strip() for x in log_file.read_text(errors="replace").splitlines()]
    except OSError:
        return f"no log at {log_file}"
    for line in reversed(lines):
        m = _EXCEPTION.match(line)
        if m:
            return f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}"[:MAX_ERROR]
    boxed = _last_box(lines)   # Flower's CLI prints its errors in a box
    if boxed:
        return boxed[:MAX_ERROR]
    for line in reversed(lines):
        if "error" in line.lower() and "Exit Code" not in line:
            return line[:MAX_ERROR]
    return lines[-1][:MAX_ERROR] if lines else "the log is empty"


def _last_box(lines: list[str]) -> str:
    """The text inside the last `╭─ Error ─╮ │ ... │ ╰─╯` box, joined into one line."""
    tops = [i for i, x in enumerate(lines) if x.startswith("╭") and "Error" in x]
    if not tops:
        return ""
    body = []
    for line in lines[tops[-1] + 1:]:
        if line.startswith("╰"):
            break
        body.append(line.strip("│ "))
    return " ".join(x for x in body if x)


MAX_ERROR = 4000   # characters of an error sentence: whole sentences, not the first 500
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION = re.compile(r"^([\w.]*(?:Error|Exception)): (.+)$")


if __name__ == "__main__":   # python -m bpfree.server.flower_run [--remove DIR] -- CMD...: CMD under a guard
    args = sys.argv[1:sys.argv.index("--")]
    sys.exit(guard(sys.argv[sys.argv.index("--") + 1:],
                   Path(args[1]) if args[:1] == ["--remove"] else None))
