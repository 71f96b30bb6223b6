"""GPTQ v1 packing of one MoE layer's experts: the whole-word packer against the general bit-stream packer, side
by side in one run (same codes, bitwise equal outputs checked).

Shapes are Qwen3-30B-A3B's experts (gate/up fused 1536 x 2048, down 2048 x 768) and DeepSeek-V3's (4096 x 7168,
7168 x 2048); the per-layer figure multiplies by the expert count (128 / 256). Packing runs after the solve, in
both methods (on the solve device in a streamed run since 2026-12-04; on the host before, where on an H200 it was
about half of gptq's 5.6 s a layer at Qwen3-30B-A3B's shape). The codes here are float (the README's figures were
measured so); the solver's are uint8, and both packers convert either.

    OMP_NUM_THREADS=1 python benchmarks/bench_packing.py [--threads 1] [--bits 4 2 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from vsraq_plugin import packing

SHAPES = {  # name: ((out, in) of each projection, experts per layer)
    "qwen3-30b-a3b": ([(1536, 2048), (2048, 768)], 128),
    "deepseek-v3": ([(4096, 7168), (7168, 2048)], 256),
}


def best_of(fn, repeats: int) -> float:
    t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2, 8])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); one expert's codes (in, out) packed along in")
    print("| model | bits | projection | bit stream ms | whole words ms | speed-up | per layer, s (stream -> words) |")
    print("|---|---:|---|---:|---:|---:|---|")
    g = torch.Generator().manual_seed(0)
    for model, (shapes, experts) in SHAPES.items():
        for bits in args.bits:
            for out_f, in_f in shapes:
                codes = torch.randint(0, 2**bits, (in_f, out_f), generator=g).float()
                assert torch.equal(packing._pack_stream(codes, bits), packing.pack_codes(codes, bits))
                stream = best_of(lambda: packing._pack_stream(codes, bits), args.repeats)
                words = best_of(lambda: packing.pack_codes(codes, bits), args.repeats)
                print(
                    f"| {model} | {bits} | {out_f} x {in_f} | {stream * 1e3:.1f} | {words * 1e3:.1f} | "
                    f"{stream / words:.1f}x | {stream * experts:.1f} -> {words * experts:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
