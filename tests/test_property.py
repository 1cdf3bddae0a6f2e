"""Property-based tests (hypothesis) over random small count matrices.

* valid counts (any dtype / format, zero genes, huge and tiny libraries, one gene, two
  cells): a few training steps never give NaN, and results are finite;
* any matrix, valid or not (negative, NaN, non-integer, empty cells): either a clear
  ``ValueError`` or finite results;
* in both cases the input AnnData is unchanged (X, obs, var, layers, uns, obsm).
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scvae_tools as svt

SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def _quiet_collapse_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # collapse warnings on 2-epoch fits
        yield


@st.composite
def anndatas(draw, valid: bool = True) -> ad.AnnData:
    n = draw(st.integers(2, 24))
    g = draw(st.integers(1, 10))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1, 5, 100, 10_000, 1_000_000]))
    density = draw(st.floats(0.05, 1.0))
    X = (rng.random((n, g)) < density) * rng.integers(0, scale + 1, (n, g))
    X[np.arange(n), rng.integers(0, g, n)] += 1  # no empty cells
    X = X.astype(np.float64)
    if not valid:
        corruption = draw(st.sampled_from(["none", "negative", "nan", "inf", "fraction",
                                           "empty cell"]))
        i, j = rng.integers(0, n), rng.integers(0, g)
        if corruption == "negative":
            X[i, j] = -1
        elif corruption == "nan":
            X[i, j] = np.nan
        elif corruption == "inf":
            X[i, j] = np.inf
        elif corruption == "fraction":
            X[i, j] += 0.25
        elif corruption == "empty cell":
            X[i] = 0
    dtype = draw(st.sampled_from(["float32", "float64", "int64", "int32"]))
    if dtype.startswith("int") and not np.isfinite(X).all():
        dtype = "float32"
    X = X.astype(dtype)
    fmt = draw(st.sampled_from(["dense", "csr", "csc"]))
    stored = {"dense": np.asarray, "csr": sp.csr_matrix, "csc": sp.csc_matrix}[fmt](X)
    adata = ad.AnnData(
        X=stored,
        obs=pd.DataFrame({"batch": pd.Categorical(rng.choice(["a", "b"], n))},
                         index=[f"c{i}" for i in range(n)]),
        var=pd.DataFrame({"gene_id": [f"ENSG{j}" for j in range(g)]},
                         index=[f"g{j}" for j in range(g)]),
    )
    adata.layers["counts"] = stored.copy()
    adata.obsm["X_pca"] = rng.normal(size=(n, 2))
    adata.uns["note"] = {"made_by": "hypothesis", "values": np.arange(3)}
    return adata


def _same_array(a, b) -> None:
    assert type(a) is type(b) and a.shape == b.shape and a.dtype == b.dtype
    if sp.issparse(a):
        a, b = a.toarray(), b.toarray()
    equal_nan = np.asarray(a).dtype.kind == "f"
    assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=equal_nan)


def _same_uns(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same_uns(a[k], b[k])
    elif isinstance(a, np.ndarray):
        _same_array(a, b)
    else:
        assert a == b


def assert_unchanged(adata: ad.AnnData, before: ad.AnnData, x_object) -> None:
    assert adata.X is x_object  # not replaced
    _same_array(adata.X, before.X)
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    pd.testing.assert_frame_equal(adata.var, before.var)
    assert list(adata.layers) == list(before.layers)
    for k in before.layers:
        _same_array(adata.layers[k], before.layers[k])
    assert list(adata.obsm) == list(before.obsm)
    for k in before.obsm:
        _same_array(adata.obsm[k], before.obsm[k])
    _same_uns(dict(adata.uns), dict(before.uns))


def _fit(adata, batch_key):
    model = svt.SCVAE(adata, batch_key=batch_key, n_latent=2, n_hidden=8)
    return model.train(max_epochs=2, batch_size=8, progress_bar=False, seed=0)


@settings(max_examples=12, **SETTINGS)
@given(adata=anndatas(valid=True), use_batch=st.booleans())
def test_training_on_valid_counts_never_gives_nan(adata, use_batch):
    before, x_object = adata.copy(), adata.X
    model = _fit(adata, "batch" if use_batch else None)
    h = model.history
    assert len(h) == 2
    assert np.isfinite(h[["train_elbo", "train_reconstruction", "train_kl"]].to_numpy()).all()
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, 2) and np.isfinite(z).all()
    expr = model.get_normalized_expression(library_size=1e4)
    assert np.isfinite(expr).all() and (expr >= 0).all()
    np.testing.assert_allclose(expr.sum(1), 1e4, rtol=1e-3)  # proportions × 1e4
    assert np.isfinite(model.get_elbo())
    # Inference on the user's AnnData reads its counts in place (no copy): same results,
    # and the AnnData is still unchanged afterwards.
    np.testing.assert_allclose(model.get_latent_representation(adata), z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.get_normalized_expression(adata, library_size=1e4), expr,
                               rtol=1e-4, atol=1e-3)
    assert np.isfinite(model.get_elbo(adata))
    assert_unchanged(adata, before, x_object)


@settings(max_examples=15, **SETTINGS)
@given(adata=anndatas(valid=False))
def test_any_matrix_gives_clear_error_or_finite_results(adata):
    before, x_object = adata.copy(), adata.X
    try:
        model = _fit(adata, None)
    except ValueError as err:
        message = str(err)
        assert any(w in message for w in ("NaN or inf", "negative", "non-integer", "zero total"))
    else:
        assert np.isfinite(model.get_latent_representation()).all()
        assert np.isfinite(model.history["train_elbo"]).all()
    assert_unchanged(adata, before, x_object)
