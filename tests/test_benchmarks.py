"""The benchmark scripts' own logic, where it wraps the package (a change of the package's
internal interfaces broke one of them unnoticed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import scvae_tools as svt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.mark.parametrize("mode", ["memory", "backed"])
def test_scaling_backed_partial_epoch(tmp_path, mode):
    """--max-cells wraps the data in a subset whose batches() lacked the nonzero= that
    training now passes: a TypeError before the first step."""
    import scaling_backed

    path = tmp_path / "cells.h5ad"
    svt.datasets.synthetic_counts(n_cells=300, n_genes=40, seed=0).write_h5ad(path)
    res = scaling_backed.run_one(str(path), mode, epochs=1, batch_size=32, max_cells=120,
                                 out=None, threads=1)
    assert res["trained_cells"] == 120 and res["n_cells"] == 300
