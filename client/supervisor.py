"""Local stage worker processes: spawn them, watch them, respawn one, stop them all by PID.

Process supervision only: the driver (client.pipeline.Pipeline) talks to workers by address and
asks `LocalWorkers` to replace a stage whose process died or hung. `bpfree simulate` starts its
clients' workers here directly. Every process is a fresh `python -m bpfree worker` (never a
fork: gRPC may already run threads in this process), in its own session, reporting its port
through a file; a worker also stops by itself when this process goes away (--parent-pid).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bpfree_core.config import stage_device
from bpfree_core.errors import PeerUnavailableError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


class LocalWorkers:
    """`n` stage worker processes on 127.0.0.1 that this process started and will stop."""

    def __init__(self, n: int, *, device: str = "cpu", threads: int = 1,
                 log_dir: Path | None = None, token: str = "", timeout: float = 30.0):
        """`device`: one for every stage, or a comma-separated list, one per stage
        (config.stage_device: "cuda:0,cuda:1" puts S stages on two GPUs in turn)."""
        self.device, self.threads, self.token, self.timeout = device, threads, token, timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="bpfree-pipeline-")
        self.log_dir = Path(log_dir) if log_dir else Path(self._tmp.name)
        try:
            self.processes, self.addresses = launch_workers(
                n, Path(self._tmp.name), device=device, threads=threads, log_dir=log_dir,
                token=token, timeout=timeout, scratch=True)
        except BaseException:
            self._tmp.cleanup()
            raise

    def alive(self, s: int) -> bool:
        return self.processes[s].poll() is None

    def respawn(self, s: int, same_port: bool = False) -> str:
        """Kill stage `s`'s process (if it still runs), start a new one; return its address.
        `same_port`: the new one listens where the old one did (for drivers that know only the
        address, e.g. bpfree simulate's ClientApps)."""
        old = self.processes[s]
        if old.poll() is None:
            old.kill()
        old.wait(timeout=10)
        port_file = Path(self._tmp.name) / f"stage{s}.port"
        port_file.unlink(missing_ok=True)   # the dead worker's port is no signal
        log_file = self.log_dir / f"stage{s}.log"
        listen = self.addresses[s] if same_port else "127.0.0.1:0"
        proc = _spawn_worker(stage_device(self.device, s) or "cpu", self.threads, port_file,
                             log_file, self.token, scratch=True, listen=listen)
        self.processes[s] = proc
        try:
            port = wait_port(proc, port_file, log_file, self.timeout)
        except BaseException:
            stop_processes([proc])
            raise
        self.addresses[s] = f"127.0.0.1:{port}"
        log.warning("stage %d (pid %d, exit code %s) restarted as pid %d at %s", s, old.pid,
                    old.returncode, proc.pid, self.addresses[s])
        return self.addresses[s]

    def close(self) -> None:
        stop_processes(self.processes)
        self._tmp.cleanup()


def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # the launcher's working directory too: a rule named pkg.module:Class imports as it does here
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.getcwd(),
                                         *filter(None, [env.get("PYTHONPATH")])])
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    for key in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK"):
        env.setdefault(key, "0" if key == "FLWR_TELEMETRY_ENABLED" else "1")
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    env.pop("BPFREE_TOKEN", None)   # the token goes on the command line of our own children only
    return env


def worker_command(listen: str, port_file: Path, *, device: str = "cpu", threads: int = 1,
                   scratch_dir: Path | None = None) -> list[str]:
    """`bpfree worker` on `listen`, reporting its port in `port_file`, stopping when this process
    goes away; a fresh interpreter (never fork: gRPC may already run threads in this process)."""
    cmd = [sys.executable, "-m", "bpfree", "worker", "--listen", listen, "--device", device,
           "--threads", str(threads), "--port-file", str(port_file), "--parent-pid", str(os.getpid())]
    return cmd + (["--scratch-dir", str(scratch_dir)] if scratch_dir is not None else [])


def launch_workers(n: int, tmp_dir: Path, *, device: str = "cpu", threads: int = 1,
                   log_dir: Path | None = None, token: str = "", timeout: float = 30.0,
                   scratch: bool = False) -> tuple[list[subprocess.Popen], list[str]]:
    """Spawn `n` `bpfree worker` processes on 127.0.0.1:0; return them and their addresses.

    Readiness is each worker's port file, waited for with a deadline; on any failure every
    process started so far is stopped by PID.
    """
    logs = Path(log_dir) if log_dir else tmp_dir
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        port_files = [tmp_dir / f"stage{s}.port" for s in range(n)]
        for s in range(n):
            port_files[s].unlink(missing_ok=True)   # a stale file from an earlier run is no signal
            procs.append(_spawn_worker(stage_device(device, s) or "cpu", threads, port_files[s],
                                       logs / f"stage{s}.log", token, scratch))
        addresses = [f"127.0.0.1:{wait_port(p, f, logs / f'stage{s}.log', timeout)}"
                     for s, (p, f) in enumerate(zip(procs, port_files, strict=True))]
    except BaseException:
        stop_processes(procs)
        raise
    return procs, addresses


def _spawn_worker(device: str, threads: int, port_file: Path, log_file: Path,
                  token: str, scratch: bool = False, listen: str = "127.0.0.1:0") -> subprocess.Popen:
    """`scratch`: the port file's directory is ours alone; an orphaned worker removes it."""
    cmd = worker_command(listen, port_file, device=device, threads=threads,
                         scratch_dir=port_file.parent if scratch else None)
    env = worker_env(threads)
    if token:
        env["BPFREE_TOKEN"] = token   # via the environment: not visible in `ps`
    with open(log_file, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                start_new_session=True)


def wait_port(proc: subprocess.Popen, port_file: Path, log_file: Path, timeout: float) -> int:
    """Wait for a spawned worker's port file; fail fast with its log if it exits first."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        if port_file.exists():
            return int(port_file.read_text().strip())
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
            raise PeerUnavailableError(f"stage worker (pid {proc.pid}) exited with code "
                                       f"{proc.returncode} before serving; its log ends:\n{tail}")
        time.sleep(delay)   # polling a file with a deadline, not sleeping as synchronisation
        delay = min(delay * 1.5, 0.2)
    raise PeerUnavailableError(f"stage worker (pid {proc.pid}) did not report its port within "
                               f"{timeout:g} s (pipeline.connect_timeout); see {log_file}")


def stop_processes(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("stage worker pid %d ignored SIGTERM for %.0f s; killing it", p.pid, grace)
            p.kill()
            p.wait(timeout=grace)


class Watchdog:
    """Respawns, on the same port, every watched stage worker whose process died (at most
    `budget` respawns in all): drivers that only know the addresses (bpfree simulate's
    ClientApps) find the stage there again, reconfigure it and rerun their round."""

    def __init__(self, groups: list[LocalWorkers], budget: int, every: float = 0.25):
        self.groups, self.budget, self.every = groups, budget, every
        self.respawned: list[tuple[int, int]] = []   # (group, stage) per respawn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.every):   # polling process state, not synchronising
            for g, group in enumerate(self.groups):
                for s in range(len(group.processes)):
                    if group.alive(s) or self._stop.is_set():
                        continue
                    if len(self.respawned) >= self.budget:
                        log.error("stage %d of client %d died, and the %d respawns allowed "
                                  "(pipeline.restarts per round) are used up", s, g, self.budget)
                        return
                    try:
                        group.respawn(s, same_port=True)
                    except PeerUnavailableError as exc:
                        log.error("stage %d of client %d died and could not be respawned: %s",
                                  s, g, exc)
                        return
                    self.respawned.append((g, s))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
