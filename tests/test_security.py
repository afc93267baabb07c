"""Nobody gets in, nothing oversized gets through, and the shared token never reaches the disk.

* a real `bpfree worker` process with TLS (certificates from deploy/make-certs.sh) and a token:
  every RPC of both services, listed from the service descriptors (so a new RPC is covered
  automatically), answers UNAUTHENTICATED without the token or with a wrong one; plaintext and a
  client trusting another CA get no connection at all; the right CA and token train;
* oversized messages and batches are refused with RESOURCE_EXHAUSTED;
* the token given to `bpfree pipeline` / `bpfree simulate` appears nowhere in the run directory
  (config.json, checkpoints, metrics, summaries, worker logs) nor in the Flower train message;
* connections that send nothing (raw TCP, HTTP/2 without an RPC) are closed after a deadline.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from bpfree.client.supervisor import REPO_ROOT, stop_processes, wait_port, worker_env
from bpfree.client.transport import PULL_METHOD, PUSH_METHOD, TOKEN_HEADER, Security
from bpfree.client.wire import MAX_BATCH_BYTES, MAX_META_BYTES, MAX_TENSORS, pack_frame
from bpfree.client.worker import StageWorker, build_server
from bpfree.protos import stage_pb2 as pb
from bpfree.protos import stage_pb2_grpc as pb_grpc
from bpfree_core.config import ExperimentConfig
from bpfree_core.errors import PeerUnavailableError

TOKEN = "tok-3f9c1e-do-not-leak"


def _certs(tmp: Path, name: str) -> Path:
    out = tmp / name
    subprocess.run(["bash", str(REPO_ROOT / "deploy" / "make-certs.sh"), str(out)], check=True,
                   capture_output=True, timeout=60)
    return out


@pytest.fixture(scope="module")
def tls_worker(tmp_path_factory) -> Iterator[tuple[str, Path, Path]]:  # noqa: ANN001
    """A `bpfree worker` process serving TLS with a token: (address, its CA, another CA)."""
    tmp = tmp_path_factory.mktemp("tls")
    certs, other = _certs(tmp, "certs"), _certs(tmp, "other")
    env = {**worker_env(1), "BPFREE_TOKEN": TOKEN}
    port_file, log = tmp / "port", tmp / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bpfree", "worker", "--listen",
                                 "127.0.0.1:0", "--tls-cert", str(certs / "server.crt"),
                                 "--tls-key", str(certs / "server.key"), "--port-file",
                                 str(port_file)], env=env, cwd=REPO_ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port = wait_port(proc, port_file, log, 60)
        yield f"127.0.0.1:{port}", certs / "ca.crt", other / "ca.crt"
    finally:
        stop_processes([proc])
    assert TOKEN not in log.read_text()


def _every_rpc() -> list[tuple[str, bool, bool]]:
    """(full method name, client streaming, server streaming) of every RPC the worker serves."""
    desc = pb.DESCRIPTOR.services_by_name["StageControl"]
    # The raw-bytes data plane is registered as generic handlers (client.worker.build_server).
    return [(f"/{desc.full_name}/{m.name}", m.client_streaming, m.server_streaming)
            for m in desc.methods] + [(PUSH_METHOD, True, True), (PULL_METHOD, False, True)]


def _call(channel: grpc.Channel, method: str, cs: bool, ss: bool, metadata, request: bytes = b""):  # noqa: ANN001, ANN202
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[(cs, ss)]
    rpc = kind(method)   # raw bytes: an empty message is valid for every request type
    arg = iter([request]) if cs else request
    result = rpc(arg, timeout=10, metadata=metadata)
    return list(result) if ss else result


def test_every_rpc_needs_the_token_over_tls(tls_worker) -> None:  # noqa: ANN001
    address, ca, _ = tls_worker
    rpcs = _every_rpc()
    assert {m.rsplit("/", 1)[1] for m, _, _ in rpcs} >= {"Configure", "LoadWeights", "GetWeights",
                                                         "StartEpoch", "FinishEpoch", "Stats",
                                                         "Health", "Push", "Pull"}
    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    with grpc.secure_channel(address, creds) as channel:
        for metadata, reason in (((), "missing"), (((TOKEN_HEADER, "guess"),), "wrong"),
                                 (((TOKEN_HEADER, TOKEN + "x"),), "wrong"),
                                 (((TOKEN_HEADER, ""),), "missing")):
            for method, cs, ss in rpcs:
                with pytest.raises(grpc.RpcError) as info:
                    _call(channel, method, cs, ss, metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, metadata)
                assert f"{reason} access token" in info.value.details()
        # With the token the same channel is served.
        reply = pb.HealthReply.FromString(_call(channel, "/bpfree.v1.StageControl/Health", False,
                                                False, ((TOKEN_HEADER, TOKEN),)))
        assert reply.status == "SERVING" and reply.run_id == ""   # nothing was configured


def test_tls_worker_refuses_plaintext_and_strangers(tls_worker, data_dir: Path) -> None:  # noqa: ANN001
    address, ca, other_ca = tls_worker
    with grpc.insecure_channel(address) as plain:
        for method, cs, ss in _every_rpc():
            with pytest.raises(grpc.RpcError) as info:
                _call(plain, method, cs, ss, ((TOKEN_HEADER, TOKEN),))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, method
    stranger = Security(token=TOKEN, tls_ca=str(other_ca))   # trusts another CA: no handshake
    with pytest.raises(PeerUnavailableError, match="did not answer"):
        from bpfree.client.transport import wait_for_peer

        wait_for_peer(address, stranger, timeout=2)
    from bpfree.client.pipeline import Pipeline

    cfg = ExperimentConfig().with_overrides([
        "model.hidden=30,20", "train.train_limit=100", f"train.data_dir={data_dir}",
        "pipeline.stages=1", f"pipeline.token={TOKEN}", f"pipeline.tls_ca={ca}",
        "pipeline.connect_timeout=10"])
    with pytest.raises(PeerUnavailableError, match="UNAUTHENTICATED"):
        Pipeline.connect(cfg.with_overrides(["pipeline.token=nope"]), [address])
    with Pipeline.connect(cfg, [address]) as pipe:
        assert set(pipe.get_weights()) >= {"layers.0.linear.weight", "layers.1.linear.weight"}


# -- oversized ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_worker(data_dir: Path) -> Iterator[str]:
    worker = StageWorker("cpu", Security())
    server, port = build_server(worker, "127.0.0.1:0", Security(), max_workers=4)
    worker.address = f"127.0.0.1:{port}"
    server.start()
    cfg = ExperimentConfig().with_overrides(["model.hidden=30,20", f"train.data_dir={data_dir}"])
    with grpc.insecure_channel(worker.address) as ch:
        ch.unary_unary("/bpfree.v1.StageControl/Configure")(pb.ConfigureRequest(
            run_id="r", layers=[0, 1], config_json=cfg.to_json()).SerializeToString(), timeout=30)
        ch.unary_unary("/bpfree.v1.StageControl/StartEpoch")(pb.EpochRequest(
            run_id="r", epoch=0, total_epochs=1).SerializeToString(), timeout=5)
    yield worker.address
    worker.shutdown()
    server.stop(grace=None).wait(timeout=5)


def _big_channel(address: str) -> grpc.Channel:
    # A client that sends more than the worker accepts (its own send limit raised).
    return grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 256 << 20)])


def test_oversized_messages_are_resource_exhausted(plain_worker: str) -> None:
    big = b"\0" * (65 << 20)   # over the 64 MiB message limit of both planes
    with _big_channel(plain_worker) as ch:
        with pytest.raises(grpc.RpcError) as info:
            list(ch.stream_stream(PUSH_METHOD)(iter([big]), timeout=30))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary("/bpfree.v1.StageControl/Configure")(pb.ConfigureRequest(
                run_id="r", config_json="x" * (65 << 20)).SerializeToString(), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        def push(header: pb.BatchHeader | bytes) -> grpc.RpcError:
            meta = header if isinstance(header, bytes) else header.SerializeToString()
            with pytest.raises(grpc.RpcError) as info:
                list(ch.stream_stream(PUSH_METHOD)(iter([pack_frame(pb.BATCH, meta)]), timeout=10))
            return info.value

        n = MAX_BATCH_BYTES // 4 + 1   # one float32 tensor just over the batch limit
        huge = pb.BatchHeader(run_id="r", seq=0, kind=pb.TRAIN, epoch=0, total_bytes=4 * n,
                              tensors=[pb.TensorMeta(name="pos", dtype=pb.FLOAT32,
                                                     wire_dtype=pb.FLOAT32, shape=[n], nbytes=4 * n)])
        many = pb.BatchHeader(run_id="r", seq=0, kind=pb.TRAIN, epoch=0, tensors=[
            pb.TensorMeta(name=f"t{i}", dtype=pb.FLOAT32, wire_dtype=pb.FLOAT32, shape=[0])
            for i in range(MAX_TENSORS + 1)])
        for header, match in ((huge, "over the"), (many, "at most"),
                              (b"\0" * (MAX_META_BYTES + 1), "over the")):
            err = push(header)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            assert match in err.details()
        # Still serving after all of that.
        reply = ch.unary_unary("/bpfree.v1.StageControl/Health")(b"", timeout=5)
        assert pb.HealthReply.FromString(reply).status == "SERVING"


# -- the token never reaches the disk ------------------------------------------------------------

def _leaks(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and TOKEN.encode() in p.read_bytes()]


def test_the_token_is_never_written_to_a_run_dir(data_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    common = ["--data-dir", str(data_dir), "--set", "train.train_limit=300", "--set",
              "train.test_limit=200", "--set", "train.threads=1", "--set", "model.hidden=30,20"]
    pipe = subprocess.run([sys.executable, "-m", "bpfree", "pipeline", *common, "--epochs", "1",
                           "--stages", "2", "--token", TOKEN, "--out", str(tmp_path / "pipe"),
                           "--log-dir", str(tmp_path / "pipe" / "logs")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert pipe.returncode == 0, pipe.stderr[-3000:]
    assert (tmp_path / "pipe" / "weights.pt").is_file() and (tmp_path / "pipe" / "logs").is_dir()
    saved = torch.load(tmp_path / "pipe" / "weights.pt", weights_only=False)
    assert "token" not in saved["config"]["pipeline"]   # secrets are never serialised
    assert _leaks(tmp_path / "pipe") == [] and TOKEN not in pipe.stdout + pipe.stderr

    # Flower: the train message carries the config without the token.
    from bpfree.client.messages import read_train_content, train_content

    cfg = ExperimentConfig().with_overrides([f"pipeline.token={TOKEN}"])
    content = train_content(0, {"w": torch.zeros(2)}, cfg)
    assert TOKEN not in str(content.config_records["config"]["experiment"])
    assert read_train_content(content)[2].pipeline.token == ""


def test_floods_of_bad_streams_and_wrong_tokens_are_logged_rate_limited(monkeypatch, caplog) -> None:
    import logging

    from bpfree.client import transport as transport_module
    from bpfree.client import worker as worker_module
    from bpfree.client.transport import RateLimitedLog

    monkeypatch.setattr(worker_module, "_REJECTED", RateLimitedLog(worker_module.log))
    monkeypatch.setattr(transport_module, "_TOKEN_FAILURES", RateLimitedLog(transport_module.log))
    security = Security(token="right")
    worker = StageWorker("cpu", security)
    server, port = build_server(worker, "127.0.0.1:0", security, max_workers=4)
    server.start()
    caplog.set_level(logging.WARNING)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            push = ch.stream_stream(PUSH_METHOD)
            health = ch.unary_unary("/bpfree.v1.StageControl/Health")
            for i in range(60):   # bounded: 60 bad streams, 60 wrong tokens
                with pytest.raises(grpc.RpcError) as err:
                    list(push(iter([b"junk"]), timeout=5, metadata=((TOKEN_HEADER, "right"),)))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                with pytest.raises(grpc.RpcError) as err:
                    health(pb.HealthRequest().SerializeToString(), timeout=5,
                           metadata=((TOKEN_HEADER, f"guess-{i}"),))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # ... and the worker still answers the right token.
            health(pb.HealthRequest().SerializeToString(), timeout=5,
                   metadata=((TOKEN_HEADER, "right"),))
    finally:
        worker.shutdown()
        server.stop(grace=None).wait(timeout=5)
    rejected = [r for r in caplog.records if "rejected data stream" in r.getMessage()]
    refused = [r for r in caplog.records if "access token" in r.getMessage()]
    assert 1 <= len(rejected) <= 5 and 1 <= len(refused) <= 5, (len(rejected), len(refused))
    assert all("127.0.0.1" in r.getMessage() for r in rejected + refused)   # the peer is named


def test_rate_limited_log_says_how_many_it_held_back(caplog) -> None:
    import logging

    from bpfree.client.transport import RateLimitedLog

    now = [100.0]
    limited = RateLimitedLog(logging.getLogger("test.ratelimit"), burst=2, period=10.0,
                             clock=lambda: now[0])
    caplog.set_level(logging.WARNING)
    for _ in range(10):
        limited.warning("bad thing")
    now[0] += 10.0   # the window rolls over
    limited.warning("bad thing")
    lines = [r.getMessage() for r in caplog.records if r.name == "test.ratelimit"]
    assert lines[:2] == ["bad thing", "bad thing"] and len(lines) == 3
    assert "8 more like it" in lines[2]


def test_idle_connections_are_closed_and_the_worker_keeps_serving(tmp_path: Path) -> None:
    """Strangers that connect and send nothing (raw TCP, or HTTP/2 without an RPC) are closed
    after --idle-timeout; the worker then answers a real peer as before."""
    import socket
    import time

    port_file, log = tmp_path / "port", tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bpfree", "worker", "--listen",
                                 "127.0.0.1:0", "--port-file", str(port_file), "--idle-timeout", "2"],
                                env={**worker_env(1), "BPFREE_TOKEN": TOKEN}, cwd=REPO_ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"127.0.0.1:{wait_port(proc, port_file, log, 60)}"
        strangers = [socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1])))
                     for _ in range(50)]
        quiet = grpc.insecure_channel(address)   # HTTP/2 up, no RPC ever
        grpc.channel_ready_future(quiet).result(timeout=10)
        states: list[grpc.ChannelConnectivity] = []
        quiet.subscribe(states.append)
        t0 = time.monotonic()
        for s in strangers:
            s.settimeout(20)
            while s.recv(4096):   # the server's HTTP/2 settings, then its close (b"")
                pass
            s.close()
        assert time.monotonic() - t0 < 15
        deadline = time.monotonic() + 15
        while grpc.ChannelConnectivity.IDLE not in states:   # the server sent GOAWAY: idle
            assert time.monotonic() < deadline, states
            time.sleep(0.05)   # polling a real condition with a deadline
        quiet.close()
        with grpc.insecure_channel(address) as peer:   # still serving, token still required
            stub = pb_grpc.StageControlStub(peer)
            assert stub.Health(pb.HealthRequest(), timeout=10,
                               metadata=((TOKEN_HEADER, TOKEN),)).status == "SERVING"
            with pytest.raises(grpc.RpcError) as refused:
                stub.Health(pb.HealthRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stop_processes([proc])
