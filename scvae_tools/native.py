"""Compiled CPU kernels for the NB likelihood, for inference and for the count checks,
built with the system's C compiler on first use.

On a CPU, the element-wise work of :mod:`~scvae_tools.fused`'s likelihood (a log-softmax,
logs and exponentials, the gamma-function terms and both gradients) takes about a third of a
training step as ~30 torch kernels, each a pass over the cells × genes block.
``nb_kernel.c`` (next to this file) does the same work in one pass per cell, vectorised with
glibc's vector maths, and split over torch's threads (:func:`nb_rows`). The same library
serves inference and data set-up:

- :func:`log1p_linear_csr`: the encoder's first layer on sparse counts, log1p and the
  product in one cache-blocked pass;
- :func:`softmax_scale_`: the softmax and scaling of denoised expression, with one read
  and one write of each row;
- :func:`count_check`: a count matrix's value checks and row sums in one read.

The kernel is compiled the first time it is needed (well under a second with ``gcc``) into
``$SCVAE_TOOLS_KERNEL_DIR``, else ``$XDG_CACHE_HOME/scvae_tools/kernels`` (by default
``~/.cache/scvae_tools/kernels``). The file name hashes the source, the compiler, its flags
and the CPU, so a cache shared by different machines never loads code built for another
CPU. Later processes load the cached library.

It is optional. It is used on Linux x86-64 with glibc and ``gcc``, for float32 on the CPU:
the NB and ZINB likelihoods with any dispersion (per gene, per gene and batch, per cell),
the rest for any model.
Everywhere else, or when compilation fails, or with ``SCVAE_TOOLS_NATIVE=0``, the torch
(or numpy) code runs instead. The two agree to float32 rounding: a check at first use, and
the tests, compare them.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

F32 = torch.float32  # the kernels' buffers, whatever torch's default dtype

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("nb_kernel.c")
# IEEE maths except the reassociation that lets sums vectorise; no -ffinite-math-only, so
# NaN and inf still propagate (the training loop's divergence checks rely on them). Where the
# CPU has AVX-512, use the full width: GCC otherwise prefers 256-bit vectors, and calls
# glibc's 8-wide expf/logf instead of the 16-wide ones (the expression softmax: 2.6 → 1.95
# ms per 4,096 × 2,000 block here; a no-op on CPUs without AVX-512).
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno",
         "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros", "-fPIC", "-shared")

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None, "reason": why not


def cache_dir() -> Path:
    """Where compiled kernels are kept (see the module docstring)."""
    env = os.environ.get("SCVAE_TOOLS_KERNEL_DIR")
    if env:
        return Path(env).expanduser()
    return user_cache_dir() / "kernels"


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/scvae_tools``, or ``~/.cache/scvae_tools`` when that is unset, empty
    or relative (as the XDG spec says: an empty value is not the current directory)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "scvae_tools"


def enabled() -> bool:
    """False when ``SCVAE_TOOLS_NATIVE`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get("SCVAE_TOOLS_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _unsupported() -> str | None:
    """Why this platform cannot build the kernel, or None."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs Linux on x86-64, not {sys.platform} on {platform.machine()}"
    if platform.libc_ver()[0] != "glibc":
        return "needs glibc (its vector maths library)"
    if shutil.which("gcc") is None:
        return "no gcc on PATH"
    return None


def _cpu_signature() -> str:
    """The CPU's model and feature flags (-march=native builds for exactly these)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(keep))  # one copy per distinct line, in order


def _torch_openmp() -> bool:
    """Whether torch runs on GNU OpenMP (``libgomp``) in this process.

    Then the kernel is built with ``-fopenmp``: its ``libgomp.so.1`` resolves to the copy
    torch loaded, and its parallel region runs on torch's threads, still spinning from the
    decoder's product just before. (Python threads would cost ~0.1 ms to wake per call
    here; a second OpenMP runtime would fight torch's threads for the cores.)
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "libgomp" in maps and "OpenMP" in torch.__config__.parallel_info()


def _build() -> Path:
    """The compiled library's path, compiling it first if the cache lacks an intact copy.

    Cached as ``nb_kernel-<key>-<content hash>.so`` (key: source, compiler, flags and CPU):
    a file whose bytes do not match its name (truncated by a crash, zero bytes, another
    build copied over it) is deleted and rebuilt, since loading a truncated library kills
    the process (SIGBUS) and another source's lacks symbols.
    """
    gcc = shutil.which("gcc")
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    flags = FLAGS + (("-fopenmp",) if _torch_openmp() else ())
    key = hashlib.sha256("\0".join(
        [SOURCE.read_text(), version, " ".join(flags), _cpu_signature()]).encode()).hexdigest()
    folder = cache_dir()
    prefix = f"nb_kernel-{key[:20]}-"
    for path in sorted(folder.glob(f"{prefix}*.so")):
        if _intact(path):
            return path
        with contextlib.suppress(OSError):  # another process may have removed it already
            path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: concurrent processes never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        proc = subprocess.run([gcc, *flags, str(SOURCE), "-o", tmp, "-lm"],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"gcc failed: {proc.stderr.strip()[-2000:]}")
        data = Path(tmp).read_bytes()
        if data[:4] != _ELF:
            raise RuntimeError(f"gcc wrote no shared library ({len(data)} bytes)")
        # mkstemp's 0600 would keep the library from other users of a shared cache.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)
        with open(tmp, "rb") as f:  # on disk before the name says it is complete
            os.fsync(f.fileno())
        target = folder / f"{prefix}{_content_hash(data)}.so"
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_ELF = b"\x7fELF"


def _content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _intact(path: Path) -> bool:
    """Whether a cached library holds the bytes its name was given for (a shared library)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return data[:4] == _ELF and path.stem.rsplit("-", 1)[-1] == _content_hash(data)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.nb_table_counts.restype = ctypes.c_int
    lib.nb_table_counts.argtypes = []
    lib.nb_tables.restype = None
    lib.nb_tables.argtypes = [i64, ptr, ptr, ptr]
    lib.nb_block.restype = None
    lib.nb_block.argtypes = [i64, i64, ctypes.c_int] + [ptr] * 5 + [i64] + [ptr] * 12
    lib.softmax_scale_rows.restype = None
    lib.softmax_scale_rows.argtypes = [i64, i64, ctypes.c_int, ptr, ptr, i64]
    lib.count_check_rows.restype = ctypes.c_int
    lib.count_check_rows.argtypes = [i64, ctypes.c_int, ptr, i64, ptr, ptr]
    lib.bag_log1p_rows.restype = ctypes.c_int
    lib.bag_log1p_rows.argtypes = [i64, i64, i64, ctypes.c_int] + [ptr] * 7 + [i64, ptr]
    lib.bag_tile_rows.restype = ctypes.c_int
    lib.bag_tile_rows.argtypes = []
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when it is disabled or cannot be built
    (:func:`reason` says why). Built and loaded once per process."""
    if not enabled():
        return None
    if "lib" in _state:  # the per-batch path: no lock once decided
        return _state["lib"]
    with _lock:
        if "lib" not in _state:
            why = _unsupported()
            lib = None
            if why is None:
                try:
                    lib = _declare(ctypes.CDLL(str(_build())))
                # AttributeError: a library without one of the kernel's symbols
                except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as err:
                    why = f"could not build or load {SOURCE.name}: {err}"
            if why is not None:
                log.info("scvae_tools: compiled NB kernel not used (%s); using torch.", why)
            _state.update(lib=lib, reason=why)
        return _state["lib"]


def reason() -> str | None:
    """Why the kernel is not in use (None when it is, or before first use)."""
    if not enabled():
        return "disabled by SCVAE_TOOLS_NATIVE"
    return _state.get("reason")


def disable(why: str) -> None:
    """Stop using the kernel in this process (for instance after a failed self-check)."""
    with _lock:
        _state.update(lib=None, reason=why)


def nb_rows(
    logits: torch.Tensor,
    log_library: torch.Tensor,
    log_theta: torch.Tensor,
    x: torch.Tensor,
    starts: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    want_grads: bool,
    pi_logits: torch.Tensor | None = None,
    theta_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """:func:`~scvae_tools.fused._nb_core` in the compiled kernel.

    ``logits``, ``x``: (rows × genes) float32; ``log_library``: (rows, ) or (rows, 1);
    ``log_theta``: (genes, ), or (T × genes) with ``theta_index`` (rows, int64) giving the
    row of it each row uses (a dispersion per batch, or per cell with T = rows; each in
    ``0 … T − 1``, which the kernel does not check); the
    non-zeros of row r are entries ``starts[r]`` to ``starts[r+1] − 1`` of ``cols`` (int64)
    and ``values`` (float32). All on the CPU.
    Returns the per-row log-likelihood and, with ``want_grads``, −∂ll/∂logits and G with
    −∂ll/∂log θ = θ·G (rows × genes, as ``_nb_core``). With ``pi_logits`` (rows × genes),
    the zero-inflated NB, and a fourth result, −∂ll/∂pi_logits (as ``_zinb_core_torch``).
    Call only when :func:`library` is not None.
    """
    lib = library()
    n_rows, n_genes = logits.shape
    logits, x = logits.contiguous(), x.contiguous()
    log_library = log_library.reshape(-1).contiguous()
    log_theta = log_theta.reshape(-1, n_genes).contiguous()
    theta = log_theta.exp()
    starts, cols, values = starts.contiguous(), cols.contiguous(), values.contiguous()
    if theta_index is not None:  # read unchecked: the public functions of fused check it
        theta_index = theta_index.to(torch.int64).contiguous()
    n_tab = theta.numel()
    k = lib.nb_table_counts()
    # Tables of log Γ / ψ differences for small counts: (k + 1) values per θ, worth making
    # when each θ serves several rows (per gene, per batch), not for one θ per cell.
    lg_tab = dg_tab = None
    if len(log_theta) * 4 <= max(n_rows, 4):
        lg_tab = torch.empty(k + 1, n_tab, dtype=F32)
        dg_tab = torch.empty(k + 1, n_tab, dtype=F32)
        lib.nb_tables(n_tab, theta.data_ptr(), lg_tab.data_ptr(), dg_tab.data_ptr())
    ll = torch.empty(n_rows, dtype=F32)
    g_logits = torch.empty(n_rows, n_genes, dtype=F32) if want_grads else None
    g_lt = torch.empty(n_rows, n_genes, dtype=F32) if want_grads else None
    if pi_logits is not None:
        pi_logits = pi_logits.contiguous()
    g_pi = torch.empty(n_rows, n_genes, dtype=F32) if want_grads and pi_logits is not None else None
    n_threads = torch.get_num_threads()
    scratch = torch.empty(n_threads, n_genes, dtype=F32)
    def ptrs(*tensors):
        return [None if t is None else t.data_ptr() for t in tensors]

    lib.nb_block(n_rows, n_genes, n_threads,
                 *ptrs(logits, log_library, theta, log_theta, theta_index), n_tab,
                 *ptrs(x, starts, cols, values, lg_tab, dg_tab, ll, g_logits, g_lt, scratch,
                       pi_logits, g_pi))
    return (ll, g_logits, g_lt) if pi_logits is None else (ll, g_logits, g_lt, g_pi)


@torch.compiler.disable
def softmax_scale_(out: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``out ← scale · softmax(out, dim=1)`` in place, for a contiguous float32 CPU matrix.

    ``scale``: a number, or one value per row (``(rows, )`` or ``(rows, 1)``). Each row is
    read from memory and written back once; torch's in-place ``exp_``, ``sum`` and ``mul_``
    make five passes over a block much larger than the caches. The row maximum is
    subtracted first, as in ``torch.softmax``. Call only when :func:`library` is not None.
    """
    lib = library()
    n_rows, n_genes = out.shape
    if not out.is_contiguous():
        raise ValueError("softmax_scale_ needs a contiguous matrix")
    per_row = isinstance(scale, torch.Tensor) and scale.numel() != 1  # (0 for 0 rows)
    factors = (scale.reshape(-1).to(torch.float32).contiguous() if per_row
               else torch.tensor([float(scale)], dtype=torch.float32))
    if per_row and len(factors) != n_rows:
        raise ValueError(f"{len(factors)} scale factors for {n_rows} rows")
    lib.softmax_scale_rows(n_rows, n_genes, torch.get_num_threads(), out.data_ptr(),
                           factors.data_ptr(), 1 if per_row else 0)
    return out


# What count_check_rows reports about the values (bits of its return value).
NONFINITE, NEGATIVE, FRACTIONAL = 1, 2, 4


def count_check(X) -> tuple[np.ndarray, int]:
    """Row sums of a float32 count matrix and what is wrong with its values, in one read.

    ``X``: a scipy CSR matrix or a C-contiguous 2-d numpy array, float32. Returns the
    row sums (float32, accumulated in double: exact for whole counts) and the bits
    :data:`NONFINITE`, :data:`NEGATIVE` and :data:`FRACTIONAL` found among the values
    (0 when all are whole, non-negative and finite). ``X`` is only read. Call only when
    :func:`library` is not None.
    """
    lib = library()
    if isinstance(X, np.ndarray):
        if X.ndim != 2 or X.dtype != np.float32 or not X.flags.c_contiguous:
            raise ValueError("count_check needs a C-contiguous float32 matrix")
        n_rows, n_cols = X.shape
        indptr, data = None, X
    else:  # CSR
        if X.format != "csr" or X.dtype != np.float32:
            raise ValueError("count_check needs float32 CSR or dense counts")
        n_rows, n_cols = X.shape
        indptr = np.ascontiguousarray(X.indptr, dtype=np.int64)
        data = np.ascontiguousarray(X.data)
    totals = np.empty(n_rows, dtype=np.float32)
    flags = lib.count_check_rows(n_rows, torch.get_num_threads(),
                                 None if indptr is None else indptr.ctypes.data, n_cols,
                                 data.ctypes.data, totals.ctypes.data)
    return totals, int(flags)


# ctypes calls pass raw pointers: torch.compile must run them as they are, not trace them
# (the encoder and decoder it compiles reach these two at inference).
@torch.compiler.disable
def log1p_linear_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                     table: torch.Tensor, bias: torch.Tensor) -> torch.Tensor | None:
    """``bias + log1p(X) @ table`` for the CSR matrix X (``crow``, ``col``, ``values``).

    The encoder's first layer at inference: ``table`` is its gene weights as a contiguous
    genes × hidden float32 matrix (hidden a multiple of 16), ``values`` float32. Does what
    ``F.embedding_bag(col, table, crow, mode="sum", per_sample_weights=log1p(values))``
    does, about twice as fast: a tile of cells keeps each cell's outputs in registers while
    a block of genes' rows of ``table`` stays in cache. Returns None when some row's columns
    are not in ascending order (the caller then uses the embedding bag). Call only when
    :func:`library` is not None.
    """
    lib = library()
    n_rows, n_hidden = len(crow) - 1, table.shape[1]
    if n_hidden % 16 or table.dtype != torch.float32 or values.dtype != torch.float32:
        raise ValueError("log1p_linear_csr needs float32 values and a float32 table whose "
                         "width is a multiple of 16")
    crow = crow.to(torch.int64).contiguous()
    col = col.to(torch.int32).contiguous()
    values, table, bias = values.contiguous(), table.contiguous(), bias.contiguous()
    tile = lib.bag_tile_rows()
    # Weights buffer: the non-zeros of the largest run of `tile` rows, per thread.
    widest = int((crow[tile:] - crow[:-tile]).max()) if n_rows > tile else int(crow[-1] - crow[0])
    n_threads = torch.get_num_threads()
    w = torch.empty(n_threads, max(widest, 1), dtype=F32)
    cursor = torch.empty(n_threads, tile, dtype=torch.int64)
    out = torch.empty(n_rows, n_hidden, dtype=F32)
    descending = lib.bag_log1p_rows(n_rows, table.shape[0], n_hidden, n_threads, crow.data_ptr(),
                                    col.data_ptr(), values.data_ptr(), table.data_ptr(),
                                    bias.data_ptr(), out.data_ptr(), w.data_ptr(), w.shape[1],
                                    cursor.data_ptr())
    return None if descending else out
