"""Helpers for tests that run several processes joined in one gloo (CPU) or NCCL (GPU) group on this machine."""

import gc
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    """A localhost TCP port that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(rank, world, port, fn, args, backend="gloo"):
    torch.set_num_threads(1)  # two cores shared by every process
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank) if backend == "nccl" else None)
    try:
        fn(rank, world, *args)
        # Leave together, with no finished transfer (Work) object still alive: a gloo process was once
        # seen to abort at teardown (SIGABRT, "terminate called without an active exception") in CI.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world, *args):
    """Run fn(rank, world, *args) in `world` spawned processes of one gloo group; fn must be module-level."""
    mp.spawn(_process, args=(world, free_port(), fn, args), nprocs=world, join=True)


def run_nccl(fn, world, *args):
    """Like run_gloo, on `world` GPUs joined by NCCL (process r uses cuda:r)."""
    mp.spawn(_process, args=(world, free_port(), fn, args, "nccl"), nprocs=world, join=True)
