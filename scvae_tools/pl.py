"""Scanpy-style plots. Each returns the matplotlib ``Axes`` (or ``Figure``) it drew on."""

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
