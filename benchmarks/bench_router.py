"""The router re-fit (DESIGN 3.3/3.4, ``vsraq.align_router``) solved densely vs matrix-free (CG), side by side.

One re-fit with 2 reweighting rounds on T = 16 batches x 256 tokens (exact sums, as the pipeline runs it) at
OLMoE-like (E=64, d=1024), Qwen3-30B-A3B (E=128, d=2048) and DeepSeek-V3 (E=256, d=7168) widths, top-8.
Every solve runs in its own process, one thread: wall seconds, peak RSS of that process and its growth during
the solve, CG iterations per solve, agreement history, and the weights' difference between the two solves.
A dense solve is run only where its ``(E, d, d)`` float64 tensors fit in the memory available (measured: the
dense re-fit peaks at about five of them); otherwise its memory is computed and printed.

    OMP_NUM_THREADS=1 python benchmarks/bench_router.py [--sizes olmoe-like qwen3-30b-a3b deepseek-v3] [--tokens 4096]
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

SIZES = {"olmoe-like": (64, 1024), "qwen3-30b-a3b": (128, 2048), "deepseek-v3": (256, 7168)}
TOP_K = 8
BATCHES = 16


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


def one(experts: int, dim: int, tokens: int, solve: str, out: str) -> None:
    """Child: one re-fit; prints one JSON line and saves the weights to ``out``."""
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
    fit = align_router(X_q, Z, R0, lambda z: route(z, rule), TOP_K, 1.0, 1.0, 1.0, 2, 0.1, split, solve)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.save(fit.weight, out)
    info = {"seconds": seconds, "peak_rss_mb": peak, "base_rss_mb": base, "agreement": fit.agreement}
    info.update(rounds=fit.rounds, iterations=fit.cg_iterations, dense_rows=fit.dense_rows)
    print(json.dumps(info), flush=True)


def run(experts: int, dim: int, tokens: int, solve: str, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--one", str(experts), str(dim), str(tokens), solve, str(out)]
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
    ap.add_argument("--solves", nargs="+", choices=["dense", "cg"], default=["dense", "cg"])
    ap.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        e, d, t, solve, out = args.one
        one(int(e), int(d), int(t), solve, out)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (E, d) in SIZES.items():
            if name not in args.sizes:
                continue
            T = args.deepseek_tokens if name == "deepseek-v3" else args.tokens
            dense_gb = E * d * d * 8 / 1e9
            results = {}
            for solve in ("dense", "cg"):
                if solve not in args.solves:
                    results[solve] = {"skipped": "not run (--solves)"}
                    continue
                # A, A + dA, A / s, A / s + rho I, its Cholesky factor: the dense re-fit peaks at ~5 (E, d, d) tensors.
                if solve == "dense" and 5 * dense_gb * 1e3 > 0.8 * _available_mb():
                    results[solve] = {"skipped": f"needs ~{5 * dense_gb:.0f} GB (A alone {dense_gb:.1f} GB)"}
                    continue
                print(f"{name} (E={E}, d={d}, T={T}) {solve} ...", flush=True)
                results[solve] = run(E, d, T, solve, Path(tmp) / f"{name}-{solve}.pt")
                print("   ", json.dumps(results[solve]), flush=True)
            diff = None
            if all("seconds" in results[s] for s in ("dense", "cg")):
                a, b = (torch.load(Path(tmp) / f"{name}-{s}.pt") for s in ("dense", "cg"))
                diff = float((a - b).norm() / a.norm())
            rows.append((name, E, d, T, dense_gb, results, diff))
    print()
    print("| router (E, d), T | A = E d^2 float64 | dense: s / peak RSS MiB (growth) | cg: s / peak RSS MiB (growth) | "
          "cg iterations per solve | agreement (cg) | rel. diff dense-cg |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, E, d, T, dense_gb, results, diff in rows:
        cells = []
        for solve in ("dense", "cg"):
            r = results[solve]
            if "seconds" in r:
                cells.append(f"{r['seconds']:.1f} / {r['peak_rss_mb']:.0f} ({r['peak_rss_mb'] - r['base_rss_mb']:.0f})")
            else:
                cells.append(r.get("skipped") or f"failed: {r.get('error')}")
        cg = results["cg"]
        its = ", ".join(map(str, cg.get("iterations", []))) or "-"
        hist = " -> ".join(f"{100 * a:.1f}" for a in cg.get("agreement", []))
        rel = "-" if diff is None else f"{diff:.1e}"
        print(f"| {name} ({E}, {d}), {T} | {dense_gb:.2f} GB | {cells[0]} | {cells[1]} | {its} | {hist} % | {rel} |")


if __name__ == "__main__":
    main()
