"""Expert-wise mixed precision on a fixture: which experts get the bits matters, same budget (DESIGN 6, issue #16).

Budgets (default): an average of 3.0 bits over {2,3,4}, 2.5 over {2,3} and 3.5 over {3,4} for the routed experts
(attention at 4 bits, group size 64). Rows, for each ``--methods`` entry (gptq, vsraq): uniform W2/W3/W4 experts;
then per budget the measured allocation (each expert's gate/up and down as separate knapsack items, their damage
in the residual stream's read metric x the routing mass, exact knapsack; ``per expert``: one width per expert, its
solve losses summed; ``measured+fragility``: vsraq's damage weight with the next router's fragility), the seed paper's
router-norm + max-variance rule, random allocation (mean of ``--seeds`` seeds) and frequency allocation (most-routed
experts widest); ``--plain-norm``: also the measured rows with both parts' damages in the plain residual norm
instead of the stream's read metric. Columns: top-k set agreement, perplexity, KL to FP. Then the issue's
targets, checked. One thread.

    OMP_NUM_THREADS=1 python benchmarks/mixed_precision.py [--fixture benchmarks/fixtures/tiny-qwen3-moe]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

KEYS = ("topk_set_agreement", "perplexity", "kl")


def parse_budgets(text: str) -> list[tuple[float, list[int]]]:
    """``"3.0:2,3,4;2.5:2,3"`` -> ``[(3.0, [2, 3, 4]), (2.5, [2, 3])]``."""
    out = []
    for part in text.split(";"):
        budget, levels = part.split(":")
        out.append((float(budget), [int(b) for b in levels.split(",")]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", type=Path, help="model folder with calib.txt and eval.txt (default: the shipped one)")
    ap.add_argument("--methods", default="gptq,vsraq")
    ap.add_argument("--budgets", default="3.0:2,3,4;2.5:2,3;3.5:3,4", help="budget:levels;...")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--no-baselines", action="store_true", help="only uniform and measured rows")
    ap.add_argument("--scopes", default="layer,model", help="budget scopes of the measured rows")
    ap.add_argument(
        "--plain-norm", action="store_true",
        help="also the measured rows with damages in the plain residual norm (damage_metric='residual')",
    )  # fmt: skip
    ap.add_argument("--json", type=Path, help="write every row here (JSON lines) as it finishes")
    ap.add_argument(
        "--dynamic", type=json.loads, default={},
        help="GPTQ dynamic overrides of non-expert linears, the same in every row (JSON), e.g. dense layers at 8 bits",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from vsraq_plugin.cli import fixture_path, load_model, load_router_init
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.evaluation import evaluate, token_windows
    from vsraq_plugin.models import get_adapter
    from vsraq_plugin.pipeline import calibration_windows, quantize_model

    path = args.fixture or fixture_path()
    tok = AutoTokenizer.from_pretrained(path)
    calib = calibration_windows(tok, path / "calib.txt", 256, args.n_samples)
    ev = token_windows(tok, (path / "eval.txt").read_text(encoding="utf-8"), 256, args.eval_windows)
    fp = load_model(path)
    adapter = get_adapter(fp)
    router_init = load_router_init(path)
    moe = adapter.moe_layers(fp)
    E = adapter.num_experts()
    sink = args.json.open("a") if args.json else None
    print(f"fixture {path.name}: {len(moe)} MoE layers x {E} experts; torch threads {torch.get_num_threads()}")

    def run(method: str, label: str, cfg: QuantConfig, bits: dict | None = None) -> dict:
        model = copy.deepcopy(fp)
        t0 = time.perf_counter()
        res = quantize_model(model, calib, cfg, progress=False, router_init=router_init, expert_bits=bits)
        seconds = time.perf_counter() - t0
        m = evaluate(fp, {label: model}, ev, progress=False)[label]
        row = {k: m[k] for k in KEYS} | {"method": method, "label": label, "seconds": seconds}
        row["expert_bits"] = res.summary.get("expert_bits")
        row["expert_down_bits"] = res.summary.get("expert_down_bits")
        print(
            f"  [{method}] {label}: agreement {100 * m['topk_set_agreement']:.2f} %, ppl {m['perplexity']:.3f}, "
            f"KL {m['kl']:.5f} ({seconds:.0f} s)",
            flush=True,
        )
        if sink is not None:
            sink.write(json.dumps(row, default=str) + "\n")
            sink.flush()
        return row

    def mean(rows: list[dict]) -> dict:
        return {k: statistics.mean(r[k] for r in rows) for k in KEYS}

    table: dict[str, list[tuple[str, dict]]] = {}
    for method in args.methods.split(","):
        rows: list[tuple[str, dict]] = table.setdefault(method, [])
        base = dict(bits=4, group_size=64, method=method, dynamic=args.dynamic)
        for width in (2, 3, 4):
            bits = {layer.index: torch.full((E,), width) for layer in moe}
            rows.append((f"uniform W{width}", run(method, f"uniform W{width}", QuantConfig(**base), bits)))
        for budget, levels in parse_budgets(args.budgets):
            cfg = QuantConfig(**base, bits_budget=budget, bit_levels=levels)
            tag = f"{budget} over {{{','.join(map(str, levels))}}}"
            for scope in args.scopes.split(","):
                name = "measured" if scope == "layer" else "measured (model scope)"
                rows.append((f"{name} {tag}", run(method, f"{name} {tag}", cfg.replace(budget_scope=scope))))
                if args.plain_norm:  # the damages of both parts in the plain residual norm (before the read metric)
                    label = f"{name} plain norm {tag}"
                    rows.append((label, run(method, label, cfg.replace(budget_scope=scope, damage_metric="residual"))))
                label = f"{name} per expert {tag}"  # one width per expert (the default before widths per projection)
                per_expert = cfg.replace(budget_scope=scope, width_per_projection=False)
                rows.append((label, run(method, label, per_expert)))
                if method == "vsraq":
                    label = f"{name}+fragility {tag}"
                    frag = cfg.replace(budget_scope=scope, allocation_weight="fragility")
                    rows.append((label, run(method, label, frag)))
            if args.no_baselines:
                continue
            rule = cfg.replace(allocation="router-norm")
            rows.append((f"router-norm {tag}", run(method, f"router-norm {tag}", rule)))
            randoms = [
                run(method, f"random seed {s} {tag}", cfg.replace(allocation="random", allocation_seed=s))
                for s in range(args.seeds)
            ]
            rows.append((f"random (mean of {args.seeds}) {tag}", mean(randoms)))
            rows.append((f"frequency {tag}", run(method, f"frequency {tag}", cfg.replace(allocation="frequency"))))

    for method, rows in table.items():
        print(f"\n{method} on {path.name}")
        print("| allocation | top-k set agreement | perplexity | KL to FP |\n|---|---:|---:|---:|")
        for label, m in rows:
            print(f"| {label} | {100 * m['topk_set_agreement']:.2f} % | {m['perplexity']:.3f} | {m['kl']:.5f} |")
        got = dict(rows)

        def check(name: str, ours: str, ref: str, key: str = "kl", cut: float = 0.0) -> None:
            if ours not in got or ref not in got:
                return
            a, b = got[ours][key], got[ref][key]
            if key == "topk_set_agreement":  # compare disagreement
                a, b = 1 - a, 1 - b
            change = 1 - a / b if b else 0.0
            ok = a <= b * (1 - cut) + 1e-12
            verdict = "MET " if ok else "MISS"
            print(f"  {verdict} {name}: {a:.5f} vs {b:.5f} ({100 * change:+.1f} % lower; target {100 * cut:.0f} %)")

        print(f"targets ({method}):")
        check("3.0/{2,3,4} KL <= uniform W3", "measured 3.0 over {2,3,4}", "uniform W3")
        check("3.0/{2,3,4} disagreement <= uniform W3", "measured 3.0 over {2,3,4}", "uniform W3", "topk_set_agreement")
        check("2.5/{2,3} KL >= 40 % below uniform W2", "measured 2.5 over {2,3}", "uniform W2", cut=0.40)
        check("2.5/{2,3} KL <= random", "measured 2.5 over {2,3}", f"random (mean of {args.seeds}) 2.5 over {{2,3}}")
        check("2.5/{2,3} KL <= frequency", "measured 2.5 over {2,3}", "frequency 2.5 over {2,3}")
        check("3.5/{3,4} KL >= 30 % below uniform W3", "measured 3.5 over {3,4}", "uniform W3", cut=0.30)
        for tag in ("3.0 over {2,3,4}", "2.5 over {2,3}", "3.5 over {3,4}"):
            check(f"model scope {tag} KL <= layer scope", f"measured (model scope) {tag}", f"measured {tag}")


if __name__ == "__main__":
    main()
