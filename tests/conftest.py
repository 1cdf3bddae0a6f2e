"""Shared fixtures: small synthetic counts, the embedded PBMC data and (when present) pbmc3k."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import scvae_tools as svt

ROOT = Path(__file__).resolve().parents[1]


def _find_data_dir() -> Path | None:
    for cand in (os.environ.get("SCVAE_TOOLS_DATA_DIR"), ROOT.parent / "shared" / "data"):
        if cand and (Path(cand) / "pbmc3k_hvg_counts.h5ad").exists():
            return Path(cand)
    return None


DATA_DIR = _find_data_dir()
# Tests must never download: point the loaders at the shared data (or nowhere).
os.environ["SCVAE_TOOLS_NO_DOWNLOAD"] = "1"
if DATA_DIR is not None:
    os.environ["SCVAE_TOOLS_DATA_DIR"] = str(DATA_DIR)

needs_data = pytest.mark.skipif(DATA_DIR is None, reason="real data (../shared/data) not available")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # Test models are tiny: a second thread only adds synchronisation, and on a loaded
    # 2-core machine OpenMP spin-waiting makes each step ~20x slower. Session scope so that
    # module-scoped fixtures (and bit-identity checks against them) use the same setting.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def synthetic():
    """600 cells × 200 genes, 3 cell types, 2 batches; CSR integer counts."""
    return svt.datasets.synthetic_counts(n_cells=600, n_genes=200, n_types=3, n_batches=2, seed=0)


@pytest.fixture(scope="session")
def pbmc68k():
    return svt.datasets.pbmc68k()


@pytest.fixture(scope="session")
def pbmc3k_hvg():
    if DATA_DIR is None:
        pytest.skip("real data (../shared/data) not available")
    return svt.datasets.pbmc3k(DATA_DIR, hvg_only=True)


@pytest.fixture(scope="session")
def pbmc3k_nb_model(pbmc3k_hvg):
    """An NB model on pbmc3k HVGs, trained once for the slow DE and PPC checks (~40 epochs)."""
    model = svt.SCVAE(pbmc3k_hvg, n_latent=10, likelihood="nb")
    model.train(max_epochs=40, batch_size=256, progress_bar=False, seed=0)
    return model


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture
def use_native(monkeypatch):
    """Switch between the compiled CPU kernels (scvae_tools.native, where they build) and
    the torch code: ``use_native(True)`` / ``use_native(False)``."""
    def switch(on: bool) -> None:
        monkeypatch.setenv("SCVAE_TOOLS_NATIVE", "1" if on else "0")
    return switch
