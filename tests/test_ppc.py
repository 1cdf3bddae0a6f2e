"""Posterior predictive checks: simulated counts, per-gene statistics, NB vs Poisson."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import scipy.sparse as sp

import scvae_tools as svt
from scvae_tools.ppc import STATISTICS, ppc_summary


@pytest.fixture(scope="module")
def nb_data():
    # Strongly over-dispersed NB counts (θ = 2): a Poisson model cannot make their zeros.
    return svt.datasets.synthetic_counts(n_cells=400, n_genes=100, n_types=3, theta=2.0,
                                         mean_library=1500, seed=1)


@pytest.fixture(scope="module")
def models(nb_data):
    out = {}
    for lik in ("nb", "poisson"):
        m = svt.SCVAE(nb_data, n_latent=4, likelihood=lik)
        m.train(max_epochs=30, batch_size=64, progress_bar=False, seed=0)
        out[lik] = m
    return out


def test_posterior_predictive_sample(models, nb_data):
    model = models["nb"]
    x = model.posterior_predictive_sample(nb_data, n_samples=3)
    assert x.shape == (nb_data.n_obs, nb_data.n_vars, 3) and x.dtype == np.float32
    assert np.all(x >= 0) and np.all(x == np.round(x))
    # Replicates differ from each other but match the data's scale gene by gene.
    assert not np.array_equal(x[..., 0], x[..., 1])
    obs_mean = np.asarray(nb_data.X.mean(0)).ravel()
    rep_mean = x.mean((0, 2))
    assert np.corrcoef(np.log1p(obs_mean), np.log1p(rep_mean))[0, 1] > 0.98
    # Drawn at each cell's observed library from the fitted NB: cell totals and genes' zero
    # fractions are the data's. Measured over seeds 0-2: mean totals within 0.3%, their
    # correlation with the cells' 0.98; genes' zero fractions 0.014-0.016 apart on average
    # (Poisson draws: 0.065; decoded at library 1e4: totals ×6.3, 0.077).
    obs_total = np.asarray(nb_data.X.sum(1)).ravel()
    assert abs(x.sum(1).mean() / obs_total.mean() - 1) < 0.05
    assert np.corrcoef(obs_total, x.sum(1).mean(1))[0, 1] > 0.9
    obs_zero = np.asarray((nb_data.X.toarray() == 0).mean(0)).ravel()
    assert np.abs((x == 0).mean((0, 2)) - obs_zero).mean() < 0.03
    # Seeded draws are reproducible; gene_list selects and orders genes.
    again = model.posterior_predictive_sample(nb_data, n_samples=3)
    np.testing.assert_array_equal(x, again)
    sub = model.posterior_predictive_sample(nb_data, n_samples=3, gene_list=["gene5", "gene2"])
    np.testing.assert_array_equal(sub, x[:, [5, 2], :])
    with pytest.raises(KeyError, match="not in the model"):
        model.posterior_predictive_sample(nb_data, gene_list=["nope"])
    with pytest.raises(ValueError, match="n_samples"):
        model.posterior_predictive_sample(nb_data, n_samples=0)


def test_ppc_table_matches_its_definition(models, nb_data):
    model = models["nb"]
    table = svt.tl.ppc(model, nb_data, n_samples=4, seed=3)
    assert list(table.index) == list(nb_data.var_names)
    for stat in STATISTICS:
        assert {f"{stat}_obs", f"{stat}_rep", f"{stat}_rep_sd"} <= set(table.columns)
    X = nb_data.X.toarray() if sp.issparse(nb_data.X) else nb_data.X
    np.testing.assert_allclose(table["mean_obs"], X.mean(0), rtol=1e-6)
    np.testing.assert_allclose(table["variance_obs"], X.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(table["zero_fraction_obs"], (X == 0).mean(0))
    np.testing.assert_allclose(table["cv_obs"], X.std(0, ddof=1) / X.mean(0), rtol=1e-5)
    # The replicated statistics are those of posterior_predictive_sample's draws.
    x = model.posterior_predictive_sample(nb_data, n_samples=4, seed=3)
    np.testing.assert_allclose(table["zero_fraction_rep"], (x == 0).mean(0).mean(1), atol=1e-9)
    np.testing.assert_allclose(table["mean_rep"], x.mean(0).mean(1), rtol=1e-5)


def test_ppc_of_backed_data_equals_in_memory(models, nb_data, tmp_path):
    """The docs send large data to tl.ppc, which refused backed AnnData ("needs the whole
    count matrix in memory"); it now streams the observed counts with the replicates."""
    import anndata as ad

    path = tmp_path / "d.h5ad"
    nb_data.write_h5ad(path)
    want = svt.tl.ppc(models["nb"], nb_data, n_samples=3, seed=2)
    for backed in (ad.read_h5ad(path, backed="r"), str(path)):
        got = svt.tl.ppc(models["nb"], backed, n_samples=3, seed=2)
        np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-6, equal_nan=True)


def test_nb_fits_overdispersed_zeros_better_than_poisson(models, nb_data):
    err = {lik: svt.tl.ppc_summary(svt.tl.ppc(m, nb_data, n_samples=5)) for lik, m in models.items()}
    assert err["nb"]["zero_fraction"] < 0.8 * err["poisson"]["zero_fraction"], err
    assert err["nb"]["variance"] < err["poisson"]["variance"], err
    # Poisson replicates are under-dispersed: too few zeros for most genes.
    pois = svt.tl.ppc(models["poisson"], nb_data, n_samples=3)
    assert (pois["zero_fraction_rep"] < pois["zero_fraction_obs"]).mean() > 0.8


def test_ppc_plot(models, nb_data, tmp_path):
    tables = {lik: svt.tl.ppc(m, nb_data, n_samples=2) for lik, m in models.items()}
    fig = svt.pl.ppc(tables)
    assert len(fig.axes) == 4
    assert len(fig.axes[2].collections) == 2  # one scatter per model
    # Each point is a gene at (observed, replicated) from that model's table, and the legend
    # gives that model's error; the log-scaled panels leave out genes at 0.
    for ax, stat in zip(fig.axes, ("mean", "variance", "zero_fraction", "cv"), strict=True):
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        for (lik, table), points, label in zip(tables.items(), ax.collections, labels,
                                               strict=True):
            obs, rep = table[f"{stat}_obs"].to_numpy(), table[f"{stat}_rep"].to_numpy()
            keep = np.isfinite(obs) & np.isfinite(rep)
            if stat != "zero_fraction":
                keep &= (obs > 0) & (rep > 0)
            np.testing.assert_allclose(points.get_offsets(), np.column_stack([obs, rep])[keep])
            assert label == f"{lik} (err {ppc_summary(table)[stat]:.3f})"
    fig.savefig(tmp_path / "ppc.png")
    one = svt.pl.ppc(tables["nb"], stats=("zero_fraction",))
    assert len(one.axes) == 1
    with pytest.raises(ValueError, match="Unknown statistic"):
        svt.pl.ppc(tables["nb"], stats=("median",))
    with pytest.raises(KeyError, match="PPC table"):
        ppc_summary(tables["nb"].drop(columns="cv_rep"))


@pytest.mark.slow
def test_pbmc3k_nb_fits_zero_fractions_better_than_poisson(pbmc3k_nb_model, pbmc3k_hvg):
    poisson = svt.SCVAE(pbmc3k_hvg, likelihood="poisson")
    poisson.train(max_epochs=25, batch_size=256, progress_bar=False, seed=0)
    nb = ppc_summary(svt.tl.ppc(pbmc3k_nb_model, pbmc3k_hvg, n_samples=3))
    pois = ppc_summary(svt.tl.ppc(poisson, pbmc3k_hvg, n_samples=3))
    assert nb["zero_fraction"] < pois["zero_fraction"], (nb, pois)
    assert nb["variance"] < pois["variance"], (nb, pois)
