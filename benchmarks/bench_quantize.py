"""The fixture quantized by this project's pipeline vs gptqmodel 7.7's stock GPTQ, side by side in one run.

Same model (the shipped tiny Mixtral), same calibration tokens (written once to a safetensors file), same
bits and group size. Every quantization runs in its own process (wall time and peak RSS measured there);
every checkpoint is then loaded with this plugin's loader and evaluated against the FP model on the
fixture's eval text: routing agreement, perplexity, KL. ``--methods gptq vsraq:exact vsraq:fast`` compares the
two metric solves of VSRAQ (DESIGN 3.5f) with stock GPTQ (no gptqmodel needed without ``--gptqmodel-python``).

gptqmodel lives in its own venv (it wants its own torch pin):

    python3 -m venv /tmp/gqvenv && /tmp/gqvenv/bin/pip install torch==2.13.0
    grep -v '^torch' gptqmodel-7.7.0/requirements.txt > req.txt   # from `pip download --no-deps gptqmodel==7.7.0`
    /tmp/gqvenv/bin/pip install -r req.txt && /tmp/gqvenv/bin/pip install --no-deps gptqmodel==7.7.0

    OMP_NUM_THREADS=1 python benchmarks/bench_quantize.py --gptqmodel-python /tmp/gqvenv/bin/python
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

HERE = Path(__file__).resolve().parent


def child(args: argparse.Namespace) -> None:
    """Quantize with this plugin in this process and report time and peak RSS as one JSON line."""
    torch.set_num_threads(args.threads)
    from vsraq_plugin.checkpoint import save_checkpoint
    from vsraq_plugin.cli import load_model
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.pipeline import quantize_model

    windows = load_file(args.windows)["windows"]
    t0 = time.perf_counter()
    model = load_model(args.model)
    method, _, metric_solve = args.method.partition(":")  # e.g. vsraq:exact
    cfg = QuantConfig(bits=args.bits, group_size=args.group_size, method=method, metric_solve=metric_solve or "fast")
    result = quantize_model(model, windows, cfg, batch_size=8, progress=False)
    save_checkpoint(model, result, args.out)
    print(
        json.dumps(
            {
                "tool": f"plugin {args.method}",
                "seconds": time.perf_counter() - t0,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def _run(cmd: list[str], env: dict, cwd: Path) -> dict:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)  # peers write logs into cwd
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[1]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the shipped fixture)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["gptq", "agq", "rtn"],
        help="methods to run; vsraq:exact / vsraq:fast pick the metric solve (QuantConfig.metric_solve)",
    )
    ap.add_argument(
        "--gptqmodel-python",
        default=os.environ.get("GPTQMODEL_PYTHON"),
        help="python of a venv with gptqmodel 7.7 (omit to skip the peer row)",
    )
    ap.add_argument("--out", default=None, help="keep checkpoints and report.json here")
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--windows", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--bits-one", type=int, dest="bits_one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.bits = args.bits_one
        child(args)
        return

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from vsraq_plugin.checkpoint import load_checkpoint
    from vsraq_plugin.cli import fixture_path, load_model
    from vsraq_plugin.evaluation import build_report, evaluate, token_windows
    from vsraq_plugin.pipeline import calibration_windows

    model_path = Path(args.model).resolve() if args.model else fixture_path()
    tok = AutoTokenizer.from_pretrained(model_path)
    windows = calibration_windows(tok, model_path / "calib.txt", args.seq_len, args.n_samples)
    ev = token_windows(tok, (model_path / "eval.txt").read_text(encoding="utf-8"), args.seq_len, args.eval_windows)
    out = (Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-quantize-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    wfile = out / "calib_windows.safetensors"
    save_file({"windows": windows.contiguous()}, str(wfile))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "GPTQMODEL_CPU_WORKERS": "2"}
    print(
        f"model {model_path.name}; calibration {tuple(windows.shape)} tokens; eval {ev.numel()} tokens; "
        f"{args.threads} thread(s)"
    )

    rows, models = [], {}
    for bits in args.bits:
        runs = [
            (
                f"plugin {m}",
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--child",
                    "--model",
                    str(model_path),
                    "--windows",
                    str(wfile),
                    "--method",
                    m,
                    "--bits-one",
                    str(bits),
                    "--group-size",
                    str(args.group_size),
                    "--threads",
                    str(args.threads),
                ],
            )
            for m in args.methods
        ]
        if args.gptqmodel_python:
            runs.append(
                (
                    "gptqmodel 7.7 gptq",
                    [
                        args.gptqmodel_python,
                        str(HERE / "peers" / "gptqmodel_quantize.py"),
                        str(model_path),
                        str(wfile),
                        "--bits",
                        str(bits),
                        "--group-size",
                        str(args.group_size),
                        "--threads",
                        str(args.threads),
                    ],
                )
            )
        for name, cmd in runs:
            ckpt = out / f"{name.replace(' ', '_')}_W{bits}g{args.group_size}"
            info = _run([*cmd, "--out", str(ckpt)], env, out)
            label = f"{name} W{bits}g{args.group_size}"
            models[label] = load_checkpoint(ckpt)
            rows.append((label, info))
            print(f"  {label}: {info['seconds']:.1f}s, peak RSS {info['peak_rss_mb']:.0f} MB", flush=True)

    reference = load_model(model_path)
    report = build_report(evaluate(reference, models, ev), str(model_path), "eval.txt", ev.numel())
    for label, info in rows:
        report["models"][label].update(seconds=info["seconds"], peak_rss_mb=info["peak_rss_mb"])
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print("| run | wall s | peak RSS MB | top-k set agreement | top-1 | perplexity | KL to FP |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| FP | - | - | 100 % | 100 % | {report['reference']['perplexity']:.3f} | 0 |")
    for label, info in rows:
        m = report["models"][label]
        print(
            f"| {label} | {info['seconds']:.1f} | {info['peak_rss_mb']:.0f} | {100 * m['topk_set_agreement']:.2f} % | "
            f"{100 * m['top1_agreement']:.2f} % | {m['perplexity']:.3f} | {m['kl']:.5f} |"
        )
    print(f"\nreport: {out / 'report.json'}")


if __name__ == "__main__":
    main()
