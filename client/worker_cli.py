"""`bpfree worker`: serve one pipeline stage over gRPC until stopped (SIGTERM / Ctrl-C)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:0",
                        help="HOST:PORT to serve on (port 0 = pick a free one; see --port-file)")
    parser.add_argument("--data-listen", default="",
                        help="HOST:PORT of the TCP data plane, opened when a run sets "
                             "pipeline.data_plane = tcp (default: --listen's host, any free port)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for this stage")
    parser.add_argument("--token", default=os.environ.get("BPFREE_TOKEN", ""),
                        help="shared secret every RPC must carry (default $BPFREE_TOKEN)")
    parser.add_argument("--tls-cert", default="", help="server certificate (PEM)")
    parser.add_argument("--tls-key", default="", help="server private key (PEM)")
    parser.add_argument("--tls-ca", default="",
                        help="CA certificate (PEM) to verify the downstream stage's TLS certificate")
    parser.add_argument("--port-file", type=Path,
                        help="write the bound port here once serving (readiness signal)")
    parser.add_argument("--parent-pid", type=int, default=0,
                        help="stop when this process (the launcher) is gone, e.g. killed with "
                             "SIGKILL: a launched worker never outlives its driver")
    parser.add_argument("--idle-timeout", type=float, default=60.0,
                        help="close a connection that completes no handshake or carries no RPC "
                             "for this many seconds (default 60)")
    parser.add_argument("--scratch-dir", type=Path,
                        help="the launcher's scratch directory: removed by the worker that finds "
                             "the launcher gone (it can no longer clean up after itself)")


def run(args: argparse.Namespace) -> int:
    # Threads first: before torch runs anything (and before gRPC creates its threads).
    import torch

    from bpfree.client.memory import tune_malloc

    tune_malloc()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from bpfree.client.transport import Security
    from bpfree.client.worker import StageWorker, build_server
    from bpfree_core.runtime import resolve_device

    device = str(resolve_device(args.device))   # fail now, clearly, if the GPU is missing
    security = Security(token=args.token, tls_cert=args.tls_cert, tls_key=args.tls_key,
                        tls_ca=args.tls_ca)
    worker = StageWorker(device, security, threads=max(args.threads, 0),
                         data_listen=args.data_listen)
    if not 0 < args.idle_timeout < float("inf"):
        from bpfree_core.errors import ConfigError

        raise ConfigError(f"--idle-timeout {args.idle_timeout:g} must be a positive number of seconds")
    if args.data_listen:   # opened at the first Configure that asks for it: check it now
        from bpfree.client.transport import check_port_free

        check_port_free(args.data_listen, "--data-listen")
    server, port = build_server(worker, args.listen, security, idle_timeout=args.idle_timeout)
    host = args.listen.rsplit(":", 1)[0]
    worker.address = f"{host}:{port}"
    server.start()
    log.info("stage worker serving on %s (host %s, pid %d, device %s, %d torch thread(s), tls %s, "
             "token %s); layers are assigned by Configure", worker.address, socket.gethostname(),
             os.getpid(), device, torch.get_num_threads(), "on" if args.tls_cert else "off",
             "required" if args.token else "off")
    if args.port_file:
        tmp = args.port_file.with_name(args.port_file.name + ".tmp")
        tmp.write_text(f"{port}\n")
        os.replace(tmp, args.port_file)   # atomic: readers never see a half-written file
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    orphaned = threading.Event()
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, stop, orphaned),
                         name="parent", daemon=True).start()
    stop.wait()
    log.info("stage worker %s stopping", worker.address)
    worker.shutdown()
    server.stop(grace=0.5).wait(timeout=5.0)
    log.info("stage worker %s stopped", worker.address)
    if orphaned.is_set() and args.scratch_dir is not None:
        shutil.rmtree(args.scratch_dir, ignore_errors=True)   # port files, logs: nobody reads them
    # Everything is closed; skip the interpreter teardown, which spends seconds in gRPC core and
    # torch C++ shutdown (measured: 2-3 s) and would make every `stop by PID` slow.
    logging.shutdown()
    os._exit(0)


def _watch_parent(parent: int, stop: threading.Event, orphaned: threading.Event,
                  every: float = 0.5) -> None:
    """Set `orphaned` and `stop` once `parent` is no longer our parent (it died; we were
    re-parented)."""
    while not stop.wait(every):
        if os.getppid() != parent:
            log.warning("launcher pid %d is gone; stopping", parent)
            orphaned.set()
            stop.set()

