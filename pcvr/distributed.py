"""Several processes, one model: ``torchrun`` setup, gradient averaging (dense and sparse),
equal step counts, and predictions gathered from every rank.

Launch (one machine, P processes; gloo on CPU, NCCL on CUDA)::

    torchrun --nproc_per_node P train.py --preset seed --data_dir DIR ...

Several machines: the same command on each, with ``--nnodes N --node_rank R
--rdzv_backend c10d --rdzv_endpoint HOST:PORT`` (``run.sh`` does this for one machine).

Gradients are averaged by hand after ``backward`` rather than by ``DistributedDataParallel``,
because the embedding tables have sparse gradients and NCCL has no sparse all-reduce:

* dense parameters: one all-reduce of their flattened gradients;
* sparse tables: an all-gather of each rank's touched rows (indices and values, padded to the
  largest count), summed into one coalesced sparse gradient on every rank. Its cost is the
  touched rows of all ranks, ``world x max_touched x E`` values per table and step, not the
  table: for the seed model at batch 256 a few MB per step instead of ~1 GB.

Every rank thus applies the same averaged gradient and keeps identical weights, optimiser
state and EMA, with no sharding of the tables (each rank holds them all: memory is that of one
process per rank).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, List, Sequence

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# A rank that waits this long in a collective gives up (a peer died or hangs).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_type: str) -> World:
    """Joins the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``...); a single process when it describes none.

    Args:
        device_type: ``'cuda'`` (NCCL) or ``'cpu'`` (gloo).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                timeout=COLLECTIVE_TIMEOUT)
    return world


def shutdown(finished: bool = True) -> None:
    """Leaves the process group. After a finished run every rank first waits for the others,
    so that none tears its connections down while another is still in a collective (gloo
    aborts that one); after a failure it leaves at once (a barrier could wait on a dead rank).
    """
    if dist.is_available() and dist.is_initialized():
        if finished and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes of the run (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def gather_objects(obj: Any) -> List[Any]:
    """``obj`` of every rank, in rank order (a collective: every rank must call it)."""
    if not active():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest ``value`` over all ranks (the value itself in one process)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class GradientSync:
    """Averages the gradients of ``params`` over all ranks after ``backward`` (module docstring).

    Args:
        dense: parameters with dense gradients.
        sparse: parameters that may have sparse gradients (embedding tables).
    """

    def __init__(self, dense: Sequence[torch.nn.Parameter],
                 sparse: Sequence[torch.nn.Parameter]) -> None:
        self.dense, self.sparse = list(dense), list(sparse)
        self.world = dist.get_world_size()

    def __call__(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.dense]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            for p, g in zip(self.dense, flat.split([g.numel() for g in grads])):
                p.grad = g.view_as(p)
        for p in self.sparse:
            p.grad = self._sparse_mean(p)

    def _sparse_mean(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The rank-mean of ``p``'s gradient, sparse when ``p``'s gradient is sparse."""
        grad = p.grad
        if grad is None or not grad.is_sparse:
            dense = grad if grad is not None else torch.zeros_like(p)
            dist.all_reduce(dense)
            return dense / self.world
        grad = grad.coalesce()
        idx, val = grad.indices()[0], grad.values()
        counts = [torch.zeros(1, dtype=torch.int64, device=idx.device)
                  for _ in range(self.world)]
        dist.all_gather(counts, torch.tensor([idx.numel()], device=idx.device))
        most = int(max(int(c) for c in counts))
        pad = most - idx.numel()  # all_gather needs equal shapes: pad, then cut
        idx_p = torch.cat([idx, idx.new_zeros(pad)])
        val_p = torch.cat([val, val.new_zeros((pad,) + tuple(val.shape[1:]))])
        all_idx = [torch.empty_like(idx_p) for _ in range(self.world)]
        all_val = [torch.empty_like(val_p) for _ in range(self.world)]
        dist.all_gather(all_idx, idx_p)
        dist.all_gather(all_val, val_p)
        keep = [int(c) for c in counts]
        indices = torch.cat([i[:k] for i, k in zip(all_idx, keep)]).unsqueeze(0)
        values = torch.cat([v[:k] for v, k in zip(all_val, keep)]) / self.world
        return torch.sparse_coo_tensor(indices, values, grad.shape).coalesce()


def broadcast_from_first(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrites ``tensors`` on every rank with rank 0's values, in place (nothing in one
    process). For state drawn from the random generators, whose streams differ between ranks
    once the ranks have read different numbers of rows."""
    if active():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def gather_arrays(arrays: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Each array concatenated over all ranks, in rank order (the arrays themselves in one
    process)."""
    parts = gather_objects(list(arrays))
    return [np.concatenate([p[k] for p in parts]) for k in range(len(arrays))]
