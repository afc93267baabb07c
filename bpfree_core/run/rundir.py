"""One run directory for every loop (train, pipeline, federated rounds, continual tasks).

A run directory is created with an error that names the path and the fix, locked while a run
uses it (a second run on it is refused, naming the first), never silently mixed with or written
over an earlier run (`overwrite` must say so), and committed one step at a time: the step's
checkpoint first (it carries the step's metrics record), then its metrics line. On resume the
metrics are cut back to the checkpoint and its record restored, so a crash at any point resumes
with neither a duplicated nor a missing row. Every disk error is one sentence (errors.RunDirError).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from bpfree_core.errors import BpfreeError, ConfigError, RunDirError
from bpfree_core.metrics import MetricsWriter
from bpfree_core.run.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

LOCK = ".lock"
METRICS = "metrics.jsonl"
# What a run leaves behind; any of these means the directory holds a run.
RUN_FILES = ("config.json", METRICS, "summary.json", "checkpoint.pt", "checkpoints", "weights.pt",
             "best.pt")   # best.pt: train.patience's best epoch, which a resume of this run reads
# Also removed by `overwrite` (outputs of the run that are not a sign of one by themselves).
STOP = "STOP"   # a file a launcher leaves to end a federated run after the round in flight
OUTPUTS = ("tb", "logs", "accuracy.png", "layers.png", "accuracy_matrix.png", "task_accuracy.png",
           "ray_stages.json", STOP)


# errno -> what went wrong and the fix; {path}, {doing} and {fix} are filled in
_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device while {doing} {path}; free some space there or {fix}",
    errno.EDQUOT: "the disk quota is exhausted while {doing} {path}; free some space or {fix}",
    errno.EROFS: "{path} is on a read-only filesystem, so {doing} it failed; {fix} on a writable disk",
    errno.EACCES: "permission denied {doing} {path}; {fix} in a directory you can write",
    errno.EPERM: "permission denied {doing} {path}; {fix} in a directory you can write",
    errno.ENOTDIR: "{path} cannot be a directory: a part of it is a file, not a folder; {fix}",
    errno.EEXIST: "{path} exists and is not a directory; {fix}",
    errno.ENAMETOOLONG: "the path {path} is too long; {fix} with a shorter path",
}


def os_error_sentence(exc: OSError, path: Path | str, doing: str) -> str:
    """One sentence for a filesystem error while `doing` (a verb phrase) `path`: what, and the fix."""
    template = _OS_ERRORS.get(exc.errno or 0,
                              "{doing} {path} failed ({why}); check the path or {fix}")
    return template.format(doing=doing, path=path, fix="choose another --out",
                           why=exc.strerror or exc)


def _holds_something(path: Path) -> bool:
    """A sign of a run: a non-empty file or directory (an empty metrics.jsonl or checkpoints/ is
    what a run that died before its first step leaves)."""
    if path.is_dir():
        return any(path.iterdir())
    return path.exists() and (path.name == "config.json" or path.stat().st_size > 0)


def trusted_rule(cfg: Any, named: str | None, source: Path) -> None:
    """A run directory is data: the rule its config names is built only if it is bpfree's own or
    an installed plug-in, or if the user names the same code on the command line (`named`)."""
    from bpfree_core.config import ModelConfig, is_outside_rule

    algorithm = cfg.model.algorithm
    if not is_outside_rule(algorithm):
        return
    if named and ModelConfig(algorithm=named).algorithm == algorithm:   # paths made absolute alike
        return
    raise RunDirError(f"{source} names the rule {algorithm!r}, code from outside bpfree; a run "
                      "directory is data, so bpfree does not run the code it names: to use that "
                      f"rule, name it yourself with --algorithm {algorithm}")


class RunDir:
    """A run directory held by this process: `open` it, commit steps, `close` it.

    `resume`: continue the run in it (its last checkpoint); else a directory that already holds a
    run is refused unless `overwrite`, which removes that run's files first. `lock = False` when
    the process that launched this one already holds the lock (bpfree simulate's ServerApp).
    """

    def __init__(self, path: Path | str, *, resume: bool = False, overwrite: bool = False,
                 lock: bool = True):
        self.path = Path(path)
        self.resume = resume
        self._lock_fd: int | None = None
        self.writer: MetricsWriter | None = None
        self._make()
        if lock:
            self._lock()
        try:
            self._check_fresh(overwrite)
        except BaseException:
            self.close()
            raise

    # -- opening ----------------------------------------------------------------------------------
    def _make(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} is a file, not a directory; choose another --out")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")   # a read-only or full disk fails here, not mid-run
            probe.unlink()
        except OSError as exc:
            raise RunDirError(os_error_sentence(exc, self.path, "creating the run directory")) from None

    def _lock(self) -> None:
        lock = self.path / LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(os_error_sentence(exc, lock, "creating the lock file")) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(f"run directory {self.path} is in use by another run ({holder}); "
                              "wait for it to finish, stop it, or choose another --out") from None
        owner = f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, owner.encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise RunDirError(os_error_sentence(exc, lock, "writing the lock file")) from None
        self._lock_fd = fd

    def _check_fresh(self, overwrite: bool) -> None:
        found = [name for name in RUN_FILES if _holds_something(self.path / name)]
        if not found or self.resume:
            return
        if found == ["config.json"] and not overwrite:   # a start that never finished a step
            log.info("%s holds a run that never finished an epoch or round: starting afresh", self.path)
        elif not overwrite:
            raise RunDirError(
                f"{self.path} already holds a run ({', '.join(found)}); continue it with --resume, "
                "replace it with --overwrite, or choose another --out")
        else:
            log.warning("--overwrite: removing the earlier run in %s", self.path)
        for name in RUN_FILES + OUTPUTS:
            target = self.path / name
            try:
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
            except OSError as exc:
                raise RunDirError(os_error_sentence(exc, target, "removing")) from None

    # -- writing ----------------------------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> None:
        path = self.path / name
        self._guard(lambda: atomic_write_json(path, obj), path, "writing")

    def write_config(self, cfg: Any) -> None:
        """The resolved config (`ExperimentConfig.to_dict()`: no secrets)."""
        self.write_json("config.json", cfg.to_dict())

    def save(self, name: str, state: dict[str, Any]) -> Path:
        """A checkpoint file (plain containers and tensors only: see checkpoint.load_checkpoint)."""
        path = self.path / name
        self._guard(lambda: save_checkpoint(path, state), path, "writing the checkpoint")
        return path

    def load(self, name: str | Path) -> dict[str, Any]:
        return load_checkpoint(self.path / name)

    def log_metrics(self, record: dict[str, Any], step: int) -> None:
        """Append one metrics line (after the step's checkpoint: see the module doc)."""
        if self.writer is None:
            self.writer = MetricsWriter(self.path)
        writer = self.writer
        self._guard(lambda: writer.write(record, step=step), self.path / METRICS, "appending to")

    def commit(self, name: str, state: dict[str, Any], record: dict[str, Any], step: int) -> None:
        """One epoch or round: its checkpoint (carrying `record`), then its metrics line."""
        self.save(name, {**state, "record": record})
        self.log_metrics(record, step)

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.path)

    def rewind_metrics(self, key: str, last: int, record: dict[str, Any] | None) -> list[dict[str, Any]]:
        """On resume: keep the lines with `key` <= `last` (what the checkpoint holds), restore the
        checkpoint's own `record` if its line was lost; return the kept records."""
        kept = [r for r in self.records() if r.get(key, 0) <= last]
        if record and all(r.get(key) != record.get(key) for r in kept):
            kept.append(record)   # killed between the checkpoint and its metrics line
        path = self.path / METRICS
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode()
        self._guard(lambda: atomic_write_bytes(path, text), path, "rewriting")
        return kept

    def _guard(self, write: Any, path: Path, doing: str) -> None:
        try:
            write()
        except OSError as exc:
            raise RunDirError(os_error_sentence(exc, path, doing)) from None

    # -- closing ----------------------------------------------------------------------------------
    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except (OSError, BpfreeError):   # a full disk at the very end loses only TensorBoard
                pass
            self.writer = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)   # releases the flock
            self._lock_fd = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """RUN_DIR/metrics.jsonl's records; a line cut short by a crash is skipped."""
    path = run_dir / METRICS
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("skipping a truncated line in %s", path)
    return out


def check_resumable(saved: Any, cfg: Any, run_dir: Path) -> None:
    """Refuse to resume a run whose computed config changed (runtime fields may change)."""
    old, new = saved.computed_dict(), cfg.computed_dict()
    diff = [f"{s}.{k}" for s in old for k in old[s] if old[s][k] != new[s][k]]
    if "model.data_fingerprint" in diff:
        raise ConfigError(
            f"cannot resume {run_dir}: the data of model.dataset = {cfg.model.dataset!r} changed "
            f"since the run started (fingerprint {new['model']['data_fingerprint']}, the run's is "
            f"{old['model']['data_fingerprint']}); restore the original files or start a new --out")
    if diff:
        raise ConfigError(
            f"cannot resume {run_dir}: the config differs from the checkpoint's in "
            f"{', '.join(diff)}; resume with the same config (or start a new --out)")


def open_run_dir(path: Path | str | None, **kwargs: Any) -> AbstractContextManager[RunDir | None]:
    """`with open_run_dir(path, ...) as rd`: a RunDir, or None when there is no run directory."""
    return RunDir(path, **kwargs) if path is not None else nullcontext()
