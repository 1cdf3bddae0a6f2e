"""Checks and timings on a CUDA GPU, in one run (issue 3's GPU target: 1M cells × 2,000 genes).

Everything goes through the public API (``SCVAE(...).train(device="cuda")``), in this order,
each section guarded so that a failure is printed and the next section still runs:

1. ``likelihood``: the fused NB log-likelihood and its gradient on the GPU against the dense
   formula in float64 on the CPU (relative error; must be < 1e-5), with one θ per gene and
   with a table of θ per batch (``theta_index``).
2. ``pbmc3k``: training with the defaults on the GPU, in float32, in bf16 autocast and with
   ``cuda_graphs=True`` —
   seconds, epochs, held-out ELBO; the latents are saved to ``--out`` so that Leiden ARI can
   be scored elsewhere (``pbmc3k_quality.py --latent``); save on the GPU → load on the CPU
   gives the same latent.
3. ``epoch``: one AnnData of ``--n-cells`` synthetic cells (simulated on the device, ~8%
   non-zeros, CSR like an h5ad), and for each setting two full epochs on all cells
   (``train_size=1.0``) — the second epoch's seconds from ``model.history`` — plus the peak
   GPU memory (a setting ending in ``:graphs`` trains with ``cuda_graphs=True``). The
   first setting's model then times ``get_latent_representation`` and
   ``get_normalized_expression`` on all cells.
4. ``scvi``: scvi-tools' ``SCVI`` and ours on the first ``--scvi-cells`` of those cells,
   identical settings (1 × 128 hidden, 10 latent, NB, gene dispersion, batch 128), two
   epochs each, wall-clock of the whole ``train`` call.

Results go to ``--out``/gpu_check.json after every section; a table is printed last::

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --out "$OUT" --data-dir .gpu_data
    python benchmarks/gpu_check.py --device cpu --n-cells 20000 --scvi-cells 5000 --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

RESULTS: dict = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _save(out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def section(name: str, out: Path, deadline: float):
    """Run the decorated function as one guarded section, unless past the deadline."""
    def wrap(fn):
        def run(*a, **kw):
            if time.perf_counter() > deadline:
                print(f"[{name}] skipped: time budget spent", flush=True)
                RESULTS[name] = {"skipped": "time budget"}
                return None
            t = time.perf_counter()
            print(f"[{name}] ...", flush=True)
            try:
                res = fn(*a, **kw)
            except Exception as e:  # noqa: BLE001  (report and go on to the next section)
                traceback.print_exc()
                res = {"error": f"{type(e).__name__}: {e}"}
            if isinstance(res, dict):
                res["section_s"] = round(time.perf_counter() - t, 2)
                RESULTS[name] = res
                print(f"[{name}] {json.dumps(res, default=str)}", flush=True)
            _save(out)
            return res
        return run
    return wrap


def make_counts(n_cells: int, n_genes: int, device: torch.device, seed: int = 0,
                chunk: int = 50_000):
    """CSR float32 counts (scipy) of synthetic cells, simulated on ``device`` in chunks.

    Ten cell types, each a perturbation of one gene profile; counts Poisson(ℓ · p_type) with
    log-normal library sizes around 300: ~8% non-zeros, like 10x HVGs.
    """
    import scipy.sparse as sp

    g = torch.Generator(device).manual_seed(seed)
    kw = {"device": device, "generator": g}
    base = torch.randn(n_genes, **kw) * 1.6
    mask = torch.rand(10, n_genes, **kw) < 0.2
    profiles = base + torch.randn(10, n_genes, **kw) * mask
    probs = torch.softmax(profiles, dim=1)
    data, indices, indptr = [], [], [np.zeros(1, dtype=np.int64)]
    types = []
    offset = 0
    for start in range(0, n_cells, chunk):
        n = min(chunk, n_cells - start)
        t = torch.randint(0, 10, (n,), **kw)
        lib = torch.exp(torch.randn(n, 1, **kw) * 0.5 + float(np.log(300.0))).round().clamp_min(1)
        x = torch.poisson(lib * probs[t], generator=g)
        x[:, 0] += (x.sum(1) == 0).float()  # no empty cells
        csr = x.to_sparse_csr()
        data.append(csr.values().cpu().numpy())
        indices.append(csr.col_indices().to(torch.int32).cpu().numpy())
        indptr.append(csr.crow_indices()[1:].cpu().numpy() + offset)
        offset += int(csr.values().numel())
        types.append(t.cpu().numpy())
    X = sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)),
                      shape=(n_cells, n_genes))
    return X, np.concatenate(types)


class _Tee:
    """A stream that writes to several (the console and the run's log file)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding: the console's
        return getattr(self.streams[0], name)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="gpu_check_out")
    p.add_argument("--data-dir", default=None, help="folder with pbmc3k_hvg_counts.h5ad")
    p.add_argument("--n-cells", type=int, default=1_000_000)
    p.add_argument("--scvi-cells", type=int, default=100_000)
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds; sections that would start later are skipped")
    p.add_argument("--quick", action="store_true", help="few epochs (a dry run on the CPU)")
    p.add_argument("--settings", nargs="+",
                   default=["128:32:graphs", "auto:32", "128:32", "1024:32"],
                   help="batch:precision[:compile][:graphs] for the epoch section, most "
                        "important first (graphs: train(cuda_graphs=True); batch 'auto': "
                        "train()'s default for the data and device)")
    p.add_argument("--late-settings", nargs="*", default=["1024:32:graphs", "128:bf16-mixed:graphs"],
                   help="settings timed after the graph, scvi and profile sections")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device here; for a dry run on the CPU pass "
                         "--device cpu --quick.")
    # Everything printed also goes to out/log.txt: a device call returns only the last
    # 12,000 characters of its output, the files under $OUT come back whole.
    log = open(out / "log.txt", "a", buffering=1)  # noqa: SIM115 (open for the whole run)
    sys.stdout = _Tee(sys.stdout, log)
    sys.stderr = _Tee(sys.stderr, log)

    import anndata as ad
    import pandas as pd

    import scvae_tools as svt
    from scvae_tools.distributions import log_nb
    from scvae_tools.fused import nb_log_likelihood_from_logits

    RESULTS["env"] = {
        "torch": torch.__version__, "device": str(device),
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "scvae_tools": svt.__version__, "cpu_threads": torch.get_num_threads(),
    }
    print(RESULTS["env"], flush=True)

    @section("likelihood", out, deadline)
    def likelihood():
        rows = {}
        for n_genes in (2000, 33538):
            g = torch.Generator().manual_seed(n_genes)
            n = 256
            logits = torch.randn(n, n_genes, generator=g, dtype=torch.float64) * 2
            log_lib = torch.log(torch.rand(n, 1, generator=g, dtype=torch.float64) * 5e3 + 500)
            log_theta = torch.randn(n_genes, generator=g, dtype=torch.float64)
            mu = torch.exp(log_lib) * torch.softmax(logits, -1)
            x = torch.poisson(mu * (torch.rand(n, n_genes, generator=g, dtype=torch.float64) < 0.2))
            # reference: float64 dense formula and autograd on the CPU
            lg = logits.clone().requires_grad_()
            lt = log_theta.clone().requires_grad_()
            ref = log_nb(x, torch.exp(log_lib) * torch.softmax(lg, -1), lt.exp()).sum(-1)
            ref.sum().backward()
            lg_d = logits.float().to(device).requires_grad_()
            lt_d = log_theta.float().to(device).requires_grad_()
            x_d = x.float().to(device)
            nz = torch.nonzero(x_d.reshape(-1)).squeeze(1)
            for name, nonzero in (("searched", None), ("given", (nz, x_d.reshape(-1)[nz]))):
                lg_d.grad = lt_d.grad = None
                ll = nb_log_likelihood_from_logits(lg_d, log_lib.float().to(device), lt_d, x_d,
                                                   nonzero)
                ll.sum().backward()
                rel = lambda a, b: float((a.double().cpu() - b).abs().max() / b.abs().max())  # noqa: E731
                rows[f"{n_genes}_{name}"] = {
                    "ll_rel": rel(ll.detach(), ref.detach()),
                    "grad_logits_rel": rel(lg_d.grad, lg.grad),
                    "grad_log_theta_rel": rel(lt_d.grad, lt.grad)}
            # A dispersion per batch (dispersion="gene-batch"): a table of θ rows and each
            # cell's row, gathered on the device without a host sync.
            table = torch.randn(3, n_genes, generator=g, dtype=torch.float64)
            index = torch.randint(0, 3, (n,), generator=g)
            tb = table.clone().requires_grad_()
            ref_b = log_nb(x, torch.exp(log_lib) * torch.softmax(logits, -1), tb[index].exp())
            ref_b.sum().backward()
            tb_d = table.float().to(device).requires_grad_()
            ll_b = nb_log_likelihood_from_logits(logits.float().to(device),
                                                 log_lib.float().to(device), tb_d, x_d,
                                                 theta_index=index.to(device))
            ll_b.sum().backward()
            rows[f"{n_genes}_per_batch"] = {
                "ll_rel": rel(ll_b.detach(), ref_b.sum(-1).detach()),
                "grad_log_theta_rel": rel(tb_d.grad, tb.grad)}
        worst = max(r["ll_rel"] for r in rows.values())  # gradients: reported (float32 sums)
        return {"cases": rows, "worst_ll_rel": worst, "ok": worst < 1e-5}

    def pbmc3k_train(adata, precision, cuda_graphs=False):
        model = svt.SCVAE(adata)
        _sync(device)
        t = time.perf_counter()
        model.train(device=device, progress_bar=False, precision=precision,
                    cuda_graphs=cuda_graphs and device.type == "cuda",
                    **({"max_epochs": 3} if args.quick else {}))
        _sync(device)
        train_s = time.perf_counter() - t
        val = model.validation_indices
        t = time.perf_counter()
        z = model.get_latent_representation()
        latent_s = time.perf_counter() - t
        return model, {"train_s": round(train_s, 2), "epochs": len(model.history),
                       "heldout_elbo": model.get_elbo(indices=val),
                       "cells_per_s": round(len(model.history) * len(model.train_indices) / train_s),
                       "latent_s": round(latent_s, 3)}, z

    @section("pbmc3k", out, deadline)
    def pbmc3k():
        adata = svt.datasets.pbmc3k(args.data_dir, hvg_only=True, download=False)
        res = {}
        model, res["fp32"], z = pbmc3k_train(adata, "32")
        np.save(out / "pbmc3k_latent_fp32.npy", z)
        with tempfile.TemporaryDirectory() as tmp:
            model.save(Path(tmp) / "pbmc3k_model")
            back = svt.SCVAE.load(Path(tmp) / "pbmc3k_model", adata, device="cpu")
        res["load_on_cpu_max_abs_diff"] = float(np.abs(back.get_latent_representation() - z).max())
        _, res["bf16"], zb = pbmc3k_train(adata, "bf16-mixed")
        np.save(out / "pbmc3k_latent_bf16.npy", zb)
        res["bf16_elbo_rel_diff"] = abs(res["bf16"]["heldout_elbo"] / res["fp32"]["heldout_elbo"] - 1)
        _, res["fp32_graphs"], zg = pbmc3k_train(adata, "32", cuda_graphs=True)
        np.save(out / "pbmc3k_latent_graphs.npy", zg)
        res["graphs_elbo_rel_diff"] = abs(
            res["fp32_graphs"]["heldout_elbo"] / res["fp32"]["heldout_elbo"] - 1)
        return res

    likelihood()
    pbmc3k()

    state: dict = {}

    @section("simulate", out, deadline)
    def simulate():
        t = time.perf_counter()
        X, types = make_counts(args.n_cells, 2000, device)
        state["adata"] = ad.AnnData(
            X=X, obs=pd.DataFrame({"cell_type": pd.Categorical(types)},
                                  index=[f"c{i}" for i in range(X.shape[0])]),
            var=pd.DataFrame(index=[f"g{i}" for i in range(X.shape[1])]))
        return {"n_cells": X.shape[0], "nnz": int(X.nnz),
                "density": round(X.nnz / np.prod(X.shape), 4), "simulate_s": round(time.perf_counter() - t, 1)}

    simulate()

    def one_setting(setting: str):
        parts = setting.split(":")
        # "auto": train()'s own batch size and lr (1024 and 1e-2 on CUDA from 100k cells).
        batch = None if parts[0] == "auto" else int(parts[0])
        precision, compile_ = parts[1], "compile" in parts[2:]
        graphs = "graphs" in parts[2:] and device.type == "cuda"
        adata = state["adata"]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        model = svt.SCVAE(adata)
        setup_s = time.perf_counter() - t
        t = time.perf_counter()
        model.train(max_epochs=1 if args.quick else 2, batch_size=batch, train_size=1.0,
                    early_stopping=False, progress_bar=False, device=device,
                    precision=precision, compile=compile_, cuda_graphs=graphs)
        _sync(device)
        wall = time.perf_counter() - t
        sec = model.history["seconds"].to_numpy()
        res = {"batch": model.train_config.batch_size, "lr": model.train_config.lr,
               "batch_setting": parts[0], "precision": precision, "compile": compile_,
               "cuda_graphs": graphs,
               "model_setup_s": round(setup_s, 2), "train_call_s": round(wall, 2),
               "epoch_s": [round(float(s), 2) for s in sec],
               "cells_per_s": round(adata.n_obs / float(sec[-1])),
               "train_elbo_last": float(model.history["train_elbo"].iloc[-1])}
        if device.type == "cuda":
            res["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        return model, res

    def epoch_section(setting: str, first: bool) -> None:
        @section(f"epoch_{setting}", out, deadline)
        def epoch():
            model, res = one_setting(setting)
            if first:  # inference throughput on all cells, against this training throughput
                n = state["adata"].n_obs
                for name, call in (("latent", model.get_latent_representation),
                                   ("expression", model.get_normalized_expression)):
                    call(state["adata"][:1000])  # warm-up
                    _sync(device)
                    t = time.perf_counter()
                    call()
                    _sync(device)
                    s = time.perf_counter() - t
                    res[f"{name}_s"] = round(s, 2)
                    res[f"{name}_cells_per_s"] = round(n / s)
                    res[f"{name}_vs_training"] = round(n / s / res["cells_per_s"], 1)
            del model
            return res
        epoch()

    for i, setting in enumerate(args.settings):
        epoch_section(setting, i == 0)

    @section("graph", out, deadline)
    def graph():
        """Experiment, not the package's path: one epoch at batch 128 with the training step
        (dense NB likelihood, forward, backward, capturable fused Adam) captured once as a
        CUDA graph and replayed per batch; the batch is built eagerly from the device CSR and
        copied into the graph's input buffers. Shows what per-step launch overhead costs."""
        from scvae_tools.adapter import CellData, DataSpec
        from scvae_tools.module import VAE, ModuleConfig

        if device.type != "cuda":
            return {"skipped": "CUDA graphs need CUDA"}
        adata = state["adata"]
        data = CellData(adata, DataSpec.from_anndata(adata))
        torch.manual_seed(0)
        vae = VAE(ModuleConfig(n_genes=adata.n_vars)).to(device).train()
        opt = torch.optim.Adam(vae.parameters(), lr=4e-3, eps=1e-2, weight_decay=1e-6,
                               fused=True, capturable=True)
        bs, n_genes = 128, adata.n_vars
        sx = torch.zeros(bs, n_genes, device=device)
        slib = torch.ones(bs, 1, device=device)
        sbi = torch.zeros(bs, dtype=torch.long, device=device)

        def step():
            cov = vae.covariates(sbi)
            qz_m, qz_v = vae.encode(sx, cov)
            z = qz_m + qz_v.sqrt() * torch.randn_like(qz_m)
            params = vae.decode(z, slib, cov, sbi, means=True)
            ll = log_nb(sx, params["mu"], params["theta"]).sum(-1)
            kl, _ = vae.kl_per_dim(qz_m, qz_v, z)
            loss = (kl - ll).mean()
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            return loss

        batches = data.batches(None, bs, shuffle=True, generator=torch.Generator().manual_seed(0),
                               device=device)
        first = next(iter(batches))
        sx.copy_(first.x)
        slib.copy_(first.library)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_loss = step()
        _sync(device)
        t = time.perf_counter()
        n_steps, total = 0, torch.zeros((), device=device)
        for b in data.batches(None, bs, shuffle=True, generator=torch.Generator().manual_seed(1),
                              device=device):
            if len(b.x) != bs:
                continue  # the graph has one batch shape; the short last batch is skipped
            sx.copy_(b.x)
            slib.copy_(b.library)
            g.replay()
            total += static_loss
            n_steps += 1
        _sync(device)
        s_ = time.perf_counter() - t
        return {"steps": n_steps, "epoch_s": round(s_, 2), "ms_per_step": round(1e3 * s_ / n_steps, 3),
                "cells_per_s": round(n_steps * bs / s_), "mean_loss": float(total / n_steps)}

    if state.get("adata") is not None:
        graph()

    @section("profile", out, deadline)
    def profile():
        """Where a batch-128 step's time goes: host (Python, launches) against device."""
        from torch.profiler import ProfilerActivity, profile

        sub = state["adata"][:20_000].copy()
        model = svt.SCVAE(sub)
        model.train(max_epochs=1, batch_size=128, train_size=1.0, early_stopping=False,
                    progress_bar=False, device=device)  # warm-up
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            model.train(max_epochs=1, batch_size=128, train_size=1.0, early_stopping=False,
                        progress_bar=False, device=device)
            _sync(device)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        (out / "profile.txt").write_text(table)
        print(table[-6000:])
        ev = prof.key_averages()
        cpu = sum(e.self_cpu_time_total for e in ev) / 1e6
        dev = sum(getattr(e, "self_device_time_total", 0) for e in ev) / 1e6
        n_steps = -(-sub.n_obs // 128)
        res = {"steps": n_steps, "host_self_s": round(cpu, 3), "device_self_s": round(dev, 3),
               "calls_per_step": round(sum(e.count for e in ev) / n_steps)}
        if device.type == "cuda":  # every host-device synchronisation of one epoch, by message
            import warnings

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    model.train(max_epochs=1, batch_size=128, train_size=1.0,
                                early_stopping=False, progress_bar=False, device=device)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs: dict[str, int] = {}
            for w in caught:
                if "synchroniz" in str(w.message):
                    key = f"{Path(w.filename).name}:{w.lineno}"
                    syncs[key] = syncs.get(key, 0) + 1
            res["syncs_per_epoch"] = syncs
        return res

    if state.get("adata") is not None:
        profile()

    @section("scvi", out, deadline)
    def scvi_vs_ours():
        import scvi

        sub = state["adata"][: args.scvi_cells].copy()
        res = {"n_cells": sub.n_obs, "scvi_tools": scvi.__version__}
        t = time.perf_counter()
        model = svt.SCVAE(sub)
        model.train(max_epochs=2, batch_size=128, train_size=1.0, early_stopping=False,
                    progress_bar=False, device=device)
        _sync(device)
        res["ours_2_epochs_s"] = round(time.perf_counter() - t, 2)
        res["ours_epoch_s"] = [round(float(s), 2) for s in model.history["seconds"]]
        scvi.settings.seed = 0
        scvi.settings.dl_num_workers = 0
        s2 = sub.copy()
        scvi.model.SCVI.setup_anndata(s2)
        m = scvi.model.SCVI(s2, n_hidden=128, n_latent=10, n_layers=1, gene_likelihood="nb",
                            dispersion="gene")
        t = time.perf_counter()
        m.train(max_epochs=2, batch_size=128, train_size=1.0,
                accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                enable_progress_bar=False)
        _sync(device)
        res["scvi_2_epochs_s"] = round(time.perf_counter() - t, 2)
        res["ours_speedup"] = round(res["scvi_2_epochs_s"] / res["ours_2_epochs_s"], 1)
        return res

    if state.get("adata") is not None:
        scvi_vs_ours()
        for setting in args.late_settings:
            epoch_section(setting, False)

    RESULTS["total_s"] = round(time.perf_counter() - t_start, 1)
    _save(out)
    print("\n| section | figures |\n|---|---|")
    for k, v in RESULTS.items():
        print(f"| {k} | {json.dumps(v, default=str)[:400]} |")


if __name__ == "__main__":
    main()
