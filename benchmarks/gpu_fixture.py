"""The fixtures quantized on the GPU and on the CPU, side by side: codes, routing metrics, time, memory.

Same model, same calibration windows, same settings; only ``QuantConfig.device`` differs. The GPU run must give
the CPU run's codes on at least 99.9 % of the weights (float32 summation order differs between the devices, so
a few grid decisions on a tie may flip), and the same routing agreement and KL to FP within noise. Needs CUDA.
``--models`` takes fixture folders (default: the shipped fixture); only the first ``--cpu-models`` of them also
run on the CPU (the others are timed on the GPU alone). One untimed GPU quantization runs first, so CUDA's
start-up is in no timed row. Last, per model and width: VSRAQ's GPU time over gptq's.

    python benchmarks/gpu_fixture.py [--models DIR ...] [--cpu-models 1] [--bits 4 3] [--methods gptq vsraq]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--methods", nargs="+", default=["gptq", "vsraq"])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=129)
    ap.add_argument("--threads", type=int, default=8, help="CPU threads for the CPU run")
    ap.add_argument("--min-agreement", type=float, default=0.999)
    ap.add_argument("--models", nargs="+", help="fixture folders (default: the shipped fixture)")
    ap.add_argument("--cpu-models", type=int, default=1, help="how many of --models also run on the CPU")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_fixture: no CUDA device; nothing to compare.")
        return 2
    torch.set_num_threads(args.threads)
    from vsraq_plugin.calibration import calibration_windows
    from vsraq_plugin.cli import fixture_path, load_model, load_tokenizer
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.evaluation import evaluate, token_windows
    from vsraq_plugin.pipeline import quantize_model

    paths = [Path(m) for m in args.models] if args.models else [fixture_path()]
    rows, ok, warm = [], True, False
    for index, path in enumerate(paths):
        tok = load_tokenizer(path)
        calib = calibration_windows(tok, path / "calib.txt", 256, args.n_samples)
        eval_ids = token_windows(tok, (path / "eval.txt").read_text(encoding="utf-8"), 256, args.eval_windows)
        fp = load_model(path)
        if not warm:  # CUDA context, cuBLAS/cuSOLVER handles, allocator: out of every timed run
            quantize_model(copy.deepcopy(fp), calib[:8], QuantConfig(bits=4, group_size=args.group_size,
                           method="vsraq", device="cuda"), progress=False)  # fmt: skip
            warm = True
        devices = ("cpu", "cuda") if index < args.cpu_models else ("cuda",)
        for bits in args.bits:
            for method in args.methods:
                runs = {}
                for device in devices:
                    model = copy.deepcopy(fp)
                    torch.cuda.reset_peak_memory_stats()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    cfg = QuantConfig(bits=bits, group_size=args.group_size, method=method, device=device)
                    res = quantize_model(model, calib, cfg, progress=False)
                    torch.cuda.synchronize()
                    runs[device] = (model, res, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**20)
                agree = float("nan")
                if "cpu" in runs:
                    same = total = 0
                    for name, qw in runs["cpu"][1].weights.items():
                        other = runs["cuda"][1].weights[name]
                        same += int((qw.codes.cpu() == other.codes.cpu()).sum())
                        total += qw.codes.numel()
                    agree = same / total
                    ok &= agree >= args.min_agreement
                metrics = {}
                ref = fp.to("cuda")
                for device, (model, _, _, _) in runs.items():
                    metrics[device] = evaluate(ref, {device: model.to("cuda")}, eval_ids, 8, progress=False)[device]
                fp.to("cpu")
                nan = {"topk_set_agreement": float("nan"), "kl": float("nan"), "perplexity": float("nan")}
                rows.append(
                    {
                        "model": path.name,
                        "run": f"{method} W{bits}g{args.group_size}",
                        "method": method,
                        "bits": bits,
                        "codes_equal": agree,
                        "cpu_seconds": runs["cpu"][2] if "cpu" in runs else float("nan"),
                        "gpu_seconds": runs["cuda"][2],
                        "gpu_peak_mb": runs["cuda"][3],
                        **{f"{d}_{k}": metrics.get(d, nan)[k] for d in ("cpu", "cuda") for k in nan},
                    }
                )
    head = ["model", "run", "codes equal", "CPU agreement", "GPU agreement", "CPU KL", "GPU KL", "CPU ppl"]
    head += ["GPU ppl", "CPU s", "GPU s", "GPU peak MiB"]
    print("| " + " | ".join(head) + " |")
    print("|---|---|" + "---:|" * (len(head) - 2))
    for r in rows:
        cells = [r["model"], r["run"], f"{100 * r['codes_equal']:.3f} %"]
        cells += [f"{100 * r[f'{d}_topk_set_agreement']:.2f} %" for d in ("cpu", "cuda")]
        cells += [f"{r[f'{d}_kl']:.5f}" for d in ("cpu", "cuda")]
        cells += [f"{r[f'{d}_perplexity']:.3f}" for d in ("cpu", "cuda")]
        cells += [f"{r['cpu_seconds']:.1f}", f"{r['gpu_seconds']:.1f}", f"{r['gpu_peak_mb']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    for r in rows:  # VSRAQ's GPU time over gptq's, same model and width
        key = (r["model"], r["bits"], "gptq")
        g = next((b for b in rows if (b["model"], b["bits"], b["method"]) == key), None)
        if g is not None and r["method"] != "gptq":
            ratio = r["gpu_seconds"] / g["gpu_seconds"]
            print(f"{r['model']} W{r['bits']}: {r['method']} / gptq GPU time {ratio:.2f}x", end=" ")
            print(f"({r['gpu_seconds']:.1f} s / {g['gpu_seconds']:.1f} s)")
    print(json.dumps(rows))
    print(f"gpu_fixture: {'PASS' if ok else 'FAIL'} (codes equal >= {100 * args.min_agreement:.1f} % on every run)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
