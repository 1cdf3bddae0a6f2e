"""Figures of training and diagnostics (matplotlib only)."""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scipy.sparse as sp


def _panels(axes, n: int, figsize: tuple[float, float], ncols: int | None = None):
    """The figure and the ``n`` axes a plot draws on: the caller's ``axes`` (one Axes or a
    sequence of ``n``, e.g. part of a larger figure), else those of a new figure, ``ncols``
    panels per row (default: all in one row)."""
    if axes is None:
        ncols = n if ncols is None else ncols
        nrows = -(-n // ncols)
        fig, grid = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False,
                                 constrained_layout=True)
        flat = list(grid.ravel())
        for spare in flat[n:]:
            spare.set_visible(False)
        return fig, flat[:n]
    flat = list(np.atleast_1d(np.asarray(axes, dtype=object)).ravel())
    if len(flat) != n:
        raise ValueError(f"This plot draws {n} panel(s); pass axes= with {n} matplotlib Axes, "
                         f"got {len(flat)}.")
    return flat[0].figure, flat


def _finish(fig, show: bool, save):
    """Save (``save``: a file name, its extension the format) and show; return the figure."""
    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if show:
        plt.show()
    return fig


_PLOT_PARAMS = """\
show
    Call ``plt.show()`` (for scripts). In a notebook the inline backend shows the figure
    at the end of the cell; a bare call as the cell's last line shows it a second time as
    the returned value: assign it (``fig = svt.pl.ppc(table)``) or end the line with ``;``.
axes
    Matplotlib Axes to draw on, one per panel (e.g. from ``plt.subplots``), instead of a new
    figure (keyword only).
save
    Write the figure to this file (its extension gives the format: ``.png``, ``.pdf``…;
    keyword only)."""


def _plot_params(fn):
    """Write the parameters every plot shares into ``fn``'s docstring at ``{plot_params}``
    (at that line's indentation, which Python 3.13 strips and earlier versions keep)."""
    if fn.__doc__ is None:  # python -OO
        return fn
    line = next(ln for ln in fn.__doc__.splitlines() if ln.strip() == "{plot_params}")
    indent = line[:len(line) - len(line.lstrip())]
    fn.__doc__ = fn.__doc__.replace("{plot_params}",
                                    textwrap.indent(_PLOT_PARAMS, indent).lstrip(), 1)
    return fn


def _names(items, limit: int = 10) -> str:
    """A short list of names for an error message: the first ``limit``, then how many more."""
    items = [str(i) for i in items]
    more = f" … ({len(items) - limit} more)" if len(items) > limit else ""
    return (", ".join(items[:limit]) or "none") + more


def _check_columns(table: pd.DataFrame, need, what: str) -> None:
    """Refuse a DataFrame that lacks the columns of the table ``what`` returns."""
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ValueError(f"The DataFrame lacks column(s) {missing}; pass {what}.")


# What training writes each epoch (validation columns are NaN without validation cells).
_HISTORY_COLUMNS = ("epoch", *(f"{split}_{col}" for split in ("train", "validation")
                               for col in ("elbo", "reconstruction", "kl")))


def _history_of(model_or_history) -> pd.DataFrame:
    if isinstance(model_or_history, pd.DataFrame):
        hist = model_or_history
    elif isinstance(getattr(model_or_history, "history", None), pd.DataFrame):
        hist = model_or_history.history
    else:
        raise TypeError("Pass a trained svt.SCVAE or its history DataFrame (model.history), "
                        f"got {type(model_or_history).__name__}.")
    if not hist.empty:  # an empty history has its own message (no training epoch)
        _check_columns(hist, _HISTORY_COLUMNS, "a trained svt.SCVAE or its model.history")
    return hist


@_plot_params
def training_history(model_or_history, show: bool = False, *, axes=None, save=None):
    """Training curves: ELBO, reconstruction (distortion) and KL (rate) per epoch.

    Parameters
    ----------
    model_or_history
        A trained :class:`~scvae_tools.SCVAE` or its ``history`` DataFrame.
    {plot_params}

    Returns
    -------
    The figure.
    """
    hist = _history_of(model_or_history)
    if hist.empty:
        query = getattr(model_or_history, "query_info", None)
        raise ValueError(
            "The model ran no training epoch: a query mapped by load_query without new "
            "categories, or with max_epochs=0, is not fine-tuned." if query else
            "The model has no training history; train it first.")
    fig, axes = _panels(axes, 3, (12, 3.4))
    for a, (col, title) in zip(
        axes,
        [("elbo", "ELBO (nats/cell, higher is better)"),
         ("reconstruction", "Distortion −E[log p(x|z)]"),
         ("kl", "Rate KL(q(z|x) ‖ p(z))")],
        strict=True,
    ):
        a.plot(hist["epoch"], hist[f"train_{col}"], label="train")
        # With validation_every > 1 the column is NaN between checks: plot the checks
        # (a line through NaN draws nothing), with markers when they are sparse.
        val = hist[["epoch", f"validation_{col}"]].dropna()
        if len(val):
            a.plot(val["epoch"], val[f"validation_{col}"], label="validation",
                   marker="o" if len(val) < len(hist) else None, ms=3)
        a.set_xlabel("epoch")
        a.set_title(title, fontsize=10)
        a.legend(frameon=False)
    if col == "kl" and "beta" in hist and hist["beta"].nunique() > 1:
        b = axes[2].twinx()
        b.plot(hist["epoch"], hist["beta"], color="grey", ls=":", label="β")
        b.set_ylabel("β in force", color="grey")
    return _finish(fig, show, save)


@_plot_params
def ppc(tables, stats=("mean", "variance", "zero_fraction", "cv"), show: bool = False, *,
        axes=None, save=None):
    """Posterior predictive check: observed (x) vs replicated (y) per-gene statistics.

    Parameters
    ----------
    tables
        A table from :func:`scvae_tools.tl.ppc`, or a dict ``{label: table}`` to overlay
        several models (e.g. NB vs Poisson).
    stats
        Which of ``"mean"``, ``"variance"``, ``"zero_fraction"``, ``"cv"`` to show (one
        name or a sequence of them).
    {plot_params}

    Returns
    -------
    The figure: one panel per statistic, one point per gene, the diagonal y = x marking a
    perfect fit; legends give each model's error from ``svt.tl.ppc_summary``.
    """
    import numpy as np

    from .ppc import STATISTICS, ppc_summary

    if isinstance(tables, pd.DataFrame):
        tables = {tables.attrs.get("likelihood", "model"): tables}
    if not isinstance(tables, dict) or not tables:
        raise ValueError("tables must be a PPC table from svt.tl.ppc or a non-empty dict of them.")
    # One name is one statistic (iterating "mean" would give its letters).
    stats = [stats] if isinstance(stats, str) else list(stats)
    if not stats:
        raise ValueError(f"stats is empty; pass one or more of {STATISTICS}.")
    bad = [s for s in stats if s not in STATISTICS]
    if bad:
        raise ValueError(f"Unknown statistic(s) {bad}; choose from {STATISTICS}.")
    titles = {"mean": "mean count", "variance": "variance", "zero_fraction": "fraction of zeros",
              "cv": "coefficient of variation"}
    fig, axes = _panels(axes, len(stats), (3.6 * len(stats), 3.6))
    for a, stat in zip(axes, stats, strict=True):
        lo, hi = np.inf, -np.inf
        for label, table in tables.items():
            err = ppc_summary(table)[stat]
            obs, rep = table[f"{stat}_obs"].to_numpy(), table[f"{stat}_rep"].to_numpy()
            ok = np.isfinite(obs) & np.isfinite(rep)
            if stat != "zero_fraction":
                ok &= (obs > 0) & (rep > 0)
            a.scatter(obs[ok], rep[ok], s=4, alpha=0.4, linewidths=0,
                      label=f"{label} (err {err:.3f})")
            if ok.any():
                lo, hi = min(lo, obs[ok].min(), rep[ok].min()), max(hi, obs[ok].max(), rep[ok].max())
        if np.isfinite(lo):
            a.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--")
        if stat != "zero_fraction":
            a.set_xscale("log")
            a.set_yscale("log")
        a.set_xlabel("observed")
        a.set_ylabel("replicated (posterior predictive)")
        a.set_title(titles[stat], fontsize=10)
        a.legend(frameon=False, fontsize=8, markerscale=3)
    return _finish(fig, show, save)


# ---------------------------------------------------------------------- VAE diagnostics
# Figures for scvae_tools.diagnostics (svt.tl.rate_distortion_sweep, …).


@_plot_params
def rate_distortion(sweep: pd.DataFrame, show: bool = False, *, axes=None, save=None):
    """The rate–distortion trade-off of a β sweep (:func:`svt.tl.rate_distortion_sweep`).

    Left: distortion −E[log p(x|z)] against rate KL(q(z|x) ‖ p(z)), one point per β (lower
    left is better; the β = 1 ELBO is constant along lines of slope −1). Right: held-out
    ELBO and importance-weighted log p(x) against β, with the number of active latent
    units on a second axis.

    Parameters
    ----------
    sweep
        The DataFrame returned by ``svt.tl.rate_distortion_sweep``.
    {plot_params}

    Returns
    -------
    The figure.
    """
    need = {"beta", "rate", "distortion", "elbo", "active_units", "marginal_ll"}
    missing = need - set(sweep.columns)
    if missing:
        raise KeyError(f"sweep lacks column(s) {sorted(missing)}; pass the DataFrame from "
                       "svt.tl.rate_distortion_sweep.")
    df = sweep.sort_values("beta")
    fig, (a, b) = _panels(axes, 2, (10.5, 4))
    a.plot(df["rate"], df["distortion"], "-o", color="C0")
    for _, r in df.iterrows():
        a.annotate(f"β={r['beta']:g}", (r["rate"], r["distortion"]), textcoords="offset points",
                   xytext=(5, 5), fontsize=8)
    a.set_xlabel("rate  KL(q(z|x) ‖ p(z))  [nats/cell]")
    a.set_ylabel("distortion  −E[log p(x|z)]  [nats/cell]")
    on_train = "evaluated_on" in df and (df["evaluated_on"] == "train").any()  # train_size=1
    cells = "training" if on_train else "held-out"
    a.set_title(f"Rate–distortion ({cells} cells)", fontsize=10)
    b.plot(df["beta"], df["elbo"], "-o", label="ELBO")
    b.plot(df["beta"], df["marginal_ll"], "-s", label="log p(x) (IWAE)")
    positive = df["beta"][df["beta"] > 0]
    if (df["beta"] <= 0).any():  # β = 0 has no place on a log axis: linear up to the next β
        b.set_xscale("symlog", base=2, linthresh=float(positive.min()) if len(positive) else 1.0)
    else:
        b.set_xscale("log", base=2)
    b.set_xlabel("β")
    b.set_ylabel("nats/cell (higher is better)")
    b.set_title(f"{cells.capitalize()} fit and active units", fontsize=10)
    c = b.twinx()
    c.plot(df["beta"], df["active_units"], ":^", color="grey", label="active units")
    c.set_ylabel("active units", color="grey")
    c.set_ylim(-0.5, max(df["active_units"].max(), 1) + 0.5)
    h1, l1 = b.get_legend_handles_labels()
    h2, l2 = c.get_legend_handles_labels()
    b.legend(h1 + h2, l1 + l2, frameon=False, fontsize=8, loc="lower left")
    return _finish(fig, show, save)


@_plot_params
def posterior_collapse(model_or_table, adata=None, threshold: float | None = None,
                       show: bool = False, *, axes=None, save=None):
    """Per-dimension KL and variance of the posterior mean, collapsed axes in grey.

    Parameters
    ----------
    model_or_table
        A trained :class:`~scvae_tools.SCVAE` or the table from ``svt.tl.posterior_collapse``.
    adata, threshold
        Passed to ``svt.tl.posterior_collapse`` when a model is given (threshold: default
        0.01, or the one a given table was computed with).
    {plot_params}

    Returns
    -------
    The figure.
    """
    if isinstance(model_or_table, pd.DataFrame):
        table = model_or_table
        # "active" is recomputed below when a threshold is given
        _check_columns(table, ["kl", "mean_variance"] + ["active"] * (threshold is None),
                       "a trained svt.SCVAE or the table from svt.tl.posterior_collapse")
        if threshold is None:
            threshold = table.attrs.get("threshold", 0.01)
        else:  # colours and the count follow the threshold drawn, not the table's own
            table = table.assign(active=table["mean_variance"] > threshold)
    else:
        threshold = 0.01 if threshold is None else threshold
        from .diagnostics import posterior_collapse as _pc

        table = _pc(model_or_table, adata, threshold)
    colors = np.where(table["active"].to_numpy(), "C0", "lightgrey")
    x = np.arange(len(table))
    fig, (a, b) = _panels(axes, 2, (10, 3.4))
    a.bar(x, table["kl"], color=colors)
    a.set_title("KL(q(z_d|x) ‖ p(z_d)) per dimension [nats]", fontsize=10)
    b.bar(x, table["mean_variance"], color=colors)
    b.axhline(threshold, color="k", ls="--", lw=0.8, label=f"active threshold {threshold:g}")
    b.set_yscale("log")
    b.set_title(f"Var over cells of E[z_d|x]: {int(table['active'].sum())}/{len(table)} active",
                fontsize=10)
    b.legend(frameon=False, fontsize=8)
    for ax in (a, b):
        ax.set_xticks(x, table.index, fontsize=8)
    return _finish(fig, show, save)


@_plot_params
def variational_gap(adata, key: str = "scvae", groupby: str | None = None,
                    layer: str | None = None, show: bool = False, *, axes=None, save=None):
    """Per-cell variational gap log p̂(x) − ELBO (from ``svt.tl.variational_gap``).

    Left: its distribution (or one box per group of ``obs[groupby]``); right: against the
    cell's total counts, since deeper cells carry more evidence and usually have larger gaps.
    The counts are ``adata.X``'s, or ``adata.layers[layer]``'s (pass the model's layer when
    X holds normalised values).

    Parameters
    ----------
    adata
        The AnnData ``svt.tl.variational_gap`` wrote ``obs[f"{key}_variational_gap"]`` to.
    key
        The ``key_added`` it was given.
    groupby
        An ``obs`` column: one box per group instead of the histogram.
    layer
        Where the counts for the depth axis are (default ``adata.X``).
    {plot_params}

    Returns
    -------
    The figure.
    """
    col = f"{key}_variational_gap"
    if col not in adata.obs:
        raise KeyError(f"obs[{col!r}] not found; run svt.tl.variational_gap(model, adata, "
                       f"key_added={key!r}) first.")
    # Checked before drawing: a bad name leaves no half-drawn figure behind.
    if groupby is not None and groupby not in adata.obs:
        raise ValueError(f"groupby={groupby!r} is not a column of adata.obs; its columns: "
                         f"{_names(adata.obs.columns)}.")
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"layer={layer!r} is not a layer of adata; its layers: "
                         f"{_names(adata.layers.keys())} (layer=None: adata.X).")
    gap = adata.obs[col].to_numpy()
    fig, (a, b) = _panels(axes, 2, (10, 3.6))
    if groupby is None:
        a.hist(gap, bins=40, color="C0")
        a.axvline(np.median(gap), color="k", ls="--", lw=0.8, label=f"median {np.median(gap):.2f}")
        a.legend(frameon=False, fontsize=8)
        a.set_xlabel("variational gap [nats]")
        a.set_ylabel("cells")
    else:
        groups = adata.obs[groupby].astype("category")
        cats = list(groups.cat.categories)
        a.boxplot([gap[(groups == c).to_numpy()] for c in cats], showfliers=False)
        a.set_xticks(np.arange(1, len(cats) + 1), cats, rotation=45, ha="right", fontsize=8)
        a.set_ylabel("variational gap [nats]")
    a.set_title("log p̂(x) (IWAE) − ELBO per cell", fontsize=10)
    depth = _total_counts(adata, layer)
    if depth is not None:
        b.scatter(depth, gap, s=4, alpha=0.5, rasterized=True)
        b.set_xscale("log")
        b.set_xlabel(f"total counts ({'adata.X' if layer is None else f'layers[{layer!r}]'})")
        b.set_ylabel("variational gap [nats]")
        b.set_title("Gap vs sequencing depth", fontsize=10)
    return _finish(fig, show, save)


def _total_counts(adata, layer: str | None) -> np.ndarray | None:
    """Per-cell total counts of ``adata.X`` or ``layers[layer]`` (None without X). Counts
    left on disk by ``backed="r"`` are summed by BackedCellData's chunked library-size
    pass, as svt.tl.variational_gap reads them."""
    counts = adata.X if layer is None else adata.layers[layer]
    if counts is None:
        return None
    if sp.issparse(counts) or isinstance(counts, np.ndarray):  # in memory (or a backed view)
        return np.asarray(counts.sum(1), dtype=np.float64).ravel()
    from .adapter import DataSpec
    from .backed import BackedCellData

    spec = DataSpec(var_names=list(adata.var_names.astype(str)), layer=layer,
                    allow_non_integer=True)
    data = BackedCellData(adata, spec, validate=False)  # no size_factor_key: library = totals
    try:
        return np.asarray(data.library, dtype=np.float64)
    finally:
        data.close()


@_plot_params
def amortization_gap(adata, key: str = "scvae", show: bool = False, *, axes=None, save=None):
    """Amortized vs refined per-cell ELBO (from ``svt.tl.amortization_gap``).

    Left: the distribution of the gap; right: the gap against the amortized ELBO (a cell at
    0 is one for which the encoder is already as good as per-cell optimisation).

    Parameters
    ----------
    adata
        The AnnData ``svt.tl.amortization_gap`` wrote ``obs[f"{key}_amortized_elbo"]``,
        ``…_refined_elbo`` and ``…_amortization_gap`` to.
    key
        The ``key_added`` it was given.
    {plot_params}

    Returns
    -------
    The figure.
    """
    cols = [f"{key}_amortized_elbo", f"{key}_refined_elbo", f"{key}_amortization_gap"]
    missing = [c for c in cols if c not in adata.obs]
    if missing:
        raise KeyError(f"obs lacks {missing}; run svt.tl.amortization_gap(model, adata, "
                       f"key_added={key!r}) first.")
    amort, refined, gap = (adata.obs[c].to_numpy() for c in cols)
    fig, (a, b) = _panels(axes, 2, (10, 3.8))
    a.hist(gap, bins=40, color="C1")
    a.axvline(gap.mean(), color="k", ls="--", lw=0.8, label=f"mean {gap.mean():.2f} nats")
    a.set_xlabel("amortization gap [nats]")
    a.set_ylabel("cells")
    a.set_title("Refined − amortized ELBO per cell", fontsize=10)
    a.legend(frameon=False, fontsize=8)
    b.scatter(amort, gap, s=4, alpha=0.5, color="C1", rasterized=True)
    b.axhline(0, color="k", lw=0.8, ls="--")
    b.set_xlabel("amortized ELBO (encoder) [nats]")
    b.set_ylabel("amortization gap [nats]")
    b.set_title(f"Gap per cell (refined ELBO mean {refined.mean():.1f} nats)", fontsize=10)
    return _finish(fig, show, save)


@_plot_params
def aggregated_posterior(result: dict, dims: tuple[int, int] | None = None, show: bool = False,
                         *, axes=None, save=None):
    """Prior draws over the aggregated posterior q(z), holes highlighted.

    Grey: draws from q(z) (where the decoder was trained); coloured: draws from the prior
    p(z), coloured by their log-density under q(z); red crosses: prior draws in holes.

    Parameters
    ----------
    result
        The dict from ``svt.tl.aggregated_posterior``.
    dims
        The two latent axes to show (default: the two with the largest spread of cells'
        posterior means).
    {plot_params}

    Returns
    -------
    The figure.
    """
    need = ("prior_samples", "prior_log_q", "posterior_samples", "hole_threshold")
    if not all(k in result for k in need):
        raise KeyError("Pass the dict returned by svt.tl.aggregated_posterior (with its arrays).")
    zp, lq, zq = result["prior_samples"], result["prior_log_q"], result["posterior_samples"]
    n_latent = zp.shape[1]
    if n_latent < 2:
        raise ValueError("aggregated_posterior needs a model with at least 2 latent dimensions.")
    if dims is None:
        dims = tuple(np.argsort(-result["posterior_means"].var(0))[:2])
    i, j = _two_axes(dims, n_latent)
    holes = lq < result["hole_threshold"]
    fig, (a, b) = _panels(axes, 2, (10.5, 4.2))
    a.scatter(zq[:, i], zq[:, j], s=3, c="lightgrey", label="q(z) draws", rasterized=True)
    sc_ = a.scatter(zp[~holes, i], zp[~holes, j], s=5, c=lq[~holes], cmap="viridis",
                    label="prior draws", rasterized=True)
    a.scatter(zp[holes, i], zp[holes, j], s=10, marker="x", c="red", lw=0.8,
              label=f"prior draws in holes ({holes.mean():.0%})")
    fig.colorbar(sc_, ax=a, label="log q(z)")
    a.set_xlabel(f"z{i}")
    a.set_ylabel(f"z{j}")
    a.legend(frameon=True, framealpha=0.85, fontsize=8, loc="upper right", markerscale=2)
    a.set_title(f"prior = {result.get('prior', '?')}:  KL(q(z) ‖ p(z)) = "
                f"{result['kl_aggregated_prior']:.2f} nats", fontsize=10)
    bins = np.linspace(min(lq.min(), result["posterior_log_q"].min()),
                       max(lq.max(), result["posterior_log_q"].max()), 50)
    b.hist(result["posterior_log_q"], bins=bins, alpha=0.6, label="q(z) draws", color="grey")
    b.hist(lq, bins=bins, alpha=0.6, label="prior draws", color="C0")
    b.axvline(result["hole_threshold"], color="red", ls="--", lw=0.8,
              label=f"hole threshold ({result.get('hole_quantile', 0.01):g} quantile)")
    b.set_xlabel("log q(z)  (density under the aggregated posterior)")
    b.set_ylabel("draws")
    b.legend(frameon=False, fontsize=8)
    b.set_title("Hole score of prior draws", fontsize=10)
    return _finish(fig, show, save)


def _two_axes(dims, n_latent: int) -> tuple[int, int]:
    """``dims`` as two distinct latent axes in ``0 … n_latent - 1``, else a clear error."""
    fix = f"pass two distinct axes in 0…{n_latent - 1}, e.g. dims=(0, 1)"
    if isinstance(dims, str) or np.ndim(dims) != 1 or len(dims) != 2:
        raise ValueError(f"dims={dims!r} is not two latent axes; {fix}.")
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"dims={dims!r}: the axes must be integers; {fix}.")
    i, j = int(dims[0]), int(dims[1])
    if not (0 <= i < n_latent and 0 <= j < n_latent) or i == j:
        raise ValueError(f"dims={dims!r}: the model has {n_latent} latent axes; {fix}.")
    return i, j


@_plot_params
def latent_traversal(traversal, n_genes: int = 5, dims=None, show: bool = False, *,
                     axes=None, save=None):
    """Expression of the genes that move most along each traversed axis.

    One panel per axis: log2(1 + expression per library size) of its top ``n_genes`` genes against
    the z value on that axis.

    Parameters
    ----------
    traversal
        The :class:`~scvae_tools.diagnostics.LatentTraversal` from ``svt.tl.latent_traversal``.
    n_genes
        Genes per panel.
    dims
        Subset of the traversed axes to draw (default: all).
    {plot_params}

    Returns
    -------
    The figure.
    """
    if isinstance(n_genes, bool) or not isinstance(n_genes, (int, np.integer)):
        raise TypeError(f"n_genes must be an integer ≥ 1, got {n_genes!r}.")
    if n_genes < 1:
        raise ValueError(f"n_genes must be at least 1 (genes per panel), got {n_genes}.")
    all_dims = list(traversal.dims)
    dims = all_dims if dims is None else [int(d) for d in np.atleast_1d(dims)]
    if not dims:
        raise ValueError(f"dims is empty; pass some of the traversed axes {all_dims} "
                         "(or dims=None for all).")
    bad = [d for d in dims if d not in all_dims]
    if bad:
        raise ValueError(f"dims {bad} were not traversed; traversed axes are {all_dims}.")
    top = traversal.top_genes(n_genes)
    genes = list(traversal.var_names)
    ncol = min(len(dims), 4)
    nrow = int(np.ceil(len(dims) / ncol))
    fig, axes = _panels(axes, len(dims), (3.6 * ncol, 3.0 * nrow), ncols=ncol)
    for ax, d in zip(axes, dims, strict=True):
        i = all_dims.index(d)
        for g in top.loc[top["dim"] == d, "gene"]:
            ax.plot(traversal.values[i], traversal.log2()[i, :, genes.index(g)],
                    "-o", ms=2.5, lw=1.2, label=g)
        ax.set_xlabel(f"z{d}")
        ax.set_ylabel(f"log2(1 + expression per {traversal.library_size:g})")
        ax.set_title(f"Traversal of z{d}", fontsize=10)
        ax.legend(frameon=False, fontsize=7)
    return _finish(fig, show, save)


@_plot_params
def disentanglement(result: dict, show: bool = False, *, axes=None, save=None):
    """Mutual information between latent axes and known factors, and Jacobian coupling.

    Parameters
    ----------
    result
        The dict from ``svt.tl.disentanglement``.
    {plot_params}

    Returns
    -------
    The figure.
    """
    if "mutual_information" not in result or "coupling_matrix" not in result:
        raise KeyError("Pass the dict returned by svt.tl.disentanglement.")
    mi, cm = result["mutual_information"], result["coupling_matrix"]
    fig, (a, b) = _panels(axes, 2, (10, 4))
    im = a.imshow(mi.to_numpy(), cmap="Blues", aspect="auto", vmin=0)
    a.set_xticks(range(mi.shape[1]), mi.columns, rotation=30, ha="right", fontsize=8)
    a.set_yticks(range(mi.shape[0]), mi.index, fontsize=8)
    for (r, c), v in np.ndenumerate(mi.to_numpy()):
        a.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
               color="white" if v > 0.6 * mi.to_numpy().max() else "black")
    fig.colorbar(im, ax=a, label="mutual information [nats]")
    a.set_title(f"I(z_d; factor): MIG = {result['mig']:.3f}", fontsize=10)
    off = cm.to_numpy().astype(float).copy()
    np.fill_diagonal(off, np.nan)  # |cos| of an axis with itself is 1: hide it
    im2 = b.imshow(off, cmap="Oranges", vmin=0, vmax=max(np.nanmax(off), 1e-6) if off.size > 1 else 1)
    for (r, c), v in np.ndenumerate(off):
        if np.isfinite(v):
            b.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7)
    b.set_xticks(range(cm.shape[1]), cm.columns, fontsize=8)
    b.set_yticks(range(cm.shape[0]), cm.index, fontsize=8)
    fig.colorbar(im2, ax=b, label="mean |cos| of decoder-Jacobian columns")
    b.set_title(f"Decoder coupling of latent axes: {result['coupling']:.3f}", fontsize=10)
    return _finish(fig, show, save)
