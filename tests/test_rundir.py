"""A run directory a user can trust, on real processes and real filesystems.

* a checkpoint replaced by a pickle that runs code is refused on --resume, and nothing runs;
* a full disk (a real tmpfs of a few KB), a read-only mount, an --out that is a file, under a
  file or under /proc: one sentence naming the path and the fix, from train, pipeline and simulate;
* two runs on one directory: the second is refused by name while the first holds it; a finished
  run is never overwritten without --overwrite, which leaves only the new run's rows;
* every epoch commits its checkpoint, then its metrics line: a crash at every single write of a
  run, and SIGKILLs at random moments, resume to the weights of an uninterrupted run with each
  epoch's row exactly once;
* non-finite and absurd numbers are refused by field;
* a corrupt latest round checkpoint names the intact earlier round and how to resume from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import bpfree_core.run.rundir as rundir
from bpfree.cli import main
from bpfree.client.supervisor import REPO_ROOT
from bpfree_core.config import load_config
from bpfree_core.errors import DataError, RunDirError
from bpfree_core.run.checkpoint import load_checkpoint
from bpfree_core.run.trainer import train_reference

TINY = ["model.algorithm=ff", "model.hidden=40,40", "train.train_limit=600", "train.test_limit=200",
        "train.batch_size=100", "train.threads=1", "train.jitter=0", "objective.vote_first=false",
        "optim.lr=2e-3"]


def _cfg(data_dir: Path, *extra: str):  # noqa: ANN202
    return load_config(None, [f"train.data_dir={data_dir}", *TINY, *extra])


def _flags(data_dir: Path, *extra: str) -> list[str]:
    out = ["--data-dir", str(data_dir), "--no-progress"]
    for item in [*TINY, *extra]:
        out += ["--set", item]
    return out


def _cli(capsys, *argv: str) -> tuple[int, str]:  # noqa: ANN001
    code = main(list(argv))
    return code, capsys.readouterr().err


def _bpfree(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bpfree", *args], cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _one_sentence(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip() and " INFO " not in x and " WARNING " not in x]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _wait_until(what: str, check, timeout: float) -> None:  # noqa: ANN001
    deadline, delay = time.monotonic() + timeout, 0.02
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:g} s"
        time.sleep(delay)   # polling a real condition with a deadline
        delay = min(delay * 1.5, 0.25)


def _rows(run: Path, key: str = "epoch") -> list[int]:
    return [json.loads(x)[key] for x in (run / "metrics.jsonl").read_text().splitlines()]


# -- 1. nothing in a checkpoint runs --------------------------------------------------------------

class _Payload:
    """A pickle that runs a shell command when it is loaded the unsafe way."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(data_dir, tmp_path, capsys):  # noqa: ANN001
    from bpfree.server.coordinator import Coordinator

    run, marker = tmp_path / "run", tmp_path / "pwned"
    assert _cli(capsys, "train", *_flags(data_dir, "train.epochs=1"), "--out", str(run))[0] == 0
    torch.save({"epoch": 0, "weights": _Payload(marker)}, run / "checkpoint.pt")
    code, err = _cli(capsys, "train", *_flags(data_dir, "train.epochs=2"), "--out", str(run),
                     "--resume")
    assert code == 2 and "tampered" in _one_sentence(err) and "checkpoint.pt" in err
    assert not marker.exists()
    # a federated round checkpoint: the same loader
    fed = tmp_path / "fed"
    (fed / "checkpoints").mkdir(parents=True)
    torch.save({"round": 1, "weights": _Payload(marker)}, fed / "checkpoints" / "round-0001.pt")
    with pytest.raises(DataError, match="tampered"):
        Coordinator(_cfg(data_dir, "federation.clients=1"), fed, resume=True)
    assert not marker.exists()


# -- 2. paths and disks: one sentence ---------------------------------------------------------------

@contextlib.contextmanager
def _mount(where: Path, *options: str) -> Iterator[Path]:
    """A real tmpfs at `where` (root and mount(8) only: skipped, with the reason, elsewhere)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_is_one_sentence_from_train_and_pipeline(data_dir, tmp_path) -> None:  # noqa: ANN001
    with _mount(tmp_path / "full", "size=64k") as disk:
        for command in ("train", "pipeline"):
            run = disk / command
            proc = _bpfree(command, *_flags(data_dir, "train.epochs=2"), "--out", str(run))
            _, err = proc.communicate(timeout=180)
            line = _one_sentence(err)
            assert proc.returncode == 2, err
            assert "no space left on the device" in line and str(run) in line, line
            assert "free some space" in line


@pytest.mark.parametrize("where", ["file", "under-file", "proc", "read-only"])
@pytest.mark.parametrize("command", ["train", "pipeline", "simulate"])
def test_a_bad_out_is_one_sentence_naming_it(where, command, data_dir, tmp_path, capsys) -> None:  # noqa: ANN001
    (tmp_path / "a-file").write_text("not a directory")
    with contextlib.ExitStack() as stack:
        out = {"file": tmp_path / "a-file", "under-file": tmp_path / "a-file" / "run",
               "proc": Path("/proc/bpfree-run")}.get(where)
        if where == "read-only":
            out = stack.enter_context(_mount(tmp_path / "ro", "ro", "size=1m")) / "run"
        t0 = time.monotonic()
        code, err = _cli(capsys, command, *_flags(data_dir, "train.epochs=1"), "--out", str(out))
    line = _one_sentence(err)
    assert code == 2 and str(out).split("/run")[0] in line and "--out" in line, line
    assert time.monotonic() - t0 < 30   # refused before workers or Flower start


# -- 3. one run per directory ------------------------------------------------------------------------

def test_a_second_run_on_a_busy_directory_is_refused_and_a_finished_one_is_kept(
        data_dir, tmp_path, capsys) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    first = _bpfree("train", *_flags(data_dir, "train.epochs=500"), "--out", str(run))
    try:
        _wait_until("the first run's first epoch", lambda: _read(run / "metrics.jsonl").strip()
                    or first.poll() is not None, 60)
        assert f"pid {first.pid}" in _read(run / rundir.LOCK)
        code, err = _cli(capsys, "train", *_flags(data_dir, "train.epochs=1"), "--out", str(run),
                         "--overwrite")
        assert code == 2 and f"in use by another run (pid {first.pid}" in _one_sentence(err)
        code, err = _cli(capsys, "train", *_flags(data_dir, "train.epochs=500"), "--out", str(run),
                         "--resume")   # resuming a run that is still going is refused too
        assert code == 2 and "in use" in err
    finally:
        first.send_signal(signal.SIGTERM)
        _, first_err = first.communicate(timeout=60)
    assert first.returncode == 143 and "stopped by SIGTERM" in first_err, first_err
    kept = _rows(run)
    assert kept == list(range(1, len(kept) + 1))   # the stopped run, resumable
    # finished or stopped, it is never overwritten silently
    code, err = _cli(capsys, "train", *_flags(data_dir, "train.epochs=1"), "--out", str(run))
    assert code == 2 and "already holds a run" in _one_sentence(err) and "--overwrite" in err
    assert _rows(run) == kept
    assert _cli(capsys, "train", *_flags(data_dir, "train.epochs=1"), "--out", str(run),
                "--overwrite")[0] == 0
    assert _rows(run) == [1]
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 1


def test_a_start_that_never_finished_a_step_does_not_block_the_retry(tmp_path) -> None:  # noqa: ANN001
    """The Quickstart's first try failed before training (a missing data dir): the retry with the
    same --out must not be told the directory 'already holds a run'."""
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    (run / "checkpoints").mkdir()
    rundir.RunDir(run).close()
    assert not (run / "config.json").exists() and not (run / "checkpoints").exists()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')   # one finished step: a run to keep
    with pytest.raises(RunDirError, match=r"already holds a run \(config.json, metrics.jsonl\)"):
        rundir.RunDir(run).close()
    (run / "best.pt").write_bytes(b"x")   # train.patience's best epoch belongs to the run too
    rundir.RunDir(run, overwrite=True).close()
    assert not (run / "best.pt").exists() and not (run / "metrics.jsonl").exists()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


# -- 4. an epoch is one commit: crash anywhere, resume without duplicates --------------------------

class _Crash(BaseException):
    """Stands in for the process dying at one write (not an Exception: nothing catches it)."""


def test_a_crash_at_every_write_resumes_to_the_same_weights_and_rows(data_dir, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    cfg = _cfg(data_dir, "train.epochs=3")
    whole = train_reference(cfg, None, progress=False)["weights"]
    writes = ("write_json", "save", "log_metrics", "rewind_metrics")
    real = {name: getattr(rundir.RunDir, name) for name in writes}
    count = {"n": 0, "crash_at": -1}

    def counted(name: str):  # noqa: ANN202
        def write(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            count["n"] += 1
            if count["n"] == count["crash_at"]:
                raise _Crash(name)
            return real[name](self, *args, **kwargs)
        return write

    for name in writes:
        monkeypatch.setattr(rundir.RunDir, name, counted(name))
    train_reference(cfg, tmp_path / "count", progress=False)
    total = count["n"]
    assert total == 8   # config, 3 x (checkpoint, metrics line), summary
    for k in range(1, total + 1):
        run = tmp_path / f"crash-{k}"
        count.update(n=0, crash_at=k)
        with pytest.raises(_Crash):
            train_reference(cfg, run, progress=False)
        count.update(n=0, crash_at=-1)
        out = train_reference(cfg, run, resume=True, progress=False)
        assert _rows(run) == [1, 2, 3], (k, _rows(run))
        assert all(torch.equal(out["weights"][n], whole[n]) for n in whole), k
        assert json.loads((run / "summary.json").read_text())["epochs"] == 3


def test_runs_killed_at_random_moments_resume_to_the_uninterrupted_weights(data_dir, tmp_path) -> None:  # noqa: ANN001
    """The run-directory life cycle, fuzzed: start, SIGKILL at a random moment (after a random
    number of committed epochs, plus a random fraction of an epoch), resume, until it finishes."""
    longer = ["train.epochs=6", "train.train_limit=3000"]   # epochs long enough to land in
    cfg = _cfg(data_dir, *longer)
    whole = train_reference(cfg, None, progress=False)["weights"]
    rng = random.Random(23)
    for life in range(2):
        run, kills = tmp_path / f"life-{life}", 0
        while True:
            resume = ["--resume"] if (run / "config.json").exists() else []
            proc = _bpfree("train", *_flags(data_dir, *longer), "--out", str(run), *resume)
            have = _read(run / "metrics.jsonl").count("\n")
            # epochs committed before the kill; the first kill comes with two epochs left, so a
            # fast machine cannot finish the run before it lands
            last = 4 if kills == 0 else 6
            target = rng.randint(min(have, last), last) if have < 6 else 7
            def reached(proc=proc, metrics=run / "metrics.jsonl", target=target) -> bool:  # noqa: ANN001
                return _read(metrics).count("\n") >= target or proc.poll() is not None

            _wait_until("the kill point", reached, 120)
            with contextlib.suppress(subprocess.TimeoutExpired):   # a random moment in the epoch
                proc.wait(timeout=rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
            proc.communicate(timeout=60)
            if proc.returncode == 0:
                break
            assert proc.returncode == -signal.SIGKILL, proc.returncode
            assert kills < 15, "the run never finished"
        assert kills >= 1 and _rows(run) == [1, 2, 3, 4, 5, 6], (kills, _rows(run))
        final = load_checkpoint(run / "checkpoint.pt")["weights"]
        assert all(torch.equal(final[n], whole[n]) for n in whole), life


# -- 5. numbers that are not numbers ----------------------------------------------------------------

@pytest.mark.parametrize(("flags", "says"), [
    (["--lr", "nan"], "optim.lr = 'nan' is not a finite number"),
    (["--lr", "inf"], "optim.lr = 'inf' is not a finite number"),
    (["--set", "optim.lr=1e30"], "optim.lr = 1e+30 is far above any learning rate"),
    (["--set", "optim.momentum=1.5"], "optim.momentum = 1.5 must be below 1"),
    (["--set", "pipeline.rpc_timeout=inf"], "pipeline.rpc_timeout = 'inf' is not a finite number"),
    (["--set", "train.batch_size=100000000"], "train.batch_size = 100000000 is larger than the 600"),
])
@pytest.mark.parametrize("command", ["train", "pipeline"])
def test_non_finite_and_absurd_numbers_are_refused_by_field(command, flags, says, data_dir, capsys) -> None:  # noqa: ANN001
    code, err = _cli(capsys, command, *_flags(data_dir), *flags)
    assert code == 2 and says in _one_sentence(err), err


# -- 6. a corrupt latest round checkpoint -----------------------------------------------------------

def test_a_corrupt_latest_round_names_the_intact_one_and_how_to_resume(data_dir, tmp_path) -> None:  # noqa: ANN001
    from bpfree.server.coordinator import Coordinator
    from bpfree.server.reference import InProcessTransport

    cfg = _cfg(data_dir, "federation.clients=2", "federation.rounds=2")
    run = tmp_path / "run"
    Coordinator(cfg, run).run(InProcessTransport(cfg))
    latest = run / "checkpoints" / "round-0002.pt"
    latest.write_bytes(latest.read_bytes()[:500])   # cut short
    with pytest.raises(DataError) as caught:
        Coordinator(cfg, run, resume=True)
    message = str(caught.value)
    assert "round-0002.pt cannot be read" in message and "round 1 (round-0001.pt) is intact" in message
    assert f"move {latest}" in message
    latest.rename(tmp_path / "round-0002.bad")   # what the sentence says to do
    resumed = Coordinator(cfg, run, resume=True).run(InProcessTransport(cfg))
    assert resumed["rounds"] == 2 and _rows(run, "round") == [1, 2]


def test_the_run_dir_error_sentences_name_the_path_and_the_fix() -> None:
    import errno

    for code, says in [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"),
                       (errno.EACCES, "permission denied"), (errno.ENOTDIR, "a part of it is a file")]:
        line = rundir.os_error_sentence(OSError(code, os.strerror(code)), "/x/run", "writing")
        assert says in line and "/x/run" in line and "--out" in line
    with pytest.raises(RunDirError, match="is a file"):
        rundir.RunDir(Path(__file__))


def test_damaged_or_non_finite_checkpoints_are_refused_naming_the_file(data_dir, tmp_path, capsys) -> None:  # noqa: ANN001
    """Issue 38, case 3: 4,000 bytes overwritten inside a tensor of checkpoint.pt resumed to 0.098
    and exited 0; NaN in Adam's exp_avg was accepted too."""
    run = tmp_path / "run"
    flags = _flags(data_dir, "train.epochs=1")
    assert _cli(capsys, "train", *flags, "--out", str(run))[0] == 0
    good = (run / "checkpoint.pt").read_bytes()
    import zipfile

    with zipfile.ZipFile(run / "checkpoint.pt") as z:   # the largest tensor's bytes in the file
        info = max(z.infolist(), key=lambda i: i.file_size)
    at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
    damaged = bytearray(good)
    damaged[at:at + 4000] = bytes(4000)
    (run / "checkpoint.pt").write_bytes(bytes(damaged))
    code, err = _cli(capsys, "train", *flags, "--out", str(run), "--resume")
    assert code == 2 and "is damaged" in _one_sentence(err) and "checkpoint.pt" in err, err
    (run / "checkpoint.pt").write_bytes(good)
    state = load_checkpoint(run / "checkpoint.pt")
    exp_avg = next(v for k, v in _walk(state["optimizer"]) if k.endswith("exp_avg"))
    exp_avg.view(-1)[0] = float("nan")
    torch.save(state, run / "checkpoint.pt")
    code, err = _cli(capsys, "train", *flags, "--out", str(run), "--resume")
    assert code == 2 and "NaN or infinite" in _one_sentence(err) and "exp_avg" in err, err


def _walk(state, where: str = ""):  # noqa: ANN001, ANN202
    if isinstance(state, dict):
        for key, value in state.items():
            yield from _walk(value, f"{where}.{key}")
    elif isinstance(state, torch.Tensor):
        yield where, state
