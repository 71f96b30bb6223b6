"""The router re-fit (DESIGN 3.3/3.4, ``vsraq.align_router``) solved densely vs matrix-free (CG), side by side.

One re-fit with 2 reweighting rounds on T = 16 batches x 256 tokens (exact sums, as the pipeline runs it) at
OLMoE-like (E=64, d=1024), Qwen3-30B-A3B (E=128, d=2048) and DeepSeek-V3 (E=256, d=7168) widths, top-8.
Every solve runs in its own process, one thread: wall seconds, peak RSS of that process and its growth during
the solve, CG iterations per solve, agreement history, and the weights' difference between the two solves.
A dense solve is run only where its ``(E, d, d)`` float64 tensors fit in the memory available (measured: the
dense re-fit peaks at about five of them); otherwise its memory is computed and printed.

``cg-batch`` is CG with ``excess_times`` in its GPU form (per batch, coefficient matrices over groups of up to 32
rows instead of a few operators per row), run here on the CPU; ``--count-ops`` counts each re-fit's torch
operators, i.e. the kernel launches it would make on a GPU, where the row loop's launches were 2.3 s a layer
(H200, Qwen3-30B-A3B).

    OMP_NUM_THREADS=1 python benchmarks/bench_router.py [--sizes olmoe-like qwen3-30b-a3b deepseek-v3] [--tokens 4096]
    OMP_NUM_THREADS=1 python benchmarks/bench_router.py --sizes qwen3-30b-a3b --solves cg cg-batch --count-ops
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

SIZES = {"olmoe-like": (64, 1024), "qwen3-30b-a3b": (128, 2048), "deepseek-v3": (256, 7168)}
TOP_K = 8
BATCHES = 16
SOLVES = ("dense", "cg", "cg-batch")  # cg-batch: CG with excess_times by batch (its GPU form), on the CPU


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside it (views included): the launches a GPU run would make."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def one(experts: int, dim: int, tokens: int, solve: str, out: str, count_ops: bool = False) -> None:
    """Child: one re-fit; prints one JSON line and saves the weights to ``out``."""
    from vsraq_plugin import vsraq
    from vsraq_plugin.routing import RouterRule, route
    from vsraq_plugin.vsraq import TokenSplit, align_router

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    R0 = torch.randn(experts, dim, generator=g).div_(dim**0.5)
    X_fp = torch.randn(tokens, dim, generator=g)
    Z = X_fp @ R0.T
    X_q = X_fp.add_(torch.randn(tokens, dim, generator=g), alpha=0.1)  # the quantized stream: drifted inputs
    rule = RouterRule("softmax", TOP_K, experts, renormalize=True)
    step = tokens // BATCHES
    split = TokenSplit(slice(0, tokens), [(b * step, min((b + 1) * step, tokens)) for b in range(BATCHES)])
    base = _rss_mb()
    t0 = time.perf_counter()
    vsraq.EXCESS_BY_BATCH = solve == "cg-batch"  # excess_times' GPU form, here on the CPU
    solve = "cg" if solve == "cg-batch" else solve
    refit = lambda: align_router(X_q, Z, R0, lambda z: route(z, rule), TOP_K, 1.0, 1.0, 1.0, 2, 0.1, split, solve)  # noqa: E731
    fit = refit()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    save_file({"weight": fit.weight.contiguous()}, out)
    info = {"seconds": seconds, "peak_rss_mb": peak, "base_rss_mb": base, "agreement": fit.agreement}
    if count_ops:  # a second re-fit, counting the torch operators it dispatches: each is a launch on a GPU
        with _OpCounter() as ops:
            refit()
        info["ops"] = ops.count
    info.update(rounds=fit.rounds, iterations=fit.cg_iterations, dense_rows=fit.dense_rows)
    print(json.dumps(info), flush=True)


def run(experts: int, dim: int, tokens: int, solve: str, out: Path, count_ops: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--one", str(experts), str(dim), str(tokens), solve, str(out), str(int(count_ops))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=BATCHES * 256)
    ap.add_argument("--deepseek-tokens", type=int, default=BATCHES * 256)
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    ap.add_argument("--solves", nargs="+", choices=SOLVES, default=["dense", "cg"])
    ap.add_argument("--count-ops", action="store_true", help="also count the torch operators of each re-fit")
    ap.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        e, d, t, solve, out, count = args.one
        one(int(e), int(d), int(t), solve, out, bool(int(count)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (E, d) in SIZES.items():
            if name not in args.sizes:
                continue
            T = args.deepseek_tokens if name == "deepseek-v3" else args.tokens
            dense_gb = E * d * d * 8 / 1e9
            results = {}
            for solve in SOLVES:
                if solve not in args.solves:
                    results[solve] = {"skipped": "not run (--solves)"}
                    continue
                # A, A + dA, A / s, A / s + rho I, its Cholesky factor: the dense re-fit peaks at ~5 (E, d, d) tensors.
                if solve == "dense" and 5 * dense_gb * 1e3 > 0.8 * _available_mb():
                    results[solve] = {"skipped": f"needs ~{5 * dense_gb:.0f} GB (A alone {dense_gb:.1f} GB)"}
                    continue
                print(f"{name} (E={E}, d={d}, T={T}) {solve} ...", flush=True)
                results[solve] = run(E, d, T, solve, Path(tmp) / f"{name}-{solve}.safetensors", args.count_ops)
                print("   ", json.dumps(results[solve]), flush=True)
            weights = {s: load_file(Path(tmp) / f"{name}-{s}.safetensors")["weight"] for s in SOLVES
                       if "seconds" in results[s]}  # fmt: skip
            ref = next((weights[s] for s in SOLVES if s in weights), None)  # dense, else cg, else cg-batch
            diff = {s: float((w - ref).norm() / ref.norm()) for s, w in weights.items()}
            rows.append((name, E, d, T, dense_gb, results, diff))
    print()
    print("Seconds / peak RSS MiB (its growth during the solve)"
          + (", torch operators dispatched (a GPU's launches)" if args.count_ops else "")
          + "; rel. diff: each router against the first solve that ran (dense, cg, cg-batch).")  # fmt: skip
    print("| router (E, d), T | A = E d^2 float64 | " + " | ".join(SOLVES) + " | cg iterations per solve | "
          "agreement (cg) | rel. diff |")  # fmt: skip
    print("|---|---|" + "---|" * len(SOLVES) + "---|---|---|")
    for name, E, d, T, dense_gb, results, diff in rows:
        cells = []
        for solve in SOLVES:
            r = results[solve]
            if "seconds" in r:
                cell = f"{r['seconds']:.1f} / {r['peak_rss_mb']:.0f} ({r['peak_rss_mb'] - r['base_rss_mb']:.0f})"
                cells.append(cell + (f", {r['ops']} ops" if "ops" in r else ""))
            else:
                cells.append(r.get("skipped") or f"failed: {r.get('error')}")
        cg = results["cg"]
        its = ", ".join(map(str, cg.get("iterations", []))) or "-"
        hist = " -> ".join(f"{100 * a:.1f}" for a in cg.get("agreement", []))
        rel = ", ".join(f"{s} {v:.1e}" for s, v in diff.items()) or "-"
        print(f"| {name} ({E}, {d}), {T} | {dense_gb:.2f} GB | " + " | ".join(cells) + f" | {its} | {hist} % | {rel} |")


if __name__ == "__main__":
    main()
