"""Bad input, tried systematically.

Each case either works correctly (checked against a reference, not only "it runs") or
raises one ``ValueError``/``KeyError`` whose message names the problem and the fix: never a
torch stack trace, never NaN results.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scvae_tools as svt
from scvae_tools.adapter import CellData, DataSpec, _as_float32

N_CELLS, N_GENES = 60, 12
MODEL = dict(n_latent=2, n_hidden=8)
TRAIN = dict(max_epochs=2, batch_size=16, progress_bar=False, seed=0)



@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*latent dimensions are collapsed")
        warnings.filterwarnings("ignore", message="Posterior collapse")
        yield


def _counts() -> np.ndarray:
    a = svt.datasets.synthetic_counts(n_cells=N_CELLS, n_genes=N_GENES, n_types=2, seed=5)
    return a.X.toarray().astype(np.float32)


def make(X, batch=None, **obs) -> ad.AnnData:
    n, g = X.shape
    adata = ad.AnnData(
        X=X,
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"gene{j}" for j in range(g)]),
    )
    if batch is not None:
        adata.obs["batch"] = batch
    for k, v in obs.items():
        adata.obs[k] = v
    return adata


def fit(adata, init=None, **train) -> svt.SCVAE:
    return svt.SCVAE(adata, **MODEL, **(init or {})).train(**{**TRAIN, **train})


def finite_results(model, adata=None) -> np.ndarray:
    z = model.get_latent_representation(adata)
    assert np.isfinite(z).all()
    assert np.isfinite(model.get_normalized_expression(adata)).all()
    assert np.isfinite(model.history[["train_elbo", "train_reconstruction", "train_kl"]]).all().all()
    return z


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return _counts()


@pytest.fixture(scope="module")
def baseline(X):
    """The reference: float32 CSR counts."""
    model = fit(make(sp.csr_matrix(X)))
    return model, model.get_latent_representation()


# ---------------------------------------------------------------------- dtypes and formats
FORMATS = {
    "dense": np.asarray,
    "csr": sp.csr_matrix,
    "csc": sp.csc_matrix,
    "csr_array": sp.csr_array,
    "csc_array": sp.csc_array,
}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", ["float64", "float32", "int64", "int32", "uint16"])
def test_numeric_dtypes_and_formats_give_identical_models(X, baseline, dtype, fmt):
    adata = make(FORMATS[fmt](X.astype(dtype)))
    before = adata.X.copy()
    model = fit(adata)
    z = finite_results(model)
    # Same counts → a bit-identical model (training always sees the same dense float32 block).
    for name, value in model.module.state_dict().items():
        torch.testing.assert_close(value, baseline[0].module.state_dict()[name], rtol=0, atol=0)
    # CPU inference reads sparse input as CSR (a sparse product in the encoder's first layer),
    # dense input densely: the same latent up to float rounding.
    np.testing.assert_allclose(z, baseline[1], rtol=1e-5, atol=1e-6)
    assert adata.X.dtype == np.dtype(dtype) and type(adata.X) is type(before)


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_bool_counts_are_read_as_zero_one(X, fmt):
    binary = X > 0
    z = finite_results(fit(make(FORMATS[fmt](binary))))
    ref = fit(make(sp.csr_matrix(binary.astype(np.float32)))).get_latent_representation()
    np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-6)  # dense vs CSR inference


def test_coo_is_refused_by_anndata_and_converted_by_the_adapter(X):
    coo = sp.coo_matrix(X)
    try:
        adata = make(coo)
    except ValueError as err:  # anndata ≥ 0.11 only stores CSR/CSC: its own clear error
        assert "CSR" in str(err)
    else:  # older anndata kept COO: it must then work like CSR
        np.testing.assert_array_equal(fit(adata).get_latent_representation(),
                                      fit(make(sp.csr_matrix(X))).get_latent_representation())
    converted = _as_float32(coo)
    assert sp.isspmatrix_csr(converted) and converted.dtype == np.float32
    np.testing.assert_array_equal(converted.toarray(), X)


def test_csr_with_duplicate_entries_is_summed(X, baseline):
    csr = sp.csr_matrix(X)
    coo = csr.tocoo()
    # Split every stored value into two entries at the same position (still a valid CSR).
    half = np.floor(coo.data / 2)
    dup = sp.csr_matrix((np.concatenate([half, coo.data - half]),
                         (np.concatenate([coo.row, coo.row]), np.concatenate([coo.col, coo.col]))),
                        shape=X.shape)
    dup.has_canonical_format = False
    np.testing.assert_array_equal(fit(make(dup)).get_latent_representation(), baseline[1])


# ---------------------------------------------------------------------- invalid values
def _with(X, fn):
    Y = X.copy()
    fn(Y)
    return Y


INVALID = {
    "negative": (lambda X: _with(X, lambda Y: Y.__setitem__((3, 2), -1)), "negative values.*raw counts"),
    "nan": (lambda X: _with(X, lambda Y: Y.__setitem__((3, 2), np.nan)), "NaN or inf.*Replace them"),
    "inf": (lambda X: _with(X, lambda Y: Y.__setitem__((3, 2), np.inf)), "NaN or inf.*Replace them"),
    "non-integer": (lambda X: _with(X, lambda Y: Y.__setitem__((3, 2), 0.5)), "non-integer.*allow_non_integer=True"),
    "log-normalised": (lambda X: np.log1p(X), "non-integer.*raw integer counts"),
    "zero-count cell": (lambda X: _with(X, lambda Y: Y.__setitem__(4, 0)), r"1 cell\(s\) have zero total counts.*\[4\].*filter_cells"),
}


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "numpy"])
@pytest.mark.parametrize("fmt", ["dense", "csr"])
@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_counts_raise_one_clear_error(X, case, fmt, kernel, use_native):
    # The compiled count check (where it builds) and numpy's give the same error.
    use_native(kernel)
    build, message = INVALID[case]
    adata = make(FORMATS[fmt](build(X)))
    snapshot = adata.copy()
    with pytest.raises(ValueError, match=message):
        svt.SCVAE(adata, **MODEL)
    # The same check guards a layer, and inference on new data.
    layered = make(sp.csr_matrix(X))
    layered.layers["counts"] = FORMATS[fmt](build(X))
    with pytest.raises(ValueError, match=message):
        svt.SCVAE(layered, layer="counts", **MODEL)
    assert (abs(adata.X - snapshot.X) > 0).sum() == 0 if fmt == "csr" else np.array_equal(
        adata.X, snapshot.X, equal_nan=True)


@pytest.mark.parametrize("threads", [1, 3])
def test_value_checks_split_across_threads_report_the_first_problem(monkeypatch, threads):
    # Large arrays are checked in contiguous parts by several threads; the verdict and the
    # reported problem must be those of a serial pass, wherever the problems lie.
    from scvae_tools import adapter

    monkeypatch.setattr(adapter, "_PARALLEL_CHECK_VALUES", 1000)
    monkeypatch.setattr(adapter, "_CHECK_CHUNK", 256)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        values = np.random.default_rng(0).poisson(2.0, 10_000).astype(np.float32)
        adapter.validate_values(values)  # clean: no error from any part
        last = values.copy()
        last[-1] = 0.5  # in the last part only
        with pytest.raises(ValueError, match="non-integer"):
            adapter.validate_values(last)
        adapter.validate_values(last, allow_non_integer=True)
        both = last.copy()
        both[10] = np.nan  # an earlier problem (first part) wins over the later one
        with pytest.raises(ValueError, match="NaN or inf"):
            adapter.validate_values(both)
        middle = values.copy()
        middle[5_000] = -1.0
        with pytest.raises(ValueError, match="negative"):
            adapter.validate_values(middle)
    finally:
        torch.set_num_threads(old)


def test_invalid_counts_at_inference(baseline, X):
    model, _ = baseline
    with pytest.raises(ValueError, match="negative values"):
        model.get_latent_representation(make(INVALID["negative"][0](X)))


def test_non_integer_allowed_when_asked(X):
    """Fractional counts are read as given, never rounded: the observed library is their
    sum, and the same cells rounded encode elsewhere (measured: up to 0.012 apart)."""
    soft = X * 0.7
    model = fit(make(soft), init={"allow_non_integer": True})
    z = finite_results(model)
    assert z.shape == (N_CELLS, 2)
    np.testing.assert_allclose(model.get_normalized_expression(library_size="observed").sum(1),
                               soft.sum(1), rtol=1e-4)
    rounded = make(np.round(soft))
    assert np.abs(model.get_latent_representation(rounded) - z).max() > 5e-3


def test_normalised_x_points_at_counts_kept_elsewhere(X):
    """The scanpy workflow keeps counts in a layer or in .raw and normalises X: the error
    names where the counts are and the exact fix."""
    logged = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    a = make(logged)
    a.layers["counts"] = sp.csr_matrix(X)
    a.layers["scaled"] = logged - logged.mean(0)
    with pytest.raises(ValueError, match=r"non-integer.*adata.layers\['counts'\]; pass layer='counts'"):
        svt.SCVAE(a, **MODEL)
    with pytest.raises(ValueError, match="negative values.*pass layer='counts'"):
        svt.SCVAE(a, layer="scaled", **MODEL)
    b = make(logged[:, :8])
    b.raw = make(X)  # all 12 genes' counts; X keeps 8 of them
    with pytest.raises(ValueError, match=r"adata.raw looks like raw counts.*adata.raw\[:, adata.var_names\]"):
        svt.SCVAE(b, **MODEL)
    b.layers["counts"] = b.raw[:, b.var_names].X.copy()  # the fix, as the message gives it
    assert finite_results(fit(b, init={"layer": "counts"})).shape == (N_CELLS, 2)
    c = make(logged)
    c.raw = make(logged)  # `adata.raw = adata` after log1p, as scanpy's tutorial does: no counts
    with pytest.raises(ValueError, match=r"pseudo-counts\.$"):  # no advice pointing at .raw
        svt.SCVAE(c, **MODEL)


def test_trained_model_names_the_fix_that_exists_at_evaluation(baseline, X):
    """A trained model reads the layer it was trained on (no layer= at evaluation): the
    errors say how to put the counts there, and following them works."""
    model, z = baseline
    logged = make(np.log1p(X / X.sum(1, keepdims=True) * 1e4))
    logged.layers["counts"] = sp.csr_matrix(X)
    with pytest.raises(ValueError, match=r"non-integer.*The model reads adata.X, as in "
                       r"training.*`q = adata.copy\(\); q.X = q.layers\['counts'\]`") as err:
        model.get_latent_representation(logged)
    assert "layer='counts'" not in str(err.value) and "allow_non_integer" not in str(err.value)
    q = logged.copy()
    q.X = q.layers["counts"]  # the fix, as the message gives it
    np.testing.assert_allclose(model.get_latent_representation(q), z, rtol=1e-5, atol=1e-6)
    with_raw = make(np.log1p(X))
    with_raw.raw = make(X)
    with pytest.raises(ValueError, match=r"adata.raw looks like raw counts: pass "
                       r"`adata.raw.to_adata\(\)`"):
        model.get_latent_representation(with_raw)
    np.testing.assert_allclose(model.get_latent_representation(with_raw.raw.to_adata()), z,
                               rtol=1e-5, atol=1e-6)
    on_layer = fit(_with_layer(X), {"layer": "counts"})
    with pytest.raises(KeyError, match=r"trained on adata.layers\['counts'\]: add the raw "
                       r"counts there, e.g. `adata.layers\['counts'\] = adata.X.copy\(\)`"):
        on_layer.get_latent_representation(make(X))


def _with_layer(X) -> ad.AnnData:
    a = make(np.log1p(X))
    a.layers["counts"] = X.copy()
    return a


def test_cells_empty_in_the_model_genes_only(baseline, X):
    """A query with extra genes: a cell whose counts all lie outside the model's genes is
    named as such (filtering on all genes keeps it), and the advised filter works."""
    model, z = baseline
    extra = np.zeros((N_CELLS, 3), np.float32)
    extra[:, 0] = 1
    full = X.copy()
    full[7] = 0
    q = make(np.hstack([full, extra]))
    q.var_names = [f"gene{j}" for j in range(N_GENES)] + ["x1", "x2", "x3"]
    with pytest.raises(ValueError, match=r"1 cell\(s\) have no counts in the model's 12 "
                       r"genes \(first row indices: \[7\]\)"):
        model.get_latent_representation(q)
    q = q[np.asarray(q[:, model.var_names].X.sum(axis=1)).ravel() > 0].copy()  # the advice
    assert q.n_obs == N_CELLS - 1
    np.testing.assert_allclose(model.get_latent_representation(q), np.delete(z, 7, axis=0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make_bad, exc, message", [
    (lambda X: make(X.astype(object).astype(str)), ValueError, "dtype <U.*must be numeric"),
    (lambda X: make(X[:0]), ValueError, r"empty \(0 cells × 12 genes\)"),
    (lambda X: make(X[:, :0]), ValueError, r"empty \(60 cells × 0 genes\)"),
], ids=["strings", "no cells", "no genes"])
def test_unusable_matrices(X, make_bad, exc, message):
    with pytest.raises(exc, match=message):
        svt.SCVAE(make_bad(X), **MODEL)


def test_missing_layer_and_missing_x(X):
    with pytest.raises(KeyError, match="Layer 'counts' not found.*layer=None"):
        svt.SCVAE(make(X), layer="counts", **MODEL)
    no_x = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(5)]),
                      var=pd.DataFrame(index=[f"g{j}" for j in range(3)]))
    with pytest.raises(ValueError, match="adata.X is None. Pass layer="):
        svt.SCVAE(no_x, **MODEL)


# ---------------------------------------------------------------------- shapes
def test_zero_count_genes_are_fine(X):
    Y = X.copy()
    Y[:, [0, 5]] = 0
    with pytest.warns(UserWarning, match="2 of 12 genes have no counts"):  # works, and says so
        model = fit(make(Y))
    finite_results(model)
    assert np.isfinite(model.get_elbo())


def test_one_cell(X, baseline):
    model, z_all = baseline
    with pytest.raises(ValueError, match="at least 2 cells.*use more cells"):
        fit(make(X[:1]))
    # Inference on one cell works (BatchNorm uses running statistics in eval mode) and
    # gives that cell's row of the full result.
    one = make(sp.csr_matrix(X[7:8]))
    one.obs_names = ["cell7"]
    np.testing.assert_allclose(model.get_latent_representation(one), z_all[7:8], atol=1e-6)


def test_two_cells_train(X):
    finite_results(fit(make(X[:2])))


def test_one_gene(X):
    Y = X[:, :1] + 1
    model = fit(make(Y))
    finite_results(model)
    # With one gene the decoder's proportions are 1: expression per 1e4 counts is 1e4.
    np.testing.assert_allclose(model.get_normalized_expression(library_size=1e4), 1e4, rtol=1e-5)


def test_last_minibatch_of_one_cell_is_merged(X):
    """33 cells, batches of 16: the last batch would be one cell, which BatchNorm cannot train on."""
    bn = torch.nn.BatchNorm1d(4).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn(torch.ones(1, 4))  # the crash this guards against
    adata = make(X[:33])
    data = CellData(adata, DataSpec.from_anndata(adata))
    sizes = [b.x.shape[0] for b in data.batches(batch_size=16, drop_singleton=True)]
    assert sizes == [16, 17]
    seen = torch.cat([b.index for b in data.batches(batch_size=16, shuffle=True,
                                                    generator=torch.Generator().manual_seed(0),
                                                    drop_singleton=True)])
    assert sorted(seen.tolist()) == list(range(33))
    finite_results(fit(adata, train_size=1.0, batch_size=16))
    # Also when the train/validation split leaves the remainder: 0.85 of 20 cells = 17 = 16 + 1.
    from scvae_tools.train import split_indices

    assert len(split_indices(20, 0.85, seed=0)[0]) == 17
    finite_results(fit(make(X[:20]), train_size=0.85, batch_size=16))


# ---------------------------------------------------------------------- batch labels
def test_batch_key_missing_or_with_nan(X):
    labels = np.array(["a", "b"] * (N_CELLS // 2), dtype=object)
    with pytest.raises(KeyError, match="'batch' is not a column of adata.obs.*spelling"):
        svt.SCVAE(make(X), batch_key="batch", **MODEL)
    with_nan = labels.copy()
    with_nan[[3, 9]] = np.nan
    for col in (with_nan, pd.Categorical(with_nan),
                np.where(np.arange(N_CELLS) == 3, np.nan, np.arange(N_CELLS) % 2)):
        with pytest.raises(ValueError, match=r"obs\['batch'\] has \d missing label\(s\).*label of "
                           "their own"):
            svt.SCVAE(make(X, batch=col), batch_key="batch", **MODEL)


def test_batch_labels_at_inference(X):
    labels = np.array(["a", "b"] * (N_CELLS // 2))
    adata = make(X, batch=labels)
    model = fit(adata, init={"batch_key": "batch"})
    query = make(X, batch=np.where(np.arange(N_CELLS) < 5, "c", labels))
    with pytest.raises(ValueError, match=r"categories the model was not trained on: \['c'\].*known: \['a', 'b'\]"):
        model.get_latent_representation(query)
    nan_query = make(X, batch=np.where(np.arange(N_CELLS) == 0, None, labels).astype(object))
    with pytest.raises(ValueError, match="missing label"):
        model.get_latent_representation(nan_query)
    with pytest.raises(KeyError, match="'batch' is not a column"):
        model.get_latent_representation(make(X))
    # Categories given as a categorical with an unused level encode the same way.
    cat = make(X, batch=pd.Categorical(labels, categories=["a", "b", "zz"]))
    np.testing.assert_array_equal(model.get_latent_representation(cat),
                                  model.get_latent_representation(adata))


def test_integer_labels_stored_as_floats_are_the_same_labels(X, tmp_path):
    """Integer batch labels become floats when a merge introduces NaN: 1.0 is label "1",
    for the model (plain load) and for reference mapping, which made them new batches and
    moved the reference's own cells. A model saved with float text ("1.0") still reads them."""
    ints = np.arange(N_CELLS) % 2
    model = fit(make(X, batch=ints), init={"batch_key": "batch"})
    assert model.spec.batch_categories == ["0", "1"]
    z = model.get_latent_representation()
    floats = make(X, batch=ints.astype(float))
    np.testing.assert_array_equal(model.get_latent_representation(floats), z)
    np.testing.assert_array_equal(
        model.get_latent_representation(make(X, batch=pd.Categorical(ints.astype(float)))), z)
    model.save(tmp_path / "ref")
    mapped = svt.SCVAE.load_query(tmp_path / "ref", floats, progress_bar=False)
    assert mapped.query_info["new_categories"] == {}  # not "0.0" and "1.0"
    np.testing.assert_array_equal(mapped.get_latent_representation(), z)
    # transform_batch given as obs holds the label (1.0) names batch "1"
    np.testing.assert_array_equal(
        model.get_normalized_expression(floats, transform_batch=np.float64(1.0)),
        model.get_normalized_expression(floats, transform_batch="1"))
    # a model whose categories were written "0.0"/"1.0" (float labels, before this change)
    from scvae_tools.adapter import _encode

    np.testing.assert_array_equal(_encode(floats.obs, "batch", ["0.0", "1.0"]), ints)
    np.testing.assert_array_equal(_encode(floats.obs, "batch", ["0", "1"]), ints)


def test_size_factors_on_another_scale_warn_and_raw_is_named(X, tmp_path):
    """scran/DESeq size factors (mean 1) are not library sizes in counts: the fit would be
    far worse (on pbmc3k, ELBO −2084 against −688), so setting up with them warns."""
    totals = X.sum(1)
    with pytest.warns(UserWarning, match=r"obs\['sf'\] is on another scale.*median ratio"):
        svt.SCVAE(make(X, sf=totals / totals.mean()), size_factor_key="sf", **MODEL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # library sizes in counts: no warning
        svt.SCVAE(make(X, sf=totals * 1.3), size_factor_key="sf", **MODEL)
    # far above the totals (e.g. all-gene totals for a gene subset): other advice
    with pytest.warns(UserWarning, match="Library sizes over other genes") as rec:
        svt.SCVAE(make(X, sf=totals * 100), size_factor_key="sf", **MODEL)
    assert "scran" not in str(rec[0].message)
    path = tmp_path / "sf.h5ad"  # and the same for counts read from disk
    make(sp.csr_matrix(X), sf=totals / totals.mean()).write_h5ad(path)
    with pytest.warns(UserWarning, match=r"obs\['sf'\] is on another scale"):
        svt.SCVAE(str(path), size_factor_key="sf", **MODEL)
    a = make(np.log1p(X))
    a.raw = make(X)
    with pytest.raises(TypeError, match=r"adata.raw is not an AnnData.*raw.to_adata\(\)"):
        svt.SCVAE(a.raw, **MODEL)


def test_evaluating_cells_without_the_models_obs_columns(X, tmp_path):
    """A model set up with size_factor_key / continuous covariates, given cells whose obs
    lacks those columns: the error says the model needs them and how to add them (it was a
    bare list of the available columns). In memory and backed."""
    totals = X.sum(1)
    model = fit(make(X, lib=totals, pct=np.linspace(0, 1, N_CELLS)),
                init={"size_factor_key": "lib", "continuous_covariate_keys": ["pct"]})
    for drop, fix in [("lib", r"size_factor_key='lib'.*library size in counts"),
                      ("pct", r"continuous_covariate_keys='pct'.*same covariate")]:
        a = make(X, lib=totals, pct=np.linspace(0, 1, N_CELLS))
        del a.obs[drop]
        with pytest.raises(KeyError, match=f"The model was set up with {fix}"):
            model.get_latent_representation(a)
        a.write_h5ad(tmp_path / f"without_{drop}.h5ad")
        backed = ad.read_h5ad(tmp_path / f"without_{drop}.h5ad", backed="r")
        with pytest.raises(KeyError, match=f"The model was set up with {fix}"):
            model.get_elbo(backed)
        backed.file.close()


def test_bad_covariates(X):
    with pytest.raises(ValueError, match="must be positive and finite.*size_factor_key=None"):
        fit(make(X, sf=np.where(np.arange(N_CELLS) == 2, 0.0, 1.0)), init={"size_factor_key": "sf"})
    with pytest.raises(ValueError, match=r"Continuous covariates contain NaN or inf: obs "
                       r"'pct' \(1 cells\)"):
        svt.SCVAE(make(X, pct=np.where(np.arange(N_CELLS) == 2, np.nan, 0.5),
                       ok=np.ones(N_CELLS)), continuous_covariate_keys=["ok", "pct"], **MODEL)
    with pytest.raises(ValueError, match=r"'batch' is given twice \(batch_key and "
                       r"categorical_covariate_keys\)"):
        svt.SCVAE(make(X, batch=["a", "b"] * (N_CELLS // 2)), batch_key="batch",
                  categorical_covariate_keys="batch", **MODEL)
    with pytest.raises(ValueError, match=r"obs\['pct'\] must be numeric"):
        svt.SCVAE(make(X, pct=["x"] * N_CELLS), continuous_covariate_keys=["pct"], **MODEL)
    with pytest.raises(ValueError, match="missing label"):
        svt.SCVAE(make(X, donor=[None] + ["d"] * (N_CELLS - 1)),
                  categorical_covariate_keys=["donor"], **MODEL)


def test_obs_keys_of_the_wrong_type(X):
    adata = make(X, batch=["a", "b"] * (N_CELLS // 2), donor=["d", "e", "f"] * (N_CELLS // 3))
    # One name where a list is expected is a list of one, not the string's characters.
    one = svt.SCVAE(adata, categorical_covariate_keys="donor", **MODEL)
    assert one.spec.categorical_covariate_keys == ["donor"]
    assert one.spec.categorical_covariate_categories == {"donor": ["d", "e", "f"]}
    with pytest.raises(TypeError, match=r"batch_key must be one name.*categorical_covariate_keys"):
        svt.SCVAE(adata, batch_key=["batch", "donor"], **MODEL)
    with pytest.raises(TypeError, match="layer must be one name"):
        svt.SCVAE(adata, layer=0, **MODEL)
    with pytest.raises(TypeError, match=r"continuous_covariate_keys must be obs column names"):
        svt.SCVAE(adata, continuous_covariate_keys=[1], **MODEL)


def test_settings_without_meaning_are_refused(X):
    with pytest.raises(ValueError, match="dispersion='gene-batch' needs a batch_key"):
        svt.SCVAE(make(X), dispersion="gene-batch", **MODEL)
    for dispersion in ("gene-cell", "gene-batch"):
        with pytest.raises(ValueError, match="'poisson' has no dispersion.*likelihood='nb'"):
            svt.SCVAE(make(X, batch=["a", "b"] * (N_CELLS // 2)), batch_key="batch",
                      likelihood="poisson", dispersion=dispersion, **MODEL)


@pytest.mark.parametrize("call, message", [
    (lambda m: m.get_normalized_expression(library_size=-1), "library_size must be a positive"),
    (lambda m: m.get_normalized_expression(library_size="foo"), "or 'observed', got 'foo'"),
    (lambda m: m.get_normalized_expression(library_size=float("nan")), "library_size must be"),
    (lambda m: m.get_normalized_expression(n_samples=0), "n_samples must be a positive integer"),
    (lambda m: m.get_marginal_ll(n_samples=0), "n_samples must be a positive integer"),
    (lambda m: m.posterior_predictive_sample(n_samples=1.5), "n_samples must be a positive"),
    (lambda m: m.get_latent_representation(batch_size=0), "batch_size must be a positive"),
    (lambda m: m.get_elbo(batch_size=-5), "batch_size must be a positive integer, got -5"),
    (lambda m: m.train(device="gpu0", **TRAIN), "device must be one of 'auto', 'cpu'"),
], ids=["lib-negative", "lib-string", "lib-nan", "expr-samples", "ml-samples", "ppc-samples",
        "latent-batch", "elbo-batch", "device-name"])
def test_bad_call_arguments_are_named(baseline, call, message):
    """Arguments of the evaluation calls: one ValueError naming the argument, never NaN,
    silently ignored values or an error from inside torch."""
    model, _ = baseline
    with pytest.raises(ValueError, match=message):
        call(model)


def test_empty_or_obsm_style_result_key_is_refused(baseline, X):
    model, _ = baseline
    a = make(X)
    with pytest.raises(ValueError, match="key_added must be a non-empty string"):
        model.write_to_adata(a, key_added="")
    # scanpy's key_added is sometimes the obsm key itself; ours names the results.
    with pytest.raises(ValueError, match=r"would write obsm\['X_X_vae'\].*key_added='vae'"):
        svt.tl.scvae(a, key_added="X_vae", max_epochs=1, progress_bar=False, **MODEL)
    # "/" separates groups in an .h5ad: such a key writes, and then the file cannot be read
    with pytest.raises(ValueError, match=r"must not contain '/'.*key_added='run_1'"):
        model.write_to_adata(a, key_added="run/1")
    assert not a.obsm and not a.layers and not a.uns  # nothing written


def test_layers_is_a_flag_not_the_counts_layer(baseline, X):
    """``layers="counts"`` (meant: ``layer="counts"``) used to count as True, and the model
    trained on X without a word."""
    model, _ = baseline
    a = make(X)
    a.layers["counts"] = a.X.copy()
    with pytest.raises(TypeError, match=r"layers= is True or False.*layer='name'"):
        svt.tl.scvae(a, layers="counts", max_epochs=1, progress_bar=False, **MODEL)
    with pytest.raises(TypeError, match="layers= is True or False"):
        model.write_to_adata(a, layers="counts")
    assert not a.obsm and list(a.layers) == ["counts"] and not a.uns  # nothing written
    model.write_to_adata(a, layers=np.bool_(False))  # numpy's booleans are flags too
    assert "X_scvae" in a.obsm


def test_a_warm_up_longer_than_training_and_a_tiny_train_size_are_named(X):
    """kl_warmup_epochs > max_epochs left β at a fraction of beta and early stopping off,
    silently; a train_size that leaves one training cell was blamed on the cell count."""
    with pytest.warns(UserWarning, match=r"kl_warmup_epochs=10 is longer than max_epochs=3: "
                      r"β only reaches 0.3"):
        model = fit(make(X), max_epochs=3, kl_warmup_epochs=10)
    assert model.history["beta"].tolist() == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=rf"train_size=0.001 of {N_CELLS} cells leaves too "
                       rf"few; pass train_size of at least {2 / N_CELLS:.3g}"):
        fit(make(X), train_size=0.001)


def test_a_measurement_as_batch_key_warns(X):
    """percent_mito as batch_key made ~one batch per cell, silently."""
    with pytest.warns(UserWarning, match=r"batch_key 'pct' holds 60 distinct numbers among "
                      r"60 cells.*continuous_covariate_keys=\['pct'\]"):
        svt.SCVAE(make(X, pct=np.linspace(0.1, 0.9, N_CELLS)), batch_key="pct", **MODEL)
    with warnings.catch_warnings():  # a few numeric labels are batches, not measurements
        warnings.simplefilter("error")
        svt.SCVAE(make(X, run=np.arange(N_CELLS) % 3 * 1.0), batch_key="run", **MODEL)


def test_unavailable_devices_and_negative_beta(X):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU here.*device='auto' or 'cpu'"):
            fit(make(X), device="cuda")
    if not (torch.backends.mps.is_available()):
        with pytest.raises(ValueError, match="MPS is not available here"):
            fit(make(X), device="mps")
    for name in ("beta", "free_bits"):
        with pytest.raises(ValueError, match=f"{name} must be a non-negative number"):
            svt.SCVAE(make(X), **{name: -0.5}, **MODEL)


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_many_genes_without_counts_are_pointed_out(X, fmt):
    """Genes never detected cost time and inform nothing: a warning with the fix; the
    AnnData is left as it is. A few such genes (usual after gene selection) pass quietly."""
    wide = np.hstack([X, np.zeros((N_CELLS, 6))])  # 6 of 18 genes never detected
    a = make(sp.csr_matrix(wide) if fmt == "csr" else wide)
    with pytest.warns(UserWarning, match=r"6 of 18 genes have no counts in any cell.*filter_genes"):
        svt.SCVAE(a, **MODEL)
    assert a.n_vars == 18
    one = np.hstack([np.tile(X, (1, 2)), np.zeros((N_CELLS, 1))])  # 1 of 25
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svt.SCVAE(make(sp.csr_matrix(one) if fmt == "csr" else one), **MODEL)


# ---------------------------------------------------------------------- genes
def test_genes_permuted_extra_missing_at_load(X, baseline, tmp_path):
    model, z = baseline
    adata = make(sp.csr_matrix(X))
    np.testing.assert_array_equal(model.get_latent_representation(adata[:, ::-1].copy()), z)
    extra = make(sp.csr_matrix(np.hstack([X, X[:, :3]])))
    np.testing.assert_array_equal(model.get_latent_representation(extra), z)
    with pytest.raises(ValueError, match=r"exactly the model's 12 genes.*layers=False"):
        model.write_to_adata(extra)
    model.write_to_adata(extra, layers=False)  # the latent alone is fine
    np.testing.assert_array_equal(extra.obsm["X_scvae"], z)
    model.save(tmp_path / "m")
    missing = adata[:, 2:].copy()
    with pytest.raises(ValueError, match=r"lacks 2 of the model's 12 genes.*\['gene0', 'gene1'\]"):
        svt.SCVAE.load(tmp_path / "m", missing)
    np.testing.assert_array_equal(
        svt.SCVAE.load(tmp_path / "m", adata[:, ::-1].copy()).get_latent_representation(), z)


def test_duplicate_gene_names(X):
    adata = make(X)
    adata.var_names = ["gene0", "gene0"] + [f"gene{j}" for j in range(2, N_GENES)]
    with pytest.raises(ValueError, match=r"unique \(as text\); duplicated: \['gene0'\]\. Fix with `adata.var_names_make"):
        svt.SCVAE(adata, **MODEL)


def test_duplicates_among_genes_the_model_does_not_use_are_fine(X, baseline, tmp_path):
    """Evaluating on a wider matrix whose extra genes repeat a name (symbols of a full
    matrix) used to be refused; only a duplicated model gene makes the match ambiguous,
    and that error names it. In memory, from a backed file and in prepare_query_anndata."""
    model, z = baseline
    a = make(X)
    extra = ad.AnnData(np.ones((a.n_obs, 2), dtype=np.float32), obs=a.obs[[]],
                       var=pd.DataFrame(index=["dup", "dup"]))
    wide = ad.concat([a, extra], axis=1)
    wide.obs = a.obs.copy()
    np.testing.assert_allclose(model.get_latent_representation(wide), z, atol=1e-6)
    wide.write_h5ad(tmp_path / "wide.h5ad")
    backed = ad.read_h5ad(tmp_path / "wide.h5ad", backed="r")
    np.testing.assert_allclose(model.get_latent_representation(backed), z, atol=1e-6)
    backed.file.close()
    assert svt.SCVAE.prepare_query_anndata(wide, model).var_names.tolist() == a.var_names.tolist()
    twice = ad.concat([a, a[:, :1]], axis=1)
    twice.obs = a.obs.copy()
    with pytest.raises(ValueError, match=r"1 of the model's genes appear more than once.*\['gene0'\]"):
        model.get_latent_representation(twice)


# ---------------------------------------------------------------------- files and folders
def test_missing_files_name_the_fix(baseline, tmp_path, monkeypatch):
    model, _ = baseline
    model.save(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=r"config.json is a file; a saved SCVAE is a folder: pass .*m\.$"):
        svt.SCVAE.load(tmp_path / "m" / "config.json")
    with pytest.raises(FileNotFoundError, match="No saved SCVAE at"):
        svt.SCVAE.load(tmp_path / "nothing")
    empty = tmp_path / "data"
    with pytest.raises(FileNotFoundError, match="pbmc3k_hvg_counts.h5ad not found in .*data_dir="):
        svt.datasets.pbmc3k(empty, hvg_only=True, download=False)
    # Offline (as here): the failed download names the folder and the fix, not a bare URLError.
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(OSError, match=r"pbmc3k_full_counts.h5ad is not in .*data.*failed "
                                      r"\(URLError: <urlopen error Name or service.*SCVAE_TOOLS_DATA_DIR"):
        svt.datasets.pbmc3k(empty, download=True)


# ---------------------------------------------------------------------- views and backed
def test_views(X):
    parent = make(sp.csr_matrix(X), batch=np.array(["a", "b"] * (N_CELLS // 2)))
    snapshot = parent.copy()
    view = parent[parent.obs["batch"] == "a"]
    assert view.is_view
    model = fit(view)
    assert view.is_view  # reading never turned it into a copy
    ref = fit(view.copy())
    np.testing.assert_array_equal(model.get_latent_representation(), ref.get_latent_representation())
    np.testing.assert_array_equal(model.get_latent_representation(view),
                                  ref.get_latent_representation(view.copy()))
    assert (parent.X != snapshot.X).nnz == 0 and parent.obs.equals(snapshot.obs)
    assert not parent.obsm and not parent.layers and not parent.uns


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_backed_anndata_is_read_into_memory(X, baseline, tmp_path, fmt):
    path = tmp_path / "counts.h5ad"
    make(FORMATS[fmt](X)).write_h5ad(path)
    raw = path.read_bytes()
    backed = ad.read_h5ad(path, backed="r")
    assert backed.isbacked
    model, z = baseline
    # Backed blocks are read densely, the in-memory CSR baseline sparsely: float rounding only.
    np.testing.assert_allclose(model.get_latent_representation(backed), z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fit(backed).get_latent_representation(), z, rtol=1e-5, atol=1e-6)
    backed.file.close()
    assert path.read_bytes() == raw  # the file on disk was only read


def test_dates_as_a_continuous_covariate_are_refused_with_a_conversion():
    """Dates became ~1e18 nanoseconds: training diverged into a garbage model (ELBO −6e6)."""
    adata = make(_counts())
    adata.obs["t"] = pd.date_range("2020", periods=N_CELLS)
    adata.obs["dt"] = pd.to_timedelta(np.arange(N_CELLS), unit="h")
    for key in ("t", "dt"):
        with pytest.raises(ValueError, match=rf"obs\['{key}'\] holds dates or durations.*days"):
            svt.SCVAE(adata, continuous_covariate_keys=key, **MODEL)


@pytest.mark.parametrize("thing", [np.ones((5, 3)), sp.csr_matrix(np.ones((5, 3))),
                                   pd.DataFrame(np.ones((5, 3))), None])
def test_something_else_than_an_anndata_is_a_type_error_naming_the_fix(thing):
    with pytest.raises(TypeError, match=r"Expected an AnnData.*anndata.AnnData\(X\)"):
        svt.SCVAE(thing)
    if thing is None:  # for the evaluation methods, None means the training data
        return
    model = svt.SCVAE(make(_counts()), **MODEL).train(**TRAIN)
    with pytest.raises(TypeError, match="Expected an AnnData"):
        model.get_latent_representation(thing)


def test_gene_names_equal_as_text_are_refused_before_training(tmp_path):
    """1 and "1" differ in pandas but not in a saved model: save worked and load refused."""
    adata = make(_counts())
    adata.var_names = pd.Index([1, "1"] + [f"g{j}" for j in range(N_GENES - 2)], dtype=object)
    with pytest.raises(ValueError, match=r"unique \(as text\); duplicated: \['1'\].*astype"):
        svt.SCVAE(adata, **MODEL)


def test_x_none_advice_fits_a_trained_model():
    X = _counts()
    model = svt.SCVAE(make(X), **MODEL).train(**TRAIN)
    query = make(X)
    query.layers["counts"] = X
    query.X = None
    with pytest.raises(ValueError, match=r"trained on adata.X.*adata.X = adata.layers"):
        model.get_latent_representation(query)
    with pytest.raises(ValueError, match="Pass layer= naming the layer"):
        svt.SCVAE(query, **MODEL)


def test_a_read_only_dense_matrix_is_read_without_torch_warnings():
    X = _counts()
    model = svt.SCVAE(make(X), **MODEL).train(**TRAIN)
    frozen = X.copy()
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        z = model.get_latent_representation(make(frozen))
    np.testing.assert_allclose(z, model.get_latent_representation(), rtol=1e-5, atol=1e-6)


def test_a_continuous_covariate_far_from_unit_scale_warns_with_the_fix():
    """The networks take a covariate as it is: one in the thousands (a library size) hurt
    the fit badly and said nothing."""
    adata = make(_counts())
    adata.obs["total"] = np.asarray(adata.X.sum(1)).ravel() * 50.0
    adata.obs["total_z"] = (adata.obs["total"] - adata.obs["total"].mean()) / adata.obs["total"].std()
    with pytest.warns(UserWarning, match=r"obs\['total'\] is far from unit scale.*Standardise"):
        svt.SCVAE(adata, continuous_covariate_keys="total", **MODEL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        svt.SCVAE(adata, continuous_covariate_keys="total_z", **MODEL)
    # A constant covariate: standardising it (the advice) divides by a zero sd, so NaN.
    adata.obs["age"] = 50.0
    with pytest.warns(UserWarning, match=r"obs\['age'\] is 50 in every cell.*Leave it out") as rec:
        svt.SCVAE(adata, continuous_covariate_keys="age", **MODEL)
    assert not any("Standardise" in str(w.message) for w in rec)


def test_missing_genes_advice_fits_the_case():
    """Padding was advised even where it is refused (over a quarter missing) or wrong (an
    AnnData that is genes × cells)."""
    X = _counts()
    model = svt.SCVAE(make(X), **MODEL).train(**TRAIN)
    few = make(X)[:, 2:].copy()  # 2 of 12 genes gone: padding is the fix
    with pytest.raises(ValueError, match="prepare_query_anndata.*filtered after training"):
        model.get_latent_representation(few)
    many = make(X)[:, 6:].copy()  # half gone: too many to pad
    with pytest.raises(ValueError, match=r"too many to pad with zero counts \(over 25%\)"):
        model.get_latent_representation(many)
    square = make(X[:N_GENES].T.copy())  # genes as rows, named like the model's genes
    square.obs_names = [f"gene{j}" for j in range(N_GENES)]
    square.var_names = [f"cell{i}" for i in range(N_GENES)]
    with pytest.raises(ValueError, match=r"looks transposed.*adata\.T"):
        model.get_latent_representation(square)


def test_results_under_one_key_come_from_one_model():
    """layers=False under a key an earlier model wrote layers to left that model's layers
    beside the new latent."""
    X = _counts()
    adata = make(X)
    svt.SCVAE(adata, **MODEL).train(**TRAIN).write_to_adata(adata)
    assert list(adata.uns["scvae"]["layers"]) == ["scvae_denoised", "scvae_expected"]
    second = svt.SCVAE(adata, **{**MODEL, "n_latent": 3}).train(**TRAIN)
    with pytest.warns(UserWarning, match="Removed layers"):
        second.write_to_adata(adata, layers=False)
    assert "scvae_denoised" not in adata.layers and "scvae_expected" not in adata.layers
    assert adata.obsm["X_scvae"].shape[1] == 3 and len(adata.uns["scvae"]["layers"]) == 0


def test_a_users_own_layer_of_that_name_is_kept():
    """Only layers a model's record lists are removed, not a user's layer of the same name."""
    adata = make(_counts())
    adata.layers["scvae_denoised"] = adata.X.copy()  # the user's, no model record
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        svt.SCVAE(adata, **MODEL).train(**TRAIN).write_to_adata(adata, layers=False)
    assert "scvae_denoised" in adata.layers


@pytest.mark.parametrize("kwargs, exc, message", [
    ({"kl_warmup_epochs": 1.5}, TypeError, "kl_warmup_epochs must be of type int, got 1.5"),
    ({"kl_warmup_epochs": "2"}, TypeError, "kl_warmup_epochs must be of type int"),
    ({"early_stopping": 1}, TypeError, "early_stopping must be of type bool, got 1"),
    ({"early_stopping": "no"}, TypeError, "early_stopping must be of type bool"),
    ({"train_size": True}, ValueError, "train_size must be a number in"),
    ({"train_size": "0.5"}, ValueError, "train_size must be a number in"),
    ({"eps": 0}, ValueError, "eps must be a positive finite number"),
    ({"eps": "1e-2"}, ValueError, "eps must be a positive finite number"),
    ({"weight_decay": -1}, ValueError, "weight_decay must be a non-negative number"),
])
def test_training_settings_of_the_wrong_type_are_refused_before_training(X, kwargs, exc,
                                                                          message):
    """Settings are checked as a saved model's are on load: before, 1.5 warm-up epochs or
    early_stopping=1 trained and saved a model that SCVAE.load then refused, and eps=0
    (0/0 in Adam at any zero gradient) ended in a "divergence" that blamed the data."""
    model = svt.SCVAE(make(X), **MODEL)
    with pytest.raises(exc, match=message):
        model.train(**{**TRAIN, **kwargs})
    assert not model.is_trained


def test_numpy_settings_train_save_and_load(X, tmp_path):
    """NumPy numbers (a value from np.linspace, a sweep over np.arange) are taken as
    Python's: the model saves as JSON and loads again."""
    a = make(X)
    model = svt.SCVAE(a, **{**MODEL, "n_latent": np.int64(3)}, dropout_rate=np.float32(0.1),
                      beta=np.float32(0.5))
    model.train(**{**TRAIN, "kl_warmup_epochs": np.int64(1), "train_size": np.float64(0.8),
                   "early_stopping": np.bool_(False), "lr": np.float32(1e-3)})
    model.save(tmp_path / "m")
    loaded = svt.SCVAE.load(tmp_path / "m", a)
    assert loaded.n_latent == 3 and loaded.beta == 0.5
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  model.get_latent_representation())
    with pytest.raises(TypeError, match="dropout_rate must be of type float, got '0.1'"):
        svt.SCVAE(a, **MODEL, dropout_rate="0.1")


def test_get_elbo_scores_in_the_batches_asked_for(baseline, monkeypatch):
    """get_elbo's batch_size used to be raised to 512 behind the user's back (a smaller one,
    asked for to save memory, did nothing); training's validation keeps its 512."""
    model, _ = baseline
    sizes = []
    batches = CellData.batches

    def spy(self, indices=None, batch_size=128, **kw):
        sizes.append(batch_size)
        return batches(self, indices, batch_size=batch_size, **kw)

    monkeypatch.setattr(CellData, "batches", spy)
    small, large = model.get_elbo(batch_size=16), model.get_elbo(batch_size=4096)
    assert sizes == [16, 4096]
    assert abs(small - large) < 1e-3 * abs(large)  # the same cells; z drawn batch by batch


def test_a_float64_default_dtype_changes_nothing(X, tmp_path):
    """Under torch.set_default_dtype(torch.float64) the compiled kernels' buffers were
    float64 and read as float32: get_elbo gave -4.7e15, most calls failed on mixed dtypes,
    the kernel's first self-check spun, and train() built a float64 model its float32
    counts could not feed."""
    a = make(X)
    model = svt.SCVAE(a, **MODEL).train(**TRAIN)

    def calls():
        torch.manual_seed(0)
        return [model.get_elbo(), model.get_marginal_ll(n_samples=3),
                model.get_latent_representation(give_mean=False),
                model.get_normalized_expression(n_samples=2),
                model.get_likelihood_parameters()["mean"],
                model.posterior_predictive_sample(n_samples=2), model.sample(4).X.toarray()]

    want = calls()
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for got, ref in zip(calls(), want, strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
        again = svt.SCVAE(a, **MODEL).train(**TRAIN)  # trains, in float32
        assert next(again.module.parameters()).dtype == torch.float32
        assert np.isfinite(again.get_elbo())
        assert torch.get_default_dtype() == torch.float64  # the caller's, given back
    finally:
        torch.set_default_dtype(before)


def test_reversed_views_none_and_fractional_sample_sizes(baseline, X):
    """A dense AnnData read backwards (adata[::-1]) has negative strides, which torch
    refused inside every evaluation call; write_to_adata(None) computed the latent, then
    failed on None.var_names; sample(2.7) drew 2 cells."""
    model, z = baseline
    a = ad.AnnData(X=np.asarray(X, dtype=np.float32))
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    a.var_names = model.var_names
    np.testing.assert_allclose(model.get_latent_representation(a[::-1]), z[::-1],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="writes its results into an AnnData.*got NoneType"):
        model.write_to_adata(None)
    for bad in (2.7, "3", True, 0):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            model.sample(bad)


def test_building_a_model_never_sets_the_default_dtype(monkeypatch):
    """The float32 model was built by setting torch's default dtype and restoring it: two
    threads building models at once left the process at float32 for good."""
    from scvae_tools.module import VAE, ModuleConfig

    calls = []
    monkeypatch.setattr(torch, "set_default_dtype", calls.append)
    before = torch.get_default_dtype()
    for dtype in (torch.float32, torch.float64):
        torch._C._set_default_dtype(dtype)
        try:
            module = VAE(ModuleConfig(n_genes=12, n_latent=2, n_hidden=8))
        finally:
            torch._C._set_default_dtype(before)
        assert all(p.dtype == torch.float32 for p in module.parameters())
    assert not calls
