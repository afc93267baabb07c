"""Tensors on the wire: round trips over dtypes and awkward chunk sizes, and every malformed input."""

from __future__ import annotations

import pytest
import torch

from bpfree.client.wire import (
    DTYPES,
    WireBatch,
    decode_frames,
    decode_state,
    encode_batch,
    encode_state,
    pack_frame,
    unpack_frame,
)
from bpfree.protos import stage_pb2 as pb
from bpfree_core.errors import ProtocolError


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


def _roundtrip(tensors: dict[str, torch.Tensor], chunk: int, wire: str = "float32") -> WireBatch:
    batch = WireBatch("run", 7, pb.TRAIN, 3, tensors)
    frames = list(encode_batch(batch, chunk, wire))
    assert all(len(unpack_frame(f)[2]) <= chunk for f in frames)
    (out,) = list(decode_frames(frames))
    assert (out.run_id, out.seq, out.kind, out.epoch) == ("run", 7, pb.TRAIN, 3)
    return out


@pytest.mark.parametrize("name", list(DTYPES))
def test_every_dtype_round_trips_exactly(name: str) -> None:
    t = _tensor(DTYPES[name], (13, 7))
    out = _roundtrip({"t": t}, chunk=64)
    assert out.tensors["t"].dtype == t.dtype
    assert torch.equal(out.tensors["t"], t)


@pytest.mark.parametrize("chunk", [1, 1024, 65536, 65537, 1 << 20])
def test_chunk_sizes_spanning_tensor_boundaries(chunk: int) -> None:
    tensors = {"pos": _tensor(torch.float32, (100, 300), 1), "neg": _tensor(torch.float32, (100, 300), 2),
               "y": _tensor(torch.int64, (100,), 3), "empty": torch.zeros(0, 5),
               "scalar": torch.tensor(2.5)}
    out = _roundtrip(tensors, chunk if chunk > 1 else 997)
    assert list(out.tensors) == list(tensors)
    for k, t in tensors.items():
        assert out.tensors[k].shape == t.shape and torch.equal(out.tensors[k], t), k


def test_empty_batch_and_non_contiguous_input() -> None:
    assert _roundtrip({}, 1024).tensors == {}
    t = torch.arange(20.0).view(4, 5).t()   # non-contiguous view
    assert torch.equal(_roundtrip({"t": t}, 16).tensors["t"], t)


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_half_wire_dtypes_halve_bytes_and_stay_close(wire: str) -> None:
    x = torch.rand(64, 256)
    y = torch.arange(64)
    logits = torch.randn(64, 10)
    full = sum(len(f) for f in encode_batch(WireBatch("r", 0, pb.TRAIN, 0, {"x": x}), 1 << 20))
    half = sum(len(f) for f in encode_batch(WireBatch("r", 0, pb.TRAIN, 0, {"x": x}), 1 << 20, wire))
    assert half < 0.52 * full
    out = _roundtrip({"x": x, "y": y, "logits": logits}, 4096, wire)
    assert out.tensors["x"].dtype == torch.float32             # rebuilt as float32
    tol = 2 ** -8 if wire == "bfloat16" else 2 ** -11
    assert torch.allclose(out.tensors["x"], x, rtol=tol, atol=0)
    assert not torch.equal(out.tensors["x"], x)                # it really was rounded
    assert torch.equal(out.tensors["y"], y)                    # integers untouched
    assert torch.equal(out.tensors["logits"], logits)          # accumulators stay exact


def test_int8_wire_quarters_bytes_with_per_row_error_bound() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-3, 3, 64)[:, None]   # rows of any scale
    x[5] = 0.0                                                                      # an all-zero row
    tensors = {"x": x, "y": torch.arange(64), "logits": torch.randn(64, 10), "v": torch.randn(7),
               "s": torch.tensor(-2.5), "empty": torch.zeros(0, 9)}
    full = sum(len(f) for f in encode_batch(WireBatch("r", 0, pb.TRAIN, 0, {"x": x}), 1 << 20))
    small = sum(len(f) for f in encode_batch(WireBatch("r", 0, pb.TRAIN, 0, {"x": x}), 1 << 20, "int8"))
    assert small < 0.27 * full                                  # 1 byte per value + 4 per row
    out = _roundtrip(tensors, 1000, "int8").tensors             # chunks cut through scales and values
    assert out["x"].dtype == torch.float32 and out["x"].shape == x.shape
    bound = x.abs().amax(dim=1, keepdim=True) / 127 / 2         # half a quantisation step per row
    assert ((out["x"] - x).abs() <= bound * (1 + 1e-5) + 1e-30).all()
    assert not torch.equal(out["x"], x)
    assert torch.equal(out["x"][5], x[5])                       # zeros stay zeros
    assert (out["v"] - tensors["v"]).abs().max() <= tensors["v"].abs().max() / 254 * (1 + 1e-5)
    assert torch.allclose(out["s"], tensors["s"]) and out["empty"].shape == (0, 9)
    assert torch.equal(out["y"], tensors["y"])                  # integers untouched
    assert torch.equal(out["logits"], tensors["logits"])        # accumulators stay exact


def test_int8_wire_with_wrong_byte_count_is_refused() -> None:
    frames = list(encode_batch(WireBatch("run", 0, pb.TRAIN, 0, {"x": torch.ones(10, 20)}), 256, "int8"))
    kind, meta, payload = unpack_frame(frames[0])
    header = pb.BatchHeader.FromString(meta)
    assert header.tensors[0].nbytes == 10 * 4 + 200
    header.tensors[0].nbytes = 200                              # as if there were no scales
    header.total_bytes = 200
    with pytest.raises(ProtocolError, match="needs 240 bytes but its header says 200"):
        _decode([pack_frame(kind, header.SerializeToString(), [payload]), *frames[1:]])


def test_weights_stream_round_trips() -> None:
    state = {"layers.0.linear.weight": torch.randn(50, 30), "layers.0.steps": torch.tensor(5),
             "layers.0.patterns": torch.zeros(0)}
    back = decode_state(encode_state(state, 100))
    assert list(back) == list(state)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in state.items())


# -- malformed input ----------------------------------------------------------------------------

def _frames(tensors: dict[str, torch.Tensor] | None = None, chunk: int = 256) -> list[bytes]:
    tensors = tensors if tensors is not None else {"x": torch.ones(10, 20)}
    return list(encode_batch(WireBatch("run", 0, pb.TRAIN, 0, tensors), chunk))


def _with_header(mutate) -> list[bytes]:  # noqa: ANN001
    frames = _frames()
    kind, meta, payload = unpack_frame(frames[0])
    header = pb.BatchHeader.FromString(meta)
    mutate(header)
    return [pack_frame(kind, header.SerializeToString(), [payload]), *frames[1:]]


def _decode(frames: list[bytes]) -> None:
    list(decode_frames(frames))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda h: setattr(h.tensors[0], "dtype", 99), "unknown dtype 99"),
    (lambda h: h.tensors[0].shape.__setitem__(0, 11), "needs 880 bytes but its header says 800"),
    (lambda h: setattr(h, "total_bytes", 5), "total_bytes = 5"),
    (lambda h: setattr(h.tensors[0], "wire_dtype", pb.INT64), "only float32 may travel"),
    (lambda h: setattr(h.tensors[0], "name", ""), "has no name"),
])
def test_bad_headers_say_what_is_wrong(mutate, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ProtocolError, match=message):
        _decode(_with_header(mutate))


def test_missing_and_reordered_chunks_are_detected() -> None:
    frames = _frames()
    assert len(frames) == 4
    with pytest.raises(ProtocolError, match="a chunk is missing or out of order"):
        _decode([frames[0], frames[2], frames[1], frames[3]])
    with pytest.raises(ProtocolError, match="chunks are missing"):
        _decode(frames[:3])
    with pytest.raises(ProtocolError, match="without a BATCH frame"):
        _decode(frames[1:])


def test_garbage_frames_are_rejected() -> None:
    with pytest.raises(ProtocolError, match="shorter than"):
        unpack_frame(b"xy")
    with pytest.raises(ProtocolError, match="does not speak"):
        unpack_frame(b"HTTP/1.1 200 OK\r\n")
    bad_version = bytearray(_frames()[0])
    bad_version[2] = 9
    with pytest.raises(ProtocolError, match="protocol version 9"):
        unpack_frame(bytes(bad_version))
    truncated = _frames()[0][:12]
    with pytest.raises(ProtocolError, match="header is"):
        unpack_frame(truncated)
    with pytest.raises(ProtocolError, match="not a valid BatchHeader"):
        _decode([pack_frame(pb.BATCH, b"\xff\xff\xff")])


@pytest.mark.parametrize("wire", ["float32", "bfloat16", "int8"])
def test_a_cpu_stage_takes_the_plain_path(wire: str) -> None:
    """client/staging.py runs only for CUDA: a batch placed on the CPU decodes exactly as one
    with no place, with no event to wait on and the A-GEM marker left as it came."""
    tensors = {"x": _tensor(torch.float32, (6, 40)), "reference": torch.tensor([True])}
    frames = list(encode_batch(WireBatch("r", 1, pb.TRAIN, 0, tensors), 128, wire))
    plain = next(iter(decode_frames(frames)))
    placed = next(iter(decode_frames(frames, place=lambda: torch.device("cpu"))))
    assert placed.ready is None and placed.tensors.keys() == plain.tensors.keys()
    for k, t in plain.tensors.items():
        assert torch.equal(placed.tensors[k], t) and placed.tensors[k].device.type == "cpu"
