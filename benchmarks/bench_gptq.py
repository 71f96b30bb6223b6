"""Batched GPTQ over the experts of one layer vs a Python loop over experts, same machine, one run.

Default: 64 experts of the fixture's, OLMoE's and Qwen3-30B-A3B's expert shapes, W4 g128, each expert with
its own Hessian from correlated synthetic activations. Prints wall time of both, the ratio, and the max
difference of the dequantized weights (0 when the two are bit-identical).

``--metric``: instead, the cost of the output-metric solve (DESIGN 3.5b, the residual writers' rounding):
batched GPTQ against batched GPTQ with a rank-8 (``--rank``) row metric shared by the experts, solved exactly
(the tiled wavefront) and fast (the low-rank coordinate descent of DESIGN 3.5f), side by side: wall time, the
ratios to GPTQ, and the metric objective ``tr((W-Q) H (W-Q)^T M)`` of each relative to GPTQ's and fast/exact.

    OMP_NUM_THREADS=2 python benchmarks/bench_gptq.py [--experts 64] [--threads 2] [--metric [--rank 8]]

``--device cuda`` runs every solve on the GPU (problems are built on the CPU, moved, and timed with the device
synchronised; one untimed solve per shape first, so start-up and compilation stay out of the numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch

from vsraq_plugin.gptq import gptq_quantize

SHAPES = {
    "fixture w1 (256x256)": (256, 256),
    "olmoe down (2048x1024)": (2048, 1024),
    "qwen3 gate (768x2048)": (768, 2048),
    "qwen3 down (2048x768)": (2048, 768),
}


def _solve(mode: str) -> str:
    return "fast" if mode == "fused" else mode


@contextlib.contextmanager
def _round_kernel(on: bool):
    """``VSRAQ_ROUND_KERNEL`` set for the block: the fast solve's columns rounded by one Triton launch each."""
    old = os.environ.get("VSRAQ_ROUND_KERNEL")
    os.environ["VSRAQ_ROUND_KERNEL"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["VSRAQ_ROUND_KERNEL"]
        else:
            os.environ["VSRAQ_ROUND_KERNEL"] = old


def timed(fn, device: str):
    """``fn()`` and its wall seconds, the device synchronised on both sides (CUDA runs asynchronously)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def make_problem(experts: int, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(experts, rows, cols, generator=g) * 0.02
    # Hessians of correlated activations: shared low-rank structure plus per-expert noise.
    base = torch.randn(cols // 4, cols, generator=g)
    H = torch.empty(experts, cols, cols)
    for e in range(experts):
        x = torch.randn(256, cols // 4, generator=g) @ base + 0.3 * torch.randn(256, cols, generator=g)
        H[e] = x.T @ x / 256
    return W, H


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs of each")
    ap.add_argument("--metric", action="store_true", help="time the output-metric solves against plain GPTQ")
    ap.add_argument("--rank", type=int, default=8, help="--metric: rank of the boundary matrix A")
    ap.add_argument("--no-exact", action="store_true", help="--metric: skip the exact solve (minutes at rank 256)")
    ap.add_argument("--lam", type=float, default=32.0, help="--metric: lambda of M = I + lambda A / ||A||")
    ap.add_argument("--shapes", help="--metric: only the shapes whose name contains one of these (comma-separated)")
    ap.add_argument("--device", default="cpu", help="where the solves run (cpu, cuda)")
    ap.add_argument(
        "--fused", action="store_true", help="--metric, CUDA: add the fast solve with its one-launch rounding kernel"
    )
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_gptq: --device cuda asked for, but torch sees no CUDA device")
    if args.fused and not args.device.startswith("cuda"):
        raise SystemExit("bench_gptq: --fused times the rounding kernel, which runs on CUDA; add --device cuda")
    torch.set_num_threads(args.threads)
    # with_error=False: the pipeline never asks for the Hessian-weighted error (solve.py); its product of every
    # weight with its Hessian would add the same time to both sides of every ratio below.
    kw = dict(bits=args.bits, group_size=args.group_size, sym=True, with_error=False)

    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"{args.threads} thread(s)"
    print(f"torch {torch.__version__}, {where}, {args.experts} experts, W{args.bits}g{args.group_size}")
    if args.metric:
        return metric_cost(args, kw)
    print(f"{'shape':24s} {'loop s':>9s} {'batched s':>10s} {'speed-up':>9s} {'max |diff|':>11s}")
    for name, (rows, cols) in SHAPES.items():
        W, H = (t.to(args.device) for t in make_problem(args.experts, rows, cols, seed=0))
        gptq_quantize(W[:2], H[:2], **kw)  # warm-up: allocator and BLAS state, not measured
        t_loop = t_batch = float("inf")
        for _ in range(args.repeats):  # best of N: first-touch page faults and noise from the other core
            loop, t = timed(
                lambda: [gptq_quantize(W[e : e + 1], H[e : e + 1], **kw)[0].weight for e in range(args.experts)],
                args.device,
            )
            t_loop = min(t_loop, t)
            batched, t = timed(lambda: gptq_quantize(W, H, **kw)[0].weight, args.device)
            t_batch = min(t_batch, t)
        diff = (torch.cat(loop) - batched).abs().max().item()
        print(f"{name:24s} {t_loop:9.2f} {t_batch:10.2f} {t_loop / t_batch:8.2f}x {diff:11.3g}", flush=True)


def metric_objective(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, M: torch.Tensor) -> float:
    """``sum_b tr((W-Q) H (W-Q)^T M)`` in float64: what the metric solve minimises."""
    E = (W - Q).double().cpu()
    return float(torch.einsum("brd,bde,bsd,rs->", E, H.double().cpu(), E, M[0].double().cpu()))


def metric_cost(args, kw) -> None:
    """Plain GPTQ vs the exact (wavefront) and the fast (low-rank, DESIGN 3.5f) metric solves, same experts and
    metric: wall time, ratios to GPTQ, and each solve's metric objective relative to GPTQ's and to the exact one."""
    print(f"rank-{args.rank} metric M = I + {args.lam:g} A / ||A||, shared by the experts")
    head = f"{'shape':24s} {'gptq s':>7s} {'exact s':>8s} {'fast s':>7s} {'exact/g':>8s} {'fast/g':>7s}"
    print(head + f" {'obj exact/g':>12s} {'obj fast/g':>11s} {'fast/exact':>11s}")
    for name, (rows, cols) in SHAPES.items():
        if args.shapes and not any(s in name for s in args.shapes.split(",")):
            continue
        W, H = (t.to(args.device) for t in make_problem(args.experts, rows, cols, seed=0))
        U = torch.randn(rows, args.rank, generator=torch.Generator().manual_seed(1))
        A = U @ U.T
        M = torch.eye(rows) + args.lam * A / torch.linalg.eigvalsh(A)[-1]
        M = M.to(args.device).expand(args.experts, rows, rows)  # shared, as the pipeline's (expand after the move)
        modes = ("gptq", "fast") if args.no_exact else ("gptq", "exact", "fast")
        modes += ("fused",) if args.fused else ()
        times = dict.fromkeys(modes, float("inf"))
        out = {}
        if args.device.startswith("cuda"):  # one untimed pass: kernels load and the allocator fills on first use
            for mode in modes:
                extra = {} if mode == "gptq" else {"row_metric": M[:2], "metric_solve": _solve(mode)}
                with _round_kernel(mode == "fused"):
                    gptq_quantize(W[:2], H[:2], **kw, **extra)
        for _ in range(args.repeats):
            for mode in times:
                extra = {} if mode == "gptq" else {"row_metric": M, "metric_solve": _solve(mode)}
                with _round_kernel(mode == "fused"):
                    out[mode], t = timed(lambda: gptq_quantize(W, H, **kw, **extra)[0].weight, args.device)
                times[mode] = min(times[mode], t)
        obj = {mode: metric_objective(W, Q, H, M) for mode, Q in out.items()}
        t, o = times, obj
        if args.no_exact:
            t["exact"] = o["exact"] = float("nan")
        print(
            f"{name:24s} {t['gptq']:7.2f} {t['exact']:8.2f} {t['fast']:7.2f} {t['exact'] / t['gptq']:7.2f}x "
            f"{t['fast'] / t['gptq']:6.2f}x {o['exact'] / o['gptq']:12.4f} {o['fast'] / o['gptq']:11.4f} "
            f"{o['fast'] / o['exact']:11.4f}",
            flush=True,
        )
        if "fused" in times:  # the same fast solve, each column rounded by one kernel launch
            print(
                f"{'':24s} fused {t['fused']:.2f} s = {t['fused'] / t['gptq']:.2f}x gptq, "
                f"{t['fast'] / t['fused']:.2f}x faster than fast; objective fused/fast {o['fused'] / o['fast']:.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
