"""The training loop: Adam, KL warm-up, validation ELBO, early stopping, history.

Kept free of AnnData: it needs a :class:`~scvae_tools.module.VAE`, a
:class:`~scvae_tools.adapter.CellData` and index arrays for the train/validation split.
Per-step losses are accumulated on the device and read back once per epoch, so the
loop never forces a host–device sync inside a step.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import numbers
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pandas as pd
import torch
from torch.optim import optimizer as _torch_optimizer

from . import checkpoint as ckpt
from .adapter import Batch, CellData
from .checkpoint import CheckpointConfig
from .devices import accumulator_dtype, rng_kept, seed_generators
from .distributed import DistContext
from .fused import NonZeros
from .module import VAE

# How many times the networks' learning rate the free dispersions θ get (see TrainConfig).
DISPERSION_LR_FACTOR = 10.0
# Settings a file written before they existed was trained with, where that differs from
# today's default (configs and checkpoints record only the settings their version had).
LEGACY_TRAIN_DEFAULTS = {"dispersion_lr_factor": 1.0}


@dataclass
class TrainConfig:
    """Settings of one training run (stored in ``uns`` and saved models)."""

    max_epochs: int = 400
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 1e-2
    beta: float = 1.0
    free_bits: float = 0.0
    kl_warmup_epochs: int = 0
    early_stopping: bool = True
    early_stopping_patience: int = 30
    early_stopping_min_delta: float = 0.0
    restore_best: bool = True
    # Score the validation cells every this many epochs (and after the last one); early
    # stopping and the plateau schedule count these checks, as Lightning's patience does.
    validation_every: int = 1
    # Learning-rate schedule: "constant", "cosine" (per step, from lr down to
    # lr · lr_min_factor at max_epochs) or "plateau" (lr times lr_plateau_factor whenever
    # the monitored ELBO has not improved for lr_plateau_patience epochs).
    lr_schedule: str = "constant"
    lr_min_factor: float = 0.01
    lr_plateau_patience: int = 5
    lr_plateau_factor: float = 0.3
    # "32": float32 throughout. "bf16-mixed": the MLPs' matmuls under bfloat16 autocast
    # (the likelihood, KL and optimiser stay float32); for GPUs with bf16 tensor cores.
    precision: str = "32"
    # torch.compile the encoder and decoder MLPs (fuses their element-wise layers); pays
    # off on long GPU runs, not on a CPU where compiling takes longer than it saves.
    compile: bool = False
    # Capture the step of full batches once as a CUDA graph and replay it (see _GraphedStep):
    # on a GPU a batch-128 step is bound by the host launching ~200 kernels.
    cuda_graphs: bool = False
    seed: int = 0
    # Share of the cells trained on; the model draws the split from `seed` and validates on
    # the rest. Recorded here so that `uns` and saved models say which split was used.
    train_size: float = 0.9
    # Divergence (NaN/inf loss or gradient): roll back to the last good epoch with the
    # learning rate times `rollback_lr_factor`, at most `max_rollbacks` times per run.
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.25
    # The free inverse dispersions θ (per gene, or per gene and batch) get their own Adam
    # group with this many times the learning rate. With the networks' lr they barely leave
    # their start in a short run: on pbmc3k's default 38 epochs, 80% of genes kept θ within
    # 0.70–1.13 of the initial 1, against 0.12–1.46 at 10×, which fits the held-out cells
    # better (ELBO +3 nats per cell; pbmc68k +4 to +6) and recovers a simulated θ = 5
    # (4.7 against 2.8). See benchmarks/HISTORY.md, stop 22.
    dispersion_lr_factor: float = DISPERSION_LR_FACTOR
    # Started from the model's current weights (train(warm_start=True)), not new ones.
    warm_start: bool = False
    # Processes of a DDP run: batch_size is per process, so each step averaged the
    # gradients of batch_size × world_size cells.
    world_size: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):  # NumPy scalars (np.float32 lr, np.bool_) as Python's: JSON
            value = getattr(self, f.name)
            if isinstance(value, np.generic):
                setattr(self, f.name, value.item())
        check_positive_finite(self.lr, "lr")
        ckpt.check_field_types(self)  # 1.5 warm-up epochs would train, save, then not load
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be at least 1, got {self.max_epochs}.")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (BatchNorm), got {self.batch_size}.")
        if self.beta < 0:
            raise ValueError(f"beta must be non-negative, got {self.beta}.")
        if self.kl_warmup_epochs < 0:
            raise ValueError("kl_warmup_epochs must be >= 0.")
        if not isinstance(self.validation_every, int) or self.validation_every < 1:
            raise ValueError(
                f"validation_every must be a positive integer, got {self.validation_every!r}."
            )
        if self.max_rollbacks < 0:
            raise ValueError(f"max_rollbacks must be >= 0, got {self.max_rollbacks}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}.")
        if not 0 < self.lr_min_factor <= 1 or not 0 < self.lr_plateau_factor < 1:
            raise ValueError("lr_min_factor must be in (0, 1] and lr_plateau_factor in (0, 1).")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")
        if self.lr_plateau_patience < 1:
            raise ValueError(f"lr_plateau_patience must be >= 1, got {self.lr_plateau_patience}.")
        if not 0 < self.rollback_lr_factor < 1:
            raise ValueError(f"rollback_lr_factor must be in (0, 1), got {self.rollback_lr_factor}.")
        if not self.dispersion_lr_factor > 0:
            raise ValueError(
                f"dispersion_lr_factor must be positive, got {self.dispersion_lr_factor}.")

    def to_dict(self) -> dict:
        return asdict(self)

    def lr_at(self, epoch: int, step: int, steps_per_epoch: int, scale: float = 1.0) -> float:
        """Learning rate at ``step`` of ``epoch`` (0-based); ``scale`` carries plateau drops
        and divergence rollbacks."""
        lr = self.lr * scale
        if self.lr_schedule != "cosine":
            return lr
        t = (epoch + step / max(steps_per_epoch, 1)) / self.max_epochs
        floor = lr * self.lr_min_factor
        return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * min(t, 1.0)))

    def beta_at(self, epoch: int) -> float:
        """β in force at ``epoch`` (0-based): ``beta · (epoch + 1) / kl_warmup_epochs`` up to
        ``beta`` (the first epoch is not KL-free)."""
        if self.kl_warmup_epochs <= 0:
            return self.beta
        return self.beta * min(1.0, (epoch + 1) / self.kl_warmup_epochs)


LR_SCHEDULES = ("constant", "cosine", "plateau")


def check_nonnegative_finite(value, name: str) -> None:
    """A ``ValueError`` naming ``name`` unless ``value`` is a finite real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a non-negative number (finite, >= 0), got {value!r}.")


def check_positive_finite(value, name: str) -> None:
    """A ``ValueError`` naming ``name`` unless ``value`` is a positive finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
PRECISIONS = ("32", "bf16-mixed")


def check_patience(early_stopping: bool, patience: int) -> None:
    """With early stopping, a patience below 1 would stop at the first scored epoch. (Checked
    where users pass it, not in :class:`TrainConfig`, so that saved configs always load.)"""
    if early_stopping and patience < 1:
        raise ValueError(f"early_stopping_patience must be >= 1 (scored epochs without "
                         f"improvement), got {patience}; to train every epoch, pass "
                         "early_stopping=False.")


def default_max_epochs(n_cells: int) -> int:
    """Epochs of our default schedule: 100,000 / n_cells (~90,000 visits of the training
    cells with 10% held out), between 10 and 400 epochs.

    With batch 128, peak lr 4e-3 and a cosine decay this reaches, on pbmc3k and pbmc68k, a
    better held-out ELBO than scvi-tools' 400-epoch default (see ``benchmarks/README.md``,
    "Defaults"): 38 epochs for pbmc3k's 2,638 cells, 143 for 700 cells, 10 from 10,000
    cells on.
    """
    return int(max(10, min(400, round(100_000 / max(n_cells, 1)))))


# A GPU at batch 128 waits on the host, which launches a step's ~200 kernels one by one:
# on an H100, an epoch of 1M × 2,000 cells took 41–45 s at batch 128 and 5.8–6.5 s at 1024
# (benchmarks/HISTORY.md, stop 20). With a peak lr of 1e-2, batch 1024 kept the held-out ELBO
# of 100k pbmc3k-like cells within 0.2% of the batch-128 default (measured on the CPU; the
# arithmetic is the same). Smaller data get too few steps per epoch for large batches, and
# on a CPU the larger batch's faster epochs are cancelled by the extra epochs it needs.
GPU_LARGE_BATCH_MIN_CELLS = 100_000
DEFAULT_BATCH_SIZE, DEFAULT_LR = 128, 4e-3  # everywhere else (the "Defaults" evidence)


def default_batch_size_and_lr(n_train: int, device: torch.device | None) -> tuple[int, float]:
    """The defaults of ``SCVAE.train(batch_size=None, lr=None)``: batch 128 with a peak
    learning rate of 4e-3; on a CUDA GPU with at least 100,000 training cells, batch 1024
    with 1e-2 (``device=None``: distributed training, which keeps 128 per rank)."""
    if device is not None and device.type == "cuda" and n_train >= GPU_LARGE_BATCH_MIN_CELLS:
        return 1024, 1e-2
    return DEFAULT_BATCH_SIZE, DEFAULT_LR


def field_max_epochs(n_cells: int) -> int:
    """The field's rule of thumb (scvi-tools): ~20,000 / n_cells · 400 epochs, at most 400.

    For a constant learning rate of 1e-3 with batch 128 (query fine-tuning uses it).
    """
    return int(max(1, min(400, round(20000 / max(n_cells, 1) * 400))))


def split_indices(n: int, train_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train/validation row indices; the validation set may be empty."""
    if isinstance(train_size, bool) or not isinstance(train_size, numbers.Real) or not (
            0 < train_size <= 1):
        raise ValueError(f"train_size must be a number in (0, 1], got {train_size!r}.")
    perm = np.random.default_rng(seed).permutation(n)
    n_train = n if train_size >= 1 else int(math.ceil(train_size * n))
    n_train = min(max(n_train, 1), n)
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def warn_if_no_validation(train_size: float, n: int, val_idx: np.ndarray,
                          stacklevel: int) -> None:
    """A train_size below 1 that still leaves no validation cell (few cells) changes what
    early stopping watches: say so."""
    if train_size < 1 and not len(val_idx):
        warnings.warn(
            f"train_size={train_size} of {n} cells leaves no validation cell; early stopping "
            "watches the training ELBO instead. Pass a smaller train_size to hold cells out, "
            "or train_size=1.0 to say so.", UserWarning, stacklevel=stacklevel + 1)


@torch.inference_mode()
def evaluate(
    module: VAE, data: CellData, indices: np.ndarray | None, batch_size: int, device: torch.device,
    dist: DistContext | None = None, keep_rng: bool = True,
) -> dict[str, float]:
    """Mean per-cell ELBO, reconstruction log-likelihood and KL over ``indices``.

    Under DDP (``dist``) each rank scores its slice of ``indices`` and the sums are
    all-reduced, so every rank returns the same global means. The z it draws leave torch's
    random state as it was (``keep_rng``): how often training scores its validation cells
    does not change what it learns.
    """
    module.forget_cached_weights()  # optimiser steps since the last call (fused Adam: unseen)
    with rng_kept(device) if keep_rng else contextlib.nullcontext():
        return _evaluate(module, data, indices, batch_size, device, dist)


def _evaluate(
    module: VAE, data: CellData, indices: np.ndarray | None, batch_size: int, device: torch.device,
    dist: DistContext | None,
) -> dict[str, float]:
    if dist is not None:
        dist.sync_buffers(module)  # score with rank 0's BatchNorm statistics everywhere
        indices = dist.my_slice(np.arange(data.n_obs) if indices is None else indices)
    was_training = module.training
    module.eval()
    acc = accumulator_dtype(device)
    sums = torch.zeros(3, dtype=acc, device=device)  # Σ log p(x|z), Σ KL, cells
    if indices is None or len(indices):
        for b in data.batches(indices, batch_size=batch_size, device=device,
                              **nonzero_option(module, data)):
            t = module.elbo_terms(b.x, b.library, b.batch_index, b.cat_covs, b.cont_covs,
                                  nonzero=b.nonzero)
            sums[:2] += torch.stack([t["log_px"].sum().to(acc), t["kl"].sum().to(acc)])
        # The cell count is known on the host: no per-batch host-to-device copy for it.
        sums[2] = data.n_obs if indices is None else len(indices)
    module.train(was_training)
    if dist is not None:
        dist.all_reduce_sum(sums)
    log_px, kl, n = sums.tolist()
    log_px, kl = log_px / max(n, 1), kl / max(n, 1)
    return {"elbo": log_px - kl, "reconstruction": -log_px, "kl": kl}


def nonzero_option(module: VAE, data) -> dict:
    """Ask the data for each batch's non-zeros when the fused NB or ZINB likelihood uses
    them: read off the host CSR rows (in memory or out of core), they spare the device a
    search (and the host a wait) every step. Dense counts have none to give; the
    likelihood then searches."""
    return {"nonzero": True} if module.fused_likelihood else {}


class _GraphedStep:
    """The training step of full batches as one CUDA graph, captured once and replayed.

    At batch 128 a step is ~200 small kernels whose launches cost the host ~5 ms on a GPU
    that computes for 1.4 ms (H100, ``benchmarks/README.md``, "GPU"); a replay launches
    them all at once. A graph has fixed shapes and addresses, so:

    - each batch is copied into static input buffers;
    - the likelihood's "non-zeros" are every entry of the block (at a zero count its log Γ
      terms cancel exactly, so the value is the sparse one), a fixed size unlike a batch's
      non-zeros;
    - β, the step number (for the NaN guard) and the learning rate (the optimiser's, a
      device tensor) are device tensors filled before each replay; the loss sums, the
      guard's flags and the gradients live in the graph;
    - the first ``WARMUP`` full batches run eagerly on a side stream (they train, as
      usual), as CUDA requires before a capture; a rollback (the optimiser's state is
      replaced) makes the next full batch capture again.

    Batches of another size (the last one) take the eager step. With ``capture=False`` the
    same static step runs eagerly: the CPU tests check the logic that way.
    """

    WARMUP = 3

    def __init__(self, module: VAE, optim, guard: _StepGuard, sums: torch.Tensor,
                 cfg: TrainConfig, autocast, device: torch.device):
        self.module, self.optim, self.guard, self.sums = module, optim, guard, sums
        self.free_bits, self.autocast = cfg.free_bits, autocast
        self.capture = device.type == "cuda"
        self.beta = torch.zeros((), device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.inputs: list[torch.Tensor] | None = None
        self.nonzero: NonZeros | None = None
        self.graph = None
        self.warm = 0
        self.stream = torch.cuda.Stream(device) if self.capture else None

    def invalidate(self) -> None:
        """Capture again at the next full batch (the optimiser's state was replaced)."""
        self.graph, self.warm = None, 0

    def run(self, b: Batch, step: int, beta: float) -> None:
        new = [b.x, b.library, b.batch_index, b.cat_covs, b.cont_covs]
        if self.inputs is None:
            self.inputs = [t.clone() for t in new]
            n, g = b.x.shape
            flat = torch.arange(n * g, device=b.x.device)
            self.nonzero = NonZeros(flat, self.inputs[0].view(-1), flat.div(g, rounding_mode="floor"),
                                    flat.remainder(g), torch.full((n,), g, device=b.x.device))
        else:
            for static, t in zip(self.inputs, new, strict=True):
                static.copy_(t)
        self.step.fill_(step)
        self.beta.fill_(beta)
        if not self.capture:
            self.optim.zero_grad(set_to_none=True)
            self._step()
        elif self.graph is None and self.warm < self.WARMUP:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                self.optim.zero_grad(set_to_none=True)
                self._step()
            torch.cuda.current_stream().wait_stream(self.stream)
            self.warm += 1
        else:
            if self.graph is None:
                # Gradients are created in the capture, from the graph's own memory.
                self.optim.zero_grad(set_to_none=True)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self._step()
            self.graph.replay()

    def _step(self) -> None:
        x, library, batch_index, cat_covs, cont_covs = self.inputs
        with self.autocast:
            terms = self.module.elbo_terms(x, library, batch_index, cat_covs, cont_covs,
                                           nonzero=self.nonzero)
        loss = self.module.loss(terms, beta=self.beta, free_bits=self.free_bits)
        loss.backward()
        self.guard.bad_step(self.step, loss)  # deferred: flagged on the device
        self.optim.step()
        self.sums += torch.stack([terms["log_px"].detach().sum(),
                                  terms["kl"].detach().sum()]).to(self.sums.dtype)


def _epoch_batches(module: VAE, data, train_idx: np.ndarray, batch_size: int,
                   gen: torch.Generator, device: torch.device, dist: DistContext | None,
                   nonzero: bool = True):
    """One epoch's shuffled training batches: all of them, or this DDP rank's shard.
    ``nonzero=False``: without their non-zeros (a graphed step does not use them)."""
    option = nonzero_option(module, data) if nonzero else {}
    if dist is None:
        return data.batches(train_idx, batch_size, shuffle=True, generator=gen, device=device,
                            drop_singleton=True, **option)
    return dist.train_batches(data, train_idx, batch_size, gen, device, **option)


def _on_its_cuda_device(train):
    """Run ``train`` with its ``device`` made the current CUDA device: CUDA graphs and the
    side stream of ``cuda_graphs=True`` take the current device's streams, which would
    otherwise be cuda:0's when training on cuda:1."""
    @functools.wraps(train)
    def run(*args, **kwargs):
        device = kwargs["device"] if "device" in kwargs else args[5]
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return train(*args, **kwargs)
    return run


@_on_its_cuda_device
def train_module(
    module: VAE,
    data: CellData,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    cfg: TrainConfig,
    device: torch.device,
    progress_bar: bool = True,
    checkpoint: CheckpointConfig | None = None,
    dist: DistContext | None = None,
) -> pd.DataFrame:
    """Train ``module`` in place; return the per-epoch history.

    With ``dist`` (a :class:`~scvae_tools.distributed.DistContext`) this process trains
    one DDP replica on its shard of ``train_idx``; epoch metrics are all-reduced over
    ranks, and only rank 0 shows progress and writes checkpoints.

    Columns: ``epoch``, ``beta``, ``train_elbo``, ``train_reconstruction``, ``train_kl``,
    ``validation_elbo``, ``validation_reconstruction``, ``validation_kl`` (NaN without a
    validation set, and between checks when ``cfg.validation_every`` > 1), ``lr`` and
    ``seconds``. ``reconstruction`` is the distortion −E_q[log p(x|z)] and ``kl`` the rate
    KL(q(z|x) ‖ p(z)), both mean nats per cell;
    ``elbo`` = −reconstruction − kl (β = 1, so epochs are comparable during warm-up).

    With ``checkpoint`` the full training state is written atomically every
    ``checkpoint.every`` epochs and, with ``checkpoint.resume``, restored first, so an
    interrupted run continues exactly where it stopped.

    A NaN/inf loss or gradient is caught at the step it happens (on accelerators it is
    flagged on the device and read once per epoch): the module and optimiser roll back to
    the end of the last good epoch and the epoch is retried with the learning rate times
    ``cfg.rollback_lr_factor``. After ``cfg.max_rollbacks`` rollbacks a
    ``FloatingPointError`` is raised; the module then holds the last good weights.
    """
    if len(train_idx) < 2:
        n = len(train_idx) + len(val_idx)
        fix = (f"train_size={cfg.train_size} of {n} cells leaves too few; pass train_size of "
               f"at least {2 / n:.3g} (or 1.0)" if n >= 2 and cfg.train_size < 1 else
               "use more cells (with very few cells, also train_size=1.0)")
        raise ValueError(
            f"Training needs at least 2 cells in the training split, got {len(train_idx)}; "
            f"{fix}."
        )
    seed_generators(cfg.seed, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    module.to(device).train()
    optim = _adam(module, cfg, device)
    if cfg.cuda_graphs and (dist is not None or cfg.compile):
        raise ValueError("cuda_graphs=True cannot be combined with DDP or compile=True.")
    loop = _LoopState()
    # DDP syncs gradients; wrapping offsets each rank's seed, which a resume then replaces
    # with the rank's own saved stream.
    elbo_fn = module.elbo_terms if dist is None else dist.wrap(module)
    if checkpoint is not None and checkpoint.resume:
        _resume(checkpoint, module, optim, gen, loop, cfg, train_idx, val_idx, device,
                rank=0 if dist is None else dist.rank)
    guard = _StepGuard(device, list(module.parameters()), deferred=cfg.cuda_graphs)
    good = _snapshot(module, optim)  # the state a divergence rolls back to
    bar = None
    if progress_bar and (dist is None or dist.is_main):
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_epochs, initial=loop.epoch, desc="Training", unit="epoch")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=cfg.precision == "bf16-mixed",
                              cache_enabled=not cfg.cuda_graphs)  # graphs: no cast cache
    if cfg.compile:
        module.encoder.compile(dynamic=True)  # in place: state_dict keys stay the same
        module.decoder.compile(dynamic=True)
    cosine = cfg.lr_schedule == "cosine"
    world = 1 if dist is None else dist.world_size
    steps_per_epoch = max(1, math.ceil(len(train_idx) / (cfg.batch_size * world)))
    sums = torch.zeros(2, dtype=accumulator_dtype(device), device=device)  # one, kept
    graphed = (_GraphedStep(module, optim, guard, sums, cfg, autocast, device)
               if cfg.cuda_graphs else None)
    while not loop.stopped and loop.epoch < cfg.max_epochs:
        epoch = loop.epoch
        t0 = time.perf_counter()
        beta = cfg.beta_at(epoch)
        sums.zero_()
        guard.reset()
        _set_lr(optim, cfg.lr_at(epoch, 0, steps_per_epoch, loop.lr_scale))
        for step, b in enumerate(_epoch_batches(module, data, train_idx, cfg.batch_size, gen,
                                                device, dist, nonzero=graphed is None)):
            if cosine and step:
                _set_lr(optim, cfg.lr_at(epoch, step, steps_per_epoch, loop.lr_scale))
            if graphed is not None and len(b.x) == cfg.batch_size:
                graphed.run(b, step, beta)
                continue
            with autocast:
                terms = elbo_fn(b.x, b.library, b.batch_index, b.cat_covs, b.cont_covs,
                                nonzero=b.nonzero)
            loss = module.loss(terms, beta=beta, free_bits=cfg.free_bits)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if guard.bad_step(step, loss):  # CPU: checked now; accelerators: flagged on device
                break
            optim.step()
            sums += torch.stack([terms["log_px"].detach().sum(), terms["kl"].detach().sum()]).to(sums.dtype)
        if dist is not None:
            dist.end_epoch(module, sums)  # global sums; rank 0's BatchNorm statistics
        bad_step = guard.first_bad_step()
        validated = len(val_idx) > 0 and (
            (epoch + 1) % cfg.validation_every == 0 or epoch + 1 >= cfg.max_epochs)
        row: dict = {}
        if bad_step is None:
            val = (evaluate(module, data, val_idx, validation_batch_size(cfg.batch_size),
                            device, dist)
                   if validated else None)
            row = epoch_row(epoch, beta, sums, len(train_idx), val, optim, t0)
        # The weights too: the epoch's last step can break them after its loss was scored,
        # and they are about to become the "last good" state every rollback returns to.
        if (bad_step is not None or not _row_finite(row, has_validation=validated)
                or not _weights_finite(module)):
            _roll_back(module, optim, good, loop, cfg, epoch, bad_step)
            if graphed is not None:
                graphed.invalidate()  # the optimiser's state tensors were replaced
            continue
        loop.rows.append(row)
        loop.epoch = epoch + 1
        good = _snapshot(module, optim)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(elbo=f"{row['train_elbo']:.1f}",
                            val=f"{row['validation_elbo']:.1f}")
        # Early stopping watches the validation ELBO once β has reached its final value
        # (on the epochs that scored the validation cells, when there are any).
        monitor = row["validation_elbo"] if len(val_idx) else row["train_elbo"]
        if epoch + 1 >= cfg.kl_warmup_epochs and (validated or not len(val_idx)):
            if monitor > loop.best + cfg.early_stopping_min_delta:
                loop.best, loop.since_best = monitor, 0
                if cfg.restore_best and cfg.early_stopping:
                    loop.best_state = copy.deepcopy(module.state_dict())
                    loop.best_epoch = epoch + 1
            else:
                loop.since_best += 1
            loop.stopped = cfg.early_stopping and loop.since_best >= cfg.early_stopping_patience
            if (cfg.lr_schedule == "plateau" and loop.since_best
                    and loop.since_best % cfg.lr_plateau_patience == 0):
                loop.lr_scale *= cfg.lr_plateau_factor
        if checkpoint is not None and (
            loop.epoch % checkpoint.every == 0 or loop.stopped or loop.epoch >= cfg.max_epochs
        ):
            ranks = None if dist is None else dist.rng_states()  # a collective: every rank
            if dist is None or dist.is_main:
                _write_checkpoint(checkpoint, module, optim, gen, loop, cfg, train_idx, val_idx,
                                  ranks)
    if bar is not None:
        bar.close()
    if loop.best_state is not None:
        module.load_state_dict(loop.best_state)
    module.eval()
    module.forget_cached_weights()
    history = pd.DataFrame(loop.rows)
    # Which epoch's weights the module holds (None: the last one's). Not simply the row of
    # the best validation ELBO: only epochs after the KL warm-up can be restored.
    history.attrs["restored_epoch"] = loop.best_epoch if loop.best_state is not None else None
    return history


def _adam(module: VAE, cfg: TrainConfig, device: torch.device) -> torch.optim.Adam:
    """Adam, fused into one kernel where torch has one for the device (CPU and CUDA).

    The optimiser step touches every weight each step; on a CPU the fused kernel is several
    times faster than the default multi-tensor one, and for this model that step costs as
    much as the forward pass.
    """
    groups = _param_groups(module, cfg)
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "eps": cfg.eps}
    if cfg.cuda_graphs:  # a graph replays the step: each lr must be a tensor it reads
        for g in groups:
            g["lr"] = torch.tensor(cfg.lr * g["lr_scale"], device=device)
        kwargs.update(lr=groups[0]["lr"], capturable=device.type == "cuda")
    if device.type in ("cpu", "cuda"):
        try:
            return FusedAdam(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # older torch without a fused kernel for this device
            pass
    return torch.optim.Adam(groups, **kwargs)


def _param_groups(module: VAE, cfg: TrainConfig) -> list[dict]:
    """The networks' parameters, then the free dispersions θ (if any) at
    ``cfg.dispersion_lr_factor`` times the learning rate; ``lr_scale`` is each group's
    factor, which :func:`_set_lr` applies."""
    theta = module.log_theta
    rest = [p for p in module.parameters() if p is not theta]
    groups = [{"params": rest, "lr": cfg.lr, "lr_scale": 1.0}]
    if theta is not None:
        groups.append({"params": [theta], "lr": cfg.lr * cfg.dispersion_lr_factor,
                       "lr_scale": cfg.dispersion_lr_factor})
    return groups


def _regroup_state(saved: dict, optim: torch.optim.Optimizer, module: VAE) -> dict:
    """An optimiser state dict from before θ had its own group (one group, parameters in
    the module's order), rearranged into ``optim``'s groups; others are returned as they are."""
    if len(saved["param_groups"]) != 1 or len(optim.param_groups) == 1:
        return saved
    (old,) = saved["param_groups"]
    ids = dict(zip((id(p) for p in module.parameters()), old["params"], strict=True))
    groups = [{**old, "params": [ids[id(p)] for p in g["params"]], "lr": g["lr"],
               "lr_scale": g["lr_scale"]} for g in optim.param_groups]
    return {"state": saved["state"], "param_groups": groups}


# torch's registries of hooks for every optimiser's step (mutated in place, so these stay live).
_GLOBAL_STEP_HOOKS = (getattr(_torch_optimizer, "_global_optimizer_pre_hooks", {}),
                      getattr(_torch_optimizer, "_global_optimizer_post_hooks", {}))


def _unhooked(step):
    """``step`` without the wrapper torch's optimisers put on it (hooks and profiler label)."""
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class FusedAdam(torch.optim.Adam):
    """``torch.optim.Adam(fused=True)`` with a shorter path to the same kernel.

    Around its fused kernel, torch's ``step`` spends ~0.4 ms per call on this model on the
    CPU (a profiler label and hook dispatch, grouping tensors by device, per-parameter
    checks, one tiny ``add`` per parameter's step counter); ``zero_grad`` adds another
    profiler label. That is ~5% of a training step. Here, once torch's own first step has
    created the state, the parameters share one step counter and ``step`` calls the kernel
    directly with the same arguments: bit for bit torch's result (a test checks it).
    Whatever this path does not cover goes through torch's ``step``: closures, AMSGrad,
    maximize, capturable or differentiable groups, grad scaling, step hooks, an active
    profiler, sparse gradients, parameters of several dtypes or devices, without gradients
    or with differing step counts. The state dict is torch's (one counter per parameter),
    so checkpoints load into either class.
    """

    _torch_step = staticmethod(torch.optim.Optimizer.profile_hook_step(
        _unhooked(torch.optim.Adam.step)))

    def step(self, closure=None):  # noqa: D102
        plan = None if closure is not None or self._observed() else self._direct_plan()
        if plan is None:
            self._separate_counters()  # torch's step adds 1 to each state's counter
            return self._torch_step(self, closure)
        with torch.no_grad():
            for group, params, grads, exp_avgs, exp_avg_sqs, counter in plan:
                counter.add_(1)
                beta1, beta2 = group["betas"]
                torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [],
                                   [counter] * len(params), amsgrad=False, lr=group["lr"],
                                   beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                                   eps=group["eps"], maximize=False, grad_scale=None,
                                   found_inf=None)
        return None

    # torch wraps the step of every optimiser class that lacks this mark; this one calls the
    # wrapper itself (in _torch_step) whenever hooks or the profiler need it.
    step.hooked = True

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        if not set_to_none or self._observed():
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _observed(self) -> bool:
        """Step hooks or the profiler are active: torch's own path serves them."""
        return bool(self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                    or any(_GLOBAL_STEP_HOOKS) or torch.autograd._profiler_enabled())

    def state_dict(self) -> dict:  # noqa: D102
        # One counter per parameter, as torch's Adam (and any optimiser loading it) expects.
        sd = super().state_dict()
        sd["state"] = {k: {**st, "step": st["step"].clone()} if "step" in st else st
                       for k, st in sd["state"].items()}
        return sd

    def _separate_counters(self) -> None:
        seen: set[int] = set()
        for st in self.state.values():
            if "step" in st:
                if id(st["step"]) in seen:
                    st["step"] = st["step"].clone()
                seen.add(id(st["step"]))

    def _direct_plan(self) -> list | None:
        """Per group: its parameters with gradients, their state and the shared step
        counter; None when torch's ``step`` must run instead."""
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return None
        plan = []
        for group in self.param_groups:
            if (not group.get("fused") or group["amsgrad"] or group["maximize"]
                    or group["capturable"] or group["differentiable"]
                    or group.get("decoupled_weight_decay", False)
                    or isinstance(group["lr"], torch.Tensor)):
                return None
            params, grads, exp_avgs, exp_avg_sqs, states = [], [], [], [], []
            counter, shared = None, True
            for p in group["params"]:
                st = self.state.get(p)
                # torch skips parameters without gradients, creates the state on a first
                # step, and needs one kernel call per device and dtype: its step does those.
                if (p.grad is None or not st or p.grad.is_sparse
                        or (params and (p.dtype != params[0].dtype or p.device != params[0].device))):
                    return None
                if counter is None:
                    counter = st["step"]
                elif st["step"] is not counter:
                    if not torch.equal(st["step"], counter):
                        return None  # parameters stepped different numbers of times
                    shared = False
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(st["exp_avg"])
                exp_avg_sqs.append(st["exp_avg_sq"])
                states.append(st)
            if not params:
                continue
            if not shared:  # equal counts: share one counter from now on
                for st in states:
                    st["step"] = counter
            plan.append((group, params, grads, exp_avgs, exp_avg_sqs, counter))
        return plan


# ---------------------------------------------------------------------- loop helpers
def _weights_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter is finite (one host sync per epoch on an accelerator)."""
    flags = [torch.isfinite(p).all() for p in module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


# Divergence handling and checkpointing, kept out of the step so the hot loop stays small.
@dataclass
class _LoopState:
    """Everything besides module/optimiser/RNG that a resumed run needs."""

    rows: list = field(default_factory=list)
    epoch: int = 0  # completed epochs
    best: float = -math.inf
    best_state: dict | None = None
    best_epoch: int = 0  # the epoch (1-based) whose weights best_state holds
    since_best: int = 0
    stopped: bool = False  # early stopping fired
    rollbacks: int = 0
    lr_scale: float = 1.0  # lowered by plateau drops and divergence rollbacks


class _StepGuard:
    """Detects a non-finite loss or gradient at the step it happens.

    On the CPU the check is immediate and cheap, and the bad step is never applied. On an
    accelerator the first bad step is recorded in a device tensor and read once per epoch,
    so steps never wait for the host; the epoch is then discarded by the rollback.
    """

    def __init__(self, device: torch.device, params: list[torch.nn.Parameter],
                 deferred: bool = False):
        self.immediate = device.type == "cpu" and not deferred
        self.device = device
        self.params = params
        self._dev_bad = self._found = self._one = None
        self.reset()

    def reset(self) -> None:
        self._cpu_bad: int | None = None
        if self.immediate:
            return
        if self._dev_bad is None:
            self._dev_bad = torch.full((), -1, dtype=torch.long, device=self.device)
            self._one = torch.ones(1, device=self.device)
        else:  # in place: a captured graph holds these tensors
            self._dev_bad.fill_(-1)
        if self._found is None:
            self._found = torch.zeros(1, device=self.device)

    def bad_step(self, step: int | torch.Tensor, loss: torch.Tensor) -> bool:
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.immediate:
            if not bool(self._finite(loss, grads)):
                self._cpu_bad = step
                return True
            return False
        # torch.where, not masked_fill_: a tensor step (a graph's) must not be read by the host
        bad = ~self._finite(loss, grads) & (self._dev_bad < 0)
        self._dev_bad.copy_(torch.where(bad, step, self._dev_bad))
        return False

    def _finite(self, loss: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
        """A device bool: the loss and every gradient are free of NaN/inf."""
        if self._found is not None:
            # On an accelerator every launch costs host time: GradScaler's multi-tensor
            # kernel checks all gradients at once (scale 1: they are left as they are)
            # instead of a sum per parameter. Where a backend lacks it, the sums below.
            try:
                self._found.zero_()
                torch._amp_foreach_non_finite_check_and_unscale_(grads, self._found, self._one)
                return torch.isfinite(loss.detach()) & (self._found.squeeze(0) == 0)
            except (NotImplementedError, RuntimeError):
                self._found = None
        # Any NaN/inf in the loss or a gradient makes this sum non-finite.
        total = loss.detach().float() + torch.stack([g.sum() for g in grads]).float().sum()
        return torch.isfinite(total)

    def first_bad_step(self) -> int | None:
        if self.immediate:
            return self._cpu_bad
        value = int(self._dev_bad.item())
        return None if value < 0 else value


def _set_lr(optim: torch.optim.Optimizer, lr: float) -> None:
    """The networks' learning rate ``lr``; each group gets it times its ``lr_scale``."""
    for group in optim.param_groups:
        group_lr = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(group_lr)  # in place: a captured graph reads this tensor
        else:
            group["lr"] = group_lr


def validation_batch_size(batch_size: int) -> int:
    """Cells scored at a time when training validates: at least 512 (fewer, larger batches
    score faster than the training batch size)."""
    return max(batch_size, 512)


def epoch_row(epoch: int, beta: float, sums: torch.Tensor, n_train: int,
              validation: dict | None, optim: torch.optim.Optimizer, t0: float) -> dict:
    """One row of a training history: the epoch's summed log p(x|z) and KL (``sums``) as
    means per training cell, the validation scores (NaN when not scored), the networks'
    learning rate and the seconds since ``t0``. Shared by training and query fine-tuning."""
    log_px, kl = (sums / n_train).tolist()
    row = {"epoch": epoch + 1, "beta": beta, "train_elbo": log_px - kl,
           "train_reconstruction": -log_px, "train_kl": kl}
    if validation is None:
        validation = {"elbo": math.nan, "reconstruction": math.nan, "kl": math.nan}
    row.update({f"validation_{k}": v for k, v in validation.items()})
    row["lr"] = float(optim.param_groups[0]["lr"])
    row["seconds"] = time.perf_counter() - t0
    return row


def _row_finite(row: dict, has_validation: bool) -> bool:
    keys = ["train_elbo", "train_reconstruction", "train_kl"]
    if has_validation:
        keys += ["validation_elbo", "validation_reconstruction", "validation_kl"]
    return bool(row) and all(math.isfinite(row[k]) for k in keys)


def _clone_tree(obj):
    """Copy of nested dicts/lists/tuples with every tensor cloned (cheaper than deepcopy)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_tree(v) for v in obj)
    return obj


def _snapshot(module: VAE, optim: torch.optim.Optimizer) -> dict:
    return {"module": _clone_tree(module.state_dict()), "optim": _clone_tree(optim.state_dict())}


def _roll_back(module: VAE, optim: torch.optim.Optimizer, good: dict, loop: _LoopState,
               cfg: TrainConfig, epoch: int, bad_step: int | None,
               advice: str = "train with a lower lr or beta") -> None:
    """Restore the last good state and lower the lr, or raise after too many rollbacks.

    ``cfg`` needs only ``max_rollbacks`` and ``rollback_lr_factor`` (query fine-tuning
    passes the defaults). ``optim.param_groups[0]`` must be the networks' group."""
    where = f"epoch {epoch + 1}" + (f", step {bad_step + 1}" if bad_step is not None else "")
    good_point = f"the end of epoch {epoch}" if epoch else "the initial weights"
    lr = float(optim.param_groups[0]["lr"])  # the snapshot's lr may be higher
    module.load_state_dict(good["module"])
    # A copy: the optimiser keeps references to the tensors it is given and updates them.
    optim.load_state_dict(_clone_tree(good["optim"]))
    if loop.rollbacks >= cfg.max_rollbacks:
        raise FloatingPointError(
            f"Training diverged: NaN/inf loss or gradient at {where}, after {loop.rollbacks} "
            f"rollback(s) with the learning rate lowered to {lr:.3g}. The module was reset to "
            f"the last finite state ({good_point}). Check the input (raw integer "
            f"counts, no extreme values, the right layer) or {advice}."
        )
    loop.rollbacks += 1
    loop.lr_scale *= cfg.rollback_lr_factor  # the retried epoch sets its lr from this scale
    new_lr = lr * cfg.rollback_lr_factor
    warnings.warn(
        f"NaN/inf loss or gradient at {where}; rolled back to {good_point} and "
        f"lowered the learning rate to {new_lr:.3g} (rollback {loop.rollbacks} of at most "
        f"{cfg.max_rollbacks}).", RuntimeWarning, stacklevel=4,  # past train_module and its device wrapper
    )


def _cpu_state(state: dict | None) -> dict | None:
    return None if state is None else {k: v.detach().cpu() for k, v in state.items()}


def _write_checkpoint(ck: CheckpointConfig, module: VAE, optim: torch.optim.Optimizer,
                      gen: torch.Generator, loop: _LoopState, cfg: TrainConfig,
                      train_idx: np.ndarray, val_idx: np.ndarray,
                      ranks: list[dict] | None = None) -> None:
    """``ranks``: under DDP, every rank's RNG states (:meth:`DistContext.rng_states`)."""
    cuda = torch.cuda.is_available() and any(p.is_cuda for p in module.parameters())
    ckpt.save_checkpoint(ck.path, {
        "epoch": loop.epoch,
        "stopped": loop.stopped,
        "rollbacks": loop.rollbacks,
        "lr_scale": loop.lr_scale,
        # Plain Python numbers only, so that weights_only loading accepts them.
        "rows": [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in loop.rows],
        "best": float(loop.best),
        "since_best": loop.since_best,
        "best_state": _cpu_state(loop.best_state),
        "best_epoch": loop.best_epoch,
        "module": _cpu_state(module.state_dict()),
        "optimizer": optim.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "generator": gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if cuda else [],
            "ranks": ranks or [],
        },
        "train_config": cfg.to_dict(),
        "identity": ck.identity,
        "cells": ck.cells,
        "library": None if ck.library is None else torch.from_numpy(ck.library),
        "covariates": ck.covariates,
        "train_idx": torch.from_numpy(np.asarray(train_idx, dtype=np.int64)),
        "val_idx": torch.from_numpy(np.asarray(val_idx, dtype=np.int64)),
    })


def _resume(ck: CheckpointConfig, module: VAE, optim: torch.optim.Optimizer,
            gen: torch.Generator, loop: _LoopState, cfg: TrainConfig,
            train_idx: np.ndarray, val_idx: np.ndarray, device: torch.device,
            rank: int = 0) -> None:
    """Load ``ck.path`` into module, optimiser, RNGs and ``loop``; no-op without a checkpoint.

    Under DDP each ``rank`` takes its own saved noise stream."""
    state = ckpt.load_checkpoint(ck.path, required=ckpt.TRAINING_STATE_KEYS)
    if state is None:
        return
    if state.get("identity") != ck.identity:  # first: it names the fix
        raise ValueError(f"The checkpoint {ck.path} belongs to a different model (architecture, "
                         f"genes or covariates differ). {_RESUME_FIX}")
    try:
        _check_training_state(state, ck.path, module)
        _restore(state, ck, module, optim, gen, loop, cfg, train_idx, val_idx, device, rank)
    except (TypeError, KeyError, AttributeError, IndexError, RuntimeError) as err:
        # a field of the wrong kind that the checks above do not know of
        raise ValueError(f"The checkpoint {ck.path} is corrupted ({type(err).__name__}: "
                         f"{str(err)[:200]}); {_CORRUPT_FIX}.") from None


_RESUME_FIX = ("Pass the same settings as the interrupted run, resume=False to start afresh "
               "(the checkpoint is then overwritten), or another checkpoint_dir.")
_CORRUPT_FIX = "delete it, pass resume=False, or use another checkpoint_dir"


def _check_training_state(state: dict, path: os.PathLike, module: VAE) -> None:
    """The loop's counters, the weights (current and best) and the optimiser's moments of a
    checkpoint are what training writes: a tampered one (negative epoch or learning-rate
    scale, NaN best weights) would otherwise train on silently, or blame the data."""
    def whole(key: str) -> bool:
        v = state[key]
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    bad = [k for k in ("epoch", "since_best", "rollbacks") if not whole(k)]
    scale = state.get("lr_scale", 1.0)
    if not (isinstance(scale, float | int) and math.isfinite(scale) and scale > 0):
        bad.append("lr_scale")
    if not (isinstance(state["best"], float | int) and not math.isnan(state["best"])
            and state["best"] < math.inf):
        bad.append("best")
    if not (isinstance(state["rows"], list) and all(isinstance(r, dict) for r in state["rows"])):
        bad.append("rows")
    if bad:
        raise ValueError(f"The checkpoint {path} holds values training does not write "
                         f"({', '.join(bad)}); {_CORRUPT_FIX}.")
    if module.log_theta is None and "log_theta" in state["module"]:
        raise ValueError(f"The checkpoint {path} was written by an older scvae_tools, whose "
                         "Poisson models carried an unused dispersion parameter, and cannot be "
                         "resumed; train again with resume=False (the checkpoint is then "
                         "overwritten).")
    reference = module.state_dict()
    ckpt.check_state_dict(state["module"], f"checkpoint {path}", reference)
    if state["best_state"] is not None:
        ckpt.check_state_dict(state["best_state"], f"checkpoint {path} (best weights)",
                              reference)
    moments = [v for s in state["optimizer"].get("state", {}).values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not all(torch.isfinite(v).all() for v in moments):
        raise ValueError(f"The checkpoint {path} has NaN or inf optimiser moments; "
                         f"{_CORRUPT_FIX}.")


def _restore(state: dict, ck: CheckpointConfig, module: VAE, optim: torch.optim.Optimizer,
             gen: torch.Generator, loop: _LoopState, cfg: TrainConfig,
             train_idx: np.ndarray, val_idx: np.ndarray, device: torch.device,
             rank: int) -> None:
    """:func:`_resume` once the checkpoint's values (and its model's identity) are checked."""
    now_cfg = cfg.to_dict()
    # A setting added after the checkpoint was written had its default then; train_size was
    # used before it was recorded, and the split check below covers it.
    # dispersion_lr_factor: before e4255ca θ shared the networks' Adam group, i.e. a factor 1.
    defaults = ({f.name: f.default for f in fields(TrainConfig)}
                | {"train_size": cfg.train_size} | LEGACY_TRAIN_DEFAULTS)
    saved_cfg = {k: state["train_config"].get(k, defaults.get(k)) for k in now_cfg}
    # Not a train() argument: the run continues with the factor it was started with.
    internal = {"max_epochs", "dispersion_lr_factor"}
    diff = sorted(k for k in now_cfg if k not in internal and saved_cfg[k] != now_cfg[k])
    if diff:
        detail = ", ".join(f"{k}: {saved_cfg[k]!r} → {now_cfg[k]!r}" for k in diff)
        raise ValueError(f"The checkpoint {ck.path} was written with other training settings "
                         f"({detail}). {_RESUME_FIX}")
    if int(state["epoch"]) > cfg.max_epochs:  # the record would say fewer than it holds
        raise ValueError(f"The checkpoint {ck.path} already holds {int(state['epoch'])} "
                         f"epochs, more than max_epochs={cfg.max_epochs}; pass max_epochs="
                         f"{int(state['epoch'])} or more to resume it, or resume=False to "
                         "start afresh.")
    if not (np.array_equal(state["train_idx"].numpy(), train_idx)
            and np.array_equal(state["val_idx"].numpy(), val_idx)):
        raise ValueError(f"The checkpoint {ck.path} used another train/validation split (a "
                         f"different number of cells or train_size). {_RESUME_FIX}")
    if state.get("cells") and ck.cells and state["cells"] != ck.cells:  # older: not recorded
        raise ValueError(f"The checkpoint {ck.path} was written for other cells, or the same "
                         f"cells in another order (the split is kept as row numbers). {_RESUME_FIX}")
    saved_lib = state.get("library")  # older checkpoints: not recorded
    if saved_lib is not None and ck.library is not None and not (
            len(saved_lib) == len(ck.library)
            and np.allclose(saved_lib.numpy(), ck.library, rtol=1e-4, atol=1e-3)):
        raise ValueError(f"The checkpoint {ck.path} was written for other counts: the cells' "
                         "library sizes differ (another layer, or other data under the same "
                         f"cell names). {_RESUME_FIX}")
    if state.get("covariates") and ck.covariates and state["covariates"] != ck.covariates:
        raise ValueError(f"The checkpoint {ck.path} was written for other batch labels or "
                         "covariate values under the same cell names (relabelled batches, a "
                         f"changed obs column). {_RESUME_FIX}")
    module.load_state_dict(state["module"])  # checked by _check_training_state
    cfg.dispersion_lr_factor = float(saved_cfg["dispersion_lr_factor"])
    # θ's group (see _param_groups): before loading, as _regroup_state copies lr_scale from
    # a one-group checkpoint's new groups; after, as load_state_dict replaces the groups.
    for group in optim.param_groups[1:]:
        group["lr_scale"] = cfg.dispersion_lr_factor
    optim.load_state_dict(_regroup_state(state["optimizer"], optim, module))
    for group in optim.param_groups[1:]:
        group["lr_scale"] = cfg.dispersion_lr_factor
    torch.set_rng_state(state["rng"]["torch"])
    gen.set_state(state["rng"]["generator"])
    if device.type == "cuda" and state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    ranks = state["rng"].get("ranks") or []
    if rank < len(ranks):  # DDP: this rank's own streams
        torch.set_rng_state(ranks[rank]["torch"])
        if device.type == "cuda" and ranks[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(ranks[rank]["cuda"], device)
    elif rank:  # a checkpoint from before ranks were saved: at least keep the streams apart
        seed_generators(torch.initial_seed() + rank, device)
    loop.rows = list(state["rows"])
    loop.epoch = int(state["epoch"])
    loop.best = float(state["best"])
    loop.since_best = int(state["since_best"])
    loop.best_epoch = int(state.get("best_epoch", 0))
    if "best_epoch" not in state and state["best_state"] is not None:
        # Older checkpoints: the epoch whose monitored ELBO is the best one recorded.
        loop.best_epoch = next((int(r["epoch"]) for r in loop.rows if loop.best in (
            r.get("validation_elbo"), r.get("train_elbo"))), 0)
    loop.stopped = bool(state["stopped"])
    loop.rollbacks = int(state["rollbacks"])
    loop.lr_scale = float(state.get("lr_scale", cfg.rollback_lr_factor ** loop.rollbacks))
    best = state["best_state"]
    loop.best_state = None if best is None else {k: v.to(device) for k, v in best.items()}
