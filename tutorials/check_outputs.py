"""Check that the committed tutorial outputs are not stale.

The notebooks are committed with the outputs of a full-mode run, and their markdown quotes
numbers from those outputs. CI executes them in fast mode only, so a package change that moves
the full-mode numbers goes unnoticed there. This module executes a notebook in full mode and
compares the numbers printed by each code cell (stream and ``text/plain`` outputs) with the
committed ones; it also reports markdown numbers that were read off the committed outputs and
no longer appear in the fresh ones.

Run from the repository root, before a release or after a change that can move results::

    python tutorials/check_outputs.py                      # all four notebooks
    python tutorials/check_outputs.py 03_embedded_pbmc68k  # by name, with or without .ipynb
    python tutorials/check_outputs.py --refresh 03_embedded_pbmc68k  # re-execute in place

A refresh stamps the notebook's metadata with the machine that made its outputs (CPU,
thread count, library versions); on another machine the numbers can differ for that reason
alone, and the check says so.

``tests/test_tutorials.py`` imports it for a ``slow`` test on the quickest notebook.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

TUTORIALS = Path(__file__).resolve().parent

# The kernel's thread count: the float summation order depends on it, and notebook 02's
# diagnostics (Monte Carlo estimates on 70 to 240 cells) amplify that: run with 1 thread
# instead of 2, its per-type gap means moved by up to 8 %, "140 cells" became 144. The
# committed outputs come from 2 threads; the check uses the same.
THREADS = 2
# Tolerances. With the same thread count, executions here reproduced the committed outputs
# of all four notebooks (01 up to one unit in the last printed digit: ARI 0.647 / 0.648), and
# 03 printed identical numbers with 1 and 2 threads. RTOL leaves room for another CPU's
# roundings (BLAS, SIMD width) amplified by training; a package change that moves results
# moves them by more, or changes an integer (the early-stopping epoch, a count, a number of
# clusters), which must match exactly.
RTOL = 0.005
ATOL = 1e-3

# A number: optional sign (ASCII or Unicode minus, not after a word character, so that the
# "-1" of a barcode is not one), digits with optional thousands separators, decimals and
# exponent; not part of a word ("CD14", "scvae_1", "int64") nor of a version ("0.1.0").
_NUMBER = re.compile(
    r"(?:(?<![\w.])[-−]|(?<![\w.\-−]))"
    r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
    r"(?![\w]|\.\d)"
)
# Machine- or time-dependent text, removed before numbers are read.
_VOLATILE = [
    re.compile(r"\b\d{4}-\d{2}-\d{2}\b"),  # dates
    re.compile(r"\b\d{1,2}:\d{2}(?::\d{2})?(?:\.\d+)?\b"),  # clock times, durations
    re.compile(r"\b0x[0-9a-fA-F]+\b"),  # object addresses
    re.compile(  # durations, speeds and memory sizes
        r"\d+(?:\.\d+)?\s*(?:s/it|it/s|epoch/s|ms|µs|us|ns|s|sec|seconds?|min|minutes?|h|"
        r"hours?|[KMGT]i?B|bytes)\b"
    ),
    re.compile(r"(?<![\w+])(?:~|\.{1,2})?/[^\s'\",)\]]+"),  # paths
]
# Table columns that hold times or memory.
_VOLATILE_COLUMN = re.compile(
    r"(?<!\S)(?:seconds|secs?|time|elapsed|duration|runtime|wall_?time|memory|mem)(?=\s|\\|$)",
    re.IGNORECASE,
)
# tqdm's bar: "Training:  66%|██▋  | 95/143 [00:03<00:01, 30.67epoch/s, elbo=-624.4, val=-670.3]".
# Steps done and total (where early stopping ended) and the postfix values are results; the
# elapsed and remaining time and the speed are not.
_PROGRESS = re.compile(
    r"\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*\[[^\],]*(?:,[^,\]]*/s)?(?P<postfix>[^\]]*)\]"
)


@dataclass(frozen=True)
class Number:
    """A number as printed: its value, its decimals and the line it was read from."""

    value: float
    decimals: int
    line: str

    def close_to(self, other: Number, rtol: float = RTOL, atol: float = ATOL) -> bool:
        """Whether two printed numbers agree within the tolerances.

        Integers (no decimal point: counts, epochs, cluster numbers) must be equal. Decimals may
        differ by ``atol + rtol·|value|``, or by one unit in the last printed digit (rounding
        turns any small change into such a step).
        """
        if self.decimals == 0 and other.decimals == 0:
            return self.value == other.value
        quantum = 10.0 ** -min(self.decimals, other.decimals)
        tol = max(atol + rtol * max(abs(self.value), abs(other.value)), quantum * 1.000001)
        return abs(self.value - other.value) <= tol


@dataclass
class StaleCell:
    """A code cell whose printed numbers differ between the stored and the fresh run."""

    index: int
    stored: list[Number]
    fresh: list[Number]
    differing: list[tuple[Number, Number]] = field(default_factory=list)

    def __str__(self) -> str:
        if len(self.stored) != len(self.fresh):
            return (f"cell {self.index}: {len(self.stored)} numbers stored, "
                    f"{len(self.fresh)} fresh\n  stored: {_lines(self.stored)}\n"
                    f"  fresh:  {_lines(self.fresh)}")
        rows = [f"  {_fmt(a)} -> {_fmt(b)}   [{a.line.strip()[:90]}]" for a, b in self.differing]
        return f"cell {self.index}: {len(self.differing)} numbers differ\n" + "\n".join(rows)


@dataclass(frozen=True)
class StaleQuote:
    """A markdown number that matched a stored output number and matches no fresh one."""

    index: int
    number: Number
    stored_match: Number

    def __str__(self) -> str:
        return (f"markdown cell {self.index}: quotes {_fmt(self.number)} "
                f"(stored output: {self.stored_match.line.strip()[:90]!r}), no fresh output has it")


def _fmt(n: Number) -> str:
    return f"{n.value:.{n.decimals}f}"


def _lines(numbers: list[Number]) -> str:
    return " | ".join(dict.fromkeys(n.line.strip()[:90] for n in numbers))


def numbers_in(text: str) -> list[Number]:
    """The numbers in ``text`` that are results, with time-, speed-, memory- and path-like
    parts removed first, and of a progress bar only its final step count and postfix."""
    out = []
    for raw in text.splitlines():
        line = raw.rsplit("\r", 1)[-1]  # what a terminal shows after carriage returns
        bar = _PROGRESS.search(line)
        if bar:
            line = f"{bar['n']}/{bar['total']} {bar['postfix']}"
        for pattern in _VOLATILE:
            line = pattern.sub(" ", line)
        for m in _NUMBER.finditer(line):
            token = m.group().replace("−", "-").replace(",", "")
            frac = re.match(r"-?\d+\.(\d+)", token)
            out.append(Number(float(token), len(frac.group(1)) if frac else 0, line))
    return out


def _drop_volatile_columns(text: str) -> str:
    """Blank the columns of a pandas text table whose header names a time or memory (the
    ``seconds`` of ``model.history``). pandas right-aligns headers and values, so a value
    belongs to the header that ends where it ends; a wide table is printed in blocks, each
    with its own header line, separated by blank lines."""
    out, ends = [], set()
    for line in text.split("\n"):
        if not line.strip():
            ends = set()
        else:
            heads = [m.end() for m in _VOLATILE_COLUMN.finditer(line)]
            if heads:
                ends = set(heads)
            elif ends:
                for m in reversed(list(re.finditer(r"\S+", line))):
                    if m.end() in ends:
                        line = line[: m.start()] + " " * len(m.group()) + line[m.end():]
        out.append(line)
    return "\n".join(out)


def cell_numbers(cell: nbformat.NotebookNode) -> dict[str, list[Number]]:
    """Numbers in a code cell's outputs, by kind: ``stdout``, ``stderr`` (separate, as the
    kernel may deliver the two streams in either order) and ``result`` (``text/plain`` of
    results and displays other than figures)."""
    out: dict[str, list[Number]] = {"stdout": [], "stderr": [], "result": []}
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            out[o["name"]] += numbers_in(o["text"])
        elif o["output_type"] in ("execute_result", "display_data"):
            data = o.get("data", {})
            if "text/plain" in data and not any(k.startswith("image/") for k in data):
                out["result"] += numbers_in(_drop_volatile_columns(data["text/plain"]))
    return out


def stale_cells(stored: nbformat.NotebookNode, fresh: nbformat.NotebookNode,
                rtol: float = RTOL, atol: float = ATOL) -> list[StaleCell]:
    """Code cells whose printed numbers differ between a stored and a freshly executed copy
    of the same notebook (a different count of numbers counts as a difference)."""
    if len(stored.cells) != len(fresh.cells):
        raise ValueError(f"{len(stored.cells)} cells stored, {len(fresh.cells)} fresh")
    out = []
    for i, (a, b) in enumerate(zip(stored.cells, fresh.cells, strict=True)):
        if a.cell_type != "code":
            continue
        na, nb = cell_numbers(a), cell_numbers(b)
        if any(len(na[k]) != len(nb[k]) for k in na):
            out.append(StaleCell(i, _flat(na), _flat(nb)))
            continue
        diff = [(x, y) for k in na for x, y in zip(na[k], nb[k], strict=True)
                if not x.close_to(y, rtol, atol)]
        if diff:
            out.append(StaleCell(i, _flat(na), _flat(nb), diff))
    return out


def _flat(numbers: dict[str, list[Number]]) -> list[Number]:
    return [n for k in numbers for n in numbers[k]]


def _quotes(quoted: Number, printed: Number) -> bool:
    # The text rounds: "−674" quotes -674.3, "0.91" quotes 0.907.
    if printed.decimals < quoted.decimals:
        return False
    return abs(printed.value - quoted.value) <= 0.5 * 10.0 ** -quoted.decimals * 1.000001


def stale_quotes(stored: nbformat.NotebookNode,
                 fresh: nbformat.NotebookNode) -> list[StaleQuote]:
    """Numbers in markdown cells that quote a stored output number and no fresh one.

    Only numbers with decimals or of at least three digits are considered: small integers
    ("4 resolutions", "30 epochs") match some output anywhere by chance.
    """
    printed_stored, printed_fresh = ([n for c in nb.cells if c.cell_type == "code"
                                      for n in _flat(cell_numbers(c))] for nb in (stored, fresh))
    out = []
    for i, cell in enumerate(stored.cells):
        if cell.cell_type != "markdown":
            continue
        for q in numbers_in(cell.source):
            if q.decimals == 0 and abs(q.value) < 100:
                continue
            match = next((p for p in printed_stored if _quotes(q, p)), None)
            if match is not None and not any(_quotes(q, p) for p in printed_fresh):
                out.append(StaleQuote(i, q, match))
    return out


# What the numbers depend on besides the package: the CPU (SIMD width and rounding of BLAS
# and of the compiled likelihood kernel, which is built for this CPU), the thread count and
# the versions of the libraries that train and cluster. Outputs made with another stack
# differ by more than rounding (a different early-stopping epoch moves everything after it),
# so comparing them says nothing about the package.
STACK_KEY = "scvae_tools_outputs_made_with"
_STACK_PACKAGES = ("torch", "numpy", "scipy", "anndata", "scanpy", "scikit-learn", "igraph",
                   "leidenalg", "umap-learn")


def stack(threads: int = THREADS) -> dict[str, str]:
    """This machine's fingerprint for full-mode outputs: CPU, thread count, library versions."""
    import hashlib
    from importlib import metadata

    from scvae_tools import native

    out = {"cpu": hashlib.sha256(native._cpu_signature().encode()).hexdigest()[:16],
           "threads": str(threads)}
    for name in _STACK_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def stack_differences(stored: nbformat.NotebookNode, threads: int = THREADS) -> list[str]:
    """How the stack that made the committed outputs differs from this one ([] when the same;
    one entry when the notebook carries no record, i.e. was not refreshed with ``--refresh``)."""
    made_with = stored.metadata.get(STACK_KEY)
    if not made_with:
        return [f"no record of the machine that made the outputs (metadata {STACK_KEY!r}); "
                "refresh with --refresh"]
    here = stack(threads)
    return [f"{k}: {made_with.get(k)} there, {v} here" for k, v in here.items()
            if made_with.get(k) != v]


def refresh(name: str, threads: int = THREADS) -> Path:
    """Execute a tutorial in full mode and write it back in place, its outputs stamped with
    this machine's :func:`stack`. Reread its markdown afterwards: quoted numbers may move."""
    path = _path(name)
    # Executed in tutorials/ itself: the files it writes go to its *_outputs/ folders.
    fresh = execute(path, None, threads=threads)
    fresh.metadata[STACK_KEY] = stack(threads)
    nbformat.write(fresh, path)
    return path


def _path(name: str) -> Path:
    path = Path(name)
    if not path.is_file():
        path = TUTORIALS / (name if name.endswith(".ipynb") else f"{name}.ipynb")
    return path


def execute(path: Path, workdir: Path | None, fast: bool = False, threads: int | None = THREADS,
            timeout: int = 1200, append: tuple[str, ...] = ()) -> nbformat.NotebookNode:
    """Execute the notebook at ``path`` (full mode unless ``fast``) and return it with its new
    outputs; the file itself is not written. With the ``python3`` kernel, ``threads``
    OpenMP threads (``None``: as this process's environment says) and coalesced streams, as
    the committed outputs are made. It runs in ``workdir/tutorials`` (files it writes stay
    there), or with ``workdir=None`` in the notebook's own folder (a refresh). ``append``:
    code cells added at the end, e.g. for a test to look inside the kernel."""
    import nbclient

    nb = nbformat.read(path, as_version=4)
    nb.cells += [nbformat.v4.new_code_cell(code) for code in append]
    work = path.parent if workdir is None else Path(workdir) / "tutorials"
    work.mkdir(parents=True, exist_ok=True)
    env = os.environ.copy()
    env["SCVAE_TUTORIAL_FAST"] = "1" if fast else "0"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's default thread count
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     coalesce_streams=True,
                                     resources={"metadata": {"path": str(work)}})
    client.execute(env=env)  # the kernel's environment (jupyter_client's start_kernel)
    return nb


def check(name: str, workdir: Path | None = None, rtol: float = RTOL, atol: float = ATOL,
          threads: int = THREADS) -> tuple[list[StaleCell], list[StaleQuote]]:
    """Execute a tutorial in full mode and compare it with its committed copy. ``name``: a
    notebook in tutorials/ (with or without ``.ipynb``), or the path of a notebook file.
    Meaningful only where :func:`stack_differences` is empty."""
    path = _path(name)
    stored = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = execute(path, Path(workdir or tmp), threads=threads)
    return stale_cells(stored, fresh, rtol, atol), stale_quotes(stored, fresh)


def report(name: str, cells: list[StaleCell], quotes: list[StaleQuote]) -> str:
    """A readable report, with how to refresh the committed outputs."""
    if not cells and not quotes:
        return f"{name}: committed outputs are up to date"
    lines = [f"{name}: committed outputs are stale"]
    lines += [str(c) for c in cells] + [str(q) for q in quotes]
    lines.append(f"Refresh the outputs: python tutorials/check_outputs.py --refresh {name}, "
                 "then update the numbers its text quotes (tutorials/README.md).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks (default: all in tutorials/)")
    parser.add_argument("--rtol", type=float, default=RTOL)
    parser.add_argument("--atol", type=float, default=ATOL)
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="the kernel's OMP_NUM_THREADS (those of the committed run)")
    parser.add_argument("--refresh", action="store_true",
                        help="execute in full mode and write the outputs back in place, "
                             "stamped with this machine's libraries and CPU")
    args = parser.parse_args(argv)
    names = args.names or sorted(p.name for p in TUTORIALS.glob("*.ipynb"))
    if args.refresh:
        for name in names:
            print(f"refreshed {refresh(name, threads=args.threads)}", flush=True)
        return 0
    stale = 0
    for name in names:
        for difference in stack_differences(nbformat.read(_path(name), as_version=4),
                                            args.threads):
            print(f"{name}: made with another stack, so numbers may differ for that reason "
                  f"alone: {difference}", flush=True)
        cells, quotes = check(name, rtol=args.rtol, atol=args.atol, threads=args.threads)
        print(report(name, cells, quotes), flush=True)
        stale += bool(cells or quotes)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
