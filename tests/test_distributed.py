"""Distributed data parallel: sharding covers every cell once; 2 Gloo ranks match 1 process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import scvae_tools as svt
from scvae_tools.adapter import CellData, DataSpec
from scvae_tools.backed import BackedCellData
from scvae_tools.distributed import DistContext, n_steps, shard_batches, shard_bounds

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n,world,bs", [(600, 2, 64), (257, 2, 128), (258, 2, 128),
                                        (129, 3, 64), (1000, 4, 50), (7, 3, 4), (385, 2, 64)])
def test_shards_cover_every_cell_once_with_equal_steps(synthetic, tmp_path, n, world, bs):
    spec = DataSpec.from_anndata(synthetic)
    path = tmp_path / "s.h5ad"
    synthetic.write_h5ad(path)
    for data in (CellData(synthetic, spec), BackedCellData(path, spec, chunk_size=16)):
        idx = np.sort(np.random.default_rng(n).choice(synthetic.n_obs, min(n, 600), replace=False))
        for epoch in range(2):
            per_rank, steps = [], []
            for rank in range(world):
                # Every rank's generator is seeded alike and has drawn the same numbers.
                gen = torch.Generator().manual_seed(0)
                for _ in range(epoch):
                    list(shard_batches(data, idx, bs, gen, rank, world))
                batches = list(shard_batches(data, idx, bs, gen, rank, world))
                assert all(len(b.index) >= 2 for b in batches)  # BatchNorm-safe
                steps.append(len(batches))
                per_rank.append(np.concatenate([b.index.numpy() for b in batches]))
            assert len(set(steps)) == 1, steps  # DDP: same number of steps on every rank
            allc = np.concatenate(per_rank)
            np.testing.assert_array_equal(np.sort(allc), idx)  # each cell exactly once
            sizes = [len(s) for s in per_rank]
            assert max(sizes) - min(sizes) <= 1


def test_shard_helpers():
    np.testing.assert_array_equal(shard_bounds(10, 3), [0, 4, 7, 10])
    assert n_steps(257, 128) == 2 and n_steps(256, 128) == 2 and n_steps(258, 128) == 3
    with pytest.raises(ValueError, match="at least 2 cells"):
        list(shard_batches(None, np.arange(3), 8, None, 0, 2))


def test_ddp_without_process_group_is_a_clear_error(synthetic, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    model = svt.SCVAE(synthetic)
    with pytest.raises(ValueError, match="torchrun"):
        model.train(max_epochs=1, strategy="ddp", progress_bar=False)
    with pytest.raises(ValueError, match="strategy"):
        model.train(max_epochs=1, strategy="fsdp", progress_bar=False)
    with pytest.raises(ValueError, match="torchrun"):
        DistContext.from_env("cpu")


def _torchrun(args: list[str], timeout: int = 240, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *args]
    # In a session of its own, so that a run that hangs is killed with its workers (they
    # would otherwise outlive the test, blocked in a collective).
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=ROOT, start_new_session=True) as popen:
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.communicate()
            raise
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_two_gloo_ranks_match_single_process(synthetic, tmp_path):
    """torchrun, 2 CPU processes, Gloo: held-out ELBO within 1% of one process; each epoch
    every training cell is seen exactly once (across the two ranks). The ranks draw other
    noise than one process, so the runs match in quality only: trained 30 epochs, not 15,
    where the noise alone moved the held-out ELBO by about 1%."""
    path = tmp_path / "s.h5ad"
    synthetic.write_h5ad(path)
    epochs, per_rank_bs = 30, 32
    _torchrun([str(ROOT / "tests" / "ddp_worker.py"), str(path), str(tmp_path),
               "--epochs", str(epochs), "--batch-size", str(per_rank_bs), "--backed"])
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["world_size"] == 2 and res["epochs"] == epochs
    assert res["recorded_world_size"] == 2  # batch_size is per rank: the record says so
    train_idx = np.asarray(res["train_indices"])
    seen = [np.load(tmp_path / f"seen_rank{r}.npz") for r in range(2)]
    for e in range(epochs):
        a, b = seen[0][f"arr_{e}"], seen[1][f"arr_{e}"]
        assert not np.intersect1d(a, b).size
        np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), train_idx)
    # Gradients were all-reduced: both replicas end with the same weights.
    w0, w1 = (np.load(tmp_path / f"params_rank{r}.npy") for r in range(2))
    np.testing.assert_allclose(w0, w1, rtol=1e-5, atol=1e-6)
    # Same global batch (2 × 32 cells per step) in one process.
    ref = svt.SCVAE(synthetic, n_latent=5, batch_key="batch")
    ref.train(max_epochs=epochs, batch_size=2 * per_rank_bs, seed=0, early_stopping=False,
              progress_bar=False, device="cpu")
    np.testing.assert_array_equal(ref.train_indices, train_idx)
    e1 = ref.get_elbo(indices=ref.validation_indices)
    e2 = res["heldout_elbo"]
    assert abs(e2 - e1) / abs(e1) < 0.01, (e1, e2)
    # The per-epoch validation ELBO (all-reduced over ranks) improved during training.
    assert res["validation_elbo"][-1] > res["validation_elbo"][0]


@pytest.mark.slow
def test_two_gloo_ranks_resume_to_the_uninterrupted_run(synthetic, tmp_path):
    """Killed at epoch 5 (checkpoints every 2 epochs), then resumed: the same model as one
    uninterrupted DDP run. Each rank resumes its own noise stream (before, rank 0's state
    was saved and then reseeded away: the runs split after the resume)."""
    path = tmp_path / "s.h5ad"
    synthetic.write_h5ad(path)
    run = [str(ROOT / "tests" / "ddp_worker.py"), str(path)]
    (tmp_path / "ref").mkdir()
    (tmp_path / "res").mkdir()
    _torchrun([*run, str(tmp_path / "ref"), "--epochs", "8"])
    ck = ["--checkpoint-dir", str(tmp_path / "ck")]
    _torchrun([*run, str(tmp_path / "res"), "--epochs", "8", *ck, "--interrupt-at-epoch", "5"])
    assert not (tmp_path / "res" / "result.json").exists()  # it was stopped
    _torchrun([*run, str(tmp_path / "res"), "--epochs", "8", *ck, "--resume"])
    ref, res = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("ref", "res"))
    assert res["validation_elbo"] == ref["validation_elbo"]
    np.testing.assert_array_equal(np.asarray(res["latent"]), np.asarray(ref["latent"]))


def test_an_error_on_one_rank_ends_the_run_instead_of_hanging(synthetic, tmp_path):
    """One rank fails mid-run. It used to wait in a barrier on its way out while the other
    waited in the next all-reduce: both hung (Gloo's default timeout is 30 minutes). Now
    the failing rank leaves at once and the other's collective fails."""
    path = tmp_path / "s.h5ad"
    synthetic.write_h5ad(path)
    start = time.perf_counter()
    proc = _torchrun([str(ROOT / "tests" / "ddp_worker.py"), str(path), str(tmp_path),
                      "--epochs", "20", "--fail-on-rank", "1"], timeout=180, ok=False)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stdout + proc.stderr
    assert time.perf_counter() - start < 150
    assert not (tmp_path / "result.json").exists()


@pytest.mark.slow
def test_cli_under_torchrun_writes_once(synthetic, tmp_path):
    path, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    synthetic.write_h5ad(path)
    proc = _torchrun(["-m", "scvae_tools.cli", "fit", str(path), "-o", str(out), "--epochs", "3",
                      "--quiet", "--backed", "--no-layers", "--save-model", str(tmp_path / "m")])
    assert proc.stdout.count("wrote") == 1  # rank 0 only
    import anndata as ad

    res = ad.read_h5ad(out)
    assert res.obsm["X_scvae"].shape == (synthetic.n_obs, 10)
    assert len(res.uns["scvae"]["history"]["epoch"]) == 3
    assert (tmp_path / "m" / "config.json").exists()
