"""Posterior predictive checks: does data simulated from the fitted model look like the data?

For each replicate, every cell gets a sample z ~ q(z | x), is decoded at its observed
library size and covariates, and counts are drawn from the likelihood p(x | z) (NB, ZINB or
Poisson). Per-gene statistics over cells — mean, variance, fraction of zeros and coefficient
of variation — are computed for the observed counts and for each replicate; a model that
fits puts the observed values inside the spread of the replicated ones. A Poisson model,
for example, cannot produce the over-dispersion and excess zeros of real UMI counts.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from .devices import seeded
from .model import check_positive_int

if TYPE_CHECKING:
    from .model import SCVAE

STATISTICS = ("mean", "variance", "zero_fraction", "cv")


@torch.inference_mode()
def _replicates(model: SCVAE, data, n_samples: int, batch_size: int, seed: int | None):
    """Yield (row indices, counts of shape (n_samples, cells in batch, genes), the observed
    counts of the batch (dense or sparse CSR)) per minibatch."""
    module = model.module
    with seeded(seed, model.device):  # the count samplers draw from the global generators
        for b in model._eval_batches(data, batch_size, sparse=True):  # encoder only
            cov = module.covariates(b.batch_index, b.cat_covs, b.cont_covs)
            m, v = module.encode(b.x, cov)
            z = m + v.sqrt() * torch.randn((n_samples, *m.shape), dtype=m.dtype, device=m.device)
            params = module.decode(z, b.library, cov, b.batch_index)
            yield b.index.cpu().numpy(), module.sample_counts(params), b.x


def posterior_predictive_sample(
    model: SCVAE, adata=None, n_samples: int = 1, gene_list: list[str] | None = None,
    batch_size: int = 256, seed: int | None = 0,
) -> np.ndarray:
    """Counts drawn from the posterior predictive; see :meth:`SCVAE.posterior_predictive_sample`."""
    model._check_trained()
    n_samples = check_positive_int(n_samples, "n_samples")
    data = model._data_for(adata)
    genes = model._gene_indices(gene_list)  # None: all, without an indexing copy
    n_out = model.spec.n_genes if genes is None else len(genes)
    out = np.empty((data.n_obs, n_out, n_samples), dtype=np.float32)
    for rows, counts, _ in _replicates(model, data, n_samples, batch_size, seed):
        out[rows] = (counts if genes is None else counts[:, :, genes]).permute(1, 2, 0).cpu().numpy()
    return out


def _stats_from_moments(n: int, s: np.ndarray, ss: np.ndarray, nz: np.ndarray) -> dict[str, np.ndarray]:
    """Per-gene mean, sample variance, zero fraction and CV from sums over ``n`` cells."""
    mean = s / n
    var = np.maximum(ss - n * mean**2, 0.0) / max(n - 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cv = np.where(mean > 0, np.sqrt(var) / mean, np.nan)
    return {"mean": mean, "variance": var, "zero_fraction": 1.0 - nz / n, "cv": cv}


def ppc(
    model: SCVAE, adata=None, n_samples: int = 10, batch_size: int = 256, seed: int | None = 0,
) -> pd.DataFrame:
    """Per-gene posterior predictive check; see :func:`scvae_tools.tl.ppc`."""
    model._check_trained()
    n_samples = check_positive_int(n_samples, "n_samples")
    data = model._data_for(adata)
    n, g = data.n_obs, model.spec.n_genes
    # Sums over cells for the observed (first row) and each replicated data set, batch by
    # batch: backed data are read in chunks like any evaluation. float64: sums of squares
    # of large counts lose precision in float32 (and after the move, as MPS has none).
    with torch.inference_mode():  # the batches' tensors are inference tensors
        sums = torch.zeros(3, 1 + n_samples, g, dtype=torch.float64)
        for _, counts, x in _replicates(model, data, n_samples, batch_size, seed):
            x = (x.to_dense() if x.layout == torch.sparse_csr else x).cpu().double()
            c = torch.cat([x.unsqueeze(0), counts.cpu().double()])
            sums[0] += c.sum(1)
            sums[1] += (c * c).sum(1)
            sums[2] += (c > 0).sum(1)
    s, ss, nz = sums.numpy()
    observed = _stats_from_moments(n, s[0], ss[0], nz[0])
    rep = _stats_from_moments(n, s[1:], ss[1:], nz[1:])  # (n_samples, genes) each
    cols: dict[str, np.ndarray] = {}
    for stat in STATISTICS:
        cols[f"{stat}_obs"] = observed[stat]
        with warnings.catch_warnings():  # genes with no count in any replicate: NaN CV
            warnings.simplefilter("ignore", RuntimeWarning)
            cols[f"{stat}_rep"] = np.nanmean(rep[stat], 0) if n_samples > 1 else rep[stat][0]
            cols[f"{stat}_rep_sd"] = np.nanstd(rep[stat], 0) if n_samples > 1 else np.zeros(g)
    table = pd.DataFrame(cols, index=pd.Index(model.spec.var_names))
    table.attrs["likelihood"] = model.module_config.likelihood
    table.attrs["n_samples"] = n_samples
    return table


def ppc_summary(table: pd.DataFrame) -> pd.Series:
    """One number per statistic: how far replicated values sit from observed ones.

    Parameters
    ----------
    table
        A table from :func:`ppc` (``svt.tl.ppc``).

    Returns
    -------
    Series indexed by statistic. ``zero_fraction``: mean absolute difference (fraction of
    cells). ``mean``, ``variance`` and ``cv``: median absolute log10 ratio replicated /
    observed over genes with both values positive and finite (0 = perfect; 0.3 ≈ a factor
    of 2; NaN when no gene has both). Lower is better.
    """
    missing = [f"{s}_{k}" for s in STATISTICS for k in ("obs", "rep") if f"{s}_{k}" not in table]
    if missing:
        raise KeyError(f"Not a PPC table (from svt.tl.ppc): columns {missing} are missing.")
    out = {"zero_fraction": float(np.mean(np.abs(table["zero_fraction_rep"] - table["zero_fraction_obs"])))}
    for stat in ("mean", "variance", "cv"):
        obs, rep = table[f"{stat}_obs"].to_numpy(), table[f"{stat}_rep"].to_numpy()
        ok = (obs > 0) & (rep > 0) & np.isfinite(obs) & np.isfinite(rep)
        out[stat] = float(np.median(np.abs(np.log10(rep[ok] / obs[ok])))) if ok.any() else np.nan
    return pd.Series(out, name="ppc_error")
