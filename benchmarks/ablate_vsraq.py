"""Ablation of the VSRAQ terms on the shipped fixture, against rtn / stock gptq / agq, same data, one run.

Rows: rtn, gptq (no group-aware act-order: the GPTQ reference), gptq, agq (the QuantConfig defaults, GAR on),
then VSRAQ with one family of terms at a time: value only (router re-fit), value+structure (re-fit + boundary
rows + reweighting), experts only (FP decisions x affinity x downstream fragility + near misses), attention
only (own-layer fragility weights), metric only (output metric of o_proj and the down projections, DESIGN
3.5b), metric + v_proj (3.5d), metric + v_proj + gate/up (3.5d), FP targets of the residual writers only
(3.5c); then full VSRAQ without the metrics, without the FP targets, with the router quantized, and with the
defaults. Columns: top-k set agreement, top-1 agreement, perplexity, KL to FP, quantization time.

``--refine``: instead, block-wise refinement (DESIGN 3.7, ``refine.py``) on top of gptq and of vsraq:
reconstruction only (AutoRound-like), + value term, + structure term (``--refine-steps`` per block).

    OMP_NUM_THREADS=1 python benchmarks/ablate_vsraq.py [--bits 4 3] [--group-size 64] [--refine]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

OFF = dict(
    lambda_value=0.0,
    lambda_structure=0.0,
    lambda_expert=0.0,
    lambda_attention=0.0,
    reweight_rounds=0,
    lambda_metric=0.0,
    lambda_metric_v=0.0,
    lambda_metric_up=0.0,
    fp_target_alpha=0.0,
)
NO_METRIC = dict(lambda_metric=0.0, lambda_metric_v=0.0, lambda_metric_up=0.0)
ROWS: dict[str, dict] = {
    "rtn": dict(method="rtn"),
    "gptq reference (no GAR)": dict(method="gptq", act_group_aware=False),
    "gptq": dict(method="gptq"),
    "agq": dict(method="agq"),
    "vsraq value only": dict(method="vsraq", **{**OFF, "lambda_value": 1.0}),
    "vsraq value+structure": dict(
        method="vsraq", **{**OFF, "lambda_value": 1.0, "lambda_structure": 1.0, "reweight_rounds": 2}
    ),
    "vsraq experts only": dict(method="vsraq", **{**OFF, "lambda_expert": 1.0}),
    "vsraq attention only": dict(method="vsraq", **{**OFF, "lambda_attention": 4.0}),
    "vsraq metric only": dict(method="vsraq", **{**OFF, "lambda_metric": 32.0}),
    "vsraq metric + v_proj": dict(method="vsraq", **{**OFF, "lambda_metric": 32.0, "lambda_metric_v": 256.0}),
    "vsraq metric + v_proj + gate/up": dict(
        method="vsraq",
        **{**OFF, "lambda_metric": 32.0, "lambda_metric_v": 256.0, "lambda_expert": 1.0, "lambda_metric_up": 64.0},
    ),
    "vsraq FP targets only": dict(method="vsraq", **{**OFF, "fp_target_alpha": 0.5}),
    "vsraq full without metrics": dict(method="vsraq", **NO_METRIC),
    "vsraq full without FP targets": dict(method="vsraq", fp_target_alpha=0.0),
    "vsraq full, router quantized": dict(method="vsraq", router_mode="quantize"),
    "vsraq full": dict(method="vsraq"),
}


def refine_rows(steps: int) -> dict[str, dict]:
    rec = dict(refine_steps=steps)
    val = dict(rec, refine_lambda_value=1.0)
    both = dict(val, refine_lambda_structure=1.0)
    rows = {"gptq": dict(method="gptq"), "vsraq": dict(method="vsraq")}
    for base in ("gptq", "vsraq"):
        rows[f"{base} + refine (reconstruction)"] = dict(method=base, **rec)
        rows[f"{base} + refine + value"] = dict(method=base, **val)
        rows[f"{base} + refine + value + structure"] = dict(method=base, **both)
    return rows


def measure(
    rows: dict[str, dict],
    bits_list: list[int],
    group_size: int,
    n_samples: int,
    eval_windows: int,
    model_path: Path | None = None,
    seq_len: int = 256,
    peers=None,
) -> dict:
    """Quantize the fixture with every row's settings at every width; evaluate all against FP in one pass.

    ``peers(calib, bits)``, when given, returns ``{label: (model, seconds)}`` quantized by another tool on the
    same calibration windows (the gate's gptqmodel row)."""
    from transformers import AutoTokenizer

    from vsraq_plugin.cli import fixture_path, load_model
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.evaluation import build_report, evaluate, token_windows
    from vsraq_plugin.pipeline import calibration_windows, quantize_model

    path = model_path or fixture_path()
    tok = AutoTokenizer.from_pretrained(path)
    calib = calibration_windows(tok, path / "calib.txt", seq_len, n_samples)
    ev = token_windows(tok, (path / "eval.txt").read_text(encoding="utf-8"), seq_len, eval_windows)
    fp = load_model(path)
    models, seconds = {}, {}
    for bits in bits_list:
        for name, kw in rows.items():
            label = f"{name} W{bits}g{group_size}"
            model = copy.deepcopy(fp)
            t0 = time.perf_counter()
            quantize_model(model, calib, QuantConfig(bits=bits, group_size=group_size, **kw), progress=False)
            seconds[label] = time.perf_counter() - t0
            models[label] = model
            print(f"  quantized {label} in {seconds[label]:.1f}s", flush=True)
        for label, (model, secs) in (peers(calib, bits) if peers else {}).items():
            models[label], seconds[label] = model, secs
            print(f"  quantized {label} in {secs:.1f}s", flush=True)
    report = build_report(evaluate(fp, models, ev, progress=False), str(path), "eval.txt", ev.numel())
    for label, s in seconds.items():
        report["models"][label]["seconds"] = s
    report["calibration"] = {"windows": int(calib.shape[0]), "seq_len": seq_len}
    return report


def table(report: dict) -> str:
    lines = [
        "| run | top-k set agreement | top-1 | perplexity | KL to FP | time s |",
        "|---|---:|---:|---:|---:|---:|",
        f"| FP | 100 % | 100 % | {report['reference']['perplexity']:.3f} | 0 | - |",
    ]
    for label, m in report["models"].items():
        lines.append(
            f"| {label} | {100 * m['topk_set_agreement']:.2f} % | {100 * m['top1_agreement']:.2f} % | "
            f"{m['perplexity']:.3f} | {m['kl']:.5f} | {m['seconds']:.1f} |"
        )
    return "\n".join(lines)


def _autoround_peer(python: str, model: Path | None, group_size: int, iters: int):
    """AutoRound (its own venv) on the same calibration text, loaded by the plugin's loader."""
    import os
    import subprocess
    import tempfile

    from vsraq_plugin.checkpoint import load_checkpoint
    from vsraq_plugin.cli import fixture_path

    path = model or fixture_path()
    script = Path(__file__).resolve().parent / "peers" / "autoround_quantize.py"
    work = Path(tempfile.mkdtemp(prefix="vsraq-autoround-"))

    def run(_calib, bits: int) -> dict:
        out = work / f"autoround_W{bits}"
        cmd = [python, str(script), str(path), "--bits", str(bits), "--group-size", str(group_size)]
        cmd += ["--iters", str(iters), "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)
        if proc.returncode != 0:
            raise SystemExit(f"auto-round failed:\n{proc.stderr[-3000:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        return {f"auto-round {iters} iters W{bits}g{group_size}": (load_checkpoint(out), info["seconds"])}

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the report JSON here")
    ap.add_argument("--refine", action="store_true", help="the refinement rows instead of the VSRAQ terms")
    ap.add_argument("--refine-steps", type=int, default=100)
    ap.add_argument(
        "--autoround-python", help="python of a venv with auto-round: only gptq, vsraq and AutoRound's own rows"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = refine_rows(args.refine_steps) if args.refine else ROWS
    peers = None
    if args.autoround_python:
        rows = {"gptq": dict(method="gptq"), "vsraq": dict(method="vsraq")}
        peers = _autoround_peer(args.autoround_python, args.model, args.group_size, args.refine_steps)
    report = measure(rows, args.bits, args.group_size, args.n_samples, args.eval_windows, args.model, peers=peers)
    print(table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
