"""The AnnData adapter: input forms, validation errors, gene matching, no side effects."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scvae_tools as svt
from scvae_tools.adapter import CellData, DataSpec


def small(n=40, g=15, seed=0, sparse=True):
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, (n, g)).astype(np.float32)
    x[:, 0] += 1  # no empty cells
    obs = pd.DataFrame({"batch": rng.choice(["a", "b"], n), "cov": rng.normal(size=n),
                        "lib": x.sum(1) / 2}, index=[f"c{i}" for i in range(n)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(g)])
    return ad.AnnData(sp.csr_matrix(x) if sparse else x, obs=obs, var=var)


@pytest.mark.parametrize("form", ["dense", "csr", "csc", "int64", "int32", "float64", "layer"])
def test_input_forms_give_the_same_counts(form):
    a = small(sparse=False)
    ref = a.X.copy()
    layer = None
    if form == "csr":
        a.X = sp.csr_matrix(ref)
    elif form == "csc":
        a.X = sp.csc_matrix(ref)
    elif form in ("int64", "int32", "float64"):
        a.X = ref.astype(form)
    elif form == "layer":
        a.layers["counts"] = ref.copy()
        a.X = np.log1p(ref)  # X holds something else; the layer must be used
        layer = "counts"
    data = CellData(a, DataSpec.from_anndata(a, layer=layer))
    dense = data.X.toarray() if sp.issparse(data.X) else data.X
    np.testing.assert_array_equal(dense, ref)
    np.testing.assert_allclose(data.library, ref.sum(1))


def test_size_factor_key_and_covariates_are_encoded():
    a = small()
    spec = DataSpec.from_anndata(a, batch_key="batch", continuous_covariate_keys=["cov"],
                                 size_factor_key="lib")
    data = CellData(a, spec)
    np.testing.assert_allclose(data.library, a.obs["lib"].to_numpy())
    assert spec.batch_categories == ["a", "b"]
    np.testing.assert_array_equal(data.batch_index, (a.obs["batch"] == "b").to_numpy().astype(int))
    np.testing.assert_allclose(data.cont_covs[:, 0], a.obs["cov"].to_numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "corrupt, exc, words",
    [
        (lambda a: a.X.data.__setitem__(0, -1.0), ValueError, "negative"),
        (lambda a: a.X.data.__setitem__(0, np.nan), ValueError, "NaN"),
        (lambda a: a.X.data.__setitem__(0, np.inf), ValueError, "inf"),
        (lambda a: a.X.data.__setitem__(0, 0.5), ValueError, "non-integer"),
    ],
)
def test_bad_counts_are_named(corrupt, exc, words):
    a = small()
    corrupt(a)
    with pytest.raises(exc, match=words):
        svt.SCVAE(a)


def test_non_integer_allowed_on_request():
    a = small()
    a.X.data[0] = 0.5
    svt.SCVAE(a, allow_non_integer=True)


def test_empty_cells_and_empty_anndata():
    a = small(sparse=False)
    a.X[3] = 0
    with pytest.raises(ValueError, match="zero total counts.*filter_cells"):
        svt.SCVAE(a)
    with pytest.raises(ValueError, match="empty"):
        svt.SCVAE(small()[:0].copy())


def test_unknown_keys_and_missing_labels():
    a = small()
    with pytest.raises(KeyError, match="not a column of adata.obs"):
        svt.SCVAE(a, batch_key="nope")
    with pytest.raises(KeyError, match="Layer 'nope'"):
        svt.SCVAE(a, layer="nope")
    a.obs.loc["c0", "batch"] = np.nan
    with pytest.raises(ValueError, match="missing label"):
        svt.SCVAE(a, batch_key="batch")


def test_duplicate_genes_rejected():
    a = small()
    a.var_names = ["g0"] * 2 + [f"g{j}" for j in range(2, a.n_vars)]
    with pytest.raises(ValueError, match="var_names_make_unique"):
        svt.SCVAE(a)


def test_genes_are_matched_by_name():
    a = small()
    spec = DataSpec.from_anndata(a)
    perm = np.random.default_rng(1).permutation(a.n_vars)
    shuffled = a[:, perm].copy()
    np.testing.assert_array_equal(CellData(shuffled, spec).X.toarray(), a.X.toarray())
    shuffled.X = shuffled.X.toarray()  # dense counts are reordered the same way
    np.testing.assert_array_equal(CellData(shuffled, spec).X, a.X.toarray())
    with pytest.raises(ValueError, match="lacks 1 of the model's 15 genes.*g3") as err:
        CellData(a[:, [j for j in range(a.n_vars) if j != 3]].copy(), spec)
    assert "does not know" not in str(err.value)  # no empty list of extra genes
    renamed = a.copy()
    renamed.var_names = [*a.var_names[:-1], "new_gene"]
    with pytest.raises(ValueError, match=r"also has 1 gene the model does not know .*new_gene"):
        CellData(renamed, spec)


def test_unseen_batch_category_is_named():
    a = small()
    spec = DataSpec.from_anndata(a, batch_key="batch")
    b = a.copy()
    b.obs["batch"] = "zzz"
    with pytest.raises(ValueError, match="not trained on.*zzz"):
        CellData(b, spec)


def test_batches_cover_every_cell_once_and_never_leave_one_alone():
    a = small(n=129)
    data = CellData(a, DataSpec.from_anndata(a))
    gen = torch.Generator().manual_seed(0)
    sizes, seen = [], []
    for b in data.batches(np.arange(129), batch_size=32, shuffle=True, generator=gen,
                          drop_singleton=True):
        sizes.append(len(b.index))
        seen.append(b.index.numpy())
        np.testing.assert_array_equal(b.x.numpy(), a.X[b.index.numpy()].toarray())
    assert min(sizes) > 1 and sum(sizes) == 129
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(129))


def test_adata_is_not_modified():
    a = small()
    a.layers["counts"] = a.X.copy()
    before = a.copy()
    model = svt.SCVAE(a, batch_key="batch", layer="counts")
    model.train(max_epochs=2, progress_bar=False)
    model.get_latent_representation(a)
    model.get_normalized_expression(a)
    assert (a.X != before.X).nnz == 0
    assert (a.layers["counts"] != before.layers["counts"]).nnz == 0
    pd.testing.assert_frame_equal(a.obs, before.obs)
    pd.testing.assert_frame_equal(a.var, before.var)
    assert set(a.uns) == set(before.uns) and set(a.obsm) == set(before.obsm)


def test_inference_reads_user_counts_without_changing_them(synthetic):
    """Evaluation reads canonical float32 CSR in place; other inputs (here CSR with
    duplicate entries, which must be summed) are converted on a copy, never in place."""
    model = svt.SCVAE(synthetic, n_latent=3, n_hidden=16)
    model.train(max_epochs=2, batch_size=64, progress_bar=False, seed=0)
    ref = model.get_latent_representation()
    X = sp.csr_matrix(synthetic.X, dtype=np.float32)
    # Each row's entries twice, as two halves that sum back to the count: a non-canonical CSR.
    rows = [slice(a, b) for a, b in zip(X.indptr[:-1], X.indptr[1:], strict=True)]
    half = np.floor(X.data / 2)
    dup = sp.csr_matrix((np.concatenate([np.r_[half[r], X.data[r] - half[r]] for r in rows]),
                         np.concatenate([np.r_[X.indices[r], X.indices[r]] for r in rows]),
                         2 * X.indptr), shape=X.shape)
    assert dup.nnz == 2 * X.nnz and not dup.has_canonical_format
    for counts in (X, dup):
        user = ad.AnnData(counts, obs=synthetic.obs.copy(), var=synthetic.var.copy())
        data, indices, indptr = counts.data.copy(), counts.indices.copy(), counts.indptr.copy()
        np.testing.assert_allclose(model.get_latent_representation(user), ref, rtol=1e-5, atol=1e-6)
        assert user.X is counts
        np.testing.assert_array_equal(counts.data, data)
        np.testing.assert_array_equal(counts.indices, indices)
        np.testing.assert_array_equal(counts.indptr, indptr)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_csr_row_gather_matches_numpy(monkeypatch, index_dtype):
    """The stored entries of a batch's rows, read with scipy's C++ row gather, equal the
    numpy fallback and the dense rows, for shuffled rows, empty rows and 64-bit indices."""
    from scvae_tools import adapter

    rng = np.random.default_rng(0)
    dense = rng.poisson(0.5, (60, 40)).astype(np.float32)
    dense[[3, 17]] = 0.0  # rows without entries
    X = sp.csr_matrix(dense)
    X.indptr, X.indices = X.indptr.astype(index_dtype), X.indices.astype(index_dtype)
    rows = rng.permutation(60)[:25]
    rows = np.concatenate([rows, [3, 17]])
    fast = adapter._csr_rows(X, rows)
    monkeypatch.setattr(adapter, "_csr_row_index", None)
    slow = adapter._csr_rows(X, rows)
    for a, b in zip(fast, slow, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    cols, values, out_row, lengths = fast
    block = np.zeros((len(rows), 40), np.float32)
    block[out_row, cols] = values
    assert np.array_equal(block, dense[rows])
    assert np.array_equal(lengths, (dense[rows] > 0).sum(1))


def test_device_resident_csr_gather_matches_the_rows():
    """The accelerator path that builds each batch from device-resident CSR arrays (run here
    on the CPU) gives the dense rows and the same non-zeros as the host path."""
    from scvae_tools import adapter

    rng = np.random.default_rng(1)
    dense = rng.poisson(0.7, (50, 30)).astype(np.float32)
    dense[7] = 0  # a row with no entries
    X = sp.csr_matrix(dense)
    t = {"x_data": torch.from_numpy(X.data), "x_indices": torch.from_numpy(X.indices.astype(np.int64)),
         "x_indptr": torch.from_numpy(X.indptr.astype(np.int64))}
    rows = np.r_[7, rng.permutation(50)[:20]]
    n_entries = int(np.diff(X.indptr)[rows].sum())
    block, nz = adapter._gather_csr_on_device(t, torch.from_numpy(rows), n_entries, 30, True)
    assert np.array_equal(block.numpy(), dense[rows])
    host = adapter._block_entries(X, rows)  # flat, values, rows, cols, lengths
    for a, b in zip(nz, host, strict=False):
        assert np.array_equal(a.numpy(), b)
    block, nz = adapter._gather_csr_on_device(t, torch.from_numpy(rows), n_entries, 30)
    assert nz is None and np.array_equal(block.numpy(), dense[rows])


def test_training_through_the_device_csr_path_matches_the_host_path(synthetic, monkeypatch):
    """SCVAE.train with CSR counts resident as on an accelerator (forced here on the CPU):
    the same batches, non-zeros and so the same training as the host path."""
    from scvae_tools import adapter

    def fit():
        model = svt.SCVAE(synthetic, n_latent=4, n_hidden=32)
        model.train(max_epochs=3, batch_size=64, progress_bar=False, seed=0)
        return model

    host = fit()
    monkeypatch.setattr(adapter, "_csr_resident", lambda device: True)
    dev = fit()
    assert "x_data" in dev._data._device_cache["cpu"]
    np.testing.assert_allclose(dev.history["train_elbo"], host.history["train_elbo"], rtol=1e-6)
    np.testing.assert_allclose(dev.get_latent_representation(), host.get_latent_representation(),
                               rtol=1e-5, atol=1e-6)


def test_pbmc_like_synthetic_counts_are_shaped_like_pbmc3k():
    # svt.datasets.PBMC_LIKE: pbmc3k's 2,000 HVGs have 9.8% non-zeros and a median library
    # of 484; the defaults are several times denser (the benchmarks report both).
    like = svt.datasets.synthetic_counts(n_cells=2000, n_genes=2000, seed=0,
                                         **svt.datasets.PBMC_LIKE)
    dense = svt.datasets.synthetic_counts(n_cells=2000, n_genes=2000, seed=0)
    lib = np.asarray(like.X.sum(1)).ravel()
    assert 0.08 < like.X.nnz / (2000 * 2000) < 0.16
    assert 400 < np.median(lib) < 560
    assert 0.4 < np.log(lib).std() < 0.6
    assert dense.X.nnz / (2000 * 2000) > 0.35
    np.testing.assert_array_equal(like.X.data, np.round(like.X.data))


def test_padded_genes_counts_only_real_true_flags():
    """var["scvae_padded"] in odd dtypes: the strings "False" counted as padded (truthy), a
    Categorical with NaN made every CellData (inference too) fail in fillna."""
    from scvae_tools.adapter import padded_genes

    genes = ["g0", "g1", "g2"]
    cases = {
        "bool": [True, False, False],
        "nullable": pd.array([True, None, False], dtype="boolean"),
        "object": np.array([True, None, False], dtype=object),
        "strings": ["False", "False", "False"],
        "categorical": pd.Categorical([True, np.nan, np.nan]),
        "float": [1.0, np.nan, 0.0],
    }
    expected = {"strings": []}
    for name, values in cases.items():
        var = pd.DataFrame({"scvae_padded": values}, index=genes)
        assert padded_genes(var, genes) == expected.get(name, ["g0"]), name
        assert padded_genes(var, ["g2", "g1"]) == [], name  # only the model's genes count
    assert padded_genes(pd.DataFrame(index=genes), genes) == []


# ---------------------------------------------------------------------- memory of whole-matrix scans
def _anndata_like_csr(n_cells: int, n_genes: int, density: float, seed: int = 0) -> sp.csr_matrix:
    """Float32 counts as anndata reads them: int64 indptr, int32 indices, and no format
    flags cached yet (scipy computes has_canonical_format on first use)."""
    X = sp.random(n_cells, n_genes, density=density, format="csr", dtype=np.float32,
                  random_state=seed)
    X = sp.csr_matrix((np.ceil(X.data * 5), X.indices.astype(np.int32),
                       X.indptr.astype(np.int32)), shape=X.shape)
    X.indptr = X.indptr.astype(np.int64)  # set afterwards, as anndata's reader does
    return X


def _peak_bytes(fn) -> int:
    """Peak of memory allocated (numpy's allocations included) while ``fn`` runs."""
    import tracemalloc

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_genes_without_counts_in_steps(monkeypatch):
    """The count of never-detected genes, scanned in steps (here 7 entries) for bounded
    memory: explicit zeros stored in a CSR are not detections; dense alike."""
    from scvae_tools import adapter

    rng = np.random.default_rng(0)
    dense = rng.poisson(0.3, size=(40, 30)).astype(np.float32)
    dense[:, [3, 17, 29]] = 0
    dense[:, 5] = 2  # detected in the dense copy ...
    csr = sp.csr_matrix(dense)
    csr.data[csr.indices == 5] = 0  # ... stored only as explicit zeros in the CSR one
    spec = DataSpec(var_names=[f"g{i}" for i in range(30)])
    for step in (7, 1 << 20):
        monkeypatch.setattr(adapter, "GENE_SCAN_STEP", step)
        for X, expected in ((dense, 3), (csr, 4)):
            a = ad.AnnData(X.copy(), var=pd.DataFrame(index=spec.var_names))
            assert CellData(a, spec, validate=False).genes_without_counts() == expected, step


def test_anndata_read_counts_cost_no_copy_of_their_indices_per_call():
    """anndata reads CSR counts with int64 indptr and int32 indices; scipy's compiled
    routines copied all the indices to int64 (8 bytes per entry) on every call with such a
    pair: each evaluation batch gathered from 100k cells took 26 ms instead of 0.05, and
    checking the counts of 1M cells took 1.1 GB. The counts are now read in place with an
    indptr of the indices' dtype. Scanning them for genes never detected took a mask, its
    masked indices and numpy's int64 copy of those for bincount: 13 bytes per entry."""
    from scvae_tools import adapter

    X = _anndata_like_csr(20_000, 2_000, 0.25)
    assert X.indptr.dtype == np.int64 and X.indices.dtype == np.int32
    spec = DataSpec(var_names=[f"g{i}" for i in range(2_000)])
    a = ad.AnnData(X, var=pd.DataFrame(index=spec.var_names))
    made = _peak_bytes(lambda: CellData(a, spec, copy=False))
    assert made / X.nnz < 1
    data = CellData(a, spec, copy=False)
    # read in place: the same values and indices; the user's matrix keeps its dtypes
    assert np.shares_memory(data.X.data, X.data) and np.shares_memory(data.X.indices, X.indices)
    assert data.X.indptr.dtype == np.int32 and a.X is X and X.indptr.dtype == np.int64
    rows = np.arange(0, 20_000, 157)
    assert _peak_bytes(lambda: adapter._csr_rows(data.X, rows)) / X.nnz < 1  # the rows only
    cols, vals, _, lengths = adapter._csr_rows(data.X, rows)
    # (the reference by hand: scipy 1.10's own X[rows] fails on this pair of dtypes)
    spans = [slice(X.indptr[r], X.indptr[r + 1]) for r in rows]
    np.testing.assert_array_equal(vals, np.concatenate([X.data[s] for s in spans]))
    np.testing.assert_array_equal(cols, np.concatenate([X.indices[s] for s in spans]))
    assert _peak_bytes(data.genes_without_counts) / X.nnz < 2
    # A training copy gets the same index dtypes; a non-canonical matrix is still copied.
    assert CellData(a, spec).X.indptr.dtype == np.int32
    unsorted = _anndata_like_csr(20, 30, 0.5)
    unsorted.indices[:2] = unsorted.indices[1::-1].copy()
    fixed = adapter._as_float32(unsorted, copy=False)
    assert fixed.has_canonical_format and not np.shares_memory(fixed.indices, unsorted.indices)
    np.testing.assert_array_equal(fixed.toarray(), unsorted.toarray())


def test_int64_indices_with_int32_indptr_are_read_in_place():
    """CSR counts with int64 indices and an int32 indptr (indices widened by hand, or by a
    tool that writes them so) are read in place too: matching the indptr to the indices
    went through scipy's constructor, which narrowed the indices back to int32, a copy of
    all of them on every read-only use."""
    from scvae_tools import adapter

    X = _anndata_like_csr(50, 30, 0.3)
    X.indices, X.indptr = X.indices.astype(np.int64), X.indptr.astype(np.int32)
    got = adapter._as_float32(X, copy=False)
    assert np.shares_memory(got.indices, X.indices) and np.shares_memory(got.data, X.data)
    assert X.indices.dtype == np.int64 and X.indptr.dtype == np.int32  # the user's, untouched
    rows = np.array([7, 0, 49, 7])
    cols, vals, _, lengths = adapter._csr_rows(got, rows)
    np.testing.assert_array_equal(cols, X[rows].indices)
    np.testing.assert_array_equal(vals, X[rows].data)
    np.testing.assert_array_equal(lengths, np.diff(X.indptr)[rows])
