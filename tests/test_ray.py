"""The Ray backend on a real 2-node Ray cluster on this machine, started with deploy/ray/head.sh
and worker.sh (`ray start --block`, stopped by PID).

All Ray tests live in this file so the cluster start-up (~20 s on 2 cores) is paid once.
The pure placement arithmetic and device choice are tested first, without Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bpfree.client.ray_stage import stage_device
from bpfree.server.ray_backend import NAMESPACE, PlacementError, check_capacity, simulate_ray
from bpfree_core.config import ExperimentConfig
from bpfree_core.errors import ConfigError, PeerUnavailableError

REPO = Path(__file__).resolve().parents[1]
START_DEADLINE = 90.0   # seconds for `ray start --head` to come up on a busy 2-core box


def small_cfg(data_dir: Path, *overrides: str) -> ExperimentConfig:
    return ExperimentConfig().with_overrides([
        "model.algorithm=symba", "model.hidden=[120,120]", "federation.clients=2",
        "pipeline.stages=2", "federation.rounds=1", "train.train_limit=3000",
        "train.test_limit=1000", "train.threads=1", "pipeline.stage_num_cpus=0.5",
        "pipeline.bind_host=127.0.0.1", "federation.backend=ray", f"train.data_dir={data_dir}",
        *overrides])


# -- without Ray ----------------------------------------------------------------------------------
def test_device_comes_from_rays_assignment() -> None:
    assert stage_device([], cuda_available=True) == "cpu"      # no GPU reserved: CPU stage
    assert stage_device([3], cuda_available=True) == "cuda:0"  # Ray narrows CUDA_VISIBLE_DEVICES
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        stage_device(["0"], cuda_available=False)


def test_capacity_check_names_what_is_missing(tmp_path: Path) -> None:
    cpu_node, gpu_node = {"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}
    gpu = small_cfg(tmp_path, "pipeline.stage_num_gpus=1")
    with pytest.raises(PlacementError, match=r"needs 4 GPU .* cluster has 0 GPU"):
        check_capacity(gpu, [cpu_node, cpu_node])
    check_capacity(gpu, [gpu_node] * 4)
    with pytest.raises(PlacementError, match="STRICT_PACK"):   # 2 GPUs needed on one node
        check_capacity(small_cfg(tmp_path, "pipeline.stage_num_gpus=1",
                                 "federation.placement=STRICT_PACK"), [gpu_node] * 4)
    with pytest.raises(PlacementError, match="no node has that"):
        check_capacity(small_cfg(tmp_path, "pipeline.stage_num_cpus=16"), [cpu_node] * 8)
    with pytest.raises(PlacementError, match="STRICT_SPREAD"):
        check_capacity(small_cfg(tmp_path, "federation.placement=STRICT_SPREAD"), [cpu_node])


def test_ray_config_errors() -> None:
    with pytest.raises(ConfigError, match="placement"):
        ExperimentConfig().with_overrides(["federation.placement=ROUND_ROBIN"])
    with pytest.raises(ConfigError, match="both 0"):
        ExperimentConfig().with_overrides(["pipeline.stage_num_cpus=0"])
    with pytest.raises(ConfigError, match="whole number"):
        ExperimentConfig().with_overrides(["pipeline.stage_num_gpus=1.5"])
    from bpfree.server.ray_backend import check_ray_config

    with pytest.raises(ConfigError, match="stage_num_gpus = 0 asks for none"):   # was: CPU, a log line
        check_ray_config(ExperimentConfig().with_overrides(["train.device=cuda"]))


def test_unreachable_head_fails_fast(tmp_path: Path, data_dir: Path) -> None:
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = small_cfg(data_dir, f"federation.ray_address=127.0.0.1:{port}")
    with pytest.raises(PeerUnavailableError, match="does not answer"):
        simulate_ray(cfg, tmp_path / "run")


# -- a real local Ray cluster -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)   # --block: SIGTERM to this PID stops the whole head
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)


def _start_node(script: str, args: list[str], log_path: Path) -> subprocess.Popen:
    """Run deploy/ray/<script> (it execs `ray start --block`) and wait for its readiness line."""
    env = {**os.environ, "PYTHON": sys.executable}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", str(REPO / "deploy" / "ray" / script), *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + START_DEADLINE
    while "will now block" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None:
            pytest.fail(f"{script} exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"{script} not ready in {START_DEADLINE} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)   # polling the node's log for its readiness line, with a deadline
    return proc


@dataclass(frozen=True)
class Cluster:
    address: str   # the head's HOST:PORT
    tls_ca: str    # the CA that signed every node's stage certificate (nodes started with --certs)

    def cfg(self, data_dir: Path, *overrides: str) -> ExperimentConfig:
        """A small run on this cluster: TLS to every stage, like a real deployment."""
        # A generous start deadline: a cold node spawns one Python process per actor, which took
        # over 60 s on a loaded 2-core CI box. Tests that want a short one override it.
        return small_cfg(data_dir, f"pipeline.tls_ca={self.tls_ca}", "pipeline.connect_timeout=180",
                         *overrides)


@pytest.fixture(scope="module")
def ray_cluster() -> Cluster:
    """A 2-node Ray cluster on this machine (deploy/ray/head.sh + worker.sh --certs, 1 CPU each),
    this process connected to it. Module scope: Ray stays out of the other test files' way
    (Flower's simulation starts its own)."""
    import ray

    if ray.is_initialized():   # an earlier test's Ray (e.g. a Flower simulation) is done with
        ray.shutdown()
    # Short temp dirs: Ray's unix socket paths live under them.
    tmps = [tempfile.mkdtemp(prefix="bprh-", dir="/tmp"), tempfile.mkdtemp(prefix="bprw-", dir="/tmp")]
    port = _free_port()
    address = f"127.0.0.1:{port}"
    certs = Path(tmps[0]) / "certs"   # stages bind 127.0.0.1 here, so that is the name to certify
    subprocess.run(["bash", str(REPO / "deploy" / "make-certs.sh"), str(certs), "IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(_start_node("head.sh", [
            "--port", str(port), "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", tmps[0],
            "--certs", str(certs), "--", f"--ray-client-server-port={_free_port()}"],
            Path(tmps[0]) / "node.log"))
        nodes.append(_start_node("worker.sh", [
            "--address", address, "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", tmps[1],
            "--certs", str(certs)], Path(tmps[1]) / "node.log"))
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        deadline = time.monotonic() + START_DEADLINE
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            assert time.monotonic() < deadline, "the worker node did not register with the head"
            time.sleep(0.2)   # polling the GCS node table, with a deadline
        yield Cluster(address, str(certs / "ca.crt"))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(nodes):
            _stop(proc)
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)


def _our_actors() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == NAMESPACE]


def _live_groups() -> list[str]:
    from ray.util import placement_group_table

    return [g["name"] for g in placement_group_table().values() if g["state"] != "REMOVED"]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def ray_run(ray_cluster: Cluster, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-client x 2-stage round on the cluster (shared by the tests that read its result)."""
    cfg = ray_cluster.cfg(data_dir, "pipeline.token=t0ken", "federation.placement=STRICT_SPREAD")
    run_dir = tmp_path_factory.mktemp("ray-run")
    summary = simulate_ray(cfg, run_dir)
    return {"cfg": cfg, "summary": summary, "run_dir": run_dir}


def test_two_clients_two_stages_learn_on_ray(ray_run: dict) -> None:
    summary = ray_run["summary"]
    assert summary["backend"] == "ray" and summary["rounds"] == 1
    assert summary["replies"]["accepted"] == 2
    assert summary["test_accuracy"] > 0.3, summary   # chance is 0.1
    actors = [a for stages in summary["stage_actors"].values() for a in stages]
    assert len(actors) == 4
    assert {a["device"] for a in actors} == {"cpu"}           # no GPU reserved -> CPU
    assert all(a["address"].startswith("127.0.0.1:") for a in actors)
    assert all(a["torch_threads"] == 1 for a in actors)
    assert all(a["tls"] for a in actors)                       # certificates from `ray start` env
    assert len({a["pid"] for a in actors}) == 4                # one process per stage
    for stages in summary["stage_actors"].values():            # STRICT_SPREAD: one node per stage
        assert len({a["node_id"] for a in stages}) == 2
    saved = json.loads((ray_run["run_dir"] / "ray_stages.json").read_text())
    assert [a["address"] for a in saved["0"]] == [a["address"] for a in summary["stage_actors"]["0"]]


def test_nothing_is_left_behind(ray_run: dict) -> None:
    assert _our_actors() == []
    assert _live_groups() == []
    pids = [a["pid"] for stages in ray_run["summary"]["stage_actors"].values() for a in stages]
    deadline = time.monotonic() + 15
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)   # ray.kill ends the worker processes asynchronously
    assert all(_gone(p) for p in pids), "stage actor processes still running"


def test_ray_backend_equals_in_process_reference(ray_run: dict) -> None:
    from bpfree.server.reference import federated_reference

    reference = federated_reference(ray_run["cfg"])
    weights = ray_run["summary"]["weights"]
    assert weights.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(weights[k], reference[k])]
    assert not different, f"weights differ from the in-process reference: {different}"


def test_gpu_stage_on_gpu_less_cluster_fails_at_placement(ray_cluster: Cluster, data_dir: Path,
                                                          tmp_path: Path) -> None:
    before = _live_groups()
    cfg = ray_cluster.cfg(data_dir, "pipeline.stage_num_gpus=1")
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=r"needs 4 GPU .* cluster has 0 GPU"):
        simulate_ray(cfg, tmp_path / "run")
    assert time.monotonic() - t0 < 30   # refused up front, not after a placement wait
    assert _live_groups() == before and _our_actors() == []


def test_placement_that_does_not_fit_in_time_fails_and_cleans_up(ray_cluster: Cluster,
                                                                 data_dir: Path,
                                                                 tmp_path: Path) -> None:
    from ray.util.placement_group import placement_group, remove_placement_group

    blocker = placement_group([{"CPU": 1.0}] * 2, strategy="SPREAD", name="test-blocker")  # all
    try:
        assert blocker.wait(timeout_seconds=30)
        cfg = ray_cluster.cfg(data_dir, "pipeline.connect_timeout=3")
        with pytest.raises(PlacementError, match=r"could not place .* free now \{0 CPU\} of \{2 CPU\}"):
            simulate_ray(cfg, tmp_path / "run")
        assert _live_groups() == ["test-blocker"] and _our_actors() == []
    finally:
        remove_placement_group(blocker)


def test_actors_that_start_too_slowly_are_named_and_cleaned_up(ray_cluster: Cluster, data_dir: Path,
                                                               tmp_path: Path) -> None:
    # Placing takes milliseconds; starting a Python process per actor takes seconds.
    cfg = ray_cluster.cfg(data_dir, "pipeline.connect_timeout=0.01")
    with pytest.raises(PeerUnavailableError, match=r"4 of the 4 stage actors .* did not start "
                       r"serving within [\d.]+ s \(bpfree-\w+-c0-s0, .*raise pipeline.connect_timeout"):
        simulate_ray(cfg, tmp_path / "run")
    assert _live_groups() == [] and _our_actors() == []


def test_actor_that_cannot_serve_fails_and_cleans_up(ray_cluster: Cluster, data_dir: Path,
                                                     tmp_path: Path) -> None:
    # 203.0.113.7 (TEST-NET-3) is no address of this machine: the stage cannot bind it.
    cfg = ray_cluster.cfg(data_dir, "pipeline.bind_host=203.0.113.7")
    with pytest.raises(PeerUnavailableError, match="cannot listen on 203.0.113.7"):
        simulate_ray(cfg, tmp_path / "run")
    assert _live_groups() == [] and _our_actors() == []


def test_cli_simulate_joins_the_cluster(ray_cluster: Cluster, data_dir: Path, tmp_path: Path) -> None:
    """`bpfree simulate --backend ray --address HOST:PORT --placement STRICT_PACK`, as a user runs it."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "bpfree", "simulate", "--backend", "ray", "--address",
         ray_cluster.address,
         "--placement", "STRICT_PACK", "--clients", "2", "--stages", "2", "--rounds", "1",
         "--set", "model.hidden=[60,60]", "--set", "train.train_limit=1000",
         "--set", "federation.local_epochs=1", "--set", "train.batch_size=100",
         "--set", "train.jitter=0", "--set", "objective.vote_first=false",
         "--set", "train.test_limit=200", "--set", "pipeline.stage_num_cpus=0.5",
         "--set", "pipeline.bind_host=127.0.0.1", "--set", f"train.data_dir={data_dir}",
         "--set", f"pipeline.tls_ca={ray_cluster.tls_ca}", "--set", "pipeline.connect_timeout=180",
         "--out", str(out), "--no-plot", "--no-progress", "--json"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["backend"] == "ray" and summary["replies"]["accepted"] == 2
    assert json.loads((out / "config.json").read_text())["federation"]["placement"] == "STRICT_PACK"
    stages = json.loads((out / "ray_stages.json").read_text())
    assert all(len({a["node_id"] for a in client}) == 1 for client in stages.values())  # packed
    assert (out / "ray_stages.json").is_file() and (out / "checkpoints" / "round-0001.pt").is_file()
    assert _our_actors() == [] and _live_groups() == []


def test_cluster_yaml_is_a_valid_ray_up_config() -> None:
    """deploy/ray/cluster.yaml passes Ray's own cluster-config schema (what `ray up` checks)."""
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "deploy" / "ray" / "cluster.yaml").read_text()))
    validate_config(config)
    assert config["provider"]["type"] == "local"
    assert all("RAY_USAGE_STATS_ENABLED=0" in c for c in (config["head_start_ray_commands"][-1],
                                                          config["worker_start_ray_commands"][-1]))


def test_a_dead_stage_fails_only_its_client(ray_cluster: Cluster, data_dir: Path) -> None:
    """Kill one of client 1's stage actors: client 1 is counted failed, client 0's reply is
    aggregated (federation.min_clients = 1), and the run still removes everything."""
    import ray

    from bpfree.server.coordinator import Coordinator
    from bpfree.server.ray_backend import RayTransport, StageCluster

    small = ("federation.min_clients=1", "model.hidden=[60,60]", "train.train_limit=1000",
             "train.test_limit=200")
    cfg = ray_cluster.cfg(data_dir, *small, "pipeline.connect_timeout=5")  # the dead peer: fail fast
    with StageCluster(ray_cluster.cfg(data_dir, *small)) as cluster:   # starting: the long deadline
        victim = ray.get_actor(cluster.infos[1][1]["name"], namespace=NAMESPACE)
        ray.kill(victim, no_restart=True)
        summary = Coordinator(cfg).run(RayTransport(cfg, cluster.addresses))
    assert summary["replies"] == {"accepted": 1, "failed": 1, "timed_out": 0, "rejected": 0}
    assert summary["test_accuracy"] > 0.2
    assert _our_actors() == [] and _live_groups() == []
