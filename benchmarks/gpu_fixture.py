"""The shipped fixture quantized on the GPU and on the CPU, side by side: codes, routing metrics, time, memory.

Same model, same calibration windows, same settings; only ``QuantConfig.device`` differs. The GPU run must give
the CPU run's codes on at least 99.9 % of the weights (float32 summation order differs between the devices, so
a few grid decisions on a tie may flip), and the same routing agreement and KL to FP within noise. Needs CUDA.

    python benchmarks/gpu_fixture.py [--bits 4 3] [--methods gptq vsraq] [--n-samples 128]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

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

    path = fixture_path()
    tok = load_tokenizer(path)
    calib = calibration_windows(tok, path / "calib.txt", 256, args.n_samples)
    eval_ids = token_windows(tok, (path / "eval.txt").read_text(encoding="utf-8"), 256, args.eval_windows)
    fp = load_model(path)
    rows, ok = [], True
    for bits in args.bits:
        for method in args.methods:
            runs = {}
            for device in ("cpu", "cuda"):
                model = copy.deepcopy(fp)
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                cfg = QuantConfig(bits=bits, group_size=args.group_size, method=method, device=device)
                res = quantize_model(model, calib, cfg, progress=False)
                torch.cuda.synchronize()
                runs[device] = (model, res, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**20)
            same = total = 0
            for name, qw in runs["cpu"][1].weights.items():
                other = runs["cuda"][1].weights[name]
                same += int((qw.codes.cpu() == other.codes.cpu()).sum())
                total += qw.codes.numel()
            agree = same / total
            metrics = {}
            ref = fp.to("cuda")
            for device, (model, _, _, _) in runs.items():
                m = evaluate(ref, {device: model.to("cuda")}, eval_ids, 8, progress=False)[device]
                metrics[device] = m
            fp.to("cpu")
            row = {
                "run": f"{method} W{bits}g{args.group_size}",
                "codes_equal": agree,
                "cpu_seconds": runs["cpu"][2],
                "gpu_seconds": runs["cuda"][2],
                "gpu_peak_mb": runs["cuda"][3],
                **{f"{d}_{k}": metrics[d][k] for d in metrics for k in ("topk_set_agreement", "kl", "perplexity")},
            }
            rows.append(row)
            ok &= agree >= args.min_agreement
    print("| run | codes equal | CPU agreement | GPU agreement | CPU KL | GPU KL | CPU ppl | GPU ppl | CPU s | GPU s "
          "| GPU peak MiB |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['run']} | {100 * r['codes_equal']:.3f} % | {100 * r['cpu_topk_set_agreement']:.2f} % | "
            f"{100 * r['cuda_topk_set_agreement']:.2f} % | {r['cpu_kl']:.5f} | {r['cuda_kl']:.5f} | "
            f"{r['cpu_perplexity']:.3f} | {r['cuda_perplexity']:.3f} | {r['cpu_seconds']:.1f} | {r['gpu_seconds']:.1f} "
            f"| {r['gpu_peak_mb']:.0f} |"
        )
    print(json.dumps(rows))
    print(f"gpu_fixture: {'PASS' if ok else 'FAIL'} (codes equal >= {100 * args.min_agreement:.1f} % on every run)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
