"""Figures of training and diagnostics (matplotlib only)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd


def _history_of(model_or_history) -> pd.DataFrame:
    if isinstance(model_or_history, pd.DataFrame):
        return model_or_history
    return model_or_history.history


def training_history(model_or_history, show: bool = False):
    """Training curves: ELBO, reconstruction (distortion) and KL (rate) per epoch.

    Parameters
    ----------
    model_or_history
        A trained :class:`~scvae_tools.SCVAE` or its ``history`` DataFrame.
    show
        Call ``plt.show()`` (for scripts; notebooks display the returned figure).

    Returns
    -------
    The figure.
    """
    hist = _history_of(model_or_history)
    if hist.empty:
        raise ValueError("The model has no training history; train it first.")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), constrained_layout=True)
    for a, (col, title) in zip(
        axes,
        [("elbo", "ELBO (nats/cell, higher is better)"),
         ("reconstruction", "Distortion −E[log p(x|z)]"),
         ("kl", "Rate KL(q(z|x) ‖ p(z))")],
        strict=True,
    ):
        a.plot(hist["epoch"], hist[f"train_{col}"], label="train")
        if hist[f"validation_{col}"].notna().any():
            a.plot(hist["epoch"], hist[f"validation_{col}"], label="validation")
        a.set_xlabel("epoch")
        a.set_title(title, fontsize=10)
        a.legend(frameon=False)
    if col == "kl" and "beta" in hist and hist["beta"].nunique() > 1:
        b = axes[2].twinx()
        b.plot(hist["epoch"], hist["beta"], color="grey", ls=":", label="β")
        b.set_ylabel("β in force", color="grey")
    if show:
        plt.show()
    return fig
