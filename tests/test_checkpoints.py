"""Interrupted training loses nothing; diverging training is rolled back; seeds reproduce.

Checkpoints: ``train(checkpoint_dir=..., checkpoint_every=..., resume=True)``; a subprocess
killed with SIGKILL mid-training is resumed to the same model as an uninterrupted run.
Divergence: a NaN/inf loss or gradient is caught at its step, the run rolls back to the last
good epoch with a lower learning rate, or stops with a clear error; nothing diverged is kept.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
import torch

import scvae_tools as svt
from scvae_tools import checkpoint as ck
from scvae_tools import train as train_mod
from scvae_tools.module import VAE

MODEL = dict(n_latent=3, n_hidden=16)
# A constant learning rate: these tests stop a run by lowering max_epochs, and a cosine
# schedule depends on max_epochs (its resume: tests/test_schedules.py).
TRAIN = dict(max_epochs=6, batch_size=32, kl_warmup_epochs=2, seed=3, progress_bar=False,
             lr=1e-3, lr_schedule="constant")
HISTORY_COLS = ["epoch", "beta", "train_elbo", "train_reconstruction", "train_kl",
                "validation_elbo", "validation_reconstruction", "validation_kl", "lr"]


# One torch thread for every test: tests/conftest.py (bit-identity relies on it).


@pytest.fixture(scope="module")
def small():
    return svt.datasets.synthetic_counts(n_cells=150, n_genes=30, n_types=3, seed=1)


@pytest.fixture(scope="module")
def reference(small):
    """An uninterrupted run without checkpoints."""
    return svt.SCVAE(small, **MODEL).train(**TRAIN)


def _same_history(a, b) -> None:
    assert a["epoch"].tolist() == b["epoch"].tolist()
    np.testing.assert_allclose(a[HISTORY_COLS].to_numpy(float), b[HISTORY_COLS].to_numpy(float),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- reproducibility
def test_same_seed_gives_bit_identical_latent_on_cpu(small, reference):
    again = svt.SCVAE(small, **MODEL).train(**TRAIN)
    z1, z2 = reference.get_latent_representation(), again.get_latent_representation()
    assert np.array_equal(z1, z2)
    other = svt.SCVAE(small, **MODEL).train(**{**TRAIN, "seed": 4})
    assert not np.allclose(z1, other.get_latent_representation())


def test_seed_and_versions_are_recorded(small, reference, tmp_path):
    adata = small.copy()
    reference.write_to_adata(adata, layers=False)
    rec = adata.uns["scvae"]
    assert rec["seed"] == TRAIN["seed"] and rec["train"]["seed"] == TRAIN["seed"]
    for pkg in ("python", "scvae_tools", "torch", "numpy", "anndata"):
        assert isinstance(rec["versions"][pkg], str) and rec["versions"][pkg]
    assert rec["versions"]["torch"] == str(torch.__version__)
    adata.write_h5ad(tmp_path / "out.h5ad")  # h5ad-writable (plain strings, no TorchVersion)
    reference.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["seed"] == TRAIN["seed"] and config["versions"] == rec["versions"]


# ---------------------------------------------------------------------- checkpoints
def test_checkpoint_resume_in_process_matches_uninterrupted(small, reference, tmp_path):
    first = svt.SCVAE(small, **MODEL).train(**{**TRAIN, "max_epochs": 3},
                                             checkpoint_dir=tmp_path, checkpoint_every=1)
    # A run stopped at epoch 3 of 6 (same kl warm-up, so the settings agree except max_epochs).
    assert len(first.history) == 3
    state = ck.load_checkpoint(tmp_path / ck.CHECKPOINT_FILE)
    assert state["epoch"] == 3 and len(state["rows"]) == 3
    resumed = svt.SCVAE(small, **MODEL).train(**TRAIN, checkpoint_dir=tmp_path, resume=True)
    _same_history(resumed.history, reference.history)
    np.testing.assert_allclose(resumed.get_latent_representation(),
                               reference.get_latent_representation(), atol=1e-5)
    # Resuming a finished run trains nothing more and returns the same model.
    again = svt.SCVAE(small, **MODEL).train(**TRAIN, checkpoint_dir=tmp_path, resume=True)
    np.testing.assert_array_equal(again.get_latent_representation(),
                                  resumed.get_latent_representation())


def test_resume_with_more_epochs_keeps_the_default_warmup(small, tmp_path):
    """The default KL warm-up follows max_epochs (min(10, max_epochs // 4)): a run of 12
    epochs warms up over 3, and resuming it with 16 (4 by that rule) keeps its 3 instead of
    refusing a setting the user never chose."""
    train = {k: v for k, v in TRAIN.items() if k != "kl_warmup_epochs"}
    svt.SCVAE(small, **MODEL).train(**{**train, "max_epochs": 12}, early_stopping=False,
                                     checkpoint_dir=tmp_path)
    longer = svt.SCVAE(small, **MODEL).train(**{**train, "max_epochs": 16}, early_stopping=False,
                                              checkpoint_dir=tmp_path, resume=True)
    assert len(longer.history) == 16 and longer.train_config.kl_warmup_epochs == 3
    np.testing.assert_allclose(longer.history["beta"].to_numpy()[:4], [1 / 3, 2 / 3, 1, 1])
    fresh = svt.SCVAE(small, **MODEL).train(**{**train, "max_epochs": 16}, early_stopping=False)
    assert fresh.train_config.kl_warmup_epochs == 4  # without a checkpoint: the rule
    with pytest.raises(ValueError, match="early_stopping_patience must be >= 1"):
        svt.SCVAE(small, **MODEL).train(**train, early_stopping_patience=0)
    # without early stopping the patience is unused: no error (it was refused with the
    # advice to pass early_stopping=False, already passed)
    svt.SCVAE(small, **MODEL).train(**{**train, "max_epochs": 1}, early_stopping=False,
                                     early_stopping_patience=0)
    train_mod.TrainConfig(max_epochs=3, early_stopping_patience=0)  # saved configs still load


def test_resume_refuses_the_same_cells_in_another_order(small, tmp_path):
    """The split is saved as row numbers: with the rows shuffled they would name other
    cells (validation cells trained on), so such a resume is refused."""
    svt.SCVAE(small, **MODEL).train(**{**TRAIN, "max_epochs": 2}, checkpoint_dir=tmp_path)
    shuffled = small[np.random.default_rng(0).permutation(small.n_obs)].copy()
    with pytest.raises(ValueError, match="other cells, or the same cells in another order"):
        svt.SCVAE(shuffled, **MODEL).train(**TRAIN, checkpoint_dir=tmp_path, resume=True)
    svt.SCVAE(small, **MODEL).train(**TRAIN, checkpoint_dir=tmp_path, resume=True)  # same: fine


def test_resume_refuses_other_counts_under_the_same_names(small, tmp_path):
    """Other data under the same cell and gene names (another layer, say) were resumed as if
    they were the interrupted run's; a backed read of the same file is the same data."""
    svt.SCVAE(small, **MODEL).train(**{**TRAIN, "max_epochs": 2}, checkpoint_dir=tmp_path)
    other = small.copy()
    other.X = other.X * 3
    with pytest.raises(ValueError, match="other counts"):
        svt.SCVAE(other, **MODEL).train(**TRAIN, checkpoint_dir=tmp_path, resume=True)
    small.write_h5ad(tmp_path / "small.h5ad")
    svt.SCVAE(str(tmp_path / "small.h5ad"), **MODEL).train(**TRAIN, checkpoint_dir=tmp_path,
                                                          resume=True)


def test_resume_refuses_relabelled_batches_or_changed_covariates(tmp_path):
    """Batch labels and covariates re-assigned under the same cell names were resumed,
    training on a mix of the two labellings; a backed read of the same file is the same."""
    a = svt.datasets.synthetic_counts(n_cells=150, n_genes=30, n_types=3, n_batches=2, seed=1)
    a.obs["dose"] = np.linspace(-1.0, 1.0, a.n_obs)
    kw = dict(**MODEL, batch_key="batch", continuous_covariate_keys=["dose"])
    svt.SCVAE(a, **kw).train(**{**TRAIN, "max_epochs": 2}, checkpoint_dir=tmp_path)
    relabelled, changed = a.copy(), a.copy()
    relabelled.obs["batch"] = relabelled.obs["batch"].to_numpy()[::-1]
    changed.obs["dose"] = changed.obs["dose"] * 2
    for other in (relabelled, changed):
        with pytest.raises(ValueError, match="other batch labels or covariate values"):
            svt.SCVAE(other, **kw).train(**TRAIN, checkpoint_dir=tmp_path, resume=True)
    a.write_h5ad(tmp_path / "a.h5ad")
    resumed = svt.SCVAE(str(tmp_path / "a.h5ad"), **kw).train(**TRAIN, checkpoint_dir=tmp_path,
                                                             resume=True)
    assert len(resumed.history) == TRAIN["max_epochs"]


def test_checkpoint_every_n_epochs(small, tmp_path, monkeypatch):
    saved: list[int] = []
    real = ck.save_checkpoint
    monkeypatch.setattr(ck, "save_checkpoint", lambda p, s: (saved.append(s["epoch"]), real(p, s)))
    svt.SCVAE(small, **MODEL).train(**{**TRAIN, "max_epochs": 7}, early_stopping=False,
                                     checkpoint_dir=tmp_path, checkpoint_every=3)
    assert saved == [3, 6, 7]  # every 3 epochs, and after the last one
    assert [p.name for p in tmp_path.iterdir()] == [ck.CHECKPOINT_FILE]  # no temp files left


def test_resume_refuses_other_settings_or_model(small, tmp_path):
    svt.SCVAE(small, **MODEL).train(**{**TRAIN, "max_epochs": 2}, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"other training settings \(lr: 0.001 → 0.01\).*resume=False"):
        svt.SCVAE(small, **MODEL).train(**{**TRAIN, "lr": 1e-2}, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="different model"):
        svt.SCVAE(small, n_latent=4, n_hidden=16).train(**TRAIN, checkpoint_dir=tmp_path,
                                                        resume=True)
    with pytest.raises(ValueError, match=r"other training settings \(train_size: 0.9 → 0.8\)"):
        svt.SCVAE(small, **MODEL).train(**TRAIN, train_size=0.8, checkpoint_dir=tmp_path,
                                        resume=True)
    with pytest.raises(ValueError, match="another train/validation split"):  # other cells
        svt.SCVAE(small[:140].copy(), **MODEL).train(**TRAIN, checkpoint_dir=tmp_path,
                                                     resume=True)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        svt.SCVAE(small, **MODEL).train(**TRAIN, resume=True)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive integer"):
        svt.SCVAE(small, **MODEL).train(**TRAIN, checkpoint_dir=tmp_path, checkpoint_every=0)


def test_resume_with_fewer_epochs_than_done_is_refused(small, tmp_path):
    """The checkpoint holds 6 epochs; resuming with max_epochs=3 ran nothing and left a
    model whose record said 3 epochs beside a history of 6."""
    model = svt.SCVAE(small, **MODEL).train(**TRAIN, checkpoint_dir=tmp_path,
                                            checkpoint_every=2)
    with pytest.raises(ValueError, match=r"already holds 6 epochs.*max_epochs=6 or more"):
        model.train(**(TRAIN | {"max_epochs": 3}), checkpoint_dir=tmp_path, resume=True)
    assert len(model.history) == 6 and model.train_config.max_epochs == 6
    # NumPy integers are whole numbers here as for max_epochs and seed
    svt.SCVAE(small, **MODEL).train(**TRAIN, checkpoint_dir=tmp_path / "np",
                                    checkpoint_every=np.int64(3))
    assert (tmp_path / "np").exists()


def test_resume_a_checkpoint_from_before_a_setting_existed(small, reference, tmp_path):
    """A checkpoint written before a training setting was added (cuda_graphs; precision
    here too) resumes when that setting keeps its default, and is refused when it does not."""
    svt.SCVAE(small, **MODEL).train(**{**TRAIN, "max_epochs": 3}, checkpoint_dir=tmp_path)
    path = tmp_path / ck.CHECKPOINT_FILE
    state = ck.load_checkpoint(path)
    del state["train_config"]["cuda_graphs"], state["train_config"]["precision"]
    ck.save_checkpoint(path, {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(ValueError, match=r"other training settings \(precision: '32' → 'bf16-mixed'\)"):
        svt.SCVAE(small, **MODEL).train(**TRAIN, checkpoint_dir=tmp_path, resume=True,
                                        precision="bf16-mixed")
    resumed = svt.SCVAE(small, **MODEL).train(**TRAIN, checkpoint_dir=tmp_path, resume=True)
    _same_history(resumed.history, reference.history)


def test_resume_a_checkpoint_from_before_dispersion_had_its_own_lr(small, tmp_path, monkeypatch):
    """Before ``dispersion_lr_factor``, the optimiser had one parameter group in the
    module's order and θ moved at the networks' lr (a factor 1). Such a checkpoint is
    regrouped on resume, each parameter keeping its own Adam state, and continues at the
    factor it was started with: the resumed run equals an uninterrupted run of that time."""
    import functools

    import scvae_tools.model as model_mod
    from scvae_tools.train import TrainConfig

    with monkeypatch.context() as m:  # the old behaviour: θ in the networks' group
        m.setattr(model_mod, "TrainConfig", functools.partial(TrainConfig, dispersion_lr_factor=1.0))
        old_run = svt.SCVAE(small, **MODEL).train(**TRAIN)
        svt.SCVAE(small, **MODEL).train(**{**TRAIN, "max_epochs": 3}, checkpoint_dir=tmp_path)
    path = tmp_path / ck.CHECKPOINT_FILE
    state = ck.load_checkpoint(path)
    names = [n for n, _ in VAE(svt.SCVAE(small, **MODEL).module_config).named_parameters()]
    grouped = [n for n in names if n != "log_theta"] + ["log_theta"]  # the groups' order
    opt = state["optimizer"]
    assert [len(g["params"]) for g in opt["param_groups"]] == [len(names) - 1, 1]
    old_id = {new: names.index(name) for new, name in enumerate(grouped)}
    opt["state"] = {old_id[k]: v for k, v in opt["state"].items()}
    first = {k: v for k, v in opt["param_groups"][0].items() if k != "lr_scale"}
    opt["param_groups"] = [{**first, "params": list(range(len(names)))}]
    del state["train_config"]["dispersion_lr_factor"]
    ck.save_checkpoint(path, {k: v for k, v in state.items() if k != "format"})
    resumed = svt.SCVAE(small, **MODEL).train(**TRAIN, checkpoint_dir=tmp_path, resume=True)
    assert resumed.train_config.dispersion_lr_factor == 1.0
    _same_history(resumed.history, old_run.history)


def test_resumed_dispersion_factor_is_the_one_the_optimiser_uses(small, tmp_path,
                                                                  monkeypatch):
    """A two-group checkpoint whose config lacks the factor: the factor was set on θ's group
    before optimizer.load_state_dict, which replaces the groups, so the run reported 1.0
    while θ trained at 10×. The reported factor and the group's lr_scale must agree."""
    import scvae_tools.train as train_mod

    svt.SCVAE(small, **MODEL).train(**{**TRAIN, "max_epochs": 3}, checkpoint_dir=tmp_path)
    path = tmp_path / ck.CHECKPOINT_FILE
    state = ck.load_checkpoint(path)
    del state["train_config"]["dispersion_lr_factor"]
    ck.save_checkpoint(path, {k: v for k, v in state.items() if k != "format"})
    scales, real = [], train_mod._set_lr

    def spy(optim, lr):
        scales.append([g.get("lr_scale", 1.0) for g in optim.param_groups])
        real(optim, lr)

    monkeypatch.setattr(train_mod, "_set_lr", spy)
    resumed = svt.SCVAE(small, **MODEL).train(**TRAIN, checkpoint_dir=tmp_path, resume=True)
    assert resumed.train_config.dispersion_lr_factor == 1.0
    assert scales and all(s == [1.0, 1.0] for s in scales)


def test_old_poisson_checkpoints_and_saves_with_an_unused_dispersion(small, tmp_path):
    """Earlier versions gave Poisson models an unused θ parameter. Their saved models still
    load (θ is dropped, the latent is unchanged); their checkpoints cannot be resumed (the
    optimiser state has one parameter more), and the message says what to do."""
    model = svt.SCVAE(small, likelihood="poisson", **MODEL)
    assert model.module.log_theta is None
    model.train(**{**TRAIN, "max_epochs": 2}, checkpoint_dir=tmp_path / "ck")
    model.save(tmp_path / "m")
    weights = tmp_path / "m" / "model.pt"
    state = torch.load(weights, weights_only=True)
    torch.save({**state, "log_theta": torch.zeros(small.n_vars)}, weights)  # the old layout
    np.testing.assert_array_equal(svt.SCVAE.load(tmp_path / "m", small).get_latent_representation(),
                                  model.get_latent_representation())
    path = tmp_path / "ck" / ck.CHECKPOINT_FILE
    state = ck.load_checkpoint(path)
    state["module"]["log_theta"] = torch.zeros(small.n_vars)
    ck.save_checkpoint(path, {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(ValueError, match="older scvae_tools.*unused dispersion.*resume=False"):
        svt.SCVAE(small, likelihood="poisson", **MODEL).train(
            **TRAIN, checkpoint_dir=tmp_path / "ck", resume=True)


def test_resume_without_checkpoint_starts_afresh(small, reference, tmp_path):
    model = svt.SCVAE(small, **MODEL).train(**TRAIN, checkpoint_dir=tmp_path / "new", resume=True)
    _same_history(model.history, reference.history)
    assert (tmp_path / "new" / ck.CHECKPOINT_FILE).exists()


def test_crash_mid_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / ck.CHECKPOINT_FILE
    ck.save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def torn_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="No space"):
        ck.save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = ck.load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [ck.CHECKPOINT_FILE]


_CHILD = textwrap.dedent("""
    import sys, time
    import torch
    import scvae_tools as svt
    import scvae_tools.checkpoint as ck
    from scvae_tools.module import VAE

    torch.set_num_threads(int(sys.argv[2]))
    real_save, real_loss = ck.save_checkpoint, VAE.loss

    def save(path, state):
        real_save(path, state)
        print("saved", state["epoch"], flush=True)

    def slow_loss(self, *args, **kwargs):  # keep each epoch long enough to be killed inside
        time.sleep(0.02)
        return real_loss(self, *args, **kwargs)

    ck.save_checkpoint, VAE.loss = save, slow_loss
    adata = svt.datasets.synthetic_counts(n_cells=150, n_genes=30, n_types=3, seed=1)
    svt.SCVAE(adata, **MODEL).train(**TRAIN, checkpoint_dir=sys.argv[1], checkpoint_every=1)
    print("finished", flush=True)
""")


def test_sigkill_mid_training_then_resume(small, reference, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(f"MODEL = {MODEL!r}\nTRAIN = {TRAIN!r}\n" + _CHILD)
    ckdir = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ckdir), str(torch.get_num_threads())],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() == "saved 3":  # epoch 4 is now running: kill it mid-epoch
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, lines
    state = ck.load_checkpoint(ckdir / ck.CHECKPOINT_FILE)
    assert 3 <= state["epoch"] < TRAIN["max_epochs"]  # really interrupted
    resumed = svt.SCVAE(small, **MODEL).train(**TRAIN, checkpoint_dir=ckdir, checkpoint_every=1,
                                              resume=True)
    assert resumed.history["epoch"].tolist() == list(range(1, TRAIN["max_epochs"] + 1))
    _same_history(resumed.history, reference.history)
    np.testing.assert_allclose(resumed.get_latent_representation(),
                               reference.get_latent_representation(), atol=1e-4)
    torch.manual_seed(0)
    elbo_resumed = resumed.get_elbo()
    torch.manual_seed(0)
    assert elbo_resumed == pytest.approx(reference.get_elbo(), rel=1e-4)


# ---------------------------------------------------------------------- divergence
def _nan_loss_at(calls: set[int] | None, after: int | None = None, grad_only: bool = False):
    """A VAE.loss that is NaN (or has NaN gradients only) at the given training calls."""
    real = VAE.loss
    count = {"n": 0}

    def loss(self, *args, **kwargs):
        value = real(self, *args, **kwargs)
        if not torch.is_grad_enabled():
            return value
        count["n"] += 1
        n = count["n"]
        if (calls is not None and n in calls) or (after is not None and n > after):
            p = next(self.parameters())
            if grad_only:  # sqrt'(0) = inf: finite loss, NaN gradients
                return value + torch.sqrt(p.sum() * 0.0)
            return value * torch.tensor(float("nan"))
        return value

    return loss


@pytest.mark.parametrize("grad_only", [False, True], ids=["nan-loss", "nan-gradient"])
def test_transient_nan_rolls_back_with_lower_lr(small, monkeypatch, grad_only):
    # 135 training cells / 32 per batch = 5 steps per epoch: call 13 is epoch 3, step 3.
    monkeypatch.setattr(VAE, "loss", _nan_loss_at({13}, grad_only=grad_only))
    with pytest.warns(RuntimeWarning, match=r"epoch 3, step 3; rolled back to the end of epoch 2"):
        model = svt.SCVAE(small, **MODEL).train(**TRAIN)
    h = model.history
    assert h["epoch"].tolist() == list(range(1, TRAIN["max_epochs"] + 1))
    assert np.isfinite(h[HISTORY_COLS].to_numpy(float)).all()
    assert h["lr"].tolist() == [1e-3] * 2 + [2.5e-4] * (TRAIN["max_epochs"] - 2)
    assert all(torch.isfinite(p).all() for p in model.module.parameters())
    assert np.isfinite(model.get_latent_representation()).all()


@pytest.mark.parametrize("grad_only", [False, True])
def test_deferred_device_check_also_rolls_back(small, monkeypatch, grad_only):
    """The accelerator path (flag on device, read once per epoch), exercised on the CPU: a
    non-finite loss, or a finite loss with a non-finite gradient."""

    class Deferred(train_mod._StepGuard):
        def __init__(self, device, params, deferred=False):
            super().__init__(device, params, deferred=True)

    monkeypatch.setattr(train_mod, "_StepGuard", Deferred)
    monkeypatch.setattr(VAE, "loss", _nan_loss_at({13}, grad_only=grad_only))
    with pytest.warns(RuntimeWarning, match=r"epoch 3, step 3; rolled back"):
        model = svt.SCVAE(small, **MODEL).train(**TRAIN)
    assert len(model.history) == TRAIN["max_epochs"]
    assert np.isfinite(model.history["train_elbo"]).all()
    assert all(torch.isfinite(p).all() for p in model.module.parameters())


def test_persistent_divergence_stops_and_keeps_previous_fit(small, monkeypatch):
    adata = small.copy()
    model = svt.SCVAE(adata, **MODEL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        monkeypatch.setattr(VAE, "loss", _nan_loss_at(None, after=7))
        with pytest.raises(FloatingPointError, match=r"diverged.*after 3 rollback\(s\).*lower lr"):
            model.train(**TRAIN)
    assert not model.is_trained
    with pytest.raises(RuntimeError, match="not trained"):
        model.write_to_adata(adata)
    assert "X_scvae" not in adata.obsm and "scvae" not in adata.uns
    # A model fitted before keeps its weights when a later fit diverges.
    monkeypatch.undo()
    model.train(**TRAIN)
    z = model.get_latent_representation()
    monkeypatch.setattr(VAE, "loss", _nan_loss_at(None, after=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(FloatingPointError):
            model.train(**TRAIN)
    assert model.is_trained
    np.testing.assert_array_equal(model.get_latent_representation(), z)


def test_write_to_adata_refuses_non_finite_results(small):
    adata = small.copy()
    model = svt.SCVAE(small, **MODEL).train(**{**TRAIN, "max_epochs": 2})
    with torch.no_grad():
        for p in model.module.parameters():
            p.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN/inf.*nothing was written"):
        model.write_to_adata(adata)
    assert "X_scvae" not in adata.obsm and not adata.layers and "scvae" not in adata.uns


def test_real_divergence_from_a_huge_learning_rate(small):
    """No monkeypatching: lr=1e4 blows up at once; three rollbacks, then a clear error."""
    model = svt.SCVAE(small, **MODEL)
    with pytest.warns(RuntimeWarning, match="rolled back to the initial weights") as record:
        with pytest.raises(FloatingPointError, match=r"after 3 rollback\(s\).*lowered to 156"):
            model.train(**{**TRAIN, "lr": 1e4})
    assert sum("rolled back" in str(w.message) for w in record) == 3
    assert not model.is_trained


@pytest.mark.parametrize("lr", [0.3, 3.0])
def test_high_learning_rates_recover_or_stop_never_nan(small, lr):
    model = svt.SCVAE(small, **MODEL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model.train(**{**TRAIN, "lr": lr})
        except FloatingPointError:
            assert not model.is_trained
            return
    assert np.isfinite(model.history[HISTORY_COLS].to_numpy(float)).all()
    assert np.isfinite(model.get_latent_representation()).all()
    assert np.isfinite(model.get_normalized_expression()).all()


def test_cli_checkpoint_and_resume(small, tmp_path, capsys):
    import anndata as ad

    from scvae_tools.cli import main

    small.write_h5ad(tmp_path / "in.h5ad")
    args = ["fit", str(tmp_path / "in.h5ad"), "--epochs", "4", "--n-latent", "3",
            "--n-hidden", "16", "--batch-size", "32", "--seed", "3", "--quiet", "--no-layers",
            "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "2"]
    assert main([*args, "-o", str(tmp_path / "a.h5ad")]) == 0
    assert ck.load_checkpoint(tmp_path / "ck" / ck.CHECKPOINT_FILE)["epoch"] == 4
    assert main([*args, "--resume", "-o", str(tmp_path / "b.h5ad")]) == 0
    za = ad.read_h5ad(tmp_path / "a.h5ad").obsm["X_scvae"]
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "b.h5ad").obsm["X_scvae"], za)
    capsys.readouterr()
    bad = [a for a in args if a not in ("--checkpoint-dir", str(tmp_path / "ck"))]
    assert main([*bad, "--resume", "-o", str(tmp_path / "c.h5ad")]) == 2
    assert "resume=True needs checkpoint_dir" in capsys.readouterr().err


@pytest.mark.parametrize("multi_tensor", [True, False], ids=["foreach-kernel", "sums"])
def test_deferred_guard_flags_the_first_bad_step(monkeypatch, multi_tensor):
    """The accelerator guard with GradScaler's multi-tensor check, and with the per-parameter
    sums that a backend without that kernel falls back to."""
    if not multi_tensor:
        def missing(*args):
            raise NotImplementedError("not on this backend")
        monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", missing)
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    guard = train_mod._StepGuard(torch.device("cpu"), params, deferred=True)
    finite = torch.tensor(1.0)
    for step, (bad_grad, loss) in enumerate([(False, finite), (True, finite),
                                             (False, torch.tensor(float("inf")))]):
        params[0].grad = torch.ones(3)
        params[1].grad = torch.full((2, 2), float("nan") if bad_grad else 2.0)
        assert guard.bad_step(step, loss) is False  # deferred: never stops the step itself
        assert params[0].grad.tolist() == [1.0, 1.0, 1.0]  # gradients left as they were
    assert guard.first_bad_step() == 1
    guard.reset()
    params[1].grad = torch.ones(2, 2)
    guard.bad_step(0, torch.tensor(float("nan")))
    assert guard.first_bad_step() == 0


def test_a_bad_checkpoint_dir_is_refused_before_training(small, tmp_path):
    """A file as checkpoint_dir failed only at the first write, `checkpoint_every` epochs in."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    model = svt.SCVAE(small, n_latent=2)
    for bad in (afile, afile / "sub"):
        with pytest.raises(ValueError, match="checkpoint_dir"):
            model.train(max_epochs=3, checkpoint_dir=bad, checkpoint_every=3, progress_bar=False)
    assert not model.is_trained
    assert afile.read_text() == "not a folder"


def test_checkpoints_and_written_files_follow_the_umask(small, tmp_path):
    """Atomic writes used mkstemp, whose files are 0600: a colleague could not resume a
    shared checkpoint, nor read an .h5ad from write_h5ad_backed."""
    import os

    old = os.umask(0o022)
    try:
        svt.SCVAE(small, **MODEL).train(**{**TRAIN, "max_epochs": 1}, checkpoint_dir=tmp_path)
        small.write_h5ad(tmp_path / "in.h5ad")
        svt.backed.write_h5ad_backed(svt.backed.read_backed(tmp_path / "in.h5ad"),
                                     tmp_path / "out.h5ad")
    finally:
        os.umask(old)
    for name in ("checkpoint.pt", "out.h5ad"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert not list(tmp_path.glob(".*.tmp"))
