"""A fused, sparsity-aware NB log-likelihood from decoder logits, with a hand-written gradient.

Most of a training step on a CPU is element-wise work over the cells × genes block: the
softmax, the logs, three ``lgamma`` calls per entry and, in the backward pass, their
derivatives (``digamma``) — each a separate kernel with its own temporaries under plain
autograd. :class:`NBFromLogits` computes, for decoder logits ``l``, log library sizes
``log ℓ``, log inverse dispersions ``log θ`` and counts ``x``::

    log ρ = log_softmax(l),   log μ = log ρ + log ℓ
    log p(x) = Σ_g θ(log θ − log(θ+μ)) + x(log μ − log(θ+μ))          (dense part)
             + Σ_{g: x_g>0} lgamma(x+θ) − lgamma(θ) − lgamma(x+1)       (non-zeros only)

per cell, and, in the same pass, its gradients with respect to ``l`` and ``log θ``. With
q_g = (x_g − μ_g)/(θ_g + μ_g) and a_g = log θ_g − log(θ_g + μ_g):

    d_g = ∂/∂ log μ_g = θ_g q_g
    ∂/∂ l_g = d_g − ρ_g Σ_h d_h
    ∂/∂ log θ_g = θ_g (a_g − q_g + ψ(x_g+θ_g) − ψ(θ_g))

For x = 0 the ``lgamma``/``digamma`` terms cancel exactly, so they are evaluated only at the
non-zero entries (single-cell data are mostly zeros); on the CPU, with one θ per gene, small
counts read them from per-gene tables (see :func:`_gamma_differences`). The value returned is the *full
normalised* log-likelihood (``lgamma(x+1)`` included, again only at non-zeros), identical to
``distributions.log_nb(x, μ, θ).sum(-1)`` up to floating-point rounding; unlike that dense
formula no ``eps`` is added inside the logs (μ comes from a log-softmax, so it is exact).
"""

from __future__ import annotations

import torch


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient back to ``shape`` (leading and size-1 dims summed)."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and grad.shape[i] != 1:
            grad = grad.sum(i, keepdim=True)
    return grad


# On the CPU, counts up to this use per-gene tables of lgamma(θ+k) − lgamma(θ) and
# ψ(θ+k) − ψ(θ) (cumulative sums of log(θ+j) and 1/(θ+j), j < k): ~95% of the non-zeros of
# a 10x matrix.
_TABLE_COUNTS = 8


def _direct_differences(
    th_nz: torch.Tensor, xv: torch.Tensor, want_digamma: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """lgamma(x+θ) − lgamma(θ) and ψ(x+θ) − ψ(θ) from ``torch.lgamma``/``torch.digamma``."""
    xt = xv + th_nz
    lg = torch.lgamma(xt).sub_(torch.lgamma(th_nz))
    return lg, (torch.digamma(xt).sub_(torch.digamma(th_nz)) if want_digamma else None)


def _with_zero_column(table: torch.Tensor) -> torch.Tensor:
    """A (genes × k) table with a zero column in front, flattened for ``take``."""
    return torch.nn.functional.pad(table, (1, 0)).reshape(-1)


def _gamma_differences(
    theta: torch.Tensor, cols: torch.Tensor, xv: torch.Tensor, want_digamma: bool,
    tables: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """lgamma(x+θ) − lgamma(θ) and ψ(x+θ) − ψ(θ) at the non-zeros, for one θ per gene.

    On a CPU ``torch.digamma`` costs ~25 ns per value (``lgamma`` ~4), and a batch has tens of
    thousands of non-zeros. Most counts are small, so there the differences are read from
    per-gene tables (genes × 8 logs and reciprocals), and only the few larger counts call
    ``lgamma``/``digamma``. On accelerators, where those calls are cheap and a data-dependent
    subset would make the host wait, they are evaluated directly (``tables=False``).
    """
    if not tables:
        return _direct_differences(theta.take(cols), xv, want_digamma)
    k_max = _TABLE_COUNTS
    shifted = theta.unsqueeze(1) + torch.arange(k_max, dtype=theta.dtype)
    # Column k of a table holds the difference for a count of k; column 0 is zero, so that a
    # stored zero (an explicit zero of a CSR matrix) adds nothing.
    idx = (cols * (k_max + 1)).add_(xv.clamp(max=k_max).long())
    large = torch.nonzero(xv > k_max).squeeze(1)
    # Past the table: lgamma(x+θ) − lgamma(θ) = table(8) + lgamma(x+θ) − lgamma(θ+8).
    th_large = theta.take(cols.take(large))
    y, top = xv.take(large).add_(th_large), th_large.add_(k_max)
    lg = _with_zero_column(torch.log(shifted).cumsum_(1)).take(idx)
    lg.index_add_(0, large, torch.lgamma(y).sub_(torch.lgamma(top)))
    if not want_digamma:
        return lg, None
    dig = _with_zero_column(shifted.reciprocal_().cumsum_(1)).take(idx)
    dig.index_add_(0, large, torch.digamma(y).sub_(torch.digamma(top)))
    return lg, dig


def _nb_core(
    logits: torch.Tensor,
    log_library: torch.Tensor,
    log_theta: torch.Tensor,
    x: torch.Tensor | None,
    want_grads: bool,
    nonzero: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row log-likelihood (rows, ) and, optionally, the unscaled gradients (rows, genes).

    All inputs are 2-D (rows × genes; ``log_library`` rows × 1; ``log_theta`` genes or
    rows × genes). The counts enter only through their non-zeros: ``nonzero`` =
    (flat positions in the rows × genes block, values) when the caller has them, else they
    are found in the dense ``x``. Runs without autograd.
    """
    per_gene_theta = log_theta.dim() == 1
    n_genes = logits.shape[-1]
    if nonzero is None:
        # Flat positions: 1-D take/index_add are much cheaper than 2-D indexing.
        flat = torch.nonzero(x.reshape(-1)).squeeze(1)
        xv = x.reshape(-1).take(flat)
    else:
        flat, xv = nonzero
    rows = torch.div(flat, n_genes, rounding_mode="floor")
    log_rho = torch.log_softmax(logits, dim=-1)
    rho = log_rho.exp()
    lib = log_library.exp()
    theta = log_theta.exp()
    tm = torch.addcmul(theta, rho, lib)  # θ + μ with μ = ℓ·ρ, in one pass
    # a = log θ − log(θ+μ); the dense part θ·a has row sums that, with one θ per gene, are
    # a mat-vec.
    a = torch.log(tm).neg_().add_(log_theta)
    ll = a.mv(theta) if per_gene_theta else torch.mul(a, theta).sum(-1)
    # x(log μ − log(θ+μ)) vanishes where x = 0, and so do the log Γ terms
    # lgamma(x+θ) − lgamma(θ) − lgamma(x+1): all are evaluated at the non-zeros only.
    if per_gene_theta:
        cols = flat - rows * n_genes
        lt_nz = log_theta.take(cols)
        lg_diff, dig = _gamma_differences(theta, cols, xv, want_grads,
                                          tables=theta.device.type == "cpu")
    else:
        lt_nz = log_theta.reshape(-1).take(flat)
        lg_diff, dig = _direct_differences(theta.reshape(-1).take(flat), xv, want_grads)
    a_nz = a.reshape(-1).take(flat)
    # log μ − log(θ+μ) = log ρ + log ℓ + a − log θ
    nz = log_rho.reshape(-1).take(flat).add_(log_library.reshape(-1).take(rows))
    nz.add_(a_nz).sub_(lt_nz).mul_(xv)
    nz += lg_diff.sub_(torch.lgamma(xv + 1.0))
    ll.index_add_(0, rows, nz)
    if not want_grads:
        return ll, None, None
    # With q = (x − μ)/(θ+μ):  ∂/∂ log μ = θ·q  and  ∂/∂ log θ (dense part) = θ·(a − q).
    # q is −μ/(θ+μ) everywhere plus x/(θ+μ) at the non-zeros: the dense x is never read.
    q = torch.mul(rho, lib).div_(tm).neg_()
    q.reshape(-1).index_add_(0, flat, xv / tm.reshape(-1).take(flat))
    s = q.mv(theta) if per_gene_theta else torch.mul(q, theta).sum(-1)  # Σ_h θ_h q_h
    g_lt = a.sub_(q)
    g_lt.reshape(-1).index_add_(0, flat, dig)  # g_lt is a fresh contiguous tensor: a view
    g_lt.mul_(theta)
    # ∂/∂ l_g = θ_g q_g − ρ_g Σ_h θ_h q_h  (the softmax's Jacobian)
    g_logits = q.mul_(theta).addcmul_(rho, s.unsqueeze(-1), value=-1.0)
    return ll, g_logits, g_lt


class NBFromLogits(torch.autograd.Function):
    """Autograd function: per-cell NB log-likelihood from decoder logits (see module doc)."""

    @staticmethod
    def forward(ctx, logits, log_library, log_theta, x, nz_flat=None, nz_values=None):  # noqa: D102
        shape = logits.shape
        n_genes = shape[-1]
        lead = shape[:-1]
        # Flatten any leading sample dimension; x, ℓ and a per-cell θ broadcast over it.
        logits2 = logits.reshape(-1, n_genes)
        x2 = x.expand(shape).reshape(-1, n_genes)
        lib2 = log_library.expand(*lead, 1).reshape(-1, 1)
        lt2 = log_theta if log_theta.dim() == 1 else log_theta.expand(shape).reshape(-1, n_genes)
        want = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        # Known non-zeros index the (cells × genes) block: usable without a sample dimension.
        nonzero = (nz_flat, nz_values) if nz_flat is not None and logits.dim() == 2 else None
        ll, g_logits, g_lt = _nb_core(logits2, lib2, lt2, x2, want, nonzero)
        if want:
            ctx.save_for_backward(g_logits, g_lt)
        ctx.lead, ctx.shape, ctx.lt_shape = lead, shape, log_theta.shape
        return ll.reshape(lead)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        g_logits, g_lt = ctx.saved_tensors
        g = grad_out.reshape(-1, 1)
        grad_logits = grad_lt = None
        if ctx.needs_input_grad[0]:
            grad_logits = (g_logits * g).reshape(ctx.shape)
        if ctx.needs_input_grad[2]:
            if len(ctx.lt_shape) == 1:
                grad_lt = g.reshape(1, -1).matmul(g_lt).reshape(ctx.lt_shape)  # Σ over rows
            else:
                grad_lt = _sum_to((g_lt * g).reshape(ctx.shape), ctx.lt_shape)
        return grad_logits, None, grad_lt, None, None, None


def nb_log_likelihood_from_logits(
    logits: torch.Tensor,
    log_library: torch.Tensor,
    log_theta: torch.Tensor,
    x: torch.Tensor,
    nonzero: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-cell Negative Binomial log-likelihood of counts under softmax-decoded means.

    Parameters
    ----------
    logits
        Decoder outputs, ``(..., cells, genes)``; the means are
        ``μ = exp(log_library) · softmax(logits)``.
    log_library
        Log library size per cell, ``(cells, 1)`` (broadcast over leading dimensions).
    log_theta
        Log inverse dispersion: ``(genes,)`` or broadcastable to ``logits``.
    x
        Counts, ``(cells, genes)``, broadcast over leading dimensions of ``logits``.
    nonzero
        Optional ``(flat positions, values)`` of the non-zeros of ``x`` (positions into
        ``x.reshape(-1)``, int64), e.g. ``Batch.nonzero``. Without it they are found with
        ``torch.nonzero``, which on an accelerator makes the host wait for the device.
        Used for 2-D ``logits`` only.

    Returns
    -------
    ``(..., cells)``: Σ_g log NB(x_g; μ_g, θ_g), the full normalised log-likelihood (with
    ``−log Γ(x+1)``). Differentiable in ``logits`` and ``log_theta`` with a fused,
    hand-written gradient; ``x`` and ``log_library`` are treated as data.

    Examples
    --------
    >>> ll = nb_log_likelihood_from_logits(logits, torch.log(library), log_theta, x)
    >>> (-ll.mean()).backward()
    """
    if logits.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"logits have {logits.shape[-1]} genes but x has {x.shape[-1]}; they must match."
        )
    if log_library.shape[-1] != 1:
        raise ValueError(
            f"log_library must have shape (cells, 1), got {tuple(log_library.shape)}."
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)  # never below float32 (bf16 MLPs)
    flat, values = (None, None) if nonzero is None else (nonzero[0], nonzero[1].to(dtype))
    return NBFromLogits.apply(
        logits.to(dtype), log_library.to(dtype), log_theta.to(dtype), x.to(dtype), flat, values
    )
