"""bpfree across separate hosts: each process in its own network namespace, links shaped, TLS with
certificates for the hosts' addresses (deploy/make-certs.sh), the shared token on every RPC.

* a pipeline: S stage workers on their own hosts, the driver on another, ends bit-identical to
  `bpfree train`;
* a federation: the SuperLink on one host, K SuperNodes on others, their stage workers on others
  (deploy/superlink.sh, deploy/supernode.sh), equals the in-process federated reference;
* each site's own data: two SuperNodes with a dataset each (supernode.sh --dataset), trained and
  evaluated there, equals the in-process run on those datasets;
* Ray: a head on one host and a worker node on another (deploy/ray/*.sh --node-ip), `bpfree
  simulate --backend ray --placement STRICT_SPREAD` from the head's host, equals the reference.

Skipped, with the reason, where namespaces cannot be made (bench/testbed.unavailable).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bpfree.bench.links import host_certs, qdisc_bytes, start_workers
from bpfree.bench.testbed import Testbed, namespaces, unavailable
from bpfree.client.supervisor import worker_env
from bpfree_core.config import load_config
from bpfree_core.run.checkpoint import load_checkpoint
from bpfree_core.run.trainer import train_reference

REPO = Path(__file__).resolve().parents[1]
REASON = unavailable()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(REASON is not None, reason=f"no multi-host testbed here: {REASON}")]
TOKEN = "multihost-t0ken"
RATE = 200   # Mbit/s per direction of every host's link


def _env(**extra: str) -> dict[str, str]:
    return {**worker_env(1), "PYTHON": sys.executable, **extra}


def _bpfree(tb: Testbed, host: str, args: list[str], timeout: float,
            **env: str) -> subprocess.CompletedProcess:
    done = tb.run(host, [sys.executable, "-m", "bpfree", *args], timeout=timeout,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env), cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_pipeline_across_hosts_with_tls_equals_bpfree_train(data_dir: Path, tmp_path: Path) -> None:
    sets = [f"train.data_dir={data_dir}", "model.algorithm=symba", "objective.negatives=hard",
            "model.hidden=200,200", "train.train_limit=2000", "train.test_limit=500",
            "train.epochs=2", "train.threads=1", "pipeline.stages=2", "optim.lr=2e-3",
            "train.jitter=0", "objective.vote_first=false"]   # not the CLI's defaults
    with Testbed(["driver", "s0", "s1"], rate_mbit=RATE) as tb:
        certs = host_certs(tb, ["s0", "s1"], tmp_path / "certs")
        _, addresses = start_workers(tb, ["s0", "s1"], tmp_path, certs=certs, token=TOKEN)
        assert [a.rsplit(":", 1)[0] for a in addresses] == [tb.address("s0"), tb.address("s1")]
        run = tmp_path / "run"
        _bpfree(tb, "driver", ["pipeline", "--workers", ",".join(addresses), "--tls-ca",
                               str(certs / "ca" / "ca.crt"), "--out", str(run), "--no-progress",
                               *sum((["--set", s] for s in sets), [])], 300, BPFREE_TOKEN=TOKEN)
        # The activations crossed the switch into s1's host: 2 epochs x 2000 samples x 3 x 200
        # float32 (positive, negative and neutral activations) at least.
        into_s1 = qdisc_bytes(tb.switch, f"p{tb.hosts.index('s1')}")
        assert into_s1 > 2 * 2000 * 3 * 200 * 4
        logs = [(tmp_path / f"{h}.log").read_text() for h in ("s0", "s1")]
        assert all("tls on" in log and "token required" in log for log in logs)
    assert not set(tb.names()) & set(namespaces())

    cfg = load_config(None, sets)
    reference = train_reference(cfg)["weights"]
    got = load_checkpoint(run / "weights.pt")["weights"]
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in reference), \
        [k for k in reference if not torch.equal(got[k], reference[k])]
    assert "token" not in json.dumps(json.loads((run / "config.json").read_text())["pipeline"])


def _wait_https(tb: Testbed, host: str, url: str, ca: Path, proc: subprocess.Popen, log: Path,
                timeout: float = 90) -> None:
    """Until `url` answers from inside `host` (any HTTP status), failing early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while tb.run(host, ["curl", "-s", "-o", "/dev/null", "--max-time", "2", "--cacert", str(ca), url],
                 timeout=30).returncode != 0:
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{url} did not answer in {timeout} s"
        time.sleep(0.2)   # polling a health endpoint, with a deadline


def _daemon(tb: Testbed, host: str, argv: list[str], log: Path, **env: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        return tb.popen(host, argv, stdout=out, stderr=subprocess.STDOUT, env=_env(**env), cwd=REPO,
                        start_new_session=True)


def _superlink(tb: Testbed, certs: Path, tmp_path: Path) -> str:
    """deploy/superlink.sh on host `link` (TLS, runs in tmp_path/runs), once it answers: its address."""
    link = f"{tb.address('link')}:9093"
    proc = _daemon(tb, "link", ["bash", str(REPO / "deploy" / "superlink.sh"), "--host", tb.address("link"),
                                "--port", "9093", "--certs", str(certs / "link")],
                   tmp_path / "superlink.log", BPFREE_RUNS_DIR=str(tmp_path / "runs"))
    _wait_https(tb, "link", f"https://{link}/health", certs / "ca" / "ca.crt", proc,
                tmp_path / "superlink.log")
    return link


def _flwr_home(tmp_path: Path, link: str, ca: Path) -> Path:
    """A FLWR_HOME whose default SuperLink is `link`, verified with `ca`."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "hosts"\n\n[superlink.hosts]\n'
                                      f'address = "{link}"\nroot-certificates = "{ca}"\n')
    return home


def test_federation_across_hosts_with_tls_equals_the_reference(data_dir: Path, tmp_path: Path) -> None:
    """SuperLink on `link`; SuperNode k on `ck`; client k's two stage workers on `cks0`, `cks1`."""
    from bpfree.server.reference import federated_reference

    sets = [f"train.data_dir={data_dir}", "train.train_limit=2000", "train.test_limit=1000",
            "model.hidden=200,200", "model.algorithm=symba", "train.threads=1",
            "federation.local_epochs=1", "train.batch_size=100"]
    workers = {k: [f"c{k}s0", f"c{k}s1"] for k in range(2)}
    with Testbed(["link", "c0", "c1", *workers[0], *workers[1]], rate_mbit=RATE) as tb:
        certs = host_certs(tb, ["link", *workers[0], *workers[1]], tmp_path / "certs")
        ca = certs / "ca" / "ca.crt"
        stage_addresses = {k: start_workers(tb, hosts, tmp_path, certs=certs, token=TOKEN)[1]
                           for k, hosts in workers.items()}
        link = _superlink(tb, certs, tmp_path)
        for k in range(2):
            _daemon(tb, f"c{k}", ["bash", str(REPO / "deploy" / "supernode.sh"), "--superlink", link,
                                  "--partition", str(k), "--num-partitions", "2", "--stages",
                                  ",".join(stage_addresses[k]), "--certs", str(certs / "ca"),
                                  "--stage-tls"], tmp_path / f"supernode-{k}.log", BPFREE_TOKEN=TOKEN)
        home = _flwr_home(tmp_path, link, ca)
        overrides = ";".join(["federation.clients=2", "pipeline.stages=2", "federation.rounds=1", *sets])
        flwr = str(Path(sys.executable).with_name("flwr"))
        done = tb.run("link", [flwr, "run", str(REPO), "hosts", "--stream", "--run-config",
                               f"config-toml='' overrides='{overrides}'"], timeout=420,
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                      env=_env(FLWR_HOME=str(home)), cwd=REPO)
        assert done.returncode == 0, done.stdout[-4000:]
        into = {h: qdisc_bytes(tb.switch, f"p{tb.hosts.index(h)}") for h in tb.hosts}
    assert not set(tb.names()) & set(namespaces())

    (run,) = (tmp_path / "runs").glob("flwr-*")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["replies"]["accepted"] == 2
    # Each client's activations crossed into its second stage's host (2000 / 2 samples, x and
    # its negative at 200 float32 each, at least).
    assert all(into[f"c{k}s1"] > 1000 * 2 * 200 * 4 for k in range(2)), into
    cfg = load_config(None, [*sets, "federation.clients=2", "pipeline.stages=2", "federation.rounds=1"])
    reference = federated_reference(cfg)
    final = load_checkpoint(run / "checkpoints" / "round-0001.pt")["weights"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def _write_npz(path: Path, train, test) -> Path:  # noqa: ANN001 - two Splits of MNIST
    import numpy as np

    def arrays(split) -> tuple:  # noqa: ANN001
        return ((split.images.view(-1, 1, 28, 28) * 255).round().to(torch.uint8).numpy(),
                split.labels.numpy())

    (xt, yt), (xs, ys) = arrays(train), arrays(test)
    np.savez(path, x_train=xt, y_train=yt, x_test=xs, y_test=ys)
    return path


def test_each_supernode_trains_and_evaluates_its_own_data(data_dir: Path, tmp_path: Path) -> None:
    """Two sites on their own hosts, each with a dataset of its own (deploy/supernode.sh
    --dataset), never the server's: their replies count their own samples, federated evaluation
    reports their own test sets, and the weights equal the in-process run on the sites' data."""
    from bpfree.server.coordinator import Coordinator
    from bpfree.server.reference import InProcessTransport
    from bpfree_core.data.datasets import load_dataset

    mnist = load_dataset("mnist", str(data_dir))
    server = _write_npz(tmp_path / "server.npz", mnist.train.subset(slice(5000, 5200)),
                        mnist.test.subset(slice(0, 500)))
    sites = [_write_npz(tmp_path / f"site{k}.npz", mnist.train.subset(slice(k * 1000, (k + 1) * 1000)),
                        mnist.test.subset(slice(500 + 300 * k, 800 + 300 * k))) for k in range(2)]
    sets = [f"model.dataset=npz:{server}", "model.hidden=100,100", "model.algorithm=symba",
            "train.threads=1", "train.batch_size=100", "train.jitter=0", "federation.clients=2",
            "federation.rounds=2", "federation.executor=inprocess", "federation.fraction_evaluate=1"]
    with Testbed(["link", "c0", "c1"], rate_mbit=RATE) as tb:
        certs = host_certs(tb, ["link"], tmp_path / "certs")
        ca = certs / "ca" / "ca.crt"
        link = _superlink(tb, certs, tmp_path)
        for k in range(2):
            _daemon(tb, f"c{k}", ["bash", str(REPO / "deploy" / "supernode.sh"), "--superlink", link,
                                  "--partition", str(k), "--num-partitions", "2", "--certs",
                                  str(certs / "ca"), "--dataset", f"npz:{sites[k]}"],
                    tmp_path / f"supernode-{k}.log")
        home = _flwr_home(tmp_path, link, ca)
        flwr = str(Path(sys.executable).with_name("flwr"))
        done = tb.run("link", [flwr, "run", str(REPO), "hosts", "--stream", "--run-config",
                               f"config-toml='' overrides='{';'.join(sets)}'"], timeout=420,
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                      env=_env(FLWR_HOME=str(home)), cwd=REPO)
        assert done.returncode == 0, done.stdout[-4000:]
    assert not set(tb.names()) & set(namespaces())

    (run,) = (tmp_path / "runs").glob("flwr-*")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for rec in records:
        assert [m["num_examples"] for m in rec["client_metrics"].values()] == [1000, 1000]
        assert [c["num_examples"] for c in rec["federated_evaluation"]["clients"].values()] == [300, 300]
    cfg = load_config(None, sets)
    transport = InProcessTransport(cfg)
    transport.parts = [load_dataset(f"npz:{site}").train for site in sites]
    reference = Coordinator(cfg, evaluate=False).run(transport)["weights"]
    final = load_checkpoint(run / "checkpoints" / "round-0002.pt")["weights"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def _ray_node(tb: Testbed, host: str, script: str, args: list[str], log: Path,
              timeout: float = 120) -> subprocess.Popen:
    """deploy/ray/<script> in `host` (it execs `ray start --block`), once it says it is up."""
    proc = _daemon(tb, host, ["bash", str(REPO / "deploy" / "ray" / script), *args], log)
    deadline = time.monotonic() + timeout
    while "will now block" not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"{script} exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{script} not up in {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)   # polling the node's log for its readiness line, with a deadline
    return proc


def test_ray_across_hosts_spreads_stages_and_equals_the_reference(data_dir: Path,
                                                                 tmp_path: Path) -> None:
    """A Ray head on `head`, a worker node on `node` (1 CPU each); STRICT_SPREAD puts each
    client's two stages on the two hosts, so every activation crosses the shaped link."""
    import tempfile

    from bpfree.server.reference import federated_reference

    sets = [f"train.data_dir={data_dir}", "model.algorithm=symba", "model.hidden=[120,120]",
            "train.train_limit=2000", "train.test_limit=500", "train.threads=1",
            "pipeline.stage_num_cpus=0.5", "federation.local_epochs=1", "train.batch_size=100",
            "train.jitter=0", "objective.vote_first=false",   # not simulate's default recipe
            "pipeline.connect_timeout=180"]   # cold nodes spawn a process per actor: slow on 2 cores
    # Short temp dirs: Ray's unix socket paths live under them.
    tmps = [Path(tempfile.mkdtemp(prefix="bprh-", dir="/tmp")), Path(tempfile.mkdtemp(prefix="bprn-",
                                                                                       dir="/tmp"))]
    try:
        with Testbed(["head", "node"], rate_mbit=RATE) as tb:
            certs = host_certs(tb, ["head", "node"], tmp_path / "certs")
            head = f"{tb.address('head')}:6379"
            _ray_node(tb, "head", "head.sh", [
                "--port", "6379", "--node-ip", tb.address("head"), "--num-cpus", "1", "--num-gpus",
                "0", "--temp-dir", str(tmps[0]), "--certs", str(certs / "head")], tmp_path / "head.log")
            _ray_node(tb, "node", "worker.sh", [
                "--address", head, "--node-ip", tb.address("node"), "--num-cpus", "1", "--num-gpus",
                "0", "--temp-dir", str(tmps[1]), "--certs", str(certs / "node")], tmp_path / "node.log")
            out = tmp_path / "run"
            done = _bpfree(tb, "head", [
                "simulate", "--backend", "ray", "--address", head, "--placement", "STRICT_SPREAD",
                "--clients", "2", "--stages", "2", "--rounds", "1", "--out", str(out), "--no-plot", "--json",
                "--no-progress", "--set", f"pipeline.tls_ca={certs / 'ca' / 'ca.crt'}",
                *sum((["--set", s] for s in sets), [])], 420, BPFREE_TOKEN=TOKEN)
            into_node = qdisc_bytes(tb.switch, f"p{tb.hosts.index('node')}")
        assert not set(tb.names()) & set(namespaces())
    finally:
        for tmp in tmps:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["backend"] == "ray" and summary["replies"]["accepted"] == 2
    stages = json.loads((out / "ray_stages.json").read_text())
    for client in stages.values():   # one stage per host, each serving TLS on its host's address
        assert {a["address"].rsplit(":", 1)[0] for a in client} == {tb.address("head"),
                                                                     tb.address("node")}
        assert all(a["tls"] for a in client)
    assert into_node > 2000 * 2 * 120 * 4 / 2   # activations crossed into the worker node's host
    cfg = load_config(None, [*sets, "federation.clients=2", "pipeline.stages=2", "federation.rounds=1"])
    reference = federated_reference(cfg)
    final = load_checkpoint(out / "checkpoints" / "round-0001.pt")["weights"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)
