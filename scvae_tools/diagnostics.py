"""A VAE's own diagnostics: rate–distortion, collapse, the two gaps, holes, disentanglement.

Every function takes a trained :class:`~scvae_tools.SCVAE` (or, for the β sweep, an AnnData)
and returns plain results (a DataFrame, a dict or a small dataclass); functions that compute
one value per cell also write it into ``adata.obs``. They are exported as ``svt.tl.*``
(``sample`` as ``model.sample``), most with a figure in ``svt.pl.*``.

Sign conventions: log-likelihoods, ELBOs and bounds are in nats per cell, higher is better;
*rate* is KL(q(z|x) ‖ p(z)) and *distortion* is −E_q[log p(x|z)], both mean nats per cell.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .adapter import Batch, CellData
from .devices import seeded
from .model import SCVAE, _check_indices, check_h5ad_key, check_key_added, check_positive_int
from .module import samples_per_block
from .train import check_nonnegative_finite, evaluate

__all__ = [
    "LatentTraversal",
    "active_units",
    "aggregated_posterior",
    "amortization_gap",
    "decoder_jacobian",
    "disentanglement",
    "jacobian_coupling",
    "latent_traversal",
    "mutual_information_gap",
    "posterior_collapse",
    "rate_distortion_sweep",
    "sample",
    "variational_gap",
]

_LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------- helpers
def _generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from fresh entropy for ``None``."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def _data(model: SCVAE, adata) -> CellData:
    if not isinstance(model, SCVAE):
        raise TypeError(f"Expected a trained svt.SCVAE, got {type(model).__name__}.")
    model._check_trained()
    return model._data_for(adata)


def _gauss_log_prob(z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, var) per dimension (broadcasting)."""
    return -0.5 * ((z - mean).pow(2) / var + torch.log(var) + _LOG_2PI)


def _per_cell_target(adata, what: str, key_added) -> None:
    """Functions that write per-cell results need an AnnData (not a path) and a name."""
    if adata is None or isinstance(adata, (str, os.PathLike)):
        raise ValueError(f"{what} writes per-cell results into adata.obs, so it needs an "
                         f"AnnData, got {adata!r}; read the file first "
                         "(adata = anndata.read_h5ad(path)) and pass adata.")
    check_key_added(key_added)


def _log_weights(module, b: Batch, cov: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                 n_samples: int) -> torch.Tensor:
    """log p(x|z_k) + log p(z_k) − log q(z_k|x) for K samples z_k ~ q(z|x): (K, cells)."""
    out = []
    chunk = samples_per_block(*b.x.shape)
    for start in range(0, n_samples, chunk):
        k = min(chunk, n_samples - start)
        z = m + v.sqrt() * torch.randn((k, *m.shape), device=m.device, dtype=m.dtype)
        params = module.decode_for_likelihood(z, b.library, cov, b.batch_index)
        log_q = _gauss_log_prob(z, m, v).sum(-1)
        out.append(module.log_px(b.x, params) + module.prior_log_prob(z) - log_q)
    return torch.cat(out, 0)


def _split_kwargs(kwargs: dict, where: str) -> tuple[dict, dict]:
    init_args = set(inspect.signature(SCVAE.__init__).parameters) - {"self", "adata"}
    train_args = set(inspect.signature(SCVAE.train).parameters) - {"self"}
    unknown = set(kwargs) - init_args - train_args
    if unknown:
        raise TypeError(
            f"Unknown argument(s) {sorted(unknown)} for {where}; model options are "
            f"{sorted(init_args)}, training options {sorted(train_args)}."
        )
    return ({k: v for k, v in kwargs.items() if k in init_args},
            {k: v for k, v in kwargs.items() if k in train_args})


# ---------------------------------------------------------------------- 1. rate–distortion
def rate_distortion_sweep(
    adata,
    betas: Sequence[float] = (0.25, 0.5, 1, 2, 4, 8),
    n_samples: int = 100,
    threshold: float = 0.01,
    **kwargs,
) -> pd.DataFrame:
    """Train one model per β and measure rate, distortion and held-out likelihood.

    Parameters
    ----------
    adata
        Counts to fit (never modified).
    betas
        KL weights to sweep (β-VAE); β = 1 is the true ELBO.
    n_samples
        Importance samples for the held-out marginal log-likelihood.
    threshold
        Active-unit threshold on the variance over cells of the posterior mean.
    **kwargs
        Options of :class:`~scvae_tools.SCVAE` (``n_latent``, ``likelihood``, …) and of
        :meth:`~scvae_tools.SCVAE.train` (``max_epochs``, ``seed``, ``train_size``, …).
        ``progress_bar`` defaults to ``False`` here.

    Returns
    -------
    One row per β with columns ``beta``, ``rate`` (KL(q(z|x) ‖ p(z))), ``distortion``
    (−E_q[log p(x|z)]), ``elbo`` (= −distortion − rate, at β = 1), ``active_units``,
    ``marginal_ll`` (importance-weighted log p(x)), all mean nats per held-out (validation)
    cell, plus ``n_cells`` and ``evaluated_on`` (``"validation"``, or ``"train"`` when
    ``train_size=1``) and ``epochs`` trained.

    Examples
    --------
    >>> df = svt.tl.rate_distortion_sweep(adata, betas=(0.5, 1, 4), max_epochs=50)
    >>> svt.pl.rate_distortion(df)
    """
    if "beta" in kwargs:
        raise TypeError("Pass the β values as betas=[...], not beta=.")
    betas = [float(b) for b in betas]
    if not betas or any(not np.isfinite(b) or b < 0 for b in betas):
        raise ValueError(f"betas must be a non-empty list of non-negative numbers, got {betas}.")
    # Checked before the first model trains, not after it.
    n_samples = check_positive_int(n_samples, "n_samples")
    check_nonnegative_finite(threshold, "threshold")
    init_kw, train_kw = _split_kwargs(kwargs, "rate_distortion_sweep")
    train_kw.setdefault("progress_bar", False)
    rows = []
    for beta in betas:
        model = SCVAE(adata, beta=beta, **init_kw)
        model.train(**train_kw)
        data = model._require_data()
        held_out = model.validation_indices
        on = "validation" if held_out is not None and len(held_out) else "train"
        idx = held_out if on == "validation" else model.train_indices
        with seeded(train_kw.get("seed", 0), model.device):  # the same draws for every β
            ev = evaluate(model.module, data, idx, 1024, model.device)
            marginal_ll = model.get_marginal_ll(n_samples=n_samples, indices=idx)
        rows.append({
            "beta": beta,
            "rate": ev["kl"],
            "distortion": ev["reconstruction"],
            "elbo": ev["elbo"],
            "active_units": active_units(model, threshold=threshold, indices=idx),
            "marginal_ll": marginal_ll,
            "n_cells": len(idx),
            "evaluated_on": on,
            "epochs": len(model.history),
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------- 2. collapse
def posterior_collapse(
    model: SCVAE, adata=None, threshold: float = 0.01, indices: np.ndarray | None = None
) -> pd.DataFrame:
    """Per-dimension collapse report.

    A dimension is *active* when the variance over cells of its posterior mean exceeds
    ``threshold`` (Burda et al. 2016): a collapsed dimension maps every cell to the same
    posterior, so it carries no information whatever its KL.

    Parameters
    ----------
    model
        A trained :class:`~scvae_tools.SCVAE`.
    adata
        Cells to evaluate (default: the training AnnData).
    threshold
        Active-unit threshold on Var_x(E[z_d | x]).
    indices
        Restrict to these rows (e.g. ``model.validation_indices``).

    Returns
    -------
    DataFrame indexed ``z0, z1, …`` with ``kl`` (mean KL(q(z_d|x) ‖ p(z_d)), nats),
    ``mean_variance`` (variance over cells of the posterior mean), ``posterior_variance``
    (mean posterior variance; ≈ 1 for a collapsed dimension under N(0, I)) and ``active``.

    Notes
    -----
    Burda's threshold of 0.01 is permissive: under N(0, I) a dimension's mean KL is
    ½·E[μ² + s² − 1 − log s²], so one whose posterior means have a variance of 0.05 over
    cells (around 0, with s² ≈ 1) counts as active at a KL of ~0.025 nats (the threshold
    itself sits at ~0.005), and such barely used dimensions are common after short
    training. Read ``kl`` next to ``active``, and pass a larger ``threshold`` (e.g. 0.1)
    to count only the dimensions that carry real information.
    """
    check_nonnegative_finite(threshold, "threshold")
    data = _data(model, adata)
    indices = _check_indices(indices, data.n_obs)
    m, v = model._posterior(data)
    if indices is not None:
        m, v = m[indices], v[indices]
    kl = model._kl_per_dim_mean(data, indices)
    var_mean = m.astype(np.float64).var(0)
    table = pd.DataFrame(
        {"kl": kl, "mean_variance": var_mean, "posterior_variance": v.mean(0),
         "active": var_mean > threshold},
        index=[f"z{d}" for d in range(m.shape[1])],
    )
    table.attrs["threshold"] = threshold  # for svt.pl.posterior_collapse(table)
    return table


def active_units(
    model: SCVAE, adata=None, threshold: float = 0.01, indices: np.ndarray | None = None
) -> int:
    """Number of active latent dimensions (variance over cells of the posterior mean > threshold).

    See :func:`posterior_collapse` for the per-dimension table.

    Parameters
    ----------
    model
        A trained :class:`~scvae_tools.SCVAE`.
    adata
        Cells to look at (default: the training AnnData).
    threshold
        Smallest variance of a dimension's posterior means that makes it active.
    indices
        Restrict to these rows (e.g. ``model.validation_indices``).
    """
    return int(posterior_collapse(model, adata, threshold, indices)["active"].sum())


# ---------------------------------------------------------------------- 3. variational gap
def variational_gap(
    model: SCVAE,
    adata,
    n_samples: int = 100,
    key_added: str = "scvae",
    batch_size: int = 256,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-cell ELBO, importance-weighted log p(x) and their difference (the variational gap).

    With K samples z_k ~ q(z|x) and log-weights log w_k = log p(x|z_k) + log p(z_k) −
    log q(z_k|x): ELBO ≈ mean_k log w_k and log p̂(x) = logsumexp_k log w_k − log K (IWAE,
    Burda et al. 2016), both from the same samples, so gap = log p̂(x) − ELBO ≥ 0 for every
    cell (Jensen). The gap is how much the Gaussian q(z|x) loses against the true posterior;
    the IWAE bound tightens towards log p(x) as K grows.

    Parameters
    ----------
    model
        A trained :class:`~scvae_tools.SCVAE`.
    adata
        Cells to evaluate; results are written to its ``obs``.
    n_samples
        K, importance samples per cell.
    key_added
        Prefix of the ``obs`` columns.
    batch_size
        Cells per minibatch; their samples are decoded a few at a time, in blocks of at
        most ~2²⁴ samples × cells × genes values.
    seed
        Seeds the samples (the global torch RNG is left as it was).

    Returns
    -------
    DataFrame indexed by cell with ``elbo``, ``log_px_iw`` and ``variational_gap``; the same
    columns are written to ``adata.obs[f"{key_added}_elbo"]``,
    ``obs[f"{key_added}_log_px_iw"]`` and ``obs[f"{key_added}_variational_gap"]``.
    """
    _per_cell_target(adata, "variational_gap", key_added)
    # a whole number: with 2.5, two draws were normalised by log 2.5 (0.22 nats too low)
    n_samples = check_positive_int(n_samples, "n_samples")
    data = _data(model, adata)
    elbo, iw = [], []
    with seeded(seed, model.device), torch.inference_mode():
        for b in model._eval_batches(data, batch_size):
            cov = model.module.covariates(b.batch_index, b.cat_covs, b.cont_covs)
            m, v = model.module.encode(b.x, cov)
            lw = _log_weights(model.module, b, cov, m, v, n_samples).double()
            elbo.append(lw.mean(0).cpu())
            iw.append((torch.logsumexp(lw, 0) - math.log(n_samples)).cpu())
    res = pd.DataFrame(
        {"elbo": torch.cat(elbo).numpy(), "log_px_iw": torch.cat(iw).numpy()},
        index=adata.obs_names.copy(),
    )
    # Clip float round-off: the gap is ≥ 0 by construction.
    res["variational_gap"] = np.maximum(res["log_px_iw"] - res["elbo"], 0.0)
    for col in res.columns:
        adata.obs[f"{key_added}_{col}"] = res[col].to_numpy()
    return res


# ---------------------------------------------------------------------- 4. amortization gap
def amortization_gap(
    model: SCVAE,
    adata,
    n_steps: int = 100,
    lr: float = 0.05,
    n_mc: int = 4,
    n_eval_samples: int = 16,
    eval_every: int = 10,
    batch_size: int = 512,
    key_added: str = "scvae",
    return_latents: bool = False,
    seed: int = 0,
):
    """Amortization gap: how much better each cell's own q(z|x) can be than the encoder's.

    Starting from the encoder's (μ, σ²), each cell's Gaussian q(z|x) is refined by
    ``n_steps`` Adam steps on its own ELBO with the decoder frozen (Cremer et al. 2018).
    Each cell keeps its best refined parameters, chosen on ``n_eval_samples`` fixed draws;
    both ELBOs are then reported on as many fresh draws, shared by the two (choosing and
    reporting on the same draws would overstate the gap by the luck of the choice). The
    gap = refined ELBO − amortized ELBO: its mean is the estimate; a single cell's can dip
    below 0 by Monte Carlo noise (0 exactly where no refinement beat the encoder).

    Parameters
    ----------
    model
        A trained :class:`~scvae_tools.SCVAE` (its weights are not changed).
    adata
        Cells to evaluate; results are written to its ``obs``.
    n_steps, lr
        Adam steps and step size for the per-cell refinement.
    n_mc
        Fresh posterior samples per step for the gradient.
    n_eval_samples
        Draws on which the refined parameters are chosen, and as many fresh ones on which
        both ELBOs are reported.
    eval_every
        Steps between evaluations of the refined ELBO (the best one is kept).
    batch_size
        Cells refined together.
    key_added
        Prefix of the ``obs`` columns.
    return_latents
        Also return the refined posterior means, cells × n_latent.
    seed
        Seeds the samples (the global torch RNG is left as it was).

    Returns
    -------
    DataFrame indexed by cell with ``amortized_elbo``, ``refined_elbo`` and
    ``amortization_gap`` (nats), also written to ``adata.obs[f"{key_added}_<column>"]``;
    with ``return_latents`` a tuple ``(DataFrame, refined_means)``.
    """
    _per_cell_target(adata, "amortization_gap", key_added)
    n_steps, n_mc, n_eval_samples, eval_every = (
        check_positive_int(val, name) for name, val in (
            ("n_steps", n_steps), ("n_mc", n_mc), ("n_eval_samples", n_eval_samples),
            ("eval_every", eval_every)))
    data = _data(model, adata)
    module = model.module
    flags = [p.requires_grad for p in module.parameters()]
    amortized, refined, latents = [], [], []
    try:
        for p in module.parameters():  # frozen decoder (and encoder): only q's parameters move
            p.requires_grad_(False)
        with seeded(seed, model.device):
            for b in model._eval_batches(data, batch_size):
                a, r, mu = _refine_batch(module, b, n_steps, lr, n_mc, n_eval_samples, eval_every)
                amortized.append(a)
                refined.append(r)
                latents.append(mu)
    finally:
        for p, f in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(f)
    res = pd.DataFrame(
        {"amortized_elbo": torch.cat(amortized).numpy(), "refined_elbo": torch.cat(refined).numpy()},
        index=adata.obs_names.copy(),
    )
    res["amortization_gap"] = res["refined_elbo"] - res["amortized_elbo"]
    for col in res.columns:
        adata.obs[f"{key_added}_{col}"] = res[col].to_numpy()
    if return_latents:
        return res, torch.cat(latents).numpy()
    return res


def _refine_batch(module, b: Batch, n_steps: int, lr: float, n_mc: int, n_eval: int,
                  eval_every: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        cov = module.covariates(b.batch_index, b.cat_covs, b.cont_covs)
        m0, v0 = module.encode(b.x, cov)
    eval_eps = torch.randn((n_eval, *m0.shape), dtype=m0.dtype, device=m0.device)
    chunk = samples_per_block(*b.x.shape)

    def elbo_part(mean: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The ELBO's Monte Carlo sum over these draws (divide by all draws for the mean)."""
        var = log_var.exp()
        z = mean + var.sqrt() * eps
        log_px = module.log_px(b.x, module.decode_for_likelihood(z, b.library, cov, b.batch_index)).sum(0)
        if module.cfg.prior == "normal":
            return log_px - len(eps) * module.kl_per_dim(mean, var, None)[0]
        return log_px - (_gauss_log_prob(z, mean, var).sum(-1) - module.prior_log_prob(z)).sum(0)

    def elbo(mean: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        # A few draws at a time: a samples × cells × genes block stays bounded.
        return sum(elbo_part(mean, log_var, e) for e in eps.split(chunk)) / len(eps)

    mean = m0.clone().requires_grad_(True)
    log_var = torch.log(v0).clone().requires_grad_(True)
    with torch.no_grad():
        best = elbo(m0, torch.log(v0), eval_eps).double()
    best_mean, best_log_var = m0.clone(), torch.log(v0)
    optim = torch.optim.Adam([mean, log_var], lr=lr)
    for step in range(1, n_steps + 1):
        eps = torch.randn((n_mc, *m0.shape), dtype=m0.dtype, device=m0.device)
        optim.zero_grad(set_to_none=True)
        for e in eps.split(chunk):  # gradients accumulate: one block of draws in memory
            # cells are independent: a sum over cells optimises each
            (-elbo_part(mean, log_var, e).sum() / n_mc).backward()
        optim.step()
        if step % eval_every == 0 or step == n_steps:
            with torch.no_grad():
                val = elbo(mean, log_var, eval_eps).double()
                better = val > best
                best = torch.where(better, val, best)
                best_mean = torch.where(better.unsqueeze(1), mean.detach(), best_mean)
                best_log_var = torch.where(better.unsqueeze(1), log_var.detach(), best_log_var)
    report_eps = torch.randn_like(eval_eps)  # independent of the choice above
    with torch.no_grad():
        amortized = elbo(m0, torch.log(v0), report_eps).double()
        refined = elbo(best_mean, best_log_var, report_eps).double()
    return amortized.cpu(), refined.cpu(), best_mean.cpu()


# ---------------------------------------------------------------------- 5. holes / sampling
def _log_q_aggregated(z: torch.Tensor, means: torch.Tensor, variances: torch.Tensor,
                      chunk: int = 256) -> torch.Tensor:
    """log q(z) = log mean_n N(z; μ_n, σ²_n) for each row of ``z``."""
    out = []
    log_var = torch.log(variances)
    for s in range(0, z.shape[0], chunk):
        zz = z[s:s + chunk, None, :]  # (c, 1, d) against (N, d)
        lp = -0.5 * ((zz - means).pow(2) / variances + log_var + _LOG_2PI).sum(-1)
        out.append(torch.logsumexp(lp, 1) - math.log(means.shape[0]))
    return torch.cat(out)


def aggregated_posterior(
    model: SCVAE,
    adata=None,
    n_samples: int = 2000,
    hole_quantile: float = 0.01,
    max_cells: int = 5000,
    key_added: str | None = "scvae_aggregated_posterior",
    seed: int = 0,
) -> dict:
    """Compare the aggregated posterior q(z) = mean over cells of q(z|x) with the prior p(z).

    KL(q(z) ‖ p(z)) is estimated by Monte Carlo with ``n_samples`` draws from q(z), the
    mixture density evaluated exactly over all cells (up to ``max_cells``, a random subset
    beyond). It is the part of the rate that buys nothing: the prior is where the model
    samples from, q(z) is where the decoder was trained. *Holes* are regions the prior
    covers but q(z) does not: each prior draw gets the score log q(z); a draw is in a hole
    when that density is below the ``hole_quantile`` quantile of log q(z) at q's own draws.

    Parameters
    ----------
    model
        A trained :class:`~scvae_tools.SCVAE`.
    adata
        Cells defining q(z) (default: the training AnnData). When given and ``key_added``
        is not ``None``, the summary numbers are stored in ``adata.uns[key_added]``.
    n_samples
        Draws from q(z) and from p(z).
    hole_quantile
        Density threshold for holes, as a quantile of q's own log-densities.
    max_cells
        Cap on the mixture size (cost grows as n_samples × cells).
    key_added
        ``adata.uns`` key for the summary numbers (when ``adata`` is given); ``None``: store
        nothing.
    seed
        Seeds the draws (the global torch RNG is left as it was).

    Returns
    -------
    Dict with ``kl_aggregated_prior`` (KL(q(z) ‖ p(z)), nats), ``kl_prior_aggregated``
    (KL(p(z) ‖ q(z)), large when the prior puts mass in holes), ``hole_fraction``,
    ``hole_threshold``, and arrays ``prior_samples``, ``prior_log_q`` (the hole score per
    prior draw), ``posterior_samples``, ``posterior_log_q`` and ``posterior_means`` (the
    cells that define q(z): all of them, or a random ``max_cells`` in their order).
    """
    if not 0 < hole_quantile < 1:
        raise ValueError(f"hole_quantile must be in (0, 1), got {hole_quantile}.")
    if key_added is not None:
        check_h5ad_key(key_added)
    if isinstance(adata, (str, os.PathLike)) and key_added is not None:
        raise ValueError(f"aggregated_posterior stores its summary in adata.uns[{key_added!r}], "
                         "which a file path does not have: pass key_added=None, or read the "
                         "file first (adata = anndata.read_h5ad(path)).")
    if check_positive_int(n_samples, "n_samples") < 2:
        raise ValueError(f"n_samples must be at least 2, got {n_samples}.")
    max_cells = check_positive_int(max_cells, "max_cells")
    data = _data(model, adata)
    m_np, v_np = model._posterior(data)
    rng = np.random.default_rng(seed)
    if m_np.shape[0] > max_cells:
        keep = np.sort(rng.choice(m_np.shape[0], max_cells, replace=False))
        m_np, v_np = m_np[keep], v_np[keep]
    means, variances = torch.from_numpy(m_np).double(), torch.from_numpy(v_np).double()
    gen = _generator(seed)
    pick = torch.from_numpy(rng.integers(0, means.shape[0], int(n_samples)))
    z_q = means[pick] + variances[pick].sqrt() * torch.randn(
        (int(n_samples), means.shape[1]), generator=gen, dtype=torch.float64)
    module = model.module
    with torch.inference_mode():
        z_p = module.sample_prior(int(n_samples), generator=gen).cpu().double()
        log_pz_q = _prior_log_prob_cpu(module, z_q)
        log_pz_p = _prior_log_prob_cpu(module, z_p)
    log_q_q = _log_q_aggregated(z_q, means, variances)
    log_q_p = _log_q_aggregated(z_p, means, variances)
    threshold = float(torch.quantile(log_q_q, hole_quantile))
    res = {
        "kl_aggregated_prior": float((log_q_q - log_pz_q).mean()),
        "kl_prior_aggregated": float((log_pz_p - log_q_p).mean()),
        "hole_fraction": float((log_q_p < threshold).double().mean()),
        "hole_threshold": threshold,
        "hole_quantile": float(hole_quantile),
        "prior": module.cfg.prior,
        "prior_samples": z_p.numpy(),
        "prior_log_q": log_q_p.numpy(),
        "posterior_samples": z_q.numpy(),
        "posterior_log_q": log_q_q.numpy(),
        "posterior_means": m_np,
    }
    if adata is not None and key_added is not None:
        adata.uns[key_added] = {k: v for k, v in res.items() if not isinstance(v, np.ndarray)}
    return res


def _prior_log_prob_cpu(module, z: torch.Tensor) -> torch.Tensor:
    dev = next(module.parameters()).device
    dtype = next(module.parameters()).dtype
    return module.prior_log_prob(z.to(device=dev, dtype=dtype)).double().cpu()


def sample(model: SCVAE, n: int, source: str = "prior", adata=None, seed: int = 0) -> ad.AnnData:
    """Generate ``n`` cells of counts from the model.

    Each generated cell copies the library size and covariates (batch, …) of a randomly
    chosen real cell (the "template"); z comes from the prior p(z) (``source="prior"``) or
    from the aggregated posterior (``source="aggregated"``: a draw from the template cell's
    own q(z|x)); counts are drawn from p(x|z).

    Parameters
    ----------
    model
        A trained :class:`~scvae_tools.SCVAE`.
    n
        Number of cells to generate.
    source
        ``"prior"`` or ``"aggregated"``.
    adata
        Real cells to take templates from (default: the training AnnData).
    seed
        Seeds every draw (the global torch RNG is left as it was).

    Returns
    -------
    AnnData with counts (CSR float32) in ``X``, the model's genes as ``var_names``, the
    drawn z in ``obsm["X_latent"]`` and ``obs["source"]``, ``obs["template_cell"]``,
    ``obs["library"]`` (and ``obs[batch_key]`` for a batch model).
    """
    if source not in ("prior", "aggregated"):
        raise ValueError(f"source must be 'prior' or 'aggregated', got {source!r}.")
    n = check_positive_int(n, "n")  # (2.7 cells were 2, and "3" was 3)
    data = _data(model, adata)
    module = model.module
    rows = np.random.default_rng(seed).integers(0, data.n_obs, n)
    zs, counts = [], []
    with seeded(seed, model.device), torch.inference_mode():
        gen = _generator(seed)
        for b in model._eval_batches(data, 1024, indices=rows):
            cov = module.covariates(b.batch_index, b.cat_covs, b.cont_covs)
            if source == "prior":
                z = module.sample_prior(b.x.shape[0], generator=gen)
            else:
                m, v = module.encode(b.x, cov)
                z = m + v.sqrt() * torch.randn(m.shape, generator=gen, dtype=m.dtype).to(m.device)
            params = module.decode(z, b.library, cov, b.batch_index)
            counts.append(module.sample_counts(params).cpu())
            zs.append(z.cpu())
    obs = pd.DataFrame(
        {"source": pd.Categorical([source] * n),
         "template_cell": np.asarray(data.obs_names)[rows].astype(str),
         "library": data.library[rows]},
        index=[f"{source}_{i}" for i in range(n)],
    )
    if model.spec.batch_key:
        obs[model.spec.batch_key] = pd.Categorical(
            np.asarray(model.spec.batch_categories)[data.batch_index[rows]])
    out = ad.AnnData(X=sp.csr_matrix(torch.cat(counts).numpy().astype(np.float32)), obs=obs,
                     var=pd.DataFrame(index=model.var_names.copy()))
    out.obsm["X_latent"] = torch.cat(zs).numpy()
    return out


# ---------------------------------------------------------------------- 6. disentanglement
def decoder_jacobian(
    model: SCVAE, adata=None, n_cells: int | None = 500, seed: int = 0, batch_size: int = 256
) -> np.ndarray:
    """∂ log μ_x / ∂z at cells' posterior means: (cells, genes, n_latent).

    μ_x = ℓ·ρ(z), so this is ∂ log ρ / ∂z (the library does not depend on z); computed by
    forward-mode differentiation, one pass per latent dimension.

    Parameters
    ----------
    model
        A trained :class:`~scvae_tools.SCVAE`.
    adata
        Cells with the model's genes (default: the training data).
    n_cells
        How many cells, chosen at random (``None``: all of them, in order).
    seed
        Seeds the choice of cells.
    batch_size
        Cells per minibatch.
    """
    blocks = _jacobian_blocks(model, adata, n_cells, seed, batch_size)
    return torch.cat(list(blocks)).numpy()


def _jacobian_blocks(model: SCVAE, adata, n_cells: int | None, seed: int, batch_size: int):
    """:func:`decoder_jacobian` one minibatch of cells at a time, (cells, genes, n_latent)."""
    data = _data(model, adata)
    rows = _subset(data.n_obs, n_cells, seed)
    module = model.module
    for b in model._eval_batches(data, batch_size, indices=rows):
        with torch.no_grad():
            cov = module.covariates(b.batch_index, b.cat_covs, b.cont_covs)
            m, _ = module.encode(b.x, cov)

        def log_rho(z, cov=cov):
            return torch.log_softmax(module.decoder(z, cov)["logits"], dim=-1)

        cols = []
        for d in range(m.shape[1]):
            tangent = torch.zeros_like(m)
            tangent[:, d] = 1.0
            cols.append(torch.func.jvp(log_rho, (m,), (tangent,))[1].detach())
        yield torch.stack(cols, -1).cpu()


def _subset(n_obs: int, n_cells: int | None, seed: int) -> np.ndarray:
    if n_cells is None or n_cells >= n_obs:
        return np.arange(n_obs)
    if n_cells < 1:
        raise ValueError(f"n_cells must be positive or None, got {n_cells}.")
    return np.sort(np.random.default_rng(seed).choice(n_obs, n_cells, replace=False))


def jacobian_coupling(
    model: SCVAE, adata=None, n_cells: int | None = 500, active_only: bool = True,
    threshold: float = 0.01, seed: int = 0,
) -> dict:
    """Cross-coupling of latent axes through the decoder.

    For each cell, the columns of the decoder Jacobian ∂log μ_x/∂z are the gene-expression
    directions each latent axis moves; |cosine| between two columns is 0 when the axes move
    disjoint or orthogonal gene programs and 1 when they move the same one. Each column is
    first centred over genes: the softmax normalisation shifts every gene's log-proportion by
    the same amount whatever the axis, a shared component that says nothing about coupling.

    Parameters
    ----------
    model, adata, n_cells
        As in :func:`decoder_jacobian`.
    active_only
        Average the coupling over active axes only (:func:`posterior_collapse`).
    threshold
        The activity threshold (variance over cells of the posterior mean).
    seed
        Seeds the choice of cells, as in :func:`decoder_jacobian`.

    Returns
    -------
    Dict with ``coupling`` (mean |cosine| over cells and pairs of distinct axes; among active
    units when ``active_only``), ``matrix`` (DataFrame, mean |cosine| per pair of axes) and
    ``dims`` (the axes used).
    """
    # Block by block: the whole cells × genes × n_latent Jacobian is never held (with all
    # genes, 500 cells would take over a GB).
    cos_sum, n = 0.0, 0
    shape = model.spec.n_genes * model.module_config.n_latent
    cells = int(min(256, max(8, (1 << 22) // shape)))  # blocks of ~2²² values
    for block in _jacobian_blocks(model, adata, n_cells, seed, batch_size=cells):
        jac = block.double()
        jac -= jac.mean(1, keepdim=True)
        unit = jac / jac.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos_sum = cos_sum + torch.einsum("cgi,cgj->cij", unit, unit).abs().sum(0)
        n += len(jac)
    cos = (cos_sum / n).numpy()
    names = [f"z{d}" for d in range(cos.shape[0])]
    dims = list(range(cos.shape[0]))
    if active_only:
        dims = [d for d, a in enumerate(posterior_collapse(model, adata, threshold)["active"]) if a]
    sub = cos[np.ix_(dims, dims)]
    off = sub[~np.eye(len(dims), dtype=bool)]
    return {
        "coupling": float(off.mean()) if off.size else float("nan"),
        "matrix": pd.DataFrame(cos, index=names, columns=names),
        "dims": dims,
    }


def _discretize(x: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins for a continuous column (its values as codes when at most
    ``n_bins``)."""
    x = np.asarray(x)
    uniq = np.unique(x)
    if len(uniq) <= n_bins:
        return np.searchsorted(uniq, x)
    edges = np.histogram_bin_edges(x.astype(np.float64), bins=n_bins)
    return np.clip(np.digitize(x, edges[1:-1]), 0, n_bins - 1)


def _factor_codes(v: pd.Series, n_bins: int) -> np.ndarray:
    """A factor's codes at its own levels (categorical, string, bool or integer values: a
    20-level integer factor is not merged into ``n_bins`` bins); a float factor is binned
    like the latents."""
    if v.isna().any():
        raise ValueError(f"Factor {v.name!r} has missing values; drop those cells first.")
    if isinstance(v.dtype, pd.CategoricalDtype) or v.dtype.kind in "OUSbiu":
        return pd.factorize(v)[0]
    return _discretize(v.to_numpy(), n_bins)


def _mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """Mutual information (nats) of two code vectors from their contingency table."""
    table = pd.crosstab(a, b).to_numpy().astype(np.float64)
    p = table / table.sum()
    pa, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / (pa @ pb)[nz])).sum())


def _entropy(a: np.ndarray) -> float:
    p = np.bincount(a) / len(a)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def mutual_information_gap(latent: np.ndarray, factors, n_bins: int = 10) -> dict:
    """Mutual information gap (MIG; Chen et al. 2018) between latents and known factors.

    For each factor v_k: (I(z_(1); v_k) − I(z_(2); v_k)) / H(v_k), with z_(1), z_(2) the two
    latent axes most informative about it; MIG is the mean over factors, in [0, 1], high when
    each factor is captured by one axis alone. Latents and float factors are discretised into
    ``n_bins`` equal-width bins; categorical, string, bool and integer factors keep their own
    levels, however many. The plug-in estimate is biased upwards by about
    (n_bins − 1)(L − 1) / (2 · cells) nats for a factor of L levels (L = n_bins when binned),
    so keep ``n_bins`` well below √cells.

    Parameters
    ----------
    latent
        Cells × latent dimensions (≥ 2).
    factors
        Cells × factors (DataFrame or array) of true generative factors.
    n_bins
        Histogram bins.

    Returns
    -------
    Dict with ``mig`` (float), ``per_factor`` (Series) and ``mutual_information``
    (DataFrame, latent axes × factors, nats).
    """
    latent = np.asarray(latent, dtype=np.float64)
    fac = factors if isinstance(factors, pd.DataFrame) else pd.DataFrame(np.asarray(factors))
    if latent.ndim != 2 or latent.shape[1] < 2:
        raise ValueError(f"latent must be cells × (≥ 2) dimensions, got shape {latent.shape}.")
    bad = int((~np.isfinite(latent)).any(axis=1).sum())
    if bad:  # a NaN was binned as a level of its own (or broke the binning)
        raise ValueError(f"latent has non-finite values in {bad} cells; drop those cells "
                         "(from the latent and the factors) first.")
    if len(fac) != latent.shape[0]:
        raise ValueError(f"factors has {len(fac)} rows but latent has {latent.shape[0]} cells.")
    if n_bins < 2:
        raise ValueError(f"n_bins must be at least 2, got {n_bins}.")
    if fac.shape[1] == 0:  # the mean over no factors would be NaN, silently
        raise ValueError("factors has no columns: pass at least one known factor (e.g. "
                         "factor_keys=['cell_type'] with disentanglement).")
    zc = [_discretize(latent[:, d], n_bins) for d in range(latent.shape[1])]
    mi = np.zeros((latent.shape[1], fac.shape[1]))
    gaps = {}
    for k, col in enumerate(fac.columns):
        v = _factor_codes(fac[col], n_bins)
        h = _entropy(v)
        if h <= 0:
            raise ValueError(f"Factor {col!r} is constant; it carries no information.")
        mi[:, k] = [_mutual_info(z, v) for z in zc]
        top = np.sort(mi[:, k])[::-1]
        gaps[str(col)] = (top[0] - top[1]) / h
    per = pd.Series(gaps, name="mig")
    return {
        "mig": float(per.mean()),
        "per_factor": per,
        "mutual_information": pd.DataFrame(
            mi, index=[f"z{d}" for d in range(latent.shape[1])], columns=[str(c) for c in fac.columns]),
    }


def disentanglement(
    model: SCVAE,
    adata,
    factor_keys: Sequence[str],
    n_bins: int = 10,
    n_cells: int | None = 500,
    key_added: str | None = "scvae_disentanglement",
    seed: int = 0,
) -> dict:
    """Disentanglement against known factors: MIG plus the decoder-Jacobian coupling.

    Parameters
    ----------
    model
        A trained :class:`~scvae_tools.SCVAE`.
    adata
        Cells with the true factors in ``obs[factor_keys]`` (e.g.
        :func:`scvae_tools.datasets.synthetic_factors`).
    factor_keys
        ``obs`` columns of the factors.
    n_bins
        Bins for the mutual-information estimate.
    n_cells
        Cells for the Jacobian (all for ``None``).
    key_added
        ``adata.uns`` key for the summary (``mig``, ``per_factor``, ``coupling``); ``None``
        skips writing.
    seed
        Seeds the choice of cells for the Jacobian.

    Returns
    -------
    Dict with ``mig``, ``per_factor``, ``mutual_information`` (see
    :func:`mutual_information_gap`) and ``coupling``, ``coupling_matrix`` (see
    :func:`jacobian_coupling`).
    """
    if not isinstance(adata, ad.AnnData):
        raise ValueError("disentanglement reads the factors from adata.obs, so it needs an "
                         f"AnnData, got {type(adata).__name__}; read a file first "
                         "(adata = anndata.read_h5ad(path)).")
    if key_added is not None:
        check_h5ad_key(key_added)
    factor_keys = [factor_keys] if isinstance(factor_keys, str) else list(factor_keys)
    if not factor_keys:
        raise ValueError("factor_keys is empty: name at least one obs column of a known "
                         "factor (e.g. factor_keys=['cell_type']).")
    missing = [k for k in factor_keys if k not in adata.obs]
    if missing:
        raise KeyError(f"Factor column(s) {missing} not in adata.obs; available: {list(adata.obs.columns)}.")
    latent = model.get_latent_representation(adata)
    res = mutual_information_gap(latent, adata.obs[factor_keys], n_bins=n_bins)
    jc = jacobian_coupling(model, adata, n_cells=n_cells, seed=seed)
    res.update(coupling=jc["coupling"], coupling_matrix=jc["matrix"])
    if key_added is not None:
        adata.uns[key_added] = {"mig": res["mig"], "coupling": res["coupling"],
                                "per_factor": res["per_factor"].to_dict()}
    return res


@dataclass
class LatentTraversal:
    """Decoded expression along latent axes, from :func:`latent_traversal`.

    Attributes
    ----------
    dims
        The latent axes traversed.
    values
        (len(dims), n_steps): the z value of each step on each axis.
    expression
        (len(dims), n_steps, genes): expression per ``library_size`` counts.
    var_names
        The genes.
    reference
        The latent point all other axes are held at.
    library_size
        The counts the expression is per.
    """

    dims: list[int]
    values: np.ndarray
    expression: np.ndarray
    var_names: pd.Index
    reference: np.ndarray
    library_size: float = 1e4

    def log2(self) -> np.ndarray:
        """log2(1 + expression): the pseudocount keeps barely expressed genes from dominating."""
        return np.log2(1.0 + self.expression)

    def log2_change(self) -> pd.DataFrame:
        """Axes × genes: log2(1 + expression) at the last step minus at the first."""
        lg = self.log2()
        return pd.DataFrame(lg[:, -1] - lg[:, 0], index=[f"z{d}" for d in self.dims],
                            columns=self.var_names)

    def top_genes(self, n: int = 10) -> pd.DataFrame:
        """The ``n`` genes that move most along each axis (by log2 range over the traversal).

        Parameters
        ----------
        n
            Genes per axis.

        Returns
        -------
        Long table with ``dim``, ``rank``, ``gene``, ``log2_range`` (max − min of
        log2(1 + expression) along the axis) and ``log2_fold_change`` (last step vs first; its
        sign is the direction).
        """
        lg = self.log2()
        rng_ = lg.max(1) - lg.min(1)
        change = lg[:, -1] - lg[:, 0]
        rows = []
        for i, d in enumerate(self.dims):
            order = np.argsort(-rng_[i])[:n]
            rows += [{"dim": d, "rank": r + 1, "gene": str(self.var_names[g]),
                      "log2_range": float(rng_[i, g]), "log2_fold_change": float(change[i, g])}
                     for r, g in enumerate(order)]
        return pd.DataFrame(rows)


def latent_traversal(
    model: SCVAE,
    dim: int | Sequence[int] | None = None,
    adata=None,
    n_steps: int = 11,
    quantiles: tuple[float, float] = (0.01, 0.99),
    values: Sequence[float] | None = None,
    library_size: float = 1e4,
    transform_batch: str | None = None,
) -> LatentTraversal:
    """Decode a walk along latent axes: which genes does each axis move?

    All other axes are held at the median over cells of the posterior means; axis ``d``
    steps from the ``quantiles`` of the cells' posterior means on it (so a collapsed axis
    barely moves), or through explicit ``values``.

    Parameters
    ----------
    model
        A trained :class:`~scvae_tools.SCVAE`.
    dim
        Axis or axes to traverse (default: all).
    adata
        Cells that set the reference point and range (default: the training AnnData).
    n_steps
        Steps per axis.
    quantiles
        Range of the walk as quantiles of the cells' posterior means on that axis.
    values
        Explicit z values (overrides ``quantiles`` and ``n_steps``).
    library_size
        Expression per this many counts.
    transform_batch
        Decode in this batch (default: the first batch); categorical covariates are held at
        their most frequent level, continuous ones at their mean.

    Returns
    -------
    A :class:`LatentTraversal`; ``.top_genes(n)`` lists the genes that move most per axis.
    """
    data = _data(model, adata)
    means, _ = model._posterior(data)
    n_latent = means.shape[1]
    dims = list(range(n_latent)) if dim is None else ([int(dim)] if np.isscalar(dim) else [int(d) for d in dim])
    if not dims:
        raise ValueError("dim is empty; pass a latent axis, a list of them, or None for all.")
    if not (np.isfinite(library_size) and library_size > 0):  # NaN or zero expression
        raise ValueError(f"library_size must be a positive number, got {library_size!r}.")
    bad = [d for d in dims if not 0 <= d < n_latent]
    if bad:
        raise ValueError(f"dim {bad} out of range; the model has n_latent={n_latent} (0 … {n_latent - 1}).")
    if values is None:
        lo, hi = quantiles
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"quantiles must satisfy 0 <= lo < hi <= 1, got {quantiles}.")
        if check_positive_int(n_steps, "n_steps") < 2:
            raise ValueError(f"n_steps must be at least 2, got {n_steps}.")
        grid = np.stack([np.linspace(*np.quantile(means[:, d], [lo, hi]), n_steps) for d in dims])
    else:
        values = np.asarray(values, dtype=np.float64).ravel()
        if not len(values) or not np.isfinite(values).all():
            raise ValueError("values must be one or more finite z values, got "
                             f"{values.tolist()[:5]}.")
        grid = np.tile(values, (len(dims), 1))
    ref = np.median(means, axis=0)
    module = model.module
    dev = model.device
    n = grid.shape[1]
    bi = torch.zeros(n, dtype=torch.long, device=dev)
    if transform_batch is not None:
        bi = model._transform_batch_index(bi, transform_batch)
    cat = torch.as_tensor(
        np.tile([np.bincount(c).argmax() for c in data.cat_covs.T], (n, 1)).reshape(n, -1),
        dtype=torch.long, device=dev)
    cont = torch.as_tensor(np.tile(data.cont_covs.mean(0), (n, 1)).reshape(n, -1),
                           dtype=torch.float32, device=dev)
    lib = torch.full((n, 1), float(library_size), dtype=torch.float32, device=dev)
    expr = []
    with torch.inference_mode():
        module.eval()
        cov = module.covariates(bi, cat, cont)
        for i, d in enumerate(dims):
            z = np.tile(ref, (n, 1))
            z[:, d] = grid[i]
            z_t = torch.as_tensor(z, dtype=torch.float32, device=dev)
            expr.append(module.decode(z_t, lib, cov, bi)["mu"].cpu().numpy())
    return LatentTraversal(dims=dims, values=grid, expression=np.stack(expr),
                           var_names=model.var_names.copy(), reference=ref,
                           library_size=float(library_size))
