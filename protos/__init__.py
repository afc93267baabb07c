"""Wire protocol of the stage workers (proto package `bpfree.v1`).

`stage.proto` is the source; `stage_pb2*.py(i)` are generated from the repository root with the
pinned grpcio-tools and committed (tests/test_protos_in_sync.py fails when they drift):

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/stage.proto
"""
