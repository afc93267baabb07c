"""The committed generated stubs are exactly what the pinned grpcio-tools makes of the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROTOS = ["protos/stage.proto"]
# protos/ is installed as bpfree.protos: protoc sees it under that name, so the stubs import
# `bpfree.protos.stage_pb2` and register `bpfree/protos/stage.proto`.
INCLUDE = "-Ibpfree/protos=protos"
SUFFIXES = ["_pb2.py", "_pb2_grpc.py", "_pb2.pyi"]


def test_grpcio_tools_is_the_pinned_version() -> None:
    from importlib.metadata import version

    assert version("grpcio-tools").startswith("1.81."), "regenerate stubs with grpcio-tools 1.81.x"


@pytest.mark.parametrize("proto", PROTOS)
def test_generated_stubs_match_the_proto(proto: str, tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", INCLUDE, f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", proto],
        cwd=REPO, check=True, capture_output=True, text=True)
    stem = proto[: -len(".proto")]
    for suffix in SUFFIXES:
        fresh = (tmp_path / "bpfree" / f"{stem}{suffix}").read_text()
        committed = (REPO / f"{stem}{suffix}").read_text()
        assert committed == fresh, (
            f"{stem}{suffix} is out of date with {proto}; regenerate it from the repo root with "
            f"`python -m grpc_tools.protoc {INCLUDE} --python_out=/tmp/pb --pyi_out=/tmp/pb "
            f"--grpc_python_out=/tmp/pb {proto} && cp /tmp/pb/bpfree/protos/* protos/`")
