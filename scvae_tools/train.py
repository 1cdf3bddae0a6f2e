"""The training loop: Adam, KL warm-up, validation ELBO, early stopping, history.

Kept free of AnnData: it needs a :class:`~scvae_tools.module.VAE`, a
:class:`~scvae_tools.adapter.CellData` and index arrays for the train/validation split.
Per-step losses are accumulated on the device and read back once per epoch, so the
loop never forces a host–device sync inside a step.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from .adapter import CellData
from .module import VAE


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
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be at least 1, got {self.max_epochs}.")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (BatchNorm), got {self.batch_size}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}.")
        if self.beta < 0:
            raise ValueError(f"beta must be non-negative, got {self.beta}.")
        if self.kl_warmup_epochs < 0:
            raise ValueError("kl_warmup_epochs must be >= 0.")

    def to_dict(self) -> dict:
        return asdict(self)

    def beta_at(self, epoch: int) -> float:
        """β in force at ``epoch`` (0-based): linear warm-up from 0 to ``beta``."""
        if self.kl_warmup_epochs <= 0:
            return self.beta
        return self.beta * min(1.0, (epoch + 1) / self.kl_warmup_epochs)


def default_max_epochs(n_cells: int) -> int:
    """The field's rule of thumb (scvi-tools): ~20,000 / n_cells · 400 epochs, at most 400."""
    return int(max(1, min(400, round(20000 / max(n_cells, 1) * 400))))


def split_indices(n: int, train_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train/validation row indices; the validation set may be empty."""
    if not 0 < train_size <= 1:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
    perm = np.random.default_rng(seed).permutation(n)
    n_train = n if train_size >= 1 else int(math.ceil(train_size * n))
    n_train = min(max(n_train, 1), n)
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


@torch.inference_mode()
def evaluate(
    module: VAE, data: CellData, indices: np.ndarray | None, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Mean per-cell ELBO, reconstruction log-likelihood and KL over ``indices``."""
    was_training = module.training
    module.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    n = 0
    for b in data.batches(indices, batch_size=max(batch_size, 512), device=device):
        t = module.elbo_terms(b.x, b.library, b.batch_index, b.cat_covs, b.cont_covs)
        sums += torch.stack([t["log_px"].sum(), t["kl"].sum(), t["kl"].new_tensor(0.0)]).double()
        n += b.x.shape[0]
    module.train(was_training)
    log_px, kl = (sums[:2] / max(n, 1)).tolist()
    return {"elbo": log_px - kl, "reconstruction": -log_px, "kl": kl}


def train_module(
    module: VAE,
    data: CellData,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    cfg: TrainConfig,
    device: torch.device,
    progress_bar: bool = True,
) -> pd.DataFrame:
    """Train ``module`` in place; return the per-epoch history.

    Columns: ``epoch``, ``beta``, ``train_elbo``, ``train_reconstruction``, ``train_kl``,
    ``validation_elbo``, ``validation_reconstruction``, ``validation_kl`` (NaN without a
    validation set), ``lr`` and ``seconds``. ``reconstruction`` is the distortion
    −E_q[log p(x|z)] and ``kl`` the rate KL(q(z|x) ‖ p(z)), both mean nats per cell;
    ``elbo`` = −reconstruction − kl (β = 1, so epochs are comparable during warm-up).
    """
    if len(train_idx) < 2:
        raise ValueError(
            f"Training needs at least 2 cells in the training split, got {len(train_idx)}; "
            "use more cells or train_size=1.0."
        )
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    module.to(device).train()
    optim = torch.optim.Adam(
        module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps,
        **({"fused": True} if device.type == "cuda" else {}),
    )
    rows: list[dict] = []
    best, best_state, since_best = -math.inf, None, 0
    epochs = range(cfg.max_epochs)
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(epochs, desc="Training", unit="epoch")
        epochs = bar
    for epoch in epochs:
        t0 = time.perf_counter()
        beta = cfg.beta_at(epoch)
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for b in data.batches(train_idx, cfg.batch_size, shuffle=True, generator=gen,
                              device=device, drop_singleton=True):
            terms = module.elbo_terms(b.x, b.library, b.batch_index, b.cat_covs, b.cont_covs)
            loss = module.loss(terms, beta=beta, free_bits=cfg.free_bits)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sums += torch.stack([terms["log_px"].detach().sum(), terms["kl"].detach().sum()]).double()
        train_log_px, train_kl = (sums / len(train_idx)).tolist()
        row = {
            "epoch": epoch + 1,
            "beta": beta,
            "train_elbo": train_log_px - train_kl,
            "train_reconstruction": -train_log_px,
            "train_kl": train_kl,
        }
        if len(val_idx):
            val = evaluate(module, data, val_idx, cfg.batch_size, device)
            row.update({f"validation_{k}": v for k, v in val.items()})
        else:
            row.update(validation_elbo=math.nan, validation_reconstruction=math.nan,
                       validation_kl=math.nan)
        row["lr"] = optim.param_groups[0]["lr"]
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        if not math.isfinite(row["train_elbo"]):
            raise FloatingPointError(
                f"Training diverged at epoch {epoch + 1} (ELBO {row['train_elbo']}). "
                "Try a lower lr, or check the input counts."
            )
        if bar is not None:
            bar.set_postfix(elbo=f"{row['train_elbo']:.1f}",
                            val=f"{row['validation_elbo']:.1f}")
        # Early stopping watches the validation ELBO once β has reached its final value.
        monitor = row["validation_elbo"] if len(val_idx) else row["train_elbo"]
        if epoch + 1 >= cfg.kl_warmup_epochs:
            if monitor > best + cfg.early_stopping_min_delta:
                best, since_best = monitor, 0
                if cfg.restore_best and cfg.early_stopping:
                    best_state = copy.deepcopy(module.state_dict())
            else:
                since_best += 1
            if cfg.early_stopping and since_best >= cfg.early_stopping_patience:
                break
    if bar is not None:
        bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return pd.DataFrame(rows)
