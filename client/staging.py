"""Host <-> accelerator copies of the wire's tensors, overlapped with compute (CUDA only).

Receive: a batch's bytes land in pinned host buffers, go up with `non_blocking` on a copy stream,
and are decoded (bf16 -> float32, int8 -> float32) on the device there; the batch carries an
event, and the compute stream waits on that event, not on the host. Send: the copy stream waits
on the event the compute thread recorded after the step that made the tensor, encodes it on the
device (4x fewer bytes come down for int8) and copies it into pinned memory; only the sending
thread waits for that copy. On the CPU (and any other device) nothing here runs: the wire's
tensors take the plain path, bit-identical to a run without this module.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from bpfree_core.layers import Packet

_streams: dict[tuple[str, int], torch.cuda.Stream] = {}
_lock = threading.Lock()


def overlaps(device: torch.device | None) -> bool:
    """Whether the wire stages this device's tensors through pinned memory and copy streams."""
    return device is not None and device.type == "cuda"


def copy_stream(device: torch.device, direction: str) -> torch.cuda.Stream:
    """One stream per device and direction ("up", "down"): an upload never queues behind a
    download that waits for compute."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        key = (direction, index)
        if key not in _streams:
            _streams[key] = torch.cuda.Stream(device=index)
        return _streams[key]


def upload(raw: Sequence[torch.Tensor], device: torch.device,
           decode: Callable[[int, torch.Tensor], torch.Tensor],
           ) -> tuple[list[torch.Tensor], torch.cuda.Event]:
    """Pinned host tensors -> `decode(i, on_device)` for each, on the device's upload stream; the
    event marks when they are ready."""
    stream = copy_stream(device, "up")
    with torch.cuda.device(stream.device), torch.cuda.stream(stream):
        out = [decode(i, t.to(device, non_blocking=True)) for i, t in enumerate(raw)]
        ready = torch.cuda.Event()
        ready.record(stream)
    return out, ready


def download(t: torch.Tensor, ready: torch.cuda.Event | None,
             encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`encode(t)` on t's device, copied into pinned host memory on the download stream after
    `ready` (or after everything queued so far); waits for that copy only."""
    if t.device.type != "cuda":
        return encode(t.cpu())
    stream = copy_stream(t.device, "down")
    with torch.cuda.device(t.device), torch.cuda.stream(stream):
        if ready is not None:
            stream.wait_event(ready)
        else:
            stream.wait_stream(torch.cuda.default_stream(t.device))
        encoded = encode(t)
        host = torch.empty(encoded.shape, dtype=encoded.dtype, pin_memory=True)
        host.copy_(encoded, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    done.synchronize()
    return host


def wait_ready(packet: Packet, ready: torch.cuda.Event | None, device: torch.device) -> None:
    """Order the compute stream after a received batch's upload, and tell the allocator its
    tensors are used there (they were made on the upload stream)."""
    if ready is None or not overlaps(device):
        return
    stream = torch.cuda.current_stream(device)
    stream.wait_event(ready)
    for t in packet.values():
        if t.is_cuda:
            t.record_stream(stream)


def mark_ready(device: torch.device) -> torch.cuda.Event | None:
    """An event after the compute stream's work so far: a sender's copy waits on it alone."""
    if not overlaps(device):
        return None
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(device))
    return ready
