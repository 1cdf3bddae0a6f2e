"""SCVAE end to end on synthetic counts: training, outputs, save/load, reproducibility."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from sklearn.metrics import adjusted_rand_score

import scvae_tools as svt


@pytest.fixture(scope="module")
def trained():
    adata = svt.datasets.synthetic_counts(n_cells=600, n_genes=200, n_types=3, seed=0)
    model = svt.SCVAE(adata, n_latent=5, n_hidden=64)
    model.train(max_epochs=40, progress_bar=False, seed=0)
    return adata, model


def test_history_columns_and_learning(trained):
    _, model = trained
    h = model.history
    for col in ["epoch", "beta", "train_elbo", "train_reconstruction", "train_kl",
                "validation_elbo", "validation_reconstruction", "validation_kl", "seconds"]:
        assert col in h
    np.testing.assert_allclose(h["train_elbo"], -h["train_reconstruction"] - h["train_kl"])
    assert h["validation_elbo"].iloc[-1] > h["validation_elbo"].iloc[0] + 10  # it learned
    assert h["beta"].iloc[0] < h["beta"].iloc[-1] == 1.0  # KL warm-up ramped β
    # ...in the loss, not only in the table: with β < 1 the posterior may spend more KL. Same
    # seed, 3 epochs with and without warm-up: measured KL ratios 1.22, 1.69, 1.80 (exactly
    # 1 when the loss ignores the β recorded).
    adata, _ = trained
    kl = {}
    for warmup in (10, 0):
        m = svt.SCVAE(adata, n_latent=5, n_hidden=64)
        m.train(max_epochs=3, kl_warmup_epochs=warmup, progress_bar=False, seed=0)
        kl[warmup] = m.history["train_kl"].to_numpy()
    np.testing.assert_allclose(m.history["beta"], 1.0)
    assert (kl[10][1:] > 1.3 * kl[0][1:]).all(), kl


def test_latent_separates_cell_types(trained):
    adata, model = trained
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, 5) and np.isfinite(z).all()
    b = adata.copy()
    b.obsm["X_scvae"] = z
    sc.pp.neighbors(b, use_rep="X_scvae", random_state=0)
    sc.tl.leiden(b, flavor="igraph", n_iterations=2, directed=False, resolution=0.3, random_state=0)
    assert adjusted_rand_score(b.obs["cell_type"], b.obs["leiden"]) > 0.8


def test_expression_outputs(trained):
    adata, model = trained
    den = model.get_normalized_expression(library_size=1e4)
    np.testing.assert_allclose(den.sum(1), 1e4, rtol=1e-4)
    exp = model.get_normalized_expression(library_size="observed")
    np.testing.assert_allclose(exp.sum(1), np.asarray(adata.X.sum(1)).ravel(), rtol=1e-4)
    sampled = model.get_normalized_expression(n_samples=5)
    assert sampled.shape == den.shape and np.allclose(sampled.sum(1), 1e4, rtol=1e-4)
    # n_samples averages the decoded proportions over draws of z ~ q(z|x): it moves away from
    # the posterior-mean decoding by as much as the same average of draws made here does.
    # Measured: the mean relative change is 0.039-0.041 over seeds, in both; with z at the
    # mean it is 0, with the variance taken for the s.d. 0.013.
    means, variances = model.get_latent_representation(return_dist=True)
    gen = torch.Generator().manual_seed(1)
    eps = torch.randn((5, *means.shape), generator=gen)
    z = torch.as_tensor(means) + torch.as_tensor(variances).sqrt() * eps
    cov = model.module.covariates(torch.zeros(len(means), dtype=torch.long))
    with torch.no_grad():
        ref = 1e4 * model.module.eval().proportions(z, cov).mean(0).numpy()
    change = np.abs(sampled - den).mean() / den.mean()
    ref_change = np.abs(ref - den).mean() / den.mean()
    assert abs(change / ref_change - 1) < 0.1, (change, ref_change)


def test_expression_into_a_given_array(trained, tmp_path):
    """out= takes the result batch by batch, in memory or memory-mapped from a backed
    AnnData, and is returned; an array that cannot take it is refused, untouched."""
    adata, model = trained
    want = model.get_normalized_expression(batch_size=128)
    buf = np.full(want.shape, np.nan, dtype=np.float32)
    got = model.get_normalized_expression(batch_size=128, out=buf)
    assert got is buf
    np.testing.assert_array_equal(got, want)
    torch.manual_seed(0)  # the n_samples > 1 path writes through another branch
    sampled = model.get_normalized_expression(n_samples=3, library_size="observed")
    torch.manual_seed(0)
    np.testing.assert_array_equal(
        model.get_normalized_expression(n_samples=3, library_size="observed", out=buf), sampled)

    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    disk = np.lib.format.open_memmap(tmp_path / "denoised.npy", mode="w+", dtype=np.float32,
                                     shape=want.shape)
    model.get_normalized_expression(backed, batch_size=128, out=disk)
    disk.flush()
    backed.file.close()
    np.testing.assert_allclose(np.load(tmp_path / "denoised.npy"), want, rtol=1e-5, atol=1e-5)

    bad = {
        "shape": np.zeros((want.shape[0] - 1, want.shape[1]), np.float32),
        "dtype": np.zeros(want.shape, np.float64),
        "not C-contiguous": np.zeros(want.shape[::-1], np.float32).T,
        "read-only": np.zeros(want.shape, np.float32),
        "not a numpy array": want.tolist(),
    }
    bad["read-only"].flags.writeable = False
    for problem, arr in bad.items():
        with pytest.raises(ValueError, match=problem.replace("not a numpy array", "numpy array")):
            model.get_normalized_expression(out=arr)
    assert not bad["dtype"].any() and not bad["shape"].any()  # untouched


def test_inference_batch_size_default_and_independence(trained):
    """Inference batches default to ~2²³ cells × genes × samples values (between 1,024 and
    8,192 cells), and results do not depend on the batch size (eval-mode BatchNorm)."""
    adata, model = trained
    assert model._inference_batch_size(None) == 8192  # 200 genes: capped
    assert model._inference_batch_size(None, n_samples=100) == 1024  # floored
    assert model._inference_batch_size(300) == 300  # an explicit size is kept
    np.testing.assert_allclose(model.get_latent_representation(batch_size=64),
                               model.get_latent_representation(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.get_normalized_expression(batch_size=64),
                               model.get_normalized_expression(), rtol=1e-4, atol=1e-4)


def _reference_elbo_and_iwae(model, adata, k, seed=0):
    """Per-cell ELBO (averaged over k draws) and the k-sample IWAE bound, computed here from
    the encoder's q(z|x) and the decoder's NB mean and θ with scipy: nothing of the model's
    likelihood, KL or importance-weighting code. The NB log-density is written with log Γ,
    so that it holds for fractional counts too (scipy's nbinom is -inf there)."""
    import scipy.stats as st
    from scipy.special import gammaln, logsumexp

    module = model.module
    was_training = module.training
    module.eval()
    x = torch.as_tensor(adata.X.toarray(), dtype=torch.float32)
    lib = x.sum(1, keepdim=True)
    bi = torch.zeros(len(x), dtype=torch.long)
    cov = module.covariates(bi)
    with torch.no_grad():
        m, v = module.encode(x, cov)
        z = m + v.sqrt() * torch.randn((k, *m.shape), generator=torch.Generator().manual_seed(seed))
        p = module.decode(z, lib, cov, bi)
    module.train(was_training)
    mu, theta = p["mu"].double().numpy(), p["theta"].double().numpy()
    xd = x.double().numpy()
    log_px = (gammaln(xd + theta) - gammaln(theta) - gammaln(xd + 1)
              + theta * np.log(theta / (theta + mu)) + xd * np.log(mu / (theta + mu))).sum(-1)
    z, m, s = z.double().numpy(), m.double().numpy(), v.sqrt().double().numpy()
    log_pz, log_q = st.norm.logpdf(z).sum(-1), st.norm.logpdf(z, m, s).sum(-1)
    kl = (0.5 * (s**2 + m**2 - 1 - 2 * np.log(s))).sum(-1)  # closed form, per cell
    return (log_px - kl).mean(0), logsumexp(log_px + log_pz - log_q, axis=0) - np.log(k)


def test_elbo_and_marginal_ll(trained):
    adata, model = trained
    elbo = model.get_elbo(indices=model.validation_indices)
    ll = model.get_marginal_ll(indices=model.validation_indices, n_samples=50)
    assert np.isfinite(elbo) and elbo < 0
    assert ll >= elbo - 0.5  # importance weighting cannot be worse than the ELBO on average
    assert model.get_elbo(adata) == pytest.approx(model.get_elbo(), rel=0.01)
    # Both agree with a reference computed from the decoder's NB parameters with scipy (other
    # draws of z). Measured over the 600 cells with seeds 0-3: |ELBO − ref| ≤ 0.66 nats/cell
    # (one draw per cell), |IWAE − ref| ≤ 0.12, per-cell correlation 0.9992; the IWAE−ELBO
    # gap is ≈ 7. A dropped −log K moves the IWAE by log 50 = 3.9, a dropped −log σ in
    # log q(z|x) by 5.9.
    ref_elbo, ref_iwae = _reference_elbo_and_iwae(model, adata, k=50)
    assert abs(model.get_elbo() - ref_elbo.mean()) < 1.5, (model.get_elbo(), ref_elbo.mean())
    got = model.get_marginal_ll(n_samples=50, return_per_cell=True)
    assert abs(got.mean() - ref_iwae.mean()) < 0.5, (got.mean(), ref_iwae.mean())
    assert np.corrcoef(got, ref_iwae)[0, 1] > 0.998


def test_write_to_adata_keys(trained):
    adata, model = trained
    a = adata.copy()
    model.write_to_adata(a)
    assert a.obsm["X_scvae"].shape == (a.n_obs, 5)
    assert a.layers["scvae_denoised"].shape == a.shape
    assert a.layers["scvae_expected"].shape == a.shape
    assert a.uns["scvae"]["model"]["n_latent"] == 5
    assert len(a.uns["scvae"]["history"]["train_elbo"]) == len(model.history)
    b = adata.copy()
    model.write_to_adata(b, key_added="vae2", layers=False)
    assert "X_vae2" in b.obsm and "vae2_denoised" not in b.layers
    # The values are the model's: the posterior means, expression per 1e4, and expected counts
    # at each cell's own library (rows summing to its total count).
    z = model.get_latent_representation()
    np.testing.assert_array_equal(a.obsm["X_scvae"], z)
    np.testing.assert_array_equal(b.obsm["X_vae2"], z)
    np.testing.assert_allclose(a.layers["scvae_denoised"], model.get_normalized_expression(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.layers["scvae_expected"].sum(1),
                               np.asarray(adata.X.sum(1)).ravel(), rtol=1e-4)


def test_write_to_adata_reorders_genes(trained, tmp_path):
    adata, model = trained
    perm = np.random.default_rng(0).permutation(adata.n_vars)
    a = adata[:, perm].copy()
    model.write_to_adata(a)
    ref = model.get_normalized_expression()
    np.testing.assert_allclose(a.layers["scvae_denoised"], ref[:, perm], rtol=1e-5)
    a.write_h5ad(tmp_path / "out.h5ad")  # uns must be h5ad-writable


def test_write_to_adata_catches_a_single_non_finite_value(trained, monkeypatch):
    """One NaN or inf among the cells × genes values is enough to refuse, before writing."""
    adata, model = trained
    real = model._expression
    for bad in (np.nan, np.inf, -np.inf):
        def one_bad(*args, bad=bad, **kwargs):
            out = real(*args, **kwargs)
            out[7, 3] = bad
            return out
        monkeypatch.setattr(model, "_expression", one_bad)
        a = adata.copy()
        with pytest.raises(ValueError, match="NaN/inf.*nothing was written"):
            model.write_to_adata(a)
        assert not a.layers and "X_scvae" not in a.obsm


def test_save_load_roundtrip(trained, tmp_path):
    adata, model = trained
    model.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="holds a saved model; pass overwrite=True"):
        model.save(tmp_path / "m")
    # overwrite replaces a saved model, never a folder with other files, nor a file
    model.save(tmp_path / "m", overwrite=True)
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not part of a saved model \(notes.txt\)"):
        model.save(tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
    (tmp_path / "m" / "notes.txt").unlink()
    (tmp_path / "f.h5ad").write_text("data")
    with pytest.raises(FileExistsError, match="is a file"):
        model.save(tmp_path / "f.h5ad", overwrite=True)
    (tmp_path / "empty").mkdir()
    model.save(tmp_path / "empty")  # an empty folder is a fine target
    loaded = svt.SCVAE.load(tmp_path / "m", adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  model.get_latent_representation())
    pd.testing.assert_frame_equal(loaded.history, model.history, check_dtype=False)
    with pytest.raises(ValueError, match="lacks 2 of the model's 200 genes"):
        svt.SCVAE.load(tmp_path / "m", adata[:, 2:].copy())


def test_load_gives_back_the_held_out_cells(trained, tmp_path):
    """A loaded model had validation_indices None, so get_elbo(indices=
    model.validation_indices) silently scored every cell, training cells included."""
    adata, model = trained
    model.save(tmp_path / "m")
    loaded = svt.SCVAE.load(tmp_path / "m", adata)
    np.testing.assert_array_equal(loaded.validation_indices, model.validation_indices)
    np.testing.assert_array_equal(loaded.train_indices, model.train_indices)
    held_out = model.get_elbo(indices=model.validation_indices)
    assert loaded.get_elbo(indices=loaded.validation_indices) == held_out
    assert held_out != model.get_elbo()
    # Other cells (here the same in another order, or fewer), or none attached: no split.
    for other in (adata[::-1].copy(), adata[:-1].copy(), None):
        again = svt.SCVAE.load(tmp_path / "m", other)
        assert again.validation_indices is None and again.train_indices is None
    # In config.json, not a file of its own: the previous version's save(overwrite=True)
    # refuses folders with files it does not know.
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json", "history.csv", "model.pt"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["split"]["validation"] = "not base64!"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'split.validation' is not a bit per cell"):
        svt.SCVAE.load(tmp_path / "m", adata)


def test_same_seed_same_latent():
    adata = svt.datasets.synthetic_counts(n_cells=200, n_genes=50, seed=1)
    z = []
    for _ in range(2):
        m = svt.SCVAE(adata, n_latent=3)
        m.train(max_epochs=3, progress_bar=False, seed=7)
        z.append(m.get_latent_representation())
    np.testing.assert_array_equal(z[0], z[1])
    m.train(max_epochs=3, progress_bar=False, seed=8)
    assert not np.array_equal(z[0], m.get_latent_representation())


def test_thread_count_is_recorded_with_the_seed(tmp_path):
    """The CPU result depends on the seed and on torch's thread count (the order of float
    sums): both are recorded in uns and in a saved model."""
    adata = svt.datasets.synthetic_counts(n_cells=200, n_genes=50, seed=1)
    threads = torch.get_num_threads()
    try:
        m = svt.SCVAE(adata, n_latent=3)
        assert m.train_threads is None
        torch.set_num_threads(2)
        m.train(max_epochs=2, progress_bar=False, seed=7)
    finally:
        torch.set_num_threads(threads)
    assert m.train_threads == 2
    m.write_to_adata(adata, layers=False)
    assert adata.uns["scvae"]["torch_threads"] == 2 and adata.uns["scvae"]["seed"] == 7
    m.save(tmp_path / "m")
    assert svt.SCVAE.load(tmp_path / "m").train_threads == 2


@pytest.mark.parametrize("likelihood,dispersion", [("zinb", "gene"), ("poisson", "gene"),
                                                    ("nb", "gene-batch"), ("nb", "gene-cell")])
def test_options_train(likelihood, dispersion, synthetic):
    m = svt.SCVAE(synthetic, batch_key="batch", likelihood=likelihood, dispersion=dispersion,
                  n_latent=4, n_hidden=32)
    m.train(max_epochs=8, progress_bar=False)
    assert m.history["validation_elbo"].iloc[-1] > m.history["validation_elbo"].iloc[0]
    assert np.isfinite(m.get_latent_representation()).all()
    if dispersion == "gene-batch":
        # Each batch's cells fit their own θ column; the two batches share the genes' θ here,
        # so the columns agree gene by gene. Measured (seeds 0, 1): correlation of log θ 0.60,
        # medians 1.32 / 1.24; with every cell read against batch 0's column, batch 1's
        # stays at its initial values (correlation -0.10 to -0.01, median 0.99).
        log_theta = m.module.log_theta.detach().numpy()
        assert np.corrcoef(log_theta[:, 0], log_theta[:, 1])[0, 1] > 0.35
        assert (np.median(log_theta, axis=0) > np.log(1.1)).all()


def test_a_split_without_validation_cells_warns():
    tiny = svt.datasets.synthetic_counts(n_cells=10, n_genes=20, seed=0)
    with pytest.warns(UserWarning, match="train_size=0.95 of 10 cells leaves no validation"):
        svt.SCVAE(tiny, n_latent=2, n_hidden=8).train(max_epochs=1, train_size=0.95,
                                                       batch_size=4, progress_bar=False)


def test_no_cells_to_evaluate_is_an_error_not_a_zero_elbo(trained):
    """After train_size=1.0 the validation set is empty; its ELBO is not 0.0 (a perfect fit)."""
    _, model = trained
    none = np.array([], dtype=np.int64)
    for call in (model.get_elbo, model.get_marginal_ll, model.get_latent_representation,
                 model.get_normalized_expression,
                 lambda indices: svt.diagnostics.posterior_collapse(model, indices=indices)):
        with pytest.raises(ValueError, match="indices is empty: there are no cells"):
            call(indices=none)


def test_zinb_expected_layer_is_the_mean_of_the_zero_inflated_counts(synthetic):
    """Under ZINB, E[x | z] = (1 − π)·ℓ·ρ; ℓ·ρ alone overstates it (on pbmc3k by ~1.6×).
    Checked against the mean of counts drawn from the fitted ZINB at the posterior mean."""
    from scvae_tools.distributions import sample_counts

    m = svt.SCVAE(synthetic, likelihood="zinb", n_latent=4, n_hidden=32)
    m.train(max_epochs=3, progress_bar=False, seed=0)
    a = synthetic.copy()
    m.write_to_adata(a)
    p = m.get_likelihood_parameters()
    assert p["dropout"].mean() > 0.05  # the extra zeros matter here
    np.testing.assert_allclose(a.layers["scvae_expected"], (1 - p["dropout"]) * p["mean"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.get_normalized_expression(library_size="observed"), p["mean"],
                               rtol=1e-4, atol=1e-5)  # the count part, as documented
    torch.manual_seed(0)
    mu, theta = torch.from_numpy(p["mean"][:20]), torch.from_numpy(p["dispersions"][:20])
    logits = torch.logit(torch.from_numpy(p["dropout"][:20]).double()).float()
    draws = torch.stack([sample_counts("zinb", mu, theta, logits)
                         for _ in range(4000)]).mean(0).numpy()
    expected = a.layers["scvae_expected"][:20]
    assert abs(draws.sum() / expected.sum() - 1) < 0.01  # and ℓ·ρ is off by far more
    assert p["mean"][:20].sum() / expected.sum() > 1.05


def test_batch_conditioning_and_transform_batch(synthetic):
    m = svt.SCVAE(synthetic, batch_key="batch", n_latent=4, n_hidden=32)
    m.train(max_epochs=5, progress_bar=False)
    as0 = m.get_normalized_expression(transform_batch="batch0")
    as1 = m.get_normalized_expression(transform_batch="batch1")
    assert not np.allclose(as0, as1)
    # A cell decoded as its own batch is its plain expression; decoded as the other batch it
    # is its z (encoded with its observed batch) under that batch's decoder.
    own = m.get_normalized_expression()
    in0 = (synthetic.obs["batch"] == "batch0").to_numpy()
    np.testing.assert_allclose(as0[in0], own[in0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(as1[~in0], own[~in0], rtol=1e-5, atol=1e-6)
    z = torch.as_tensor(m.get_latent_representation(indices=np.flatnonzero(~in0)))
    as_batch0 = torch.zeros(len(z), dtype=torch.long)
    with torch.no_grad():
        want = 1e4 * m.module.eval().proportions(z, m.module.covariates(as_batch0))
    np.testing.assert_allclose(as0[~in0], want.numpy(), rtol=1e-4, atol=1e-6)
    with pytest.raises(KeyError, match="not a known batch"):
        m.get_normalized_expression(transform_batch="nope")


def test_tl_scvae_one_liner(pbmc68k):
    a = pbmc68k.copy()
    model = svt.tl.scvae(a, n_latent=6, max_epochs=3, progress_bar=False)
    assert isinstance(model, svt.SCVAE) and a.obsm["X_scvae"].shape == (700, 6)
    # The training options reached train(), and what was written is this model's output.
    assert len(model.history) == 3 and model.train_config.max_epochs == 3
    np.testing.assert_array_equal(a.obsm["X_scvae"], model.get_latent_representation(a))
    np.testing.assert_allclose(a.layers["scvae_denoised"], model.get_normalized_expression(a),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="Unknown argument"):
        svt.tl.scvae(a, n_latnet=3)


def test_untrained_model_says_so(synthetic):
    with pytest.raises(RuntimeError, match="train"):
        svt.SCVAE(synthetic).get_latent_representation()


def test_pbmc68k_counts_are_recovered(pbmc68k):
    x = pbmc68k.X.toarray()
    assert np.all(x == np.round(x)) and x.min() >= 0
    # the 765 genes are a subset of the full library: totals below obs.n_counts
    assert np.all(x.sum(1) <= pbmc68k.obs["n_counts"].to_numpy() + 1e-3)


def test_expected_layer_equals_expression_at_observed_library(trained):
    adata, model = trained
    a = adata.copy()
    model.write_to_adata(a)
    np.testing.assert_allclose(a.layers["scvae_expected"],
                               model.get_normalized_expression(library_size="observed"),
                               rtol=1e-4, atol=1e-6)


def test_inference_moves_the_module_only_when_it_is_elsewhere(trained, monkeypatch):
    """``Module.to`` walks every parameter: inference skips it when nothing would move, and
    still moves the module when the model's device differs from its tensors'."""
    _, model = trained
    moves = []  # recorded, not moved: the module is shared with other tests
    monkeypatch.setattr(model.module, "to", lambda *a, **k: moves.append(a) or model.module)
    model.get_latent_representation()
    model.get_elbo()
    assert moves == []
    monkeypatch.setattr(model, "device", torch.device("meta"))
    model._module_on_device()
    assert moves == [(torch.device("meta"),)]


def test_posterior_distribution_and_samples(trained):
    """``return_dist`` gives q(z|x): the means are the latent, the variances those of the
    model's KL, and ``give_mean=False`` draws from exactly that distribution."""
    adata, model = trained
    means, variances = model.get_latent_representation(return_dist=True)
    np.testing.assert_array_equal(means, model.get_latent_representation())
    assert variances.shape == means.shape and (variances > 0).all()
    rows = np.array([5, 1, 3])
    m3, v3 = model.get_latent_representation(indices=rows, return_dist=True)
    np.testing.assert_array_equal(m3, means[rows])
    np.testing.assert_array_equal(v3, variances[rows])
    # They are the posterior the model's KL is computed from: KL(N(m, v) ‖ N(0, 1)).
    kl = 0.5 * (means.astype(np.float64) ** 2 + variances - 1 - np.log(variances))
    np.testing.assert_allclose(kl.mean(0), model.get_kl_per_dimension().to_numpy(), rtol=1e-4)
    few = np.array([2, 7, 11, 40])  # over some cells only, as posterior_collapse allows
    np.testing.assert_allclose(kl[few].mean(0),
                               model.get_kl_per_dimension(indices=few).to_numpy(), rtol=1e-4)
    # Samples: mean and variance of 400 draws match the distribution.
    torch.manual_seed(0)
    draws = np.stack([model.get_latent_representation(indices=rows, give_mean=False)
                      for _ in range(400)])
    np.testing.assert_allclose(draws.mean(0), m3, atol=4 * np.sqrt(v3.max() / 400))
    np.testing.assert_allclose(draws.var(0), v3, rtol=0.25)


def test_to_device_moves_the_model_and_frees_the_data_copy():
    adata = svt.datasets.synthetic_counts(n_cells=200, n_genes=50, n_types=2, seed=0)
    model = svt.SCVAE(adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=2, progress_bar=False, seed=0)
    z, x = model.get_latent_representation(), model.get_normalized_expression()
    assert model._data._device_cache  # evaluation placed the counts on the device
    for bad in ("cuda:7", "meta", "gpu"):  # absent, not a real device, not a name
        with pytest.raises(ValueError, match="device"):
            model.to_device(bad)
        assert model.device == torch.device("cpu")  # a refused move changes nothing
    assert model.to_device("cpu") is model
    assert not model._data._device_cache  # the old device's copy was given back
    assert all(p.device.type == "cpu" for p in model.module.parameters())
    np.testing.assert_array_equal(model.get_latent_representation(), z)
    np.testing.assert_array_equal(model.get_normalized_expression(), x)


def test_likelihood_parameters_match_the_model_and_recover_dispersion():
    """Means are the expected counts; θ follows the dispersion setting and the data."""
    a = svt.datasets.synthetic_counts(n_cells=600, n_genes=80, n_batches=2, seed=0)
    m = svt.SCVAE(a, batch_key="batch", likelihood="zinb", dispersion="gene-batch")
    m.train(max_epochs=5, progress_bar=False, seed=0)
    p = m.get_likelihood_parameters()
    assert set(p) == {"mean", "dispersions", "dropout"}
    assert all(v.shape == (600, 80) and v.dtype == np.float32 for v in p.values())
    np.testing.assert_allclose(p["mean"], m.get_normalized_expression(library_size="observed"),
                               rtol=1e-4, atol=1e-6)
    theta = np.exp(m.module.log_theta.detach().numpy())  # genes × batches
    codes = a.obs["batch"].cat.codes.to_numpy()
    np.testing.assert_allclose(p["dispersions"], theta[:, codes].T, rtol=1e-5)
    assert (p["dropout"] > 0).all() and (p["dropout"] < 1).all()
    rows = np.array([5, 1, 300])
    sub = m.get_likelihood_parameters(indices=rows)
    np.testing.assert_allclose(sub["dropout"], p["dropout"][rows], rtol=1e-5)
    drawn = m.get_likelihood_parameters(indices=rows, give_mean=False)
    assert not np.allclose(drawn["mean"], sub["mean"])  # one z sample, not the mean
    assert set(svt.SCVAE(a, likelihood="poisson").train(max_epochs=1, progress_bar=False)
               .get_likelihood_parameters(indices=rows)) == {"mean"}

    # θ fitted to counts simulated with θ = 1 is near 1, and larger for θ = 20.
    fitted = []
    for true_theta in (1.0, 20.0):
        b = svt.datasets.synthetic_counts(n_cells=1500, n_genes=100, n_types=3, seed=0,
                                          theta=true_theta)
        nb = svt.SCVAE(b).train(max_epochs=40, progress_bar=False, seed=0)
        fitted.append(np.median(nb.get_likelihood_parameters(indices=np.arange(3))["dispersions"]))
    assert 0.7 < fitted[0] < 1.4 and fitted[1] > 1.5 * fitted[0], fitted


def test_per_gene_dispersion_is_learned_within_the_default_schedule():
    """Half the genes simulated with θ = 0.5, half with θ = 8: the default training run
    (50 epochs here) tells them apart. With the networks' learning rate for θ (before
    ``dispersion_lr_factor``) the θ = 8 genes stopped at 2.7, where this asserts > 4."""
    rng = np.random.default_rng(0)
    n, g = 2000, 200
    types = rng.integers(0, 4, n)
    logits = rng.normal(0, 1.5, (4, g))[types]
    p = np.exp(logits - logits.max(1, keepdims=True))
    mu = p / p.sum(1, keepdims=True) * rng.lognormal(np.log(2000), 0.3, n)[:, None]
    theta = np.where(np.arange(g) < g // 2, 0.5, 8.0)
    x = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
    model = svt.SCVAE(ad.AnnData(x), n_latent=4, n_hidden=64)
    model.train(progress_bar=False, seed=0)
    assert model.train_config.dispersion_lr_factor == 10.0
    fitted = np.exp(model.module.log_theta.detach().numpy())
    low, high = np.median(fitted[: g // 2]), np.median(fitted[g // 2:])
    assert 0.35 < low < 0.7 and high > 4 and high / low > 8, (low, high)


@pytest.mark.parametrize("library_size, n_samples", [(1e4, 1), ("observed", 1), (1e4, 3)])
def test_expression_for_some_cells_and_genes(library_size, n_samples):
    """indices= and gene_list= give exactly the rows and columns of the full result, each
    cell still normalised over all genes."""
    a = svt.datasets.synthetic_counts(n_cells=300, n_genes=40, n_batches=2, seed=0)
    m = svt.SCVAE(a, batch_key="batch", n_latent=4, n_hidden=32)
    m.train(max_epochs=2, progress_bar=False)
    rows, genes = np.array([250, 3, 17, 3]), [a.var_names[7], a.var_names[0], a.var_names[31]]

    def expr(**kw):
        torch.manual_seed(0)  # n_samples > 1 draws z
        return m.get_normalized_expression(library_size=library_size, n_samples=n_samples,
                                           batch_size=64, **kw)

    full = expr()
    cols = [7, 0, 31]
    np.testing.assert_allclose(expr(gene_list=genes), full[:, cols], rtol=1e-6)
    if n_samples == 1:  # draws follow the batches, so only the posterior mean matches by row
        np.testing.assert_allclose(expr(indices=rows), full[rows], rtol=1e-6)
        np.testing.assert_allclose(expr(indices=rows, gene_list=genes), full[rows][:, cols],
                                   rtol=1e-6)
        buf = np.empty((4, 3), dtype=np.float32)
        assert expr(indices=rows, gene_list=genes, out=buf) is buf
    np.testing.assert_allclose(expr(gene_list=a.var_names[5]), full[:, [5]], rtol=1e-6)
    np.testing.assert_allclose(
        m.get_latent_representation(indices=rows), m.get_latent_representation()[rows])
    with pytest.raises(KeyError, match=r"Genes not in the model: \['nope'\]"):
        m.get_normalized_expression(gene_list=["nope", genes[0]])
    with pytest.raises(ValueError, match=r"its shape is \(300, 40\), not \(cells, genes\) = \(300, 3\)"):
        m.get_normalized_expression(gene_list=genes, out=np.empty((300, 40), np.float32))


@pytest.mark.filterwarnings("ignore:.*latent dimensions are collapsed")
def test_bad_indices_are_named():
    a = svt.datasets.synthetic_counts(n_cells=100, n_genes=20, seed=0)
    m = svt.SCVAE(a, n_latent=2, n_hidden=8).train(max_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match=r"lie in \[0, 100\).*from 0 to 100"):
        m.get_latent_representation(indices=[0, 100])
    # a boolean mask over the cells, as scanpy users write them, selects those cells
    mask = np.arange(100) % 3 == 0
    np.testing.assert_array_equal(m.get_latent_representation(indices=mask),
                                  m.get_latent_representation()[mask])
    with pytest.raises(ValueError, match=r"one value per cell \(100\), got shape \(99,\)"):
        m.get_normalized_expression(indices=np.ones(99, bool))
    with pytest.raises(TypeError, match="transform_batch takes one batch"):
        m.get_normalized_expression(transform_batch=["a", "b"])
    with pytest.raises(ValueError, match="1-D array of row numbers"):
        m.get_elbo(indices=np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"lie in \[0, 100\)"):
        m.get_marginal_ll(indices=[-1], n_samples=2)


@pytest.mark.parametrize("setting, encoder, decoder", [
    ("both", 1, 1), ("encoder", 1, 0), ("decoder", 0, 1), ("none", 0, 0), (False, 0, 0)])
def test_batch_norm_in_either_network_as_scvi_tools(setting, encoder, decoder, tmp_path):
    adata = svt.datasets.synthetic_counts(n_cells=150, n_genes=20, seed=0)
    model = svt.SCVAE(adata, n_latent=2, n_hidden=8, use_batch_norm=setting)
    count = [sum(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules())
             for net in (model.module.encoder, model.module.decoder)]
    assert count == [encoder, decoder]
    model.train(max_epochs=2, batch_size=32, progress_bar=False, seed=0)
    model.save(tmp_path / "m")
    again = svt.SCVAE.load(tmp_path / "m", adata)
    np.testing.assert_array_equal(again.get_latent_representation(),
                                  model.get_latent_representation())


def test_batch_norm_setting_is_checked():
    adata = svt.datasets.synthetic_counts(n_cells=50, n_genes=10, seed=0)
    for bad in ("layer", 1, 1.0):  # 1 == True: it trained, then could not be loaded
        with pytest.raises(ValueError, match="use_batch_norm must be 'both', 'encoder'"):
            svt.SCVAE(adata, use_batch_norm=bad)
    assert svt.SCVAE(adata, use_batch_norm=np.True_).module_config.use_batch_norm is True


def test_the_restored_epoch_is_recorded_and_reported(tmp_path):
    """Only epochs after the KL warm-up can be restored; the CLI named the best epoch over
    all rows (one of the warm-up's) as "the weights kept"."""
    from scvae_tools.cli import _summary

    adata = svt.datasets.synthetic_counts(n_cells=300, n_genes=30, seed=1)
    model = svt.SCVAE(adata, n_latent=3)
    model.train(max_epochs=6, kl_warmup_epochs=3, lr=0.03, lr_schedule="constant",
                early_stopping_patience=3, progress_bar=False, seed=0)
    restored = model.history.attrs["restored_epoch"]
    assert restored >= 3
    assert f"at epoch {restored} (the weights kept)" in _summary(model)
    model.save(tmp_path / "m")  # a CSV drops the attrs: config.json carries the epoch
    assert svt.SCVAE.load(tmp_path / "m").history.attrs["restored_epoch"] == restored
    model.write_to_adata(adata, layers=False)
    assert adata.uns["scvae"]["restored_epoch"] == restored
    model.train(max_epochs=3, kl_warmup_epochs=5, progress_bar=False, seed=0)  # never restores
    assert model.history.attrs["restored_epoch"] is None
    assert "weights kept" not in _summary(model)
    model.save(tmp_path / "m", overwrite=True)
    assert "restored_epoch" not in svt.SCVAE.load(tmp_path / "m").history.attrs


def test_numpy_integers_are_whole_numbers_and_fractions_are_not():
    adata = svt.datasets.synthetic_counts(n_cells=100, n_genes=20, seed=0)
    model = svt.SCVAE(adata, n_latent=2)
    for seed in np.arange(2):  # a seed from np.arange used to crash in torch
        model.train(max_epochs=np.int64(2), validation_every=np.int64(1), seed=seed,
                    progress_bar=False)
    for bad in ({"max_epochs": 2.7}, {"batch_size": 64.0}, {"early_stopping_patience": 2.5}):
        with pytest.raises(TypeError, match="whole number"):
            model.train(progress_bar=False, **bad)
    with pytest.raises(ValueError, match="lr must be a positive finite"):
        model.train(max_epochs=1, lr=float("inf"), progress_bar=False)


def test_weights_broken_by_an_epochs_last_step_are_not_kept_as_good():
    """The end-of-epoch check looked at the losses only: weights made inf by the epoch's
    last step were snapshotted as the state every rollback returned to."""
    adata = svt.datasets.synthetic_counts(n_cells=300, n_genes=30, seed=1)
    model = svt.SCVAE(adata, n_latent=3)
    with pytest.raises(FloatingPointError, match="the last finite state \\(the initial weights\\)"):
        model.train(max_epochs=5, lr=1e39, lr_schedule="constant", batch_size=1000,
                    train_size=1.0, progress_bar=False)
    assert not model.is_trained


def test_scoring_validation_cells_does_not_change_training():
    """evaluate() draws z; it drew them from the global generator that training samples
    with, so validation_every=1 and =4 trained different models from the same seed."""
    adata = svt.datasets.synthetic_counts(n_cells=300, n_genes=30, seed=1)
    latents = []
    for every in (1, 4):
        model = svt.SCVAE(adata, n_latent=3)
        model.train(max_epochs=4, validation_every=every, early_stopping=False, seed=0,
                    progress_bar=False)
        latents.append(model.get_latent_representation())
    np.testing.assert_array_equal(latents[0], latents[1])
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    model.get_elbo()  # evaluation leaves the caller's random state alone
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())


def test_cached_encoder_weights_follow_fused_adam_steps(synthetic):
    """Inference keeps a genes × hidden copy of the first layer, keyed on the weight's
    version counter, which fused Adam does not bump: scoring the validation cells with
    that copy froze the validation ELBO at its first value (early stopping then kept
    epoch ~11 of 100). Evaluation now drops the copy first."""
    model = svt.SCVAE(synthetic, n_latent=3, batch_key="batch")
    model.train(max_epochs=2, progress_bar=False, seed=0)
    module = model.module
    model.get_latent_representation()  # fills the copy
    optim = torch.optim.Adam(module.parameters(), lr=0.05, fused=True)
    x = torch.as_tensor(synthetic.X[:64].toarray())
    cov = module.covariates(torch.zeros(64, dtype=torch.long), None, None)
    module.train()
    module.encode(x, cov)[0].pow(2).sum().backward()
    optim.step()
    module.eval()
    model.get_elbo()  # an evaluation, as training's validation
    with torch.no_grad():
        cached = module.encode(x, cov)[0]
    fresh = module.encode(x, cov)[0].detach()  # with gradients: no copy used
    torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-5)


def test_building_a_model_leaves_the_callers_random_state_alone(synthetic):
    """SCVAE() drew its (untrained) initial weights from the caller's generator, so merely
    constructing a model changed what the user's next torch.rand gave."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = svt.SCVAE(synthetic, n_latent=3)
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())
    second = svt.SCVAE(synthetic, n_latent=3)  # and untrained models do not depend on it
    for a, b in zip(first.module.parameters(), second.module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tl_scvae_refuses_what_it_could_not_write_before_training(tmp_path, monkeypatch):
    """tl.scvae trained fully, then failed in write_to_adata (a path; dense layers too large
    for a backed file), throwing the fit away."""
    import scvae_tools.model as model_mod

    a = svt.datasets.synthetic_counts(n_cells=120, n_genes=20, seed=0)
    a.write_h5ad(tmp_path / "a.h5ad")
    monkeypatch.setattr(svt.SCVAE, "train", lambda *args, **kw: pytest.fail("trained"))
    with pytest.raises(ValueError, match="svt.tl.scvae writes .*not a path.*write_h5ad_backed"):
        svt.tl.scvae(str(tmp_path / "a.h5ad"), max_epochs=1)
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    monkeypatch.setattr(model_mod, "DENSE_LIMIT_BYTES", 1000)
    with pytest.raises(ValueError, match="pass layers=False"):
        svt.tl.scvae(backed, max_epochs=1)
    backed.file.close()


def test_batch_options_without_a_batch_key_say_so():
    """A batch given as a categorical covariate: transform_batch said "choose from []", and
    DE's batch_correction=True silently did nothing."""
    a = svt.datasets.synthetic_counts(n_cells=200, n_genes=30, n_batches=2, seed=0)
    model = svt.SCVAE(a, n_latent=3, n_hidden=16, categorical_covariate_keys=["batch"])
    model.train(max_epochs=2, progress_bar=False)
    with pytest.raises(ValueError, match="needs a model trained with batch_key="):
        model.get_normalized_expression(transform_batch="batch0")
    with pytest.warns(UserWarning, match="batch_correction=True has no effect"):
        model.differential_expression(a, "cell_type", "type0", n_samples=20,
                                      batch_correction=True)


def test_warm_start_continues_from_the_current_weights(tmp_path):
    """train(warm_start=True) trains a loaded model further, as scvi-tools' train() does:
    its first epoch starts where the saved model was (a fresh start is far worse), with no
    KL warm-up, reproducibly; a failed run leaves the weights as they were."""
    a = svt.datasets.synthetic_counts(n_cells=400, n_genes=60, seed=0)
    svt.SCVAE(a, n_latent=4).train(max_epochs=8, progress_bar=False, seed=0).save(tmp_path / "m")
    saved_elbo = svt.SCVAE.load(tmp_path / "m", a).get_elbo()
    runs = []
    for _ in range(2):
        model = svt.SCVAE.load(tmp_path / "m", a)
        model.train(max_epochs=3, progress_bar=False, seed=1, warm_start=True)
        runs.append(model)
    fresh = svt.SCVAE(a, n_latent=4).train(max_epochs=3, progress_bar=False, seed=1)
    warm = runs[0].history
    assert (warm["beta"] == 1.0).all() and runs[0].train_config.warm_start
    assert abs(warm["train_elbo"].iloc[0] - saved_elbo) < 0.02 * abs(saved_elbo)
    assert warm["train_elbo"].iloc[0] > fresh.history["train_elbo"].iloc[0] + 20
    assert runs[0].get_elbo() > saved_elbo - 1.0
    np.testing.assert_array_equal(runs[0].get_latent_representation(),
                                  runs[1].get_latent_representation())
    before = {k: v.clone() for k, v in runs[0].module.state_dict().items()}
    with pytest.raises(FloatingPointError):
        runs[0].train(max_epochs=2, lr=1e39, lr_schedule="constant", batch_size=1000,
                      train_size=1.0, progress_bar=False, warm_start=True)
    for k, v in runs[0].module.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="has none yet"):
        svt.SCVAE(a, n_latent=4).train(max_epochs=1, warm_start=True, progress_bar=False)
