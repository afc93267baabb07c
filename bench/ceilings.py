"""Physical ceilings on this machine, measured between two processes: raw TCP, raw-bytes gRPC, matmul.

Importable (a sweep tool reuses these); each function spawns its own receiver process (spawn,
never fork) and returns bytes/s or FLOP/s. Run alone: `python -m bpfree.bench.ceilings`.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import struct
import time
from typing import Any

_ACK = b"k"


# -- raw TCP ------------------------------------------------------------------------------------

def _tcp_receiver(port_q: Any, msg_bytes: int, count: int) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(msg_bytes)
    view = memoryview(buf)
    for _ in range(count):
        got = 0
        while got < msg_bytes:
            n = conn.recv_into(view[got:], msg_bytes - got)
            if n == 0:
                return
            got += n
        conn.sendall(_ACK)   # one ack per message: the sender keeps a window of them in flight
    conn.close()
    srv.close()


def tcp_throughput(msg_bytes: int, total_bytes: int = 256 << 20, window: int = 8) -> float:
    """Bytes/s of `sendall`/`recv_into` over loopback TCP, one ack per message, `window` in flight."""
    count = max(window, total_bytes // msg_bytes)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_tcp_receiver, args=(q, msg_bytes, count), daemon=True)
    proc.start()
    try:
        port = q.get(timeout=60)
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = bytes(msg_bytes)
        t0 = time.perf_counter()
        acked = 0
        for i in range(count):
            if i - acked >= window:
                acked += len(sock.recv(1))
            sock.sendall(payload)
        while acked < count:
            acked += len(sock.recv(count - acked))
        seconds = time.perf_counter() - t0
        sock.close()
        return count * msg_bytes / seconds
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


# -- raw-bytes gRPC -----------------------------------------------------------------------------

def _grpc_receiver(port_q: Any, stop_ev: Any, extra_options: list) -> None:
    from concurrent import futures

    import grpc

    from bpfree.client.memory import tune_malloc
    from bpfree.client.transport import server_options

    tune_malloc()   # the same allocator settings as a stage worker: a fair ceiling

    def upload(frames: Any, context: Any) -> bytes:
        n = 0
        for frame in frames:
            n += len(frame)
        return struct.pack("<Q", n)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=server_options() + list(extra_options))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "raw.Raw", {"Upload": grpc.stream_unary_rpc_method_handler(upload)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_q.put(port)
    stop_ev.wait(600)
    server.stop(None)


def grpc_raw_throughput(msg_bytes: int, total_bytes: int = 256 << 20, chunk_bytes: int = 1 << 20,
                        extra_options: tuple = ()) -> float:
    """Bytes/s of a raw-bytes client stream (no protobuf), messages cut into `chunk_bytes` pieces.

    Uses the project's channel/server options (client/transport.py) plus `extra_options`.
    """
    import grpc

    from bpfree.client.memory import tune_malloc
    from bpfree.client.transport import channel_options

    tune_malloc()
    chunk = min(chunk_bytes, msg_bytes)
    pieces = [bytes(chunk)] * (msg_bytes // chunk) + ([bytes(msg_bytes % chunk)] if msg_bytes % chunk else [])
    count = max(1, total_bytes // msg_bytes)
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_grpc_receiver, args=(q, stop, list(extra_options)), daemon=True)
    proc.start()
    try:
        port = q.get(timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{port}",
                                   options=channel_options() + list(extra_options)) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            upload = channel.stream_unary("/raw.Raw/Upload")
            upload(iter([b"x"]), timeout=30)   # warm the connection
            t0 = time.perf_counter()
            got = struct.unpack("<Q", upload((p for _ in range(count) for p in pieces), timeout=600))[0]
            seconds = time.perf_counter() - t0
        return got / seconds
    finally:
        stop.set()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


# -- compute ------------------------------------------------------------------------------------

def matmul_flops(n: int = 1024, threads: int = 1, seconds: float = 1.0) -> float:
    """FLOP/s of a float32 n x n matmul with `threads` torch threads, in this process."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        return 2 * n**3 * reps / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    for size in (1 << 20, 4 << 20):
        print(f"{size >> 20} MiB: tcp {tcp_throughput(size) / 2**30:.2f} GiB/s, "
              f"grpc raw {grpc_raw_throughput(size) / 2**30:.2f} GiB/s")
    print(f"matmul 1 thread: {matmul_flops() / 1e9:.1f} GFLOP/s")
