"""Data-parallel training under ``accelerate launch`` (or torchrun).

One process per GPU (or, for tests, per CPU process with gloo). accelerate's
``PartialState`` reads the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR) and opens the process group: NCCL on GPUs, gloo on CPUs.

Why no ``DistributedDataParallel`` wrapper: the shared loop accumulates the
gradients of *summed* token losses over ``grad_accum`` micro-batches and divides
by the step's token count over all processes once, in ``optimizer_step``. DDP
would average gradients on every backward (wrong scale, and one all-reduce per
micro-batch). Instead the engine all-reduces (sums) the LoRA gradients once per
optimizer step, which is exactly DDP's gradient sync done at the moment the loop
needs it; LoRA gradients are small (a few MB), so one flat all-reduce is cheap.
Every process starts from the same LoRA weights (seeded, then broadcast from
rank 0) and applies the same update, so the replicas never drift apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


def launched_world_size() -> int:
    """Processes started by the launcher (1 when run as a plain command)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where this process computes ("cuda:0", "cpu")
    comm_device: str = "cpu"  # where collective tensors live (NCCL needs GPU tensors)
    _state: Any = field(default=None, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.tolist()]

    def sum_gradients_(self, params: list[Any]) -> None:
        """Replace each process's gradients by their sum over all processes."""
        if not self.distributed:
            return
        import torch
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = []
        for p in params:
            if p.grad is None:  # a LoRA module that saw no token on this process
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for g, s in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(s)

    def broadcast_(self, params: list[Any]) -> None:
        """Make every process hold rank 0's values (as DDP does at start-up)."""
        if not self.distributed:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        data = [p.data for p in params]
        flat = _flatten_dense_tensors(data)
        dist.broadcast(flat, src=0)
        for d, s in zip(data, _unflatten_dense_tensors(flat, data), strict=True):
            d.copy_(s)

    def close(self) -> None:
        """Wait for every process (rank 0 may still be writing), then leave the group."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def init(use_cuda: bool) -> DistContext:
    """Join the launcher's process group if there is one; pick this process's device."""
    world = launched_world_size()
    if world <= 1:
        return DistContext(device="cuda:0" if use_cuda else "cpu",
                           comm_device="cuda:0" if use_cuda else "cpu")
    from accelerate import PartialState

    state = PartialState(cpu=not use_cuda)
    local = state.local_process_index
    if use_cuda:
        import torch

        torch.cuda.set_device(local)
        dev = f"cuda:{local}"
    else:
        dev = "cpu"
    comm = dev if state.backend == "nccl" else "cpu"
    return DistContext(rank=state.process_index, world_size=state.num_processes,
                       local_rank=local, device=dev, comm_device=comm, _state=state)
