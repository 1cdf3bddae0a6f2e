"""scvae_tools — a Negative Binomial variational autoencoder for single-cell counts.

AnnData in, results back in AnnData::

    import scvae_tools as svt
    model = svt.SCVAE(adata)            # validates counts, never modifies adata
    model.train()
    model.write_to_adata(adata)         # obsm["X_scvae"], layers["scvae_denoised"], ...

Data flows one way: :mod:`~scvae_tools.adapter` (AnnData → tensors) →
:mod:`~scvae_tools.module` (pure torch VAE) → :mod:`~scvae_tools.train` (loop) →
:mod:`~scvae_tools.model` (:class:`SCVAE`) → AnnData. :mod:`scvae_tools.tl` and
:mod:`scvae_tools.pl` hold scanpy-style tools and plots.
"""

__version__ = "0.1.0"

from . import datasets, pl, tl  # noqa: E402
from .model import SCVAE  # noqa: E402

__all__ = ["SCVAE", "datasets", "pl", "tl", "__version__"]
