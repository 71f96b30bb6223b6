"""Ablation of the VSRAQ terms on a fixture (default: the shipped tiny-mixtral; ``--fixture PATH`` for another
model folder with ``calib.txt`` and ``eval.txt``), against rtn / stock gptq / agq, same data, one run.

Rows: rtn, gptq (no group-aware act-order: the GPTQ reference), gptq, agq (the QuantConfig defaults, GAR on),
then VSRAQ with one family of terms at a time: value only (router re-fit), value+structure (re-fit + boundary
rows + reweighting), experts only (FP decisions x affinity x downstream fragility + near misses), attention
only (own-layer fragility weights), metric only (output metric of o_proj and the down projections, DESIGN
3.5b), metric + v_proj (3.5d), metric + v_proj + gate/up (3.5d), FP targets of the residual writers only
(3.5c); then full VSRAQ without the metrics, without the FP targets, without the probe metrics of q/k and of the
dense / shared MLPs' gate/up (3.5d), with the router quantized, and with the defaults. Columns: top-k set agreement,
top-1 agreement, perplexity, KL to FP, quantization time.
``--rows`` keeps only the named rows; ``--attribution`` adds each MoE layer's local / inherited disagreement
(DESIGN 3.5e; one extra attention + router pass per layer and model) and a per-layer table; ``--write-sources``
each MoE router's logit error split over the residual writes before it (``evaluation.py``), as report.md's table.

``--refine``: instead, block-wise refinement (DESIGN 3.7, ``refine.py``) on top of gptq and of vsraq:
reconstruction only (AutoRound-like), + value term, + structure term (``--refine-steps`` per block).

    OMP_NUM_THREADS=1 python benchmarks/ablate_vsraq.py [--bits 4 3] [--group-size 64] [--refine]
    OMP_NUM_THREADS=1 python benchmarks/ablate_vsraq.py --fixture benchmarks/fixtures/tiny-qwen3-moe \
        --rows gptq "vsraq full" --attribution --eval-windows 0 --out qwen3.json
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
    lambda_metric_qk=0.0,
    lambda_metric_mlp=0.0,
    fp_target_alpha=0.0,
    drift_beta=0.0,
    metric_horizon=1,
    mse=0.0,
)
NO_PROBES = dict(lambda_metric_qk=0.0, lambda_metric_mlp=0.0)
NO_METRIC = dict(lambda_metric=0.0, lambda_metric_v=0.0, lambda_metric_up=0.0, **NO_PROBES)
ROWS: dict[str, dict] = {
    "rtn": dict(method="rtn"),
    "gptq reference (no GAR)": dict(method="gptq", act_group_aware=False),
    "gptq": dict(method="gptq"),
    "gptq + mse 2.4": dict(method="gptq", mse=2.4),
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
    "vsraq full, next router only in the metric": dict(method="vsraq", metric_horizon=1),
    "vsraq full, FP targets alpha 0.5": dict(method="vsraq", fp_target_alpha=0.5),
    "vsraq full + drift 0.5": dict(method="vsraq", drift_beta=0.5),
    "vsraq full without q/k probes": dict(method="vsraq", lambda_metric_qk=0.0),
    "vsraq full without MLP probes": dict(method="vsraq", lambda_metric_mlp=0.0),
    "vsraq full without the grid search": dict(method="vsraq", mse=0.0),
    "vsraq full as of 2026-12-03": dict(method="vsraq", mse=0.0, **NO_PROBES),
    "vsraq full as of 2026-12-01": dict(
        method="vsraq", metric_horizon=1, fp_target_alpha=0.5, drift_beta=0.0, mse=0.0, **NO_PROBES
    ),
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
    attribution: bool = False,
    write_sources: bool = False,
) -> dict:
    """Quantize the fixture (``model_path``, default the shipped one) with every row's settings at every width;
    evaluate all against FP in one pass (``eval_windows``: at most that many, None for all of eval.txt).

    ``peers(calib, bits)``, when given, returns ``{label: (model, seconds)}`` quantized by another tool on the
    same calibration windows (the gate's gptqmodel row). ``attribution``: local / inherited flips per layer."""
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
    metrics = evaluate(fp, models, ev, progress=False, attribution=attribution, write_sources=write_sources)
    report = build_report(metrics, str(path), str(path / "eval.txt"), ev.numel())
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


def layer_table(report: dict) -> str:
    """Per MoE layer: top-k disagreement, and its local / inherited parts when attributed."""
    models = report["models"]
    n = max(len(m["per_layer"]["topk_set_agreement"]) for m in models.values())
    lines = ["| run | " + " | ".join(f"layer {i}" for i in range(n)) + " |", "|---|" + "---:|" * n]
    for label, m in models.items():
        pl = m["per_layer"]
        total = [100 * (1 - a) for a in pl["topk_set_agreement"]]
        if "local_disagreement" in pl:
            loc = [100 * x for x in pl["local_disagreement"]]
            inh = [100 * x for x in pl["inherited_disagreement"]]
            cells = [f"{t:.2f} = {a:.2f} + {b:.2f}" for t, a, b in zip(total, loc, inh, strict=True)]
        else:
            cells = [f"{t:.2f}" for t in total]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    attributed = any("local_disagreement" in m["per_layer"] for m in models.values())
    note = "top-k disagreement % per MoE layer" + (" = local + inherited" if attributed else "")
    return note + "\n\n" + "\n".join(lines)


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
    ap.add_argument("--eval-windows", type=int, default=64, help="0: every window of eval.txt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fixture", "--model", dest="fixture", type=Path, help="model folder with calib.txt and eval.txt")
    ap.add_argument("--rows", nargs="+", help="only these rows (names as printed, e.g. gptq 'vsraq full')")
    ap.add_argument("--attribution", action="store_true", help="local / inherited flips per MoE layer")
    ap.add_argument(
        "--write-sources", action="store_true", help="each router's logit error split over the writes before it"
    )
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
        peers = _autoround_peer(args.autoround_python, args.fixture, args.group_size, args.refine_steps)
    if args.rows:
        unknown = sorted(set(args.rows) - set(rows))
        if unknown:
            raise SystemExit(f"unknown rows {unknown}; choose from {list(rows)}")
        rows = {name: rows[name] for name in args.rows}
    windows = args.eval_windows or None
    report = measure(
        rows,
        args.bits,
        args.group_size,
        args.n_samples,
        windows,
        args.fixture,
        peers=peers,
        attribution=args.attribution,
        write_sources=args.write_sources,
    )
    print(table(report))
    print()
    print(layer_table(report))
    if args.write_sources:
        from vsraq_plugin.evaluation import source_table

        print(source_table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
