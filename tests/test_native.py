"""The compiled kernels (scvae_tools.native): the NB likelihood, the sparse first layer, the
expression softmax and the count check give the torch (or numpy) code's values and
gradients, independent of the thread count; the library is cached, and replaced by torch
whenever it cannot serve."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import scvae_tools as svt
from scvae_tools import fused, native
from scvae_tools.fused import (
    NonZeros,
    nb_log_likelihood_from_logits,
    zinb_log_likelihood_from_logits,
)

needs_kernel = pytest.mark.skipif(
    native._unsupported() is not None, reason=f"no compiled kernel here: {native._unsupported()}")


def _batch(kind: str, n: int = 96, g: int = 300, seed: int = 0):
    """float32 logits, log library, log θ and counts with their CSR non-zeros."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, g, generator=gen) * 1.5
    log_theta = torch.randn(g, generator=gen) * 1.2
    mu = torch.softmax(logits, -1) * torch.exp(torch.randn(n, 1, generator=gen) * 0.4 + 6.5)
    x = torch.poisson(mu, generator=gen)
    if kind == "fractional":  # allowed with allow_non_integer=True
        x = x * torch.empty(n, g).uniform_(0.5, 1.5, generator=gen)
    if kind == "extreme":  # saturated softmax and huge counts
        logits[0, 0] = 60.0
        logits[1] = -40.0
        x[2, :3] = torch.tensor([5000.0, 9.0, 8.0])
    X = sp.csr_matrix(x.numpy())
    if kind == "stored-zeros":
        X.data[::5] = 0.0  # still stored: the kernel must skip them
        x = torch.from_numpy(X.toarray())
    lengths = torch.from_numpy(np.diff(X.indptr).astype(np.int64))
    rows = torch.repeat_interleave(torch.arange(n), lengths)
    cols = torch.from_numpy(X.indices.astype(np.int32))
    nz = NonZeros(rows * g + cols, torch.from_numpy(X.data.astype(np.float32)), rows, cols,
                  lengths)
    log_library = torch.log(x.sum(1, keepdim=True).clamp(min=1.0))
    return logits, log_library, log_theta, x, nz


def _value_and_grads(logits, log_library, log_theta, x, nz):
    logits = logits.clone().requires_grad_()
    log_theta = log_theta.clone().requires_grad_()
    ll = nb_log_likelihood_from_logits(logits, log_library, log_theta, x, nz)
    weights = torch.linspace(-1.0, 2.0, len(ll))  # a non-uniform upstream gradient
    (ll * weights).sum().backward()
    return ll.detach(), logits.grad, log_theta.grad


@needs_kernel
def test_the_kernel_builds_where_it_is_supported(use_native):
    use_native(True)
    assert native.library() is not None, native.reason()
    assert native.reason() is None


@needs_kernel
@pytest.mark.parametrize("kind", ["counts", "fractional", "extreme", "stored-zeros"])
def test_kernel_equals_the_torch_code(kind, use_native):
    """Log-likelihood and both gradients, to float32 rounding, for whole and fractional
    counts, counts past the tables, saturated softmaxes and stored zeros."""
    inputs = _batch(kind)
    use_native(False)
    ref = _value_and_grads(*inputs)
    use_native(True)
    assert fused.native_ready(*inputs[:4])
    got = _value_and_grads(*inputs)
    for a, b in zip(got, ref, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * float(b.abs().max()))
    # Searching the dense block for the non-zeros gives the same as the CSR's (stored zeros
    # and all).
    # (The no-gradient branch rounds differently: ~3 float32 ulps of |ll| ≈ 2,600.)
    torch.testing.assert_close(nb_log_likelihood_from_logits(*inputs[:4]), got[0],
                               rtol=3e-6, atol=1e-3)


def _zinb_value_and_grads(logits, log_library, log_theta, x, nz, pi_logits):
    inputs = [t.clone().requires_grad_() for t in (logits, log_theta, pi_logits)]
    ll = zinb_log_likelihood_from_logits(inputs[0], log_library, inputs[1], inputs[2], x, nz)
    (ll * torch.linspace(-1.0, 2.0, len(ll))).sum().backward()
    return (ll.detach(), *(t.grad for t in inputs))


@needs_kernel
@pytest.mark.parametrize("kind", ["counts", "fractional", "extreme", "stored-zeros"])
def test_zinb_kernel_equals_the_torch_code(kind, use_native):
    """The ZINB in the kernel: value and its three gradients, to float32 rounding, with
    dropout logits from near-certain extra zeros to none."""
    inputs = _batch(kind)
    gen = torch.Generator().manual_seed(7)
    pi_logits = torch.randn(inputs[3].shape, generator=gen) * 3
    pi_logits[3, :4] = torch.tensor([40.0, -40.0, 0.0, 15.0])
    use_native(False)
    ref = _zinb_value_and_grads(*inputs, pi_logits)
    use_native(True)
    assert fused.native_ready(*inputs[:4], pi_logits)
    got = _zinb_value_and_grads(*inputs, pi_logits)
    for a, b in zip(got, ref, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * float(b.abs().max()))
    with torch.no_grad():  # the values-only branch
        torch.testing.assert_close(
            zinb_log_likelihood_from_logits(inputs[0], inputs[1], inputs[2], pi_logits,
                                            inputs[3], inputs[4]), got[0], rtol=3e-6, atol=1e-3)


@needs_kernel
def test_kernel_keeps_float32_accuracy_when_logits_share_an_offset(use_native):
    """The likelihood ignores a common shift of a row's logits (softmax); the kernel used to
    subtract two sums of about offset × Σx, and lost 1.08 nats at an offset of 1,000."""
    logits, log_library, log_theta, x, nz = _batch("counts", seed=3)
    for offset in (0.0, 100.0, 1000.0):
        shifted = logits + offset  # float32: the kernel's input, rounded as it gets it
        use_native(False)
        ref = nb_log_likelihood_from_logits(shifted.double(), log_library.double(),
                                            log_theta.double(), x.double(), nz)
        use_native(True)
        got = nb_log_likelihood_from_logits(shifted, log_library, log_theta, x, nz)
        err = float((got.double() - ref).abs().max())
        assert err < 1e-5 * float(ref.abs().max()), (offset, err)


@needs_kernel
def test_kernel_equals_float64_formula(use_native):
    """Against the plain formula in float64: the kernel is as accurate as float32 allows."""
    logits, log_library, log_theta, x, nz = _batch("counts", seed=3)
    use_native(True)
    got = nb_log_likelihood_from_logits(logits, log_library, log_theta, x, nz).double()
    lm = torch.log_softmax(logits.double(), -1) + log_library.double()
    th, lt = log_theta.double().exp(), log_theta.double()
    xd = x.double()
    lt_m = torch.logaddexp(lt, lm)
    ref = (th * (lt - lt_m) + xd * (lm - lt_m) + torch.lgamma(xd + th) - torch.lgamma(th)
           - torch.lgamma(xd + 1)).sum(-1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0.05)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_near_poisson_genes_keep_their_dispersion_gradient(kernel, use_native):
    """At large θ (near-Poisson genes), float32 values and gradients stay within float32
    rounding of float64. log(θ+μ) − log θ used to be a difference of two nearly equal logs:
    at θ ≈ 1.6e5 the gradient in log θ was off by 9× its own size, and at θ ≈ 1e4 by 2%."""
    if kernel and native._unsupported() is not None:
        pytest.skip(f"no compiled kernel here: {native._unsupported()}")
    gen = torch.Generator().manual_seed(5)
    n, g = 96, 300
    logits = torch.randn(n, g, generator=gen)
    log_theta = torch.empty(g).uniform_(4.0, 12.0, generator=gen)  # θ from 55 to 1.6e5
    mu = torch.softmax(logits, -1) * 3000.0
    x = torch.poisson(mu, generator=gen)  # near-Poisson counts, some past the tables
    x[0, :4] = torch.tensor([40.0, 90.0, 0.5, 2.5])
    log_library = torch.log(x.sum(1, keepdim=True))
    use_native(kernel)
    assert fused.native_ready(logits, log_library, log_theta, x) == kernel
    got = _value_and_grads(logits, log_library, log_theta, x, None)

    # Reference: the plain formula in float64 through autograd.
    lg, lt = logits.double().requires_grad_(), log_theta.double().requires_grad_()
    lm = torch.log_softmax(lg, -1) + log_library.double()
    th, xd = lt.exp(), x.double()
    lt_m = torch.logaddexp(lt, lm)
    ll = (th * (lt - lt_m) + xd * (lm - lt_m) + torch.lgamma(xd + th) - torch.lgamma(th)
          - torch.lgamma(xd + 1)).sum(-1)
    (ll * torch.linspace(-1.0, 2.0, n, dtype=torch.float64)).sum().backward()
    for name, a, b in zip(("log-likelihood", "logits", "log θ"), got, (ll, lg.grad, lt.grad),
                          strict=True):
        err = float((a.double() - b.detach()).abs().max() / b.detach().abs().max())
        assert err < 1e-4, (name, err)
    # Gene by gene, too: the small gradients of very large θ are not lost under the
    # largest (the old code was off by up to 0.98 on genes whose gradient is 2e-4).
    err = (got[2].double() - lt.grad).abs()
    assert bool((err < 0.05 * lt.grad.abs() + 2e-4 * lt.grad.abs().max()).all())


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_a_vanishing_dispersion_parameter_gives_finite_values(kernel, use_native):
    """log θ below about −88 made μ/θ overflow float32 (log1p(μ/θ) = inf, θ·inf = NaN);
    NaN inputs still give NaN (the training loop's divergence checks rely on it)."""
    if kernel and native._unsupported() is not None:
        pytest.skip(f"no compiled kernel here: {native._unsupported()}")
    use_native(kernel)
    logits, log_library, log_theta, x, _ = _batch("counts", n=8, g=40, seed=2)
    for value in (-95.0, -105.0):
        lt = log_theta.clone()
        lt[:2] = value
        ll, g_logits, g_lt = _value_and_grads(logits, log_library, lt, x, None)
        assert torch.isfinite(ll).all() and torch.isfinite(g_logits).all(), value
    lt = log_theta.clone()
    lt[0] = float("nan")
    assert torch.isnan(nb_log_likelihood_from_logits(logits, log_library, lt, x)).all()


@needs_kernel
def test_kernel_result_does_not_depend_on_the_thread_count(use_native):
    use_native(True)
    inputs = _batch("counts", n=130)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_value_and_grads(*inputs))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@needs_kernel
def test_kernel_passes_nan_on(use_native):
    """A NaN in the decoder's output must reach the loss (the training loop's divergence
    check relies on it), even though the row maximum is taken with finite maths."""
    use_native(True)
    logits, log_library, log_theta, x, nz = _batch("counts")
    logits[3, 7] = float("nan")
    ll = nb_log_likelihood_from_logits(logits, log_library, log_theta, x, nz)
    assert torch.isnan(ll[3]) and torch.isfinite(ll[torch.arange(len(ll)) != 3]).all()


@needs_kernel
def test_kernel_is_cached_by_source_compiler_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("SCVAE_TOOLS_KERNEL_DIR", str(tmp_path))
    path = native._build()
    assert path.parent == tmp_path and path.name.startswith("nb_kernel-")
    stamp = path.stat().st_mtime_ns
    assert native._build() == path and path.stat().st_mtime_ns == stamp  # no rebuild
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


def test_without_a_compiler_torch_serves(tmp_path, monkeypatch, use_native):
    """No gcc (or a failing build): the reason is recorded, torch computes the likelihood."""
    monkeypatch.setenv("SCVAE_TOOLS_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    use_native(True)
    assert native.library() is None
    assert "gcc" in native.reason() or "Linux" in native.reason() or "glibc" in native.reason()
    inputs = _batch("counts")
    assert not fused.native_ready(*inputs[:4])
    ll = nb_log_likelihood_from_logits(*inputs)
    torch.testing.assert_close(ll, fused._nb_core_torch(*inputs[:4], False, inputs[4])[0])
    assert list(tmp_path.iterdir()) == []


@needs_kernel
def test_a_failed_build_falls_back(tmp_path, monkeypatch, use_native):
    monkeypatch.setenv("SCVAE_TOOLS_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "FLAGS", native.FLAGS + ("-fno-such-flag",))
    use_native(True)
    assert native.library() is None
    assert "could not build" in native.reason()


@needs_kernel
def test_a_kernel_that_disagrees_is_disabled_with_a_warning(monkeypatch, use_native):
    use_native(True)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(fused, "_native_checked", False)
    real = native.nb_rows

    def wrong(*args, **kwargs):
        ll, *grads = real(*args, **kwargs)
        return (ll + 1.0, *grads)

    monkeypatch.setattr(native, "nb_rows", wrong)
    inputs = _batch("counts")
    with pytest.warns(RuntimeWarning, match="disabled"):
        ll = nb_log_likelihood_from_logits(*inputs)
    assert native.library() is None and "differs" in native.reason()
    torch.testing.assert_close(ll, fused._nb_core_torch(*inputs[:4], False, inputs[4])[0])


def test_switched_off_by_environment(use_native):
    use_native(False)
    assert native.library() is None
    assert "SCVAE_TOOLS_NATIVE" in native.reason()
    assert not fused.native_ready(*_batch("counts")[:4])


@needs_kernel
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_softmax_scale_equals_torch(rows, use_native):
    """In-place scale · softmax: a number or one scale per row, logits far from zero
    included (the row maximum is subtracted), any thread count."""
    use_native(True)
    gen = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, 513, generator=gen) * 4
    logits[0, :3] = torch.tensor([95.0, -120.0, 60.0])
    per_row = torch.rand(rows, 1, generator=gen) * 1e4 + 1.0
    before = torch.get_num_threads()
    try:
        for scale in (1e4, per_row, per_row.reshape(-1)):
            want = torch.softmax(logits.double(), -1) * (
                scale.double().reshape(-1, 1) if isinstance(scale, torch.Tensor) else scale)
            results = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                results.append(native.softmax_scale_(logits.clone(), scale))
            torch.testing.assert_close(results[0].double(), want, rtol=1e-5, atol=1e-6)
            assert all(torch.equal(results[0], r) for r in results[1:])
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="scale factors"):
        native.softmax_scale_(logits.clone(), torch.ones(rows + 1))
    with pytest.raises(ValueError, match="contiguous"):
        native.softmax_scale_(torch.zeros(4, 6)[:, ::2], 1.0)


@pytest.mark.parametrize("dispersion", ["gene", "gene-batch", "gene-cell"])
def test_training_with_and_without_the_kernel_agree(dispersion, synthetic, use_native):
    """Two epochs from the same seed: the two paths differ by float32 rounding only, in
    training, in the ELBO and in denoised expression, for each kind of dispersion."""
    out = {}
    for on in (True, False):
        use_native(on)
        model = svt.SCVAE(synthetic, n_latent=4, n_hidden=32, dispersion=dispersion,
                          batch_key="batch")
        model.train(max_epochs=2, batch_size=64, seed=0, progress_bar=False)
        out[on] = (model.history["train_elbo"].to_numpy(), model.get_elbo(),
                   model.get_normalized_expression())
    for a, b in zip(out[True], out[False], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(("value", "on"), [("0", False), ("off", False), ("False", False),
                                           ("no", False), ("1", True), ("yes", True)])
def test_environment_switch_values(value, on, monkeypatch):
    monkeypatch.setenv("SCVAE_TOOLS_NATIVE", value)
    assert native.enabled() is on


@needs_kernel
@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_count_check_sums_rows_and_names_each_problem(fmt, use_native):
    """Row sums equal numpy's (in float64) for any thread count; each kind of bad value is
    reported wherever it lies in a row (vector body or remainder), and only it."""
    use_native(True)
    rng = np.random.default_rng(0)
    dense = rng.poisson(rng.gamma(0.3, 4.0, (53, 517))).astype(np.float32)
    dense[7] = 0.0  # an empty row sums to 0
    dense[8, 5] = 3e6  # large counts stay exact
    make = sp.csr_matrix if fmt == "csr" else np.ascontiguousarray
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            totals, flags = native.count_check(make(dense))
            assert flags == 0
            np.testing.assert_array_equal(totals, dense.astype(np.float64).sum(1).astype(np.float32))
    finally:
        torch.set_num_threads(before)
    cases = {np.nan: native.NONFINITE, np.inf: native.NONFINITE, -np.inf: native.NONFINITE | native.NEGATIVE,
             -1.0: native.NEGATIVE, -0.5: native.NEGATIVE | native.FRACTIONAL,
             2.5: native.FRACTIONAL, 1e-3: native.FRACTIONAL}
    for value, expected in cases.items():
        for col in (0, 300, 516):  # first, inside the vector body, last of the row
            bad = dense.copy()
            bad[11, col] = value
            assert native.count_check(make(bad))[1] == expected, (value, col)
    with pytest.raises(ValueError, match="float32"):
        native.count_check(sp.csr_matrix(dense.astype(np.float64)))
    with pytest.raises(ValueError, match="C-contiguous"):
        native.count_check(np.asfortranarray(dense))


@needs_kernel
def test_library_sizes_are_the_same_with_and_without_the_kernel(synthetic, use_native):
    totals = {}
    for on in (True, False):
        use_native(on)
        totals[on] = svt.SCVAE(synthetic, n_latent=2)._data.library
    np.testing.assert_array_equal(totals[True], totals[False])


@needs_kernel
def test_a_count_check_that_disagrees_with_numpy_is_an_error(synthetic, monkeypatch, use_native):
    use_native(True)
    monkeypatch.setattr(native, "count_check",
                        lambda X: (np.ones(X.shape[0], np.float32), native.FRACTIONAL))
    with pytest.raises(RuntimeError, match="SCVAE_TOOLS_NATIVE=0"):
        svt.SCVAE(synthetic)


def _csr(n_rows: int, n_genes: int, density: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n_rows, n_genes, generator=gen) * 6, generator=gen)
    x *= torch.rand(n_rows, n_genes, generator=gen) < density
    if n_rows > 2:
        x[1] = 0.0  # a cell without non-zeros in this block of genes
    x[0, :4] = torch.tensor([1.0, 350.0, 2.5, 0.0])  # large, fractional (allowed), zero
    return x, x.to_sparse_csr()


@needs_kernel
@pytest.mark.parametrize("n_hidden", [16, 128, 144, 256])
@pytest.mark.parametrize(("n_rows", "density"), [(1, 0.5), (65, 0.1), (300, 0.5)])
def test_sparse_first_layer_equals_the_embedding_bag(n_hidden, n_rows, density, use_native):
    """bias + log1p(X) @ W from CSR: torch's embedding bag to float32 rounding, for widths
    within, at and past one register sweep, tiles of rows partly filled, empty rows, and the
    same bits for any thread count."""
    use_native(True)
    x, csr = _csr(n_rows, 517, density, seed=n_hidden + n_rows)
    gen = torch.Generator().manual_seed(1)
    table, bias = torch.randn(517, n_hidden, generator=gen), torch.randn(n_hidden, generator=gen)
    want = torch.log1p(x.double()) @ table.double() + bias.double()
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for crow, col in ((csr.crow_indices(), csr.col_indices()),
                              (csr.crow_indices().int(), csr.col_indices().int())):
                results.append(native.log1p_linear_csr(crow, col, csr.values(), table, bias))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(results[0].double(), want, rtol=1e-5, atol=1e-4)
    assert all(torch.equal(results[0], r) for r in results[1:])


@needs_kernel
def test_sparse_first_layer_refuses_unsorted_columns_and_odd_widths(use_native):
    use_native(True)
    crow = torch.tensor([0, 3, 5])
    col = torch.tensor([0, 7, 4, 1, 2])  # row 0's columns descend
    values = torch.ones(5)
    table, bias = torch.randn(8, 32), torch.zeros(32)
    assert native.log1p_linear_csr(crow, col, values, table, bias) is None
    assert native.log1p_linear_csr(crow, torch.tensor([0, 4, 7, 1, 2]), values, table,
                                   bias) is not None  # descending only between rows: fine
    with pytest.raises(ValueError, match="multiple of 16"):
        native.log1p_linear_csr(crow, col, values, torch.randn(8, 20), torch.zeros(20))


@needs_kernel
def test_latent_with_and_without_the_kernel_agree(synthetic, use_native):
    """Sparse inference: the compiled first layer against torch's embedding bag, on the same
    trained weights; and the encoder keeps working on unsorted CSR columns."""
    model = svt.SCVAE(synthetic, n_latent=4, n_hidden=32)
    model.train(max_epochs=2, batch_size=64, seed=0, progress_bar=False)
    out = {}
    for on in (True, False):
        use_native(on)
        out[on] = model.get_latent_representation()
    np.testing.assert_allclose(out[True], out[False], rtol=1e-4, atol=1e-5)
    use_native(True)
    x = torch.from_numpy(np.asarray(synthetic.X[:40].toarray(), dtype=np.float32))
    crow = x.to_sparse_csr().crow_indices()
    cols, vals = x.to_sparse_csr().col_indices().clone(), x.to_sparse_csr().values().clone()
    for a, b in zip(crow[:-1].tolist(), crow[1:].tolist(), strict=True):  # descending in rows
        cols[a:b], vals[a:b] = cols[a:b].flip(0), vals[a:b].flip(0)
    shuffled = torch.sparse_csr_tensor(crow, cols, vals, size=x.shape,
                                       check_invariants=False)
    assert native.log1p_linear_csr(crow, cols, vals, torch.zeros(x.shape[1], 32),
                                   torch.zeros(32)) is None
    model.module.eval()
    with torch.inference_mode():
        cov = torch.zeros(40, 0)
        np.testing.assert_allclose(model.module.encoder(shuffled, cov)[0].numpy(),
                                   model.module.encoder(x, cov)[0].numpy(), rtol=1e-4, atol=1e-5)


@needs_kernel
def test_zinb_kernel_keeps_zeros_with_a_small_nb_probability(use_native):
    """At a zero where NB(0) is tiny (large μ) and the extra zeros likely, the kernel took
    log p(0) as nb0 + (both − nb0), which cancels in float32 (5.7e-5 relative off here,
    torch's select 6e-6). Selects now: within float32 rounding of float64."""
    use_native(True)
    g = 2000
    logits = torch.randn(2, g, generator=torch.Generator().manual_seed(1)) * 0.3
    x = torch.zeros(2, g)
    log_library = torch.full((2, 1), float(np.log(2e8)))
    log_theta = torch.full((g,), 6.0)
    pi_logits = torch.full((2, g), 3.0)
    assert fused.native_ready(logits, log_library, log_theta, pi_logits, x)
    ref = zinb_log_likelihood_from_logits(logits.double(), log_library.double(),
                                          log_theta.double(), pi_logits.double(), x.double())
    for grads in (True, False):
        with torch.set_grad_enabled(grads):
            got = zinb_log_likelihood_from_logits(logits.requires_grad_(grads), log_library,
                                                  log_theta, pi_logits, x)
        err = float((got.detach().double() - ref).abs().max() / ref.abs().max())
        assert err < 2e-6, (grads, err)


def _per_batch_value_and_grads(logits, log_library, table, x, nz, index, pi_logits=None,
                               gathered=False):
    """Value and gradients with a table of θ rows, passed as the table and each cell's row
    (``theta_index``) or, ``gathered``, as the cells × genes copy ``table[index]``."""
    logits = logits.clone().requires_grad_()
    table = table.clone().requires_grad_()
    lt, idx = (table[index], None) if gathered else (table, index)
    if pi_logits is None:
        ll = nb_log_likelihood_from_logits(logits, log_library, lt, x, nz, theta_index=idx)
    else:
        ll = zinb_log_likelihood_from_logits(logits, log_library, lt, pi_logits, x, nz,
                                             theta_index=idx)
    (ll * torch.linspace(-1.0, 2.0, ll.shape[-1])).sum().backward()
    return ll.detach(), logits.grad, table.grad


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
@pytest.mark.parametrize("kernel", [True, False])
def test_a_dispersion_per_batch_read_from_its_table(likelihood, kernel, use_native):
    """dispersion="gene-batch" passes the batches × genes table and each cell's row of it
    (the compiled kernel tabulates the log Γ terms per batch): the same value and gradients
    as the cells × genes copy, including the gradient summed into each batch's row and a
    batch no cell uses (gradient 0)."""
    if kernel and native._unsupported() is not None:
        pytest.skip(native._unsupported())
    logits, log_library, _, x, nz = _batch("counts")
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(4, x.shape[1], generator=gen)
    index = torch.randint(0, 3, (x.shape[0],), generator=gen)  # batch 3: no cells
    pi = torch.randn(x.shape, generator=gen) * 2 if likelihood == "zinb" else None
    use_native(False)
    ref = _per_batch_value_and_grads(logits, log_library, table, x, nz, index, pi, gathered=True)
    use_native(kernel)
    got = _per_batch_value_and_grads(logits, log_library, table, x, nz, index, pi)
    assert (got[2][3] == 0).all() and (got[2][:3] != 0).any()
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * float(b.abs().max()))
    # Posterior samples in a leading dimension: the index is broadcast over them.
    stacked = torch.stack([logits, logits + 0.1])
    with torch.no_grad():
        both = nb_log_likelihood_from_logits(stacked, log_library, table, x, nz,
                                             theta_index=index)
        torch.testing.assert_close(
            both, nb_log_likelihood_from_logits(stacked, log_library, table[index], x, nz))


@pytest.mark.parametrize("kind", ["counts", "fractional", "extreme"])
@pytest.mark.parametrize("kernel", [True, False])
def test_a_dispersion_per_cell_in_the_kernel(kernel, kind, use_native):
    """A θ per entry (dispersion="gene-cell") also runs in the kernel, without tables (log Γ
    terms as sums of logs for small whole counts, lgamma otherwise): the torch code's value
    and gradients."""
    if kernel and native._unsupported() is not None:
        pytest.skip(native._unsupported())
    logits, log_library, _, x, nz = _batch(kind)
    per_entry = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    use_native(False)
    ref = _value_and_grads(logits, log_library, per_entry, x, nz)
    use_native(kernel)
    got = _value_and_grads(logits, log_library, per_entry, x, nz)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * float(b.abs().max()))


def test_theta_index_is_checked(use_native):
    """Both paths refuse the same inputs: the kernel reads raw memory, and torch indexing
    would wrap negative rows and read a bool index as a mask."""
    logits, log_library, _, x, nz = _batch("counts", n=8, g=20)
    table = torch.zeros(2, 20)
    for on in (True, False):
        use_native(on)
        for bad in (torch.zeros(8), torch.zeros(7, dtype=torch.long),
                    torch.zeros(8, 1, dtype=torch.long), torch.ones(8, dtype=torch.bool),
                    torch.zeros(8, dtype=torch.uint8)):
            with pytest.raises(ValueError, match="theta_index"):
                nb_log_likelihood_from_logits(logits, log_library, table, x, theta_index=bad)
        with pytest.raises(ValueError, match="theta_index"):  # a table, not one θ per gene
            nb_log_likelihood_from_logits(logits, log_library, table[0], x,
                                          theta_index=torch.zeros(8, dtype=torch.long))
        # A table whose width is not the genes: its size may be a multiple of theirs, and
        # the kernel would have read it as more rows.
        for wrong in (torch.zeros(4, 10), torch.zeros(2, 40)):
            with pytest.raises(ValueError, match="log_theta has"):
                nb_log_likelihood_from_logits(logits, log_library, wrong, x,
                                              theta_index=torch.zeros(8, dtype=torch.long))
        with pytest.raises(ValueError, match="log_theta has"):
            zinb_log_likelihood_from_logits(logits, log_library, torch.zeros(40), logits, x)
        for rows in (2, -1):  # past the table, or negative: an error on both paths
            with pytest.raises(IndexError, match="theta_index"):
                nb_log_likelihood_from_logits(logits, log_library, table, x,
                                              theta_index=torch.full((8,), rows))


@pytest.mark.parametrize("kernel", [True, False])
def test_one_dispersion_for_all_genes_is_repeated_per_gene(kernel, use_native):
    """A single log θ (shape () or (1,)) broadcasts over the genes, as the docstring says;
    the kernel, which reads one per gene, used to read past it."""
    if kernel and native._unsupported() is not None:
        pytest.skip(native._unsupported())
    logits, log_library, _, x, nz = _batch("counts", n=8, g=20)
    use_native(kernel)
    want = nb_log_likelihood_from_logits(logits, log_library, torch.full((20,), 0.3), x)
    for scalar in (torch.tensor(0.3), torch.tensor([0.3])):
        lt = scalar.clone().requires_grad_()
        got = nb_log_likelihood_from_logits(logits, log_library, lt, x)
        torch.testing.assert_close(got.detach(), want, rtol=3e-5, atol=1e-3)  # grad loop rounds apart
        got.sum().backward()
        assert lt.grad.shape == lt.shape and torch.isfinite(lt.grad).all()


@pytest.mark.parametrize("kernel", [True, False])
def test_a_negative_value_is_not_read_from_another_genes_table(kernel, use_native):
    """Counts of 1–8 read per-gene tables at slot g·9 + k. A negative value (not a count;
    the public likelihood functions do not validate their input) took slot g·9 − 1, the
    previous gene's table (torch), or read before the tables' memory (compiled kernel):
    a finite, wrong value. It is now non-finite, as lgamma at a non-count is."""
    if kernel and native._unsupported() is not None:
        pytest.skip(native._unsupported())
    use_native(kernel)
    logits, log_library, log_theta, x, nz = _batch("counts")
    j = int(torch.nonzero((nz.cols > 0) & (nz.values <= 8))[0])
    row, col = int(nz.rows[j]), int(nz.cols[j])
    nz.values[j] = -1.0
    x[row, col] = -1.0
    ll = nb_log_likelihood_from_logits(logits, log_library, log_theta, x, nz)
    assert not torch.isfinite(ll[row])
    assert torch.isfinite(ll[torch.arange(len(ll)) != row]).all()


@needs_kernel
def test_softmax_scale_of_no_rows_with_per_row_scales(use_native):
    use_native(True)
    out = native.softmax_scale_(torch.zeros(0, 5), torch.ones(0))
    assert out.shape == (0, 5)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_deep_cells_keep_their_log_likelihood_digits(kernel, use_native):
    """Cells of ~1e6 counts: Σ x·log ρ, Σ x·log(θ+μ) and log ℓ·Σ x are each ~1e7 and cancel
    to far less. Their float32 sums lost ~1 nat per cell (kernel and torch alike); now the
    kernel sums them in float64 and the torch code adds x·log(μ/(θ+μ)) directly."""
    if kernel and native._unsupported() is not None:
        pytest.skip(f"no compiled kernel here: {native._unsupported()}")
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(16, 2000, generator=gen) * 2.0
    log_theta = torch.randn(2000, generator=gen) - 0.5
    x = torch.poisson(torch.softmax(logits.double(), -1).float() * 1e6, generator=gen)
    log_library = x.sum(1, keepdim=True).log()
    use_native(kernel)
    got = nb_log_likelihood_from_logits(logits, log_library, log_theta, x).double()
    lm = torch.log_softmax(logits.double(), -1) + log_library.double()
    lt, xd = log_theta.double(), x.double()
    th, lt_m = lt.exp(), torch.logaddexp(lt, lm)
    ref = (th * (lt - lt_m) + xd * (lm - lt_m) + torch.lgamma(xd + th) - torch.lgamma(th)
           - torch.lgamma(xd + 1)).sum(-1)
    assert float((got - ref).abs().max()) < 0.01


@needs_kernel
def test_a_damaged_cached_library_is_rebuilt_and_readable_by_others(tmp_path, monkeypatch):
    """Whatever sat at the cached name was loaded as is: zero bytes left the kernel off
    for good, a truncated copy killed every later process (SIGBUS in dlopen), another
    source's library failed on a missing symbol. The cache names each library by its
    content hash, rebuilds a file that does not match it, and leaves it readable by
    other users of a shared folder (mkstemp made it 0600)."""
    monkeypatch.setenv("SCVAE_TOOLS_KERNEL_DIR", str(tmp_path))
    good = native._build()
    data = good.read_bytes()
    assert good.stat().st_mode & 0o044 == 0o044  # group and others may read it
    for damage in (b"", data[: len(data) // 2], data[:-64] + b"\0" * 64):
        good.write_bytes(damage)
        rebuilt = native._build()
        assert rebuilt.read_bytes() == data or native._intact(rebuilt)
        assert [p.name for p in tmp_path.iterdir()] == [rebuilt.name]
        good = rebuilt
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_no_genes_is_a_clear_error_and_the_kernel_reads_nothing(kernel, use_native):
    """A zero-gene block: the public likelihoods said "cannot reshape tensor of 0
    elements", and the kernel's softmax read l[0] of an empty row (a segfault)."""
    use_native(kernel)
    with pytest.raises(ValueError, match="no genes"):
        nb_log_likelihood_from_logits(torch.randn(5, 0), torch.zeros(5, 1), torch.randn(0),
                                      torch.zeros(5, 0))
    with pytest.raises(ValueError, match="no genes"):
        zinb_log_likelihood_from_logits(torch.randn(5, 0), torch.zeros(5, 1), torch.randn(0),
                                        torch.randn(5, 0), torch.zeros(5, 0))
    if kernel and native._unsupported() is None:
        fused.native_ready(torch.zeros(1))
        out = torch.empty(3, 0)
        assert native.softmax_scale_(out, 1.0) is out
