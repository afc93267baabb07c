"""Faults a real cluster produces, done for real: processes killed by PID on loopback.

* a stage worker SIGKILLed while an epoch streams: the client notices within a deadline,
  respawns the stage, reconfigures and reruns the round from its starting weights, ending with
  exactly the weights of an undisturbed round; the reruns are bounded (pipeline.restarts);
* a federated client (its Flower ClientApp actor) SIGKILLed mid-round: the round aggregates the
  others, counts the failure, and the client contributes again the next round;
* the coordinator SIGKILLed mid-run with pipeline clients on a Dirichlet partition: its stage
  workers exit on their own, and --resume ends with the uninterrupted run's weights, every
  round's metrics line once;
* clients that crash or send a mis-shaped layer: left out and counted; a round with no usable
  reply stops the run with one sentence, keeping the last checkpoint;
* a checkpoint write killed part-way (by the kernel, at a fixed byte) or failing with ENOSPC
  leaves the previous checkpoint intact and loadable, and no temp file is taken for a checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from bpfree.client.executor import PipelineExecutor
from bpfree.client.supervisor import REPO_ROOT, worker_env
from bpfree.server.coordinator import latest_checkpoint
from bpfree_core.config import ExperimentConfig, load_config
from bpfree_core.errors import BpfreeError
from bpfree_core.federation.client import (
    InProcessExecutor,
    client_split,
    local_round,
    stack_template,
    train_split,
)
from bpfree_core.run.checkpoint import load_checkpoint, save_checkpoint
from bpfree_core.run.restarts import RoundFailedError

ROUND = ["model.hidden=100,100", "train.batch_size=100", "train.train_limit=1000",
         "train.test_limit=500", "train.threads=1", "train.seed=5", "federation.clients=1",
         "federation.rounds=2", "pipeline.stages=2", "pipeline.window=2", "pipeline.rpc_timeout=20",
         "pipeline.connect_timeout=30"]


def _cfg(data_dir: Path, *extra: str) -> ExperimentConfig:
    return load_config(None, [f"train.data_dir={data_dir}", *ROUND, *extra])


@pytest.fixture(autouse=True)
def one_thread():  # noqa: ANN201 - the in-process reference runs on one thread, as each stage does
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_until(what: str, check, timeout: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    delay = 0.02
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:g} s"
        time.sleep(delay)   # polling a real condition with a deadline
        delay = min(delay * 1.5, 0.25)


class StageKiller:
    """Wraps a PipelineExecutor: SIGKILLs stage `stage`'s process after `after` batches of an
    epoch have been handed to the pipeline, on each of the first `times` attempts."""

    def __init__(self, executor: PipelineExecutor, stage: int, after: int, times: int = 1,
                 spare: int = 0):
        self.inner, self.stage, self.after, self.times = executor, stage, after, times
        self.spare = spare               # epochs left undisturbed first
        self.killed: list[int] = []
        self.noticed: list[float] = []   # seconds from the kill to the driver's exception

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def train_epoch(self, packets, epoch: int, total_epochs: int) -> dict:  # noqa: ANN001
        t_kill: list[float] = []
        spared, self.spare = self.spare > 0, max(self.spare - 1, 0)

        def feed():  # noqa: ANN202
            for b, packet in enumerate(packets):
                if b == self.after and len(self.killed) < self.times and not spared:
                    proc = self.inner.pipeline.processes[self.stage]
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
                    self.killed.append(proc.pid)
                    t_kill.append(time.monotonic())
                yield packet

        try:
            return self.inner.train_epoch(feed(), epoch, total_epochs)
        except BpfreeError:
            if t_kill:
                self.noticed.append(time.monotonic() - t_kill[0])
            raise


def test_a_killed_stage_is_restarted_and_the_round_ends_exactly_as_undisturbed(data_dir: Path) -> None:
    cfg = _cfg(data_dir)
    part = client_split(cfg, train_split(cfg), 0)
    start = stack_template(cfg)
    want = local_round(InProcessExecutor(cfg), cfg, part, 0, 1, start)   # round 2: lr schedule on

    with PipelineExecutor(cfg) as executor:
        first_pids = [p.pid for p in executor.pipeline.processes]
        killer = StageKiller(executor, stage=1, after=5)
        got = local_round(killer, cfg, part, 0, 1, start)
        new_pids = [p.pid for p in executor.pipeline.processes]

        assert killer.killed == [first_pids[1]] and not _alive(first_pids[1])
        assert new_pids[0] == first_pids[0] and new_pids[1] != first_pids[1]   # only stage 1 respawned
        assert killer.noticed[0] < cfg.pipeline.rpc_timeout, killer.noticed
        assert got.metrics["restarts"] == 1.0
        assert list(got.weights) == list(want.weights)
        differ = [k for k in want.weights if not torch.equal(got.weights[k], want.weights[k])]
        assert not differ, f"the rerun round differs from an undisturbed one in {differ}"
        procs = list(executor.pipeline.processes)
    assert not any(_alive(p.pid) for p in procs), "close() left a restarted worker running"


def test_a_continual_ewc_stream_survives_a_killed_stage_exactly(data_dir: Path) -> None:
    """EWC on two stage workers; stage 1 is killed in task 2 (its layer then holds task 1's
    importance). The stage is respawned, the epoch's snapshot (weights, optimiser and EWC state)
    restored and the epoch rerun: the stream ends bit-identical to one process."""
    from bpfree.cli.continual import QUICK
    from bpfree_core.continual.stream import continual_config, run_continual

    cfg = continual_config(load_config(None, [
        *QUICK, f"train.data_dir={data_dir}", "model.algorithm=sffa", "train.threads=1",
        "continual.tasks=2", "continual.strategy=ewc", "continual.ewc_lambda=100",
        "pipeline.stages=2"]))
    want = run_continual(cfg, InProcessExecutor(cfg), progress=False)
    with PipelineExecutor(cfg) as executor:
        killer = StageKiller(executor, stage=1, after=3, spare=cfg.continual.epochs_per_task)
        got = run_continual(cfg, killer, progress=False)
        assert len(killer.killed) == 1 and not _alive(killer.killed[0])
    assert got["accuracy_matrix"] == want["accuracy_matrix"]
    differ = [k for k in want["weights"] if not torch.equal(got["weights"][k], want["weights"][k])]
    assert not differ, f"the rerun epoch differs from an undisturbed one in {differ}"


def test_restarts_are_bounded_and_exhaustion_says_which_setting(data_dir: Path) -> None:
    cfg = _cfg(data_dir, "pipeline.restarts=1")
    part = client_split(cfg, train_split(cfg), 0)
    with PipelineExecutor(cfg) as executor:
        killer = StageKiller(executor, stage=0, after=2, times=5)
        t0 = time.monotonic()
        with pytest.raises(RoundFailedError, match=r"failed 2 time\(s\).*pipeline.restarts = 1"):
            local_round(killer, cfg, part, 0, 0, stack_template(cfg))
        assert len(killer.killed) == 2 and time.monotonic() - t0 < 120


# -- checkpoints --------------------------------------------------------------------------------

_WRITER = """
import resource, signal, sys, torch
from pathlib import Path
from bpfree_core.run.checkpoint import save_checkpoint
# The kernel kills this process (SIGXFSZ) once a file it writes passes 16 MB: a crash in the
# middle of writing the 40 MB checkpoint, at a point that never depends on timing.
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)   # Python ignores it; restore the kernel's kill
save_checkpoint(Path(sys.argv[1]), {"round": 2, "weights": {"w": torch.ones(10_000_000)}})
print("done", flush=True)
"""


def test_a_checkpoint_write_killed_part_way_leaves_the_old_one_intact(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "round-0001.pt"
    old = {"round": 1, "weights": {"w": torch.arange(10.0)}}
    save_checkpoint(path, old)
    before = path.read_bytes()
    # A real process writes a 40 MB checkpoint over it and is killed by the kernel part-way.
    done = subprocess.run([sys.executable, "-c", _WRITER, str(path)], cwd=REPO_ROOT,
                          env=worker_env(1), capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGXFSZ, (done.returncode, done.stderr[-2000:])
    assert "done" not in done.stdout
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["weights"]["w"], old["weights"]["w"])
    junk = list(path.parent.glob(".*.tmp"))
    assert [p.stat().st_size for p in junk] == [16 << 20], "not killed part-way through the write"
    assert latest_checkpoint(tmp_path) == path   # the torn temp file is never taken for a checkpoint


def test_a_failing_write_raises_and_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import bpfree_core.run.checkpoint as ck

    path = tmp_path / "round-0001.pt"
    save_checkpoint(path, {"round": 1})
    real_fdopen = os.fdopen

    class Full:  # a file that fails after 1000 bytes, as a full disk does
        def __init__(self, fh):  # noqa: ANN001
            self.fh, self.n = fh, 0

        def write(self, data: bytes) -> int:
            if self.n + len(data) > 1000:
                self.fh.write(data[: 1000 - self.n])
                raise OSError(28, "No space left on device")
            self.n += len(data)
            return self.fh.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.fh, name)

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

    monkeypatch.setattr(ck.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"round": 2, "weights": torch.zeros(10_000)})
    monkeypatch.undo()
    assert load_checkpoint(path) == {"round": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-0001.pt"]


# -- whole processes: the coordinator and the clients --------------------------------------------

FED = ["train.train_limit=2000", "train.test_limit=500", "model.hidden=100,100",
       "model.algorithm=symba", "train.threads=1", "federation.clients=2", "pipeline.stages=2",
       "federation.local_epochs=1", "train.batch_size=100", "train.jitter=0",
       "objective.vote_first=false"]   # not simulate's default recipe


def _bpfree(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bpfree", *args],
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=REPO_ROOT)


def _flag(pid: int, flag: str) -> Path:
    """The value of `flag` on process `pid`'s command line."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\x00")
    return Path(args[args.index(flag) + 1])


def _with_marker(marker: str) -> list[tuple[int, str]]:
    """(pid, NUL-separated command line) of live processes whose command line has `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and _alive(int(entry.name)):
                found.append((int(entry.name), cmd))
    return found


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"-m\x00bpfree\x00worker" in cmd:
                found.append(int(entry.name))
    return found


def test_coordinator_killed_mid_run_workers_exit_and_resume_matches(data_dir: Path, tmp_path: Path) -> None:
    """On a non-iid (Dirichlet) partition, so that resuming must rebuild the same client shards."""
    from bpfree.server.reference import federated_reference

    run = tmp_path / "run"
    flags = ["--data-dir", str(data_dir), *sum((["--set", s] for s in FED), []), "--rounds", "2",
             "--partition", "dirichlet:0.5", "--executor", "pipeline", "--no-progress"]
    token = {"BPFREE_TOKEN": "tok-7d1-never-on-disk"}   # the stage workers require it
    crashed = _bpfree("simulate", *flags, "--out", str(run),   # round 2 waits to be killed
                      env={**token, "BPFREE_CLIENT_MODS": "tests.flower_mods:hold_round_2"})
    first = run / "checkpoints" / "round-0001.pt"
    try:
        _wait_until("round 1's checkpoint", lambda: first.exists() or crashed.poll() is not None, 300)
        workers = _children(crashed.pid)
        scratch = {_flag(pid, "--scratch-dir") for pid in workers}   # each client's temp dir
        flower = _with_marker(str(run / "logs" / "superlink.log"))   # the guarded SuperLink
        os.killpg(crashed.pid, signal.SIGKILL)   # the coordinator and the Ray processes it started
        out = crashed.communicate(timeout=60)[0]
    finally:
        if crashed.poll() is None:
            os.killpg(crashed.pid, signal.SIGKILL)
    assert first.exists(), out[-3000:]
    assert latest_checkpoint(run) != run / "checkpoints" / "round-0002.pt", "finished before the kill"
    # Its stage workers (own sessions, untouched by the kill) notice their launcher is gone.
    assert len(workers) == 4, workers
    _wait_until("the orphaned stage workers exiting", lambda: not any(map(_alive, workers)), 30)
    assert len(scratch) == 2, scratch   # one per client: its workers' port files (and logs)
    _wait_until("the launcher's scratch dirs going", lambda: not any(d.exists() for d in scratch), 30)
    # Flower's SuperLink, flwr-simulation and Ray go too, and so does the private FLWR_HOME.
    assert flower, "no guarded SuperLink was found"
    home = next(Path(cmd.split("--remove\x00", 1)[1].split("\x00", 1)[0])
                for _, cmd in flower if "--remove\x00" in cmd)
    _wait_until("the SuperLink and everything below it exiting",
                lambda: not _with_marker(str(run / "logs" / "superlink.log")) and not home.exists(), 60)

    resumed = _bpfree("simulate", "--resume", str(run), "--no-progress", env=token)
    out = resumed.communicate(timeout=400)[0]
    assert resumed.returncode == 0, out[-3000:]
    rounds = [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["partition"] == "dirichlet:0.5"
    assert (run / "accuracy.png").stat().st_size > 1000   # the plot covers both runs' rounds
    leaks = [str(p) for p in run.rglob("*") if p.is_file() and b"tok-7d1" in p.read_bytes()]
    assert not leaks and "tok-7d1" not in out, leaks   # the token came from $BPFREE_TOKEN only
    cfg = load_config(None, [f"train.data_dir={data_dir}", *FED, "federation.rounds=2",
                             "federation.partition=dirichlet:0.5"])
    reference = federated_reference(cfg)
    final = load_checkpoint(run / "checkpoints" / "round-0002.pt")["weights"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_a_killed_client_app_is_left_out_and_the_run_goes_on(data_dir: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    import threading

    from bpfree.server.simulate import simulate

    # Two clients on two ClientApp actors (2 cores): killing client 1's actor fails its message.
    # Flower's simulation runtime does not restart a dead actor, and its actors are not tied to
    # nodes: in every later round the one message that lands on the dead actor fails (client 0's
    # or client 1's, a race), is counted, and the run goes on with the other client
    # (federation.min_clients = 1). Stage worker deaths, by contrast, are recovered inside the
    # ClientApp (pipeline.restarts: test_a_killed_stage_is_restarted_...).
    cfg = load_config(None, [f"train.data_dir={data_dir}", *FED, "federation.clients=2",
                             "federation.rounds=2", "federation.executor=inprocess",
                             "federation.min_clients=1"])
    folder = tmp_path / "pids"
    folder.mkdir()
    monkeypatch.setenv("BPFREE_TEST_PIDS", str(folder))
    killed: list[int] = []

    def kill_when_ready() -> None:
        marker = folder / "round0-client1.0.pid"
        _wait_until("client 1 starting round 1", marker.exists, 240)
        pid = int(marker.read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_when_ready, daemon=True)
    killer.start()
    summary = simulate(cfg, tmp_path / "run", client_mods=["tests.flower_mods:kill_client_1_in_round_1"])
    killer.join(timeout=5)
    assert len(killed) == 1, killed
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(records[0]["client_metrics"]) == {"0"}   # client 1 died in round 1
    for record in records:
        assert record["clients"] == {"sent": 2, "accepted": 1, "failed": 1, "timed_out": 0,
                                     "rejected": 0}
        assert len(record["client_metrics"]) == 1 and set(record["client_metrics"]) <= {"0", "1"}
    assert summary["rounds"] == 2
    assert summary["replies"] == {"accepted": 2, "failed": 2, "timed_out": 0, "rejected": 0}


# -- bad configs and missing data: one sentence naming the field or file, before anything starts ---

@pytest.mark.parametrize(("args", "says"), [
    (["--data-dir", "/nonexistent-bpfree"], ["/nonexistent-bpfree does not exist", "--data-dir"]),
    (["--data-dir", "{empty}"], ["mnist files missing in", "train-images-idx3-ubyte.gz"]),
    (["--partition", "zipf:3"], ["federation.partition = 'zipf:3'", "dirichlet:ALPHA"]),
    (["--stages", "5", "--set", "model.hidden=30,20"], ["pipeline.stages = 5", "at most 2 stages"]),
    (["--clients", "2", "--min-clients", "3"], ["federation.min_clients = 3", "federation.clients"]),
    (["--set", "pipeline.restarts=-1"], ["pipeline.restarts = -1", ">= 0"]),
    (["--resume", "{empty}"], ["no config.json there"]),
])
def test_bad_simulate_input_fails_fast_with_one_clear_sentence(args, says, data_dir, tmp_path,  # noqa: ANN001
                                                                capsys) -> None:  # noqa: ANN001
    from bpfree.cli import main

    args = [a.replace("{empty}", str(tmp_path)) for a in args]
    base = [] if "--data-dir" in args or "--resume" in args else ["--data-dir", str(data_dir)]
    t0 = time.monotonic()
    assert main(["simulate", *base, *args, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert time.monotonic() - t0 < 30   # refused before Ray, Flower or any worker started
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bpfree simulate: error: ") and "Traceback" not in err
    for s in says:
        assert s in err, err


def test_bad_replies_are_left_out_and_counted_and_a_round_without_any_fails_in_one_sentence(
        data_dir: Path, tmp_path: Path) -> None:
    # tests/flower_mods.py: client 1 sends a mis-shaped layer and client 2 crashes, every round;
    # from round 2 on client 0 crashes too. With federation.min_clients = 1, round 1 aggregates
    # client 0's reply alone and counts the other two; round 2 has no usable reply, so the run
    # must fail loudly, in one sentence, keeping round 1's checkpoint.
    run, replies = tmp_path / "run", tmp_path / "replies"
    flags = ["--data-dir", str(data_dir), *sum((["--set", s] for s in FED), []), "--rounds", "2",
             "--clients", "3", "--set", "federation.min_clients=1", "--executor", "inprocess",
             "--no-plot", "--no-progress", "--out", str(run)]
    mods = "tests.flower_mods:record_replies,tests.flower_mods:sabotage"
    failed = _bpfree("simulate", *flags, env={"BPFREE_CLIENT_MODS": mods,
                                              "BPFREE_TEST_REPLIES": str(replies)})
    out = failed.communicate(timeout=300)[0]
    assert failed.returncode == 2, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("bpfree simulate: error: the federated run failed: AggregationError: "
                           "round 2: only 0 usable replies of 3 sent (2 failed, 0 timed out, "
                           "1 rejected)"), out[-3000:]
    assert "Traceback" not in out and (run / "logs" / "flwr.log").is_file()

    (record,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert record["round"] == 1 and record["clients"] == {
        "sent": 3, "accepted": 1, "failed": 1, "timed_out": 0, "rejected": 1}
    # Only client 0's reply went into round 1's aggregate (the mean of one reply is that reply).
    only = torch.load(replies / "round0-client0.pt")["weights"]
    kept = load_checkpoint(run / "checkpoints" / "round-0001.pt")["weights"]
    assert all(torch.equal(kept[k], only[k]) for k in kept if kept[k].is_floating_point())
    assert not (run / "checkpoints" / "round-0002.pt").exists()


# -- unreachable and malformed addresses, taken ports: named, quickly --------------------------------

def _closed_port() -> int:
    import socket

    with socket.socket() as s:   # bound, then closed: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_workers_that_refuse_connections_are_named_as_refused_before_the_connect_timeout(data_dir):
    ports = f"127.0.0.1:{_closed_port()},127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    run = _bpfree("pipeline", "--data-dir", str(data_dir), "--workers", ports, "--set",
                  "pipeline.connect_timeout=90", "--set", "model.hidden=30,20")
    out = run.communicate(timeout=120)[0]
    assert run.returncode == 2, out[-2000:]
    assert "connection was refused" in out and ports.split(",")[0] in out, out[-2000:]
    assert time.monotonic() - t0 < 60, "waited for the whole connect timeout"


@pytest.mark.parametrize("workers", ["localhost", "127.0.0.1:70000,127.0.0.1:7001", "host:port"])
def test_malformed_worker_addresses_are_refused_before_anything_starts(workers, data_dir):
    run = _bpfree("pipeline", "--data-dir", str(data_dir), "--workers", workers)
    out = run.communicate(timeout=60)[0]
    assert run.returncode == 2, out[-2000:]
    assert "is not HOST:PORT (e.g. 127.0.0.1:7001" in out.strip().splitlines()[-1], out[-2000:]


def test_a_taken_port_is_named_and_grpc_core_stays_quiet():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = _bpfree("worker", "--listen", f"127.0.0.1:{port}")
        out = run.communicate(timeout=60)[0]
    assert run.returncode == 2, out[-2000:]
    assert f"port {port} on 127.0.0.1 is already taken" in out, out[-2000:]
    assert "add_port" not in out and "Traceback" not in out, out[-2000:]


# -- bpfree pipeline: a dead stage is restarted and its epoch rerun; a dead driver resumes -------

# 10000 images: an epoch long enough (~2 s) that a kill sent when epoch 1's checkpoint appears
# lands in epoch 2.
PIPE = ["train.train_limit=10000", "train.test_limit=500", "model.hidden=200,200",
        "model.algorithm=symba", "train.threads=1", "pipeline.stages=2", "train.epochs=3",
        "optim.lr=2e-3", "train.jitter=0", "objective.vote_first=false"]   # not the CLI's defaults


@functools.cache   # two tests compare with it
def _pipeline_reference(data_dir: Path) -> dict:
    from bpfree_core.run.trainer import train_reference

    return train_reference(load_config(None, [f"train.data_dir={data_dir}", *PIPE]),
                           progress=False)["weights"]


def _pipeline(run: Path, data_dir: Path, *extra: str) -> subprocess.Popen:
    return _bpfree("pipeline", "--data-dir", str(data_dir), "--out", str(run), "--no-progress",
                   *sum((["--set", s] for s in PIPE), []), *extra)


def test_a_stalled_stage_is_reported_then_killed_restarted_and_the_run_ends_exactly(
        data_dir: Path, tmp_path: Path) -> None:
    """`bpfree pipeline`: stage 1 is SIGSTOPped early in epoch 2, so the driver's log names it as
    not answering; then it is SIGKILLed, respawned, and epoch 2 rerun: the weights are the
    undisturbed reference's."""
    run, log_file = tmp_path / "run", tmp_path / "pipeline.log"
    with open(log_file, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bpfree", "pipeline", "--data-dir", str(data_dir), "--out",
             str(run), "--no-progress", *sum((["--set", s] for s in PIPE), [])],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    victim = None
    try:
        _wait_until("epoch 1's checkpoint", lambda: (run / "checkpoint.pt").exists()
                    or proc.poll() is not None, 300)
        victim = next(p for p in _children(proc.pid) if _flag(p, "--port-file").name == "stage1.port")
        os.kill(victim, signal.SIGSTOP)   # early in epoch 2
        _wait_until("the stall warning", lambda: "made no progress" in log_file.read_text(), 60)
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, log_file.read_text()[-3000:]
    finally:
        if victim is not None and _alive(victim):
            os.kill(victim, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log_file.read_text()
    warning = next(x for x in text.splitlines() if "made no progress" in x)
    assert "not answering: stage 1 at 127.0.0.1:" in warning, warning
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["reruns"]) for r in records] == [0, 1, 0], text[-3000:]
    assert records[1]["reruns"][0]["restarted_stages"] == [1]
    final = load_checkpoint(run / "weights.pt")["weights"]
    reference = _pipeline_reference(data_dir)
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_a_killed_pipeline_driver_resumes_to_the_same_weights(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    crashed = _pipeline(run, data_dir)
    try:
        _wait_until("epoch 1's checkpoint", lambda: (run / "checkpoint.pt").exists()
                    or crashed.poll() is not None, 300)
        workers = _children(crashed.pid)
        os.killpg(crashed.pid, signal.SIGKILL)
        crashed.communicate(timeout=60)
    finally:
        if crashed.poll() is None:
            os.killpg(crashed.pid, signal.SIGKILL)
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] < 2, "finished before the kill"
    _wait_until("the orphaned stage workers exiting", lambda: not any(map(_alive, workers)), 30)
    resumed = _pipeline(run, data_dir, "--resume")
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-3000:]
    final = load_checkpoint(run / "weights.pt")["weights"]
    reference = _pipeline_reference(data_dir)
    assert all(torch.equal(final[k], reference[k]) for k in reference)




def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _ray_sessions() -> set[Path]:
    return set(Path("/tmp/ray").glob("session_*")) if Path("/tmp/ray").is_dir() else set()


def test_simulate_restarts_a_killed_stage_worker_and_the_round_ends_exactly(data_dir: Path,
                                                                           tmp_path: Path) -> None:
    """bpfree simulate launched its clients' stage workers, so it respawns one that dies, on its
    port; the ClientApp reconnects and reruns the round, and the run ends with the reference's
    weights. No Ray session directory is left in /tmp/ray."""
    import threading

    from bpfree.server.reference import federated_reference
    from bpfree.server.simulate import simulate

    cfg = load_config(None, [f"train.data_dir={data_dir}", *FED, "federation.rounds=2",
                             "federation.local_epochs=6", "federation.executor=pipeline"])
    run, sessions = tmp_path / "run", _ray_sessions()
    stage_log = run / "logs" / "client0" / "stage1.log"
    killed: list[int] = []

    def kill_client0_stage1() -> None:
        _wait_until("client 0's stage 1 being configured", lambda: "configured run" in _read(stage_log),
                    240)
        for pid in _children(os.getpid()):   # the worker whose output goes to that log
            with __import__("contextlib").suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/1") == str(stage_log.resolve()):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

    killer = threading.Thread(target=kill_client0_stage1, daemon=True)
    killer.start()
    summary = simulate(cfg, run)
    killer.join(timeout=5)
    assert len(killed) == 1, killed
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"]["accepted"] for r in records] == [2, 2]
    assert records[0]["client_metrics"]["0"]["restarts"] == 1.0
    assert "restarted as pid" not in _read(stage_log)   # respawned by simulate, on the same port
    final = summary["weights"]
    reference = federated_reference(cfg)
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    assert _ray_sessions() <= sessions, _ray_sessions() - sessions


def test_sigterm_stops_simulate_cleanly_in_one_line_and_the_run_resumes(data_dir: Path,
                                                                       tmp_path: Path) -> None:
    run = tmp_path / "run"
    flags = ["--data-dir", str(data_dir), *sum((["--set", s] for s in FED), []), "--rounds", "3",
             "--executor", "inprocess", "--no-progress", "--no-plot"]
    proc = _bpfree("simulate", *flags, "--out", str(run))
    try:
        _wait_until("round 1's checkpoint", lambda: (run / "checkpoints" / "round-0001.pt").exists()
                    or proc.poll() is not None, 300)
        below = _with_marker(str(run / "logs" / "superlink.log"))
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, out[-3000:]
    bpfree_lines = [x for x in out.splitlines() if x.startswith("bpfree simulate:")]
    assert bpfree_lines == ["bpfree simulate: stopped by SIGTERM; everything it started is stopped "
                            "(a run with --out continues with --resume)"], out[-3000:]
    assert "Traceback" not in out
    assert below and not _with_marker(str(run / "logs" / "superlink.log"))   # all stopped by PID
    resumed = _bpfree("simulate", "--resume", str(run), "--no-progress", "--no-plot")
    out = resumed.communicate(timeout=400)[0]
    assert resumed.returncode == 0, out[-3000:]
    rounds = [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3], rounds
