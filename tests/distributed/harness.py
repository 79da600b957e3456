"""Spawn ``world`` CPU processes on gloo, run a function on each, collect what each returns.

The tests need no launcher: :func:`spawn` starts the ranks with torch.multiprocessing, each
rank calls ``fn(rank, world, *args)`` after joining a process group on a free loopback port,
and its (picklable) result is written to a file the parent reads back.  A rank that raises
fails the test with its traceback.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("SEQFUSE_STRICT", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = ("ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        result = ("error", traceback.format_exc())
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def spawn(fn, world: int, *args) -> list:
    """``[fn(0, world, *args), …, fn(world-1, world, *args)]``, each run in its own process."""
    with tempfile.TemporaryDirectory(prefix="seqfuse-dist-") as out_dir:
        mp.start_processes(_entry, args=(world, _free_port(), out_dir, fn, args), nprocs=world,
                           start_method="spawn", join=True)
        results = []
        for rank in range(world):
            status, value = pickle.loads(Path(out_dir, f"rank{rank}.pkl").read_bytes())
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
    return results
