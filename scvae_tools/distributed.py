"""Distributed data-parallel training with the standard PyTorch stack (``torch.distributed``).

``model.train(strategy="ddp")`` inside processes started by ``torchrun`` trains one replica
per process: each rank reads its own shard of the cells, gradients are all-reduced by
:class:`~torch.nn.parallel.DistributedDataParallel` (NCCL on GPUs, Gloo on CPUs), epoch
metrics are all-reduced so every rank takes the same early-stopping decision, and only
rank 0 shows progress and writes results.

Launch (one process per GPU, or per CPU socket)::

    # one machine, 4 GPUs
    torchrun --nproc-per-node 4 -m scvae_tools.cli fit atlas.h5ad -o out.h5ad --backed
    # two machines, 8 GPUs each: run on both, same rendezvous endpoint (host:port of node 0)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint node0.example.org:29400 --rdzv-id atlas1 \\
        -m scvae_tools.cli fit atlas.h5ad -o out.h5ad --backed

Sharding (every cell exactly once per epoch)
--------------------------------------------
Each epoch all ranks draw the *same* random order of the training cells (a shared seed:
the trainer's generator is seeded identically on every rank; for backed data the order is
chunk-local, see :meth:`~scvae_tools.backed.BackedCellData.epoch_order`). Rank ``r`` takes
the ``r``-th contiguous slice of that order; slices differ in size by at most one cell.
Nothing is padded or dropped: DDP needs the same number of optimizer steps on every rank,
so every rank uses the step count of the smallest slice, with minibatches of
``batch_size`` cells except the last, which takes the rest of the slice (at most
``batch_size`` + a few cells). ``batch_size`` is therefore *per rank*: a step averages the
gradients of ``world_size · batch_size`` cells. The validation cells are split the same way
and the ELBO sums all-reduced.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .adapter import Batch
from .devices import seed_generators  # (not torch.manual_seed, which seeds every GPU)

_ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True when the torchrun / ``torch.distributed`` environment variables are set."""
    return all(v in os.environ for v in _ENV_VARS)


def env_rank() -> int:
    """This process's global rank (0 outside a distributed launch)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0 (and in ordinary single-process runs): the process that writes."""
    return env_rank() == 0


@dataclass
class DistContext:
    """The process group one training run uses (rank, world size, device).

    Create it with :meth:`from_env`; :meth:`close` destroys the group if this object
    created it.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str | torch.device = "auto") -> DistContext:
        """Join (or initialise from torchrun's environment variables) the default process group.

        The device is ``cuda:LOCAL_RANK`` when CUDA is available and ``device`` is
        ``"auto"`` or ``"cuda"``, else the CPU; the backend is NCCL for CUDA, Gloo otherwise.
        """
        if not dist.is_available():
            raise RuntimeError("This PyTorch build has no torch.distributed; strategy='ddp' "
                               "is unavailable. Use strategy=None.")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device(device) if not (isinstance(device, str) and device == "auto") else None
        if dev is None:
            dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        elif dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"strategy='ddp' supports CPU (Gloo) and CUDA (NCCL) devices, not {dev}.")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        owns = False
        if not dist.is_initialized():
            if not launched_by_torchrun():
                raise ValueError(
                    "strategy='ddp' needs a process group: launch with torchrun, e.g. "
                    "`torchrun --nproc-per-node 2 -m scvae_tools.cli fit IN.h5ad -o OUT.h5ad`, "
                    "or call torch.distributed.init_process_group first. For one process use "
                    "strategy=None."
                )
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, init_method="env://")
            owns = True
        backend = str(dist.get_backend())
        if dev.type == "cpu" and backend == "nccl":
            raise ValueError("The process group uses NCCL but training runs on the CPU; use the "
                             "Gloo backend or a CUDA device.")
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   local_rank=local_rank, device=dev, backend=backend, owns_group=owns)

    def close(self, finished: bool = True) -> None:
        """Destroy the process group if :meth:`from_env` created it.

        ``finished``: the run ended normally on this rank, so every rank reaches this
        point and they leave together (a barrier). After an error on this rank the others
        may be waiting in a collective that this rank will never join: a barrier would
        hang them all, so the group is torn down at once, and the other ranks' next
        collective fails (Gloo: connection closed) instead of waiting forever.
        """
        if self.owns_group and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False

    # ------------------------------------------------------------------ model
    def wrap(self, module: nn.Module):
        """DDP-wrapped forward of ``module.elbo_terms``: call it like ``elbo_terms``.

        Also offsets the global torch seed by the rank, so that the reparameterisation
        noise and dropout masks differ between ranks (the weights, initialised before,
        are identical everywhere and DDP broadcasts rank 0's anyway).
        """
        seed_generators(torch.initial_seed() + self.rank, self.device)
        poisson = getattr(getattr(module, "cfg", None), "likelihood", None) == "poisson"
        return nn.parallel.DistributedDataParallel(
            _ElboForward(module),
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            # Poisson models keep an unused dispersion parameter.
            find_unused_parameters=poisson,
        )

    def rng_states(self) -> list[dict[str, Any]]:
        """Every rank's torch RNG state (CPU, and its CUDA device's), gathered on all ranks:
        rank 0 writes them into a checkpoint, so each rank resumes its own noise stream."""
        mine = {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
                else None}
        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, mine)
        return states

    def sync_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
        for buf in module.buffers():
            dist.broadcast(buf.data, src=0)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks (returned; ``t`` is reduced in place too)."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def end_epoch(self, module: nn.Module, sums: torch.Tensor) -> torch.Tensor:
        """All-reduce the epoch's metric sums and align buffers, so ranks decide alike."""
        self.sync_buffers(module)
        return self.all_reduce_sum(sums)

    # ------------------------------------------------------------------ data
    def train_batches(self, data, indices: np.ndarray, batch_size: int,
                      generator: torch.Generator | None, device: torch.device,
                      **batch_kwargs) -> Iterator[Batch]:
        """This rank's minibatches for one epoch (see :func:`shard_batches`)."""
        return shard_batches(data, indices, batch_size, generator, self.rank, self.world_size,
                             device, **batch_kwargs)

    def my_slice(self, indices: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of ``indices`` (slices differ by at most one item)."""
        lo, hi = shard_bounds(len(indices), self.world_size)[self.rank:self.rank + 2]
        return np.asarray(indices)[lo:hi]


class _ElboForward(nn.Module):
    """``forward`` = ``VAE.elbo_terms``: DDP only synchronises gradients of calls to forward."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x, library, batch_index, cat_covs=None, cont_covs=None, **kwargs):
        return self.vae.elbo_terms(x, library, batch_index, cat_covs, cont_covs, **kwargs)


def shard_bounds(n: int, world_size: int) -> np.ndarray:
    """Start of each rank's contiguous slice of ``n`` items (``world_size + 1`` numbers).

    Slice sizes differ by at most one: the first ``n % world_size`` ranks get one more.
    """
    q, rem = divmod(n, world_size)
    return np.array([r * q + min(r, rem) for r in range(world_size + 1)], dtype=np.int64)


def n_steps(n_cells: int, batch_size: int) -> int:
    """Minibatches for ``n_cells`` with a trailing single cell merged into the last batch."""
    steps = -(-n_cells // batch_size)
    if steps > 1 and n_cells % batch_size == 1:
        steps -= 1
    return steps


def epoch_order(data, indices: np.ndarray, generator: torch.Generator | None) -> np.ndarray:
    """One epoch's random order of ``indices``, identical on ranks with identical generators.

    Backed data gives a chunk-local order (cheap to read); in-memory data a plain permutation.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if hasattr(data, "epoch_order"):
        return data.epoch_order(indices, generator)
    return indices[torch.randperm(len(indices), generator=generator).numpy()]


def shard_batches(data, indices: np.ndarray, batch_size: int, generator: torch.Generator | None,
                  rank: int, world_size: int, device: torch.device | str = "cpu",
                  **batch_kwargs) -> Iterator[Batch]:
    """Rank ``rank``'s minibatches of one epoch over ``indices``; ``batch_kwargs`` (e.g.
    ``nonzero=True``) go to ``data.batches``.

    All ranks draw the same order (same ``generator`` state) and take contiguous slices of
    it (:func:`shard_bounds`), so the union over ranks is every cell exactly once. Every
    rank yields the same number of batches, :func:`n_steps` of the smallest slice: batches
    of ``batch_size`` and a last one with the rest of the slice.
    """
    indices = np.asarray(indices, dtype=np.int64)
    bounds = shard_bounds(len(indices), world_size)
    smallest = int(np.diff(bounds).min())
    if smallest < 2:
        raise ValueError(
            f"{len(indices)} training cells cannot be split over {world_size} ranks with at "
            "least 2 cells each (BatchNorm); use fewer processes or more cells."
        )
    order = epoch_order(data, indices, generator)
    mine = order[bounds[rank]:bounds[rank + 1]]
    steps = n_steps(smallest, batch_size)
    head = (steps - 1) * batch_size  # cells in the full batches before the last one
    if head:
        yield from data.batches(mine[:head], batch_size=batch_size, device=device, **batch_kwargs)
    # The last batch takes the rest of this rank's slice (batch_size + 0..2 cells).
    yield from data.batches(mine[head:], batch_size=len(mine) - head, device=device,
                            **batch_kwargs)
