"""Scanpy-style plots of training and diagnostics.

Each returns the matplotlib ``Figure`` it drew on. Each takes ``axes=`` (Axes to draw on,
one per panel, instead of a new figure), ``save=`` (a file to write the figure to) and
``show=`` (call ``plt.show()``). In a notebook, a bare call as a cell's last line shows
the figure twice (the inline backend's copy, then the returned value): assign it,
``fig = svt.pl.ppc(table)``, or end the line with ``;``.
"""

from __future__ import annotations

from .plotting import (
    aggregated_posterior,
    amortization_gap,
    disentanglement,
    latent_traversal,
    posterior_collapse,
    ppc,
    rate_distortion,
    training_history,
    variational_gap,
)

__all__ = [
    "aggregated_posterior",
    "amortization_gap",
    "disentanglement",
    "latent_traversal",
    "posterior_collapse",
    "ppc",
    "rate_distortion",
    "training_history",
    "variational_gap",
]
