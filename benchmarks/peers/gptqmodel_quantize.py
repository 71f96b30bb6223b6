"""Quantize a model with gptqmodel's stock GPTQ, GPTAQ or FOEM (run with the python of a venv with gptqmodel 7.7).

    GPTQMODEL_CPU_WORKERS=2 OMP_NUM_THREADS=1 /path/to/gptqmodel-venv/bin/python \
        benchmarks/peers/gptqmodel_quantize.py MODEL WINDOWS.safetensors --bits 4 --group-size 64 --out DIR

WINDOWS.safetensors holds the calibration token windows (key ``windows``, shape (n, seq_len)) so that both
tools see exactly the same tokens. ``--variant``: ``gptq`` (its default), ``gptaq`` (``GPTAQConfig(alpha=0.25)``,
asymmetric calibration against the FP inputs) or ``foem`` (``FOEMConfig(beta=0.2)``, first-order error
compensation): the strongest stock options a user would pick instead. Prints one JSON line: wall seconds and
peak RSS.
"""

import argparse
import json
import resource
import time

import torch
from safetensors.torch import load_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("windows")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--variant", choices=["gptq", "gptaq", "foem"], default="gptq")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from gptqmodel import FOEMConfig, GPTAQConfig, GPTQModel, QuantizeConfig

    windows = load_file(args.windows)["windows"]
    calib = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in windows]
    t0 = time.perf_counter()
    extra = {}
    if args.variant == "gptaq":
        from gptqmodel.quantization.config import ExpertsRoutingOverride, MoEConfig

        # GPTAQ pairs each module's quantized-stream inputs with its FP inputs token by token; with the default
        # MoE calibration an expert sees the tokens routed to it, which differ between the two streams, and
        # 7.7 stops with a tensor size mismatch. Every expert sees every token instead (the documented override).
        extra = {
            "gptaq": GPTAQConfig(alpha=0.25),
            "moe": MoEConfig(routing=ExpertsRoutingOverride(num_experts_per_tok="all")),
        }
    elif args.variant == "foem":
        extra = {"foem": FOEMConfig(beta=0.2)}
    qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=True, desc_act=False, **extra)
    model = GPTQModel.load(args.model, qcfg, device=args.device)
    model.quantize(calib, batch_size=args.batch_size)
    model.save(args.out)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tool": f"gptqmodel {args.variant}", "seconds": seconds, "peak_rss_mb": peak}))
    if torch.cuda.is_available():
        print(f"peak device memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
