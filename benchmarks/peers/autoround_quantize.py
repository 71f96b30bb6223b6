"""Quantize a model with AutoRound (run with the python of a venv that has auto-round; CPU works).

    OMP_NUM_THREADS=1 /path/to/autoround-venv/bin/python benchmarks/peers/autoround_quantize.py MODEL \
        --bits 3 --group-size 64 --iters 100 --out DIR

Calibration: the model folder's ``calib.txt`` documents (the same source the plugin calibrates on; AutoRound
cuts its own ``nsamples`` x ``seqlen`` windows). Writes GPTQ v1 (``format="auto_gptq"``) into DIR and prints one
JSON line with the wall seconds.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    texts = [t for t in (Path(args.model) / "calib.txt").read_text(encoding="utf-8").split("\n\n") if t.strip()]
    t0 = time.perf_counter()
    ar = AutoRound(
        model,
        tok,
        bits=args.bits,
        group_size=args.group_size,
        sym=True,
        dataset=texts,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        iters=args.iters,
        device_map="cpu",
    )
    work = Path(args.out).with_name(Path(args.out).name + ".work")
    ar.quantize_and_save(str(work), format="auto_gptq")
    seconds = time.perf_counter() - t0
    inner = next(p for p in work.iterdir() if p.is_dir()) if not (work / "config.json").exists() else work
    shutil.move(str(inner), args.out)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"tool": "auto-round", "seconds": seconds}))


if __name__ == "__main__":
    main()
