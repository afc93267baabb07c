"""A real stage worker's gRPC server on loopback: bad input, unreachable peers, token and TLS.

The worker runs in this process (a real server on 127.0.0.1:0, real channels); the golden-rule
tests in test_pipeline.py run workers as separate processes.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from bpfree.client.link import Link
from bpfree.client.pipeline import Pipeline
from bpfree.client.transport import PUSH_METHOD, Security
from bpfree.client.wire import WireBatch, encode_batch, end_frame, pack_frame, unpack_frame
from bpfree.client.worker import StageWorker, build_server
from bpfree.protos import stage_pb2 as pb
from bpfree.protos import stage_pb2_grpc as pb_grpc
from bpfree_core.config import ExperimentConfig
from bpfree_core.data.batches import train_packets
from bpfree_core.data.datasets import load_dataset
from bpfree_core.errors import PeerUnavailableError, ProtocolError
from bpfree_core.model import Stage, build_layers, build_objective

RUN = "test-run"


def _cfg(data_dir: Path, *extra: str) -> ExperimentConfig:
    return ExperimentConfig().with_overrides([
        "model.hidden=40,30", "train.batch_size=50", "train.train_limit=200", "train.threads=1",
        f"train.data_dir={data_dir}", "pipeline.stages=1", "pipeline.chunk_bytes=8192",
        "pipeline.rpc_timeout=10", "pipeline.connect_timeout=5", *extra])


class Served:
    """An in-process stage worker server plus a client channel to it."""

    def __init__(self, security: Security | None = None, client: Security | None = None):
        security = security or Security()
        self.worker = StageWorker("cpu", security)
        self.server, port = build_server(self.worker, "127.0.0.1:0", security, max_workers=8)
        self.address = self.worker.address = f"127.0.0.1:{port}"
        self.server.start()
        self.client = client or security
        self.channel = self.client.channel(self.address)
        self.stub = pb_grpc.StageControlStub(self.channel)

    def md(self) -> tuple[tuple[str, str], ...]:
        return self.client.metadata()

    def configure(self, cfg: ExperimentConfig, layers: list[int], downstream: str = "") -> None:
        self.stub.Configure(pb.ConfigureRequest(run_id=RUN, layers=layers, config_json=cfg.to_json(),
                                                downstream=downstream, num_stages=1),
                            timeout=30, metadata=self.md())

    def push(self, frames: list[bytes]) -> list[bytes]:
        call = self.channel.stream_stream(PUSH_METHOD)(iter(frames), metadata=self.md(), timeout=20)
        return list(call)

    def close(self) -> None:
        self.worker.shutdown()
        self.channel.close()
        self.server.stop(grace=None).wait(timeout=5)


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    yield s
    s.close()


@pytest.fixture(scope="module")
def packets(data_dir: Path) -> list[dict[str, torch.Tensor]]:
    cfg = _cfg(data_dir)
    data = load_dataset("mnist", data_dir)
    split = data.train.subset(slice(0, cfg.train.train_limit))
    return list(train_packets(build_objective(cfg), split, cfg, 0))


def _batch_frames(packet: dict[str, torch.Tensor], seq: int, run: str = RUN, epoch: int = 0,
                  chunk: int = 8192) -> list[bytes]:
    return list(encode_batch(WireBatch(run, seq, pb.TRAIN, epoch, packet), chunk))


def _expect(code: grpc.StatusCode, match: str, fn, *args) -> None:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details(), info.value.details()


def _mutated_header(frames: list[bytes], mutate) -> list[bytes]:  # noqa: ANN001
    kind, meta, payload = unpack_frame(frames[0])
    header = pb.BatchHeader.FromString(meta)
    mutate(header)
    return [pack_frame(kind, header.SerializeToString(), [payload]), *frames[1:]]


def _renamed(packet: dict[str, torch.Tensor], old: str, new: str, kind: int = pb.TRAIN) -> list[bytes]:
    """A well-formed batch whose tensor `old` is called `new` (a valid frame, wrong contents)."""
    tensors = {new if k == old else k: v for k, v in packet.items()}
    return list(encode_batch(WireBatch(RUN, 0, kind, 0, tensors), 8192))


def _overflowing_shape(header: pb.BatchHeader) -> None:
    """[0, 2**62, 2**62]: zero bytes, but strides that overflow (was UNKNOWN from torch)."""
    del header.tensors[0].shape[:]
    header.tensors[0].shape.extend([0, 2**62, 2**62])
    header.tensors[0].nbytes = 0


def bad_streams(packets: list[dict[str, torch.Tensor]], good: list[bytes],
                ) -> dict[str, tuple[list[bytes], grpc.StatusCode, str]]:
    """Malformed or unwelcome Push streams: name -> (frames, the status, words of the reason)."""
    return {
        "garbage": ([b"GET / HTTP/1.1\r\n\r\n"], grpc.StatusCode.INVALID_ARGUMENT, "does not speak"),
        "wrong dtype": (_mutated_header(good, lambda h: setattr(h.tensors[0], "dtype", 42)),
                        grpc.StatusCode.INVALID_ARGUMENT, "unknown dtype 42"),
        "shape vs bytes": (_mutated_header(good, lambda h: h.tensors[0].shape.__setitem__(0, 7)),
                           grpc.StatusCode.INVALID_ARGUMENT, "bytes but its header says"),
        "empty, overflowing shape": (_mutated_header(good, _overflowing_shape),
                                     grpc.StatusCode.INVALID_ARGUMENT, "empty, but with a dimension over"),
        "unexpected tensor name": (_renamed(packets[0], "pos", "x"), grpc.StatusCode.INVALID_ARGUMENT,
                                   "carries tensors ['neg', 'neutral', 'x', 'y', 'y_neg']"),
        "eval batch, unexpected name": (_renamed(packets[0], "pos", "x", kind=pb.EVAL),
                                        grpc.StatusCode.INVALID_ARGUMENT, "eval batch 0 carries"),
        "wrong trailing shape": (_batch_frames({**packets[0], "pos": packets[0]["pos"][:, :7]}, 0),
                                 grpc.StatusCode.INVALID_ARGUMENT, "tensor 'pos' is float32"),
        "wrong dtype (int labels as float)": (
            _batch_frames({**packets[0], "y": packets[0]["y"].float()}, 0),
            grpc.StatusCode.INVALID_ARGUMENT, "tensor 'y' is float32"),
        "missing chunk": (good[:1] + good[2:], grpc.StatusCode.INVALID_ARGUMENT, "missing"),
        "truncated": (good[:-1], grpc.StatusCode.INVALID_ARGUMENT, "stream ended inside batch 0"),
        "out of order": (_batch_frames(packets[2], 2), grpc.StatusCode.FAILED_PRECONDITION,
                         "batch 0 was expected next"),
        "unknown run": (_batch_frames(packets[0], 0, run="someone-else"),
                        grpc.StatusCode.FAILED_PRECONDITION, "unknown run 'someone-else'"),
        "wrong epoch": (_batch_frames(packets[0], 0, epoch=5), grpc.StatusCode.FAILED_PRECONDITION,
                        "belongs to epoch 5"),
        "early end": ([end_frame(RUN, 0, 3)], grpc.StatusCode.INVALID_ARGUMENT,
                      "says 3 batches were sent but 0 arrived"),
    }


def test_bad_streams_are_rejected_and_good_ones_still_train(served: Served, packets, data_dir) -> None:
    cfg = _cfg(data_dir)
    good = _batch_frames(packets[0], 0)
    # Before Configure: nothing is accepted.
    _expect(grpc.StatusCode.FAILED_PRECONDITION, "not configured", served.push, good)
    served.configure(cfg, [0, 1])
    _expect(grpc.StatusCode.FAILED_PRECONDITION, "call StartEpoch first", served.push, good)
    served.stub.StartEpoch(pb.EpochRequest(run_id=RUN, epoch=0, total_epochs=1), timeout=5)

    for name, (frames, code, match) in bad_streams(packets, good).items():
        try:
            _expect(code, match, served.push, frames)
        except AssertionError as exc:
            raise AssertionError(f"bad stream {name!r}: {exc}") from exc
    stats = served.stub.Stats(pb.StatsRequest(), timeout=5)
    assert stats.train_batches == 0 and not stats.error   # nothing bad was trained on

    # The same worker then trains a good stream exactly like a local Stage.
    frames = [f for s, p in enumerate(packets) for f in _batch_frames(p, s)]
    acks = served.push([*frames, end_frame(RUN, 0, len(packets))])
    assert [pb.Ack.FromString(unpack_frame(a)[1]).seq for a in acks] == list(range(len(packets)))
    stats = served.stub.FinishEpoch(pb.EpochRequest(run_id=RUN, epoch=0, timeout=10), timeout=15)
    assert stats.train_batches == len(packets) and stats.error == ""
    local = Stage(build_layers(cfg, range(0, 2)))
    local.set_epoch(0, 1)
    for p in packets:
        local.train_step(p)
    from bpfree.client.wire import decode_state

    remote = decode_state(served.stub.GetWeights(pb.GetWeightsRequest(), timeout=10))
    expected = local.state_dict()
    assert list(remote) == list(expected)
    assert all(torch.equal(remote[k], expected[k]) for k in expected)


def test_bad_control_requests(served: Served, data_dir: Path) -> None:
    cfg = _cfg(data_dir)
    ask = served.stub.Configure
    _expect(grpc.StatusCode.INVALID_ARGUMENT, "not valid JSON", ask,
            pb.ConfigureRequest(run_id=RUN, layers=[0], config_json="{nope"), 10)
    _expect(grpc.StatusCode.INVALID_ARGUMENT, "unknown config section", ask,
            pb.ConfigureRequest(run_id=RUN, layers=[0], config_json='{"modle": {}}'), 10)
    _expect(grpc.StatusCode.INVALID_ARGUMENT, "contiguous", ask,
            pb.ConfigureRequest(run_id=RUN, layers=[0, 5], config_json=cfg.to_json()), 10)
    _expect(grpc.StatusCode.FAILED_PRECONDITION, "cannot be split into pipeline stages", ask,
            pb.ConfigureRequest(run_id=RUN, layers=[0], config_json=_cfg(
                data_dir, "model.algorithm=bp").to_json()), 10)
    if not torch.cuda.is_available():
        _expect(grpc.StatusCode.FAILED_PRECONDITION, "use --device cpu", ask,
                pb.ConfigureRequest(run_id=RUN, layers=[0], config_json=cfg.to_json(),
                                    device="cuda:0"), 10)
    served.configure(cfg, [0, 1])
    _expect(grpc.StatusCode.INVALID_ARGUMENT, "do not match", served.stub.LoadWeights,
            iter([pb.TensorChunk(meta=pb.TensorMeta(name="layers.0.bogus", dtype=pb.FLOAT32,
                                                    wire_dtype=pb.FLOAT32, shape=[1], nbytes=4),
                                 data=b"\0\0\0\0")]), 10)
    _expect(grpc.StatusCode.FAILED_PRECONDITION, "unknown run", served.stub.StartEpoch,
            pb.EpochRequest(run_id="other", epoch=0, total_epochs=1), 10)
    _expect(grpc.StatusCode.FAILED_PRECONDITION, "call StartEpoch first", served.stub.FinishEpoch,
            pb.EpochRequest(run_id=RUN, epoch=0), 10)


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"   # closed again: nothing listens there


def test_unreachable_downstream_fails_clearly_within_connect_timeout(served: Served, data_dir) -> None:
    dead = _dead_address()
    cfg = _cfg(data_dir, "pipeline.connect_timeout=1.5")
    t0 = time.monotonic()
    _expect(grpc.StatusCode.UNAVAILABLE, f"nothing listens at {dead}: the connection was refused",
            served.configure, cfg, [0], dead)
    assert time.monotonic() - t0 < 10
    # The driver side: the same clear error, as the project's exception type.
    t0 = time.monotonic()
    with pytest.raises(PeerUnavailableError, match=dead):
        Pipeline.connect(cfg, [served.address, dead])
    assert time.monotonic() - t0 < 10


def test_a_stage_stopping_mid_stream_is_reported_not_hung(data_dir: Path, packets) -> None:
    last, first = Served(), Served()
    try:
        cfg = _cfg(data_dir, "pipeline.window=1", "pipeline.rpc_timeout=5")
        last.configure(cfg, [1])
        first.configure(cfg, [0], downstream=last.address)
        for s in (first, last):
            s.stub.StartEpoch(pb.EpochRequest(run_id=RUN, epoch=0, total_epochs=1), timeout=5)
        last.server.stop(grace=None).wait(timeout=5)   # the downstream stage goes away
        link = Link(first.address, Security(), window=1, chunk_bytes=8192, wire_dtype="float32",
                    timeout=5)
        t0 = time.monotonic()
        with pytest.raises(ProtocolError, match=f"stopped.*{last.address}"):
            for s, p in enumerate(packets * 3):
                link.send(WireBatch(RUN, s, pb.TRAIN, 0, p))
        link.close()
        assert time.monotonic() - t0 < 30
        _expect(grpc.StatusCode.FAILED_PRECONDITION, last.address, first.stub.FinishEpoch,
                pb.EpochRequest(run_id=RUN, epoch=0, timeout=5), 10)
    finally:
        first.close()
        last.close()


# -- security -----------------------------------------------------------------------------------

def test_token_is_required_on_every_rpc(data_dir: Path, packets) -> None:
    served = Served(Security(token="s3cret"), client=Security())
    try:
        wrong = (("x-bpfree-token", "guess"),)
        _expect(grpc.StatusCode.UNAUTHENTICATED, "missing access token", served.stub.Health,
                pb.HealthRequest(), 5)
        with pytest.raises(grpc.RpcError) as info:
            served.stub.Health(pb.HealthRequest(), timeout=5, metadata=wrong)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "wrong access token" in info.value.details()
        _expect(grpc.StatusCode.UNAUTHENTICATED, "access token", served.configure, _cfg(data_dir), [0])
        _expect(grpc.StatusCode.UNAUTHENTICATED, "access token", served.push,
                _batch_frames(packets[0], 0))
        ok = (("x-bpfree-token", "s3cret"),)
        assert served.worker.run is None                       # nothing was configured
        served.stub.Configure(pb.ConfigureRequest(run_id=RUN, layers=[0, 1],
                                                  config_json=_cfg(data_dir).to_json()),
                              timeout=30, metadata=ok)
        # No weights served without the token, and no data accepted.
        with pytest.raises(grpc.RpcError) as info:
            list(served.stub.GetWeights(pb.GetWeightsRequest(), timeout=5, metadata=wrong))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        _expect(grpc.StatusCode.UNAUTHENTICATED, "access token", served.push,
                _batch_frames(packets[0], 0))
        stats = served.stub.Stats(pb.StatsRequest(), timeout=5, metadata=ok)
        assert stats.bytes_in == 0 and stats.train_batches == 0
        assert served.stub.Health(pb.HealthRequest(), timeout=5, metadata=ok).status == "SERVING"
    finally:
        served.close()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_with_token_trains_and_plaintext_is_refused(tmp_path: Path, data_dir: Path, packets) -> None:
    cert, key = _self_signed(tmp_path)
    server_sec = Security(token="tok", tls_cert=str(cert), tls_key=str(key), tls_ca=str(cert))
    served = Served(server_sec, client=Security(token="tok", tls_ca=str(cert)))
    try:
        assert served.stub.Health(pb.HealthRequest(), timeout=10, metadata=served.md()).status == "SERVING"
        with grpc.insecure_channel(served.address) as plain:   # plaintext client: no handshake
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.StageControlStub(plain).Health(pb.HealthRequest(), timeout=3,
                                                       metadata=served.md())
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        cfg = _cfg(data_dir, "pipeline.token=tok", f"pipeline.tls_ca={cert}")
        with pytest.raises(PeerUnavailableError, match="UNAUTHENTICATED"):   # refused, not retried
            Pipeline.connect(cfg.with_overrides(["pipeline.token=nope"]), [served.address])
        with Pipeline.connect(cfg, [served.address]) as pipe:
            stats = pipe.train_epoch(packets, epoch=0, total_epochs=1)
            assert stats["batches"] == len(packets)
            assert set(pipe.get_weights()) == set(Stage(build_layers(cfg)).state_dict())
    finally:
        served.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_worker_cli_refuses_a_missing_gpu_clearly(tmp_path: Path) -> None:
    import subprocess
    import sys

    from bpfree.client.supervisor import REPO_ROOT, worker_env

    done = subprocess.run([sys.executable, "-m", "bpfree", "worker", "--device", "cuda:0",
                           "--port-file", str(tmp_path / "port")], cwd=REPO_ROOT, env=worker_env(1),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert ("no usable CUDA GPU" in done.stderr or "CPU-only build" in done.stderr) \
        and "--device cpu" in done.stderr
    assert not (tmp_path / "port").exists()


def test_worker_cli_serves_tls_with_token(tmp_path: Path, data_dir: Path) -> None:
    """`bpfree worker --tls-cert --tls-key --token` as a process: the driver needs the CA and token."""
    import subprocess
    import sys

    from bpfree.client.supervisor import REPO_ROOT, stop_processes, worker_env

    cert, key = _self_signed(tmp_path)
    port_file = tmp_path / "port"
    env = {**worker_env(1), "BPFREE_TOKEN": "cli-token"}
    proc = subprocess.Popen([sys.executable, "-m", "bpfree", "worker", "--tls-cert", str(cert),
                             "--tls-key", str(key), "--tls-ca", str(cert), "--port-file", str(port_file)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        from bpfree.client.supervisor import wait_port

        log_file = tmp_path / "none.log"
        address = f"127.0.0.1:{wait_port(proc, port_file, log_file, 60)}"
        cfg = _cfg(data_dir, f"pipeline.tls_ca={cert}", "pipeline.token=cli-token")
        with Pipeline.connect(cfg, [address]) as pipe:
            assert set(pipe.get_weights()) == set(Stage(build_layers(cfg)).state_dict())
        with pytest.raises(PeerUnavailableError, match="UNAUTHENTICATED"):
            Pipeline.connect(cfg.with_overrides(["pipeline.token="]), [address])
    finally:
        stop_processes([proc])
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert "tls on, token required" in out and "pid" in out


def test_worker_cli_refuses_a_taken_data_port_at_start(tmp_path: Path) -> None:
    """--data-listen opens only when a run asks for the TCP plane, but a taken or malformed one
    is refused when the worker starts, in one sentence, before it serves anything."""
    import subprocess
    import sys

    from bpfree.client.supervisor import REPO_ROOT, worker_env

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        for spec, words in ((f"127.0.0.1:{taken.getsockname()[1]}", "is already taken"),
                            ("nonsense", "--data-listen 'nonsense' is not HOST:PORT")):
            done = subprocess.run([sys.executable, "-m", "bpfree", "worker", "--data-listen", spec,
                                   "--port-file", str(tmp_path / "port")], cwd=REPO_ROOT,
                                  env=worker_env(1), capture_output=True, text=True, timeout=60)
            assert done.returncode == 2 and words in done.stderr, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1
            assert not (tmp_path / "port").exists()
