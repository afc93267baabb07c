"""pipeline.data_plane = tcp: the same frames on a socket beside gRPC, checked like the gRPC plane.

Real sockets on 127.0.0.1 and a real stage worker in this process (its gRPC server and its TCP
data plane); the pipeline of worker processes over this plane is in tests/test_pipeline.py.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bpfree.client import tcp_plane
from bpfree.client.link import Link
from bpfree.client.pipeline import Pipeline
from bpfree.client.tcp_plane import FRAME, PUSH, RecordReader, TcpCall, send_record
from bpfree.client.transport import Security
from bpfree.client.wire import WireBatch, byte_view, end_frame, unpack_frame
from bpfree.protos import stage_pb2 as pb
from bpfree_core.config import ExperimentConfig
from bpfree_core.data.batches import train_packets
from bpfree_core.data.datasets import load_dataset
from bpfree_core.errors import BpfreeError, PeerUnavailableError, ProtocolError
from bpfree_core.model import build_objective
from tests.support import tcp_push, wait_until
from tests.test_worker import RUN, Served, _batch_frames, _cfg, _self_signed, bad_streams

TCP = "pipeline.data_plane=tcp"


@pytest.fixture(scope="module")
def packets(data_dir: Path) -> list[dict[str, torch.Tensor]]:
    cfg = _cfg(data_dir)
    split = load_dataset("mnist", data_dir).train.subset(slice(0, cfg.train.train_limit))
    return list(train_packets(build_objective(cfg), split, cfg, 0))


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    yield s
    s.close()


def _port(served: Served) -> int:
    return served.stub.Health(pb.HealthRequest(), timeout=5, metadata=served.md()).data_port


def _tcp_push(served: Served, frames: list[bytes], security: Security | None = None) -> list[bytes]:
    return tcp_push(served.address, _port(served), security or served.client, frames)


def _train(served: Served, cfg: ExperimentConfig, packets: list) -> dict[str, torch.Tensor]:
    with Pipeline.connect(cfg, [served.address]) as pipe:
        stats = pipe.train_epoch(packets, epoch=0, total_epochs=1)
        assert stats["batches"] == len(packets)
        return pipe.get_weights()


# -- records --------------------------------------------------------------------------------------

def test_records_carry_many_parts_and_large_tensors_intact() -> None:
    a, b = socket.socketpair()
    big = torch.arange(3 << 20, dtype=torch.float32)     # 12 MiB: many partial sendmsg calls
    parts = [b"head", byte_view(big), b"", memoryview(b"tail")]
    sender = threading.Thread(target=lambda: (send_record(a, FRAME, parts), a.close()))
    sender.start()
    reader = RecordReader(b)
    kind, body = reader.read()
    assert kind == FRAME and len(body) == 8 + big.numel() * 4
    assert bytes(body[:4]) == b"head" and bytes(body[-4:]) == b"tail"
    assert torch.equal(torch.frombuffer(bytearray(body[4:-4]), dtype=torch.float32), big)
    assert reader.read() is None                         # a clean end, not an error
    sender.join(timeout=10)
    b.close()


@pytest.mark.parametrize(("raw", "match"), [
    (b"GET / HTTP/1.1\r\n\r\n", "not part of the bpfree TCP data plane"),
    (bytes([FRAME]) + (tcp_plane.MAX_RECORD_BYTES + 1).to_bytes(4, "little"), "over the"),
    (bytes([FRAME]) + (100).to_bytes(4, "little") + b"short", r"closed inside a record \(5 of 100"),
    (bytes([FRAME, 0]), "closed inside a record"),
])
def test_a_reader_refuses_what_is_not_a_record(raw: bytes, match: str) -> None:
    a, b = socket.socketpair()
    a.sendall(raw)
    a.close()
    with pytest.raises(ProtocolError, match=match):
        RecordReader(b).read()
    b.close()


# -- a stage worker serving it ------------------------------------------------------------------

def test_a_stage_trains_the_same_weights_over_tcp_as_over_grpc(data_dir: Path, packets) -> None:
    weights = {}
    for plane in ("grpc", "tcp"):
        served = Served()
        try:
            weights[plane] = _train(served, _cfg(data_dir, f"pipeline.data_plane={plane}"), packets)
            assert (_port(served) > 0) == (plane == "tcp")   # the socket opens only when asked for
        finally:
            served.close()
        if plane == "tcp":   # closed with the worker: nothing listens there any more
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", served.worker.frame_server.port), timeout=5)
    assert list(weights["tcp"]) == list(weights["grpc"])
    assert all(torch.equal(weights["tcp"][k], weights["grpc"][k]) for k in weights["grpc"])


def test_bad_streams_over_tcp_get_the_same_refusals(served: Served, packets, data_dir) -> None:
    cfg = _cfg(data_dir, TCP)
    served.configure(cfg, [0, 1])
    served.stub.StartEpoch(pb.EpochRequest(run_id=RUN, epoch=0, total_epochs=1), timeout=5)
    good = _batch_frames(packets[0], 0)
    for name, (frames, code, match) in bad_streams(packets, good).items():
        with pytest.raises(BpfreeError) as info:
            _tcp_push(served, frames)
        assert code.name in str(info.value) and match in str(info.value), f"{name}: {info.value}"
    stats = served.stub.Stats(pb.StatsRequest(), timeout=5)
    assert stats.train_batches == 0 and not stats.error   # nothing bad was trained on
    # The same worker then takes a good stream and acks every batch.
    frames = [f for s, p in enumerate(packets) for f in _batch_frames(p, s)]
    acks = _tcp_push(served, [*frames, end_frame(RUN, 0, len(packets))])
    assert [pb.Ack.FromString(unpack_frame(a)[1]).seq for a in acks] == list(range(len(packets)))
    stats = served.stub.FinishEpoch(pb.EpochRequest(run_id=RUN, epoch=0, timeout=10), timeout=15)
    assert stats.train_batches == len(packets) and stats.error == ""


def test_the_token_is_checked_before_anything_is_read(data_dir: Path, packets) -> None:
    served = Served(Security(token="s3cret"))
    try:
        served.configure(_cfg(data_dir, TCP), [0, 1])
        for token, word in (("", "missing"), ("guess", "wrong")):
            with pytest.raises(BpfreeError, match=f"UNAUTHENTICATED: {word} access token"):
                _tcp_push(served, _batch_frames(packets[0], 0), Security(token=token))
        assert served.stub.Stats(pb.StatsRequest(), timeout=5, metadata=served.md()).bytes_in == 0
        # Strangers: not our protocol, or nothing at all, are dropped; the worker serves on.
        with socket.create_connection(("127.0.0.1", _port(served)), timeout=10) as stranger:
            stranger.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert stranger.recv(1)[0:1] == bytes([tcp_plane.ERROR])
        cfg = _cfg(data_dir, TCP, "pipeline.token=s3cret")
        assert set(_train(served, cfg, packets))
    finally:
        served.close()


def test_a_silent_connection_is_dropped(served: Served, data_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp_plane, "HELLO_TIMEOUT", 0.5)
    served.configure(_cfg(data_dir, TCP), [0, 1])
    with socket.create_connection(("127.0.0.1", _port(served)), timeout=10) as silent:
        assert silent.recv(1) == b""   # closed by the worker (the recv would time out otherwise)


def test_tls_and_token_over_tcp(tmp_path: Path, data_dir: Path, packets) -> None:
    cert, key = _self_signed(tmp_path)
    served = Served(Security(token="tok", tls_cert=str(cert), tls_key=str(key)),
                    client=Security(token="tok", tls_ca=str(cert)))
    try:
        weights = _train(served, _cfg(data_dir, TCP, "pipeline.token=tok",
                                      f"pipeline.tls_ca={cert}"), packets)
        assert weights
        with pytest.raises(BpfreeError):   # a plaintext client gets no frames from a TLS plane
            _tcp_push(served, _batch_frames(packets[0], 0), Security(token="tok"))
    finally:
        served.close()


def test_a_worker_without_the_plane_is_named() -> None:
    with pytest.raises(PeerUnavailableError, match="serves no TCP data plane"):
        TcpCall("127.0.0.1:1", 0, Security(), PUSH)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(PeerUnavailableError, match="is unreachable.*pipeline.data_plane = grpc"):
        TcpCall(f"127.0.0.1:{port}", port, Security(), PUSH, timeout=5)


def test_silent_strangers_past_the_waiting_room_shed_the_oldest_and_the_stage_serves_on(
        served: Served, data_dir: Path, packets, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp_plane, "MAX_PENDING", 2)
    cfg = _cfg(data_dir, TCP)
    served.configure(cfg, [0, 1])
    port = _port(served)
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            assert held[0].recv(1) == b""   # the oldest silent one made room, no thread kept for it
            assert set(_train(served, cfg, packets))   # a driver gets in beside the rest
    finally:
        for sock in held:
            sock.close()
    wait_until("the worker to drop the closed connections",
               lambda: served.worker.frame_server.connections == 0, timeout=10)


def _hello_claiming(size: int) -> bytes:
    return tcp_plane._RECORD.pack(tcp_plane.HELLO, size) + tcp_plane._HELLO.pack(b"BFD1", PUSH, 0)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


def test_a_hello_claiming_a_huge_body_is_refused_before_anything_is_allocated(
        data_dir: Path, packets) -> None:
    """Issue 38, case 1: 32 strangers each claimed a 64 MiB HELLO and dripped bytes; the worker
    grew by 2 GB before it checked a token. Now the claim is refused at once, memory stays flat,
    and the driver with the token trains beside them."""
    served = Served(Security(token="s3cret"), client=Security(token="s3cret"))
    strangers: list[socket.socket] = []
    try:
        cfg = _cfg(data_dir, TCP, "pipeline.token=s3cret")
        served.configure(cfg, [0, 1])
        port, before = _port(served), _rss_mb()
        for _ in range(32):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(_hello_claiming(64 << 20) + b"x")
            strangers.append(sock)
        for sock in strangers:
            assert sock.recv(1) == bytes([tcp_plane.ERROR])   # told at once, not read into memory
        assert _rss_mb() - before < 100
        assert set(_train(served, cfg, packets))
    finally:
        for sock in strangers:
            sock.close()
        served.close()


def test_a_hello_dripped_a_byte_at_a_time_gets_one_deadline_for_all_of_it(
        served: Served, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp_plane, "HELLO_TIMEOUT", 1.0)
    served.configure(_cfg(data_dir, TCP), [0, 1])
    with socket.create_connection(("127.0.0.1", _port(served)), timeout=10) as slow:
        hello, closed = _hello_claiming(1000), False
        for i in range(40):   # a byte every 0.1 s would take 100 s; the worker closes it in ~1 s
            try:
                slow.sendall(hello[i:i + 1])
            except OSError:
                closed = True
                break
            slow.settimeout(0.1)
            try:
                closed = slow.recv(1) == b""
            except TimeoutError:
                continue
            if closed:
                break
        assert closed


def test_a_driver_past_the_stream_cap_is_told_why(served: Served, data_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp_plane, "MAX_CONNECTIONS", 1)
    served.configure(_cfg(data_dir, TCP), [0, 1])
    port = _port(served)
    first = TcpCall(served.address, port, served.client, PUSH, timeout=10)   # holds the one stream
    try:
        with pytest.raises(BpfreeError, match="serves 1 data streams already"):
            TcpCall(served.address, port, served.client, PUSH, timeout=10)
    finally:
        first.cancel()


def test_a_batch_that_cannot_be_framed_fails_the_link_with_its_reason(served: Served,
                                                                      data_dir: Path) -> None:
    served.configure(_cfg(data_dir, TCP), [0, 1])
    link = Link(served.address, served.client, window=2, chunk_bytes=8192, wire_dtype="float32",
                timeout=10, data_plane="tcp")
    try:
        link.send(WireBatch(RUN, 0, pb.TRAIN, 0, {"x": torch.zeros(2, 2, dtype=torch.complex64)}))
        wait_until("the link to fail", lambda: link.error is not None, timeout=10)
        assert "cannot be sent" in str(link.error)
        with pytest.raises(ProtocolError, match="cannot be sent"):   # the next send says why
            link.send(WireBatch(RUN, 1, pb.TRAIN, 0, {"x": torch.zeros(2, 2)}))
    finally:
        link.close()


def test_a_worker_serves_one_run_at_a_time(served: Served, data_dir: Path, packets,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 38, case 4: a second `bpfree pipeline --workers SAME` took the stage over and the
    first driver stalled 60 s without learning why. Now it is refused, naming the holder."""
    from bpfree.client import admission

    first = _cfg(data_dir, TCP, "pipeline.session=run-a")
    with Pipeline.connect(first, [served.address]) as pipe:
        pipe.train_epoch(packets[:2], epoch=0, total_epochs=1)
        with pytest.raises(BpfreeError, match=r"in use by another run \(session run-a"):
            Pipeline.connect(_cfg(data_dir, TCP, "pipeline.session=run-b"), [served.address])
        pipe.train_epoch(packets[:2], epoch=0, total_epochs=1)   # the holder was not disturbed
        with Pipeline.connect(first, [served.address]):   # the same run (another client, a retry)
            pass
    monkeypatch.setattr(admission, "LEASE_SECONDS", 0.0)   # the holder went quiet long enough
    assert set(_train(served, _cfg(data_dir, TCP, "pipeline.session=run-b"), packets))
