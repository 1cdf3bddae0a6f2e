"""Scanpy-style tools: ``svt.tl.scvae(adata)`` fits a model and writes its results back."""

from __future__ import annotations

import inspect

# VAE diagnostics (rate–distortion, collapse, the two gaps, holes, disentanglement).
from .diagnostics import (  # noqa: F401  (re-exported as svt.tl.*)
    active_units,
    aggregated_posterior,
    amortization_gap,
    decoder_jacobian,
    disentanglement,
    jacobian_coupling,
    latent_traversal,
    mutual_information_gap,
    posterior_collapse,
    rate_distortion_sweep,
    variational_gap,
)
from .model import SCVAE, check_key_added, check_writable
from .ppc import ppc_summary  # noqa: F401  (re-exported: svt.tl.ppc_summary)

_INIT_ARGS = set(inspect.signature(SCVAE.__init__).parameters) - {"self", "adata"}
_TRAIN_ARGS = set(inspect.signature(SCVAE.train).parameters) - {"self"}


def scvae(adata, key_added: str = "scvae", layers: bool = True, **kwargs) -> SCVAE:
    """Fit an :class:`~scvae_tools.SCVAE` on ``adata`` and write its results into it.

    Keyword arguments go to :class:`~scvae_tools.SCVAE` (``n_latent``, ``batch_key``,
    ``likelihood``, …) or to :meth:`~scvae_tools.SCVAE.train` (``max_epochs``, ``seed``,
    ``device``, …). Results land in ``obsm[f"X_{key_added}"]``, ``layers`` (unless
    ``layers=False``) and ``uns[key_added]``; then
    ``sc.pp.neighbors(adata, use_rep="X_scvae")`` works as with PCA.

    Parameters
    ----------
    adata
        Counts in ``X`` or in the ``layer=`` given (see :class:`~scvae_tools.SCVAE`).
    key_added
        Names of the results: ``obsm[f"X_{key_added}"]``, ``layers[f"{key_added}_denoised"]``
        and ``…_expected``, ``uns[key_added]``.
    layers
        Write the two cells × genes layers (``False`` for large data: the latent only).
    **kwargs
        Options of :class:`~scvae_tools.SCVAE` and :meth:`~scvae_tools.SCVAE.train`.

    Returns
    -------
    The trained model.
    """
    unknown = set(kwargs) - _INIT_ARGS - _TRAIN_ARGS
    if unknown:
        raise TypeError(
            f"Unknown argument(s) {sorted(unknown)} for svt.tl.scvae; model options are "
            f"{sorted(_INIT_ARGS)}, training options {sorted(_TRAIN_ARGS)}."
        )
    check_key_added(key_added)  # before training, not after
    model = SCVAE(adata, **{k: v for k, v in kwargs.items() if k in _INIT_ARGS})
    # What write_to_adata would refuse (a path, dense layers too large for backed data) is
    # refused now, not after a fit that the error would then throw away.
    check_writable(adata, layers, model.spec.n_genes, caller="svt.tl.scvae")
    model.train(**{k: v for k, v in kwargs.items() if k in _TRAIN_ARGS})
    model.write_to_adata(adata, key_added=key_added, layers=layers)
    return model


def ppc(model: SCVAE, adata=None, n_samples: int = 10, batch_size: int = 256, seed: int | None = 0):
    """Posterior predictive check: observed vs model-replicated per-gene statistics.

    Simulates ``n_samples`` datasets from the fitted model (z ~ q(z|x), counts ~ p(x|z) at
    each cell's observed library; see :meth:`~scvae_tools.SCVAE.posterior_predictive_sample`)
    and compares per-gene statistics over cells with those of the observed counts. Nothing is
    written to ``adata``.

    Parameters
    ----------
    model
        A trained :class:`~scvae_tools.SCVAE`.
    adata
        AnnData with the model's genes; ``None``: the training data.
    n_samples
        Simulated datasets; the replicated statistics are averaged over them.
    batch_size
        Cells per minibatch (each holds n_samples × cells × genes values).
    seed
        Seeds the simulation.

    Returns
    -------
    DataFrame indexed by gene with, for each statistic ``mean``, ``variance``,
    ``zero_fraction`` (fraction of cells with 0) and ``cv`` (standard deviation / mean):
    ``{stat}_obs``, ``{stat}_rep`` (mean over replicates) and ``{stat}_rep_sd`` (spread over
    replicates). ``svt.tl.ppc_summary(table)`` condenses it to one error per statistic;
    ``svt.pl.ppc(table)`` plots it.

    Examples
    --------
    >>> table = svt.tl.ppc(model, adata, n_samples=10)
    >>> svt.pl.ppc({"NB": table, "Poisson": svt.tl.ppc(poisson_model, adata)})
    """
    from .ppc import ppc as _ppc

    return _ppc(model, adata, n_samples=n_samples, batch_size=batch_size, seed=seed)
