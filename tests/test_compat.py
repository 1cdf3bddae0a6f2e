"""Models and training checkpoints written by older scvae_tools commits still load and resume.

The fixtures in tests/data/compat/<commit>_<kind>/ were written by those commits (see
tests/data/compat/README.md and make_fixtures.py there): a saved model with that version's
own latent means and normalized expression, or a training checkpoint with, for the
gene-batch one, that version's own resumed first epoch. Each test works on a copy in
tmp_path: the fixtures are never written to.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from scvae_tools import SCVAE

FIX = Path(__file__).parent / "data" / "compat"
MODELS = ["475ec90_nb_genebatch", "475ec90_covariates", "8f00d96_poisson", "c3bd95e_nb",
          "c3bd95e_zinb", "c3bd95e_mog", "c3bd95e_bn_decoder", "c3bd95e_query"]


@pytest.fixture(scope="module")
def adatas():
    """The cells every fixture was trained on ('ref': batch0/1; 'query': batch2), built from
    data.npz exactly as make_fixtures.to_adata builds them."""
    with np.load(FIX / "data.npz") as f:
        data = {k: f[k] for k in f.files}
    n_ref = int(data["n_ref"])
    out = {}
    for which, rows in (("ref", slice(0, n_ref)), ("query", slice(n_ref, None))):
        batch = data["batch"][rows].astype(str)
        obs = pd.DataFrame({
            "batch": pd.Categorical(batch, categories=sorted(set(batch))),
            "donor": pd.Categorical(data["donor"][rows].astype(str),
                                    categories=["d0", "d1", "d2"]),
            "pct": data["pct"][rows].astype(np.float64),
        }, index=[f"{which}{i}" for i in range(len(batch))])
        var = pd.DataFrame(index=[f"gene{j}" for j in range(data["counts"].shape[1])])
        out[which] = ad.AnnData(data["counts"][rows].astype(np.float32), obs=obs, var=var)
    return out


def _copy(name: str, tmp_path: Path) -> tuple[Path, dict]:
    dst = tmp_path / name
    shutil.copytree(FIX / name, dst)
    return dst, json.loads((dst / "info.json").read_text())


@pytest.mark.parametrize("name", MODELS)
def test_old_model_loads_and_reproduces_its_outputs(name, adatas, tmp_path):
    d, info = _copy(name, tmp_path)
    adata = adatas[info["adata"]]
    m = SCVAE.load(d / "model", adata)
    latent = m.get_latent_representation(adata)
    np.testing.assert_allclose(latent, np.load(d / "latent.npy"), rtol=1e-5, atol=1e-6)
    expr = m.get_normalized_expression(adata)[:: info["expr_rows_step"]]
    np.testing.assert_allclose(expr, np.load(d / "expr.npy"), rtol=1e-5, atol=1e-6)
    assert np.isfinite(m.get_elbo(adata))
    m.save(tmp_path / "resaved")
    again = SCVAE.load(tmp_path / "resaved", adata)
    np.testing.assert_array_equal(again.get_latent_representation(adata), latent)


def test_old_mixture_prior_reads_the_same(adatas, tmp_path):
    """Latent means and expression do not involve the prior: its parameters (whose stored
    scale changed once) are checked through log p(z) at the stored latent means."""
    d, info = _copy("c3bd95e_mog", tmp_path)
    m = SCVAE.load(d / "model", adatas["ref"])
    z = torch.from_numpy(np.load(d / "latent.npy"))
    with torch.no_grad():
        logp = float(m.module.cpu().prior_log_prob(z).mean())
    assert logp == pytest.approx(info["prior_log_prob_mean"], rel=1e-5)


def test_old_query_model_warm_start_keeps_reference_cells(adatas, tmp_path):
    d, _ = _copy("c3bd95e_query", tmp_path)
    m = SCVAE.load(d / "model", adatas["query"])
    ref_before = m.get_latent_representation(adatas["ref"])
    query_before = m.get_latent_representation(adatas["query"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.train(max_epochs=2, warm_start=True, batch_size=64, seed=0, progress_bar=False)
    # its config.json records the query: not taken for a plain model trained on some batches
    assert not [w for w in caught if "load_query" in str(w.message)]
    np.testing.assert_array_equal(m.get_latent_representation(adatas["ref"]), ref_before)
    assert not np.array_equal(m.get_latent_representation(adatas["query"]), query_before)


def _resume(name, adatas, tmp_path, max_epochs):
    d, info = _copy(name, tmp_path)
    settings = {**info["train_kwargs"], **info["resume_kwargs"], "max_epochs": max_epochs}
    m = SCVAE(adatas[info["adata"]], **info["model_kwargs"])
    m.train(checkpoint_dir=d / "ckpt", resume=True, **settings)
    return m, info


def test_old_checkpoint_resumes_as_that_version_did(adatas, tmp_path):
    """Written when θ shared the networks' Adam group (a dispersion_lr_factor of 1): the
    resume keeps that factor, and its first epoch equals the old version's own resume."""
    m, info = _resume("8f00d96_ckpt_nb_genebatch", adatas, tmp_path, 6)
    assert m.train_config.dispersion_lr_factor == 1.0
    assert len(m.history) == 6
    first = m.history.loc[m.history["epoch"] == info["checkpoint_epoch"] + 1, "train_elbo"]
    assert float(first.iloc[0]) == pytest.approx(info["old_resume_first_epoch_train_elbo"],
                                                 rel=1e-5)


def test_old_poisson_checkpoint_is_refused_clearly(adatas, tmp_path):
    with pytest.raises(ValueError, match=r"older scvae_tools.*Poisson.*unused dispersion"
                                         r".*cannot be resumed.*resume=False"):
        _resume("8f00d96_ckpt_poisson", adatas, tmp_path, 6)
