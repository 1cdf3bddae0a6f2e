"""AnnData → tensors: validation, covariate encoding and fast minibatches.

This is the only module that reads an :class:`~anndata.AnnData`. It never writes to
one: every array it keeps is a copy or a read-only view of the user's data.

Two objects come out of here:

* :class:`DataSpec` — *which* parts of the AnnData feed the model (layer, obs keys)
  and the category lists learned at set-up. It is JSON-serialisable and saved with
  a model, so a later AnnData is encoded exactly the same way.
* :class:`CellData` — the encoded arrays (counts as CSR or dense, library sizes,
  batch codes, covariates) for one AnnData, with :meth:`CellData.batches` yielding
  torch minibatches without per-cell Python.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from . import native
from .fused import NonZeros, table_slots

try:  # scipy's C++ gather of CSR rows: ~4× faster than numpy fancy indexing (see _csr_rows)
    from scipy.sparse._sparsetools import csr_row_index as _csr_row_index
except ImportError:  # pragma: no cover - a private name; numpy does the same work
    _csr_row_index = None

# Data below this many dense float32 bytes is densified once and indexed as a tensor:
# gathering rows of a dense tensor is far faster than slicing CSR per batch.
DENSE_LIMIT_BYTES = 1 << 30
# On an accelerator, CSR data + int64 column indices up to this size stay resident there;
# batches are then scattered into dense blocks on the device with no host copy of counts.
SPARSE_DEVICE_LIMIT_BYTES = 8 << 30
# Entries per step of a scan over the counts (genes_without_counts): ~13 MB of temporaries.
GENE_SCAN_STEP = 1 << 20


def _csr_resident(device: torch.device) -> bool:
    """Whether CSR counts stay resident on ``device`` as CSR rather than as a dense tensor:
    on CUDA (measured on an H100) each batch's block and its non-zeros are then built on
    the device from the CSR arrays, so an epoch sends no per-batch data from the host.
    Other accelerators (MPS: not measured) keep a dense copy when it fits, else host
    blocks."""
    return device.type == "cuda"


class _AsSaved:
    """The default of ``SCVAE.load(layer=)``: read counts where the model did in training."""

    def __repr__(self) -> str:
        return "<the layer the model was trained on>"


AS_SAVED = _AsSaved()


@dataclass
class DataSpec:
    """What the model reads from an AnnData, and the categories it knows."""

    var_names: list[str]
    layer: str | None = None
    batch_key: str | None = None
    batch_categories: list[str] = field(default_factory=list)
    categorical_covariate_keys: list[str] = field(default_factory=list)
    categorical_covariate_categories: dict[str, list[str]] = field(default_factory=dict)
    continuous_covariate_keys: list[str] = field(default_factory=list)
    size_factor_key: str | None = None
    allow_non_integer: bool = False

    @property
    def n_genes(self) -> int:
        return len(self.var_names)

    @property
    def n_batch(self) -> int:
        return max(len(self.batch_categories), 1)

    @property
    def n_cats_per_cov(self) -> list[int]:
        return [len(self.categorical_covariate_categories[k]) for k in self.categorical_covariate_keys]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        return cls(**d)

    @classmethod
    def from_anndata(
        cls,
        adata,
        layer: str | None = None,
        batch_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        size_factor_key: str | None = None,
        allow_non_integer: bool = False,
    ) -> DataSpec:
        """Learn the spec (gene order, categories) from the AnnData used for training."""
        _check_not_empty(adata)
        # As text, as a saved model keeps them: 1 and "1" are one name there.
        names = adata.var_names.astype(str)
        if names.has_duplicates:
            dups = names[names.duplicated()].unique()[:5].tolist()
            as_text = ("" if adata.var_names.equals(names) else
                       "`adata.var_names = adata.var_names.astype(str)` then ")
            raise ValueError(
                f"Gene names must be unique (as text); duplicated: {dups}. "
                f"Fix with {as_text}`adata.var_names_make_unique()`."
            )
        for name, key in [("layer", layer), ("batch_key", batch_key),
                          ("size_factor_key", size_factor_key)]:
            if key is not None and not isinstance(key, str):
                more = (" For several batch columns, pass one as batch_key and the others as "
                        "categorical_covariate_keys." if name == "batch_key" else "")
                raise TypeError(f"{name} must be one name (a str) or None, got {key!r}.{more}")
        cat_keys = _key_list("categorical_covariate_keys", categorical_covariate_keys)
        cont_keys = _key_list("continuous_covariate_keys", continuous_covariate_keys)
        for key in [batch_key, size_factor_key, *cat_keys, *cont_keys]:
            if key is not None:
                _check_obs_key(adata, key)
        roles = [("batch_key", batch_key)] * (batch_key is not None) + [
            ("categorical_covariate_keys", k) for k in cat_keys] + [
            ("continuous_covariate_keys", k) for k in cont_keys]
        seen: dict[str, str] = {}
        for role, key in roles:  # one column, one input: twice is a redundant (or odd) input
            if key in seen:
                raise ValueError(f"obs column {key!r} is given twice ({seen[key]} and {role}); "
                                 "name each column once.")
            seen[key] = role
        if layer is not None and layer not in adata.layers:
            raise KeyError(
                f"Layer {layer!r} not found in adata.layers (available: {list(adata.layers)}). "
                "Pass layer=None to use adata.X."
            )
        for key in cont_keys:
            _warn_if_unscaled(_numeric_obs(adata.obs, key), key)
        for role, key in roles:
            if role != "continuous_covariate_keys":
                _warn_if_continuous_labels(adata.obs[key], key, role)
        return cls(
            var_names=[str(v) for v in adata.var_names],
            layer=layer,
            batch_key=batch_key,
            batch_categories=_categories(adata.obs, batch_key) if batch_key else [],
            categorical_covariate_keys=cat_keys,
            categorical_covariate_categories={k: _categories(adata.obs, k) for k in cat_keys},
            continuous_covariate_keys=cont_keys,
            size_factor_key=size_factor_key,
            allow_non_integer=allow_non_integer,
        )


@dataclass
class Batch:
    """One minibatch on the model's device."""

    x: torch.Tensor  # (n, genes) float32 counts
    library: torch.Tensor  # (n, 1) library size
    batch_index: torch.Tensor  # (n,) int64 batch codes (zeros without batch_key)
    cat_covs: torch.Tensor  # (n, k) int64 codes
    cont_covs: torch.Tensor  # (n, m) float32
    index: torch.Tensor  # (n,) int64 row numbers into the CellData
    # The counts' non-zeros (positions in the n × genes block, values, and what the fused NB
    # likelihood derives from them), when the data path knows them (``batches(nonzero=True)``
    # over CSR counts): the likelihood then need not search x for them, a search that makes
    # the host wait for the device.
    nonzero: NonZeros | None = None


def padded_genes(var: pd.DataFrame, var_names) -> list[str]:
    """The genes of ``var_names`` that ``var["scvae_padded"]`` flags: added as zero counts by
    ``SCVAE.prepare_query_anndata``, not measured (training must not learn them as zeros)."""
    if "scvae_padded" not in var.columns:
        return []
    # Only real True values: not NaN, nor strings such as "False" (truthy as bool).
    flags = (var["scvae_padded"] == True).to_numpy(dtype=bool, na_value=False)  # noqa: E712
    flagged = var.index[flags]
    return [str(g) for g in flagged.intersection(pd.Index(var_names), sort=False)]


class CellData:
    """Encoded arrays of one AnnData under a :class:`DataSpec`.

    Parameters
    ----------
    adata
        Cells × genes AnnData. Must contain every gene of ``spec.var_names``; columns are
        reordered by name when the order differs.
    spec
        What to read (from :meth:`DataSpec.from_anndata` or a saved model).
    validate
        Check the counts (non-negative, finite, integer unless allowed, no empty cells).
    copy
        Keep a private copy of the counts (the default: a model's training data must not
        change when the user later edits their AnnData). ``False`` reads float32 CSR or
        dense counts in place, for short-lived read-only uses such as inference on another
        AnnData; nothing here ever writes to them. Such data are also never densified as
        a whole for the device (a pass or two over them does not repay building a cells ×
        genes copy): batches of sparse counts are gathered one by one.
    trained
        ``spec`` is a trained model's, whose layer cannot change: errors then say how to put
        the counts where the model reads them, rather than to pass ``layer=``.
    """

    def __init__(self, adata, spec: DataSpec, validate: bool = True, copy: bool = True,
                 trained: bool = False):
        _check_not_empty(adata)
        self.spec = spec
        self.n_obs = adata.n_obs
        self.obs_names = adata.obs_names.copy()
        self.padded_genes = padded_genes(adata.var, spec.var_names)
        counts = _get_counts(adata, spec.layer, trained)
        counts = _as_float32(_select_genes(counts, adata.var_names, spec.var_names,
                                           adata.obs_names), copy=copy)
        try:
            totals = count_totals(counts, validate, spec.allow_non_integer)
        except EmptyCellsError as err:
            if adata.n_vars == counts.shape[1]:
                raise
            raise _empty_in_model_genes(err, spec) from None
        except NotCountsError as err:  # point at counts the AnnData holds elsewhere, if any
            if trained:
                raise NotCountsError(err.problem, counts_for_model(adata, spec.layer)) from None
            hint = counts_elsewhere(adata, spec.layer)
            if not hint:
                raise
            raise NotCountsError(f"{err} {hint}") from None
        self.X = counts  # CSR or dense float32, only ever read
        self._whole = validate and not spec.allow_non_integer  # checked: whole counts
        obs = adata.obs
        if spec.size_factor_key is not None:
            lib = size_factors(obs, spec.size_factor_key, None if trained else totals)
        else:
            lib = totals
        self.library = lib
        self.batch_index = (
            _encode(obs, spec.batch_key, spec.batch_categories)
            if spec.batch_key
            else np.zeros(self.n_obs, dtype=np.int64)
        )
        self.cat_covs = np.stack(
            [
                _encode(obs, k, spec.categorical_covariate_categories[k])
                for k in spec.categorical_covariate_keys
            ],
            axis=1,
        ) if spec.categorical_covariate_keys else np.zeros((self.n_obs, 0), dtype=np.int64)
        self.cont_covs = np.stack(
            [_numeric_obs(obs, k, "continuous_covariate_keys").astype(np.float32)
             for k in spec.continuous_covariate_keys],
            axis=1,
        ) if spec.continuous_covariate_keys else np.zeros((self.n_obs, 0), dtype=np.float32)
        _check_finite_covariates(self.cont_covs, spec.continuous_covariate_keys)
        self._device_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._counts_placed = False  # counts of the cached device placed yet
        self._resident = copy  # place the counts on the device as a whole (see `copy`)

    # ------------------------------------------------------------------ batching
    def _on_device(self, device: torch.device, counts: bool = True) -> dict[str, torch.Tensor]:
        """All per-cell arrays as tensors on ``device``; the counts too unless ``counts=False``.

        Counts are kept, in order of preference: on CUDA, CSR counts as CSR
        arrays on the device (``x_data``, ``x_indices``, ``x_indptr``; when they take at
        most ``SPARSE_DEVICE_LIMIT_BYTES``); as one dense tensor on the device (when it
        takes at most ``DENSE_LIMIT_BYTES``); or in host memory, gathered per batch into a
        (pinned, on CUDA) dense block. They are placed on first use, so sparse CPU
        inference (``counts=False``) never builds the dense copy.
        """
        key = str(device)
        if key not in self._device_cache:
            t: dict[str, torch.Tensor] = {
                "library": torch.from_numpy(self.library).to(device).unsqueeze(1),
                "batch_index": torch.from_numpy(self.batch_index).to(device),
                "cat_covs": torch.from_numpy(self.cat_covs).to(device),
                "cont_covs": torch.from_numpy(self.cont_covs).to(device),
            }
            self._device_cache = {key: t}  # keep only one device's copy
            self._counts_placed = False
        t = self._device_cache[key]
        if counts and not self._counts_placed and (self._resident or not sp.issparse(self.X)):
            n, g = self.X.shape
            if not sp.issparse(self.X) and _csr_resident(device):
                self._dense_to_csr(n * g)
            if sp.issparse(self.X) and _csr_resident(device) and (
                self.X.nnz * 12 <= SPARSE_DEVICE_LIMIT_BYTES
            ):
                # The whole CSR matrix lives on the accelerator; batches are built there.
                t["x_data"] = torch.from_numpy(self.X.data).to(device)
                t["x_indices"] = torch.from_numpy(self.X.indices.astype(np.int64)).to(device)
                t["x_indptr"] = torch.from_numpy(self.X.indptr.astype(np.int64)).to(device)
            elif n * g * 4 <= DENSE_LIMIT_BYTES:
                dense = self.X.toarray() if sp.issparse(self.X) else np.asarray(self.X)
                with warnings.catch_warnings():  # a read-only user array: only read here
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    t["x"] = torch.from_numpy(dense).to(device)
            self._counts_placed = True
        return t

    def _dense_to_csr(self, n_entries: int) -> None:
        """Keep dense counts as CSR where CSR stays resident (CUDA): a dense block leaves
        each step to find its non-zeros with ``torch.nonzero``, and the host then waits for
        the device; from CSR the block and its non-zeros are built on the device, sized
        from the host's ``indptr``. Only when CSR is the smaller copy (under a third of the
        entries non-zero). The user's array is not touched: this is a new matrix."""
        nnz = int(np.count_nonzero(self.X))
        if nnz * 12 <= min(n_entries * 4, SPARSE_DEVICE_LIMIT_BYTES):
            self.X = sp.csr_matrix(self.X)
            self._resident = True  # placed whole again after release_device(), as dense was

    def release_device(self) -> None:
        """Drop the tensors placed on a device (e.g. the counts resident on a GPU); the next
        batch places them again, on whichever device it asks for."""
        self._device_cache = {}
        self._counts_placed = False

    def genes_without_counts(self) -> int:
        """How many genes have no count in any cell (one pass over the stored entries).

        In steps of :data:`GENE_SCAN_STEP` entries: whole-matrix temporaries (a mask, the
        masked indices, numpy's int64 copy of them for ``bincount``) cost 1.8 GB at 1M
        cells with 138M non-zeros, more than the counts themselves.
        """
        X, n_genes = self.X, self.X.shape[1]
        seen = np.zeros(n_genes, dtype=bool)
        if sp.issparse(X):
            for a in range(0, X.nnz, GENE_SCAN_STEP):
                values = X.data[a:a + GENE_SCAN_STEP]
                seen[X.indices[a:a + GENE_SCAN_STEP][values != 0]] = True
        else:
            rows = max(1, GENE_SCAN_STEP // max(n_genes, 1))
            for a in range(0, X.shape[0], rows):
                seen |= np.any(X[a:a + rows] != 0, axis=0)
        return int(n_genes - np.count_nonzero(seen))

    def batches(
        self,
        indices: np.ndarray | None = None,
        batch_size: int = 128,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        drop_singleton: bool = False,
        sparse: bool = False,
        nonzero: bool = False,
    ) -> Iterator[Batch]:
        """Yield minibatches over ``indices`` (default: all cells).

        With ``sparse=True``, sparse counts on the CPU come as a torch sparse CSR tensor
        (the encoder then works on the non-zeros only; inference, not training).
        With ``nonzero=True`` and CSR counts, each batch also carries its non-zeros
        (``Batch.nonzero``), found on the host from the CSR structure and sent over with
        the batch, so that no step has to search the dense block on the device.

        No per-cell Python: rows are gathered with one indexing call per batch, from a dense
        tensor on the device, from CSR arrays on the device, or from host CSR into a dense
        block (pinned memory and a non-blocking copy on CUDA). Nothing here waits on the
        device. With ``drop_singleton`` a trailing batch of one cell is merged into the
        previous batch instead (BatchNorm cannot train on one cell; every cell is still seen).
        """
        device = torch.device(device)
        idx = torch.arange(self.n_obs) if indices is None else torch.as_tensor(indices)
        if shuffle:
            idx = idx[torch.randperm(len(idx), generator=generator)]
        csr = sparse and sp.issparse(self.X) and device.type == "cpu"
        t = self._on_device(device, counts=not csr)
        in_order = indices is None and not shuffle
        on_device_csr = not csr and "x_data" in t
        positions = nonzero and sp.issparse(self.X) and not csr and not on_device_csr
        if on_device_csr:
            # One copy of the epoch's order; each batch's entry count is read off the host's
            # indptr now, so that no batch has to ask the device for a size.
            idx_dev = idx.to(device)
            ends = np.cumsum(np.diff(self.X.indptr)[idx.numpy()])
        for s, e in batch_bounds(len(idx), batch_size, drop_singleton):
            rows = idx[s:e]
            rows_dev = idx_dev[s:e] if on_device_csr else rows.to(device, non_blocking=True)
            sel = slice(s, e) if in_order else rows_dev  # all cells in order: views, not copies
            entries = (_block_entries(self.X, rows.numpy(), device, self._whole)
                       if positions else None)
            nz = None if entries is None else _nonzeros_on(entries, device)
            if csr:
                x = _torch_csr_rows(self.X, rows.numpy(), s, e, in_order)
            elif on_device_csr:
                n_entries = int(ends[e - 1] - (ends[s - 1] if s else 0))
                x, nz = _gather_csr_on_device(t, rows_dev, n_entries, self.X.shape[1], nonzero)
            elif "x" in t:
                x = _take(t["x"], sel)
            else:
                x = _to_device(torch.from_numpy(_dense_rows(self.X, rows.numpy(), entries)),
                               device)
            yield Batch(x=x, library=_take(t["library"], sel),
                        batch_index=_take(t["batch_index"], sel), cat_covs=_take(t["cat_covs"], sel),
                        cont_covs=_take(t["cont_covs"], sel), index=rows_dev, nonzero=nz)


# ---------------------------------------------------------------------- validation
class NotCountsError(ValueError):
    """The matrix holds values that are not counts: NaN/inf, negative or (unless allowed)
    fractional. A ``ValueError``; its own class so that callers can replace the advice.

    ``problem`` is what is wrong, ``fix`` what to do; the message is both.
    """

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(f"{problem} {fix}".rstrip())
        self.problem = problem


def count_totals(X, validate: bool = True, allow_non_integer: bool = False) -> np.ndarray:
    """Each cell's total counts (float32); with ``validate``, first :func:`validate_counts`.

    Float32 CSR or C-ordered dense counts go through the compiled kernel when it is
    available (:func:`~scvae_tools.native.count_check`): sums and checks in one read of
    the values, on torch's threads. Only when it finds a problem does the numpy check run,
    to name it.
    """
    if not _kernel_countable(X) or native.library() is None:
        totals = np.asarray(X.sum(axis=1), dtype=np.float32).ravel()
        if validate:
            validate_counts(X, allow_non_integer, totals)
        return totals
    totals, flags = native.count_check(X)
    if not validate:
        return totals
    if flags & ~(native.FRACTIONAL if allow_non_integer else 0):
        validate_counts(X, allow_non_integer, totals)  # numpy's check names the problem
        raise RuntimeError(  # the kernel and numpy disagree about the values: a bug
            f"scvae_tools: the compiled count check reported problem bits {flags} that "
            "numpy's check did not find; please report this. Set SCVAE_TOOLS_NATIVE=0 "
            "to work around it.")
    check_no_empty_cells(totals)
    return totals


def _kernel_countable(X) -> bool:
    if sp.issparse(X):
        return X.format == "csr" and X.dtype == np.float32
    return isinstance(X, np.ndarray) and X.ndim == 2 and X.dtype == np.float32 and X.flags.c_contiguous


def validate_counts(X, allow_non_integer: bool = False, totals: np.ndarray | None = None) -> None:
    """Raise ``ValueError`` naming the problem and the fix if ``X`` is not a count matrix.

    ``totals`` are the row sums when the caller already has them.
    """
    validate_values(X.data if sp.issparse(X) else np.asarray(X), allow_non_integer)
    check_no_empty_cells(np.asarray(X.sum(axis=1)).ravel() if totals is None else totals)


# Values checked per step: 64k values (256 KB) stay in the L2 cache through the checks,
# whose scratch buffers are reused; whole-array temporaries of a large matrix (or fresh ones
# per step) cost more in page faults and memory traffic than the checks themselves.
_CHECK_CHUNK = 1 << 16


def validate_values(values: np.ndarray, allow_non_integer: bool = False, where: str = "") -> None:
    """Counts must be finite, non-negative and (unless allowed) integer.

    ``where`` (e.g. ``" (in rows 0…9999)"``) locates the problem for chunked checks.
    """
    flat = np.ravel(values, order="K")  # no copy for contiguous input, whatever its order
    whole = allow_non_integer or flat.dtype.kind != "f"  # ints and bools are whole numbers
    n_parts = min(torch.get_num_threads(), flat.size // _PARALLEL_CHECK_VALUES)
    if n_parts < 2:
        return _validate_flat(flat, whole, where)
    # numpy's reductions and ufuncs release the GIL, so contiguous parts checked by threads
    # run in parallel. Errors are re-raised in part order: the first problem in the array
    # wins, as in a serial pass.
    from concurrent.futures import ThreadPoolExecutor

    bounds = np.linspace(0, flat.size, n_parts + 1).astype(np.int64)
    with ThreadPoolExecutor(n_parts) as pool:
        futures = [pool.submit(_validate_flat, flat[a:b], whole, where)
                   for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        for f in futures:
            f.result()


# Arrays of more values than this per thread are checked by several threads.
_PARALLEL_CHECK_VALUES = 1 << 22


def _validate_flat(flat: np.ndarray, whole: bool, where: str) -> None:
    n = min(flat.size, _CHECK_CHUNK)
    rounded, differs = (None, None) if whole else (np.empty(n, flat.dtype), np.empty(n, bool))
    for start in range(0, flat.size, _CHECK_CHUNK):
        chunk = flat[start:start + _CHECK_CHUNK]
        _check_finite_non_negative(chunk, where)
        if whole:
            continue
        k = chunk.size
        if np.not_equal(chunk, np.rint(chunk, out=rounded[:k]), out=differs[:k]).any():
            raise NotCountsError(
                f"The count matrix contains non-integer values{where}; it looks normalised or "
                "log-transformed.",
                "Use raw integer counts (e.g. layer='counts'), or pass allow_non_integer=True "
                "for ambient-corrected / pseudo-counts.")


def _check_finite_non_negative(values: np.ndarray, where: str) -> None:
    # NaN propagates through min/max and ±inf ends up in one of them: two reductions
    # without temporaries instead of an isfinite mask.
    low, high = values.min(initial=0.0), values.max(initial=0.0)
    if not (np.isfinite(low) and np.isfinite(high)):
        raise NotCountsError(
            f"The count matrix contains NaN or inf values{where}.",
            "Replace them (e.g. with 0) or drop the affected cells/genes before training.")
    if low < 0:
        raise NotCountsError(
            f"The count matrix contains negative values{where}; a count model needs raw counts.",
            "Pass the raw counts (e.g. layer='counts' or adata.raw) rather than scaled or "
            "log-normalised data.")


class EmptyCellsError(ValueError):
    """Cells without a count (row numbers in ``rows``)."""

    def __init__(self, message: str, rows: np.ndarray) -> None:
        super().__init__(message)
        self.rows = rows


def check_no_empty_cells(totals: np.ndarray, fix: str = "") -> None:
    """Every cell needs at least one count; ``fix`` adds advice (e.g. for files on disk)."""
    empty = np.flatnonzero(totals == 0)
    if empty.size:
        raise EmptyCellsError(
            f"{empty.size} cell(s) have zero total counts (first row indices: {empty[:5].tolist()}). "
            f"Remove them first, e.g. `sc.pp.filter_cells(adata, min_counts=1)`{fix}.", empty)


def _empty_in_model_genes(err: EmptyCellsError, spec: DataSpec) -> EmptyCellsError:
    """``err`` restated for an AnnData with more genes than ``spec``'s: the cells may have
    counts in the others, which filtering on all genes does not see."""
    where = "X" if spec.layer is None else f"layers[{spec.layer!r}]"
    return EmptyCellsError(
        f"{err.rows.size} cell(s) have no counts in the model's {len(spec.var_names)} genes "
        f"(first row indices: {err.rows[:5].tolist()}); the counts they have are in genes the "
        "model does not use. Remove them first, e.g. `adata = adata[np.asarray(adata[:, "
        f"model.var_names].{where}.sum(axis=1)).ravel() > 0].copy()`.", err.rows)


def batch_bounds(n: int, batch_size: int, drop_singleton: bool = False) -> list[tuple[int, int]]:
    """``(start, end)`` of each minibatch over ``n`` ordered cells.

    With ``drop_singleton`` a trailing batch of one cell is merged into the previous batch
    (BatchNorm cannot train on one cell; every cell is still seen).
    """
    starts = list(range(0, n, batch_size))
    if drop_singleton and len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, starts[1:] + [n], strict=True))


def _check_not_empty(adata) -> None:
    """An AnnData with at least one cell and one gene (and not ``adata.raw``)."""
    if type(adata).__name__ == "Raw":  # has X and var but no obs: fails far from here
        raise TypeError(
            "adata.raw is not an AnnData. Pass `adata.raw.to_adata()` (the raw genes, with "
            "adata's obs), or copy the raw counts of adata's genes into a layer, "
            "`adata.layers['counts'] = adata.raw[:, adata.var_names].X.copy()`, and pass "
            "layer='counts'.")
    if not all(hasattr(adata, a) for a in ("n_obs", "obs", "var_names")):
        raise TypeError(
            f"Expected an AnnData, got {type(adata).__name__}. Wrap a cells × genes count "
            "matrix as `anndata.AnnData(X)` (with obs and var for cell and gene names), or "
            "read a file with `anndata.read_h5ad(path)`.")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(
            f"The AnnData is empty ({adata.n_obs} cells × {adata.n_vars} genes); "
            "pass an AnnData with at least one cell and one gene."
        )


def _key_list(name: str, keys) -> list[str]:
    """``obs`` column names as a list; one name alone counts as a list of one (as in scanpy),
    not as the characters of a string."""
    if keys is None:
        return []
    if isinstance(keys, str):
        return [keys]
    keys = list(keys)
    if not all(isinstance(k, str) for k in keys):
        raise TypeError(f"{name} must be obs column names (str), got {keys!r}.")
    return keys


def _check_finite_covariates(values: np.ndarray, keys: list[str]) -> None:
    """Continuous covariates (cells × keys) must be finite; name the columns that are not."""
    bad = ~np.isfinite(values)
    if bad.any():
        cols = [f"{k!r} ({int(n)} cells)" for k, n in zip(keys, bad.sum(0), strict=True) if n]
        raise ValueError(f"Continuous covariates contain NaN or inf: obs {', '.join(cols)}; "
                         "fill or drop those cells first.")


def size_factors(obs: pd.DataFrame, key: str, totals: np.ndarray | None = None) -> np.ndarray:
    """``obs[key]`` as float32 library sizes: positive and finite for every cell.

    With the cells' ``totals`` (setting up a model), warn when they are on another scale:
    the model takes them as the library size ℓ in μ = ℓ·ρ, in counts, as scvi-tools does,
    where scran- or DESeq-style size factors have mean 1.
    """
    lib = _numeric_obs(obs, key, None if totals is not None else "size_factor_key"
                       ).astype(np.float32)
    if np.any(~np.isfinite(lib)) or np.any(lib <= 0):
        raise ValueError(
            f"obs[{key!r}] must be positive and finite for every cell; fix or drop those "
            "cells (or, setting up a new model, leave size_factor_key=None to use each cell's "
            "total counts).")
    if totals is not None:
        ratio = float(np.median(lib / np.maximum(totals, 1.0)))
        if not 0.05 <= ratio <= 20:
            why = (f"It looks like size factors with mean 1 (scran, DESeq), which fit far "
                   f"worse: scale them to counts, e.g. `adata.obs[{key!r}] *= "
                   "np.asarray(adata.X.sum(axis=1)).mean()` (the counts of the model's genes)"
                   if ratio < 0.05 else
                   "Library sizes over other genes (e.g. all genes, for a model of a gene "
                   "subset) put the expected counts on another scale: pass library sizes of "
                   "the model's genes")
            warnings.warn(
                f"obs[{key!r}] is on another scale than the cells' total counts (median "
                f"ratio {ratio:.3g}); it is used as each cell's library size in counts "
                f"(expected counts = library size × proportions). {why}, or leave "
                "size_factor_key=None.",
                UserWarning, stacklevel=5)  # size_factors, CellData, make_cell_data, SCVAE
    return lib


def _check_obs_key(adata, key: str) -> None:
    if key not in adata.obs.columns:
        raise KeyError(
            f"{key!r} is not a column of adata.obs (available: {list(adata.obs.columns)}). "
            "Check the spelling of the key or add the column first."
        )


def counts_elsewhere(adata, layer: str | None) -> str:
    """Advice naming the layers (or ``adata.raw``) of ``adata`` that look like raw counts,
    for when the chosen matrix does not; ``""`` if none does.

    The usual case: after ``sc.pp.normalize_total`` and ``sc.pp.log1p``, ``X`` holds
    log-normalised values and the counts were kept in a layer or in ``adata.raw``.
    """
    names = [k for k in adata.layers.keys() if k != layer and _looks_like_counts(adata.layers[k])]
    if names:
        return ("These look like raw counts: " + ", ".join(f"adata.layers[{k!r}]" for k in names)
                + f"; pass layer={names[0]!r}.")
    raw = getattr(adata, "raw", None)
    if layer is None and raw is not None and _looks_like_counts(raw.X):
        return ("adata.raw looks like raw counts: copy them into a layer for these genes, "
                "`adata.layers['counts'] = adata.raw[:, adata.var_names].X.copy()`, and pass "
                "layer='counts'.")
    return ""


def _looks_like_counts(X, n: int = 100_000) -> bool:
    """Whether the first ``n`` stored values of ``X`` are non-negative whole numbers, not
    all zero (a sample: this only chooses advice for an error message)."""
    try:
        values = X.data[:n] if sp.issparse(X) else np.asarray(X[: max(1, n // max(1, X.shape[1]))])
        values = np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError, AttributeError):  # e.g. a backed dataset, odd types
        return False
    return bool(values.size and np.isfinite(values).all() and (values >= 0).all()
                and (values == np.rint(values)).all() and values.any())


def counts_for_model(adata, layer: str | None) -> str:
    """Advice for evaluating a trained model on ``adata`` whose matrix ``layer`` (the one the
    model was trained on) does not hold counts: how to put the counts there, on a copy."""
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    target = "q.X" if layer is None else f"q.layers[{layer!r}]"
    names = [k for k in adata.layers.keys() if k != layer and _looks_like_counts(adata.layers[k])]
    if names:
        return (f"The model reads {where}, as in training, and adata.layers[{names[0]!r}] looks "
                f"like raw counts: pass a copy with them there, e.g. `q = adata.copy(); "
                f"{target} = q.layers[{names[0]!r}]`.")
    raw = getattr(adata, "raw", None)
    if layer is None and raw is not None and _looks_like_counts(raw.X):
        return ("The model reads adata.X, as in training, and adata.raw looks like raw counts: "
                "pass `adata.raw.to_adata()` (genes are matched by name).")
    return f"The model reads {where}, as in training: pass an AnnData with raw counts there."


def _get_counts(adata, layer: str | None, trained: bool = False):
    if layer is None:
        X = adata.X
    else:
        if layer not in adata.layers:
            fix = (f"The model was trained on adata.layers[{layer!r}]: add the raw counts "
                   f"there, e.g. `adata.layers[{layer!r}] = adata.X.copy()` if X holds them."
                   if trained else "Pass layer= naming a layer that holds raw counts, or "
                   "layer=None for adata.X.")
            raise KeyError(
                f"Layer {layer!r} not found in adata.layers (available: {list(adata.layers)}). "
                + fix)
        X = adata.layers[layer]
    if X is None:
        fix = ("The model was trained on adata.X: put the raw counts there, e.g. "
               "`adata.X = adata.layers['counts']`." if trained else
               "Pass layer= naming the layer with counts.")
        raise ValueError(f"adata.X is None. {fix}")
    if hasattr(X, "to_memory"):  # backed sparse dataset
        X = X.to_memory()
    return X


def _as_float32(X, copy: bool = True):
    """Counts as float32 CSR (sparse input) or a dense float32 array.

    A new array unless ``copy=False`` and ``X`` already is canonical float32 CSR (sorted,
    no duplicates) or a dense float32 array: then ``X`` itself, to be read only (for CSR,
    its values and indices, with an ``indptr`` of their dtype: :func:`_matched_index_dtypes`).
    """
    dtype = np.dtype(getattr(X, "dtype", np.float32))
    if dtype.kind not in "biuf":  # e.g. object/str columns would fail inside numpy, unclearly
        raise ValueError(
            f"The count matrix has dtype {dtype}; counts must be numeric (integer, float or "
            "bool). Convert it after checking what it holds, e.g. "
            "`adata.X = adata.X.astype(np.float32)`."
        )
    if not copy and dtype == np.float32:
        if sp.issparse(X) and X.format == "csr":
            X = _matched_index_dtypes(X)
            if X.has_canonical_format:
                return X
        # (rows read in place; a reversed view, adata[::-1], has strides torch cannot take)
        if isinstance(X, np.ndarray) and (X.flags.c_contiguous or X.flags.f_contiguous):
            return X
    if sp.issparse(X):
        X = _matched_index_dtypes(sp.csr_matrix(X, dtype=np.float32, copy=True))
        X.sum_duplicates()
        return X
    return np.array(X, dtype=np.float32, copy=True)


def _matched_index_dtypes(X: sp.csr_matrix) -> sp.csr_matrix:
    """``X``, or a matrix sharing its values and indices whose ``indptr`` has the indices' dtype.

    anndata reads CSR counts with int64 ``indptr`` and int32 ``indices``. scipy's compiled
    routines (its canonical-format check, the row gather of :func:`_csr_rows`) convert such
    a pair to int64 first: a copy of all the indices, 8 bytes per non-zero, on every call.
    That made each evaluation batch of 100k cells read from an .h5ad cost 26 ms where 0.05
    ms do, and a check of 1M cells take 1.1 GB. Only ``indptr`` (one entry per cell) is
    converted here; the user's matrix is left as it is. Only that pair: for int32
    ``indptr`` with int64 indices, scipy's constructor would narrow the indices to int32 (a
    copy of them all), where its routines widen just ``indptr``, one entry per cell.
    """
    if (X.indptr.dtype != np.int64 or X.indices.dtype != np.int32
            or X.nnz > np.iinfo(np.int32).max):
        return X
    return sp.csr_matrix((X.data, X.indices, X.indptr.astype(X.indices.dtype)),
                         shape=X.shape, copy=False)


# The share of a model's genes that prepare_query_anndata pads with zeros by default.
PAD_LIMIT = 0.25


def _select_genes(X, have: pd.Index, want: list[str], obs_names: pd.Index | None = None):
    if have.tolist() == want:  # the usual case (string names in the model's order): no loop
        return X
    have_list = [str(v) for v in have]
    if have_list == want:
        return X
    have_set, want_set = set(have_list), set(want)
    missing = [g for g in want if g not in have_set]
    if missing:
        raise ValueError(_missing_genes_message(missing, want, have_list, want_set, obs_names))
    order = gene_positions(have_list, want)
    if sp.issparse(X):
        return sp.csr_matrix(X)[:, order]
    return np.take(np.asarray(X), order, axis=1)  # ~6x faster than X[:, order] row-major


def gene_positions(have_list: list[str], want: list[str]) -> np.ndarray:
    """Where each of a model's genes ``want`` is in ``have_list`` (−1 where it is absent).

    Duplicated names are refused only among the model's genes: one the model does not use
    (e.g. a symbol twice in a full matrix evaluated with an HVG model) leaves the match
    unambiguous.
    """
    have = pd.Index(have_list)
    if not have.has_duplicates:
        return have.get_indexer(want)
    want_set = set(want)
    dups = [g for g in have[have.duplicated()].unique() if g in want_set]
    if dups:
        raise ValueError(
            f"{len(dups)} of the model's genes appear more than once in var_names (e.g. "
            f"{dups[:5]}): which column to read is ambiguous. Keep one of each, e.g. "
            "`adata = adata[:, ~adata.var_names.duplicated()]`.")
    mask = have.isin(want_set)
    sub = have[mask].get_indexer(want)
    return np.where(sub >= 0, np.flatnonzero(mask)[sub], -1)


def _missing_genes_message(missing: list[str], want: list[str], have_list: list[str],
                           want_set: set[str], obs_names: pd.Index | None,
                           backed: bool = False) -> str:
    """What is wrong when an AnnData lacks some of a model's genes, and the fix that fits
    (``backed``: for counts read from a file, a padded file to write)."""
    extra = [g for g in have_list if g not in want_set]
    also = (f"; it also has {len(extra)} gene{'s' * (len(extra) > 1)} the model does not "
            f"know (e.g. {extra[:5]})" if extra else "")
    head = f"The AnnData lacks {len(missing)} of the model's {len(want)} genes (e.g. {missing[:5]}){also}."
    if (len(missing) == len(want) and obs_names is not None
            and len(want_set.intersection(map(str, obs_names))) >= len(want) // 2):
        return (f"{head} Its cells are named like the model's genes: it looks transposed "
                "(genes × cells). Pass `adata.T` (cells must be rows, as in scanpy).")
    filtered = ("If genes were filtered after training (e.g. sc.pp.filter_genes), evaluate "
                "the AnnData from before the filter, then subset its cells.")
    if len(missing) > PAD_LIMIT * len(want):
        return (f"{head} That is too many to pad with zero counts (over "
                f"{PAD_LIMIT:.0%}): pass cells measured on the model's genes. {filtered}")
    if backed:
        return (f"{head} Write a file with the model's genes, the missing ones as zero counts: "
                "`SCVAE.prepare_query_anndata(adata.to_memory(), model).write_h5ad(path)`. "
                f"{filtered}")
    return (f"{head} To add the missing ones as zero counts (and drop the others): "
            f"`adata = SCVAE.prepare_query_anndata(adata, model)`. {filtered}")


def _integral_text(v) -> str:
    """A label as text, an integral float as its integer ("1", not "1.0")."""
    return str(int(v)) if isinstance(v, (float, np.floating)) and float(v).is_integer() else str(v)


def _label_text(col: pd.Series, known: list[str] | None = None) -> Callable[[Any], str]:
    """How to write ``col``'s labels as text: ``str``, or for float labels
    :func:`_integral_text`, so that labels stored as floats (integers after a merge that
    introduced NaN) match the same labels stored as integers. With ``known`` categories (a
    trained model's), whichever of the two matches more of them: a model saved with "1.0"
    still reads its own labels."""
    values = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else col
    if values.dtype.kind != "f":
        return str
    if known is not None:
        plain, integral = (sum(f(v) in known for v in values.unique())
                           for f in (str, _integral_text))
        if plain > integral:
            return str
    return _integral_text


def _check_no_missing_labels(col: pd.Series, key: str) -> None:
    if col.isna().any():
        raise ValueError(
            f"obs[{key!r}] has {int(col.isna().sum())} missing label(s). Give those cells a "
            "label of their own (e.g. 'unknown') or drop them."
        )


def _warn_if_continuous_labels(col: pd.Series, key: str, role: str) -> None:
    """A float column with a label for nearly every cell (percent_mito as batch_key) makes
    each value its own batch: one-hot columns the model cannot learn anything from."""
    n_labels, n = col.nunique(), len(col)
    if col.dtype.kind == "f" and n_labels > max(20, n // 10):
        warnings.warn(
            f"{role} {key!r} holds {n_labels} distinct numbers among {n} cells: each becomes "
            f"its own category. If it is a measurement, pass it as "
            f"continuous_covariate_keys=[{key!r}] instead.", UserWarning, stacklevel=4)


def _categories(obs: pd.DataFrame, key: str, known: list[str] | None = None) -> list[str]:
    """The labels of ``obs[key]`` as text: a categorical's in its order (the used ones),
    others sorted; ``known``: see :func:`_label_text`."""
    col = obs[key]
    _check_no_missing_labels(col, key)
    text = _label_text(col, known)
    if isinstance(col.dtype, pd.CategoricalDtype):
        present = {text(c) for c in col.unique()}
        return [text(c) for c in col.cat.categories if text(c) in present]
    return sorted({text(v) for v in col.unique()})


def _encode(obs: pd.DataFrame, key: str, categories: list[str]) -> np.ndarray:
    if key not in obs.columns:
        raise KeyError(f"{key!r} is not a column of adata.obs; the model was set up with it.")
    col = obs[key]
    _check_no_missing_labels(col, key)
    text = _label_text(col, categories)
    # a dict over the distinct labels: pandas maps it in C, not one Python call per cell
    labels = (col.map({v: text(v) for v in col.unique()}).astype(str) if text is not str
              else col.astype(str))
    codes = pd.Categorical(labels, categories=categories).codes.astype(np.int64)
    if np.any(codes < 0):
        unseen = sorted(set(labels) - set(categories))
        raise ValueError(
            f"obs[{key!r}] has categories the model was not trained on: {unseen[:5]} "
            f"(known: {categories[:10]}). Map those cells to a known category, or use "
            "`SCVAE.load_query` to extend a reference model with new batches."
        )
    return codes


def _warn_if_unscaled(values: np.ndarray, key: str) -> None:
    """Warn when a continuous covariate is far from unit scale. The networks take it as it
    is (as scvi-tools does), and a covariate in the thousands (a cell's total counts, say)
    dominates the first layer: on 500 pbmc3k cells (80 epochs), a raw library-size
    covariate lowered the held-out ELBO from −762 to −912 nats per cell."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return
    if finite.size > 1 and finite.min() == finite.max():  # standardising would divide by 0
        warnings.warn(
            f"The continuous covariate obs[{key!r}] is {finite[0]:.6g} in every cell: it "
            "adds nothing the networks' biases do not, and its weights stay untrained for "
            "cells (a query) where it varies. Leave it out of continuous_covariate_keys.",
            UserWarning, stacklevel=4)
        return
    scale = max(float(np.abs(finite.mean())), float(finite.std()))
    if scale > 10:
        warnings.warn(
            f"The continuous covariate obs[{key!r}] is far from unit scale (mean "
            f"{finite.mean():.3g}, sd {finite.std():.3g}); the networks take it as it is. "
            "Standardise it for stable training, e.g. "
            f"`adata.obs['{key}_z'] = (adata.obs[{key!r}] - adata.obs[{key!r}].mean()) / "
            f"adata.obs[{key!r}].std()` (or log it first for counts), and pass that column.",
            UserWarning, stacklevel=4)


def _numeric_obs(obs: pd.DataFrame, key: str, set_up_as: str | None = None) -> np.ndarray:
    """``obs[key]`` as float64 numbers; ``set_up_as``: the argument that named the column
    when the model was set up (evaluating other cells: the error says the model needs it)."""
    if key not in obs.columns:
        available = list(obs.columns)
        if set_up_as is None:
            raise KeyError(f"{key!r} is not a column of adata.obs (available: {available}).")
        fix = (f"each cell's library size in counts, e.g. `adata.obs[{key!r}] = "
               "np.asarray(adata[:, model.var_names].X.sum(axis=1)).ravel()`"
               if set_up_as == "size_factor_key" else "the same covariate as in training")
        raise KeyError(f"The model was set up with {set_up_as}={key!r}, and this AnnData's obs "
                       f"has no such column (available: {available[:10]}); add {fix}.")
    if obs[key].dtype.kind in "mM":  # numbers in nanoseconds: ~1e18, and training diverges
        raise ValueError(
            f"obs[{key!r}] holds dates or durations (dtype {obs[key].dtype}); a continuous "
            "covariate must be a number on a scale near 1. Convert it, e.g. to days: "
            f"`(adata.obs[{key!r}] - adata.obs[{key!r}].min()).dt.days` for dates, "
            f"`adata.obs[{key!r}].dt.total_seconds() / 86400` for durations.")
    try:
        return obs[key].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"obs[{key!r}] must be numeric; it has dtype {obs[key].dtype}.") from err


def _csr_positions(X: sp.csr_matrix, rows: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the given rows of a CSR matrix: (output row of each stored entry, its position,
    the number of entries of each row).

    Vectorised (no per-row Python): positions are ``indptr[row] + k`` for ``k < row length``.
    """
    starts = X.indptr[rows].astype(np.int64)
    lengths = X.indptr[rows + 1].astype(np.int64) - starts
    out_row = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    offsets = np.cumsum(lengths) - lengths  # where each row's entries begin in the output
    pos = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(offsets - starts, lengths)
    return out_row, pos, lengths


def _csr_rows(X: sp.csr_matrix, rows: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The stored entries of some rows of a CSR matrix, row after row: (genes, values,
    output row of each entry, the number of entries of each row).

    The genes keep scipy's index type. scipy's own C++ row gather copies each row's run in
    one go, about 4× faster than gathering at :func:`_csr_positions` with numpy (which
    remains the fallback, should that private function ever change).
    """
    starts = X.indptr[rows]
    lengths = (X.indptr[rows + 1] - starts).astype(np.int64)
    out_row = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    if _csr_row_index is not None:
        n = int(lengths.sum())
        cols, values = np.empty(n, X.indices.dtype), np.empty(n, X.data.dtype)
        try:
            _csr_row_index(len(rows), np.asarray(rows, dtype=X.indptr.dtype), X.indptr,
                           X.indices, X.data, cols, values)
            return cols, values, out_row, lengths
        except (TypeError, ValueError):  # pragma: no cover - an incompatible scipy
            pass
    _, pos, _ = _csr_positions(X, rows)
    return X.indices[pos], X.data[pos], out_row, lengths


def _take(a: torch.Tensor, sel: slice | torch.Tensor) -> torch.Tensor:
    """Rows ``sel`` of ``a``: a view for a slice, one ``index_select`` for row indices."""
    return a[sel] if isinstance(sel, slice) else a.index_select(0, sel)


def _torch_csr_rows(X: sp.csr_matrix, rows: np.ndarray, start: int, end: int,
                    in_order: bool) -> torch.Tensor:
    """Rows of a scipy CSR matrix as a torch sparse CSR tensor (contiguous rows: no copy).

    The indices keep scipy's int32 when they fit: no conversion pass, and torch's sparse
    product is as fast with them.
    """
    index_dtype = np.int32 if X.indices.dtype == np.int32 else np.int64
    if in_order:
        lo, hi = X.indptr[start], X.indptr[end]
        indptr = (X.indptr[start:end + 1] - lo).astype(index_dtype)
        cols, vals = X.indices[lo:hi], X.data[lo:hi]
    else:
        cols, vals, _, counts = _csr_rows(X, rows)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(index_dtype)
    with warnings.catch_warnings():  # torch's one-time "sparse CSR is in beta" notice
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(indptr),
                                       torch.from_numpy(cols.astype(index_dtype, copy=False)),
                                       torch.from_numpy(vals), size=(len(rows), X.shape[1]),
                                       check_invariants=False)


def _to_device(a: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: from pinned memory without blocking on CUDA.

    Elsewhere an ordinary copy: the batch arrays are temporaries, freed at the next
    iteration, and MPS's non-blocking copy of unpinned memory can read them after that
    (pytorch/pytorch#189690: silently wrong values)."""
    if device.type != "cuda":
        return a.to(device)
    return a.pin_memory().to(device, non_blocking=True)


def _block_entries(X: sp.csr_matrix, rows: np.ndarray, device: torch.device | None = None,
                   whole: bool = False) -> tuple[np.ndarray, ...]:
    """The stored entries of some rows, as the fields of
    :class:`~scvae_tools.fused.NonZeros`: flat positions (int64) in the rows × genes block,
    values, block rows, genes (scipy's index type), row lengths and, for a CPU ``device``,
    the table slots: only the torch code of the CPU likelihood reads them, not the compiled
    kernel (:mod:`~scvae_tools.native`) when it serves. Without a device: no slots.
    ``whole``: as for :func:`~scvae_tools.fused.table_slots`."""
    cols, values, out_row, lengths = _csr_rows(X, rows)
    flat = out_row * X.shape[1]
    flat += cols
    slots = (table_slots(cols, values, whole)
             if device is not None and device.type == "cpu" and native.library() is None
             else ())
    return (flat, values, out_row, cols, lengths, *slots)


def _nonzeros_on(entries: tuple[np.ndarray, ...], device: torch.device) -> NonZeros:
    """:func:`_block_entries` as a :class:`~scvae_tools.fused.NonZeros` on ``device``."""
    return NonZeros(*(_to_device(torch.from_numpy(a), device) for a in entries))


def _dense_rows(X, rows: np.ndarray, entries: tuple[np.ndarray, ...] | None = None
                ) -> np.ndarray:
    """Rows of ``X`` as a dense float32 block (for CSR, one vectorised 1-D scatter, about
    4× faster than a 2-D one; ``entries``: :func:`_block_entries` of these rows when the
    caller has them)."""
    if sp.issparse(X):
        flat, values = (_block_entries(X, rows) if entries is None else entries)[:2]
        block = np.zeros(len(rows) * X.shape[1], dtype=np.float32)
        block[flat] = values  # canonical CSR: no duplicate positions
        return block.reshape(len(rows), X.shape[1])
    return np.asarray(X[rows])


def _gather_csr_on_device(
    t: dict[str, torch.Tensor], rows: torch.Tensor, n_entries: int, n_genes: int,
    nonzero: bool = False,
) -> tuple[torch.Tensor, NonZeros | None]:
    """Dense block of ``rows`` (on the device) from CSR arrays resident there, and with
    ``nonzero`` the block's :class:`~scvae_tools.fused.NonZeros`.

    Everything runs on the device: no per-batch host work or copy. ``n_entries``, the
    number of stored entries in these rows, comes from the host's ``indptr``; given as the
    output size of ``repeat_interleave`` it spares the device a size report, so the host
    never waits.
    """
    device = rows.device
    starts = t["x_indptr"].index_select(0, rows)
    lengths = t["x_indptr"].index_select(0, rows + 1).sub_(starts)
    n = len(rows)
    out_row = torch.repeat_interleave(torch.arange(n, device=device), lengths,
                                      output_size=n_entries)
    # Entry k of the output is stored at starts[row] + (k − the row's first output entry).
    shift = starts.sub_(torch.cumsum(lengths, 0).sub_(lengths))
    pos = torch.arange(n_entries, device=device).add_(
        torch.repeat_interleave(shift, lengths, output_size=n_entries))
    cols = t["x_indices"].index_select(0, pos)
    values = t["x_data"].index_select(0, pos)
    flat = out_row * n_genes + cols
    block = torch.zeros(n * n_genes, dtype=values.dtype, device=device)
    block.index_copy_(0, flat, values)  # canonical CSR: each position once
    nz = NonZeros(flat, values, out_row, cols, lengths) if nonzero else None
    return block.view(n, n_genes), nz
