"""Expert-wise mixed precision on the shipped fixture: which experts get the bits matters, same budget.

Budgets: an average of 3.0 bits over {2,3,4} and of 2.5 over {2,3} for the routed experts (attention at
4 bits, group size 64). Rows: uniform W2/W3/W4 experts for reference; random allocation (mean of 5 seeds);
activation-frequency allocation (experts that receive more calibration tokens get more bits); the
router-norm-change + max-intra-neuron-variance rule (DESIGN 6) with stock GPTQ; and the same rule with
VSRAQ. Columns: top-k set agreement, perplexity, KL to FP. One thread, one run.

    OMP_NUM_THREADS=1 python benchmarks/mixed_precision.py
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from vsraq_plugin.cli import fixture_path, load_model, load_router_init
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.evaluation import evaluate, token_windows
    from vsraq_plugin.mixed_precision import allocate_bits
    from vsraq_plugin.models import get_adapter, record_router_logits
    from vsraq_plugin.pipeline import calibration_windows, quantize_model

    path = fixture_path()
    tok = AutoTokenizer.from_pretrained(path)
    calib = calibration_windows(tok, path / "calib.txt", 256, args.n_samples)
    ev = token_windows(tok, (path / "eval.txt").read_text(encoding="utf-8"), 256, args.eval_windows)
    fp = load_model(path)
    adapter = get_adapter(fp)
    router_init = load_router_init(path)
    moe = adapter.moe_layers(fp)
    E = adapter.num_experts()

    # Activation frequency: routed calibration tokens per expert under the FP model.
    freq = {layer.index: torch.zeros(E) for layer in moe}
    with torch.no_grad(), record_router_logits(moe) as store:
        for i in range(0, calib.shape[0], 8):
            fp(input_ids=calib[i : i + 8])
    for layer, logits in zip(moe, store, strict=True):
        idx = adapter.route(torch.cat(logits), layer.router).indices
        freq[layer.index] = torch.bincount(idx.flatten(), minlength=E).float()

    def run(label: str, cfg: QuantConfig, bits: dict | None = None) -> dict:
        model = copy.deepcopy(fp)
        quantize_model(model, calib, cfg, progress=False, router_init=router_init, expert_bits=bits)
        m = evaluate(fp, {label: model}, ev, progress=False)[label]
        print(
            f"  {label}: agreement {100 * m['topk_set_agreement']:.2f} %, ppl {m['perplexity']:.3f}, KL {m['kl']:.5f}",
            flush=True,
        )
        return m

    rows = []
    base = dict(bits=4, group_size=64, method="gptq")
    for width in (2, 3, 4):
        bits = {layer.index: torch.full((E,), width) for layer in moe}
        rows.append((f"uniform W{width} experts", run(f"uniform W{width}", QuantConfig(**base), bits)))
    for budget, levels in ((3.0, [2, 3, 4]), (2.5, [2, 3])):
        cfg = QuantConfig(**base, bits_budget=budget, bit_levels=levels)
        tag = f"{budget} over {levels}"
        randoms = []
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            bits = {layer.index: allocate_bits(torch.randperm(E, generator=g), levels, budget) for layer in moe}
            randoms.append(run(f"random seed {seed} {tag}", cfg, bits))
        rows.append(
            (
                f"random (mean of {args.seeds}) {tag}",
                {k: statistics.mean(r[k] for r in randoms) for k in ("topk_set_agreement", "perplexity", "kl")},
            )
        )
        bits = {
            i: allocate_bits(torch.argsort(f, descending=True, stable=True), levels, budget) for i, f in freq.items()
        }
        rows.append((f"frequency {tag}", run(f"frequency {tag}", cfg, bits)))
        rows.append((f"router-norm+MaxVar {tag}", run(f"router-norm+MaxVar {tag}", cfg)))
        rows.append(
            (f"router-norm+MaxVar + VSRAQ {tag}", run(f"router-norm+MaxVar + VSRAQ {tag}", cfg.replace(method="vsraq")))
        )
    print("\n| allocation | top-k set agreement | perplexity | KL to FP |\n|---|---:|---:|---:|")
    for label, m in rows:
        print(f"| {label} | {100 * m['topk_set_agreement']:.2f} % | {m['perplexity']:.3f} | {m['kl']:.5f} |")


if __name__ == "__main__":
    main()
