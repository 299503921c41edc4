"""The few collectives the workers use, through torch.distributed (the process group Ray Train
sets up); each also works in a single process, where it is the identity."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(obj) -> list:
    """Every rank's `obj`, on every rank (small objects only: node ids, weight hashes)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_rank0(obj) -> list | None:
    """Every rank's `obj` on rank 0 (in rank order); None on the other ranks. With NCCL the
    objects travel through the current CUDA device, which Ray Train sets for each worker."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_rank0(obj):
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_across_workers(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) into every rank's `module`, as DDP does at
    each of its forwards: each rank's last training step updated its own."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)
