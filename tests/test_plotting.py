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
