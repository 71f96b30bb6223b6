"""CI regression gate: VSRAQ must keep more routing decisions and a lower KL than stock GPTQ (and agq).

On the shipped fixture at W4g64 and W3g64, fixed calibration windows, every window of the eval slice
(129 x 256 tokens, 132k routing decisions), one thread:
- VSRAQ's top-k-set disagreement with FP  <= DISAGREEMENT_RATIO[bits] x stock gptq's, and < agq's;
- VSRAQ's next-token KL to FP             <= KL_RATIO x stock gptq's.
Writes ``regress.json`` (every number and verdict) and exits non-zero when an enforced check fails.

Issue #5's target is a disagreement ratio of 0.85 at both widths. W3 meets it (about 0.80x). W4 does not
yet (0.867x measured on all eval windows), so W4 is enforced at 0.90 to catch regressions, and the 0.85
target is checked and reported as PENDING in regress.json. Raise W4 to 0.85 when the method gets there;
thresholds are never loosened to pass.

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

TARGET_DISAGREEMENT_RATIO = 0.85
DISAGREEMENT_RATIO = {4: 0.90, 3: 0.85}  # enforced; see the module docstring for W4
KL_RATIO = 1.02
BITS = (4, 3)
GROUP_SIZE = 64


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("regress.json"))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=1000, help="cap on eval windows (default: all)")
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
        ratio = dis["vsraq"] / dis["gptq"]
        limit = DISAGREEMENT_RATIO[bits]
        for what, passed, enforced, detail in (
            ("disagreement vs gptq", ratio <= limit, True, f"{ratio:.3f}x <= {limit}x"),
            (
                "disagreement target (issue #5)",
                ratio <= TARGET_DISAGREEMENT_RATIO,
                False,
                f"{ratio:.3f}x <= {TARGET_DISAGREEMENT_RATIO}x",
            ),
            ("disagreement vs agq", dis["vsraq"] < dis["agq"], True, f"{dis['vsraq']:.4f} < {dis['agq']:.4f}"),
            (
                "KL vs gptq",
                m["vsraq"]["kl"] <= KL_RATIO * m["gptq"]["kl"],
                True,
                f"{m['vsraq']['kl']:.5f} <= {KL_RATIO} x {m['gptq']['kl']:.5f}",
            ),
        ):
            verdict = "PASS" if passed else ("FAIL" if enforced else "PENDING")
            checks.append({"bits": bits, "check": what, "enforced": enforced, "passed": bool(passed), "detail": detail})
            ok &= bool(passed) or not enforced
            print(f"W{bits}: {what}: {verdict} ({detail})")
    report["gate"] = {
        "disagreement_ratio": DISAGREEMENT_RATIO,
        "target_disagreement_ratio": TARGET_DISAGREEMENT_RATIO,
        "kl_ratio": KL_RATIO,
        "checks": checks,
        "passed": ok,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"regression gate: {'PASSED' if ok else 'FAILED'} ({args.out})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
