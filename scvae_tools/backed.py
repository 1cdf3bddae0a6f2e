"""Out-of-core data: stream cells from an .h5ad on disk with bounded memory.

:class:`BackedCellData` is the on-disk counterpart of :class:`~scvae_tools.adapter.CellData`:
same attributes (``n_obs``, ``spec``, ``library``, ``batch_index``, ``cat_covs``,
``cont_covs``, ``obs_names``) and the same :meth:`~BackedCellData.batches` interface, but
the count matrix stays in the file. Only per-cell vectors (library size, covariate codes)
and one read buffer live in memory, so a 1M-cell × 2,000-gene atlas trains in well under
3 GB of RAM.

How rows are read
-----------------
The counts must be stored row-wise: CSR (what ``AnnData.write_h5ad`` writes for CSR ``X``)
or a dense array. A contiguous run of rows of a CSR matrix is two contiguous slices of the
``data``/``indices`` datasets, so reading is sequential and fast; random single-row reads
are not. Training therefore shuffles at two levels (as in scDataset / cellxgene-census
loaders): the sorted cells are cut into *chunks* of ``chunk_size`` consecutive cells, the
chunk order is shuffled, and groups of ``buffer_chunks`` chunks are read together and
their cells shuffled within that buffer. Every cell is still visited exactly once per
epoch, and a minibatch mixes cells from ``buffer_chunks`` random places of the file.

Validation (finite, non-negative, integer counts, no empty cells) and the library sizes
are done in one streaming pass over the file when the object is created.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .adapter import (
    Batch,
    CellData,
    DataSpec,
    EmptyCellsError,
    _block_entries,
    _check_finite_covariates,
    _empty_in_model_genes,
    _encode,
    _missing_genes_message,
    _nonzeros_on,
    _numeric_obs,
    _to_device,
    batch_bounds,
    check_no_empty_cells,
    gene_positions,
    padded_genes,
    size_factors,
    validate_values,
)
from .checkpoint import atomic_write

# Rows further apart than this are read with separate HDF5 reads; closer ones are read
# as one span (an HDF5 read call costs about as much as reading ~100 extra rows).
_GAP_ROWS = 64
# Rows per read in the validation / library-size pass.
_SCAN_ROWS = 16384


def is_backed(adata) -> bool:
    """True for a path to an .h5ad or an AnnData opened with ``backed="r"``."""
    return isinstance(adata, (str, os.PathLike)) or bool(getattr(adata, "isbacked", False))


def read_backed(path: str | os.PathLike):
    """Open an .h5ad with ``backed="r"``: ``obs``/``var`` in memory, ``X`` left on disk.

    Note that anndata's backed mode reads ``layers`` into memory; keep the counts of a
    large atlas in ``X`` for out-of-core training.

    Parameters
    ----------
    path
        The .h5ad file.
    """
    return open_h5ad(path, backed=True)


def _backing_file(adata) -> Path:
    """The absolute path of a backed AnnData's file. anndata keeps the name it was given,
    which may be relative to a working directory that has changed since: then the name is
    checked against the open file itself, which is never another one."""
    path = Path(adata.filename).resolve()
    handle = getattr(adata.file, "_file", None)
    if handle is not None and getattr(handle, "id", None) is not None and handle.id.valid:
        opened = os.fstat(handle.id.get_vfd_handle())
        here = path.stat() if path.exists() else None
        if here is None or (here.st_dev, here.st_ino) != (opened.st_dev, opened.st_ino):
            if Path(adata.filename).is_absolute():
                raise ValueError(
                    f"The AnnData's file {adata.filename} was replaced (or removed) since it was "
                    "opened; open it again: anndata.read_h5ad(path, backed='r').")
            raise ValueError(
                f"The AnnData's file was opened as {str(adata.filename)!r}, which from the "
                f"current directory ({os.getcwd()}) is another file or none. Open it again by "
                "its absolute path: anndata.read_h5ad(path, backed='r').")
    return path


def _file_stamp(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file is written again or replaced."""
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def open_h5ad(path: str | os.PathLike, backed: bool = False):
    """``anndata.read_h5ad`` (``backed="r"`` with ``backed``), with errors that name the
    file and the fix: anndata's own, for an HDF5 file that is not an .h5ad (a 10x ``.h5``
    is the common one), is an ``__init__`` TypeError or a missing-object message."""
    import anndata as ad

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass the path of an .h5ad file.")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass the path of an .h5ad file.")
    try:  # an absolute path: the file is reopened later, whatever the working directory
        return ad.read_h5ad(path.resolve(), backed="r" if backed else None)
    except (OSError, TypeError, KeyError, ValueError) as err:
        detail = " ".join(str(err).split())[:200]
        raise ValueError(
            f"{path} cannot be read as an .h5ad file ({type(err).__name__}: {detail}). A 10x "
            "Genomics .h5 (filtered_feature_bc_matrix.h5) is read with scanpy, "
            "`adata = sc.read_10x_h5(path)`, and written as one with "
            "`adata.write_h5ad('counts.h5ad')`.") from None


def write_h5ad_backed(adata, path: str | os.PathLike) -> None:
    """Save a backed AnnData to a new .h5ad with bounded memory.

    ``adata.write_h5ad`` reads a backed ``X`` into memory to copy it; here the file is
    copied byte for byte and then the in-memory parts (``obs``, ``var``, ``obsm``, ``varm``,
    ``obsp``, ``varp``, ``layers``, ``uns``, e.g. what :meth:`SCVAE.write_to_adata
    <scvae_tools.SCVAE.write_to_adata>` added) are rewritten in the copy. The copy is
    written under a temporary name and renamed into place.

    Parameters
    ----------
    adata
        An AnnData opened with ``backed="r"`` (not a view of one).
    path
        The .h5ad to write; a file already there is replaced, unless it is the backing
        file itself (refused).
    """
    import shutil

    if not getattr(adata, "isbacked", False) or adata.filename is None:
        raise ValueError("write_h5ad_backed needs an AnnData opened with backed='r'; use "
                         "adata.write_h5ad(path) for in-memory AnnData.")
    if adata.is_view:  # the copy would pair the file's whole X with the view's obs
        raise ValueError("write_h5ad_backed copies the backing file's X, so it cannot write a "
                         "view (adata[idx]); write the subset with "
                         "adata[idx].to_memory().write_h5ad(path).")
    src, dst = _backing_file(adata), Path(path)
    if dst.exists() and os.path.samefile(dst, src):
        raise ValueError(f"{dst} is the backing file itself; choose a new output path.")
    parts = {"obs": adata.obs, "var": adata.var, "obsm": dict(adata.obsm),
             "varm": dict(adata.varm), "obsp": dict(adata.obsp), "varp": dict(adata.varp),
             "layers": dict(adata.layers), "uns": dict(adata.uns)}

    def write(tmp: Path) -> None:
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "r+") as f:
            for key, value in parts.items():
                if key in f:
                    del f[key]
                _elem_io("write_elem")(f, key, value)

    # A unique temporary name, removed if anything fails (a full copy of an atlas must not
    # be left behind), flushed to disk before the rename.
    atomic_write(dst, write)


def make_cell_data(adata, spec: DataSpec, validate: bool = True, copy: bool = True,
                   trained: bool = False, **backed_kwargs):
    """:class:`BackedCellData` for backed AnnData / paths, else an in-memory ``CellData``
    (``copy=False``: read the counts in place; ``trained``: ``spec`` is a trained model's;
    see :class:`CellData`)."""
    if is_backed(adata):
        return BackedCellData(adata, spec, validate=validate, trained=trained, **backed_kwargs)
    return CellData(adata, spec, validate=validate, copy=copy, trained=trained)


class BackedCellData:
    """Cells of an on-disk .h5ad, encoded under a :class:`~scvae_tools.adapter.DataSpec`.

    Parameters
    ----------
    adata
        An AnnData opened with ``anndata.read_h5ad(path, backed="r")``, or the path of an
        .h5ad file. The counts (``X`` or ``layers[spec.layer]``) must be CSR or dense on
        disk. The file is only read, never written.
    spec
        What to read (from :meth:`DataSpec.from_anndata` or a saved model). Genes are
        matched by name; genes of the file that the model lacks are ignored.
    validate
        Check the counts chunk by chunk (non-negative, finite, integer unless allowed,
        no empty cells) during the library-size pass.
    chunk_size
        Consecutive cells per read (the unit of the chunk-order shuffle).
    buffer_chunks
        Chunks read together and shuffled as one buffer during training; memory is about
        ``chunk_size · buffer_chunks · non-zeros per cell · 8`` bytes.
    trained
        ``spec`` is a trained model's (see :class:`~scvae_tools.adapter.CellData`).

    Attributes
    ----------
    n_obs, spec, obs_names, library, batch_index, cat_covs, cont_covs
        As in :class:`~scvae_tools.adapter.CellData` (per-cell vectors are in memory).
    path
        The file the counts are read from.
    """

    def __init__(self, adata, spec: DataSpec, validate: bool = True, chunk_size: int = 1024,
                 buffer_chunks: int = 16, trained: bool = False):
        if chunk_size < 1 or buffer_chunks < 1:
            raise ValueError("chunk_size and buffer_chunks must be positive integers.")
        self.spec = spec
        self.chunk_size = int(chunk_size)
        self.buffer_chunks = int(buffer_chunks)
        if isinstance(adata, (str, os.PathLike)):
            self.path = Path(adata).resolve()  # reopened later, wherever the process is
            if not self.path.exists():
                raise FileNotFoundError(f"{self.path} does not exist; pass an .h5ad path.")
            obs, var = _read_obs_var(self.path)
        else:
            if not getattr(adata, "isbacked", False) or adata.filename is None:
                raise ValueError(
                    "BackedCellData needs an AnnData opened with backed='r' (or an .h5ad path); "
                    "use scvae_tools.adapter.CellData for in-memory AnnData."
                )
            if adata.is_view:
                raise ValueError(
                    "A view of a backed AnnData (adata[idx]) cannot be streamed: its rows are not "
                    "the file's rows. Load the subset with adata[idx].to_memory(), or write it "
                    "to its own file with adata[idx].to_memory().write_h5ad(path)."
                )
            self.path = _backing_file(adata)
            obs, var = adata.obs, adata.var
        var_names = var.index
        self.n_obs = len(obs)
        if self.n_obs == 0 or len(var_names) == 0:
            raise ValueError(
                f"The AnnData is empty ({self.n_obs} cells × {len(var_names)} genes); "
                "pass an AnnData with at least one cell and one gene."
            )
        self.obs_names = pd.Index(obs.index).copy()
        self.padded_genes = padded_genes(var, spec.var_names)
        self._key = "X" if spec.layer is None else f"layers/{spec.layer}"
        self._h5: h5py.File | None = None
        self._pid = -1
        self._stamp = _file_stamp(self.path)  # what is read below holds for this version
        self._validate = validate  # (a re-check after a rewrite checks what this one did)
        f = self._file()
        if self._key not in f:
            where = "X" if spec.layer is None else f"layers[{spec.layer!r}]"
            fix = (f"The model reads its counts from {where}: write the file with the raw "
                   "counts there." if trained else
                   "Pass layer= naming the layer with counts." if spec.layer is None else
                   "Pass layer= naming a layer the file has, or layer=None for X.")
            raise KeyError(f"{where} not found in {self.path}. {fix}")
        node = f[self._key]
        if isinstance(node, h5py.Group):
            enc = _attr_text(node, "encoding-type")
            shape_attr = "shape"
            if not enc and _attr_text(node, "h5sparse_format"):  # anndata < 0.7 files
                enc = f"{_attr_text(node, 'h5sparse_format')}_matrix"
                shape_attr = "h5sparse_shape"
            if enc != "csr_matrix":
                where = ("adata.X" if spec.layer is None
                         else f"adata.layers[{spec.layer!r}]")
                raise ValueError(
                    f"{self._key} in {self.path} is stored as {enc or 'an unknown group'}; "
                    "streaming rows needs CSR (or dense) on disk. Rewrite the file with CSR "
                    f"counts, e.g. `{where} = {where}.tocsr(); adata.write_h5ad(path)`."
                )
            self._sparse = True
            self._indptr = np.asarray(node["indptr"][:], dtype=np.int64)
            shape = tuple(int(s) for s in node.attrs[shape_attr])
        else:
            self._sparse = False
            self._indptr = None
            shape = tuple(node.shape)
        if shape[0] != self.n_obs or shape[1] != len(var_names):
            raise ValueError(
                f"{self._key} has shape {shape} but obs/var have {self.n_obs} × "
                f"{len(var_names)}; the file is inconsistent."
            )
        self._n_file_genes = shape[1]
        self._col_map = _column_map(pd.Index(var_names), spec.var_names, self.obs_names)
        totals = self._scan(validate)
        if validate:
            try:
                check_no_empty_cells(totals, fix=" on the data, then rewrite the file")
            except EmptyCellsError as err:
                if len(var_names) == len(spec.var_names):
                    raise
                raise _empty_in_model_genes(err, spec) from None
        if spec.size_factor_key is not None:
            lib = size_factors(obs, spec.size_factor_key, None if trained else totals)
        else:
            lib = totals.astype(np.float32)
        self.library = lib
        n = self.n_obs
        self.batch_index = (_encode(obs, spec.batch_key, spec.batch_categories)
                            if spec.batch_key else np.zeros(n, dtype=np.int64))
        self.cat_covs = (np.stack([_encode(obs, k, spec.categorical_covariate_categories[k])
                                   for k in spec.categorical_covariate_keys], axis=1)
                         if spec.categorical_covariate_keys else np.zeros((n, 0), dtype=np.int64))
        self.cont_covs = (np.stack([_numeric_obs(obs, k, "continuous_covariate_keys")
                                    .astype(np.float32)
                                    for k in spec.continuous_covariate_keys], axis=1)
                          if spec.continuous_covariate_keys else np.zeros((n, 0), dtype=np.float32))
        _check_finite_covariates(self.cont_covs, spec.continuous_covariate_keys)

    @property
    def X(self):
        """Not available: the counts stay on disk (use :meth:`read_rows` or :meth:`batches`)."""
        raise ValueError(
            "This operation needs the whole count matrix in memory, but the AnnData is backed "
            "(out of core). Pass an in-memory AnnData instead, e.g. adata[idx].to_memory() "
            "for a subset of cells."
        )

    # ------------------------------------------------------------------ file access
    def _file(self) -> h5py.File:
        """The open HDF5 file; reopened in a forked / spawned process (handles don't survive)."""
        with self._lock():
            if self._h5 is None or self._pid != os.getpid():
                self._h5 = h5py.File(self.path, "r")
                self._pid = os.getpid()
                self._check_unchanged()
            return self._h5

    def _check_unchanged(self) -> None:
        """The file is closed between calls, so it can be rewritten: the cells, their order
        and their library sizes read when it was opened must still be what it holds."""
        if _file_stamp(self.path) == self._stamp:
            return
        # Written since (obs changed, say): the same cells and counts? Read it again.
        node = self._h5.get(self._key)
        problem = None
        if node is None:
            problem = f"it has no {self._key}"
        elif self._sparse and not np.array_equal(node["indptr"][:], self._indptr):
            problem = f"the non-zeros of {self._key} differ"
        elif not self._sparse and tuple(node.shape) != (self.n_obs, self._n_file_genes):
            problem = f"{self._key} has another shape"
        elif not pd.Index(_read_obs_var(self.path)[0].index).equals(self.obs_names):
            problem = "its cells are other ones, or in another order"
        else:  # (the scan reads through the handle just opened: no check again)
            try:
                totals = self._scan_rows(self._validate)
            except ValueError as err:
                problem = f"its counts no longer pass the checks ({str(err).rstrip('.')})"
            else:
                if (self.spec.size_factor_key is None
                        and not np.array_equal(totals.astype(np.float32), self.library)):
                    problem = "its counts differ"
        if problem is not None:
            self.close()
            raise ValueError(
                f"{self.path} was written again after it was opened: {problem}. What was "
                "read then (the cells, their order, library sizes) no longer holds; pass the "
                "file anew (adata=path, or SCVAE.load(model_dir, path)).")
        self._stamp = _file_stamp(self.path)

    def release_device(self) -> None:
        """Nothing to drop: streamed counts are moved to the device batch by batch."""

    def _lock(self) -> threading.RLock:
        """This object's lock for the file handle (made on first use: a pickled copy, as
        sent to DDP ranks or worker processes, makes its own)."""
        return self.__dict__.setdefault("_file_lock", threading.RLock())

    @contextlib.contextmanager
    def _reading(self):
        """Hold the file open while reading (nested and concurrent uses share it), and close
        it after the last: between calls nothing holds the .h5ad, so it can be rewritten or
        opened for writing by another process."""
        lock = self._lock()
        with lock:
            self._readers = getattr(self, "_readers", 0) + 1
        try:
            yield
        finally:
            with lock:
                self._readers -= 1
                if self._readers == 0:
                    self.close()

    def close(self) -> None:
        """Close the HDF5 file (it is reopened on the next read)."""
        with self._lock():
            if self._h5 is not None and self._pid == os.getpid():
                self._h5.close()
            self._h5 = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_h5"] = None
        state.pop("_file_lock", None)  # not picklable; a copy makes its own
        state["_readers"] = 0  # a copy holds no file open
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: h5py may already be gone
            pass

    def _read_span(self, r0: int, r1: int) -> sp.csr_matrix:
        """Rows ``r0 … r1 - 1`` as float32 CSR over the file's genes (one contiguous read)."""
        node = self._file()[self._key]
        if not self._sparse:
            return sp.csr_matrix(np.asarray(node[r0:r1], dtype=np.float32))
        p0, p1 = int(self._indptr[r0]), int(self._indptr[r1])
        data = np.asarray(node["data"][p0:p1], dtype=np.float32)
        indices = np.asarray(node["indices"][p0:p1])
        indptr = self._indptr[r0:r1 + 1] - p0
        return sp.csr_matrix((data, indices, indptr), shape=(r1 - r0, self._n_file_genes))

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Counts of ``rows`` (any order, repeats allowed) as float32 CSR in the model's genes.

        Nearby rows are coalesced into contiguous reads, so rows that come from a few
        chunks of the file cost a few reads.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return sp.csr_matrix((0, self.spec.n_genes), dtype=np.float32)
        uniq, inverse = np.unique(rows, return_inverse=True)
        breaks = np.flatnonzero(np.diff(uniq) > _GAP_ROWS) + 1
        parts = []
        with self._reading():
            for piece in (p for run in np.split(uniq, breaks) for p in _dense_pieces(run)):
                r0, r1 = int(piece[0]), int(piece[-1]) + 1
                span = self._read_span(r0, r1)
                parts.append(span if len(piece) == r1 - r0 else span[piece - r0])
        X = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
        X = X[inverse]
        if self._col_map is not None:
            X = X[:, self._col_map]
        X.sum_duplicates()
        return X

    def _scan(self, validate: bool) -> np.ndarray:
        """One pass over the file: per-cell totals (model genes) and chunk-wise validation."""
        with self._reading():
            return self._scan_rows(validate)

    def _scan_rows(self, validate: bool) -> np.ndarray:
        totals = np.empty(self.n_obs, dtype=np.float64)
        for r0 in range(0, self.n_obs, _SCAN_ROWS):
            r1 = min(r0 + _SCAN_ROWS, self.n_obs)
            X = self._read_span(r0, r1)
            if self._col_map is not None:
                X = X[:, self._col_map]
            if validate:
                validate_values(X.data, self.spec.allow_non_integer,
                                where=f" (in rows {r0}…{r1 - 1})")
            totals[r0:r1] = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
        return totals

    # ------------------------------------------------------------------ batching
    def epoch_order(self, indices: np.ndarray | None = None,
                    generator: torch.Generator | None = None) -> np.ndarray:
        """A chunk-local random order of ``indices`` (default: all cells) for one epoch.

        The sorted cells are cut into chunks of ``chunk_size``; chunks are shuffled, grouped
        into buffers of ``buffer_chunks`` chunks and the cells of each buffer shuffled. The
        result is a permutation of ``indices``, determined by ``generator``'s state.
        """
        idx = np.arange(self.n_obs) if indices is None else np.sort(np.asarray(indices, dtype=np.int64))
        n_chunks = max(1, -(-len(idx) // self.chunk_size))
        chunk_perm = torch.randperm(n_chunks, generator=generator).numpy()
        out = np.empty_like(idx)
        pos = 0
        for b in range(0, n_chunks, self.buffer_chunks):
            cells = np.concatenate([idx[c * self.chunk_size:(c + 1) * self.chunk_size]
                                    for c in chunk_perm[b:b + self.buffer_chunks]])
            cells = cells[torch.randperm(len(cells), generator=generator).numpy()]
            out[pos:pos + len(cells)] = cells
            pos += len(cells)
        return out

    def batches(
        self,
        indices: np.ndarray | None = None,
        batch_size: int = 128,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        drop_singleton: bool = False,
        sparse: bool = False,  # accepted for the CellData contract; blocks are always dense
        nonzero: bool = False,
    ) -> Iterator[Batch]:
        """Yield minibatches over ``indices`` (default: all cells), reading from disk.

        Same contract as :meth:`CellData.batches <scvae_tools.adapter.CellData.batches>`:
        without ``shuffle`` cells come in the order of ``indices``; with it, in a
        chunk-local random order (:meth:`epoch_order`). With ``drop_singleton`` a trailing
        batch of one cell is merged into the previous one. With ``nonzero`` each batch also
        carries its non-zeros (``Batch.nonzero``), read off the CSR rows it was built from.
        At most about ``chunk_size · buffer_chunks`` cells are held in memory at a time.
        """
        with self._reading():
            yield from self._batches(indices, batch_size, shuffle, generator, device,
                                     drop_singleton, nonzero)

    def _batches(self, indices, batch_size, shuffle, generator, device, drop_singleton,
                 nonzero) -> Iterator[Batch]:
        device = torch.device(device)
        idx = np.arange(self.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
        if shuffle:
            idx = self.epoch_order(idx, generator)
        n = len(idx)
        window = max(self.chunk_size * self.buffer_chunks, batch_size)
        buf, w0, w1 = sp.csr_matrix((0, self.spec.n_genes), dtype=np.float32), 0, 0
        for s, e in batch_bounds(n, batch_size, drop_singleton):
            if e > w1:  # read the next window of the order, keeping the rows still needed
                new_w1 = min(n, max(e, w1 + window))
                fresh = self.read_rows(idx[w1:new_w1])
                buf = sp.vstack([buf[s - w0:], fresh], format="csr") if w1 > s else fresh
                w0, w1 = s, new_w1
            rows = idx[s:e]
            block = buf[s - w0:e - w0]
            rows_t = torch.from_numpy(rows)
            nz = None
            if nonzero:  # the same non-zeros as in-memory CSR batches
                nz = _nonzeros_on(_block_entries(block, np.arange(e - s), device), device)
            yield Batch(
                x=_to_device(torch.from_numpy(block.toarray()), device),
                library=torch.from_numpy(self.library[rows]).unsqueeze(1).to(device),
                batch_index=torch.from_numpy(self.batch_index[rows]).to(device),
                cat_covs=torch.from_numpy(self.cat_covs[rows]).to(device),
                cont_covs=torch.from_numpy(self.cont_covs[rows]).to(device),
                index=rows_t.to(device),
                nonzero=nz,
            )


# ---------------------------------------------------------------------- helpers
def _dense_pieces(run: np.ndarray, max_span: int = 8192) -> list[np.ndarray]:
    """``run`` (sorted rows, gaps ≤ _GAP_ROWS) cut so that a sparse one is not read as one
    span of the whole range it covers (every 10th cell of a 16k-cell window would read
    160k rows at once). Reading across the small gaps costs less than more HDF5 calls, so
    only the memory is bounded: a run denser than one row in four stays one read; a sparser
    one is cut into spans of at most ``max_span`` rows, each subset as soon as it is read."""
    if run[-1] - run[0] + 1 <= max(4 * len(run), max_span):
        return [run]  # the usual case: a dense run (chunk-local training order)
    bins = (run - run[0]) // max_span
    return np.split(run, np.flatnonzero(np.diff(bins)) + 1)


def _elem_io(name: str):
    """``anndata.io.<name>`` (``read_elem``/``write_elem``; anndata >= 0.11), or
    ``anndata.experimental``'s on anndata 0.10."""
    try:
        import anndata.io as io
    except ImportError:  # anndata 0.10
        import anndata.experimental as io
    return getattr(io, name)


def _read_obs_var(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``obs`` and ``var`` of an .h5ad without touching the matrices."""
    import anndata as ad

    with h5py.File(path, "r") as f:
        for key in ("obs", "var"):
            if key not in f:
                raise ValueError(f"{path} has no {key!r}; it is not an .h5ad written by anndata.")
        legacy = isinstance(f["obs"], h5py.Dataset)  # anndata < 0.7: a compound array
        if not legacy:
            read_elem = _elem_io("read_elem")
            obs, var = read_elem(f["obs"]), read_elem(f["var"])
    if legacy:  # anndata itself still reads those; matrices stay on disk
        old = ad.read_h5ad(path, backed="r")
        obs, var = old.obs.copy(), old.var.copy()
        old.file.close()
    return obs, var


def _attr_text(node, name: str) -> str:
    """An HDF5 attribute as text ("" when absent)."""
    value = node.attrs.get(name, "")
    return value.decode() if isinstance(value, bytes) else str(value)


def _column_map(have: pd.Index, want: list[str], obs_names: pd.Index | None = None
                ) -> np.ndarray | None:
    """File columns in the model's gene order (``None`` when they already match)."""
    have_list = [str(v) for v in have]
    if have_list == list(want):
        return None
    have_set = set(have_list)
    missing = [g for g in want if g not in have_set]
    if missing:  # the in-memory message: transposed files, the padding limit
        raise ValueError(_missing_genes_message(missing, list(want), have_list, set(want),
                                                obs_names, backed=True))
    return gene_positions(have_list, list(want))
