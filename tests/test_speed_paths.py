"""Correctness of the fast paths: sparse NB likelihood, fused autograd function, batching."""

from __future__ import annotations

import copy

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import scvae_tools as svt
from scvae_tools import native
from scvae_tools.adapter import CellData, DataSpec
from scvae_tools.distributions import log_factorial_sum, log_nb, log_nb_sparse
from scvae_tools.fused import (
    NonZeros,
    nb_log_likelihood_from_logits,
    zinb_log_likelihood_from_logits,
)
from scvae_tools.module import VAE, Dropout, ModuleConfig


def _nb_inputs(n=40, g=60, dtype=torch.float64, seed=0, zero_frac=0.8):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, g, generator=gen, dtype=dtype)
    library = torch.exp(torch.randn(n, 1, generator=gen, dtype=dtype) * 0.3 + 6.0)
    log_theta = torch.randn(g, generator=gen, dtype=dtype) * 0.7
    mu = torch.softmax(logits, -1) * library
    x = torch.poisson(mu, generator=gen)
    x = x * (torch.rand(n, g, generator=gen, dtype=dtype) > zero_frac)  # mostly zeros
    return logits, library, log_theta, x


def _dense(logits, library, log_theta, x):
    """The plain NB formula (no eps inside the logs), differentiated by autograd."""
    log_mu = torch.log_softmax(logits, -1) + library.log()
    theta = log_theta.exp()
    log_tm = torch.log(theta + log_mu.exp())
    return (
        theta * (log_theta - log_tm) + x * (log_mu - log_tm)
        + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
    ).sum(-1)


def test_sparse_nb_equals_dense_formula():
    logits, library, log_theta, x = _nb_inputs(dtype=torch.float32)
    mu = torch.softmax(logits, -1) * library
    theta = log_theta.exp()
    dense = log_nb(x, mu, theta).sum(-1)
    sparse = log_nb_sparse(x, mu, theta)
    assert (x == 0).float().mean() > 0.7
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    # Per-cell theta and a leading sample dimension broadcast the same way.
    theta_cell = theta.expand_as(mu) * torch.rand_like(mu).add(0.5)
    mu3 = torch.stack([mu, mu * 1.5])
    torch.testing.assert_close(
        log_nb_sparse(x, mu3, theta_cell), log_nb(x, mu3, theta_cell).sum(-1), rtol=1e-5, atol=1e-5
    )
    # Dropping the constant removes exactly Σ lgamma(x+1).
    torch.testing.assert_close(
        log_nb_sparse(x, mu, theta, include_constant=False) - log_factorial_sum(x),
        dense, rtol=1e-5, atol=1e-4,
    )
    torch.testing.assert_close(log_factorial_sum(x), torch.lgamma(x + 1).sum(-1))


def test_sparse_nb_gradient_matches_dense():
    logits, library, log_theta, x = _nb_inputs()
    mu = (torch.softmax(logits, -1) * library).requires_grad_()
    theta = log_theta.exp().requires_grad_()
    g_dense = torch.autograd.grad(log_nb(x, mu, theta).sum(), [mu, theta])
    g_sparse = torch.autograd.grad(log_nb_sparse(x, mu, theta).sum(), [mu, theta])
    for a, b in zip(g_dense, g_sparse, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("theta_kind", ["gene", "cell"])
def test_fused_value_and_gradient_match_autograd(theta_kind):
    logits, library, log_theta, x = _nb_inputs(seed=1)
    if theta_kind == "cell":
        log_theta = log_theta + 0.3 * torch.randn(x.shape, dtype=x.dtype)
    logits.requires_grad_()
    log_theta.requires_grad_()
    weights = torch.randn(x.shape[0], dtype=x.dtype)  # a non-uniform upstream gradient
    ref = _dense(logits, library, log_theta, x)
    got = nb_log_likelihood_from_logits(logits, library.log(), log_theta, x)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-8)
    # distributions.log_nb adds eps = 1e-8 inside its logs: equal up to that.
    mu = torch.softmax(logits, -1) * library
    torch.testing.assert_close(got, log_nb(x, mu, log_theta.exp()).sum(-1), rtol=1e-7, atol=1e-5)
    g_ref = torch.autograd.grad((ref * weights).sum(), [logits, log_theta])
    g_got = torch.autograd.grad((got * weights).sum(), [logits, log_theta])
    for a, b in zip(g_ref, g_got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-8)


def test_fused_handles_non_integer_counts():
    """Counts allowed with allow_non_integer=True (e.g. ambient-corrected) must not be read
    from the small-count tables, which hold whole counts only: the value and gradients
    equal the plain formula. (Before the fix, 2.5 was read as 2.)"""
    logits, library, log_theta, x = _nb_inputs(seed=3, zero_frac=0.5)
    gen = torch.Generator().manual_seed(1)
    x = x * torch.empty(x.shape, dtype=x.dtype).uniform_(0.5, 1.5, generator=gen)
    x[0, :4] = torch.tensor([2.5, 3.0, 7.999, 8.5])  # either side of whole and of the table end
    assert ((x > 0) & (x != x.floor())).float().mean() > 0.2
    logits.requires_grad_()
    log_theta.requires_grad_()
    ref = _dense(logits, library, log_theta, x)
    got = nb_log_likelihood_from_logits(logits, library.log(), log_theta, x)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-8)
    g_ref = torch.autograd.grad(ref.sum(), [logits, log_theta])
    g_got = torch.autograd.grad(got.sum(), [logits, log_theta])
    for a, b in zip(g_ref, g_got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-8)


def test_fused_gradcheck_double():
    logits, library, log_theta, x = _nb_inputs(n=5, g=7, seed=2, zero_frac=0.5)
    logits.requires_grad_()
    log_theta.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda lo, lt: nb_log_likelihood_from_logits(lo, library.log(), lt, x),
        (logits, log_theta),
    )
    # Per-cell dispersion with a leading sample dimension (the IWAE path).
    logits3 = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    lt3 = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda lo, lt: nb_log_likelihood_from_logits(lo, library.log(), lt, x), (logits3, lt3)
    )


def test_fused_rejects_mismatched_shapes():
    logits, library, log_theta, x = _nb_inputs()
    with pytest.raises(ValueError, match="genes"):
        nb_log_likelihood_from_logits(logits[:, :-1], library.log(), log_theta, x)
    with pytest.raises(ValueError, match="log_library"):
        nb_log_likelihood_from_logits(logits, library.log().T, log_theta, x)


@pytest.mark.parametrize("dispersion", ["gene", "gene-batch", "gene-cell"])
def test_module_nb_path_equals_dense_likelihood(dispersion):
    """VAE.log_px (fused) and the ELBO equal the dense formula on the decoded means."""
    torch.manual_seed(0)
    cfg = ModuleConfig(n_genes=30, n_latent=4, n_hidden=16, n_batch=2, dispersion=dispersion)
    vae = VAE(cfg).double().eval()
    x = torch.poisson(torch.rand(12, 30, dtype=torch.float64) * 3)
    x[:, 0] += 1
    library = x.sum(1, keepdim=True)
    batch = torch.tensor([0, 1] * 6)
    cov = vae.covariates(batch)
    z = torch.randn(3, 12, 4, dtype=torch.float64)  # with a sample dimension
    params = vae.decode(z, library, cov, batch)
    dense = log_nb(x, params["mu"], params["theta"]).sum(-1)
    torch.testing.assert_close(vae.log_px(x, params), dense, rtol=1e-7, atol=1e-5)
    fast = vae.decode(z, library, cov, batch, means=False)
    assert "mu" not in fast
    torch.testing.assert_close(vae.log_px(x, fast), dense, rtol=1e-7, atol=1e-5)


def _dense_zinb(logits, library, log_theta, pi_logits, x):
    """The plain ZINB formula (no eps inside the logs), differentiated by autograd."""
    log_mu = torch.log_softmax(logits, -1) + library.log()
    theta = log_theta.exp()
    log_tm = torch.logaddexp(log_theta, log_mu)
    nb_zero = theta * (log_theta - log_tm)
    nb = (nb_zero + x * (log_mu - log_tm) + torch.lgamma(x + theta) - torch.lgamma(theta)
          - torch.lgamma(x + 1))
    per_entry = torch.where(x == 0, torch.logaddexp(pi_logits, nb_zero), nb)
    return (per_entry - torch.nn.functional.softplus(pi_logits)).sum(-1)


@pytest.mark.parametrize("theta_kind", ["gene", "cell"])
def test_fused_zinb_value_and_gradients_match_autograd(theta_kind):
    """The fused ZINB (value and its three gradients, weighted per cell) equals autograd
    through the plain formula, with whole, fractional and below-½ counts."""
    logits, library, log_theta, x = _nb_inputs(seed=4, zero_frac=0.6)
    x[0, :4] = torch.tensor([2.5, 0.3, 9.0, 40.0])  # fractions (0.3 is not a zero) and large
    gen = torch.Generator().manual_seed(2)
    pi_logits = torch.randn(x.shape, generator=gen, dtype=x.dtype) * 2 - 1
    if theta_kind == "cell":
        log_theta = log_theta + 0.3 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    inputs = [logits.requires_grad_(), log_theta.requires_grad_(), pi_logits.requires_grad_()]
    weights = torch.randn(x.shape[0], generator=gen, dtype=x.dtype)
    ref = _dense_zinb(logits, library, log_theta, pi_logits, x)
    got = zinb_log_likelihood_from_logits(logits, library.log(), log_theta, pi_logits, x)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-8)
    from scvae_tools.distributions import log_zinb  # (adds eps = 1e-8 inside its logs)

    mu = torch.softmax(logits, -1) * library
    torch.testing.assert_close(got, log_zinb(x, mu, log_theta.exp(), pi_logits).sum(-1),
                               rtol=1e-7, atol=1e-5)
    g_ref = torch.autograd.grad((ref * weights).sum(), inputs)
    g_got = torch.autograd.grad((got * weights).sum(), inputs)
    for a, b in zip(g_ref, g_got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-8)
    # With the non-zeros given (as the data path does) and with a sample dimension.
    nz = NonZeros.of_dense(x)
    torch.testing.assert_close(
        zinb_log_likelihood_from_logits(logits, library.log(), log_theta, pi_logits, x, nz), got)
    assert torch.autograd.gradcheck(
        lambda lo, lt, pl: zinb_log_likelihood_from_logits(lo, library[:5].log(), lt, pl, x[:5],
                                                           NonZeros.of_dense(x[:5])),
        (torch.randn(2, 5, x.shape[1], dtype=x.dtype, requires_grad=True),
         torch.randn(x.shape[1], dtype=x.dtype, requires_grad=True),
         torch.randn(2, 5, x.shape[1], dtype=x.dtype, requires_grad=True)))


def test_fused_zinb_keeps_float32_accuracy_for_near_poisson_genes():
    """At large θ the ZINB's gradient in log θ, summed over cells, cancelled in float32
    (the dense formula's lgamma and log differences). The fused ZINB shares the NB's
    remedies (log1p, float64 gamma differences): within float32 rounding of float64."""
    gen = torch.Generator().manual_seed(5)
    n, g = 96, 300
    logits = torch.randn(n, g, generator=gen)
    log_theta = torch.empty(g).uniform_(4.0, 12.0, generator=gen)  # θ from 55 to 1.6e5
    pi_logits = torch.randn(n, g, generator=gen) - 2
    x = torch.poisson(torch.softmax(logits, -1) * 3000.0, generator=gen)
    log_library = torch.log(x.sum(1, keepdim=True))
    weights = torch.linspace(-1.0, 2.0, n)
    got = [t.clone().requires_grad_() for t in (logits, log_theta, pi_logits)]
    ll = zinb_log_likelihood_from_logits(got[0], log_library, got[1], got[2], x)
    (ll * weights).sum().backward()
    ref = [t.double().requires_grad_() for t in (logits, log_theta, pi_logits)]
    ll64 = _dense_zinb(ref[0], log_library.double().exp(), ref[1], ref[2], x.double())
    (ll64 * weights.double()).sum().backward()
    assert float((ll.detach().double() - ll64.detach()).abs().max() / ll64.detach().abs().max()) < 1e-5
    for a, b in zip(got, ref, strict=True):
        err = (a.grad.double() - b.grad).abs()
        assert float(err.max() / b.grad.abs().max()) < 1e-4
    err = (got[1].grad.double() - ref[1].grad).abs()  # gene by gene: small gradients kept
    assert bool((err < 0.05 * ref[1].grad.abs() + 2e-4 * ref[1].grad.abs().max()).all())


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_fused_zinb_dropout_gradient_where_the_extra_zeros_are_rare(kernel, use_native):
    """At a zero, ∂ll/∂l_π = (1 − r) − π with r the NB's share of the zero. Taken as 1 − r
    in float32 it rounded to 0 once π/(1−π) was far below NB(0), and the gradient came out
    as −π, of the wrong sign (autograd through log_zinb got it right)."""
    use_native(kernel)
    g = 6
    logits = torch.zeros(1, g)
    log_library = torch.full((1, 1), np.log(6 * 8.1))  # μ = 8.1 per gene
    log_theta = torch.zeros(g)  # θ = 1: log NB(0) = −log(1 + μ) ≈ −2.2
    pi_logits = torch.tensor([[-10.0, -14.0, -18.0, -22.0, -26.0, -30.0]])
    x = torch.zeros(1, g)
    grads = []
    for dtype in (torch.float32, torch.float64):
        pl = pi_logits.to(dtype).clone().requires_grad_()
        zinb_log_likelihood_from_logits(logits.to(dtype), log_library.to(dtype),
                                        log_theta.to(dtype), pl, x.to(dtype)).sum().backward()
        grads.append(pl.grad.double())
    assert bool((grads[1] > 0).all())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("dispersion", ["gene", "gene-batch", "gene-cell"])
def test_module_zinb_path_equals_dense_likelihood(dispersion):
    """VAE.log_px takes the fused ZINB from the logits; it equals log_zinb on the means."""
    from scvae_tools.distributions import log_zinb

    torch.manual_seed(0)
    cfg = ModuleConfig(n_genes=30, n_latent=4, n_hidden=16, n_batch=2, dispersion=dispersion,
                       likelihood="zinb")
    vae = VAE(cfg).double().eval()
    x = torch.poisson(torch.rand(12, 30, dtype=torch.float64) * 3)
    library = x.sum(1, keepdim=True) + 1
    batch = torch.tensor([0, 1] * 6)
    cov = vae.covariates(batch)
    z = torch.randn(3, 12, 4, dtype=torch.float64)
    params = vae.decode(z, library, cov, batch)
    dense = log_zinb(x, params["mu"], params["theta"], params["pi_logits"]).sum(-1)
    fast = vae.decode(z, library, cov, batch, means=False)
    assert "mu" not in fast and "theta" not in fast
    torch.testing.assert_close(vae.log_px(x, fast), dense, rtol=1e-7, atol=1e-5)
    # A float64 module with covariates encodes without gradients too (float32 covariates).
    with torch.no_grad():
        no_grad = vae.encode(x, cov)[0]
    torch.testing.assert_close(no_grad, vae.encode(x, cov)[0].detach())


@pytest.mark.parametrize("likelihood", ["poisson"])
def test_other_likelihoods_unchanged(likelihood):
    """The Poisson still uses the element-wise formula on the decoded means."""
    from scvae_tools.distributions import log_likelihood

    torch.manual_seed(0)
    vae = VAE(ModuleConfig(n_genes=20, n_latent=3, n_hidden=8, likelihood=likelihood)).eval()
    x = torch.poisson(torch.rand(6, 20) * 4)
    x[:, 0] += 1
    library = x.sum(1, keepdim=True)
    batch = torch.zeros(6, dtype=torch.long)
    params = vae.decode(torch.randn(6, 3), library, vae.covariates(batch), batch,
                        means=False)
    full = vae.decode(torch.randn(6, 3), library, vae.covariates(batch), batch)
    assert "mu" not in params and "mu" in full
    want = log_likelihood(likelihood, x, full["mu"], full.get("theta"), full.get("pi_logits")).sum(-1)
    torch.testing.assert_close(vae.log_px(x, full), want)


def test_batches_sparse_gather_equals_dense(monkeypatch):
    """The vectorised CSR row gather gives the same minibatches as the dense tensor path."""
    adata = svt.datasets.synthetic_counts(n_cells=157, n_genes=40, seed=3)
    spec = DataSpec.from_anndata(adata)
    dense_data = CellData(adata, spec)
    idx = np.random.default_rng(0).permutation(157)[:100]
    want = [b.x.clone() for b in dense_data.batches(idx, batch_size=32)]
    import scvae_tools.adapter as adapter

    monkeypatch.setattr(adapter, "DENSE_LIMIT_BYTES", 0)  # force the sparse path
    sparse_data = CellData(adata, spec)
    got = list(sparse_data.batches(idx, batch_size=32))
    assert sp.issparse(sparse_data.X) and "x" not in sparse_data._on_device(torch.device("cpu"))
    assert len(got) == len(want)
    for b, w in zip(got, want, strict=True):
        torch.testing.assert_close(b.x, w)
        np.testing.assert_array_equal(b.x.numpy(), adata.X[b.index.numpy()].toarray())


def test_short_lived_data_gather_batches_instead_of_densifying():
    """A CellData read in place (copy=False: one evaluation call on another AnnData) never
    builds the cells × genes dense copy; its batches, with their non-zeros, equal those of
    the resident training data, and so does the ELBO computed from them."""
    adata = svt.datasets.synthetic_counts(n_cells=157, n_genes=40, seed=3)
    spec = DataSpec.from_anndata(adata)
    resident, passing = CellData(adata, spec), CellData(adata, spec, copy=False)
    idx = np.random.default_rng(0).permutation(157)[:100]
    want = list(resident.batches(idx, batch_size=32, nonzero=True))
    got = list(passing.batches(idx, batch_size=32, nonzero=True))
    assert "x" in resident._on_device(torch.device("cpu"))
    assert "x" not in passing._on_device(torch.device("cpu"))
    for b, w in zip(got, want, strict=True):
        torch.testing.assert_close(b.x, w.x)
        torch.testing.assert_close(b.nonzero.flat, w.nonzero.flat)
    model = svt.SCVAE(adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=2, seed=0, progress_bar=False)
    torch.manual_seed(0)  # one posterior sample per cell: the same draws for both
    elbo_passing = model.get_elbo(adata)
    torch.manual_seed(0)
    assert elbo_passing == pytest.approx(model.get_elbo(), rel=1e-5)


def test_sparse_inference_equals_dense(synthetic):
    """Latent and denoised expression from CSR batches (CPU inference) equal the dense path."""
    model = svt.SCVAE(synthetic, batch_key="batch", n_latent=4, n_hidden=32)
    model.train(max_epochs=3, batch_size=64, progress_bar=False)
    data = model._data
    assert sp.issparse(data.X)
    with torch.inference_mode():
        model.module.eval()
        dense = [model.module.encode(b.x, model.module.covariates(b.batch_index))
                 for b in data.batches(None, 128)]
        sparse = [model.module.encode(b.x, model.module.covariates(b.batch_index))
                  for b in data.batches(None, 128, sparse=True)]
    for (m1, v1), (m2, v2) in zip(dense, sparse, strict=True):
        torch.testing.assert_close(m1, m2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)
    # Shuffled rows gather the same counts as the dense path.
    idx = np.random.default_rng(0).permutation(data.n_obs)[:100]
    for s, d in zip(data.batches(idx, 32, sparse=True), data.batches(idx, 32), strict=True):
        assert s.x.layout == torch.sparse_csr
        np.testing.assert_array_equal(s.x.to_dense().numpy(), d.x.numpy())
    # The public methods use the sparse path: same values as decoding the dense encodings.
    lat = model.get_latent_representation()
    np.testing.assert_allclose(lat, torch.cat([m for m, _ in dense]).numpy(), rtol=1e-4, atol=1e-5)
    expr = model.get_normalized_expression(library_size=1e4)
    np.testing.assert_allclose(expr.sum(1), 1e4, rtol=1e-4)
    dense_model = svt.SCVAE(synthetic.copy(), batch_key="batch", n_latent=4, n_hidden=32)
    dense_model.module, dense_model.is_trained = model.module, True
    dense_model._data.X = data.X.toarray()  # a dense matrix: the dense path
    np.testing.assert_allclose(dense_model.get_normalized_expression(library_size=1e4), expr,
                               rtol=1e-4, atol=1e-3)
    # So do the other encoder-only passes (KL per dimension, the posterior that the
    # diagnostics and return_dist read).
    for a, b in ((model.get_kl_per_dimension().to_numpy(),
                  dense_model.get_kl_per_dimension().to_numpy()),
                 (model._posterior(data)[1], dense_model._posterior(dense_model._data)[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", [True, False], ids=["compiled", "torch"])
def test_in_place_decode_equals_softmax(synthetic, kernel, use_native):
    """Denoised expression decoded in place equals ℓ · softmax(decoder logits at the mean z),
    with the compiled softmax kernel (where it builds) and with torch's operations."""
    use_native(kernel)
    model = svt.SCVAE(synthetic, batch_key="batch", n_latent=4, n_hidden=32)
    model.train(max_epochs=3, batch_size=64, progress_bar=False)
    mod = model.module.eval()
    lib = torch.from_numpy(np.asarray(synthetic.X.sum(1), dtype=np.float32).reshape(-1, 1))
    with torch.inference_mode():
        batch_index = torch.from_numpy(model._data.batch_index)
        cov = mod.covariates(batch_index)
        z = torch.from_numpy(model.get_latent_representation())
        rho = torch.softmax(mod.decoder(z, cov)["logits"], dim=-1)
        for scale in (1e4, lib):
            out = torch.full((synthetic.n_obs, synthetic.n_vars), float("nan"))
            mod.scaled_proportions_(z, cov, scale, out)
            torch.testing.assert_close(out, rho * scale, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(model.get_normalized_expression(library_size=1e4),
                               (rho * 1e4).numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(model.get_normalized_expression(library_size="observed"),
                               (rho * lib).numpy(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kernel", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize("shift", [120.0, -80.0], ids=["overflow", "underflow"])
def test_in_place_decode_handles_extreme_logits(synthetic, shift, kernel, use_native):
    """Rows whose logits would overflow exp (or all sit far below zero) are redone with the
    max-shifted softmax (the compiled kernel always shifts): still ℓ · softmax, never inf
    or NaN."""
    use_native(kernel)
    model = svt.SCVAE(synthetic, n_latent=4, n_hidden=32)
    model.train(max_epochs=2, batch_size=64, progress_bar=False)
    mod = model.module.eval()
    with torch.inference_mode():
        cov = mod.covariates(torch.zeros(synthetic.n_obs, dtype=torch.long))
        z = torch.from_numpy(model.get_latent_representation())
        mod.decoder.scale.bias[:3] += shift  # the first genes' logits: huge or tiny
        if shift < 0:
            mod.decoder.scale.bias[3:] += shift
        rho = torch.softmax(mod.decoder(z, cov)["logits"].double(), dim=-1)
        out = torch.empty(synthetic.n_obs, synthetic.n_vars)
        mod.scaled_proportions_(z, cov, 1e4, out)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), rho * 1e4, rtol=1e-5, atol=1e-4)


def test_batches_carry_their_nonzeros(synthetic):
    """``batches(nonzero=True)`` over CSR counts: each batch's (flat position, value) pairs
    are exactly the non-zeros ``torch.nonzero`` finds in its dense block, in the same order."""
    data = svt.SCVAE(synthetic, n_latent=2, n_hidden=8)._data
    assert sp.issparse(data.X)
    idx = np.random.default_rng(1).permutation(data.n_obs)[:150]
    for indices, shuffle in ((None, False), (idx, False), (idx, True)):
        gen = torch.Generator().manual_seed(0)
        for b in data.batches(indices, 64, shuffle=shuffle, generator=gen, nonzero=True):
            flat, values = b.nonzero.flat, b.nonzero.values
            expected = torch.nonzero(b.x.reshape(-1)).squeeze(1)
            assert torch.equal(flat, expected)
            assert torch.equal(values, b.x.reshape(-1)[expected])
            # The fields read off on the host equal those the likelihood would derive. The
            # table slots only the torch code reads: none when the compiled kernel serves.
            searched = NonZeros.of_dense(b.x)
            for name, a, c in zip(NonZeros._fields, b.nonzero, searched, strict=True):
                if name in ("slot", "outside") and native.library() is not None:
                    assert a is None, name
                    continue
                assert a is not None and torch.equal(a, c), name
    assert all(b.nonzero is None for b in data.batches(None, 64))  # only when asked for


def test_dense_counts_where_csr_stays_resident_carry_their_nonzeros(pbmc68k, monkeypatch):
    """On CUDA (forced here on the CPU: adapter._csr_resident) dense counts made each step
    search its block for the non-zeros (torch.nonzero: the host waits for the GPU); they
    are now kept as CSR there, so no step searches, and training equals that from CSR
    counts. The user's dense array is unchanged."""
    from scvae_tools import adapter, fused

    monkeypatch.setattr(adapter, "_csr_resident", lambda device: True)
    searches = []
    of_dense = fused.NonZeros.of_dense.__func__
    monkeypatch.setattr(fused.NonZeros, "of_dense",
                        classmethod(lambda cls, x: searches.append(1) or of_dense(cls, x)))
    dense = pbmc68k.copy()  # ~20% non-zeros, as single-cell data
    dense.X = pbmc68k.X.toarray()
    before = dense.X.copy()
    runs = {}
    for name, a in (("dense", dense), ("csr", pbmc68k.copy())):
        model = svt.SCVAE(a, n_latent=3, n_hidden=16).train(max_epochs=2, seed=0,
                                                             progress_bar=False)
        runs[name] = model.history["validation_elbo"].to_numpy()
    assert not searches
    np.testing.assert_array_equal(runs["dense"], runs["csr"])
    data = adapter.CellData(dense, adapter.DataSpec(var_names=list(dense.var_names)),
                            copy=False)
    data._on_device(torch.device("cpu"))
    data.release_device()  # placed again whole, as CSR (it was skipped: batches from host)
    assert "x_data" in data._on_device(torch.device("cpu"))
    assert isinstance(dense.X, np.ndarray)
    np.testing.assert_array_equal(dense.X, before)


def test_known_nonzeros_give_the_same_elbo_and_gradients(synthetic):
    """The fused likelihood with the data path's non-zeros equals the one that searches x."""
    model = svt.SCVAE(synthetic, batch_key="batch", n_latent=4, n_hidden=32)
    mod = model.module.train()
    b = next(iter(model._data.batches(None, 100, nonzero=True)))
    results = []
    for nonzero in (None, b.nonzero):
        torch.manual_seed(0)
        mod.zero_grad()
        terms = mod.elbo_terms(b.x, b.library, b.batch_index, nonzero=nonzero)
        mod.loss(terms).backward()
        results.append((terms["log_px"].detach(), [p.grad.clone() for p in mod.parameters()]))
    (ll0, g0), (ll1, g1) = results
    assert torch.equal(ll0, ll1)
    assert all(torch.equal(a, c) for a, c in zip(g0, g1, strict=True))
    # With a leading sample dimension (x broadcast over it) they are repeated per sample.
    logits = torch.randn(3, *b.x.shape)
    log_lib = b.library.log()
    lt = torch.randn(b.x.shape[1])
    assert torch.equal(nb_log_likelihood_from_logits(logits, log_lib, lt, b.x, b.nonzero),
                       nb_log_likelihood_from_logits(logits, log_lib, lt, b.x))


@pytest.mark.parametrize("use_native", ["1", "0"])
def test_tiled_nonzeros_equal_a_search_of_the_stacked_block(synthetic, monkeypatch, use_native):
    """NonZeros.tile: the non-zeros of k stacked copies of a block, as a search finds them
    (with table slots too), and the importance-weighted log p(x) of get_marginal_ll the same
    with them as with the search."""
    monkeypatch.setenv("SCVAE_TOOLS_NATIVE", use_native)
    model = svt.SCVAE(synthetic, n_latent=4, n_hidden=32)
    b = next(iter(model._data.batches(None, 50, nonzero=True)))
    n, g = b.x.shape
    stacked = NonZeros.of_dense(b.x.repeat(3, 1))
    tiled = b.nonzero.complete(n, g).tile(3, n, g)
    for name in ("flat", "values", "rows", "cols", "lengths", "slot", "outside"):
        a, c = getattr(tiled, name), getattr(stacked, name)
        assert torch.equal(a.long(), c.long()), name
    mod = model.module.eval()
    per_cell = []
    for nonzero in (None, b.nonzero):
        torch.manual_seed(0)
        with torch.no_grad():
            per_cell.append(mod.importance_weighted_log_px(
                b.x, b.library, b.batch_index, n_samples=30, chunk=7, nonzero=nonzero))
    assert torch.equal(per_cell[0], per_cell[1])


@pytest.mark.parametrize("tables", [True, False])
def test_gamma_differences_match_float64(tables):
    """lgamma(x+θ) − lgamma(θ) − lgamma(x+1) and ψ(x+θ) − ψ(θ) at the non-zeros, from the per-gene tables
    (small counts) plus direct calls (counts past the table), equal the float64 values."""
    from scvae_tools.fused import _TABLE_COUNTS, _gamma_differences

    gen = torch.Generator().manual_seed(0)
    theta = torch.exp(torch.empty(50).uniform_(-4, 6, generator=gen))  # θ from 0.02 to 400
    # 0: a stored zero of a CSR matrix (both differences are 0); then across the table's end.
    counts = torch.cat([torch.arange(0, 3 * _TABLE_COUNTS, dtype=torch.float32),
                        torch.tensor([50.0, 400.0, 5000.0])])
    cols = torch.arange(50).repeat_interleave(len(counts))
    xv = counts.repeat(50)
    lg, dig = _gamma_differences(theta, cols, xv, True, tables=tables)
    th, x = theta.double().take(cols), xv.double()
    ref_lg = torch.lgamma(x + th) - torch.lgamma(th)
    ref_dig = torch.digamma(x + th) - torch.digamma(th)
    # log x! is folded in; it is added back in float64 because for large counts the three
    # terms nearly cancel, and float32 then keeps only absolute, not relative, precision.
    torch.testing.assert_close(lg.double() + torch.lgamma(x + 1), ref_lg, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dig.double(), ref_dig, rtol=1e-5, atol=1e-5)
    lg_only, none = _gamma_differences(theta, cols, xv, False, tables=tables)
    assert none is None and torch.equal(lg_only, lg)


def test_sparse_first_layer_gene_table_follows_the_weights(synthetic):
    """The cached (genes × hidden) table of inference is rebuilt when the weights change,
    and weights made under inference_mode (no version counter) are read directly."""
    model = svt.SCVAE(synthetic, n_latent=4, n_hidden=32)
    model.train(max_epochs=2, batch_size=64, progress_bar=False)
    z0 = model.get_latent_representation()
    with torch.no_grad():
        model.module.encoder.body[0].weight.mul_(2.0)  # an in-place update, as an optimiser does
    z1 = model.get_latent_representation()
    assert not np.allclose(z0, z1)
    encoder = model.module.encoder
    with torch.inference_mode():
        x = torch.from_numpy(model._data.X.toarray()[:20])
        cov = torch.zeros(20, 0)
        dense = encoder(x, cov)[0]
        sparse = encoder(x.to_sparse_csr(), cov)[0]
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
        fresh = type(encoder)(model.module.cfg)  # parameters are inference tensors here
        fresh.load_state_dict(encoder.state_dict())
        fresh.eval()
        torch.testing.assert_close(fresh(x.to_sparse_csr(), cov)[0], dense, rtol=1e-5, atol=1e-5)


def test_explicit_zeros_in_csr_do_not_change_the_likelihood():
    """Stored zeros of a CSR matrix are carried as 'non-zeros' of the batch; they must add
    nothing: the ELBO and its gradients equal those of the searched non-zeros."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, (200, 30)).astype(np.float32)
    counts[:, 0] += 1
    X = sp.csr_matrix(counts)
    X.data[::7] = 0.0  # explicit zeros: still canonical, still stored
    assert X.has_canonical_format and (X.data == 0).sum() > 0
    adata = ad.AnnData(X)
    model = svt.SCVAE(adata, n_latent=3, n_hidden=16)
    data = model._data_for(adata)
    b = next(iter(data.batches(np.arange(64), 64, nonzero=True)))
    assert (b.nonzero[1] == 0).any()
    mod = model.module.train()
    grads = []
    for nonzero in (b.nonzero, None):
        torch.manual_seed(0)
        terms = mod.elbo_terms(b.x, b.library, b.batch_index, b.cat_covs, b.cont_covs,
                               nonzero=nonzero)
        mod.zero_grad()
        mod.loss(terms).backward()
        grads.append([p.grad.clone() for p in mod.parameters()])
        grads[-1].append(terms["log_px"].detach())
    for a, c in zip(*grads, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_dropout_zeroes_p_and_rescales_the_rest():
    """The CPU dropout (mask from torch.rand) keeps nn.Dropout's semantics: each unit is
    zeroed with probability p, survivors are scaled by 1/(1−p), gradients follow the mask,
    and it is the identity in eval mode."""
    torch.manual_seed(0)
    drop = Dropout(0.1)
    x = torch.ones(400, 500, requires_grad=True)
    y = drop(x)
    zero = (y == 0).float().mean().item()
    assert abs(zero - 0.1) < 0.005  # 200,000 draws: the standard error is 0.0007
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x·mask)/dx = mask
    drop.eval()
    assert drop(x) is x
    assert torch.equal(Dropout(0.0)(x), x) and (Dropout(1.0)(x) == 0).all()


def test_accelerator_paths_of_the_likelihood_agree_on_the_cpu():
    """The branches accelerators take (row sums by index_add, log Γ evaluated directly, no
    row lengths or table slots from the host) give the CPU's values."""
    from scvae_tools.fused import _gamma_differences, _row_sums

    logits, library, log_theta, x = _nb_inputs(seed=4, dtype=torch.float32)
    nz = NonZeros.of_dense(x)
    values = torch.randn(len(nz.flat))
    torch.testing.assert_close(_row_sums(values, nz._replace(lengths=None), x.shape[0]),
                               _row_sums(values, nz, x.shape[0]), rtol=1e-5, atol=1e-5)
    theta = log_theta.exp()
    for a, b in zip(_gamma_differences(theta, nz.cols, nz.values, True, tables=False),
                    _gamma_differences(theta, nz.cols, nz.values, True, tables=True,
                                       slots=(nz.slot, nz.outside)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_row_sums_of_non_zeros_with_empty_rows():
    """Per-row sums of non-zero values (numpy ``reduceat`` on the CPU) are right, also for
    rows without any non-zero, in the middle or at the end, where ``reduceat`` alone
    would not give 0."""
    from scvae_tools.fused import _row_sums

    x = torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, 0.0], [3.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    for block in (x, x[:3], x[[0, 2]]):
        nz = NonZeros.of_dense(block)
        values = nz.values * 10.0
        expected = (block * 10.0).sum(1)
        assert torch.equal(_row_sums(values, nz, block.shape[0]), expected)
        assert torch.equal(_row_sums(values, nz._replace(lengths=None), block.shape[0]), expected)


# ---------------------------------------------------------------------- optimiser
def _twin_adams(seed: int = 0):
    """Two copies of a small VAE: one under our FusedAdam, one under torch's fused Adam."""
    from scvae_tools.train import FusedAdam

    torch.manual_seed(seed)
    a = VAE(ModuleConfig(n_genes=40, n_hidden=16, n_latent=4))
    b = VAE(ModuleConfig(n_genes=40, n_hidden=16, n_latent=4))
    b.load_state_dict(a.state_dict())
    kw = {"lr": 1e-2, "weight_decay": 1e-6, "eps": 1e-2, "fused": True}
    return a, FusedAdam(a.parameters(), **kw), b, torch.optim.Adam(b.parameters(), **kw)


def _same_grads(a, b, gen, skip: str | None = None):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        g = None if name == skip else torch.randn(pa.shape, generator=gen)
        pa.grad = None if g is None else g.clone()
        pb.grad = g


def _step_both(a, opt_a, b, opt_b, gen, lr: float, skip: str | None = None):
    _same_grads(a, b, gen, skip)
    for opt in (opt_a, opt_b):
        opt.param_groups[0]["lr"] = lr
        opt.step()
        opt.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
        assert pa.grad is None


def test_fused_adam_steps_bit_for_bit_like_torch():
    """The short path gives torch's parameters exactly, through lr changes; its state dict
    has one step counter per parameter and continues identically in torch's Adam."""
    a, opt_a, b, opt_b = _twin_adams()
    gen = torch.Generator().manual_seed(1)
    for step in range(10):
        _step_both(a, opt_a, b, opt_b, gen, lr=1e-2 * 0.9 ** step)
        _same_grads(a, b, gen)
        assert opt_a._direct_plan() is not None  # after torch's first step: the short path
    counters = {id(st["step"]) for st in opt_a.state.values()}
    assert len(counters) == 1  # shared while training
    saved = copy.deepcopy(opt_a.state_dict())  # as a checkpoint would
    assert [float(st["step"]) for st in saved["state"].values()] == [10.0] * len(opt_a.state)
    c = copy.deepcopy(a)
    opt_c = torch.optim.Adam(c.parameters(), lr=1.0, fused=True)
    opt_c.load_state_dict(saved)
    assert len({id(st["step"]) for st in opt_c.state.values()}) == len(opt_c.state)
    for _ in range(3):
        _step_both(a, opt_a, c, opt_c, gen, lr=1e-3)


def test_fused_adam_with_the_dispersion_group_matches_torch():
    """The package's optimiser has two groups (θ at dispersion_lr_factor × lr), each with
    its own step counter on the short path; it steps exactly as torch's Adam given the same
    groups, through learning-rate changes."""
    from scvae_tools import train as T

    torch.manual_seed(0)
    a = VAE(ModuleConfig(n_genes=40, n_hidden=16, n_latent=4))
    b = VAE(ModuleConfig(n_genes=40, n_hidden=16, n_latent=4))
    b.load_state_dict(a.state_dict())
    cfg = T.TrainConfig(lr=1e-2)
    opt_a = T._adam(a, cfg, torch.device("cpu"))
    opt_b = torch.optim.Adam(T._param_groups(b, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                             eps=cfg.eps, fused=True)
    assert [g["lr"] for g in opt_a.param_groups] == [1e-2, 1e-2 * cfg.dispersion_lr_factor]
    assert opt_a.param_groups[1]["params"] == [a.log_theta]
    gen = torch.Generator().manual_seed(1)
    for step in range(10):
        _same_grads(a, b, gen)
        for opt in (opt_a, opt_b):
            T._set_lr(opt, 1e-2 * 0.9 ** step)
            opt.step()
            opt.zero_grad()
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(pa, pb)
        _same_grads(a, b, gen)
        assert opt_a._direct_plan() is not None  # after torch's first step: the short path
    assert opt_a.param_groups[1]["lr"] == pytest.approx(1e-2 * 0.9 ** 9 * cfg.dispersion_lr_factor)


def test_fused_adam_follows_torch_when_a_gradient_is_missing():
    """torch skips a parameter without a gradient (its counter falls behind); so does ours."""
    a, opt_a, b, opt_b = _twin_adams()
    gen = torch.Generator().manual_seed(3)
    for step in range(8):
        _step_both(a, opt_a, b, opt_b, gen, lr=1e-2,
                   skip="decoder.scale.bias" if step == 4 else None)
    steps = [float(st["step"]) for st in opt_a.state_dict()["state"].values()]
    assert steps == [float(st["step"]) for st in opt_b.state_dict()["state"].values()]
    assert sorted(set(steps)) == [7.0, 8.0]


def test_fused_adam_runs_step_hooks_once_per_step():
    a, opt_a, b, opt_b = _twin_adams()
    calls = []
    opt_a.register_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        _same_grads(a, b, gen)
        opt_a.step()
        opt_b.step()
    assert len(calls) == 3
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    # Hooks registered for every optimiser too.
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: calls.append(2))
    try:
        _same_grads(a, b, gen)
        opt_a.step()
    finally:
        handle.remove()
    assert calls.count(2) == 1 and calls.count(1) == 4
