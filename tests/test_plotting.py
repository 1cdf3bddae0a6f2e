"""svt.pl: plots draw into the caller's axes, save to a file, and show what they say."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import scvae_tools as svt


@pytest.fixture(scope="module")
def data():
    return svt.datasets.synthetic_counts(n_cells=200, n_genes=40, n_types=2, seed=2)


@pytest.fixture(scope="module")
def model(data):
    m = svt.SCVAE(data, n_latent=3, n_hidden=16)
    m.train(max_epochs=9, validation_every=3, batch_size=64, progress_bar=False, seed=0)
    return m


def _sweep(betas=(0.0, 0.5, 1.0, 2.0)) -> pd.DataFrame:
    b = np.asarray(betas)
    return pd.DataFrame({"beta": b, "rate": 10 - 2 * b, "distortion": 100 + 3 * b,
                         "elbo": -110 + b, "marginal_ll": -105 + b, "active_units": [3, 3, 2, 1]})


def test_plots_draw_into_given_axes_and_save(model, data, tmp_path):
    fig, grid = plt.subplots(2, 3)
    out = svt.pl.training_history(model, axes=grid[0])
    assert out is fig and grid[0, 0].get_title().startswith("ELBO")
    svt.pl.ppc(svt.tl.ppc(model, data, n_samples=2), stats=("mean",), axes=grid[1, 0])
    assert grid[1, 0].get_title() == "mean count"
    svt.pl.posterior_collapse(model, axes=grid[1, 1:])
    assert "active" in grid[1, 2].get_title()
    assert len(fig.axes) >= 6  # nothing drawn elsewhere: no new figure
    with pytest.raises(ValueError, match="draws 2 panel"):
        svt.pl.rate_distortion(_sweep(), axes=grid[0, 0])
    path = tmp_path / "history.pdf"
    svt.pl.training_history(model, save=path)
    assert path.read_bytes()[:4] == b"%PDF"
    plt.close("all")


def test_sparse_validation_checks_are_visible(model):
    """validation_every=3: the validation columns are NaN between checks, and a line
    through them drew nothing."""
    fig = svt.pl.training_history(model)
    val = [ln for ln in fig.axes[0].lines if ln.get_label() == "validation"][0]
    x, y = val.get_data()
    assert len(x) == 3 and np.isfinite(y).all() and val.get_marker() == "o"
    # The points are the checks themselves: epochs 3, 6, 9 and the ELBO measured there;
    # the training line has every epoch.
    h = model.history
    np.testing.assert_array_equal(x, [3, 6, 9])
    np.testing.assert_array_equal(y, h.set_index("epoch").loc[[3, 6, 9], "validation_elbo"])
    train = [ln for ln in fig.axes[0].lines if ln.get_label() == "train"][0]
    np.testing.assert_array_equal(train.get_xdata(), h["epoch"])
    np.testing.assert_array_equal(train.get_ydata(), h["train_elbo"])
    plt.close("all")


def test_rate_distortion_keeps_beta_zero_and_names_the_cells():
    sweep = _sweep()
    fig = svt.pl.rate_distortion(sweep)
    right = fig.axes[1]
    assert right.get_xscale() == "symlog"
    lo, hi = right.get_xlim()
    assert lo <= 0.0 <= hi  # β = 0 is on the axis (a log axis dropped it)
    assert "held-out" in fig.axes[0].get_title()
    sweep["evaluated_on"] = "train"  # as rate_distortion_sweep writes with train_size=1
    fig = svt.pl.rate_distortion(sweep)
    assert "training cells" in fig.axes[0].get_title()
    assert svt.pl.rate_distortion(_sweep((0.25, 0.5, 1.0, 2.0))).axes[1].get_xscale() == "log"
    plt.close("all")


def test_collapse_plot_follows_the_threshold_it_draws(model):
    table = svt.tl.posterior_collapse(model, threshold=1e-12)
    assert table["active"].all()
    fig = svt.pl.posterior_collapse(table, threshold=1e6)  # above every dimension
    assert fig.axes[1].get_title().endswith(f"0/{len(table)} active")
    plt.close("all")


def test_variational_gap_plot_sums_backed_counts(model, data, tmp_path):
    """A backed X is an on-disk dataset without .sum: the depth axis is read in chunks,
    as svt.tl.variational_gap reads the cells."""
    import anndata as ad

    data.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    svt.tl.variational_gap(model, backed, n_samples=3)
    fig = svt.pl.variational_gap(backed)
    depth = fig.axes[1].collections[0].get_offsets()[:, 0]
    np.testing.assert_allclose(depth, np.asarray(data.X.sum(1)).ravel())
    backed.file.close()
    plt.close("all")


def test_variational_gap_plot_names_unknown_groupby_and_layer(model, data):
    adata = data.copy()
    svt.tl.variational_gap(model, adata, n_samples=3)
    figures = plt.get_fignums()
    with pytest.raises(ValueError, match=r"not a column of adata.obs; its columns: cell_type"):
        svt.pl.variational_gap(adata, groupby="nope")
    with pytest.raises(ValueError, match="not a layer of adata"):
        svt.pl.variational_gap(adata, layer="nope")
    assert plt.get_fignums() == figures  # refused before drawing: no figure left
    plt.close("all")


def test_ppc_plot_takes_one_statistic_by_name(model, data):
    table = svt.tl.ppc(model, data, n_samples=2)
    fig = svt.pl.ppc(table, stats="mean")  # one name, not its letters
    assert [a.get_title() for a in fig.axes] == ["mean count"]
    with pytest.raises(ValueError, match="stats is empty"):
        svt.pl.ppc(table, stats=())
    plt.close("all")


def test_latent_traversal_plot_refuses_empty_selections(model, data):
    traversal = svt.tl.latent_traversal(model, adata=data, n_steps=3)
    with pytest.raises(ValueError, match="dims is empty"):
        svt.pl.latent_traversal(traversal, dims=[])
    with pytest.raises(ValueError, match="n_genes must be at least 1"):
        svt.pl.latent_traversal(traversal, n_genes=0)
    with pytest.raises(TypeError, match="n_genes must be an integer"):
        svt.pl.latent_traversal(traversal, n_genes=2.5)
    plt.close("all")


def test_aggregated_posterior_plot_checks_dims(model, data):
    result = svt.tl.aggregated_posterior(model, data, n_samples=100, key_added=None)
    for dims in [(0, 12), (0,), (1, 1), (-1, 0)]:
        with pytest.raises(ValueError, match="two distinct axes in 0…2"):
            svt.pl.aggregated_posterior(result, dims=dims)
    with pytest.raises(TypeError, match="must be integers"):
        svt.pl.aggregated_posterior(result, dims=(0.0, 1.0))
    fig = svt.pl.aggregated_posterior(result, dims=(2, 0))
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("z2", "z0")
    # ...and the points are the draws on those axes, in that order: grey q(z) draws, then
    # the prior draws outside and in holes (log q(z) below the threshold).
    grey, inside, holes = (c.get_offsets() for c in fig.axes[0].collections[:3])
    np.testing.assert_allclose(grey, result["posterior_samples"][:, [2, 0]])
    in_hole = result["prior_log_q"] < result["hole_threshold"]
    np.testing.assert_allclose(inside, result["prior_samples"][~in_hole][:, [2, 0]])
    np.testing.assert_allclose(holes, result["prior_samples"][in_hole][:, [2, 0]])
    plt.close("all")


def test_plots_say_what_to_pass_instead(model):
    with pytest.raises(TypeError, match="trained svt.SCVAE or its history DataFrame"):
        svt.pl.training_history("x")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['train_elbo'"):
        svt.pl.training_history(model.history.drop(columns="train_elbo"))
    table = svt.tl.posterior_collapse(model)
    with pytest.raises(ValueError, match="the table from svt.tl.posterior_collapse"):
        svt.pl.posterior_collapse(table.drop(columns="active"))
    svt.pl.posterior_collapse(table.drop(columns="active"), threshold=0.01)  # recomputed
    plt.close("all")


def test_show_doc_says_how_to_get_one_figure_in_a_notebook():
    """A bare call as a cell's last line displays the figure twice (inline backend, then the
    returned value); the shared doc says how to get one copy."""
    doc = svt.pl.ppc.__doc__ or ""
    assert "fig = svt.pl." in doc and "``;``" in doc
    assert "notebooks display the returned figure" not in doc
