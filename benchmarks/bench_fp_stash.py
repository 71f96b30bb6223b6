"""The FP targets' expert products (DESIGN 3.5c) computed twice vs stashed once, side by side, at real widths.

VSRAQ's cross-Gram of the experts' down inputs needs the FP experts' hidden states ``h = act(x W_g^T) * (x W_u^T)``
of every (token, expert) pair. Without a stash they are computed in the FP stream's forward and again in the
cross-Gram; with ``capture.ExpertStash`` the FP forward keeps them and the cross-Gram looks them up. Timed on
the same random experts and routing (transformers' Qwen3-MoE experts module, top-8, ``--batches`` calibration
batches of ``--tokens`` tokens), one thread:

- the FP forward: the family's own forward (``--impl``: transformers' grouped_mm or eager loop) against the
  stash's loop, and their largest output difference;
- the down-input Hessians and the cross-Gram in one accumulator pass (the pipeline's exact-sums path) with the FP
  products computed again from an FP copy of gate/up, against the stash (plus ``complete``'s near misses: one
  extra pair for every ``--near-every`` tokens), and the two cross-Grams' largest relative difference.

    OMP_NUM_THREADS=1 python benchmarks/bench_fp_stash.py [--sizes olmoe-like qwen3-30b-a3b]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

SIZES = {"fixture": (128, 64, 64), "olmoe-like": (1024, 1024, 64), "qwen3-30b-a3b": (2048, 768, 128)}  # d, I, E
TOP_K = 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["fixture", "qwen3-30b-a3b"], choices=list(SIZES))
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per calibration batch (8 windows of 256)")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--near-every", type=int, default=4, help="one near-miss pair per this many tokens")
    ap.add_argument("--impl", default="grouped_mm", choices=["grouped_mm", "eager"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from vsraq_plugin.capture import ExpertCross, ExpertStash
    from vsraq_plugin.gptq import HessianAccumulator

    print(f"torch threads {torch.get_num_threads()}, top-{TOP_K}, {args.batches} x {args.tokens} tokens")
    for size in args.sizes:
        d, inter, E = SIZES[size]
        cfg = Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=inter, num_experts=E, num_experts_per_tok=TOP_K)
        cfg._experts_implementation = args.impl
        fp = Qwen3MoeExperts(cfg)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            fp.gate_up_proj.copy_(0.02 * torch.randn(fp.gate_up_proj.shape, generator=g))
            fp.down_proj.copy_(0.02 * torch.randn(fp.down_proj.shape, generator=g))
        quantized = copy.deepcopy(fp)
        with torch.no_grad():  # stands for the solved gate/up
            quantized.gate_up_proj.add_(0.002 * torch.randn(fp.gate_up_proj.shape, generator=g))
        T, B = args.tokens, args.batches
        xs = [torch.randn(T, d, generator=g) for _ in range(B)]
        scores = [torch.randn(T, E, generator=g) for _ in range(B)]
        idx = [s.topk(TOP_K + 1, dim=-1).indices for s in scores]
        ws = [torch.rand(T, TOP_K, generator=g) for _ in range(B)]
        with torch.no_grad():
            t0 = time.perf_counter()
            ref = [fp(x, i[:, :TOP_K], w) for x, i, w in zip(xs, idx, ws, strict=True)]
            t_family = time.perf_counter() - t0
            stash = ExpertStash()
            t0 = time.perf_counter()
            with stash.attach(fp):
                out = [fp(x, i[:, :TOP_K], w) for x, i, w in zip(xs, idx, ws, strict=True)]
            t_stash = time.perf_counter() - t0
        diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(out, ref, strict=True))
        # VSRAQ's pairs: the FP choices, then a near miss (the next choice) for every near_every-th token
        near = torch.arange(0, T, args.near_every)
        chosen = torch.arange(T).repeat_interleave(TOP_K)
        pairs = [(torch.cat([chosen, near]), torch.cat([i[:, :TOP_K].reshape(-1), i[near, TOP_K]])) for i in idx]
        t0 = time.perf_counter()
        stash.complete(fp, xs, pairs)
        t_complete = time.perf_counter() - t0
        fp_copy = fp.gate_up_proj.detach().clone()
        gate_up = quantized.gate_up_proj.detach().float()
        results = {}
        for name, cross in (
            ("recompute", ExpertCross(fp_copy, xs, True)),
            ("stash", ExpertCross(None, xs, True, stash, 0, (E, inter))),
        ):
            acc = HessianAccumulator(inter, E, exact=True)
            t0 = time.perf_counter()
            for b, (t, e) in enumerate(pairs):
                w = torch.rand(t.numel(), generator=torch.Generator().manual_seed(b)) + 0.1
                cross.add(quantized, gate_up, xs[b], b, t, e, w, acc)
            results[name] = (time.perf_counter() - t0, cross.matrix())
        (t_re, C_re), (t_st, C_st) = results["recompute"], results["stash"]
        rel = float((C_st - C_re).abs().max() / C_re.abs().max())
        print(
            f"{size} (d {d}, I {inter}, E {E}): FP forward {args.impl} {t_family:.2f} s, stash {t_stash:.2f} s "
            f"({t_stash / t_family:.2f}x, max rel diff {diff:.1e}); Hessians + cross-Gram recompute {t_re:.2f} s, "
            f"stash {t_st:.2f} s + complete {t_complete:.2f} s ({(t_st + t_complete) / t_re:.2f}x, max rel diff "
            f"{rel:.1e}); stash {stash.bytes / 2**20:.0f} MiB for {B * T} tokens",
            flush=True,
        )


if __name__ == "__main__":
    main()
