"""Quantize a model with gptqmodel's stock GPTQ (run with the python of a venv that has gptqmodel 7.7).

    GPTQMODEL_CPU_WORKERS=2 OMP_NUM_THREADS=1 /path/to/gptqmodel-venv/bin/python \
        benchmarks/peers/gptqmodel_quantize.py MODEL WINDOWS.safetensors --bits 4 --group-size 64 --out DIR

WINDOWS.safetensors holds the calibration token windows (key ``windows``, shape (n, seq_len)) so that both
tools see exactly the same tokens. Prints one JSON line: wall seconds and peak RSS.
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
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from gptqmodel import GPTQModel, QuantizeConfig

    windows = load_file(args.windows)["windows"]
    calib = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in windows]
    t0 = time.perf_counter()
    qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=True, desc_act=False)
    model = GPTQModel.load(args.model, qcfg, device=args.device)
    model.quantize(calib, batch_size=args.batch_size)
    model.save(args.out)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tool": "gptqmodel", "seconds": seconds, "peak_rss_mb": peak}))
    if torch.cuda.is_available():
        print(f"peak device memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
