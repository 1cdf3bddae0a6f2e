"""Count likelihoods: Negative Binomial, zero-inflated NB and Poisson log-probabilities.

All functions return the *full normalised* log-probability mass, including the
``-log Γ(x + 1)`` term, so that values are comparable across tools (scvi-tools uses
the same convention). Shapes broadcast; everything is differentiable in the
parameters. The NB is parameterised by its mean ``mu`` and inverse dispersion
``theta`` (variance ``mu + mu² / theta``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LIKELIHOODS = ("nb", "zinb", "poisson")

_EPS = 1e-8


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Log-pmf of the Negative Binomial NB(x; mean ``mu``, inverse dispersion ``theta``).

    log p = lgamma(x+θ) − lgamma(θ) − lgamma(x+1) + θ·log(θ/(θ+μ)) + x·log(μ/(θ+μ))
    """
    log_theta_mu = torch.log(theta + mu + _EPS)
    return (
        theta * (torch.log(theta + _EPS) - log_theta_mu)
        + x * (torch.log(mu + _EPS) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1.0)
    )


def log_zinb(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor
) -> torch.Tensor:
    """Log-pmf of the zero-inflated NB; ``pi_logits`` are the logits of the extra-zero mass.

    p(0) = π + (1−π)·NB(0), p(x>0) = (1−π)·NB(x).
    """
    log_nb_x = log_nb(x, mu, theta)
    # log(1 - π) = -softplus(logits); log π = logits - softplus(logits)
    log_one_minus_pi = -F.softplus(pi_logits)
    log_nb_zero = theta * (torch.log(theta + _EPS) - torch.log(theta + mu + _EPS))
    zero_case = torch.logaddexp(pi_logits, log_nb_zero) + log_one_minus_pi
    nonzero_case = log_one_minus_pi + log_nb_x
    return torch.where(x < 0.5, zero_case, nonzero_case)


def log_poisson(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Log-pmf of the Poisson with mean ``mu``."""
    return x * torch.log(mu + _EPS) - mu - torch.lgamma(x + 1.0)


def log_likelihood(
    likelihood: str,
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor | None = None,
    pi_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Element-wise log-probability of counts ``x`` under the named likelihood."""
    if likelihood == "nb":
        return log_nb(x, mu, theta)
    if likelihood == "zinb":
        return log_zinb(x, mu, theta, pi_logits)
    if likelihood == "poisson":
        return log_poisson(x, mu)
    raise ValueError(f"Unknown likelihood {likelihood!r}; choose one of {LIKELIHOODS}.")


def sample_counts(
    likelihood: str,
    mu: torch.Tensor,
    theta: torch.Tensor | None = None,
    pi_logits: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw counts from the named likelihood (NB as a Gamma–Poisson mixture)."""
    if likelihood == "poisson":
        rate = mu
    else:
        # Gamma(shape=θ, rate=θ/μ) has mean μ; Poisson of it is NB(μ, θ).
        gamma = torch._standard_gamma(theta.expand_as(mu).clamp_min(_EPS))
        rate = gamma * mu / theta.clamp_min(_EPS)
    counts = torch.poisson(rate.clamp(max=1e8), generator=generator)
    if likelihood == "zinb":
        pi = torch.sigmoid(pi_logits)
        dropout = torch.rand(mu.shape, generator=generator, device=mu.device) < pi
        counts = counts.masked_fill(dropout, 0.0)
    return counts
