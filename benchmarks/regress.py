"""CI regression gate: VSRAQ must keep more routing decisions and a lower KL than stock GPTQ (and agq).

On the shipped fixture at W4g64 and W3g64, fixed calibration and evaluation windows, one thread:
- VSRAQ's top-k-set disagreement with FP  <= DISAGREEMENT_RATIO x stock gptq's, and < agq's;
- VSRAQ's next-token KL to FP             <= KL_RATIO x stock gptq's.
Writes ``regress.json`` (every number and verdict) and exits non-zero when a check fails. The thresholds
are stated here and raised as the method improves; they are never loosened to pass.

    OMP_NUM_THREADS=1 python benchmarks/regress.py [--out regress.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate_vsraq import measure, table

DISAGREEMENT_RATIO = 0.85
KL_RATIO = 1.02
BITS = (4, 3)
GROUP_SIZE = 64


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("regress.json"))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rows = {"gptq": dict(method="gptq"), "agq": dict(method="agq"), "vsraq": dict(method="vsraq")}
    report = measure(rows, list(BITS), GROUP_SIZE, args.n_samples, args.eval_windows)
    print(table(report))
    checks, ok = [], True
    for bits in BITS:
        m = {name: report["models"][f"{name} W{bits}g{GROUP_SIZE}"] for name in rows}
        dis = {name: 1.0 - v["topk_set_agreement"] for name, v in m.items()}
        for what, passed, detail in (
            (
                "disagreement vs gptq",
                dis["vsraq"] <= DISAGREEMENT_RATIO * dis["gptq"],
                f"{dis['vsraq']:.4f} <= {DISAGREEMENT_RATIO} x {dis['gptq']:.4f}",
            ),
            ("disagreement vs agq", dis["vsraq"] < dis["agq"], f"{dis['vsraq']:.4f} < {dis['agq']:.4f}"),
            (
                "KL vs gptq",
                m["vsraq"]["kl"] <= KL_RATIO * m["gptq"]["kl"],
                f"{m['vsraq']['kl']:.5f} <= {KL_RATIO} x {m['gptq']['kl']:.5f}",
            ),
        ):
            checks.append({"bits": bits, "check": what, "passed": bool(passed), "detail": detail})
            ok &= bool(passed)
            print(f"W{bits}: {what}: {'PASS' if passed else 'FAIL'} ({detail})")
    report["gate"] = {"disagreement_ratio": DISAGREEMENT_RATIO, "kl_ratio": KL_RATIO, "checks": checks, "passed": ok}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"regression gate: {'PASSED' if ok else 'FAILED'} ({args.out})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
