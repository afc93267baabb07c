"""Tensors on the wire: dtype tables, data-plane frames, chunked batches and weight streams.

A data-plane frame (see protos/stage.proto) is

    b"BF" | version u8 | FrameKind u8 | meta_len u32 LE | meta (protobuf) | payload (raw bytes)

A batch is one BATCH frame (header + first payload bytes) and CHUNK frames until every byte of
its tensors has arrived. Sending copies each tensor's bytes once (into the frame); receiving
copies each chunk once, straight into a tensor allocated by torch (aligned, writable).
Every check on received bytes raises `ProtocolError` with one sentence saying what was wrong.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from bpfree.client import staging
from bpfree.protos import stage_pb2 as pb
from bpfree_core.config import WIRE_DTYPES
from bpfree_core.errors import ConfigError, ProtocolError
from bpfree_core.layers import INDEX, REFERENCE, Packet

PROTOCOL_VERSION = 1
MAGIC = b"BF"
_HEADER = struct.Struct("<2sBBI")       # magic, version, kind, meta_len
HEADER_BYTES = _HEADER.size             # 8
MAX_META_BYTES = 1 << 20                # a batch header lists a few tensors: 1 MiB is plenty
MAX_BATCH_BYTES = 8 << 30               # refuse to allocate more than this for one batch
MAX_TENSORS = 1024
MAX_DIMS = 8
MAX_DIM = 2**31 - 1                     # the largest size of one dimension

# name <-> torch dtype <-> proto enum
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
_TO_PB = {"float32": pb.FLOAT32, "bfloat16": pb.BFLOAT16, "float16": pb.FLOAT16,
          "float64": pb.FLOAT64, "int64": pb.INT64, "int32": pb.INT32, "int16": pb.INT16,
          "int8": pb.INT8, "uint8": pb.UINT8, "bool": pb.BOOL}
_FROM_PB = {v: k for k, v in _TO_PB.items()}
_NAME_OF = {v: k for k, v in DTYPES.items()}
WIRE_FLOATS = WIRE_DTYPES   # encodings a float32 tensor may travel in (pipeline.wire_dtype)
# "int8": per-row scaled. A tensor of shape (rows, ...) travels as `rows` float32 scales
# (max |x| of the row / 127) followed by one int8 per element, round(x / scale): 4x smaller
# than float32 for rows of more than a few elements, error <= scale / 2 per element.

# Prediction accumulators stay float32 whatever the wire dtype: rounding them could flip argmax.
EXACT_KEYS = frozenset({"logits", "goodness"})
# Read on the host before a step (the A-GEM marker, the sample index of a staged run's frozen
# outputs): never uploaded to a stage's device.
HOST_KEYS = frozenset({REFERENCE, INDEX})


class LimitError(ProtocolError):
    """Well-formed but over a size limit (a stage answers RESOURCE_EXHAUSTED)."""


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAME_OF:
        raise ProtocolError(f"tensor dtype {dtype} cannot be sent; supported: {', '.join(DTYPES)}")
    return _NAME_OF[dtype]


_ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()}


def _itemsize(name: str) -> int:
    return _ITEMSIZE[name]   # looked up for every tensor of every batch: no tensor made for it


_GRAIN = 32768   # elements: below torch's parallel grain size, so a cast runs on this thread only


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)` (same rounding) in slices small enough that torch never wakes its thread pool.

    Casting runs on gRPC threads next to training: a pool of spinning OpenMP threads there
    tripled the sender's CPU per GiB in bf16 (measured 1.5 s/GiB instead of 0.5 s/GiB).
    """
    if t.device.type != "cpu":   # one kernel on an accelerator
        return t.to(dtype)
    out = torch.empty(t.shape, dtype=dtype)
    src, dst = t.reshape(-1), out.view(-1)
    for i in range(0, src.numel(), _GRAIN):
        dst[i:i + _GRAIN].copy_(src[i:i + _GRAIN])
    return out


def _rows(shape: tuple[int, ...] | list[int]) -> int:
    """Rows of the int8 wire: one scale per entry of the batch dimension (one for a scalar/vector)."""
    return shape[0] if len(shape) >= 2 else 1


def wire_nbytes(shape: tuple[int, ...] | list[int], wire: str) -> int:
    """Bytes a tensor of `shape` takes on the wire in encoding `wire`."""
    n = math.prod(shape)
    if wire == "int8" and n:
        return _rows(shape) * 4 + n
    return n * _itemsize(wire)


def quantize_rows(t: torch.Tensor) -> torch.Tensor:
    """float32 -> the int8 wire's bytes (uint8): per-row float32 scales, then int8 values."""
    rows = _rows(t.shape)
    x = t.reshape(rows, -1)
    out = torch.empty(rows * 4 + x.numel(), dtype=torch.uint8, device=t.device)
    scales = out[:rows * 4].view(torch.float32)
    q = out[rows * 4:].view(torch.int8).view(rows, -1)
    step = max(1, _GRAIN // max(x.shape[1], 1))   # row slices small enough for this thread only
    if t.device.type != "cpu":
        step = rows                                # an accelerator takes every row at once
    for i in range(0, rows, step):
        xs = x[i:i + step]
        s = xs.abs().amax(dim=1) / 127.0
        scales[i:i + step] = s
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        q[i:i + step] = (xs * inv[:, None]).round_().clamp_(-127, 127)
    return out


def dequantize_rows(raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The int8 wire's bytes (uint8) -> float32 of `shape`."""
    rows = _rows(shape)
    scales = raw[:rows * 4].view(torch.float32)
    q = raw[rows * 4:].view(torch.int8).view(rows, -1)
    out = torch.empty(q.shape, dtype=torch.float32, device=raw.device)
    step = max(1, _GRAIN // max(q.shape[1], 1)) if raw.device.type == "cpu" else rows
    for i in range(0, rows, step):
        torch.mul(q[i:i + step], scales[i:i + step, None], out=out[i:i + step])
    return out.view(shape)


def byte_view(t: torch.Tensor) -> memoryview:
    """Zero-copy byte view of a contiguous CPU tensor (bf16 has no numpy type: view as int16)."""
    flat = t.reshape(-1)
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return memoryview(flat.numpy()).cast("B")


# ---------------------------------------------------------------------------------------------
# Frames


def frame_parts(kind: int, meta: bytes, payload: Iterable[memoryview | bytes] = ()
                ) -> list[memoryview | bytes]:
    """One frame as pieces to send back to back: fixed header + meta, then the payload views."""
    return [_HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, len(meta)) + meta, *payload]


def pack_frame(kind: int, meta: bytes, payload: Iterable[memoryview | bytes] = ()) -> bytes:
    """One frame as a single bytes object (the one copy on the send side)."""
    return b"".join(frame_parts(kind, meta, payload))


def unpack_frame(frame: bytes) -> tuple[int, memoryview, memoryview]:
    """(kind, meta bytes, payload) of a frame, checking magic, version and lengths."""
    if len(frame) < HEADER_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes is shorter than the {HEADER_BYTES}-byte "
                            "frame header; the sender does not speak the bpfree data protocol")
    magic, version, kind, meta_len = _HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise ProtocolError(f"frame starts with {magic!r}, not {MAGIC!r}; the sender does not speak "
                            "the bpfree data protocol")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"frame has protocol version {version} but this worker speaks "
                            f"{PROTOCOL_VERSION}; run the same bpfree version on every machine")
    if meta_len > MAX_META_BYTES:
        raise LimitError(f"frame header of {meta_len} bytes is over the {MAX_META_BYTES}-byte limit")
    if HEADER_BYTES + meta_len > len(frame):
        raise ProtocolError(f"frame says its header is {meta_len} bytes but the frame has only "
                            f"{len(frame) - HEADER_BYTES} bytes after the fixed header")
    mv = memoryview(frame)
    return kind, mv[HEADER_BYTES:HEADER_BYTES + meta_len], mv[HEADER_BYTES + meta_len:]


def parse_meta(cls: type, meta: memoryview, what: str):  # noqa: ANN201 - a protobuf message
    try:
        return cls.FromString(meta)
    except Exception as exc:  # noqa: BLE001 - any decode failure means a malformed frame
        raise ProtocolError(f"{what} header is not a valid {cls.__name__} message ({exc})") from exc


def ack_frame(seq: int) -> bytes:
    return pack_frame(pb.ACK, pb.Ack(seq=seq).SerializeToString())


def end_frame(run_id: str, epoch: int, batches: int) -> bytes:
    return pack_frame(pb.END, pb.EndOfEpoch(run_id=run_id, epoch=epoch, batches=batches)
                      .SerializeToString())


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass
class WireBatch:
    """A packet plus what the data plane needs to route and check it."""

    run_id: str
    seq: int
    kind: int                       # pb.TRAIN | pb.EVAL
    epoch: int
    tensors: Packet = field(default_factory=dict)
    # CUDA only (client/staging.py): when `tensors`, on the device, are ready to be read
    ready: torch.cuda.Event | None = field(default=None, compare=False, repr=False)


def _encode(t: torch.Tensor, logical: str, wire: str) -> torch.Tensor:
    """A tensor's wire form, on its own device."""
    t = t.contiguous()
    if wire == "int8" and logical == "float32":
        return quantize_rows(t) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)
    return cast(t, DTYPES[wire]) if wire != logical else t


def _decode(m: pb.TensorMeta, t: torch.Tensor) -> torch.Tensor:
    """A received tensor's wire form -> its own dtype, on its own device."""
    if _is_int8_wire(m):
        shape = tuple(m.shape)
        return dequantize_rows(t, shape) if t.numel() else torch.empty(shape, device=t.device)
    return cast(t, DTYPES[_FROM_PB[m.dtype]]) if m.wire_dtype != m.dtype else t


def _wire_tensor(name: str, t: torch.Tensor, wire_dtype: str,
                 ready: torch.cuda.Event | None = None) -> tuple[pb.TensorMeta, torch.Tensor]:
    """A tensor's meta and its wire form on the host. A device tensor is encoded on its device
    before it comes down (client/staging.py), after `ready`."""
    t = t.detach()
    logical = dtype_name(t.dtype)
    wire = wire_dtype if (logical == "float32" and name not in EXACT_KEYS) else logical
    shape = list(t.shape)
    if t.device.type == "cpu":
        t = _encode(t, logical, wire)
    else:
        t = staging.download(t, ready, lambda d: _encode(d, logical, wire))
    meta = pb.TensorMeta(name=name, dtype=_TO_PB[logical], wire_dtype=_TO_PB[wire],
                         shape=shape, nbytes=t.numel() * t.element_size())
    return meta, t


def encode_batch(batch: WireBatch, chunk_bytes: int, wire_dtype: str = "float32") -> Iterator[bytes]:
    """Frames of one batch: BATCH (header + first bytes), then CHUNKs of <= chunk_bytes payload."""
    for parts in encode_batch_parts(batch, chunk_bytes, wire_dtype):
        yield b"".join(parts)


def encode_batch_parts(batch: WireBatch, chunk_bytes: int, wire_dtype: str = "float32",
                       ) -> Iterator[list[memoryview | bytes]]:
    """encode_batch's frames as `frame_parts` pieces, the payload still views of the tensors: a
    socket's sendmsg sends them without the join's copy (client/tcp_plane.py)."""
    if wire_dtype not in WIRE_FLOATS:
        raise ConfigError(f"pipeline.wire_dtype = {wire_dtype!r}; choose one of {', '.join(WIRE_FLOATS)}")
    metas, views = [], []
    for name, t in batch.tensors.items():
        meta, wt = _wire_tensor(name, t, wire_dtype, batch.ready)
        metas.append(meta)
        views.append(byte_view(wt))
    total = sum(m.nbytes for m in metas)
    header = pb.BatchHeader(run_id=batch.run_id, seq=batch.seq, kind=batch.kind, epoch=batch.epoch,
                            tensors=metas, total_bytes=total)
    kind, meta = pb.BATCH, header.SerializeToString()
    offset = 0
    pieces: list[memoryview] = []
    room = chunk_bytes
    for view in views:
        pos = 0
        while pos < len(view):
            take = min(room, len(view) - pos)
            pieces.append(view[pos:pos + take])
            pos += take
            room -= take
            if room == 0:
                yield frame_parts(kind, meta, pieces)
                offset += chunk_bytes
                kind, pieces, room = pb.CHUNK, [], chunk_bytes
                meta = pb.ChunkHeader(seq=batch.seq, offset=offset).SerializeToString()
    if pieces or kind == pb.BATCH:  # the rest, or an empty batch's header
        yield frame_parts(kind, meta, pieces)


def _check_tensor_meta(m: pb.TensorMeta, seen: set[str]) -> None:
    if not m.name:
        raise ProtocolError("a tensor in the batch header has no name")
    if m.name in seen:
        raise ProtocolError(f"tensor {m.name!r} appears twice in one batch")
    seen.add(m.name)
    for what, code in (("dtype", m.dtype), ("wire dtype", m.wire_dtype)):
        if code not in _FROM_PB:
            raise ProtocolError(f"tensor {m.name!r} has unknown {what} {code}; supported: "
                                f"{', '.join(DTYPES)}")
    logical, wire = _FROM_PB[m.dtype], _FROM_PB[m.wire_dtype]
    if wire != logical and not (logical == "float32" and wire in WIRE_FLOATS):
        raise ProtocolError(f"tensor {m.name!r} is {logical} but travels as {wire}; only float32 "
                            f"may travel as {', '.join(WIRE_FLOATS[1:])}")
    if len(m.shape) > MAX_DIMS or any(d < 0 for d in m.shape):
        raise ProtocolError(f"tensor {m.name!r} has invalid shape {list(m.shape)}")
    if math.prod(m.shape) == 0 and any(d > MAX_DIM for d in m.shape):
        # Empty, yet not allocatable ([0, 2**62, 2**62]: its strides overflow). A non-empty
        # tensor that large is over the batch size limit below (RESOURCE_EXHAUSTED).
        raise ProtocolError(f"tensor {m.name!r} has shape {list(m.shape)}: empty, but with a "
                            f"dimension over {MAX_DIM}")
    need = wire_nbytes(tuple(m.shape), wire) if wire != logical else math.prod(m.shape) * _itemsize(wire)
    if need != m.nbytes:
        raise ProtocolError(f"tensor {m.name!r} of shape {list(m.shape)} and wire dtype {wire} needs "
                            f"{need} bytes but its header says {m.nbytes}")


def check_header(header: pb.BatchHeader) -> None:
    """A batch header's structure and limits, before anything is allocated for it."""
    if len(header.tensors) > MAX_TENSORS:
        raise LimitError(f"batch {header.seq} lists {len(header.tensors)} tensors; at most "
                         f"{MAX_TENSORS} are allowed")
    seen: set[str] = set()
    for m in header.tensors:
        _check_tensor_meta(m, seen)
    total = sum(m.nbytes for m in header.tensors)
    if total != header.total_bytes:
        raise ProtocolError(f"batch {header.seq} says total_bytes = {header.total_bytes} but its "
                            f"tensors add up to {total}")
    if total > MAX_BATCH_BYTES:
        raise LimitError(f"batch {header.seq} is {total} bytes, over the {MAX_BATCH_BYTES}-byte "
                         "limit; use a smaller batch size")


# What a stage expects of a batch, per kind (pb.TRAIN / pb.EVAL): tensor name -> (logical dtype
# code, shape after the batch dimension). Learnt by the stage when it is configured.
Schema = dict[int, dict[str, tuple[int, tuple[int, ...]]]]


def schema_of(packet: Packet) -> dict[str, tuple[int, tuple[int, ...]]]:
    return {k: (_TO_PB[dtype_name(v.dtype)], tuple(v.shape[1:])) for k, v in packet.items()}


def check_schema(header: pb.BatchHeader, schema: Schema) -> None:
    """Refuse a batch whose tensors are not the names, dtypes and shapes the stage works on."""
    want = schema.get(header.kind)
    if want is None:
        return
    got = {m.name: m for m in header.tensors}
    kind = "train" if header.kind == pb.TRAIN else "eval"
    if set(got) != set(want):
        raise ProtocolError(f"{kind} batch {header.seq} carries tensors {sorted(got)} but this "
                            f"stage works on {sorted(want)}")
    for name, (dtype, trailing) in want.items():
        m = got[name]
        if m.dtype != dtype or tuple(m.shape[1:]) != trailing or not m.shape:
            raise ProtocolError(
                f"{kind} batch {header.seq}: tensor {name!r} is {_FROM_PB.get(m.dtype, m.dtype)} "
                f"{list(m.shape)} but this stage needs {_FROM_PB[dtype]} [batch, "
                f"{', '.join(map(str, trailing))}]")


def _is_int8_wire(m: pb.TensorMeta) -> bool:
    return m.wire_dtype == pb.INT8 and m.dtype == pb.FLOAT32


class BatchAssembler:
    """Rebuilds one batch from its BATCH frame and CHUNK frames, checking every step."""

    def __init__(self, header: pb.BatchHeader, checked: bool = False,
                 device: torch.device | None = None):
        if not checked:   # decode_frames checks before it asks the receiver to admit the batch
            check_header(header)
        self.header = header
        self.received = 0
        # Where the batch is going: a CUDA device gets pinned buffers, uploaded asynchronously.
        self.device = device if staging.overlaps(device) else None
        pin = self.device is not None
        self._tensors = [torch.empty(m.nbytes, dtype=torch.uint8, pin_memory=pin) if _is_int8_wire(m)
                         else torch.empty(tuple(m.shape), dtype=DTYPES[_FROM_PB[m.wire_dtype]],
                                          pin_memory=pin)
                         for m in header.tensors]
        self._views = [t.reshape(-1).view(torch.uint8).numpy() if t.numel() else None
                       for t in self._tensors]
        self._index, self._pos = 0, 0   # tensor being filled, bytes filled in it

    @property
    def complete(self) -> bool:
        return self.received == self.header.total_bytes

    def add(self, offset: int, payload: memoryview) -> None:
        """Copy `payload`, which must start at byte `offset` of the batch, into the tensors."""
        seq = self.header.seq
        if offset != self.received:
            raise ProtocolError(f"batch {seq}: chunk at byte offset {offset} arrived but {self.received} "
                                "bytes were received so far; a chunk is missing or out of order")
        if self.received + len(payload) > self.header.total_bytes:
            raise ProtocolError(f"batch {seq}: chunks carry more than the {self.header.total_bytes} "
                                "bytes its header announced")
        pos = 0
        while pos < len(payload):
            m = self.header.tensors[self._index]
            room = m.nbytes - self._pos
            if room == 0:
                self._index, self._pos = self._index + 1, 0
                continue
            take = min(room, len(payload) - pos)
            self._views[self._index][self._pos:self._pos + take] = payload[pos:pos + take]
            self._pos += take
            pos += take
        self.received += len(payload)

    def batch(self) -> WireBatch:
        if not self.complete:
            raise ProtocolError(f"batch {self.header.seq} ended after {self.received} of "
                                f"{self.header.total_bytes} bytes; chunks are missing")
        h, ready = self.header, None
        metas = list(h.tensors)
        up = [i for i, m in enumerate(metas) if self.device is not None and m.name not in HOST_KEYS]
        decoded = [_decode(m, t) for m, t in zip(metas, self._tensors, strict=True)
                   if self.device is None or m.name in HOST_KEYS]
        if up:
            on_device, ready = staging.upload([self._tensors[i] for i in up], self.device,
                                              lambda j, t: _decode(metas[up[j]], t))
        host, device_side = iter(decoded), iter(on_device if up else [])
        tensors: Packet = {m.name: next(device_side) if i in up else next(host)
                           for i, m in enumerate(metas)}
        return WireBatch(run_id=h.run_id, seq=h.seq, kind=h.kind, epoch=h.epoch, tensors=tensors,
                         ready=ready)


def decode_frames(frames: Iterable[bytes], admit: Callable[[pb.BatchHeader], None] | None = None,
                  place: Callable[[], torch.device | None] | None = None,
                  ) -> Iterator[WireBatch | pb.EndOfEpoch]:
    """Batches and end markers from a frame stream: the one frame reader (the stage worker's Push
    handler, the driver's Pull reader, tests). `admit(header)` may refuse a batch (raise) before
    any of its bytes are copied; `place()` names the device a batch goes to (a stage's), where a
    CUDA device gets it uploaded as it completes (client/staging.py)."""
    asm: BatchAssembler | None = None
    for frame in frames:
        kind, meta, payload = unpack_frame(frame)
        if kind == pb.CHUNK:
            if asm is None:
                raise ProtocolError("a CHUNK frame arrived without a BATCH frame before it")
            ch = parse_meta(pb.ChunkHeader, meta, "chunk")
            if ch.seq != asm.header.seq:
                raise ProtocolError(f"a chunk of batch {ch.seq} arrived while batch "
                                    f"{asm.header.seq} was incomplete")
            asm.add(ch.offset, payload)
        elif kind in (pb.BATCH, pb.END):
            if asm is not None:
                asm.batch()   # raises: the previous batch is incomplete
            if kind == pb.BATCH:
                header = parse_meta(pb.BatchHeader, meta, "batch")
                check_header(header)   # structure and limits first, then the receiver's say
                if admit is not None:
                    admit(header)
                asm = BatchAssembler(header, checked=True, device=place() if place else None)
                asm.add(0, payload)
            else:
                yield parse_meta(pb.EndOfEpoch, meta, "end-of-epoch")
        else:
            raise ProtocolError(f"frame kind {kind} is not valid in a batch stream (expected BATCH, "
                                "CHUNK or END)")
        if asm is not None and asm.complete:
            batch, asm = asm.batch(), None
            yield batch
    if asm is not None:
        raise ProtocolError(f"the stream ended inside batch {asm.header.seq} after {asm.received} "
                            f"of {asm.header.total_bytes} bytes; chunks are missing")


# ---------------------------------------------------------------------------------------------
# Weights (control plane, protobuf TensorChunk; always exact)


def encode_state(state: dict[str, torch.Tensor], chunk_bytes: int) -> Iterator[pb.TensorChunk]:
    for name, t in state.items():
        meta, wt = _wire_tensor(name, t, "float32")
        view = byte_view(wt)
        yield pb.TensorChunk(meta=meta, offset=0, data=bytes(view[:chunk_bytes]))
        for off in range(chunk_bytes, len(view), chunk_bytes):
            yield pb.TensorChunk(offset=off, data=bytes(view[off:off + chunk_bytes]))


def decode_state(chunks: Iterable[pb.TensorChunk]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    asm: BatchAssembler | None = None

    def finish() -> None:
        if asm is not None:
            b = asm.batch()
            state.update(b.tensors)

    for ch in chunks:
        if ch.HasField("meta"):
            finish()
            _check_tensor_meta(ch.meta, seen)
            asm = BatchAssembler(pb.BatchHeader(seq=len(state), tensors=[ch.meta],
                                                total_bytes=ch.meta.nbytes))
        elif asm is None:
            raise ProtocolError("a weights chunk without a tensor header came first")
        asm.add(ch.offset, memoryview(ch.data))
    finish()
    return state
