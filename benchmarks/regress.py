"""CI regression gate: VSRAQ must keep more routing decisions and a lower KL than stock GPTQ (and agq).

On the shipped fixture at W4g64 and W3g64, fixed calibration windows, every window of the eval slice
(129 x 256 tokens, 132k routing decisions), one thread:
- VSRAQ's top-k-set disagreement with FP  <= DISAGREEMENT_RATIO[bits] x stock gptq's, and < agq's;
- VSRAQ's next-token KL to FP             <= KL_RATIO x stock gptq's;
- with ``--gptqmodel-python`` (CI passes it): the same two checks against gptqmodel 7.7's stock GPTQ, run
  in its own venv on the same calibration windows and loaded by the plugin's loader; and VSRAQ's disagreement
  and KL below gptqmodel's GPTAQ (alpha 0.25) and FOEM (beta 0.2), the stronger stock options.
On the two 6-layer fixtures of ``benchmarks/fixtures`` (fine-grained Qwen3-MoE, DeepSeek-V3 style), VSRAQ
against our gptq at both widths, with the ratios in EXTRA_FIXTURES.
Writes ``regress.json`` (every number and verdict) and exits non-zero when an enforced check fails.

Issue #5 asked for 0.85x disagreement and 1.02x KL; the method has since got to about 0.60-0.63x and 0.64-0.69x
(output metrics, DESIGN 3.5b/3.5d; FP targets, 3.5c) and since to 0.43-0.47x and 0.52-0.57x (the depth terms and
the probe metrics of issue #14; KL 0.49-0.54x with the grid's clipping search), so the gate now enforces 0.55x
and 0.60x, at both widths, against both stock GPTQs. Every method runs with its QuantConfig defaults (group-aware
act-order for all, the clipping search for vsraq only: the stock methods keep stock GPTQ's grid). Thresholds are
never loosened to pass; raise them as the method improves.

    OMP_NUM_THREADS=1 python benchmarks/regress.py [--out regress.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate_vsraq import measure, table

HERE = Path(__file__).resolve().parent
GPTQMODEL = "gptqmodel 7.7 gptq"
# The strongest stock options a user would pick instead (issue #14): GPTAQ (asymmetric calibration, alpha 0.25;
# its experts see every token, see peers/gptqmodel_quantize.py) and FOEM (first-order error compensation, beta 0.2).
# Measured on the fixture, GPTAQ that way is far worse than stock GPTQ (W4 KL .082 against .0016: the override
# also routes the calibration forward through every expert), so its rows are reported, not enforced; FOEM is.
STOCK_VARIANTS = {"gptaq": "gptqmodel 7.7 gptaq", "foem": "gptqmodel 7.7 foem"}

# Enforced (issue #5 started at 0.85, 0.75 until the depth terms of issue #14, 0.65 until its probe metrics (q/k
# through softmax, DESIGN 3.5d): reached 0.431-0.467x since, against both stock GPTQs).
DISAGREEMENT_RATIO = {4: 0.55, 3: 0.55}
# The fine-grained and DeepSeek-style fixtures (issue #14): VSRAQ against our gptq only, thresholds from what the
# method reaches there (with the grid's clipping search as vsraq's default: disagreement 0.653-0.660x, KL
# 0.567-0.661x at W3/W4 g64; with the probe metrics before it 0.682-0.701x / 0.610-0.688x, gated at 0.76 / 0.75;
# with the depth terms alone 0.722-0.737x / 0.655-0.725x, gated at 0.80 / 0.80; before them 0.77-0.79x /
# 0.72-0.82x, gated at 0.85 / 0.90), with a margin for another CPU's rounding.
EXTRA_FIXTURES = {"tiny-qwen3-moe": (0.71, 0.71), "tiny-deepseek-v3": (0.71, 0.71)}  # (disagreement, KL) ratios
# Enforced (issue #5 started at 1.02; 0.85 until issue #14's depth terms, 0.75 until its probe metrics, 0.65 until
# the grid's clipping search: 0.485-0.540x since, against both stock GPTQs).
KL_RATIO = 0.60
BITS = (4, 3)
GROUP_SIZE = 64


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("regress.json"))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=1000, help="cap on eval windows (default: all)")
    ap.add_argument(
        "--gptqmodel-python", help="python of a venv with gptqmodel 7.7: adds its stock GPTQ as a gated row"
    )
    ap.add_argument("--fixture-only", action="store_true", help="only the shipped fixture (skip EXTRA_FIXTURES)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rows = {"gptq": dict(method="gptq"), "agq": dict(method="agq"), "vsraq": dict(method="vsraq")}
    peers = _gptqmodel_peer(args.gptqmodel_python) if args.gptqmodel_python else None
    report = measure(rows, list(BITS), GROUP_SIZE, args.n_samples, args.eval_windows, peers=peers)
    print(table(report))
    checks, ok = [], True
    for bits in BITS:
        m = {name: report["models"][f"{name} W{bits}g{GROUP_SIZE}"] for name in rows}
        if peers:
            for label in (GPTQMODEL, *STOCK_VARIANTS.values()):
                m[label] = report["models"][f"{label} W{bits}g{GROUP_SIZE}"]
        dis = {name: 1.0 - v["topk_set_agreement"] for name, v in m.items()}
        ratio = dis["vsraq"] / dis["gptq"]
        limit = DISAGREEMENT_RATIO[bits]
        peer_checks = []
        if peers:
            peer_ratio = dis["vsraq"] / dis[GPTQMODEL]
            peer_checks = [
                (f"disagreement vs {GPTQMODEL}", peer_ratio <= limit, True, f"{peer_ratio:.3f}x <= {limit}x"),
                (
                    f"KL vs {GPTQMODEL}",
                    m["vsraq"]["kl"] <= KL_RATIO * m[GPTQMODEL]["kl"],
                    True,
                    f"{m['vsraq']['kl']:.5f} <= {KL_RATIO} x {m[GPTQMODEL]['kl']:.5f}",
                ),
            ]
            for variant, label in STOCK_VARIANTS.items():  # below the stronger stock options, on both metrics
                enforce = variant != "gptaq"  # reported only: its all-token expert calibration makes it a weak anchor
                peer_checks += [
                    (f"disagreement vs {label}", dis["vsraq"] < dis[label], enforce,
                     f"{dis['vsraq']:.4f} < {dis[label]:.4f}"),
                    (f"KL vs {label}", m["vsraq"]["kl"] < m[label]["kl"], enforce,
                     f"{m['vsraq']['kl']:.5f} < {m[label]['kl']:.5f}"),
                ]  # fmt: skip
        for what, passed, enforced, detail in (
            ("disagreement vs gptq", ratio <= limit, True, f"{ratio:.3f}x <= {limit}x"),
            ("disagreement vs agq", dis["vsraq"] < dis["agq"], True, f"{dis['vsraq']:.4f} < {dis['agq']:.4f}"),
            (
                "KL vs gptq",
                m["vsraq"]["kl"] <= KL_RATIO * m["gptq"]["kl"],
                True,
                f"{m['vsraq']['kl']:.5f} <= {KL_RATIO} x {m['gptq']['kl']:.5f}",
            ),
            *peer_checks,
        ):
            verdict = "PASS" if passed else ("FAIL" if enforced else "PENDING")
            checks.append({"bits": bits, "check": what, "enforced": enforced, "passed": bool(passed), "detail": detail})
            ok &= bool(passed) or not enforced
            print(f"W{bits}: {what}: {verdict} ({detail})")
    if not args.fixture_only:
        for name, (dis_limit, kl_limit) in EXTRA_FIXTURES.items():
            path = HERE / "fixtures" / name
            pair = {"gptq": dict(method="gptq"), "vsraq": dict(method="vsraq")}
            sub = measure(pair, list(BITS), GROUP_SIZE, args.n_samples, args.eval_windows, model_path=path)
            print(f"{name}:")
            print(table(sub))
            report[name] = sub
            for bits in BITS:
                g, v = (sub["models"][f"{n} W{bits}g{GROUP_SIZE}"] for n in ("gptq", "vsraq"))
                ratio = (1.0 - v["topk_set_agreement"]) / (1.0 - g["topk_set_agreement"])
                for what, passed, detail in (
                    ("disagreement vs gptq", ratio <= dis_limit, f"{ratio:.3f}x <= {dis_limit}x"),
                    ("KL vs gptq", v["kl"] <= kl_limit * g["kl"], f"{v['kl']:.5f} <= {kl_limit} x {g['kl']:.5f}"),
                ):
                    checks.append({"fixture": name, "bits": bits, "check": what, "enforced": True,
                                   "passed": bool(passed), "detail": detail})  # fmt: skip
                    ok &= bool(passed)
                    print(f"{name} W{bits}: {what}: {'PASS' if passed else 'FAIL'} ({detail})")
    report["gate"] = {
        "disagreement_ratio": DISAGREEMENT_RATIO,
        "kl_ratio": KL_RATIO,
        "checks": checks,
        "passed": ok,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"regression gate: {'PASSED' if ok else 'FAILED'} ({args.out})")
    return 0 if ok else 1


def _gptqmodel_peer(python: str):
    """Quantize the fixture with gptqmodel's default GPTQ (sym, no act-order, its own damping) in its venv, on
    the gate's calibration windows; load the checkpoint with the plugin's loader."""
    from safetensors.torch import save_file

    from vsraq_plugin.checkpoint import load_checkpoint
    from vsraq_plugin.cli import fixture_path

    work = Path(tempfile.mkdtemp(prefix="vsraq-gate-"))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "OMP_NUM_THREADS": "1"}

    def run(calib: torch.Tensor, bits: int) -> dict:
        windows = work / "calib_windows.safetensors"
        save_file({"windows": calib.contiguous()}, str(windows))
        models = {}
        for variant, label in (("gptq", GPTQMODEL), *STOCK_VARIANTS.items()):
            out = work / f"gptqmodel_{variant}_W{bits}g{GROUP_SIZE}"
            cmd = [python, str(HERE / "peers" / "gptqmodel_quantize.py"), str(fixture_path()), str(windows)]
            cmd += ["--bits", str(bits), "--group-size", str(GROUP_SIZE), "--variant", variant, "--out", str(out)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)  # it writes logs/ in cwd
            if proc.returncode != 0:
                raise SystemExit(f"gptqmodel {variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            models[f"{label} W{bits}g{GROUP_SIZE}"] = (load_checkpoint(out), time.perf_counter() - t0)
        return models

    return run


if __name__ == "__main__":
    sys.exit(main())
