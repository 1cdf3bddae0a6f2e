"""Learning-rate schedules, bf16 autocast and torch.compile of the training loop."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

import scvae_tools as svt
from scvae_tools.train import TrainConfig, default_batch_size_and_lr, default_max_epochs


def test_cosine_schedule_values():
    cfg = TrainConfig(max_epochs=10, lr=4e-3, lr_schedule="cosine", lr_min_factor=0.01)
    assert cfg.lr_at(0, 0, 5) == pytest.approx(4e-3)
    # Half-way: the mean of the peak and the floor.
    assert cfg.lr_at(5, 0, 5) == pytest.approx(0.5 * (4e-3 + 4e-5))
    assert cfg.lr_at(9, 4, 5) == pytest.approx(4e-5, rel=0.15)  # last step: near the floor
    steps = [cfg.lr_at(e, s, 5) for e in range(10) for s in range(5)]
    assert all(a >= b for a, b in zip(steps, steps[1:], strict=False))  # never rises
    # A rollback or plateau drop scales the whole curve.
    assert cfg.lr_at(5, 0, 5, scale=0.25) == pytest.approx(0.25 * cfg.lr_at(5, 0, 5))
    const = TrainConfig(max_epochs=10, lr=1e-3)
    assert {const.lr_at(e, s, 5) for e in range(10) for s in range(5)} == {1e-3}


def test_bad_schedule_and_precision_are_refused():
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        TrainConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp16")


def test_default_epochs_rule():
    assert default_max_epochs(2638) == 38   # pbmc3k
    assert default_max_epochs(700) == 143   # pbmc68k
    assert default_max_epochs(100) == 400   # capped
    assert default_max_epochs(1_000_000) == 10  # floor


def test_default_batch_size_and_lr_rule(synthetic):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_batch_size_and_lr(1_000_000, cpu) == (128, 4e-3)  # CPUs: always 128
    assert default_batch_size_and_lr(99_999, cuda) == (128, 4e-3)  # too few steps for 1024
    assert default_batch_size_and_lr(100_000, cuda) == (1024, 1e-2)
    assert default_batch_size_and_lr(1_000_000, None) == (128, 4e-3)  # DDP: 128 per rank
    # What train() used is recorded; an explicit batch size keeps the default lr.
    model = svt.SCVAE(synthetic, n_latent=4, n_hidden=32)
    model.train(max_epochs=1, progress_bar=False)
    assert (model.train_config.batch_size, model.train_config.lr) == (128, 4e-3)
    model.train(max_epochs=1, batch_size=1024, progress_bar=False)
    assert (model.train_config.batch_size, model.train_config.lr) == (1024, 4e-3)
    model.train(max_epochs=1, lr=1e-3, progress_bar=False)
    assert (model.train_config.batch_size, model.train_config.lr) == (128, 1e-3)


def test_history_records_the_schedule(synthetic):
    model = svt.SCVAE(synthetic, n_latent=4, n_hidden=32)
    model.train(max_epochs=8, batch_size=64, lr=4e-3, lr_schedule="cosine", progress_bar=False)
    lr = model.history["lr"].to_numpy()
    assert lr[0] < 4e-3 and np.all(np.diff(lr) < 0)  # decays every epoch
    assert lr[-1] == pytest.approx(4e-5, rel=0.2)
    model.train(max_epochs=8, batch_size=64, lr=4e-3, lr_schedule="constant", progress_bar=False)
    assert np.all(model.history["lr"].to_numpy() == 4e-3)


def test_plateau_schedule_lowers_lr_when_validation_stalls(synthetic):
    model = svt.SCVAE(synthetic, n_latent=4, n_hidden=32)
    # A high learning rate, so that noise alone produces plateaus within 60 epochs.
    model.train(max_epochs=60, batch_size=64, lr=3e-2, lr_schedule="plateau",
                early_stopping=False, progress_bar=False)
    lr = model.history["lr"].to_numpy()
    assert lr[0] == 3e-2 and np.all(np.diff(lr) <= 0)
    drops = np.flatnonzero(np.diff(lr) < 0)
    assert len(drops) >= 1
    np.testing.assert_allclose(lr[drops + 1] / lr[drops], 0.3)
    # Each drop follows five epochs without a new best validation ELBO.
    val = model.history["validation_elbo"].to_numpy()
    for i in drops:
        best_before = np.max(val[: i - 4])
        assert np.all(val[i - 4: i + 1] <= best_before)


def test_bf16_autocast_trains_close_to_float32(synthetic):
    fp32 = svt.SCVAE(synthetic, n_latent=4, n_hidden=32)
    fp32.train(max_epochs=30, batch_size=64, progress_bar=False, seed=0)
    bf16 = svt.SCVAE(synthetic, n_latent=4, n_hidden=32)
    bf16.train(max_epochs=30, batch_size=64, progress_bar=False, seed=0, precision="bf16-mixed")
    assert bf16.train_config.precision == "bf16-mixed"
    # The weights, likelihood and evaluation stay float32; only the MLP matmuls ran in bf16.
    assert all(p.dtype == torch.float32 for p in bf16.module.parameters())
    a, b = fp32.get_elbo(), bf16.get_elbo()
    assert math.isfinite(b)
    assert abs(a - b) / abs(a) < 0.02
    assert bf16.history["validation_elbo"].iloc[-1] > bf16.history["validation_elbo"].iloc[0]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on the CPU needs a C compiler")
def test_compiled_training_matches_eager(synthetic):
    eager = svt.SCVAE(synthetic, n_latent=4, n_hidden=32)
    eager.train(max_epochs=3, batch_size=64, progress_bar=False, seed=0)
    comp = svt.SCVAE(synthetic, n_latent=4, n_hidden=32)
    comp.train(max_epochs=3, batch_size=64, progress_bar=False, seed=0, compile=True)
    # Same state-dict keys (compiled in place), so the model saves and loads as usual.
    assert set(comp.module.state_dict()) == set(eager.module.state_dict())
    # Inductor draws its own dropout masks, so the runs agree closely but not bit for bit.
    np.testing.assert_allclose(comp.history["train_elbo"], eager.history["train_elbo"], rtol=1e-2)
    np.testing.assert_allclose(comp.get_latent_representation(), comp.get_latent_representation())


def test_cosine_resume_after_interruption_matches_uninterrupted(synthetic, tmp_path, monkeypatch):
    from scvae_tools.module import VAE

    kw = dict(max_epochs=6, batch_size=64, seed=1, progress_bar=False, lr_schedule="cosine")
    reference = svt.SCVAE(synthetic, n_latent=3, n_hidden=16).train(**kw)
    real_loss, calls = VAE.loss, {"n": 0}
    steps = math.ceil(len(reference.train_indices) / 64)

    def interrupted(self, *args, **kwargs):  # dies in the middle of epoch 4
        calls["n"] += 1
        if calls["n"] == 3 * steps + 2:
            raise KeyboardInterrupt
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(VAE, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        svt.SCVAE(synthetic, n_latent=3, n_hidden=16).train(**kw, checkpoint_dir=tmp_path,
                                                            checkpoint_every=1)
    monkeypatch.setattr(VAE, "loss", real_loss)
    resumed = svt.SCVAE(synthetic, n_latent=3, n_hidden=16).train(**kw, checkpoint_dir=tmp_path,
                                                                  resume=True)
    np.testing.assert_allclose(resumed.history["lr"], reference.history["lr"])
    np.testing.assert_allclose(resumed.history["train_elbo"], reference.history["train_elbo"],
                               rtol=1e-5)


def test_validation_every_scores_every_nth_epoch_and_the_last(synthetic):
    model = svt.SCVAE(synthetic, n_latent=4, n_hidden=32)
    model.train(max_epochs=7, batch_size=64, validation_every=3, early_stopping=False,
                progress_bar=False)
    val = model.history["validation_elbo"].to_numpy()
    assert np.flatnonzero(np.isfinite(val)).tolist() == [2, 5, 6]  # epochs 3, 6 and the last
    assert np.isfinite(model.history["train_elbo"]).all()
    # The last check scored the final weights: the same cells, the same per-cell mean
    # (one posterior sample each, so compare loosely).
    final = model.get_elbo(indices=model.validation_indices)
    assert val[-1] == pytest.approx(final, rel=0.01)
    with pytest.raises(ValueError, match="validation_every must be a positive integer"):
        model.train(max_epochs=2, validation_every=0, progress_bar=False)


def test_early_stopping_patience_counts_validation_checks(synthetic):
    model = svt.SCVAE(synthetic, n_latent=4, n_hidden=32)
    # A learning rate this high stalls quickly; patience 1 check = 2 epochs without progress.
    model.train(max_epochs=200, batch_size=64, lr=5e-2, validation_every=2,
                early_stopping=True, early_stopping_patience=1, progress_bar=False)
    hist = model.history
    assert len(hist) < 200 and len(hist) % 2 == 0  # stopped at a check
    checked = hist["validation_elbo"].dropna().to_numpy()
    assert checked[-1] <= checked[:-1].max()  # the last check did not improve


@pytest.mark.parametrize("native", ["1", "0"])
def test_likelihood_stays_float32_under_bf16_autocast(monkeypatch, native):
    """The fused NB likelihood opts out of autocast: its sums over genes need float32.

    On CUDA, autocast runs mat-vecs and matmuls in bfloat16; the likelihood's were, and the
    backward pass then failed on mixed dtypes (first GPU run, 2026-11-27). A CPU backward
    called inside the autocast block casts the per-gene θ gradient's matmul the same way.
    """
    from scvae_tools.distributions import log_nb
    from scvae_tools.fused import nb_log_likelihood_from_logits

    monkeypatch.setenv("SCVAE_TOOLS_NATIVE", native)  # the compiled core and the torch one
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g, dtype=torch.float64)
    log_lib = torch.full((64, 1), math.log(2000.0), dtype=torch.float64)
    log_theta = torch.randn(300, generator=g, dtype=torch.float64)
    x = torch.poisson(torch.exp(log_lib) * torch.softmax(logits, -1))
    lt = log_theta.clone().requires_grad_()
    ref = log_nb(x, torch.exp(log_lib) * torch.softmax(logits, -1), lt.exp()).sum(-1)
    ref.sum().backward()
    lt32 = log_theta.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ll = nb_log_likelihood_from_logits(logits.float(), log_lib.float(), lt32, x.float())
        ll.sum().backward()
    assert ll.dtype == torch.float32
    torch.testing.assert_close(ll.double(), ref.detach(), rtol=1e-5, atol=0)
    # bf16 would leave ~3 significant digits; float32 keeps ~1e-5 of the largest component
    err = (lt32.grad.double() - lt.grad).abs().max() / lt.grad.abs().max()
    assert err < 1e-4


def _train_module_run(adata, cuda_graphs: bool, epochs: int = 4, batch_key=None,
                      likelihood: str = "nb", precision: str = "32", free_bits: float = 0.0):
    """train_module on the CPU with or without the graphed step's logic (no capture here)."""
    from scvae_tools.adapter import CellData, DataSpec
    from scvae_tools.module import VAE, ModuleConfig
    from scvae_tools.train import TrainConfig, split_indices, train_module

    spec = DataSpec.from_anndata(adata, batch_key=batch_key)
    data = CellData(adata, spec)
    train_idx, val_idx = split_indices(adata.n_obs, 0.9, 0)
    torch.manual_seed(0)
    module = VAE(ModuleConfig(n_genes=adata.n_vars, n_latent=4, n_hidden=32,
                              n_batch=len(spec.batch_categories or [None]),
                              likelihood=likelihood))
    cfg = TrainConfig(max_epochs=epochs, batch_size=64, kl_warmup_epochs=2, lr=4e-3,
                      cuda_graphs=cuda_graphs, precision=precision, free_bits=free_bits)
    history = train_module(module, data, train_idx, val_idx, cfg, torch.device("cpu"),
                           progress_bar=False)
    return module, history


@pytest.mark.parametrize("options", [
    {}, {"batch_key": "batch", "likelihood": "zinb"}, {"likelihood": "poisson"},
    {"precision": "bf16-mixed", "free_bits": 0.1}], ids=["nb", "zinb-batch", "poisson", "bf16"])
def test_graphed_step_logic_trains_like_the_eager_step(synthetic, options):
    """train(cuda_graphs=True) replays a static step: inputs copied into fixed buffers,
    every entry as the likelihood's "non-zeros", β, step and learning rate as tensors, the
    NaN guard deferred, the short last batch eager. On the CPU the same static step runs
    without the capture: it must train as the ordinary step does."""
    eager_mod, eager = _train_module_run(synthetic, False, **options)
    graph_mod, graphed = _train_module_run(synthetic, True, **options)
    # Not bit for bit: the optimiser reads its learning rate from a tensor, and the
    # likelihood sums over every entry. bf16 rounding (8 bits of mantissa) amplifies such
    # differences: a few weights of order 1 end ~0.01 apart, as the seed alone moves them.
    bf16 = options.get("precision") == "bf16-mixed"
    cols = ["train_elbo", "train_kl", "validation_elbo", "beta", "lr"]
    np.testing.assert_allclose(graphed[cols].to_numpy(), eager[cols].to_numpy(),
                               rtol=5e-3 if bf16 else 2e-5)
    for a, b in zip(graph_mod.parameters(), eager_mod.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2 if bf16 else 1e-3, atol=2e-2 if bf16 else 1e-4)


def test_graphed_step_rolls_back_a_bad_step(synthetic, monkeypatch):
    from scvae_tools.module import VAE

    real = VAE.loss
    calls = {"n": 0}

    def loss(self, *args, **kwargs):
        value = real(self, *args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 12:  # epoch 2: flagged on the "device", rolled back at its end
                return value * torch.tensor(float("nan"))
        return value

    monkeypatch.setattr(VAE, "loss", loss)
    with pytest.warns(RuntimeWarning, match="rolled back"):
        module, history = _train_module_run(synthetic, True)
    assert len(history) == 4 and np.isfinite(history["train_elbo"]).all()
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_cuda_graphs_need_cuda(synthetic):
    model = svt.SCVAE(synthetic, n_latent=4, n_hidden=32)
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        model.train(max_epochs=1, device="cpu", cuda_graphs=True, progress_bar=False)


class _NoStepAdam:
    """Stands in for the optimiser on 'meta' tensors (torch's capturable Adam is torch's)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass


def _meta_autocast(monkeypatch):
    """torch.autocast has no 'meta' backend; the likelihood opts out of autocast by device."""
    real = torch.autocast
    monkeypatch.setattr(torch, "autocast",
                        lambda device_type, **kw: real("cpu" if device_type == "meta" else device_type, **kw))


@pytest.mark.parametrize("likelihood, dispersion, n_batch, free_bits, prior", [
    ("nb", "gene", 1, 0.0, "normal"), ("zinb", "gene-batch", 2, 0.0, "normal"),
    ("poisson", "gene", 1, 0.1, "normal"), ("nb", "gene-cell", 1, 0.0, "mog")],
    ids=["nb", "zinb-gene-batch", "poisson-free-bits", "gene-cell-mog"])
def test_accelerator_steps_never_ask_the_device_for_a_value(monkeypatch, likelihood, dispersion,
                                                            n_batch, free_bits, prior):
    """A step on CUDA must not wait for the device: every host read of a tensor's value,
    or an output sized by the data (``nonzero``, a boolean mask, ``repeat_interleave``
    without a size), is a synchronisation, and inside a CUDA-graph capture an error.
    'meta' tensors have shapes and no values, so exactly those operations raise on them,
    while the code takes its accelerator branches (no CPU kernels or tables). Checked: the
    device data path's batch gather, the eager step given its non-zeros, and the graphed
    step (``train(cuda_graphs=True)``, which has never run on a GPU) with the deferred NaN
    guard."""
    from scvae_tools.adapter import Batch, _gather_csr_on_device
    from scvae_tools.module import VAE, ModuleConfig
    from scvae_tools.train import TrainConfig, _GraphedStep, _StepGuard

    _meta_autocast(monkeypatch)
    meta, n, g = torch.device("meta"), 16, 50
    module = VAE(ModuleConfig(n_genes=g, n_batch=n_batch, likelihood=likelihood,
                              dispersion=dispersion, prior=prior)).to(meta).train()
    guard = _StepGuard(meta, list(module.parameters()))
    assert not guard.immediate  # flagged on the device, read once per epoch
    csr = {"x_indptr": torch.empty(101, dtype=torch.long, device=meta),
           "x_indices": torch.empty(900, dtype=torch.long, device=meta),
           "x_data": torch.empty(900, device=meta)}
    x, nz = _gather_csr_on_device(csr, torch.arange(n, device=meta), 300, g, nonzero=True)
    b = Batch(x=x, library=torch.empty((n, 1), device=meta),
              batch_index=torch.zeros(n, dtype=torch.long, device=meta),
              cat_covs=torch.zeros((n, 0), dtype=torch.long, device=meta),
              cont_covs=torch.zeros((n, 0), device=meta), index=torch.arange(n, device=meta))

    # The eager step, with the non-zeros the data path built on the device.
    terms = module.elbo_terms(b.x, b.library, b.batch_index, b.cat_covs, b.cont_covs, nonzero=nz)
    module.loss(terms, beta=0.5, free_bits=free_bits).backward()
    guard.bad_step(0, module.loss(terms, beta=0.5, free_bits=free_bits))
    # The graphed step: static buffers, every entry as a non-zero, tensor β and step.
    cfg = TrainConfig(cuda_graphs=True, free_bits=free_bits)
    graphed = _GraphedStep(module, _NoStepAdam(), guard, torch.zeros(2, device=meta), cfg,
                           torch.autocast("cpu", enabled=False), meta)
    for step in range(2):
        graphed.run(b, step, 0.5)
    assert [k for k, p in module.named_parameters() if p.grad is None] == []
    if likelihood == "nb":
        # The check has teeth: without the data path's non-zeros the fused NB likelihood
        # searches the block for them, which needs the device's answer.
        with pytest.raises((NotImplementedError, RuntimeError)):
            module.elbo_terms(b.x, b.library, b.batch_index, b.cat_covs, b.cont_covs)
