"""Fused, sparsity-aware NB and ZINB log-likelihoods from decoder logits, with hand-written
gradients.

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

a_g is computed as −log1p(μ_g/θ_g): for near-Poisson genes (θ ≫ μ) the difference of the
two logs would cancel in float32 and leave the dispersion's gradient with no correct digit.

For x = 0 the ``lgamma``/``digamma`` terms cancel exactly, so they are evaluated only at the
non-zero entries (single-cell data are mostly zeros); on the CPU, with one θ per gene, small
whole counts read them from per-gene tables (see :func:`_gamma_differences`). The value
returned is the *full normalised* log-likelihood (``lgamma(x+1)`` included, again only at
non-zeros), identical to ``distributions.log_nb(x, μ, θ).sum(-1)`` up to floating-point
rounding; unlike that dense formula no ``eps`` is added inside the logs (μ comes from a
log-softmax, so it is exact). The non-zeros come as a :class:`NonZeros`, read off CSR rows
on the host by the data path, or are searched for in the dense counts.

:class:`ZINBFromLogits` does the same for the zero-inflated NB (:func:`_zinb_core`): the
NB's terms, each zero's weight between the NB and the extra-zero component, and the
gradient in the dropout logits as well; in the compiled kernel where the NB's runs, else in
torch operations (:func:`_zinb_core_torch`).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from scvae_tools import native
from scvae_tools.devices import accumulator_dtype
from scvae_tools.distributions import gamma_differences as _direct_differences


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient back to ``shape`` (leading and size-1 dims summed)."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and grad.shape[i] != 1:
            grad = grad.sum(i, keepdim=True)
    return grad


_MIN_LOG_THETA = -60.0

# On the CPU, counts up to this use per-gene tables of lgamma(θ+k) − lgamma(θ) and
# ψ(θ+k) − ψ(θ) (cumulative sums of log(θ+j) and 1/(θ+j), j < k): ~95% of the non-zeros of
# a 10x matrix.
_TABLE_COUNTS = 8


def _with_zero_column(table: torch.Tensor) -> torch.Tensor:
    """A (genes × k) table with a zero column in front, flattened for ``take``."""
    return torch.nn.functional.pad(table, (1, 0)).reshape(-1)


def table_slots(cols, values, whole: bool = False):
    """Where each non-zero reads the per-gene tables of :func:`_gamma_differences`, and
    which non-zeros lie outside them (counts past the table, or not whole numbers).

    Works on numpy arrays (the host, while the device computes) and on torch tensors alike.
    Returns ``(slot, outside)``: the slot of gene g and count k is g·(k_max + 1) + k, with
    the integer type of ``cols`` (int32 is enough; the tables are read with
    ``index_select``); the outside entries read slot g·(k_max + 1), the zero column, and are
    evaluated directly. ``whole``: the caller knows the values are whole numbers (counts
    validated as integers), so they need not be checked again.
    """
    k = _TABLE_COUNTS
    slot = cols * (k + 1)
    if isinstance(values, torch.Tensor):
        whole = values.floor()
        if torch.equal(values, whole):  # whole counts, the usual case: a cheaper test
            # Past the table (or negative, which no table holds: a slot below g·(k+1) would
            # be the previous gene's): the zero column, evaluated directly.
            out_mask = (values > k) | (values < 0)
            slot.add_(values.masked_fill(out_mask, 0).long())
            return slot, torch.nonzero(out_mask).squeeze(1)
        inside = (values <= k) & (values >= 0) & (values == whole)
        return (slot.add_(torch.where(inside, values, 0.0).long()),
                torch.nonzero(~inside).squeeze(1))
    floor = None if whole else np.floor(values)
    if whole or np.array_equal(values, floor):
        out_mask = (values > k) | (values < 0)  # past the table, or no count: zero column
        slot += np.where(out_mask, 0, values).astype(np.int8)  # int8: less memory traffic
        return slot, np.flatnonzero(out_mask)
    inside = (values <= k) & (values >= 0) & (values == floor)
    slot += np.where(inside, values, 0).astype(slot.dtype)
    return slot, np.flatnonzero(~inside)


def _gamma_differences(
    theta: torch.Tensor, cols: torch.Tensor, xv: torch.Tensor, want_digamma: bool,
    tables: bool = True, slots: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """lgamma(x+θ) − lgamma(θ) − lgamma(x+1) and ψ(x+θ) − ψ(θ) at the non-zeros, for one θ
    per gene.

    On a CPU ``torch.digamma`` costs ~25 ns per value (``lgamma`` ~4), and a batch has tens
    of thousands of non-zeros. Most counts are small whole numbers, so there the differences
    are read from per-gene tables (genes × 8 sums of logs and reciprocals, log k! folded
    in), and only the few other entries (larger or non-integer counts) call
    ``lgamma``/``digamma``. On accelerators, where those calls are cheap and a
    data-dependent subset would make the host wait, they are evaluated directly
    (``tables=False``). ``slots``: :func:`table_slots` of these entries when the data path
    computed them.
    """
    if not tables:
        return _direct_differences(theta.index_select(0, cols), xv, want_digamma)
    k_max = _TABLE_COUNTS
    steps = torch.arange(k_max, dtype=theta.dtype)
    shifted = theta.unsqueeze(1) + steps
    # Column k of a table holds the value for a count of k; column 0 is zero, so that a
    # stored zero (an explicit zero of a CSR matrix) and the entries outside the table add
    # nothing there. log Γ(k+1) = log k! is one row shared by all genes.
    slot, outside = table_slots(cols, xv) if slots is None else slots
    log_factorial = torch.log1p(steps).cumsum_(0)
    lg_table = _with_zero_column(torch.log(shifted).cumsum_(1).sub_(log_factorial))
    if want_digamma:  # one gather of (log Γ, ψ) pairs: ~20% cheaper than two
        pairs = torch.stack([lg_table, _with_zero_column(shifted.reciprocal_().cumsum_(1))], 1)
        both = pairs.index_select(0, slot)
        lg, dig = both[:, 0], both[:, 1]
    else:
        lg, dig = lg_table.index_select(0, slot), None
    lg_out, dig_out = _direct_differences(
        theta.index_select(0, cols.index_select(0, outside)), xv.index_select(0, outside),
        want_digamma)
    lg.index_add_(0, outside, lg_out)
    if dig is not None:
        dig.index_add_(0, outside, dig_out)
    return lg, dig


class NonZeros(NamedTuple):
    """The non-zero counts of a (cells × genes) block, as the data path knows them.

    Everything here depends on the data only, so the host can read it off CSR rows while
    the device computes; the likelihood then never searches the dense block. Only ``flat``
    and ``values`` are required: missing fields are derived from ``flat`` and ``values``.
    """

    flat: torch.Tensor  # int64 positions in block.reshape(-1), in row-major order
    values: torch.Tensor  # the counts there (a CSR matrix's stored zeros may be among them)
    rows: torch.Tensor | None = None  # int64 block row of each entry
    cols: torch.Tensor | None = None  # gene of each entry (int32 or int64)
    lengths: torch.Tensor | None = None  # int64 number of entries in each block row
    slot: torch.Tensor | None = None  # table_slots(cols, values)
    outside: torch.Tensor | None = None

    @classmethod
    def of_dense(cls, x: torch.Tensor) -> NonZeros:
        """Search a dense (cells × genes) block (on an accelerator the host waits for it)."""
        flat = torch.nonzero(x.reshape(-1)).squeeze(1)
        return cls(flat, x.reshape(-1).take(flat)).complete(x.shape[0], x.shape[1])

    def complete(self, n_rows: int, n_genes: int, slots: bool = True) -> NonZeros:
        """Rows and columns filled in from ``flat`` where missing, and, on the CPU, the row
        lengths and (with ``slots``) table slots (on an accelerator they would make the host
        wait)."""
        nz = self
        cpu = self.flat.device.type == "cpu"
        if nz.rows is None or nz.cols is None:
            rows = torch.div(nz.flat, n_genes, rounding_mode="floor")
            nz = nz._replace(rows=rows, cols=nz.flat - rows * n_genes)
        if cpu and nz.lengths is None:
            nz = nz._replace(lengths=torch.bincount(nz.rows, minlength=n_rows))
        if cpu and slots and nz.slot is None:
            slot, outside = table_slots(nz.cols, nz.values)
            nz = nz._replace(slot=slot, outside=outside)
        return nz

    def tile(self, k: int, n_rows: int, n_genes: int) -> NonZeros:
        """The non-zeros of ``k`` copies of the block stacked row-wise (a block broadcast
        over ``k`` posterior samples): no search of the ``k``-fold block."""
        if k == 1:
            return self
        nz = self.complete(n_rows, n_genes, slots=False)  # slots: tiled only if present
        step = torch.arange(k, device=nz.flat.device).unsqueeze(1)

        def shifted(a: torch.Tensor | None, by: int) -> torch.Tensor | None:
            return None if a is None else (a.unsqueeze(0) + step * by).reshape(-1)

        def repeated(a: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None else a.repeat(k)

        return NonZeros(shifted(nz.flat, n_rows * n_genes), repeated(nz.values),
                        shifted(nz.rows, n_rows), repeated(nz.cols), repeated(nz.lengths),
                        repeated(nz.slot), shifted(nz.outside, len(nz.values)))


def _row_sums(values: torch.Tensor, nz: NonZeros, n_rows: int) -> torch.Tensor:
    """Σ of ``values`` (one per non-zero) within each block row.

    On the CPU, numpy's ``add.reduceat`` over the rows' starts: ~5× faster there than
    ``torch.segment_reduce`` (which in turn beats ``index_add``). Elsewhere, or when a row
    has no entries (``reduceat`` would not give 0 there), an ``index_add`` over the rows.
    """
    if nz.lengths is not None and values.device.type == "cpu" and len(values) and bool(
            nz.lengths.all()):
        starts = (nz.lengths.cumsum(0) - nz.lengths).numpy()
        return torch.from_numpy(np.add.reduceat(values.numpy(), starts))
    return values.new_zeros(n_rows).index_add_(0, nz.rows, values)


def _nb_core(
    logits: torch.Tensor,
    log_library: torch.Tensor,
    log_theta: torch.Tensor,
    x: torch.Tensor,
    want_grads: bool,
    nonzero: NonZeros | None = None,
    theta_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row log-likelihood (rows, ) and, optionally, two *negated* gradient pieces.

    All inputs are 2-D (rows × genes; ``log_library`` rows × 1; ``log_theta`` genes or
    rows × genes, or T × genes with ``theta_index`` giving each row's row of it: one θ per
    batch). Runs without autograd.

    The terms linear in x, x·(log μ − log(θ+μ)), are dense products with the dense block
    ``x``: one streaming pass over the block costs less than gathering at the non-zeros
    once a tenth or more of the entries are non-zero. Only the log Γ and ψ differences,
    which vanish at x = 0, are evaluated at the non-zeros (``nonzero`` when the caller has
    them, else they are found in ``x``).

    With ``want_grads`` it also returns −∂ll/∂logits and G with −∂ll/∂log θ = θ·G: the
    signs and the factor θ are applied in the backward pass, where they cost nothing
    (the upstream gradient is one number per row), instead of a pass over the block here.

    In float32 on the CPU this runs in :mod:`~scvae_tools.native`'s compiled kernel when it
    is available (one pass per cell instead of ~30 torch kernels); otherwise in
    :func:`_nb_core_torch`. Both give the same values to float32 rounding.
    """
    # μ/θ must stay finite (b = log1p(μ/θ)); θ below e^-60 (a dispersion of 1e26) is
    # meaningless anyway, and at e^-88 μ/θ would overflow float32 and make θ·b = 0·inf.
    log_theta = log_theta.clamp(min=_MIN_LOG_THETA)
    if native_ready(logits, log_library, log_theta, x):
        return _nb_core_native(logits, log_library, log_theta, x, want_grads, nonzero,
                               theta_index=theta_index)
    return _nb_core_torch(logits, log_library, _theta_rows(log_theta, theta_index), x,
                          want_grads, nonzero)


def _theta_rows(log_theta: torch.Tensor, theta_index: torch.Tensor | None) -> torch.Tensor:
    """log θ as the torch cores take it: per gene, or one row per block row."""
    return log_theta if theta_index is None else log_theta[theta_index]


def _nb_core_native(
    logits: torch.Tensor,
    log_library: torch.Tensor,
    log_theta: torch.Tensor,
    x: torch.Tensor,
    want_grads: bool,
    nonzero: NonZeros | None = None,
    pi_logits: torch.Tensor | None = None,
    theta_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """:func:`_nb_core` in the compiled kernel (float32, CPU); with ``pi_logits``,
    :func:`_zinb_core`'s. A θ per entry (rows × genes) is passed as one row per block row."""
    n_rows, n_genes = logits.shape
    if log_theta.dim() == 2 and theta_index is None:
        theta_index = torch.arange(n_rows)
    nz = (NonZeros.of_dense(x) if nonzero is None else nonzero).complete(
        n_rows, n_genes, slots=False)  # the kernel reads counts, not table slots
    starts = torch.zeros(n_rows + 1, dtype=torch.int64)
    torch.cumsum(nz.lengths, 0, out=starts[1:])
    return native.nb_rows(logits, log_library, log_theta, x, starts, nz.cols.long(),
                          nz.values, want_grads, pi_logits, theta_index)


def _nb_pieces(logits, log_library, log_theta, x, nonzero):
    """What the NB and ZINB cores share: the non-zeros, log ρ, ρ, θ, μ = ℓ·ρ and
    b = log(θ+μ) − log θ = −a.

    b is computed as log1p(μ/θ): the difference of the two logs cancels in float32 once
    θ ≫ μ (near-Poisson genes), and θ·(b − p), the dispersion's gradient, would be left
    with nothing."""
    n_rows, n_genes = logits.shape
    nz = (NonZeros.of_dense(x) if nonzero is None else nonzero).complete(n_rows, n_genes)
    log_rho = torch.log_softmax(logits, dim=-1)
    rho = log_rho.exp()
    theta = log_theta.exp()
    mu = torch.mul(rho, log_library.exp())
    return nz, log_rho, rho, theta, mu, torch.div(mu, theta).log1p_()


def _linear_terms(log_rho: torch.Tensor, log_library: torch.Tensor, log_theta: torch.Tensor,
                  x: torch.Tensor) -> torch.Tensor:
    """Σ_g x·log(μ/(θ+μ)) per row, as −Σ_g x·softplus(log θ − log μ).

    Where μ ≫ θ each term is small, and written as x·(log μ − log(θ+μ)) it is the
    difference of two values near log μ: a cell with 1e5 counts lost ~0.1 nats of its
    log-likelihood to float32 rounding that way, 1e6 counts over 1. Summed in float64
    (except on MPS, which has none).
    """
    d = torch.sub(log_theta, log_rho).sub_(log_library)
    return F.softplus(d).mul_(x).sum(-1, dtype=accumulator_dtype(x.device)).neg_().to(x.dtype)


def _nb_core_torch(
    logits: torch.Tensor,
    log_library: torch.Tensor,
    log_theta: torch.Tensor,
    x: torch.Tensor,
    want_grads: bool,
    nonzero: NonZeros | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`_nb_core` in torch operations (any device, dtype and dispersion shape)."""
    per_gene_theta = log_theta.dim() == 1
    n_rows = logits.shape[0]
    nz, log_rho, rho, theta, mu, b = _nb_pieces(logits, log_library, log_theta, x, nonzero)
    tm = torch.add(theta, mu)
    # Dense part: Σ_g −θ·b + x·(log ρ − log(θ+μ)) + x·log ℓ, the last being log ℓ · Σ_g x.
    # With one θ per gene, Σ_g θ·b is a mat-vec.
    ll = (b.mv(theta) if per_gene_theta else torch.mul(b, theta).sum(-1)).neg_()
    ll += _linear_terms(log_rho, log_library, log_theta, x)
    # lgamma(x+θ) − lgamma(θ) − lgamma(x+1) vanishes where x = 0: non-zeros only.
    lg_diff, dig = _gamma_terms(theta, nz, want_grads)
    ll += _row_sums(lg_diff, nz, n_rows)
    if not want_grads:
        return ll, None, None
    # With q = (x − μ)/(θ+μ):  ∂/∂ log μ = θ·q  and  ∂/∂ log θ = θ·(a − q + ψ(x+θ) − ψ(θ)).
    p = mu.sub_(x).div_(tm)  # p = −q (μ is not needed past here)
    s = p.mv(theta) if per_gene_theta else torch.mul(p, theta).sum(-1)  # −Σ_h θ_h q_h
    g_lt = b.sub_(p)  # −(a − q); b is a fresh contiguous tensor: a view is safe
    g_lt.reshape(-1).scatter_add_(0, nz.flat, dig.neg_())  # flat positions are unique
    # −∂/∂ l_g = −(θ_g q_g − ρ_g Σ_h θ_h q_h)  (the softmax's Jacobian)
    g_logits = p.mul_(theta).addcmul_(rho, s.unsqueeze(-1), value=-1.0)
    return ll, g_logits, g_lt


def _zinb_core(
    logits: torch.Tensor,
    log_library: torch.Tensor,
    log_theta: torch.Tensor,
    pi_logits: torch.Tensor,
    x: torch.Tensor,
    want_grads: bool,
    nonzero: NonZeros | None = None,
    theta_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The zero-inflated NB's :func:`_nb_core`: the compiled kernel in float32 on the CPU,
    else :func:`_zinb_core_torch` (the same values to float32 rounding)."""
    log_theta = log_theta.clamp(min=_MIN_LOG_THETA)
    pi_logits = pi_logits.expand(logits.shape)  # the kernel reads rows × genes of it
    if native_ready(logits, log_library, log_theta, pi_logits, x):
        out = _nb_core_native(logits, log_library, log_theta, x, want_grads, nonzero, pi_logits,
                              theta_index)
        return out if want_grads else (out[0], None, None, None)
    return _zinb_core_torch(logits, log_library, _theta_rows(log_theta, theta_index), pi_logits,
                            x, want_grads, nonzero)


def _zinb_core_torch(
    logits: torch.Tensor,
    log_library: torch.Tensor,
    log_theta: torch.Tensor,
    pi_logits: torch.Tensor,
    x: torch.Tensor,
    want_grads: bool,
    nonzero: NonZeros | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """:func:`_nb_core_torch` for the zero-inflated NB, with dropout logits ``pi_logits``
    (rows × genes): every entry adds log(1 − π) = −softplus(l_π), and at x = 0 the NB's
    zero term −θ·b becomes log(π/(1−π) + NB(0)) = logaddexp(l_π, −θ·b).

    With r the posterior probability that a zero came from the NB (r = 1 at non-zeros), the
    NB's gradients are weighted by r, and ∂ll/∂l_π = [x = 0](1 − r) − π. With
    ``want_grads`` it returns ``(ll, −∂ll/∂logits, G, −∂ll/∂l_π)`` with −∂ll/∂log θ = θ·G.
    """
    per_gene_theta = log_theta.dim() == 1
    n_rows = logits.shape[0]
    nz, log_rho, rho, theta, mu, b = _nb_pieces(logits, log_library, log_theta, x, nonzero)
    nb_zero = torch.mul(b, theta).neg_()  # log NB(0 | μ, θ)
    zero = x == 0  # only an exact zero takes the zero-inflated branch, as in log_zinb
    both = torch.logaddexp(pi_logits, nb_zero)
    ll = torch.where(zero, both, nb_zero).sum(-1)
    ll -= torch.nn.functional.softplus(pi_logits).sum(-1)
    ll += _linear_terms(log_rho, log_library, log_theta, x)
    lg_diff, dig = _gamma_terms(theta, nz, want_grads)
    ll += _row_sums(lg_diff, nz, n_rows)
    if not want_grads:
        return ll, None, None, None
    # At a zero, 1 − r = π'/(π' + NB(0)) = exp(l_π − both), taken so rather than as 1 − r,
    # which float32 rounds to 0 once π' is far below NB(0) (π' = π/(1−π)).
    g_pi = torch.sigmoid(pi_logits).sub_(torch.sub(pi_logits, both).exp_().mul_(zero))
    r = nb_zero.sub_(both).exp_().masked_fill_(~zero, 1.0)  # nb_zero is not needed past here
    tm = torch.add(mu, theta)
    p = mu.sub_(x).div_(tm).mul_(r)  # −q·r (μ is not needed past here)
    s = p.mv(theta) if per_gene_theta else torch.mul(p, theta).sum(-1)
    g_lt = b.mul_(r).sub_(p)  # −(a − q)·r
    g_lt.reshape(-1).scatter_add_(0, nz.flat, dig.neg_())  # ψ terms: non-zeros, where r = 1
    g_logits = p.mul_(theta).addcmul_(rho, s.unsqueeze(-1), value=-1.0)
    return ll, g_logits, g_lt, g_pi


def _gamma_terms(theta: torch.Tensor, nz: NonZeros, want_digamma: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """lgamma(x+θ) − lgamma(θ) − lgamma(x+1) and ψ(x+θ) − ψ(θ) at the non-zeros ``nz``, for
    θ per gene (``(genes,)``: tables on the CPU) or per entry (rows × genes)."""
    if theta.dim() == 1:
        return _gamma_differences(theta, nz.cols, nz.values, want_digamma,
                                  tables=theta.device.type == "cpu",
                                  slots=None if nz.slot is None else (nz.slot, nz.outside))
    return _direct_differences(theta.reshape(-1).take(nz.flat), nz.values, want_digamma)


_native_checked = False


def native_ready(*tensors: torch.Tensor) -> bool:
    """Whether :mod:`~scvae_tools.native`'s compiled kernels serve these tensors (float32,
    on the CPU): the one gate for the likelihood, the sparse first layer and denoised
    expression.

    The first time it would, its result is compared with the torch code's on a small
    problem (counts past the tables, a fraction and a stored zero included); should they
    disagree (a miscompiled kernel), it is disabled with a warning and torch serves.
    """
    global _native_checked
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    if native.library() is None:
        return False
    if not _native_checked:
        _native_checked = True
        problem = _self_check()
        if problem:
            native.disable(problem)
            warnings.warn(f"scvae_tools: the compiled NB kernel is disabled: {problem}. "
                          "Training continues with the torch code.", RuntimeWarning, stacklevel=2)
            return False
    return native.library() is not None


def _self_check() -> str | None:
    """The compiled kernels (likelihood, sparse first layer) against the torch code on a
    small problem: None when they agree."""
    gen = torch.Generator().manual_seed(0)
    F32 = torch.float32  # whatever torch's default dtype (the kernels take float32)
    n_rows, n_genes = 24, 97
    x = torch.poisson(torch.rand(n_rows, n_genes, generator=gen, dtype=F32) * 3, generator=gen)
    x[0, :5] = torch.tensor([0.5, 9.0, 40.0, 2.5, 130.0])  # fractions and large counts
    x[2, 5] = 20000.0  # a deep cell: the kernel sums its linear terms per non-zero
    logits = torch.randn(n_rows, n_genes, generator=gen, dtype=F32) * 2
    log_library = torch.log(x.sum(1, keepdim=True) + 1.0)
    log_theta = torch.randn(n_genes, generator=gen, dtype=F32)
    # A CSR matrix may store explicit zeros: list one zero of x among the non-zeros.
    flat = torch.cat([torch.nonzero(x.reshape(-1) == 0)[:1, 0],
                      torch.nonzero(x.reshape(-1))[:, 0]]).sort().values
    nz = NonZeros(flat, x.reshape(-1).take(flat)).complete(n_rows, n_genes)
    with torch.no_grad():
        want = _nb_core_torch(logits, log_library, log_theta, x, True, nz)
        got = _nb_core_native(logits, log_library, log_theta, x, True, nz)
        pi_logits = torch.randn(n_rows, n_genes, generator=gen, dtype=F32) * 3
        pi_logits[1, :3] = torch.tensor([40.0, -40.0, 0.0])  # the extra zeros near-sure, absent
        want_zi = _zinb_core_torch(logits, log_library, log_theta, pi_logits, x, True, nz)
        got_zi = _nb_core_native(logits, log_library, log_theta, x, True, nz, pi_logits)
        values_only = _nb_core_native(logits, log_library, log_theta, x, False, nz, pi_logits)
        got_zi = (*got_zi, values_only[0])  # the kernel's loop without gradients, too
        want_zi = (*want_zi, want_zi[0])
        # A dispersion per batch (a table of θ rows, tabulated log Γ terms) and per entry
        # (one θ row per block row, log Γ terms computed at every non-zero).
        table = torch.randn(3, n_genes, generator=gen, dtype=F32)
        index = torch.randint(0, 3, (n_rows,), generator=gen)
        want_b = _nb_core_torch(logits, log_library, table[index], x, True, nz)
        got_b = _nb_core_native(logits, log_library, table, x, True, nz, theta_index=index)
        # The NB's loop without gradients (every evaluation runs it), per gene and per batch.
        want_b = (*want_b, want[0], want_b[0])
        got_b = (*got_b, _nb_core_native(logits, log_library, log_theta, x, False, nz)[0],
                 _nb_core_native(logits, log_library, table, x, False, nz,
                                 theta_index=index)[0])
        per_entry = torch.randn(n_rows, n_genes, generator=gen, dtype=F32)
        want_e = _zinb_core_torch(logits, log_library, per_entry, pi_logits, x, True, nz)
        got_e = _nb_core_native(logits, log_library, per_entry, x, True, nz, pi_logits)
    names = ("log-likelihood", "logit gradient", "dispersion gradient")
    zinb_names = (*names, "dropout gradient")
    for name, a, b in [*zip(names, got, want, strict=True),
                       *zip([f"ZINB {n}" for n in (*zinb_names,
                                                   "log-likelihood without gradients")],
                            got_zi, want_zi, strict=True),
                       *zip([f"per-batch {n}" for n in names]
                            + ["log-likelihood without gradients",
                               "per-batch log-likelihood without gradients"],
                            got_b, want_b, strict=True),
                       *zip([f"per-entry ZINB {n}" for n in zinb_names], got_e, want_e,
                            strict=True)]:
        scale = float(b.abs().max()) or 1.0
        err = float((a - b).abs().max()) / scale
        if not err <= 1e-4:  # also catches NaN
            return f"its {name} differs from torch's by {err:.2g} (relative)"
    # The encoder's first layer on sparse counts (a width past one register sweep).
    table, bias = torch.randn(n_genes, 144, generator=gen, dtype=F32), torch.randn(144, generator=gen, dtype=F32)
    with warnings.catch_warnings():  # torch's one-time "sparse CSR is in beta" notice
        warnings.simplefilter("ignore", UserWarning)
        csr = x.to_sparse_csr()
    want = torch.nn.functional.embedding_bag(
        csr.col_indices(), table, csr.crow_indices(), mode="sum",
        per_sample_weights=torch.log1p(csr.values()), include_last_offset=True) + bias
    got = native.log1p_linear_csr(csr.crow_indices(), csr.col_indices(), csr.values(), table, bias)
    err = float("nan") if got is None else float((got - want).abs().max() / want.abs().max())
    if not err <= 1e-4:
        return f"its sparse first layer differs from torch's by {err:.2g} (relative)"
    return None


def _flat_inputs(logits, log_library, log_theta, x, nonzero, theta_index=None):
    """2-D views of the likelihood's inputs: any leading sample dimension of ``logits``
    flattened into the rows, with x, ℓ and a per-cell θ (or θ row index) broadcast over
    it, and known non-zeros of a 2-D x repeated once per sample."""
    shape = logits.shape
    n_genes = shape[-1]
    lead = shape[:-1]
    logits2 = logits.reshape(-1, n_genes)
    x2 = x.expand(shape).reshape(-1, n_genes)
    lib2 = log_library.expand(*lead, 1).reshape(-1, 1)
    if theta_index is not None:  # a table of θ rows: kept whole, its index broadcast
        lt2, theta_index = log_theta, theta_index.expand(lead).reshape(-1)
    else:
        lt2 = log_theta if log_theta.dim() == 1 else log_theta.expand(shape).reshape(-1, n_genes)
    if nonzero is not None and logits.dim() > 2:
        nonzero = (nonzero.tile(logits2.shape[0] // x.shape[0], x.shape[0], n_genes)
                   if x.dim() == 2 else None)
    return logits2, lib2, lt2, x2, nonzero, theta_index


def _logit_and_theta_grads(ctx, neg_g: torch.Tensor, neg_g_logits: torch.Tensor,
                           g_lt: torch.Tensor, lt2: torch.Tensor,
                           theta_index: torch.Tensor | None):
    """The gradients in the logits and log θ from the core's negated pieces and the
    upstream gradient (``neg_g``: its negation, one per row)."""
    grad_logits = grad_lt = None
    if ctx.needs_input_grad[0]:
        grad_logits = (neg_g_logits * neg_g).reshape(ctx.shape)
    if ctx.needs_input_grad[2]:
        if len(ctx.lt_shape) == 1:  # Σ over rows, then the factor θ
            grad_lt = neg_g.reshape(1, -1).matmul(g_lt).reshape(ctx.lt_shape).mul_(lt2.exp())
        elif theta_index is not None:  # Σ over the rows of each θ row, then the factor θ
            grad_lt = torch.zeros_like(lt2).index_add_(0, theta_index, g_lt * neg_g)
            grad_lt.mul_(lt2.exp())
        else:
            grad_lt = _sum_to((g_lt * neg_g).mul_(lt2.exp()).reshape(ctx.shape), ctx.lt_shape)
    return grad_logits, grad_lt


class NBFromLogits(torch.autograd.Function):
    """Autograd function: per-cell NB log-likelihood from decoder logits (see module doc)."""

    @staticmethod
    def forward(ctx, logits, log_library, log_theta, x, nonzero=None,  # noqa: D102
                theta_index=None):
        logits2, lib2, lt2, x2, nonzero, idx2 = _flat_inputs(
            logits, log_library, log_theta, x, nonzero, theta_index)
        want = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        # Under bf16 autocast (train(precision="bf16-mixed")) CUDA would run the core's
        # mat-vecs in bfloat16: sums over thousands of genes need float32.
        with torch.autocast(logits.device.type, enabled=False):
            ll, neg_g_logits, g_lt = _nb_core(logits2, lib2, lt2, x2, want, nonzero, idx2)
        if want:
            ctx.save_for_backward(neg_g_logits, g_lt, lt2, idx2)
        ctx.shape, ctx.lt_shape = logits.shape, log_theta.shape
        return ll.reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        neg_g_logits, g_lt, lt2, idx2 = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):  # float32, as forward
            neg_g = grad_out.to(g_lt.dtype).reshape(-1, 1).neg()  # the core's pieces are negated
            grad_logits, grad_lt = _logit_and_theta_grads(ctx, neg_g, neg_g_logits, g_lt, lt2,
                                                          idx2)
        return grad_logits, None, grad_lt, None, None, None


def nb_log_likelihood_from_logits(
    logits: torch.Tensor,
    log_library: torch.Tensor,
    log_theta: torch.Tensor,
    x: torch.Tensor,
    nonzero: NonZeros | tuple[torch.Tensor, torch.Tensor] | None = None,
    theta_index: torch.Tensor | None = None,
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
        Log inverse dispersion: one value for all genes, ``(genes,)`` or broadcastable to
        ``logits`` (its last axis the genes); or, with
        ``theta_index``, a table ``(T, genes)`` of which cell c uses row ``theta_index[c]``
        (one dispersion per batch).
    x
        Counts, ``(cells, genes)``, broadcast over leading dimensions of ``logits``.
    nonzero
        Optional non-zeros of ``x``: a :class:`NonZeros` such as ``Batch.nonzero``, or just
        ``(flat positions, values)`` (positions into ``x.reshape(-1)``, int64, row-major
        order). Without it they are found with ``torch.nonzero``, which on an accelerator
        makes the host wait for the device. With leading sample dimensions on ``logits``
        and a 2-D ``x``, they are repeated per sample.
    theta_index
        Optional ``(cells,)`` int64 (or int32) rows of a ``(T, genes)`` ``log_theta``, each
        in ``0 … T − 1`` (checked on the CPU; no negative indexing). Cheaper than
        passing ``log_theta[theta_index]``: the compiled CPU kernel reads the table (and
        tabulates its log Γ terms) instead of a cells × genes copy.

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
    dtype, nonzero, log_theta = _checked_inputs(logits, log_library, log_theta, x, nonzero,
                                                theta_index=theta_index)
    return NBFromLogits.apply(
        logits.to(dtype), log_library.to(dtype), log_theta.to(dtype), x.to(dtype), nonzero,
        theta_index,
    )


def _checked_inputs(logits, log_library, log_theta, x, nonzero, pi_logits=None,
                    theta_index=None):
    """The public functions' shape checks; their working dtype (never below float32: bf16
    MLPs), the non-zeros as a :class:`NonZeros` of that dtype, and log θ with a genes axis
    (one value for all genes repeated per gene: the kernel reads one per gene)."""
    n_genes = logits.shape[-1]
    if n_genes == 0:  # reshape(-1, 0) below would fail with torch's own words
        raise ValueError("logits have no genes (last axis of size 0): a likelihood needs at "
                         "least one gene.")
    if log_theta.dim() == 0 or (log_theta.dim() == 1 and log_theta.shape[0] == 1):
        log_theta = log_theta.reshape(1).expand(n_genes)
    if log_theta.shape[-1] not in (n_genes, 1) or (
            log_theta.dim() == 1 and log_theta.shape[0] != n_genes):
        raise ValueError(f"log_theta has {log_theta.shape[-1]} genes but logits have "
                         f"{n_genes}; its last axis must be the genes.")
    if theta_index is not None:
        if (log_theta.dim() != 2 or log_theta.shape[-1] != n_genes or theta_index.dim() != 1
                or theta_index.shape[0] != logits.shape[-2]
                or theta_index.dtype not in (torch.int32, torch.int64)):
            raise ValueError(
                "theta_index must be an int64 (or int32) vector with one row of log_theta "
                f"(T, genes) per cell; got theta_index {tuple(theta_index.shape)} "
                f"({theta_index.dtype}) for log_theta {tuple(log_theta.shape)} and logits "
                f"{tuple(logits.shape)}.")
        # Rows past the table, or negative ones (which torch indexing would wrap), are
        # refused wherever it costs no device sync: on the CPU.
        if theta_index.device.type == "cpu" and len(theta_index) and not (
                0 <= int(theta_index.min()) and int(theta_index.max()) < len(log_theta)):
            raise IndexError(f"theta_index must give each cell a row of log_theta, 0 to "
                             f"{len(log_theta) - 1}; got rows {int(theta_index.min())} to "
                             f"{int(theta_index.max())}.")
    if logits.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"logits have {logits.shape[-1]} genes but x has {x.shape[-1]}; they must match."
        )
    if pi_logits is not None and pi_logits.shape[-1] != x.shape[-1]:
        raise ValueError(f"pi_logits have {pi_logits.shape[-1]} genes but x has "
                         f"{x.shape[-1]}; they must match.")
    if log_library.shape[-1] != 1:
        raise ValueError(
            f"log_library must have shape (cells, 1), got {tuple(log_library.shape)}."
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if nonzero is not None:
        nonzero = NonZeros(*nonzero)
        nonzero = nonzero._replace(values=nonzero.values.to(dtype))
    return dtype, nonzero, log_theta


class ZINBFromLogits(torch.autograd.Function):
    """Autograd function: per-cell zero-inflated NB log-likelihood from decoder logits and
    dropout logits, with the gradients of :func:`_zinb_core_torch` (one pass, no autograd
    graph over the cells × genes block)."""

    @staticmethod
    def forward(ctx, logits, log_library, log_theta, pi_logits, x, nonzero=None,  # noqa: D102
                theta_index=None):
        logits2, lib2, lt2, x2, nonzero, idx2 = _flat_inputs(
            logits, log_library, log_theta, x, nonzero, theta_index)
        pi2 = pi_logits.expand(logits.shape).reshape(logits2.shape)
        want = any(ctx.needs_input_grad[i] for i in (0, 2, 3))
        with torch.autocast(logits.device.type, enabled=False):  # float32 sums (see NB)
            ll, neg_g_logits, g_lt, neg_g_pi = _zinb_core(
                logits2, lib2, lt2, pi2, x2, want, nonzero, idx2)
        if want:
            ctx.save_for_backward(neg_g_logits, g_lt, lt2, neg_g_pi, idx2)
        ctx.shape, ctx.lt_shape, ctx.pi_shape = logits.shape, log_theta.shape, pi_logits.shape
        return ll.reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        neg_g_logits, g_lt, lt2, neg_g_pi, idx2 = ctx.saved_tensors
        grad_pi = None
        with torch.autocast(grad_out.device.type, enabled=False):
            neg_g = grad_out.to(g_lt.dtype).reshape(-1, 1).neg()
            grad_logits, grad_lt = _logit_and_theta_grads(ctx, neg_g, neg_g_logits, g_lt, lt2,
                                                          idx2)
            if ctx.needs_input_grad[3]:
                grad_pi = _sum_to((neg_g_pi * neg_g).reshape(ctx.shape), ctx.pi_shape)
        return grad_logits, None, grad_lt, grad_pi, None, None, None


def zinb_log_likelihood_from_logits(
    logits: torch.Tensor,
    log_library: torch.Tensor,
    log_theta: torch.Tensor,
    pi_logits: torch.Tensor,
    x: torch.Tensor,
    nonzero: NonZeros | tuple[torch.Tensor, torch.Tensor] | None = None,
    theta_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-cell zero-inflated NB log-likelihood under softmax-decoded means.

    As :func:`nb_log_likelihood_from_logits` (``theta_index`` included), plus ``pi_logits`` (the logits of the extra
    zeros' probability π, shaped like ``logits``): p(0) = π + (1−π)·NB(0),
    p(x > 0) = (1−π)·NB(x). Equals ``distributions.log_zinb(x, μ, θ, pi_logits).sum(-1)``
    up to rounding; differentiable in ``logits``, ``log_theta`` and ``pi_logits`` with a
    fused, hand-written gradient (about half the time of autograd through that formula).
    """
    dtype, nonzero, log_theta = _checked_inputs(logits, log_library, log_theta, x, nonzero,
                                                pi_logits, theta_index)
    return ZINBFromLogits.apply(logits.to(dtype), log_library.to(dtype), log_theta.to(dtype),
                                pi_logits.to(dtype), x.to(dtype), nonzero, theta_index)
