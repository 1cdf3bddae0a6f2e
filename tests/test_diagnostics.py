"""VAE diagnostics: each test checks that a diagnostic measures what it claims, on data."""

from __future__ import annotations

import copy
import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

import scvae_tools as svt
from scvae_tools.module import VAE

matplotlib.use("Agg")

SMALL = {"n_latent": 4, "n_hidden": 32}


def _train(adata, epochs=30, seed=0, batch_size=32, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # collapse warnings are tested separately
        model = svt.SCVAE(adata, **(SMALL | kwargs))
        # Small batches: enough optimiser steps in few epochs on a few hundred cells.
        model.train(max_epochs=epochs, seed=seed, batch_size=batch_size, progress_bar=False)
    return model


@pytest.fixture(scope="module")
def factors():
    """400 cells × 120 genes driven by 2 independent factors of 20 genes each."""
    return svt.datasets.synthetic_factors(n_cells=400, n_genes=120, n_factors=2,
                                          genes_per_factor=20, effect=2.0, seed=0)


@pytest.fixture(scope="module")
def trained(factors):
    return _train(factors, epochs=30)


# ---------------------------------------------------------------------- 1. rate–distortion
def test_rate_falls_as_beta_grows(factors):
    sweep = svt.tl.rate_distortion_sweep(factors, betas=(0.5, 2, 8), max_epochs=15,
                                         batch_size=32, n_samples=10, **SMALL)
    print(sweep.to_string())
    assert list(sweep.columns[:6]) == ["beta", "rate", "distortion", "elbo", "active_units",
                                       "marginal_ll"]
    assert (sweep["evaluated_on"] == "validation").all()
    assert np.all(np.diff(sweep["rate"]) < 0), "rate must fall as β grows"
    assert sweep["distortion"].iloc[-1] > sweep["distortion"].iloc[0]
    np.testing.assert_allclose(sweep["elbo"], -sweep["rate"] - sweep["distortion"])
    # IWAE with 10 samples is a tighter bound than the one-sample ELBO.
    assert (sweep["marginal_ll"] > sweep["elbo"] - 1.0).all()


def test_rate_distortion_sweep_rejects_bad_input(factors):
    with pytest.raises(TypeError, match="betas="):
        svt.tl.rate_distortion_sweep(factors, beta=2)
    with pytest.raises(ValueError, match="non-negative"):
        svt.tl.rate_distortion_sweep(factors, betas=(-1,))
    with pytest.raises(TypeError, match="Unknown argument"):
        svt.tl.rate_distortion_sweep(factors, betas=(1,), n_latnt=3)


# ---------------------------------------------------------------------- 2. collapse
def test_collapse_detected_and_free_bits_keep_units_active(factors):
    with pytest.warns(UserWarning, match="collapse"):
        collapsed = svt.SCVAE(factors, beta=50.0, **SMALL)
        torch.set_num_threads(1)
        collapsed.train(max_epochs=20, batch_size=32, kl_warmup_epochs=0, progress_bar=False)
    table = svt.tl.posterior_collapse(collapsed)
    assert svt.tl.active_units(collapsed) == 0
    assert not table["active"].any()
    assert (table["kl"] < 0.05).all()

    kept = _train(factors, epochs=20, beta=50.0, free_bits=1.0)
    kept_table = svt.tl.posterior_collapse(kept)
    print("KL per dim, beta=50:", table["kl"].round(3).tolist(),
          "with free bits 1.0:", kept_table["kl"].round(3).tolist())
    assert svt.tl.active_units(kept) >= 2
    assert kept_table["kl"].sum() > 10 * table["kl"].sum()

    healthy_model = _train(factors, epochs=20)
    healthy = svt.tl.posterior_collapse(healthy_model)
    assert healthy["active"].sum() >= 2  # the 2 true factors need at least 2 axes

    # A collapsed model's aggregated posterior is the prior: no KL between them, no holes.
    flat = svt.tl.aggregated_posterior(collapsed, n_samples=1000)
    used = svt.tl.aggregated_posterior(healthy_model, n_samples=1000)
    print("KL(q(z)||p(z)) collapsed", flat["kl_aggregated_prior"], "healthy", used["kl_aggregated_prior"],
          "hole fraction", flat["hole_fraction"], used["hole_fraction"])
    assert abs(flat["kl_aggregated_prior"]) < 0.1 and flat["hole_fraction"] < 0.05
    assert used["kl_aggregated_prior"] > 0.5 and used["hole_fraction"] > 2 * flat["hole_fraction"]


# ---------------------------------------------------------------------- 3. variational gap
def test_iwae_never_below_elbo_and_grows_with_k(trained, factors):
    adata = factors.copy()
    means = {}
    for k in (1, 5, 50):
        res = svt.tl.variational_gap(trained, adata, n_samples=k, key_added=f"k{k}", seed=1)
        assert (res["log_px_iw"] >= res["elbo"]).all()
        assert (adata.obs[f"k{k}_variational_gap"] >= 0).all()
        means[k] = res["log_px_iw"].mean()
        if k == 1:  # one sample: the bound is the ELBO
            np.testing.assert_allclose(res["log_px_iw"], res["elbo"], atol=1e-6)
    print("mean IWAE by K:", means)
    assert means[1] < means[5] < means[50]
    # Agrees with the model's own importance-sampling estimate.
    assert abs(means[50] - trained.get_marginal_ll(n_samples=50)) < 1.0


@pytest.mark.parametrize("options", [
    {"likelihood": "nb"}, {"likelihood": "zinb"}, {"likelihood": "poisson"},
    {"likelihood": "nb", "prior": "mog", "n_prior_components": 3},
], ids=["nb", "zinb", "poisson", "nb-mog"])
def test_marginal_ll_and_elbo_equal_their_exact_values_by_quadrature(factors, options):
    """With one latent dimension, log p(x) = log ∫ p(x|z) p(z) dz and the ELBO
    E_q[log p(x|z)] − KL(q ‖ p) can be computed on a grid of z, without sampling. The
    model's estimates must converge to them: get_marginal_ll (IWAE, 5,000 draws) within
    its Monte Carlo noise of log p(x) wherever q(z|x) covers the posterior, and the mean of get_elbo over 40 seeds within its
    standard error of the exact mean ELBO. The KL term equals its integral (closed form;
    a learned mixture's Monte Carlo KL in the mean), and the prior integrates to 1."""
    model = _train(factors[:200], epochs=15, n_latent=1, n_hidden=16, **options)
    cells = np.arange(12)
    module = model.module.eval()
    batch = next(model._data_for(None).batches(cells, batch_size=len(cells)))
    grid = torch.linspace(-12.0, 12.0, 4801)
    dz = float(grid[1] - grid[0])
    with torch.inference_mode():
        cov = module.covariates(batch.batch_index, batch.cat_covs, batch.cont_covs)
        qz_m, qz_v = module.encode(batch.x, cov)
        log_joint = []
        for chunk in grid.split(400):
            z = chunk[:, None, None].expand(len(chunk), len(cells), 1)
            params = module.decode_for_likelihood(z, batch.library, cov, batch.batch_index)
            log_prior = (module.prior_log_prob(z).double() if options.get("prior") else
                         -0.5 * (z[..., 0].double() ** 2 + np.log(2 * np.pi)))  # N(0, 1)
            log_joint.append(module.log_px(batch.x, params).double() + log_prior)
        log_joint = torch.cat(log_joint)  # grid points × cells
        log_px_exact = torch.logsumexp(log_joint, 0) + np.log(dz)
        # a learned prior must be a density: it integrates to 1 over the grid
        total = torch.logsumexp(module.prior_log_prob(grid[:, None]).double(), 0) + np.log(dz)
        assert abs(float(total)) < 1e-4
        # q(z|x) on the grid: E_q[log p(x, z) − log q(z|x)], the ELBO without sampling
        zq = grid.double()[:, None]
        log_q = -0.5 * ((zq - qz_m.double().T) ** 2 / qz_v.double().T
                        + torch.log(2 * np.pi * qz_v.double().T))
        elbo_exact = (log_q.exp() * (log_joint - log_q)).sum(0) * dz
        log_prior = module.prior_log_prob(grid[:, None]).double()[:, None]
        kl_exact = (log_q.exp() * (log_q - log_prior)).sum(0) * dz
        if options.get("prior"):  # a Monte Carlo KL: its mean over draws
            z = qz_m + qz_v.sqrt() * torch.randn(4000, *qz_m.shape,
                                                 generator=torch.Generator().manual_seed(0))
            kl = module.kl_per_dim(qz_m.expand_as(z), qz_v.expand_as(z), z)[0].double().mean(0)
            torch.testing.assert_close(kl, kl_exact, rtol=0, atol=0.05)
        else:  # the closed form
            torch.testing.assert_close(module.kl_per_dim(qz_m, qz_v)[0].double(), kl_exact,
                                       rtol=0, atol=1e-3)
        # χ²(p(z|x) ‖ q) = ∫ p(z|x)²/q dz − 1: the importance weights' relative variance.
        log_post = log_joint - log_px_exact
        chi2 = (torch.logsumexp(2 * log_post - log_q, 0) + np.log(dz)).exp() - 1
    # Where q covers the posterior (χ² < 1) K draws estimate log p(x) to ~sqrt(χ²/K); an
    # error in the weights (log q, −log K, the prior) would be off by a nat or more. Where
    # q misses it (an undertrained encoder), IWAE is a loose lower bound: heavy-tailed
    # weights, nothing to compare tightly.
    # Everywhere: the mean of the weights is an unbiased estimate of p(x), so (Markov) it
    # exceeds p(x)·e^t with probability below e^-t: t = 6 nats, not a chance in 400.
    n_draws = 5000
    iwae = model.get_marginal_ll(indices=cells, n_samples=n_draws, return_per_cell=True)
    assert (iwae < log_px_exact.numpy() + 6.0).all()
    covered = chi2.numpy() < 1.0
    if options["likelihood"] == "nb":  # after 15 epochs its encoder covers most cells
        assert covered.sum() >= 3, chi2
    err = np.abs(iwae - log_px_exact.numpy())[covered]
    assert (err < 5 * np.sqrt(chi2.numpy()[covered] / n_draws) + 0.01).all(), (err, chi2)
    assert (elbo_exact.numpy() <= log_px_exact.numpy() + 1e-6).all()
    draws = np.array([model.get_elbo(indices=cells, seed=s) for s in range(40)])
    se = draws.std() / np.sqrt(len(draws))
    assert abs(draws.mean() - float(elbo_exact.mean())) < 4 * se + 0.02


def test_counts_and_sizes_of_the_diagnostics_are_checked(trained, factors):
    """Arguments that computed something else, silently, or failed inside numpy or torch:
    2.5 importance samples drew two and normalised by log 2.5; a negative library size gave
    NaN expression; a NaN latent was binned as a level of its own."""
    a = factors[:20].copy()
    for call, message in [
        (lambda: svt.tl.variational_gap(trained, a, n_samples=2.5), "n_samples must be a positive integer, got 2.5"),
        (lambda: svt.tl.amortization_gap(trained, a, n_steps=2.0), "n_steps must be a positive integer"),
        (lambda: svt.tl.amortization_gap(trained, a, n_mc=2.5), "n_mc must be a positive integer"),
        (lambda: svt.tl.aggregated_posterior(trained, max_cells=0), "max_cells must be a positive integer"),
        (lambda: svt.tl.latent_traversal(trained, dim=0, library_size=-1), "library_size must be a positive number"),
        (lambda: svt.tl.latent_traversal(trained, dim=0, values=[]), "values must be one or more finite"),
        (lambda: svt.tl.latent_traversal(trained, dim=[]), "dim is empty"),
        (lambda: svt.tl.latent_traversal(trained, dim=0, n_steps=2.5), "n_steps must be a positive integer"),
        (lambda: svt.tl.mutual_information_gap(np.array([[np.nan, 1], [1, 2], [2, 3]]), np.array([0, 1, 0])),
         "non-finite values in 1 cells"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()
    assert list(a.obs.columns) == ["factor0", "factor1"]  # nothing written


def test_variational_gap_needs_adata(trained, factors, tmp_path):
    with pytest.raises(ValueError, match="adata"):
        svt.tl.variational_gap(trained, None)
    path = tmp_path / "f.h5ad"
    factors.write_h5ad(path)
    for fn in (svt.tl.variational_gap, svt.tl.amortization_gap):  # crashed after the work
        with pytest.raises(ValueError, match="needs an AnnData"):
            fn(trained, path)
    with pytest.raises(ValueError, match="key_added must be a non-empty string"):
        svt.tl.variational_gap(trained, factors.copy(), key_added="")
    with pytest.raises(ValueError, match="pass key_added=None"):
        svt.tl.aggregated_posterior(trained, path)
    # A path is read from the file and gives what the same cells in memory give (seeded);
    # a third of the training cells, so that the training data would not do.
    part = factors[::3].copy()
    part.write_h5ad(tmp_path / "part.h5ad")
    on_disk = svt.tl.aggregated_posterior(trained, tmp_path / "part.h5ad", key_added=None,
                                          n_samples=50)
    in_memory = svt.tl.aggregated_posterior(trained, part, key_added=None, n_samples=50)
    assert len(on_disk["posterior_means"]) == part.n_obs
    assert np.isfinite(on_disk["kl_aggregated_prior"])
    assert on_disk["kl_aggregated_prior"] == pytest.approx(in_memory["kl_aggregated_prior"],
                                                           rel=1e-5)
    assert on_disk["hole_fraction"] == in_memory["hole_fraction"]
    np.testing.assert_allclose(on_disk["posterior_means"], in_memory["posterior_means"],
                               rtol=1e-5, atol=1e-6)


def test_estimates_are_seeded_and_leave_the_callers_random_state(trained, factors):
    """get_marginal_ll drew from the global generator (two calls, two values); train()
    (and so the β sweep) reseeded the caller's generator for good."""
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    first = trained.get_marginal_ll(n_samples=10)
    assert trained.get_marginal_ll(n_samples=10) == first
    assert trained.get_marginal_ll(n_samples=10, seed=1) != first
    trained_copy = copy.deepcopy(trained)
    trained_copy.train(max_epochs=1, progress_bar=False, seed=0)
    torch.testing.assert_close(torch.rand(4), expected)
    # seed=None: drawn from the caller's generator, which then moves on
    assert trained.get_elbo(seed=None) != trained.get_elbo(seed=None)
    assert trained.get_elbo() == trained.get_elbo()
    after = []
    for seed in (1, 2):  # building a model draws its initial weights, as in torch; no reseed
        torch.manual_seed(seed)
        svt.tl.rate_distortion_sweep(factors, betas=(1.0,), max_epochs=1, **SMALL)
        after.append(torch.rand(4))
    assert not torch.equal(*after)
    for seed in (None, 0):  # seed=None crashed both
        assert trained.sample(5, seed=seed).n_obs == 5
        svt.tl.aggregated_posterior(trained, n_samples=20, seed=seed)


def test_sample_blocks_stay_bounded(trained, factors, monkeypatch):
    """Posterior samples are decoded a few at a time, however many genes: the IWAE bound,
    the variational gap and the amortization gap held 25 or 16 samples × cells × genes
    (5–8 GB at 512 cells × 32,738 genes), and the results do not depend on the blocks."""
    import scvae_tools.module as module_mod

    cells = 64
    full = (trained.get_marginal_ll(n_samples=12, batch_size=cells),
            svt.tl.variational_gap(trained, factors.copy(), n_samples=12, batch_size=cells),
            svt.tl.amortization_gap(trained, factors.copy(), n_steps=4, eval_every=2,
                                    batch_size=cells))
    seen = []
    real = VAE.decode

    def decode(self, z, *args, **kwargs):
        seen.append(z.shape[0] * z.shape[1] if z.dim() == 3 else z.shape[0])  # samples × cells
        return real(self, z, *args, **kwargs)

    monkeypatch.setattr(VAE, "decode", decode)
    monkeypatch.setattr(module_mod, "BLOCK_VALUES", 3 * cells * factors.n_vars)
    blocked = (trained.get_marginal_ll(n_samples=12, batch_size=cells),
               svt.tl.variational_gap(trained, factors.copy(), n_samples=12, batch_size=cells),
               svt.tl.amortization_gap(trained, factors.copy(), n_steps=4, eval_every=2,
                                       batch_size=cells))
    assert 0 < max(seen) <= 3 * cells
    # The same draws in other blocks: equal up to float32 sums (the refinement amplifies
    # round-off a little over its steps).
    assert abs(blocked[0] - full[0]) < 1e-3 * abs(full[0])
    np.testing.assert_allclose(blocked[1].to_numpy(), full[1].to_numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(blocked[2].to_numpy(), full[2].to_numpy(), rtol=1e-3, atol=0.05)


# ---------------------------------------------------------------------- 4. amortization gap
def _retrain_encoder(model, epochs: int, seed: int = 0):
    """A copy of ``model`` with a fresh encoder trained ``epochs`` epochs on the frozen decoder."""
    new = copy.copy(model)
    new.module = copy.deepcopy(model.module)
    torch.manual_seed(seed)
    new.module.encoder.load_state_dict(VAE(model.module_config).encoder.state_dict())
    for name, p in new.module.named_parameters():
        p.requires_grad_(name.startswith("encoder."))
    opt = torch.optim.Adam(new.module.encoder.parameters(), lr=1e-3, eps=1e-2)
    data = new._require_data()
    gen = torch.Generator().manual_seed(seed)
    new.module.train()
    new.module.decoder.eval()  # frozen decoder: its BatchNorm statistics stay as trained
    for _ in range(epochs):
        for b in data.batches(model.train_indices, 64, shuffle=True, generator=gen,
                              drop_singleton=True):
            t = new.module.elbo_terms(b.x, b.library, b.batch_index, b.cat_covs, b.cont_covs)
            loss = new.module.loss(t)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in new.module.parameters():
        p.requires_grad_(True)
    new.module.eval()
    return new


def test_amortization_gap_nonnegative_and_shrinks_with_encoder_training(trained, factors):
    cells = factors[:120].copy()
    gaps = {}
    for epochs in (1, 40):
        model = _retrain_encoder(trained, epochs)
        res, latents = svt.tl.amortization_gap(model, cells, n_steps=60, return_latents=True,
                                               key_added=f"e{epochs}")
        # Reported on fresh draws: a cell's gap can dip below 0 by noise, but only a little
        print("smallest gap per cell:", res["amortization_gap"].min())
        assert (res["amortization_gap"] > -0.5).all() and res["amortization_gap"].mean() > 0
        assert latents.shape == (cells.n_obs, trained.n_latent)
        gaps[epochs] = res["amortization_gap"].mean()
    print("mean amortization gap by encoder epochs:", gaps)
    assert gaps[40] < gaps[1]
    assert "e40_amortization_gap" in cells.obs
    # The diagnostic leaves the model's weights alone.
    before = {k: v.clone() for k, v in trained.module.state_dict().items()}
    svt.tl.amortization_gap(trained, cells, n_steps=5)
    assert all(torch.equal(before[k], v) for k, v in trained.module.state_dict().items())
    assert all(p.requires_grad for p in trained.module.parameters())


# ---------------------------------------------------------------------- 5. holes, sampling, learned prior
def test_aggregated_posterior_and_sampling(trained, factors):
    adata = factors.copy()
    res = svt.tl.aggregated_posterior(trained, adata, n_samples=500)
    assert res["kl_aggregated_prior"] > 0
    assert 0 <= res["hole_fraction"] <= 1
    assert res["prior_samples"].shape == (500, trained.n_latent)
    assert adata.uns["scvae_aggregated_posterior"]["hole_fraction"] == res["hole_fraction"]
    # Draws from q(z) are, by construction of the threshold, rarely in holes.
    assert (res["posterior_log_q"] < res["hole_threshold"]).mean() <= 0.02

    for source in ("prior", "aggregated"):
        gen = trained.sample(60, source=source, seed=3)
        assert gen.shape == (60, factors.n_vars)
        assert list(gen.var_names) == list(factors.var_names)
        x = gen.X.toarray()
        assert (x >= 0).all() and np.array_equal(x, np.round(x))
        assert (gen.obs["source"] == source).all()
        assert gen.obsm["X_latent"].shape == (60, trained.n_latent)
    again = trained.sample(60, source="aggregated", seed=3)
    assert np.array_equal(again.X.toarray(), gen.X.toarray())  # seeded
    # Aggregated: each z is a draw from its template cell's q(z|x), so (z − mean) / s.d. is
    # standard normal; prior: z itself is. Measured on 60 × 4 values, seeds 3-6: means
    # within ±0.07, variances 0.96-1.03 (the variance's s.d. is ≈ 0.09 for n = 240); drawing
    # with the variance for the s.d. gives 0.11-0.14, prior draws for "aggregated" far more.
    means, variances = trained.get_latent_representation(return_dist=True)
    rows = factors.obs_names.get_indexer(gen.obs["template_cell"])
    assert (rows >= 0).all()
    np.testing.assert_allclose(gen.obs["library"], np.asarray(factors.X.sum(1)).ravel()[rows],
                               rtol=1e-5)
    std = (gen.obsm["X_latent"] - means[rows]) / np.sqrt(variances[rows])
    prior = trained.sample(60, source="prior", seed=3).obsm["X_latent"]
    for name, draws in (("aggregated", std), ("prior", prior)):
        assert abs(draws.mean()) < 0.25 and abs(draws.var() - 1) < 0.35, (name, draws.mean(),
                                                                         draws.var())
    with pytest.raises(ValueError, match="source"):
        trained.sample(5, source="posterior")


def test_mog_prior_trains_saves_and_loads(factors, tmp_path):
    model = _train(factors, epochs=10, prior="mog", n_prior_components=5)
    assert model.module_config.prior == "mog"
    assert np.isfinite(model.history["validation_elbo"]).all()
    kl = model.get_kl_per_dimension()
    assert np.isfinite(kl).all()
    # A Monte Carlo KL, yet the same on every call, and the caller's random state is kept.
    state = torch.get_rng_state()
    np.testing.assert_array_equal(svt.tl.posterior_collapse(model)["kl"], kl)
    assert torch.equal(state, torch.get_rng_state())
    model.save(tmp_path / "m")
    loaded = svt.SCVAE.load(tmp_path / "m", factors)
    assert loaded.module_config.prior == "mog" and loaded.module_config.n_prior_components == 5
    np.testing.assert_allclose(loaded.get_latent_representation(), model.get_latent_representation())
    assert torch.equal(loaded.module.prior_means.cpu(), model.module.prior_means.cpu())
    # The prior's KL estimate is unbiased: MC over many draws matches its definition.
    torch.manual_seed(0)
    m = torch.zeros(1, model.n_latent)
    v = torch.ones(1, model.n_latent)
    with torch.no_grad():
        est = torch.stack([model.module.kl_per_dim(m, v)[0] for _ in range(4000)]).mean()
        z = torch.randn(200000, model.n_latent)
        exact = (-0.5 * (z.pow(2) + np.log(2 * np.pi))).sum(-1) - model.module.prior_log_prob(z)
    assert abs(est.item() - exact.mean().item()) < 0.1
    with pytest.raises(ValueError, match="prior"):
        svt.SCVAE(factors, prior="vampire")


@pytest.mark.slow
def test_learned_prior_closes_holes_on_pbmc3k(pbmc3k_hvg):
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    adata = pbmc3k_hvg[np.random.default_rng(0).choice(pbmc3k_hvg.n_obs, 1000, replace=False)].copy()
    kw = {"n_latent": 10, "n_hidden": 64}
    normal = _train(adata, epochs=20, batch_size=64, **kw)
    mog = _train(adata, epochs=20, batch_size=64, prior="mog", n_prior_components=10, **kw)
    r_normal = svt.tl.aggregated_posterior(normal, n_samples=1000)
    r_mog = svt.tl.aggregated_posterior(mog, n_samples=1000)
    print(f"KL(q(z)||p(z)): normal {r_normal['kl_aggregated_prior']:.2f}, "
          f"mog {r_mog['kl_aggregated_prior']:.2f}; hole fraction normal "
          f"{r_normal['hole_fraction']:.2f}, mog {r_mog['hole_fraction']:.2f}")
    assert r_mog["kl_aggregated_prior"] < r_normal["kl_aggregated_prior"]

    def embed(x):
        x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
        return np.log1p(x / x.sum(1, keepdims=True) * 1e4)

    real = embed(adata.X)
    pca = PCA(20, random_state=0).fit(real)
    nn_ = NearestNeighbors(n_neighbors=1).fit(pca.transform(real))
    dist = {}
    for name, model, source in (("prior", normal, "prior"), ("aggregated", normal, "aggregated"),
                                ("mog prior", mog, "prior")):
        gen = model.sample(500, source=source, seed=0)
        dist[name] = float(np.median(nn_.kneighbors(pca.transform(embed(gen.X)))[0]))
    print("median distance to the nearest real cell:", dist)
    assert dist["aggregated"] < dist["prior"]
    assert dist["mog prior"] < dist["prior"]  # the learned prior samples where cells are


# ---------------------------------------------------------------------- 6. disentanglement
def test_mig_measures_axis_alignment():
    rng = np.random.default_rng(0)
    f = rng.uniform(-1, 1, (3000, 2))
    aligned = np.column_stack([f, rng.normal(size=3000)])  # one axis per factor + noise
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    rotated = np.column_stack([f @ np.array([[c, -s], [s, c]]), rng.normal(size=3000)])
    good = svt.tl.mutual_information_gap(aligned, pd.DataFrame(f, columns=["a", "b"]))
    bad = svt.tl.mutual_information_gap(rotated, pd.DataFrame(f, columns=["a", "b"]))
    assert good["mig"] > 0.6 and bad["mig"] < 0.2
    assert good["mutual_information"].shape == (3, 2)
    with pytest.raises(ValueError, match="rows"):
        svt.tl.mutual_information_gap(aligned[:10], f)
    with pytest.raises(ValueError, match="factors has no columns"):  # was a NaN MIG
        svt.tl.mutual_information_gap(aligned, pd.DataFrame(index=range(3000)))


def test_mig_keeps_a_discrete_factor_at_its_own_levels():
    """A 20-level factor (e.g. cluster ids) is not merged into 10 bins: ints, categorical
    ints and strings give the textbook MIG (sklearn's mutual information of the codes)."""
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(0)
    v = rng.integers(0, 20, 4000)
    z = np.column_stack([v % 2, v // 2]) + 0.01 * rng.normal(size=(4000, 2))
    codes = [np.rint(z[:, 0]).astype(int), np.rint(z[:, 1]).astype(int)]
    mi = sorted((mutual_info_score(c, v) for c in codes), reverse=True)
    p = np.bincount(v) / v.size
    textbook = (mi[0] - mi[1]) / -(p * np.log(p)).sum()
    for factor in (v, pd.Categorical(v), v.astype(str)):
        got = svt.tl.mutual_information_gap(z, pd.DataFrame({"v": factor}), n_bins=10)["mig"]
        assert got == pytest.approx(textbook, abs=1e-9)  # binned: 0.999
    with pytest.raises(ValueError, match="'v' has missing values"):
        svt.tl.mutual_information_gap(z, pd.DataFrame({"v": np.where(v > 18, np.nan, v)}))


def test_decoder_jacobian_matches_finite_differences(trained, factors):
    jac = svt.tl.decoder_jacobian(trained, factors, n_cells=20, seed=0)
    rows = np.sort(np.random.default_rng(0).choice(factors.n_obs, 20, replace=False))
    z = torch.as_tensor(trained.get_latent_representation(factors)[rows])
    cov = torch.zeros(20, 0)
    h = 1e-3
    with torch.no_grad():
        for d in range(trained.n_latent):
            dz = torch.zeros_like(z)
            dz[:, d] = h
            up = torch.log_softmax(trained.module.decoder(z + dz, cov)["logits"], -1)
            down = torch.log_softmax(trained.module.decoder(z - dz, cov)["logits"], -1)
            np.testing.assert_allclose(jac[:, :, d], ((up - down) / (2 * h)).numpy(),
                                       atol=2e-2, rtol=2e-2)


def test_disentanglement_and_traversal_recover_factor_genes(factors):
    keys = ["factor0", "factor1"]
    for beta in (1.0, 4.0):
        model = _train(factors, epochs=40, beta=beta, n_latent=3)
        res = svt.tl.disentanglement(model, factors.copy(), keys)
        if beta == 1.0:  # no factors named: refused before any work (was a NaN MIG)
            with pytest.raises(ValueError, match="factor_keys is empty"):
                svt.tl.disentanglement(model, factors.copy(), [])
        print(f"beta={beta}: MIG={res['mig']:.3f} Jacobian coupling={res['coupling']:.3f}")
        assert 0 <= res["mig"] <= 1 and 0 <= res["coupling"] <= 1
        # Traverse the axis most informative about each factor: its top genes are that
        # factor's genes (chance level: 20 of 120 genes).
        mi = res["mutual_information"]
        for k in keys:
            axis = int(np.argmax(mi[k].to_numpy()))
            top = svt.tl.latent_traversal(model, axis).top_genes(20)
            owner = factors.var.loc[top["gene"], "factor"].astype(str)
            precision = float((owner == k).mean())
            print(f"  {k}: axis z{axis}, precision of its top-20 genes {precision:.2f}")
            assert precision >= 0.5


def test_latent_traversal_output(trained):
    tr = svt.tl.latent_traversal(trained, dim=[0, 2], n_steps=7)
    assert tr.values.shape == (2, 7) and tr.expression.shape == (2, 7, trained.spec.n_genes)
    np.testing.assert_allclose(tr.expression.sum(-1), 1e4, rtol=1e-4)
    # Axis d walks from the 1% to the 99% quantile of the cells' posterior means on d, the
    # other axes held at their medians; each step is the decoder's expression at that z.
    lat = trained.get_latent_representation()
    cov = trained.module.covariates(torch.zeros(7, dtype=torch.long))
    for i, d in enumerate([0, 2]):
        np.testing.assert_allclose(tr.values[i], np.linspace(*np.quantile(lat[:, d], [0.01, 0.99]), 7),
                                   rtol=1e-5, atol=1e-6)
        z = np.tile(np.median(lat, axis=0), (7, 1))
        z[:, d] = tr.values[i]
        with torch.no_grad():
            want = 1e4 * trained.module.eval().proportions(torch.as_tensor(z, dtype=torch.float32),
                                                           cov)
        np.testing.assert_allclose(tr.expression[i], want.numpy(), rtol=1e-4, atol=1e-6)
    top = tr.top_genes(3)
    assert list(top["dim"]) == [0, 0, 0, 2, 2, 2]
    assert (np.diff(top.loc[top["dim"] == 0, "log2_range"]) <= 0).all()
    with pytest.raises(ValueError, match="n_latent"):
        svt.tl.latent_traversal(trained, dim=9)
    per100 = svt.tl.latent_traversal(trained, dim=0, library_size=100)
    np.testing.assert_allclose(per100.expression.sum(-1), 100, rtol=1e-4)
    fig = svt.pl.latent_traversal(per100, n_genes=1)
    assert fig.axes[0].get_ylabel() == "log2(1 + expression per 100)"  # not "per 1e4"


# ---------------------------------------------------------------------- figures
def test_collapse_plot_draws_the_table_threshold(trained):
    table = svt.tl.posterior_collapse(trained, threshold=0.5)
    ax = svt.pl.posterior_collapse(table).axes[1]
    assert ax.get_lines()[0].get_ydata()[0] == 0.5  # the line the colours were split by
    assert f"{int(table['active'].sum())}/{len(table)} active" in ax.get_title()


def _gap_on_layer(adata):
    """With counts in a layer and X normalised, the depth axis reads the layer."""
    a = adata.copy()
    a.layers["counts"] = a.X.copy()
    a.X = a.X * 0.5
    fig = svt.pl.variational_gap(a, layer="counts")
    ax = fig.axes[1]
    assert ax.get_xlabel() == "total counts (layers['counts'])"
    np.testing.assert_allclose(ax.collections[0].get_offsets()[:, 0],
                               np.asarray(a.layers["counts"].sum(1)).ravel())
    return fig


def test_figures_render(trained, factors, tmp_path):
    adata = factors.copy()
    sweep = pd.DataFrame({"beta": [0.5, 1, 2], "rate": [9.0, 6.0, 3.0],
                          "distortion": [600.0, 603.0, 610.0], "elbo": [-609.0, -609.0, -613.0],
                          "active_units": [4, 3, 2], "marginal_ll": [-605.0, -606.0, -611.0]})
    svt.tl.variational_gap(trained, adata, n_samples=5)
    svt.tl.amortization_gap(trained, adata, n_steps=5)
    figs = {
        "rate_distortion": svt.pl.rate_distortion(sweep),
        "collapse": svt.pl.posterior_collapse(trained),
        "variational_gap": svt.pl.variational_gap(adata),
        "variational_gap_layer": _gap_on_layer(adata),
        "amortization_gap": svt.pl.amortization_gap(adata),
        "holes": svt.pl.aggregated_posterior(svt.tl.aggregated_posterior(trained, n_samples=300)),
        "traversal": svt.pl.latent_traversal(svt.tl.latent_traversal(trained), n_genes=4),
        "disentanglement": svt.pl.disentanglement(
            svt.tl.disentanglement(trained, adata, ["factor0", "factor1"], key_added=None)),
    }
    for name, fig in figs.items():
        path = tmp_path / f"{name}.png"
        fig.savefig(path, dpi=60)
        assert path.stat().st_size > 5000, name
    # What they draw is the data: each cell's gap against its total counts, its
    # amortization gap against its amortized ELBO, one β per point of the sweep's curve.
    obs = adata.obs
    np.testing.assert_allclose(
        figs["variational_gap"].axes[1].collections[0].get_offsets(),
        np.column_stack([np.asarray(factors.X.sum(1)).ravel(), obs["scvae_variational_gap"]]))
    assert sum(p.get_height() for p in figs["variational_gap"].axes[0].patches) == adata.n_obs
    np.testing.assert_allclose(
        figs["amortization_gap"].axes[1].collections[0].get_offsets(),
        obs[["scvae_amortized_elbo", "scvae_amortization_gap"]].to_numpy())
    curve = figs["rate_distortion"].axes[0].lines[0]
    np.testing.assert_array_equal(curve.get_xdata(), sweep["rate"])
    np.testing.assert_array_equal(curve.get_ydata(), sweep["distortion"])
    with pytest.raises(KeyError, match="variational_gap"):
        svt.pl.variational_gap(factors.copy())
    with pytest.raises(KeyError, match="rate_distortion_sweep"):
        svt.pl.rate_distortion(sweep.drop(columns="rate"))


def test_jacobian_coupling_in_blocks_equals_the_whole_jacobian(trained, factors):
    """The coupling is accumulated block by block (the whole Jacobian took 1.2 GB at 500
    cells × 32,738 genes); it must equal the mean |cosine| over the whole Jacobian."""
    jac = svt.tl.decoder_jacobian(trained, factors, n_cells=300, seed=2).astype(np.float64)
    jac -= jac.mean(1, keepdims=True)
    unit = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    expected = np.abs(np.einsum("cgi,cgj->cij", unit, unit)).mean(0)
    res = svt.tl.jacobian_coupling(trained, factors, n_cells=300, seed=2, active_only=False)
    np.testing.assert_allclose(res["matrix"].to_numpy(), expected, rtol=1e-6, atol=1e-9)


def test_sweep_and_uns_keys_are_checked_before_any_work(factors, trained, monkeypatch):
    """A bad threshold or n_samples used to be found after the first model had trained;
    uns keys with '/' were written, and came back from an .h5ad nested under another key."""
    calls = []
    monkeypatch.setattr(svt.SCVAE, "train", lambda self, **kw: calls.append(kw))
    with pytest.raises(ValueError, match="threshold must be a non-negative number"):
        svt.tl.rate_distortion_sweep(factors, betas=(1, 2), threshold=-1)
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        svt.tl.rate_distortion_sweep(factors, betas=(1, 2), n_samples=0)
    assert not calls
    monkeypatch.undo()
    model = trained
    a = factors.copy()
    with pytest.raises(ValueError, match="must not contain '/'"):
        svt.tl.aggregated_posterior(model, a, n_samples=10, key_added="agg/post")
    with pytest.raises(ValueError, match="must not contain '/'"):
        svt.tl.disentanglement(model, a, ["factor0"], key_added="dis/x")
    with pytest.raises(ValueError, match="non-empty string"):
        svt.tl.aggregated_posterior(model, a, n_samples=10, key_added="")
    assert not a.uns
