"""Running a function on N local CPU processes joined by a gloo process group, under a hard timeout.

Everything binds to 127.0.0.1 (the rendezvous on a free port, gloo's own connections on the
loopback interface). A rank that hangs or dies fails the caller with the ranks' tracebacks
instead of hanging the test session.

Ranks start from a fork server that has imported torch and triton_attn once (``PRELOAD``): on a
loaded 2-core machine, four fresh interpreters importing torch take ~15 s, forks take ~1 s. The
server never runs a parallel region, so forking it is safe for OpenMP.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LOOPBACK = "127.0.0.1"
PRELOAD = ["torch", "torch.distributed", "triton_attn", "triton_attn.distributed", "triton_attn.reference"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, timeout_s: float, args: tuple) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's pairs listen on the loopback interface only
    torch.set_num_threads(1)  # N ranks share the machine's few cores
    dist.init_process_group("gloo", init_method=f"tcp://{LOOPBACK}:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args, timeout_s: float = 120.0) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; re-raise any failure.

    ``fn`` must be importable by module and name (defined at a module's top level).
    """
    mp.set_forkserver_preload(PRELOAD)  # takes effect when the first test starts the server
    context = mp.start_processes(_entry, args=(fn, world_size, free_port(), timeout_s, args), nprocs=world_size,
                                 join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):  # join raises ProcessRaisedException when a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{world_size} ranks running {fn.__name__} did not finish within {timeout_s:.0f} s")
