"""The VAE itself, in plain PyTorch: encoder, decoder, ELBO terms.

Nothing here knows about AnnData. Inputs are count tensors ``x`` (cells × genes), the
library size ``library`` (cells × 1) and covariates (batch codes, categorical codes,
continuous values), which are one-hot encoded and appended to both the encoder and
decoder inputs.

Generative model::

    z ~ N(0, I)                             (or a learned mixture: prior="mog")
    ρ = softmax(f_θ(z, s))                  # gene proportions
    x_g ~ NB(mean = ℓ·ρ_g, inv. dispersion θ_g)   (or ZINB / Poisson)

Inference model: q(z | x, s) = N(μ_φ(log1p x, s), diag σ²_φ(log1p x, s)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .checkpoint import check_field_types
from .distributions import LIKELIHOODS, log_likelihood, log_poisson_sum, sample_counts
from .fused import (
    NonZeros,
    native_ready,
    nb_log_likelihood_from_logits,
    zinb_log_likelihood_from_logits,
)

DISPERSIONS = ("gene", "gene-batch", "gene-cell")
# "normal": N(0, I), KL in closed form. "mog": a learned mixture of diagonal Gaussians
# (weights, means, variances trained with the ELBO); its KL is a Monte-Carlo estimate.
PRIORS = ("normal", "mog")
# The mixture's parameters are stored divided by this factor: Adam's step size is
# scale-free, so the prior then moves this many times faster than the networks' weights and
# can follow the aggregated posterior within a short training run.
_PRIOR_PARAM_SCALE = 10.0


@dataclass
class ModuleConfig:
    """Architecture of a :class:`VAE`; JSON-serialisable."""

    n_genes: int
    n_latent: int = 10
    n_hidden: int = 128
    n_layers: int = 1
    dropout_rate: float = 0.1
    likelihood: str = "nb"
    dispersion: str = "gene"
    n_batch: int = 1
    n_cats_per_cov: list[int] = field(default_factory=list)
    n_continuous_cov: int = 0
    # BatchNorm in both networks (True), neither (False), or only "encoder" / "decoder" (as
    # scvi-tools' use_batch_norm; "both" and "none" are stored as True / False, so configs
    # and checkpoints written before the option keep their identity).
    use_batch_norm: bool | str = True
    prior: str = "normal"
    n_prior_components: int = 10

    def __post_init__(self) -> None:
        for f in fields(self):  # NumPy scalars as Python's: JSON
            value = getattr(self, f.name)
            if isinstance(value, np.generic):
                setattr(self, f.name, value.item())
        self.n_cats_per_cov = [int(n) if isinstance(n, np.integer) else n
                               for n in self.n_cats_per_cov]
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}.")
        if not isinstance(self.n_prior_components, int) or self.n_prior_components < 1:
            raise ValueError(
                f"n_prior_components must be a positive integer, got {self.n_prior_components!r}."
            )
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}.")
        if self.dispersion not in DISPERSIONS:
            raise ValueError(f"dispersion must be one of {DISPERSIONS}, got {self.dispersion!r}.")
        for name in ("n_genes", "n_latent", "n_hidden", "n_layers", "n_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        norm = self.use_batch_norm
        if isinstance(norm, (bool, np.bool_)):  # not 1 or 1.0: they would save, then not load
            norm = bool(norm)
        elif isinstance(norm, str) and norm in ("both", "none", "encoder", "decoder"):
            norm = {"both": True, "none": False}.get(norm, norm)
        else:
            raise ValueError("use_batch_norm must be 'both', 'encoder', 'decoder' or 'none', "
                             f"got {self.use_batch_norm!r}.")
        self.use_batch_norm = norm
        # Checked after the settings above, which say what they accept; the same rule as
        # on load (checkpoint.build_dataclass): a model that saves must load again.
        check_field_types(self)
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}.")

    @property
    def n_covariates(self) -> int:
        """Width of the covariate vector appended to encoder and decoder inputs."""
        return (self.n_batch if self.n_batch > 1 else 0) + sum(self.n_cats_per_cov) + self.n_continuous_cov

    def to_dict(self) -> dict:
        return asdict(self)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask comes from ``torch.rand``: on a CPU, forward and
    backward take about two thirds of the built-in's time, whose ``bernoulli_`` draw is
    slow (accelerators keep the built-in kernel). Same semantics: zero with probability p,
    scale the rest by 1/(1−p)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if self.p == 1:
            return x * 0.0
        keep = torch.rand(x.shape, dtype=x.dtype, device=x.device).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * keep.to(x.dtype)


def mlp(n_in: int, n_hidden: int, n_layers: int, dropout: float, batch_norm: bool) -> nn.Sequential:
    """Linear → BatchNorm → ReLU → Dropout, ``n_layers`` times."""
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers.append(nn.Linear(n_in if i == 0 else n_hidden, n_hidden))
        if batch_norm:
            # scvi-tools' settings: slow running statistics, a larger eps for stability.
            layers.append(nn.BatchNorm1d(n_hidden, momentum=0.01, eps=1e-3))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(Dropout(dropout))
    return nn.Sequential(*layers)


def _full(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32: bf16 autocast outputs are cast up, float32/64 kept as is."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class Encoder(nn.Module):
    """q(z | x, s): an MLP on log1p counts (+ covariates) to a diagonal Gaussian."""

    def __init__(self, cfg: ModuleConfig):
        super().__init__()
        self.body = mlp(cfg.n_genes + cfg.n_covariates, cfg.n_hidden, cfg.n_layers,
                        cfg.dropout_rate, cfg.use_batch_norm in (True, "encoder"))
        self.mean = nn.Linear(cfg.n_hidden, cfg.n_latent)
        self.log_var = nn.Linear(cfg.n_hidden, cfg.n_latent)

    def forward(self, x: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: counts, dense or a sparse CSR tensor (inference on the CPU)."""
        if x.layout == torch.sparse_csr:
            h = self.body[1:](self._first_layer_sparse(x, cov))
        else:
            # log(1 + x) for counts x ≥ 0: the same values as log1p, and a faster kernel.
            h = (x + 1.0).log_()
            if cov.shape[1] and not torch.is_grad_enabled():
                # Genes and covariates apart, as the sparse path does: the genes' product
                # then has the same shape whatever columns load_query adds for new batches,
                # so reference cells keep exactly their latent.
                h = torch.addmm(self.body[0].bias, h, self._genes_by_hidden(x.shape[1]))
                h = self.body[1:](self._plus_covariates(h, cov))
            else:
                if cov.shape[1]:
                    h = torch.cat([h, cov], dim=1)
                h = self.body(h)
        # At least float32 out even under bf16 autocast: the KL and z need the precision.
        # A small floor on the variance keeps the KL and sampling safe.
        return _full(self.mean(h)), torch.exp(_full(self.log_var(h))) + 1e-4

    def _first_layer_sparse(self, x: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """The first Linear layer on log1p of sparse counts: log1p and the product touch
        only the non-zeros (~10% of a 10x matrix), and no dense block is built.

        A cell's pre-activation is the bias plus the sum, over its non-zero genes, of
        log1p(count) times that gene's weight column: an embedding bag over genes with
        per-entry weights, a kernel about twice as fast as torch's sparse × dense product.
        """
        first = self.body[0]
        n_genes = x.shape[1]
        weight = self._genes_by_hidden(n_genes)
        h = None
        if (not torch.is_grad_enabled() and weight.shape[1] % 16 == 0
                and native_ready(weight, x.values(), first.bias)):
            # The compiled kernel (no gradient): log1p and the product in one cache-blocked
            # pass, about twice torch's embedding bag. None if columns are not sorted.
            h = native.log1p_linear_csr(x.crow_indices(), x.col_indices(), x.values(), weight,
                                        first.bias.detach())
        if h is None:
            h = F.embedding_bag(x.col_indices(), weight, x.crow_indices(), mode="sum",
                                per_sample_weights=torch.log1p(x.values()).to(weight.dtype),
                                include_last_offset=True)
            h = h.add_(first.bias)
        return self._plus_covariates(h, cov)

    def _plus_covariates(self, h: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """``h`` (the first layer's bias plus its genes' product) plus the covariates'
        product: the covariate columns are the first layer's last ones."""
        if not cov.shape[1]:
            return h
        first = self.body[0]
        return h + cov.to(h.dtype) @ first.weight[:, first.weight.shape[1] - cov.shape[1]:].T

    def _genes_by_hidden(self, n_genes: int) -> torch.Tensor:
        """The first layer's gene weights as a contiguous (genes × hidden) table.

        Transposing costs about as much as the product itself, so without gradients the
        table is kept until the weight changes (a new tensor, or an in-place update such as
        ``load_state_dict``, bumps the key). Fused Adam steps do not bump the version
        counter: the trainer calls :meth:`VAE.forget_cached_weights` before it scores
        cells and when it ends.
        """
        w = self.body[0].weight
        # With gradients the table must stay differentiable; weights created under
        # inference_mode have no version counter to key a cache on.
        if torch.is_grad_enabled() or w.is_inference():
            return w[:, :n_genes].T.contiguous()
        key = (w.data_ptr(), w._version, w.device, n_genes)
        if getattr(self, "_gene_table_key", None) != key:
            self._gene_table = w[:, :n_genes].T.contiguous()
            self._gene_table_key = key
        return self._gene_table


class Decoder(nn.Module):
    """p(x | z, s): an MLP from z (+ covariates) to gene proportions, dispersion, dropout."""

    def __init__(self, cfg: ModuleConfig):
        super().__init__()
        self.cfg = cfg
        # No dropout in the decoder (as in scvi-tools): it would blur the reconstruction.
        self.body = mlp(cfg.n_latent + cfg.n_covariates, cfg.n_hidden, cfg.n_layers, 0.0,
                        cfg.use_batch_norm in (True, "decoder"))
        self.scale = nn.Linear(cfg.n_hidden, cfg.n_genes)
        self.dropout = nn.Linear(cfg.n_hidden, cfg.n_genes) if cfg.likelihood == "zinb" else None
        self.log_theta_cell = (
            nn.Linear(cfg.n_hidden, cfg.n_genes) if cfg.dispersion == "gene-cell" else None
        )

    def hidden(self, z: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """The last hidden layer, from which every output head reads."""
        h = torch.cat([z, cov.expand(*z.shape[:-1], cov.shape[-1])], dim=-1) if cov.shape[-1] else z
        if h.dim() == 3:  # (samples, cells, latent): BatchNorm wants 2-D
            s, n, _ = h.shape
            return self.body(h.reshape(s * n, -1)).reshape(s, n, -1)
        return self.body(h)

    def forward(self, z: torch.Tensor, cov: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.hidden(z, cov)
        # At least float32 even under bf16 autocast: the likelihood sums thousands of genes.
        out = {"logits": _full(self.scale(h))}
        if self.dropout is not None:
            out["pi_logits"] = _full(self.dropout(h))
        if self.log_theta_cell is not None:
            out["log_theta"] = _full(self.log_theta_cell(h))
        return out


class VAE(nn.Module):
    """Variational autoencoder for counts; see the module docstring for the model."""

    def __init__(self, cfg: ModuleConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # Inverse dispersion: none for a Poisson (a parameter without gradients would also
        # send every optimiser step down torch's slower path).
        if cfg.likelihood != "poisson" and cfg.dispersion == "gene":
            self.log_theta = nn.Parameter(torch.randn(cfg.n_genes) * 0.1)
        elif cfg.likelihood != "poisson" and cfg.dispersion == "gene-batch":
            self.log_theta = nn.Parameter(torch.randn(cfg.n_genes, cfg.n_batch) * 0.1)
        else:
            self.register_parameter("log_theta", None)
        if cfg.prior == "mog":
            k = cfg.n_prior_components
            # Start near N(0, I): unit variances, means spread a little so components differ.
            self.prior_means = nn.Parameter(torch.randn(k, cfg.n_latent) * 0.5 / _PRIOR_PARAM_SCALE)
            self.prior_log_var = nn.Parameter(torch.zeros(k, cfg.n_latent))
            self.prior_logits = nn.Parameter(torch.zeros(k))
        if torch.get_default_dtype() != torch.float32:
            # float32 whatever the caller's default (the counts, the compiled kernels and
            # saved models are; under a float64 default the data could not feed the model)
            self.float()

    # ------------------------------------------------------------------ prior
    def _mog_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The clamp keeps a component from shrinking to a spike (KL → ∞) or blowing up.
        c = _PRIOR_PARAM_SCALE
        log_var = (c * self.prior_log_var).clamp(-6.0, 4.0)
        return c * self.prior_means, log_var, torch.log_softmax(c * self.prior_logits, 0)

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) summed over latent dimensions, shape ``z.shape[:-1]``."""
        if self.cfg.prior == "normal":
            return _std_normal_log_prob(z).sum(-1)
        means, log_var, log_w = self._mog_parts()
        diff = z.unsqueeze(-2) - means  # (..., k, latent)
        comp = -0.5 * (diff.pow(2) / log_var.exp() + log_var + math.log(2 * math.pi)).sum(-1)
        return torch.logsumexp(comp + log_w, dim=-1)

    def prior_log_prob_per_dim(self, z: torch.Tensor) -> torch.Tensor:
        """log of each dimension's marginal prior density, shape ``z.shape``."""
        if self.cfg.prior == "normal":
            return _std_normal_log_prob(z)
        means, log_var, log_w = self._mog_parts()
        diff = z.unsqueeze(-2) - means
        comp = -0.5 * (diff.pow(2) / log_var.exp() + log_var + math.log(2 * math.pi))
        return torch.logsumexp(comp + log_w.unsqueeze(-1), dim=-2)

    @torch.no_grad()
    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws from p(z) on the module's device, (n, n_latent)."""
        param = next(self.parameters())
        eps = torch.randn(n, self.cfg.n_latent, generator=generator,
                          dtype=param.dtype).to(param.device)
        dev = param.device
        if self.cfg.prior == "normal":
            return eps
        means, log_var, log_w = self._mog_parts()
        comp = torch.multinomial(log_w.exp().cpu(), n, replacement=True, generator=generator).to(dev)
        return means[comp] + (0.5 * log_var[comp]).exp() * eps

    def kl_per_dim(
        self, qz_m: torch.Tensor, qz_v: torch.Tensor, z: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL per cell, KL per cell and dimension) of q(z|x) to the prior, in nats.

        Standard normal prior: closed form, and the total is the sum over dimensions. Learned
        prior: Monte-Carlo estimate log q(z|x) − log p(z) at the sample ``z`` (drawn here when
        not given); per dimension, the same against each dimension's marginal prior (their sum
        is not the total KL, since a mixture does not factorise over dimensions).
        """
        if self.cfg.prior == "normal":
            per_dim = kl_normal_std(qz_m, qz_v)
            return per_dim.sum(-1), per_dim
        if z is None:
            z = qz_m + qz_v.sqrt() * torch.randn_like(qz_m)
        log_q = -0.5 * ((z - qz_m).pow(2) / qz_v + torch.log(qz_v) + math.log(2 * math.pi))
        kl = log_q.sum(-1) - self.prior_log_prob(z)
        return kl, log_q - self.prior_log_prob_per_dim(z)

    # ------------------------------------------------------------------ covariates
    def covariates(
        self,
        batch_index: torch.Tensor,
        cat_covs: torch.Tensor | None = None,
        cont_covs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One-hot batch and categorical covariates, plus continuous ones: (cells, n_covariates)."""
        parts = []
        if self.cfg.n_batch > 1:
            parts.append(F.one_hot(batch_index, self.cfg.n_batch).float())
        for i, n_cat in enumerate(self.cfg.n_cats_per_cov):
            parts.append(F.one_hot(cat_covs[:, i], n_cat).float())
        if self.cfg.n_continuous_cov:
            parts.append(cont_covs.float())
        if not parts:
            return batch_index.new_zeros((batch_index.shape[0], 0), dtype=torch.float32)
        return torch.cat(parts, dim=1)

    @property
    def fused_likelihood(self) -> bool:
        """Whether :meth:`log_px` scores from the decoder logits alone (NB, ZINB), so that
        the ELBO can decode without the means (``decode(..., means=False)``)."""
        return self.cfg.likelihood in ("nb", "zinb")

    def decode_for_likelihood(self, z: torch.Tensor, library: torch.Tensor, cov: torch.Tensor,
                              batch_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`decode` with only what :meth:`log_px` reads: the fused NB / ZINB score
        from the logits, so no cells × genes means are built for them."""
        return self.decode(z, library, cov, batch_index, means=not self.fused_likelihood)

    def forget_cached_weights(self) -> None:
        """Drop tables derived from the weights (the encoder's genes × hidden copy): for
        callers that change weights in place without bumping their version counter, as
        ``torch.optim.Adam(fused=True)`` does."""
        self.encoder._gene_table_key = None

    # ------------------------------------------------------------------ pieces
    def encode(self, x: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and variance of q(z | x)."""
        return self.encoder(x, cov)

    def decode(
        self, z: torch.Tensor, library: torch.Tensor, cov: torch.Tensor, batch_index: torch.Tensor,
        means: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Likelihood parameters of p(x | z): ``mu`` (mean counts), ``scale`` (proportions),
        ``theta`` (inverse dispersion, NB/ZINB) and ``pi_logits`` (ZINB), plus ``logits``,
        ``log_library`` and ``log_theta`` for the fused NB likelihood (with
        ``dispersion="gene-batch"``: the batches × genes table and each cell's row of it,
        ``theta_index``, which the fused likelihood reads without a cells × genes copy).

        ``means=False`` skips ``mu``/``scale``/``theta`` where the likelihood does not need
        them (NB, ZINB): their ELBO needs only the logits, and skipping them saves passes
        over cells × genes.
        """
        out = self.decoder(z, cov)
        logits = out["logits"]
        log_library = torch.log(library)
        params = {"logits": logits, "log_library": log_library}
        if means:
            log_scale = torch.log_softmax(logits, dim=-1)
            params.update(scale=log_scale.exp(), mu=(log_scale + log_library).exp())
        if self.cfg.likelihood != "poisson":
            if self.cfg.dispersion == "gene-batch":
                params["log_theta"], params["theta_index"] = self.log_theta.T, batch_index
            else:
                params["log_theta"] = self._log_theta(out, batch_index)
            if means:
                params["theta"] = self._theta(out, batch_index)
        if "pi_logits" in out:
            params["pi_logits"] = out["pi_logits"]
        return params

    def proportions(self, z: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """Decoded gene proportions ρ = softmax(logits) (rows sum to 1); μ = ℓ·ρ.

        The cheapest decode for denoised expression: one softmax, no dispersion or means.
        """
        return torch.softmax(self.decoder(z, cov)["logits"], dim=-1)

    def scaled_proportions_(self, z: torch.Tensor, cov: torch.Tensor,
                            scale: float | torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write ``scale · ρ`` for 2-D ``z`` into ``out`` (cells × genes, float32) and return it.

        The logits, the softmax and the scaling all happen in ``out``'s memory. On the CPU each
        fresh cells × genes buffer costs page faults on first touch (as much time as the
        softmax itself), so denoised expression touches one buffer instead of three. With
        :mod:`~scvae_tools.native`'s compiled kernel the softmax and scaling then read and
        write each row of ``out`` once (torch's in-place operations take five passes).
        """
        head = self.decoder.scale
        h = self.decoder.hidden(z, cov)
        # The bias rides in the product as a column of ones: addmm would first copy the
        # broadcast bias into all of ``out`` (a whole extra pass over cells × genes, ~20% of
        # the product's time); the extra inner dimension costs <1%.
        ones = torch.ones((h.shape[0], 1), dtype=h.dtype, device=h.device)
        weight = torch.cat([head.weight, head.bias[:, None]], dim=1)
        torch.mm(torch.cat([h, ones], dim=1), weight.T, out=out)
        if out.is_contiguous() and native_ready(out):
            return native.softmax_scale_(out, scale)  # one memory pass, not five
        # exp without subtracting each row's maximum first saves two passes. It gives the
        # softmax to float rounding as long as no logit overflows (the row sum is finite)
        # and the largest is not far below zero (a sum ≥ 1e-20: only proportions below
        # ~1e-18 could lose digits to underflow). Rows that fail are redone the usual way.
        total = out.exp_().sum(dim=-1, keepdim=True)
        bad = ~(total.isfinite() & (total >= 1e-20))
        if bad.any():
            rows = bad.squeeze(1).nonzero().squeeze(1)
            out[rows] = torch.softmax(head(h[rows]), dim=-1)
            total[rows] = 1.0
        return out.mul_(scale / total)

    def _log_theta(self, out: dict[str, torch.Tensor], batch_index: torch.Tensor) -> torch.Tensor:
        if self.cfg.dispersion == "gene":
            return self.log_theta
        if self.cfg.dispersion == "gene-batch":
            return self.log_theta.T[batch_index]  # (cells, genes)
        return out["log_theta"]

    def _theta(self, out: dict[str, torch.Tensor], batch_index: torch.Tensor) -> torch.Tensor:
        return self._log_theta(out, batch_index).exp()

    def log_px(self, x: torch.Tensor, params: dict[str, torch.Tensor],
               nonzero: NonZeros | None = None) -> torch.Tensor:
        """log p(x | z) summed over genes, one value per cell (and sample).

        For the NB and ZINB likelihoods with decoder ``logits`` in ``params`` this is the
        fused, sparsity-aware :func:`~scvae_tools.fused.nb_log_likelihood_from_logits` or
        :func:`~scvae_tools.fused.zinb_log_likelihood_from_logits` (one pass, hand-written
        gradient; ``nonzero``: the non-zeros of ``x`` when known); otherwise (Poisson) the
        element-wise formula of ``distributions``.
        """
        fused = "logits" in params and "log_theta" in params
        if self.cfg.likelihood == "nb" and fused:
            return nb_log_likelihood_from_logits(
                params["logits"], params["log_library"], params["log_theta"], x, nonzero,
                params.get("theta_index"))
        if self.cfg.likelihood == "zinb" and fused and "pi_logits" in params:
            return zinb_log_likelihood_from_logits(
                params["logits"], params["log_library"], params["log_theta"],
                params["pi_logits"], x, nonzero, params.get("theta_index"))
        if self.cfg.likelihood == "poisson":  # per cell, at the non-zeros on the CPU
            return log_poisson_sum(x, params["mu"])
        ll = log_likelihood(
            self.cfg.likelihood, x, params["mu"], params.get("theta"), params.get("pi_logits")
        )
        return ll.sum(-1)

    # ------------------------------------------------------------------ ELBO
    def elbo_terms(
        self,
        x: torch.Tensor,
        library: torch.Tensor,
        batch_index: torch.Tensor,
        cat_covs: torch.Tensor | None = None,
        cont_covs: torch.Tensor | None = None,
        sample: bool = True,
        nonzero: NonZeros | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-cell ELBO pieces with one reparameterised sample of z.

        Returns ``log_px`` (reconstruction log-likelihood, nats), ``kl`` (KL to the prior,
        nats), ``kl_per_dim`` (cells × latent), and ``qz_mean``/``qz_var``. ``nonzero``:
        the non-zeros of ``x`` when the data path knows them (``Batch.nonzero``).
        """
        cov = self.covariates(batch_index, cat_covs, cont_covs)
        qz_m, qz_v = self.encode(x, cov)
        # A learned prior's KL is estimated at a sample, so draw one even when decoding the mean.
        draw = sample or self.cfg.prior != "normal"
        z_sample = qz_m + qz_v.sqrt() * torch.randn_like(qz_m) if draw else None
        z = z_sample if sample else qz_m
        params = self.decode_for_likelihood(z, library, cov, batch_index)
        kl, kl_per_dim = self.kl_per_dim(qz_m, qz_v, z_sample)
        return {
            "log_px": self.log_px(x, params, nonzero),
            "kl": kl,
            "kl_per_dim": kl_per_dim,
            "qz_mean": qz_m,
            "qz_var": qz_v,
        }

    def loss(
        self, terms: dict[str, torch.Tensor], beta: float = 1.0, free_bits: float = 0.0
    ) -> torch.Tensor:
        """Mean over cells of −log p(x|z) + β·KL, with an optional per-dimension KL floor.

        Free bits (Kingma et al. 2016): each latent dimension's batch-mean KL counts at
        least ``free_bits`` nats, so the optimiser gains nothing by collapsing it below that.
        """
        if free_bits > 0:
            # KL + Σ_d max(0, λ − KL_d): equals Σ_d max(KL_d, λ) for the standard normal prior,
            # and stays the full KL plus the floor penalty for a learned (non-factorised) prior.
            kl_d = terms["kl_per_dim"].mean(0)
            kl = terms["kl"].mean() + torch.clamp(free_bits - kl_d, min=0.0).sum()
        else:
            kl = terms["kl"].mean()
        return -terms["log_px"].mean() + beta * kl

    @torch.no_grad()
    def importance_weighted_log_px(
        self,
        x: torch.Tensor,
        library: torch.Tensor,
        batch_index: torch.Tensor,
        cat_covs: torch.Tensor | None = None,
        cont_covs: torch.Tensor | None = None,
        n_samples: int = 100,
        chunk: int | None = None,
        nonzero: NonZeros | None = None,
    ) -> torch.Tensor:
        """IWAE estimate of log p(x) per cell with ``n_samples`` samples from q(z|x).

        log p(x) ≈ logsumexp_k[log p(x|z_k) + log p(z_k) − log q(z_k|x)] − log K, a lower
        bound that tightens as K grows and equals the ELBO in expectation at K = 1.
        ``nonzero``: the non-zeros of ``x`` when the data path knows them. ``chunk``:
        samples decoded at once (default: :func:`samples_per_block`).
        """
        chunk = chunk or samples_per_block(*x.shape)
        cov = self.covariates(batch_index, cat_covs, cont_covs)
        qz_m, qz_v = self.encode(x, cov)
        std = qz_v.sqrt()
        log_w = []
        for start in range(0, n_samples, chunk):
            k = min(chunk, n_samples - start)
            eps = torch.randn((k, *qz_m.shape), device=x.device, dtype=qz_m.dtype)
            z = qz_m + std * eps  # (k, cells, latent)
            params = self.decode_for_likelihood(z, library, cov, batch_index)
            log_pz = self.prior_log_prob(z)
            log_qz = (_std_normal_log_prob(eps) - torch.log(std)).sum(-1)
            log_w.append(self.log_px(x, params, nonzero) + log_pz - log_qz)
        return torch.logsumexp(torch.cat(log_w, 0), dim=0) - math.log(n_samples)

    @torch.no_grad()
    def sample_counts(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Draw counts from p(x | z) given decoded parameters."""
        return sample_counts(
            self.cfg.likelihood, params["mu"], params.get("theta"), params.get("pi_logits")
        )


BLOCK_VALUES = 1 << 24


def samples_per_block(n_cells: int, n_genes: int, most: int = 25) -> int:
    """Posterior samples to decode at once: a samples × cells × genes block of at most
    ``BLOCK_VALUES`` (~2²⁴) values, a few hundred MB with the likelihood's temporaries,
    however many genes."""
    return max(1, min(int(most), BLOCK_VALUES // max(1, n_cells * n_genes)))


def kl_normal_std(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(N(mean, var) ‖ N(0, 1)) per dimension."""
    return 0.5 * (var + mean.pow(2) - 1.0 - torch.log(var))


def _std_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z.pow(2) + math.log(2 * math.pi))
