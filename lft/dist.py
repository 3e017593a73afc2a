"""Distributed set-up from torchrun's environment, and the collectives the scripts use.

Same code on CPU, one GPU and N GPUs: nccl on CUDA, gloo on CPU. Side effects on rank 0 only (print0);
collectives on every rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .common import redact


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: str = "auto") -> Dist:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun); start the process group if world > 1."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", device_id=dev if want_cuda else None,
                                **_restart_safe_store(rank, world))
    return Dist(rank, world, local, dev)


def _restart_safe_store(rank: int, world: int) -> dict:
    """Under torchrun --max_restarts, a restarted group must not read the dead group's addresses. torchrun keeps
    one rendezvous store across restarts (torch 2.13, see pytorch/pytorch#167288), so without a prefix per
    attempt the new ranks connect to ports of killed ones ("Connection refused") and the restart fails."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return {}
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://"))
    return {"store": dist.PrefixStore(f"lft-attempt-{attempt}", store), "rank": rank, "world_size": world}


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kw) -> None:
    """Print on rank 0 only; strings pass through redact(), so a path or URI never shows a password."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*(redact(a) if isinstance(a, str) else a for a in args), **kw, flush=True)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum over ranks (call on every rank). gloo reduces CPU tensors, nccl CUDA ones."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj, d: Dist) -> list:
    """Every rank's `obj`, in rank order (call on every rank)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
