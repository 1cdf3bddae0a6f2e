"""Count likelihoods: Negative Binomial, zero-inflated NB and Poisson log-probabilities.

All functions return the *full normalised* log-probability mass, including the
``-log Γ(x + 1)`` term, so that values are comparable across tools (scvi-tools uses
the same convention). Shapes broadcast; everything is differentiable in the
parameters. The NB is parameterised by its mean ``mu`` and inverse dispersion
``theta`` (variance ``mu + mu² / theta``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .devices import accumulator_dtype

LIKELIHOODS = ("nb", "zinb", "poisson")

_EPS = 1e-8


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Log-pmf of the Negative Binomial NB(x; mean ``mu``, inverse dispersion ``theta``).

    log p = lgamma(x+θ) − lgamma(θ) − lgamma(x+1) + θ·log(θ/(θ+μ)) + x·log(μ/(θ+μ))
    """
    return _theta_log_ratio(mu, theta) + _x_log_ratio(x, mu, theta) + _gamma_terms(x, theta)


def _x_log_ratio(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """x·log(μ/(θ+μ)), as −x·log1p(θ/μ).

    As a difference of two logs it cancels in float32 once μ ≫ θ (deep cells): each
    count then carries an error of ~1e-6, over a nat for a cell with 1e6 counts.
    """
    return -x * torch.log1p(theta / (mu + _EPS))


def gamma_differences(
    theta: torch.Tensor, x: torch.Tensor, want_digamma: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """lgamma(x+θ) − lgamma(θ) − lgamma(x+1) and (optionally) ψ(x+θ) − ψ(θ), elementwise.

    In float64 (except on MPS, which has none), cast back: in float32 the differences of two
    large values cancel once θ is large (at θ = 1e4, lgamma(θ) ≈ 8e4 keeps ~0.004 of its
    digits after the point, and θ·(ψ(x+θ) − ψ(θ)) has an error of ~0.01). Callers take them
    at the non-zero counts only (they vanish at x = 0). Differentiable in θ.
    """
    dtype = theta.dtype
    if theta.device.type != "mps":
        theta, x = theta.double(), x.double()
    xt = x + theta
    lg = torch.lgamma(xt).sub_(torch.lgamma(theta)).sub_(torch.lgamma(x + 1.0)).to(dtype)
    return lg, (torch.digamma(xt).sub_(torch.digamma(theta)).to(dtype) if want_digamma
                else None)


def _gamma_terms(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """lgamma(x+θ) − lgamma(θ) − lgamma(x+1), broadcast; differentiable in θ.

    Zero where x = 0, so on the CPU it is evaluated at the non-zeros only (~10% of the
    entries of single-cell counts). In float64 except on MPS (which has none): in float32
    the difference of the two large lgamma values cancels once θ is large (at θ = 1e4 each
    non-zero is ~0.002 off, and its gradient in θ, a difference of two digammas, has the
    wrong sign).
    """
    shape = torch.broadcast_shapes(x.shape, theta.shape)
    xb, tb = x.expand(shape), theta.expand(shape)
    if xb.device.type != "cpu":  # no data-dependent indexing: the host would wait
        return gamma_differences(tb, xb)[0]
    # Flat positions and index_select/index_add: their backward passes are gathers and
    # scatters (advanced indexing's backward sorts the indices: ~8× slower here).
    flat_x = xb.reshape(-1)
    flat = torch.nonzero(flat_x).squeeze(1)
    if not shape:  # all 0-d: nothing to gather
        return gamma_differences(tb, xb)[0]
    if (theta.dim() and theta.shape[-1] == shape[-1]
            and all(d == 1 for d in theta.shape[:-1])):  # per gene
        tv = theta.reshape(-1).index_select(0, flat % shape[-1])
    else:
        tv = tb.reshape(-1).index_select(0, flat)
    values = gamma_differences(tv, flat_x.index_select(0, flat))[0]
    return values.new_zeros(flat_x.shape).index_add(0, flat, values).reshape(shape)


def _theta_log_ratio(mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """θ·log(θ/(θ+μ)), the NB log-pmf at zero, as −θ·log1p(μ/θ).

    Written as a difference of two logs it cancels in float32 once θ ≫ μ (near-Poisson
    genes): at θ = 1e4, μ = 1 the value is ~1% off and its gradient in θ is lost. The
    ``eps`` gives the same value as log(θ+ε) − log(θ+μ+ε) without the cancellation.
    """
    return -theta * torch.log1p(mu / (theta + _EPS))


def log_nb_sparse(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, include_constant: bool = True
) -> torch.Tensor:
    """Per-cell NB log-likelihood Σ_g log NB(x_g; μ_g, θ_g), with log Γ only at non-zeros.

    For x = 0 the log-pmf is θ·log(θ/(θ+μ)): the terms lgamma(x+θ) − lgamma(θ) cancel and
    lgamma(x+1) = 0, so those are evaluated only where ``x > 0`` (about 10% of the entries
    of single-cell data). Equal to ``log_nb(x, mu, theta).sum(-1)``; differentiable in ``mu``
    and ``theta`` through ordinary autograd.

    Parameters
    ----------
    x
        Counts, ``(cells, genes)`` (or with leading sample dimensions broadcast from ``mu``).
    mu, theta
        NB mean and inverse dispersion, broadcastable to each other and to ``x``.
    include_constant
        Subtract lgamma(x+1). It does not depend on the parameters, so training can skip it;
        reported values keep it (the full normalised likelihood).

    Returns
    -------
    Tensor of shape ``broadcast(x, mu, theta).shape[:-1]``.
    """
    shape = torch.broadcast_shapes(x.shape, mu.shape, theta.shape)
    x_b = x.expand(shape)
    theta_b = theta.expand(shape)
    dense = _theta_log_ratio(mu, theta_b) + _x_log_ratio(x_b, mu, theta_b)
    # Summed in float64 (not on MPS, which has none): a float32 sum over thousands of genes
    # of a deep cell keeps ~0.01 nats less.
    ll = dense.sum(-1, dtype=accumulator_dtype(dense.device))
    nz = torch.nonzero(x_b, as_tuple=True)
    xv, tv = x_b[nz], theta_b[nz]
    # In float64, as log_nb: in float32 the two large lgamma values cancel at large θ.
    sparse = gamma_differences(tv, xv)[0]
    if not include_constant:
        sparse = sparse + torch.lgamma(xv + 1.0)
    # Scatter the non-zero terms back to their cells (all leading indices but the gene).
    flat = ll.reshape(-1)
    row = torch.zeros_like(nz[0])
    for dim_idx, size in zip(nz[:-1], shape[:-1], strict=True):
        row = row * size + dim_idx
    return flat.index_add(0, row, sparse.to(flat.dtype)).reshape(ll.shape).to(dense.dtype)


def log_factorial_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ_g lgamma(x_g + 1) per cell, over the non-zeros only (the NB/Poisson constant)."""
    nz = torch.nonzero(x, as_tuple=True)
    out = x.new_zeros(x.shape[:-1]).reshape(-1)
    row = torch.zeros_like(nz[0])
    for dim_idx, size in zip(nz[:-1], x.shape[:-1], strict=True):
        row = row * size + dim_idx
    return out.index_add(0, row, torch.lgamma(x[nz] + 1.0)).reshape(x.shape[:-1])


def log_zinb(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor
) -> torch.Tensor:
    """Log-pmf of the zero-inflated NB; ``pi_logits`` are the logits of the extra-zero mass.

    p(0) = π + (1−π)·NB(0), p(x>0) = (1−π)·NB(x).
    """
    log_nb_x = log_nb(x, mu, theta)
    # log(1 - π) = -softplus(logits); log π = logits - softplus(logits)
    log_one_minus_pi = -F.softplus(pi_logits)
    log_nb_zero = _theta_log_ratio(mu, theta)
    zero_case = torch.logaddexp(pi_logits, log_nb_zero) + log_one_minus_pi
    nonzero_case = log_one_minus_pi + log_nb_x
    # Only an exact zero takes the zero-inflated branch: a fractional count (allowed with
    # allow_non_integer=True) below 0.5 is a non-zero count, as in the NB and Poisson.
    return torch.where(x == 0, zero_case, nonzero_case)


def log_poisson(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Log-pmf of the Poisson with mean ``mu``: x·log μ − μ − lgamma(x+1).

    At x = 0 that is −μ. Elsewhere the three terms, each ~x·log x, cancel to far less, so
    they are summed in float64 (except on MPS, which has none) and rounded once: in float32
    a count of 1e4 lost ~1e-3 nats, a cell of 1e6 counts ~0.1. On the CPU only the
    non-zeros (~10% of the entries of single-cell data) take that path.
    """
    shape = torch.broadcast_shapes(x.shape, mu.shape)
    xb, mb = x.expand(shape), mu.expand(shape)
    wide = accumulator_dtype(xb.device)

    def at_counts(xv: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
        xv, mw = xv.to(wide), mv.to(wide)
        return (xv * torch.log(mw + _EPS) - mw - torch.lgamma(xv + 1.0)).to(mv.dtype)

    if xb.device.type != "cpu" or not shape:  # no data-dependent indexing off the CPU
        return at_counts(xb, mb)
    flat_x = xb.reshape(-1)
    flat = torch.nonzero(flat_x).squeeze(1)
    values = at_counts(flat_x.index_select(0, flat), mb.reshape(-1).index_select(0, flat))
    return mb.neg().reshape(-1).index_copy(0, flat, values).reshape(shape)


# Above this many counts a cell's Poisson log-likelihood is summed in float64 (see below).
DEEP_COUNTS = 16384


def log_poisson_sum(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Σ_g log Poisson(x_g; μ_g) per cell: ``log_poisson(x, mu).sum(-1)``, faster.

    On the CPU the element-wise terms x·log μ − μ − lgamma(x+1) in the input's dtype, one
    fused pass. They cancel (each ~x·log x) and float32 loses ~1.5e-7 nats per count, so
    cells with more than ``DEEP_COUNTS`` counts (0.002 nats lost there) are summed again
    from :func:`log_poisson`'s float64 terms. Elsewhere :func:`log_poisson` is summed (no
    data-dependent indexing on accelerators).
    """
    if mu.device.type != "cpu":
        return log_poisson(x, mu).sum(-1)
    shape = torch.broadcast_shapes(x.shape, mu.shape)
    xb, mb = x.expand(shape), mu.expand(shape)
    ll = (xb * torch.log(mb + _EPS) - mb - torch.lgamma(xb + 1.0)).sum(-1)
    deep = xb.sum(-1) > DEEP_COUNTS
    if not bool(deep.any()):
        return ll
    exact = log_poisson(xb[deep], mb[deep]).sum(-1, dtype=torch.float64).to(ll.dtype)
    return ll.masked_scatter(deep, exact)


def log_likelihood(
    likelihood: str,
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor | None = None,
    pi_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Element-wise log-probability of counts ``x`` under the named likelihood."""
    if likelihood == "nb":
        return log_nb(x, mu, theta)
    if likelihood == "zinb":
        return log_zinb(x, mu, theta, pi_logits)
    if likelihood == "poisson":
        return log_poisson(x, mu)
    raise ValueError(f"Unknown likelihood {likelihood!r}; choose one of {LIKELIHOODS}.")


def sample_counts(
    likelihood: str,
    mu: torch.Tensor,
    theta: torch.Tensor | None = None,
    pi_logits: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw counts from the named likelihood (NB as a Gamma–Poisson mixture)."""
    if likelihood == "poisson":
        rate = mu
    else:
        # Gamma(shape=θ, rate=θ/μ) has mean μ; Poisson of it is NB(μ, θ).
        gamma = torch._standard_gamma(theta.expand_as(mu).clamp_min(_EPS))
        rate = gamma * mu / theta.clamp_min(_EPS)
    counts = torch.poisson(rate.clamp(max=1e8), generator=generator)
    if likelihood == "zinb":
        pi = torch.sigmoid(pi_logits)
        dropout = torch.rand(mu.shape, generator=generator, device=mu.device) < pi
        counts = counts.masked_fill(dropout, 0.0)
    return counts
