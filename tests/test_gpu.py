"""On a CUDA GPU (skipped, with the reason, elsewhere): the golden rule, fused Adam, bf16, compile
and placement on two devices, run for real. `bash bench/gpu_check.sh` runs these first."""

from __future__ import annotations

import pytest
import torch

from bpfree_core.config import load_config
from bpfree_core.model import Stage, build_layers
from tests.support import assert_two_stages_equal_one, synthetic_packets

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="no CUDA GPU here: these run where one is")


def _cfg(*extra: str):  # noqa: ANN202
    return load_config(None, ["model.algorithm=ff", "model.hidden=64,64", "train.batch_size=32",
                              "train.device=cuda", *extra])


@pytest.mark.parametrize("extra", [(), ("optim.kernels=fused",), ("train.precision=bf16",),
                                   ("train.compile=true",), ("train.tf32=true",)],
                         ids=["float32", "fused-adam", "bf16", "compile", "tf32"])
def test_one_stage_equals_two_on_the_gpu(extra: tuple[str, ...]) -> None:
    cfg = _cfg(*extra)
    assert_two_stages_equal_one(cfg, synthetic_packets(cfg, 4), ("cuda",) * 3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="one GPU here: placement needs two")
def test_stages_on_two_gpus_equal_one_gpu() -> None:
    cfg = _cfg()
    assert_two_stages_equal_one(cfg, synthetic_packets(cfg, 4), ("cuda:0", "cuda:0", "cuda:1"))


def test_a_gpu_step_matches_the_cpu_step_within_rounding() -> None:
    cfg = _cfg()
    packets = synthetic_packets(cfg, 3)
    gpu, cpu = Stage(build_layers(cfg), "cuda"), Stage(build_layers(cfg), "cpu")
    for p in packets:
        gpu.train_step(p)
        cpu.train_step(p)
    a, b = gpu.state_dict(), cpu.state_dict()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("wire", ["float32", "bfloat16", "int8"])
def test_the_wire_stages_through_pinned_memory_and_decodes_on_the_gpu(wire: str) -> None:
    """A batch sent from the GPU and received for the GPU (client/staging.py) holds what the
    host path holds: encoded on the device, pinned, uploaded on a copy stream, decoded there."""
    from bpfree.client.wire import WireBatch, decode_frames, encode_batch
    from bpfree.protos import stage_pb2 as pb
    from bpfree_core.layers import REFERENCE

    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    host = WireBatch("r", 1, pb.TRAIN, 0, {"x": x, REFERENCE: torch.tensor([True])})
    cuda = torch.device("cuda")
    ready = torch.cuda.Event()
    ready.record()
    sent = WireBatch("r", 1, pb.TRAIN, 0, {"x": x.to(cuda), REFERENCE: torch.tensor([True])}, ready)
    frames = list(encode_batch(sent, 4096, wire))
    expect = next(iter(decode_frames(encode_batch(host, 4096, wire))))
    got = next(iter(decode_frames(frames, place=lambda: cuda)))
    assert got.ready is not None and got.tensors["x"].is_cuda
    assert got.tensors[REFERENCE].device.type == "cpu"   # read on the host before a step
    torch.cuda.current_stream().wait_event(got.ready)
    tol = {"float32": 0.0, "bfloat16": 0.0, "int8": 1e-6}[wire]
    torch.testing.assert_close(got.tensors["x"].cpu(), expect.tensors["x"], rtol=0, atol=tol)


RULES = [("ff", ["objective.negatives=hard"]), ("symba", ["objective.negatives=hard"]),
         ("sffa", []), ("mono", []), ("ffcl", []), ("uff", []),
         ("cwc", ["model.conv=10,20", "model.hidden=[]"]),
         ("deeper", ["model.conv=10,20", "model.hidden=[]"]),
         ("asge", ["model.conv=8,16", "model.hidden=[]"])]


@pytest.mark.parametrize(("algorithm", "extra"), RULES, ids=[r[0] for r in RULES])
def test_a_gpu_step_never_waits_for_the_host(algorithm: str, extra: list[str]) -> None:
    """torch's sync debug mode raises on any synchronising call inside a training step."""
    cfg = load_config(None, [f"model.algorithm={algorithm}", "model.hidden=32,32",
                             "train.batch_size=16", "train.device=cuda", *extra])
    packets = [{k: v.cuda() for k, v in p.items()} for p in synthetic_packets(cfg, 3)]
    stage = Stage(build_layers(cfg), "cuda")
    stage.train_step(packets[0])   # first step: lazy state (optimizer, host step mirror)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p in packets[1:]:
            stage.train_step(p)
    finally:
        torch.cuda.set_sync_debug_mode("default")
