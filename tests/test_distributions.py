"""Likelihoods against scipy.stats, and the closed-form KL against Monte Carlo."""

import numpy as np
import pytest
import scipy.stats as st
import torch

from scvae_tools.distributions import log_nb, log_poisson, log_poisson_sum, log_zinb, sample_counts
from scvae_tools.module import kl_normal_std

RNG = np.random.default_rng(0)
X = RNG.poisson(3.0, size=(50, 40)).astype(np.float64)
X[:, :5] = RNG.poisson(200.0, size=(50, 5))  # large counts too
MU = RNG.gamma(2.0, 2.0, size=(50, 40)) + 1e-2
THETA = RNG.gamma(2.0, 1.0, size=(1, 40)) + 1e-2
PI_LOGITS = RNG.normal(-1.0, 1.0, size=(50, 40))


def t(a):
    return torch.as_tensor(a, dtype=torch.float64)


def nb_scipy(x, mu, theta):
    # scipy's nbinom(n, p): n = θ successes, p = θ / (θ + μ) gives mean μ.
    return st.nbinom.logpmf(x, theta, theta / (theta + mu))


def test_nb_matches_scipy():
    ours = log_nb(t(X), t(MU), t(THETA)).numpy()
    np.testing.assert_allclose(ours, nb_scipy(X, MU, THETA), rtol=1e-5, atol=1e-5)


def test_poisson_matches_scipy():
    ours = log_poisson(t(X), t(MU)).numpy()
    np.testing.assert_allclose(ours, st.poisson.logpmf(X, MU), rtol=1e-5, atol=1e-5)


def test_zinb_matches_mixture():
    pi = 1.0 / (1.0 + np.exp(-PI_LOGITS))
    nb_pmf = np.exp(nb_scipy(X, MU, THETA))
    ref = np.log(np.where(X == 0, pi + (1 - pi) * nb_pmf, (1 - pi) * nb_pmf))
    ours = log_zinb(t(X), t(MU), t(THETA), t(PI_LOGITS)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_zinb_of_fractional_counts_is_the_nb_as_dropout_vanishes():
    """allow_non_integer=True data have counts in (0, 0.5): they are not zeros (they took the
    zero branch, whatever their value). With π → 0 the ZINB is the NB everywhere."""
    x = t([[0.0, 0.1, 0.3, 0.49, 0.5, 2.7]])
    mu, theta, no_dropout = t([[2.0] * 6]), t([[2.0] * 6]), t([[-40.0] * 6])
    np.testing.assert_allclose(log_zinb(x, mu, theta, no_dropout).numpy(),
                               log_nb(x, mu, theta).numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("which", ["nb", "zinb", "nb_sparse"])
def test_zero_counts_of_near_poisson_genes_keep_float32_accuracy(which):
    """log NB(0) = θ·log(θ/(θ+μ)) ≈ −μ when θ ≫ μ. As a difference of two logs it used to
    cancel in float32: at θ = 1e5 the value was off by up to ~50% and its gradient in θ
    had the wrong size."""
    from scvae_tools.distributions import log_nb_sparse

    mu = torch.tensor([[0.5, 1.0, 2.0, 5.0]]).repeat(3, 1)
    theta = torch.tensor([[1e3], [1e4], [1e5]]).expand(3, 4)
    x = torch.zeros(3, 4)

    def value_and_grad(dtype):
        th = theta.to(dtype).clone().requires_grad_()
        args = (x.to(dtype), mu.to(dtype), th)
        if which == "nb":
            v = log_nb(*args)
        elif which == "zinb":
            v = log_zinb(*args, torch.full((3, 4), -30.0, dtype=dtype))  # π → 0: the NB
        else:
            v = log_nb_sparse(*args)
        v.sum().backward()
        return v.detach().double(), th.grad.double()

    (v32, g32), (v64, g64) = value_and_grad(torch.float32), value_and_grad(torch.float64)
    torch.testing.assert_close(v32, v64, rtol=1e-6, atol=0.0)
    # ∂/∂θ of −θ·log1p(μ/θ) ≈ μ²/(2θ²): tiny (1e-11 to 1e-5 here). float32 keeps the
    # larger ones to a part in a thousand (the difference of logs was off by ~1e-6).
    torch.testing.assert_close(g32, g64, rtol=1e-3, atol=1e-3 * float(g64.abs().max()))


def test_nb_float32_close_to_scipy():
    ours = log_nb(torch.tensor(X, dtype=torch.float32), torch.tensor(MU, dtype=torch.float32),
                  torch.tensor(THETA, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(ours, nb_scipy(X, MU, THETA), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_samples_have_the_right_mean_and_variance(likelihood):
    torch.manual_seed(0)
    mu = torch.full((20000, 3), 5.0, dtype=torch.float64)
    theta = torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)
    pi_logits = torch.full_like(mu, -1.0)
    x = sample_counts(likelihood, mu, theta, pi_logits).numpy()
    pi = 1 / (1 + np.e) if likelihood == "zinb" else 0.0
    nb_var = 5.0 + 25.0 / 2.0 if likelihood != "poisson" else 5.0
    mean = (1 - pi) * 5.0
    var = (1 - pi) * (nb_var + 25.0) - mean**2
    np.testing.assert_allclose(x.mean(), mean, rtol=0.03)
    np.testing.assert_allclose(x.var(), var, rtol=0.06)


def test_closed_form_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mean = torch.tensor([0.0, 1.5, -2.0, 0.3], dtype=torch.float64)
    var = torch.tensor([1.0, 0.2, 3.0, 0.05], dtype=torch.float64)
    q = torch.distributions.Normal(mean, var.sqrt())
    p = torch.distributions.Normal(0.0, 1.0)
    z = q.sample((400000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    np.testing.assert_allclose(kl_normal_std(mean, var).numpy(), mc.numpy(), atol=0.01)
    assert kl_normal_std(mean, var)[0].item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("theta", [1e3, 1e4])
def test_nonzero_counts_of_near_poisson_genes_keep_the_dispersion_gradient(theta):
    """lgamma(x+θ) − lgamma(θ) at non-zero counts cancelled in float32. Each cell's gradient
    in log θ (a ZINB with π → 0; one θ per cell so that nothing is summed) is now within
    float32 rounding of its terms: they are each ~x, their sum is ~μ²/θ."""
    gen = torch.Generator().manual_seed(0)
    mu = torch.rand(2000, 1, generator=gen, dtype=torch.float64) * 5 + 0.1
    x = torch.poisson(mu, generator=gen)
    no_dropout = torch.full_like(mu, -30.0)

    def grad(dtype):
        lt = torch.full((2000, 1), np.log(theta), dtype=dtype, requires_grad=True)
        log_zinb(x.to(dtype), mu.to(dtype), lt.exp(), no_dropout.to(dtype)).sum().backward()
        return lt.grad.double()

    want, got = grad(torch.float64), grad(torch.float32)
    err = (got - want).abs()
    assert float(err.max()) < 2e-6 * float(x.max()) + 0.01 * float(want.abs().max()), (
        float(err.max()), float(want.abs().max()))


def test_one_theta_per_cell_is_not_taken_for_one_per_gene():
    """θ of shape (cells, 1) with as many cells as genes was read as one θ per gene."""
    x, mu = t(X[:4, :4]), t(MU[:4, :4])
    theta = t([[0.5], [2.0], [10.0], [100.0]])
    np.testing.assert_allclose(log_nb(x, mu, theta).numpy(),
                               nb_scipy(X[:4, :4], MU[:4, :4], theta.numpy()), rtol=1e-6, atol=1e-6)


def test_a_single_dispersion_broadcasts():
    """θ as a 0-d tensor (one for all genes), and all-0-d inputs: an IndexError before."""
    x, mu = torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.5, 2.0, 3.0]])
    torch.testing.assert_close(log_nb(x, mu, torch.tensor(2.0)),
                               log_nb(x, mu, torch.tensor([2.0])))
    want = st.nbinom.logpmf(3, 1.5, 1.5 / 3.5)
    assert abs(float(log_nb(torch.tensor(3.0), torch.tensor(2.0), torch.tensor(1.5))) - want) < 1e-5
    assert torch.isfinite(log_zinb(x, mu, torch.tensor(2.0), torch.tensor(0.0))).all()


@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_sparse_nb_keeps_float32_accuracy_at_large_dispersion(theta):
    """log_nb_sparse took lgamma(x+θ) − lgamma(θ) in float32: 1.5 nats off at θ = 1e6, and
    the gradient in θ had the wrong sign at 1e4. It now equals log_nb (float64 inside)."""
    from scvae_tools.distributions import log_nb_sparse

    x = torch.tensor([[3.0, 7.0, 20.0, 0.0]])
    mu = torch.tensor([[2.0, 5.0, 18.0, 1.0]])
    t = torch.full((4,), theta, requires_grad=True)
    got = log_nb_sparse(x, mu, t)
    got.sum().backward()
    t64 = torch.full((4,), theta, dtype=torch.float64, requires_grad=True)
    want = log_nb(x.double(), mu.double(), t64).sum(-1)
    want.sum().backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=1e-4)
    assert (torch.sign(t.grad) == torch.sign(t64.grad)).all()
    without = log_nb_sparse(x, mu, t, include_constant=False)
    torch.testing.assert_close(without - got, torch.lgamma(x + 1).sum(-1))


@pytest.mark.parametrize("which", ["nb", "zinb", "poisson"])
def test_deep_cells_keep_float32_accuracy(which):
    """Cells of ~1e6 counts (deep full-length protocols): in float32 each count's
    log-probability stays within 1e-4 nats of scipy's float64 value and a cell's sum within
    0.01. Written as differences of large logs (x·log μ − x·log(θ+μ), x·log μ − lgamma(x+1))
    entries were ~0.1 off and cells ~0.3."""
    rng = np.random.default_rng(4)
    mu = rng.dirichlet(np.full(300, 0.3), size=8) * 1e6 + 1e-3
    theta = rng.gamma(2.0, 1.0, size=(1, 300)) + 0.05
    pi_logits = rng.normal(-2.0, 1.0, size=mu.shape)
    if which == "poisson":
        x = rng.poisson(mu).astype(np.float64)
        ref, got = st.poisson.logpmf(x, mu), log_poisson(torch.tensor(x).float(),
                                                          torch.tensor(mu).float())
    else:
        x = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float64)
        ref = nb_scipy(x, mu, theta)
        if which == "nb":
            got = log_nb(torch.tensor(x).float(), torch.tensor(mu).float(),
                         torch.tensor(theta).float())
        else:
            pi = 1.0 / (1.0 + np.exp(-pi_logits))
            ref = np.where(x == 0, np.log(pi + (1 - pi) * np.exp(ref)), np.log1p(-pi) + ref)
            got = log_zinb(torch.tensor(x).float(), torch.tensor(mu).float(),
                           torch.tensor(theta).float(), torch.tensor(pi_logits).float())
    got = got.double().numpy()
    assert np.abs(got - ref).max() < 1e-4
    assert np.abs(got.sum(1) - ref.sum(1)).max() < 0.01


def test_poisson_per_cell_sum_equals_the_elementwise_one():
    """The Poisson's per-cell log-likelihood at the non-zeros (what training sums) equals
    the element-wise log-pmf summed, in value and gradient, with samples broadcast; and a
    cell of 1e6 counts stays within 0.01 nats of scipy in float32."""
    rng = np.random.default_rng(3)
    mu = t(rng.gamma(0.5, 4.0, size=(3, 5, 40))).requires_grad_()
    x = t(rng.poisson(mu.detach().numpy()[0]))
    a, b = log_poisson(x, mu).sum(-1), log_poisson_sum(x, mu)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-9)
    ga, = torch.autograd.grad(a.sum(), mu)
    gb, = torch.autograd.grad(b.sum(), mu)
    torch.testing.assert_close(gb, ga)
    deep = rng.dirichlet(np.full(2000, 0.3), size=4) * 1e6 + 1e-3
    counts = rng.poisson(deep).astype(np.float64)
    got = log_poisson_sum(torch.tensor(counts).float(), torch.tensor(deep).float())
    ref = st.poisson.logpmf(counts, deep).sum(1)
    assert np.abs(got.double().numpy() - ref).max() < 0.01
