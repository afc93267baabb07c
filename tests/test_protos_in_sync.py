"""The committed generated stubs are exactly what the pinned grpcio-tools makes of the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROTOS = ["protos/stage.proto"]
SUFFIXES = ["_pb2.py", "_pb2_grpc.py", "_pb2.pyi"]


def test_grpcio_tools_is_the_pinned_version() -> None:
    from importlib.metadata import version

    assert version("grpcio-tools").startswith("1.81."), "regenerate stubs with grpcio-tools 1.81.x"


@pytest.mark.parametrize("proto", PROTOS)
def test_generated_stubs_match_the_proto(proto: str, tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", proto],
        cwd=REPO, check=True, capture_output=True, text=True)
    stem = proto[: -len(".proto")]
    for suffix in SUFFIXES:
        fresh = (tmp_path / f"{stem}{suffix}").read_text()
        committed = (REPO / f"{stem}{suffix}").read_text()
        assert committed == fresh, (
            f"{stem}{suffix} is out of date with {proto}; regenerate it from the repo root with "
            "`python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. "
            f"{proto}`")
