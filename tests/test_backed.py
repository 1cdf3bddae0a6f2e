"""Out-of-core training: BackedCellData streams an .h5ad and matches the in-memory CellData."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import scvae_tools as svt
from scvae_tools.adapter import CellData, DataSpec
from scvae_tools.backed import (
    BackedCellData,
    is_backed,
    make_cell_data,
    read_backed,
    write_h5ad_backed,
)


@pytest.fixture
def h5ad_path(synthetic, tmp_path):
    path = tmp_path / "synthetic.h5ad"
    synthetic.write_h5ad(path)
    return path


def _spec(adata, **kw):
    return DataSpec.from_anndata(adata, **kw)


def test_backed_arrays_match_in_memory(synthetic, h5ad_path):
    spec = _spec(synthetic, batch_key="batch", categorical_covariate_keys=["cell_type"])
    mem = CellData(synthetic, spec)
    for source in (h5ad_path, str(h5ad_path), read_backed(h5ad_path)):
        bk = BackedCellData(source, spec)
        assert bk.n_obs == mem.n_obs
        assert list(bk.obs_names) == list(mem.obs_names)
        np.testing.assert_allclose(bk.library, mem.library)
        np.testing.assert_array_equal(bk.batch_index, mem.batch_index)
        np.testing.assert_array_equal(bk.cat_covs, mem.cat_covs)


def test_unshuffled_batches_follow_indices(synthetic, h5ad_path):
    bk = BackedCellData(h5ad_path, _spec(synthetic), chunk_size=32, buffer_chunks=2)
    dense = synthetic.X.toarray()
    order = np.random.default_rng(0).permutation(synthetic.n_obs)[:250]  # unsorted on purpose
    got = list(bk.batches(order, batch_size=64))
    assert [len(b.index) for b in got] == [64, 64, 64, 58]
    idx = np.concatenate([b.index.numpy() for b in got])
    np.testing.assert_array_equal(idx, order)
    x = np.concatenate([b.x.numpy() for b in got])
    np.testing.assert_array_equal(x, dense[order])
    lib = np.concatenate([b.library.numpy()[:, 0] for b in got])
    np.testing.assert_allclose(lib, dense[order].sum(1))


def test_backed_batches_carry_their_nonzeros(synthetic, h5ad_path):
    """``batches(nonzero=True)`` out of core: each batch's (flat position, value) pairs are
    exactly the non-zeros ``torch.nonzero`` finds in its dense block, in the same order, and
    the likelihood gives the same values with them as without."""
    from scvae_tools.fused import nb_log_likelihood_from_logits

    bk = BackedCellData(h5ad_path, _spec(synthetic), chunk_size=32, buffer_chunks=2)
    gen = torch.Generator().manual_seed(0)
    batches = list(bk.batches(None, 48, shuffle=True, generator=gen, nonzero=True))
    assert len(batches) > 3
    torch.manual_seed(0)
    for b in batches:
        flat, values = b.nonzero.flat, b.nonzero.values
        expected = torch.nonzero(b.x.reshape(-1)).squeeze(1)
        assert torch.equal(flat, expected)
        assert torch.equal(values, b.x.reshape(-1)[expected])
        logits = torch.randn(b.x.shape)
        log_theta = torch.randn(b.x.shape[1]) * 0.3
        torch.testing.assert_close(
            nb_log_likelihood_from_logits(logits, b.library.log(), log_theta, b.x, b.nonzero),
            nb_log_likelihood_from_logits(logits, b.library.log(), log_theta, b.x))
    assert all(b.nonzero is None for b in bk.batches(None, 48))


def test_shuffled_epoch_sees_each_cell_once_chunk_locally(synthetic, h5ad_path):
    bk = BackedCellData(h5ad_path, _spec(synthetic), chunk_size=50, buffer_chunks=2)
    dense = synthetic.X.toarray()
    train = np.sort(np.random.default_rng(1).choice(synthetic.n_obs, 541, replace=False))
    gen = torch.Generator().manual_seed(0)
    orders = []
    for _ in range(2):
        batches = list(bk.batches(train, batch_size=60, shuffle=True, generator=gen,
                                  drop_singleton=True))
        # 541 = 9·60 + 1: the trailing single cell is merged into the last batch.
        assert [len(b.index) for b in batches] == [60] * 8 + [61]
        idx = np.concatenate([b.index.numpy() for b in batches])
        np.testing.assert_array_equal(np.sort(idx), train)  # every cell exactly once
        np.testing.assert_array_equal(np.concatenate([b.x.numpy() for b in batches]), dense[idx])
        orders.append(idx)
    assert not np.array_equal(orders[0], orders[1])  # reshuffled each epoch
    # Chunk-local: the sorted cells form chunks of 50; the order visits them two chunks (one
    # buffer) at a time, so each pair of chunks fills a contiguous stretch of the order.
    chunk_ids = np.searchsorted(train, orders[0]) // 50
    first_pos = {c: int(np.flatnonzero(chunk_ids == c)[0]) for c in np.unique(chunk_ids)}
    by_first = sorted(first_pos, key=first_pos.get)
    start = 0
    for pair in (by_first[i:i + 2] for i in range(0, len(by_first), 2)):
        size = int(np.isin(chunk_ids, pair).sum())
        assert set(chunk_ids[start:start + size]) == set(pair)
        start += size
    # Same generator state → same order (what DDP ranks rely on).
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    np.testing.assert_array_equal(bk.epoch_order(train, g1), bk.epoch_order(train, g2))


def test_genes_matched_by_name(synthetic, tmp_path):
    spec = _spec(synthetic)
    shuffled = synthetic[:, np.random.default_rng(0).permutation(synthetic.n_vars)].copy()
    extra = ad.AnnData(sp.csr_matrix(np.ones((synthetic.n_obs, 1), dtype=np.float32)),
                       obs=synthetic.obs, var=shuffled.var.iloc[:0].reindex(["extra_gene"]))
    wider = ad.concat([shuffled, extra], axis=1, merge="same")
    wider.obs = synthetic.obs.copy()
    path = tmp_path / "wider.h5ad"
    wider.write_h5ad(path)
    bk = BackedCellData(path, spec)
    b = next(iter(bk.batches(np.arange(10), batch_size=10)))
    np.testing.assert_array_equal(b.x.numpy(), synthetic.X[:10].toarray())
    np.testing.assert_allclose(bk.library, np.asarray(synthetic.X.sum(1)).ravel())
    missing = synthetic[:, :-3].copy()
    mpath = tmp_path / "missing.h5ad"
    missing.write_h5ad(mpath)
    with pytest.raises(ValueError, match="lacks 3 of the model's"):
        BackedCellData(mpath, spec)


def test_validation_is_chunked_and_clear(synthetic, tmp_path):
    spec = _spec(synthetic)
    bad = synthetic.copy()
    bad.X = bad.X.copy()
    bad.X.data[-1] = 0.5  # last cell: found by the streaming pass
    path = tmp_path / "bad.h5ad"
    bad.write_h5ad(path)
    with pytest.raises(ValueError, match="non-integer"):
        BackedCellData(path, spec, chunk_size=16)
    neg = synthetic.copy()
    neg.X = neg.X.copy()
    neg.X.data[3] = -1
    neg.write_h5ad(path)
    with pytest.raises(ValueError, match="negative"):
        BackedCellData(path, spec)
    empty = synthetic.copy()
    X = empty.X.copy()
    X.data[X.indptr[7]:X.indptr[8]] = 0
    X.eliminate_zeros()
    empty.X = X
    empty.write_h5ad(path)
    with pytest.raises(ValueError, match="zero total counts.*7"):
        BackedCellData(path, spec)
    csc = synthetic.copy()
    csc.X = csc.X.tocsc()
    csc.write_h5ad(path)
    with pytest.raises(ValueError, match="CSR"):
        BackedCellData(path, spec)
    with pytest.raises(FileNotFoundError):
        svt.SCVAE(tmp_path / "nope.h5ad")
    with pytest.raises(ValueError, match="backed='r'"):
        BackedCellData(synthetic, spec)
    synthetic.write_h5ad(path)
    with pytest.raises(ValueError, match="view of a backed AnnData"):
        BackedCellData(read_backed(path)[:10], spec)


def test_dense_on_disk(synthetic, tmp_path):
    dense = synthetic.copy()
    dense.X = dense.X.toarray()
    path = tmp_path / "dense.h5ad"
    dense.write_h5ad(path)
    bk = BackedCellData(path, _spec(synthetic))
    b = next(iter(bk.batches(np.array([5, 2, 9]), batch_size=3)))
    np.testing.assert_array_equal(b.x.numpy(), dense.X[[5, 2, 9]])


def test_scvae_trains_out_of_core_like_in_memory(synthetic, h5ad_path):
    """Backed training reaches the in-memory model's held-out ELBO; inference works in chunks."""
    kw = dict(max_epochs=12, batch_size=64, seed=0, progress_bar=False, device="cpu")
    mem = svt.SCVAE(synthetic, n_latent=5, batch_key="batch").train(**kw)
    backed = read_backed(h5ad_path)
    model = svt.SCVAE(backed, n_latent=5, batch_key="batch")
    assert isinstance(model._data, BackedCellData) and is_backed(backed)
    model._data.chunk_size = 64  # several chunks even for 600 cells
    model.train(**kw)
    np.testing.assert_array_equal(model.validation_indices, mem.validation_indices)
    e_mem = mem.get_elbo(indices=mem.validation_indices)
    e_bk = model.get_elbo(indices=model.validation_indices)
    assert abs(e_bk - e_mem) / abs(e_mem) < 0.02, (e_bk, e_mem)
    # Inference on backed data equals inference on the same cells in memory.
    lat_b = model.get_latent_representation()
    lat_m = model.get_latent_representation(synthetic)
    np.testing.assert_allclose(lat_b, lat_m, rtol=1e-4, atol=1e-5)
    # write_to_adata into the backed AnnData (latent + uns), then save it to a new file.
    model.write_to_adata(backed, layers=False)
    assert backed.obsm["X_scvae"].shape == (synthetic.n_obs, 5)
    out = h5ad_path.with_name("out.h5ad")
    write_h5ad_backed(backed, out)  # X copied on disk, never loaded
    back = ad.read_h5ad(out)
    np.testing.assert_allclose(back.obsm["X_scvae"], lat_m, rtol=1e-4, atol=1e-5)
    assert len(back.uns["scvae"]["history"]["epoch"]) == 12
    assert (back.X != synthetic.X).nnz == 0
    assert list(back.obs["batch"]) == list(synthetic.obs["batch"])
    with pytest.raises(ValueError, match="backing file"):
        write_h5ad_backed(backed, h5ad_path)
    with pytest.raises(ValueError, match="not a path"):
        model.write_to_adata(str(h5ad_path))


def test_scvae_accepts_path_and_make_cell_data(synthetic, h5ad_path):
    """A model built from a path streams the file; scoring the path gives the results of
    the same cells in memory (latent, ELBO with the same draws, expression at the library)."""
    model = svt.SCVAE(h5ad_path, n_latent=3)
    assert isinstance(model._data, BackedCellData)
    mem = make_cell_data(synthetic, model.spec)
    assert isinstance(mem, CellData)
    np.testing.assert_array_equal(mem.library, np.asarray(synthetic.X.sum(1)).ravel())
    model.train(max_epochs=2, batch_size=128, progress_bar=False, device="cpu")
    z = model.get_latent_representation(h5ad_path)
    assert z.shape == (synthetic.n_obs, 3)
    np.testing.assert_allclose(z, model.get_latent_representation(synthetic), rtol=1e-5,
                               atol=1e-6)
    elbo = model.get_elbo(h5ad_path)
    assert elbo == pytest.approx(model.get_elbo(synthetic), rel=1e-5)
    np.testing.assert_allclose(
        model.get_normalized_expression(h5ad_path, library_size="observed").sum(1),
        np.asarray(synthetic.X.sum(1)).ravel(), rtol=1e-4)


def test_nothing_holds_the_file_between_calls(synthetic, h5ad_path):
    """The model kept the .h5ad open for its whole life: writing results back to the file
    it was trained from failed ("unable to truncate a file which is already open")."""
    model = svt.SCVAE(str(h5ad_path), n_latent=3)
    model.train(max_epochs=2, batch_size=64, progress_bar=False, seed=0)
    z = model.get_latent_representation()
    adata = ad.read_h5ad(h5ad_path)
    model.write_to_adata(adata, layers=False)
    adata.write_h5ad(h5ad_path)  # the same file, rewritten
    np.testing.assert_allclose(ad.read_h5ad(h5ad_path).obsm["X_scvae"], z, rtol=1e-5, atol=1e-6)
    # ... and reading goes on afterwards: the file is reopened when needed.
    np.testing.assert_allclose(model.get_latent_representation(), z, rtol=1e-5, atol=1e-6)


def test_a_file_written_again_with_other_counts_is_an_error(synthetic, h5ad_path):
    """The cells, their order and library sizes are read when the file is opened; rewritten
    with normalised counts or cells in another order, it was read on silently (a latent
    0.78 off, or the old cell names on new rows). A rewrite of obs alone is fine."""
    model = svt.SCVAE(str(h5ad_path), n_latent=3)
    model.train(max_epochs=1, batch_size=64, progress_bar=False, seed=0)
    z = model.get_latent_representation()
    normalised = synthetic.copy()
    normalised.X = sp.csr_matrix(normalised.X.multiply(1e4 / normalised.X.sum(1)))
    for other, message in ((normalised, "its counts no longer pass the checks.*non-integer"),
                           (synthetic[::-1].copy(), "the non-zeros of X differ")):
        other.write_h5ad(h5ad_path)
        with pytest.raises(ValueError, match=f"written again after it was opened: {message}"):
            model.get_latent_representation()
    synthetic.write_h5ad(h5ad_path)  # the same cells and counts again: read on
    np.testing.assert_allclose(model.get_latent_representation(), z, rtol=1e-5, atol=1e-6)


def test_paths_do_not_depend_on_the_working_directory(synthetic, tmp_path, monkeypatch):
    """A relative path was reopened against whatever the working directory had become: the
    other folder's file was read, and write_h5ad_backed copied its X (even over the source).
    A view was written as the whole file's X under the view's obs: an unreadable file."""
    for name, seed in (("a", 0), ("b", 5)):
        (tmp_path / name).mkdir()
        svt.datasets.synthetic_counts(n_cells=120, n_genes=30, seed=seed).write_h5ad(
            tmp_path / name / "data.h5ad")
    monkeypatch.chdir(tmp_path / "a")
    model = svt.SCVAE("data.h5ad", n_latent=3).train(max_epochs=1, progress_bar=False)
    z = model.get_latent_representation()
    opened = ad.read_h5ad("data.h5ad", backed="r")
    monkeypatch.chdir(tmp_path / "b")
    np.testing.assert_array_equal(model.get_latent_representation(), z)
    with pytest.raises(ValueError, match="opened as 'data.h5ad'.*another file"):
        write_h5ad_backed(opened, "out.h5ad")
    with pytest.raises(ValueError, match="cannot write a view"):
        write_h5ad_backed(read_backed(tmp_path / "a" / "data.h5ad")[:10], "out.h5ad")
    assert not (tmp_path / "b" / "out.h5ad").exists()
    opened.file.close()


def test_spread_out_rows_are_not_read_as_their_whole_range(synthetic, h5ad_path):
    """Every 10th cell of a window, or a validation tenth, used to be read in one span of the
    whole range between them (160k rows at once for a 16k-cell window); spans are now
    bounded, and dense runs stay one read."""
    from scvae_tools.backed import _dense_pieces

    rows = np.arange(0, 160_000, 10)
    pieces = _dense_pieces(rows)
    np.testing.assert_array_equal(np.concatenate(pieces), rows)
    assert max(int(p[-1] - p[0]) + 1 for p in pieces) <= 8192 and len(pieces) <= 20
    assert len(_dense_pieces(np.arange(5_000, 21_000))) == 1  # dense: one read
    bk = BackedCellData(h5ad_path, _spec(synthetic))
    mem = CellData(synthetic, _spec(synthetic))
    for rows in (np.arange(0, bk.n_obs, 50), np.array([7, 3, 7, 500, 0])):  # order, repeats
        np.testing.assert_array_equal(bk.read_rows(rows).toarray(), mem.X[rows].toarray())


def test_write_h5ad_backed_leaves_nothing_behind_when_it_fails(h5ad_path, tmp_path):
    bk = read_backed(h5ad_path)
    bk.uns["bad"] = object()  # anndata cannot write it
    out = tmp_path / "out" / "copy.h5ad"
    with pytest.raises(Exception):  # noqa: B017  (anndata's own error type)
        write_h5ad_backed(bk, out)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir()] if out.parent.exists() else True


def test_files_from_anndata_before_0_7_are_read(synthetic, tmp_path):
    """Pre-0.7 .h5ad (X with h5sparse_* attributes, obs/var as compound arrays), which
    anndata still reads, were refused ("stored as an unknown group") or crashed."""
    import h5py

    X = synthetic.X.tocsr()
    path = tmp_path / "legacy.h5ad"
    text = h5py.string_dtype()
    with h5py.File(path, "w") as f:
        g = f.create_group("X")
        g.attrs["h5sparse_format"] = "csr"
        g.attrs["h5sparse_shape"] = np.array(X.shape)
        g["data"], g["indices"], g["indptr"] = X.data, X.indices, X.indptr
        f.create_dataset("obs", data=np.array([(c,) for c in synthetic.obs_names],
                                              dtype=np.dtype([("index", text)])))
        f.create_dataset("var", data=np.array([(v,) for v in synthetic.var_names],
                                              dtype=np.dtype([("index", text)])))
    model = svt.SCVAE(synthetic, n_latent=3, n_hidden=16)
    model.train(max_epochs=1, batch_size=64, progress_bar=False, seed=0)
    want = model.get_latent_representation(synthetic)
    for source in (str(path), ad.read_h5ad(path, backed="r")):
        np.testing.assert_allclose(model.get_latent_representation(source), want,
                                   rtol=1e-5, atol=1e-5)


def test_a_rewrite_checks_only_what_opening_checked(synthetic, tmp_path):
    """Data opened with validate=False (not counts, on purpose) was refused by the re-check
    after a mere touch of the file: "its counts no longer pass the checks"."""
    import os

    path = tmp_path / "halves.h5ad"
    halves = synthetic.copy()
    halves.X = halves.X * 0.5
    halves.write_h5ad(path)
    data = BackedCellData(path, _spec(synthetic), validate=False)
    first = data.read_rows(np.arange(5)).toarray()
    os.utime(path, ns=(1, 1))  # written again, the same contents
    np.testing.assert_array_equal(data.read_rows(np.arange(5)).toarray(), first)


def test_a_replaced_file_is_named_as_such(synthetic, tmp_path):
    """An AnnData opened by its absolute path whose file was then replaced (an atomic
    rewrite): the error blamed a change of working directory."""
    import os

    path = tmp_path / "cells.h5ad"
    synthetic.write_h5ad(path)
    opened = ad.read_h5ad(path, backed="r")
    synthetic.write_h5ad(tmp_path / "new.h5ad")
    os.replace(tmp_path / "new.h5ad", path)
    with pytest.raises(ValueError, match="was replaced .* since it was opened"):
        svt.SCVAE(opened, n_latent=2)
    opened.file.close()
