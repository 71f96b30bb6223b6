"""Distributed quantization (DESIGN 7): one process against ``torchrun --nproc-per-node 2`` on the same model,
one thread a rank, side by side in one run; the checkpoints are compared byte for byte.

The model is a random Qwen3-MoE at Qwen3-30B-A3B's layer widths (hidden 2048, 32 q / 4 kv heads of 128, expert
intermediate 768, top-8) with ``--experts`` experts and ``--layers`` layers (bench_scale.make_model), so the
per-layer costs are those of the real layer with fewer experts. Printed per method: wall time and seconds per
layer at 1 and 2 ranks, the speed-up, the payload rank 0 moved per layer (``Dist.bytes_moved``), and whether the
two checkpoints are identical.

Then, on paper, a projection for 8 GPUs. From T1 = s + p and T2 = s + p / 2 (Amdahl, per layer), the serial part
s (attention solves, router re-fit, per-token plan) and the parallel part p (expert Hessians and solves,
calibration forwards) follow; with E_real experts the expert work grows by E_real / E, so one layer on N ranks
takes ``s + p * (E_real / E) / N``. The speed-up on 8 ranks is then ``(s + p k) / (s + p k / 8)``, applied to a
one-GPU time the user knows (llm-compressor reports 3.9 h of GPTQ for Qwen3-30B-A3B and about 48 h for
DeepSeek-R1 on one A100). Communication grows with the experts too (their float64 Hessians dominate the payload):
the per-layer payload times k, over an NVLink all-reduce bandwidth (``--link-gbps``, 150 GB/s) and over a
200 Gb/s InfiniBand link between nodes (25 GB/s). On this 2-core CPU the ranks share the cores with everything
else, so the measured speed-up is a floor; the projection says so.

    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py [--layers 2] [--experts 16] [--methods gptq vsraq]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Real models: (name, experts, MoE layers, reported one-GPU GPTQ hours, where the figure comes from).
REAL = [
    ("Qwen3-30B-A3B", 128, 48, 3.9, "llm-compressor, one GPU"),
    ("DeepSeek-V3/R1", 256, 58, 48.0, "llm-compressor, one A100"),
]


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--methods", nargs="+", default=["gptq", "vsraq"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--n-samples", type=int, default=8, help="calibration windows (split over the ranks)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--link-gbps", type=float, default=150.0, help="all-reduce bandwidth inside a node, GB/s")
    ap.add_argument("--node-gbps", type=float, default=25.0, help="bandwidth between nodes, GB/s")
    ap.add_argument("--work", type=Path, help="folder for the model and checkpoints (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path("bench_distributed.json"))
    args = ap.parse_args()

    from bench_scale import make_model, measure

    work = args.work or Path(tempfile.mkdtemp(prefix="vsraq-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / f"qwen3moe-{args.layers}L-{args.experts}e"
    if not (model_dir / "config.json").exists():
        make_model(model_dir, args.layers, args.experts)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["quantize", str(model_dir), "--bits", str(args.bits), "--group-size", str(args.group_size)]
    common += ["--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len)]
    common += ["--batch-size", str(args.batch_size), "--threads", "1"]
    rows = []
    for method in args.methods:
        outs = {}
        for ranks in (1, 2):
            out = work / f"q-{method}-{ranks}"
            shutil.rmtree(out, ignore_errors=True)
            launch = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
            cmd = [sys.executable, *launch, "-m", "vsraq_plugin", *common, "--method", method, "--out", str(out)]
            r = measure(cmd, env, work)
            seconds, stdout = r["seconds"], r["stdout"]
            per_layer = float(re.search(r"([\d.]+) s per layer on average", stdout).group(1))
            moved = re.search(r"([\d.]+) MiB moved by rank 0", stdout)
            outs[ranks] = out
            rows.append({"method": method, "ranks": ranks, "seconds": seconds, "layer_seconds": per_layer,
                         "moved_mib_per_layer": float(moved.group(1)) / args.layers if moved else 0.0})  # fmt: skip
            print(f"{method}, {ranks} rank(s): {seconds:.0f} s, {per_layer:.1f} s per layer", flush=True)
        rows[-1]["identical"] = same_files(outs[1], outs[2])

    print()
    print(f"Random Qwen3-MoE at Qwen3-30B-A3B widths, {args.experts} experts, {args.layers} layers, W{args.bits}"
          f"g{args.group_size}, {args.n_samples} x {args.seq_len} tokens, one thread a rank, this machine "
          f"({os.cpu_count()} cores, shared)")  # fmt: skip
    print("| method | ranks | wall s | s / layer | speed-up (per layer) | MiB moved / layer (rank 0) | same output |")
    print("|---|---:|---:|---:|---:|---:|---|")
    fits = {}
    for method in args.methods:
        one, two = (next(r for r in rows if r["method"] == method and r["ranks"] == n) for n in (1, 2))
        t1, t2 = one["layer_seconds"], two["layer_seconds"]
        s, p = max(2 * t2 - t1, 0.0), min(2 * (t1 - t2), t1)  # Amdahl: T1 = s + p, T2 = s + p / 2
        fits[method] = (t1 - p, p, two["moved_mib_per_layer"])
        for r in (one, two):
            same = "" if r["ranks"] == 1 else ("yes" if r.get("identical") else "NO")
            print(f"| {method} | {r['ranks']} | {r['seconds']:.0f} | {r['layer_seconds']:.1f} | "
                  f"{t1 / r['layer_seconds']:.2f}x | {r['moved_mib_per_layer']:.1f} | {same} |")  # fmt: skip
    print()
    print("Projection to 8 GPUs (Amdahl fit per layer: serial s, parallel p; expert work and payload x E_real/E):")
    print(
        "| model | method | s | p x k | speed-up on 8 | one-GPU h | 8 GPUs h (x speed-up) | comm / layer | "
        "NVLink s, all layers | 2 nodes s, all layers |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    projection = []
    for name, experts, layers, hours, source in REAL:
        k = experts / args.experts
        for method, (s, p, mib) in fits.items():
            speedup = (s + p * k) / (s + p * k / 8)
            # one-GPU hours of this method: GPTQ's reported figure times the measured method / gptq cost at k experts
            ratio = (s + p * k) / (fits["gptq"][0] + fits["gptq"][1] * k) if "gptq" in fits else 1.0
            gib = mib * k / 1024
            nv, ib = gib * 2**30 / (args.link_gbps * 1e9), gib * 2**30 / (args.node_gbps * 1e9)
            projection.append({"model": name, "method": method, "speedup_8": speedup, "comm_gib_per_layer": gib})
            print(f"| {name} | {method} | {s:.1f} | {p * k:.1f} | {speedup:.1f}x | {hours * ratio:.1f} ({source}"
                  f"{'' if method == 'gptq' else f', x{ratio:.2f} measured'}) | {hours * ratio / speedup:.1f} | "
                  f"{gib:.1f} GiB | {nv * layers:.0f} | {ib * layers:.0f} |")  # fmt: skip
    args.out.write_text(json.dumps({"rows": rows, "projection": projection}, indent=2) + "\n")
    if not all(r.get("identical", True) for r in rows):
        print("FAIL: 1 and 2 ranks wrote different checkpoints")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
