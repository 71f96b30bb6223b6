"""Interop: a plugin checkpoint loaded by gptqmodel 7.7 vs the plugin's own loader, same tokens, max difference.

Quantizes the shipped fixture (VSRAQ W4g64, 32 calibration windows), saves it in both key layouts
(``original``: the family's names, what vLLM reads; ``transformers``: transformers-5 names), loads each with
gptqmodel in its own venv (``peers/gptqmodel_logits.py``) and compares the logits with the plugin loader's
in float32. gptqmodel computes in its own dtype (bf16 on CPU), so the reference difference is the plugin's
own model run in that dtype: a gptqmodel difference of that size means the same weights.

    OMP_NUM_THREADS=1 python benchmarks/interop_gptqmodel.py --gptqmodel-python /tmp/gqvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gptqmodel-python", required=True)
    ap.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    import vsraq_plugin
    from vsraq_plugin.checkpoint import save_checkpoint
    from vsraq_plugin.cli import fixture_path, load_model
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.evaluation import token_windows

    path = fixture_path()
    tok = AutoTokenizer.from_pretrained(path)
    model, result = vsraq_plugin.quantize(  # in memory (a folder would be streamed to a checkpoint)
        load_model(path),
        path / "calib.txt",
        QuantConfig(bits=4, group_size=64),
        n_samples=32,
        tokenizer=tok,
        progress=False,
    )
    work = Path(tempfile.mkdtemp(prefix="vsraq-interop-"))
    ids = token_windows(tok, (path / "eval.txt").read_text(encoding="utf-8"), 256, 4)
    save_file({"input_ids": ids.contiguous()}, str(work / "tokens.safetensors"))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "OMP_NUM_THREADS": "1"}
    report = {"tokens": int(ids.numel())}
    for layout in ("original", "transformers"):
        ckpt = save_checkpoint(model, result, work / layout, tokenizer=tok, key_layout=layout)
        ours = vsraq_plugin.load(ckpt)
        with torch.no_grad():
            ref = ours(ids).logits.float()
            ref_bf16 = ours.to(torch.bfloat16)(ids).logits.float()
        out = work / f"{layout}_logits.safetensors"
        cmd = [
            args.gptqmodel_python,
            str(HERE / "peers" / "gptqmodel_logits.py"),
            str(ckpt),
            str(work / "tokens.safetensors"),
        ]
        proc = subprocess.run([*cmd, str(out)], env=env, capture_output=True, text=True, cwd=work)
        row: dict = {"plugin fp32 vs plugin bf16 max |diff|": float((ref - ref_bf16).abs().max())}
        if proc.returncode != 0:
            last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:]
            row["gptqmodel"] = f"refused: {last[0][:300] if last else proc.returncode}"
        else:
            theirs = load_file(str(out))["logits"]
            diff = (theirs - ref).abs()
            row.update(
                {
                    "gptqmodel": proc.stdout.strip().splitlines()[-1],
                    "max |diff|": float(diff.max()),
                    "max |diff| vs plugin in bf16": float((theirs - ref_bf16).abs().max()),
                    "mean |diff| vs plugin in bf16": float((theirs - ref_bf16).abs().mean()),
                    "mean |diff| plugin fp32 vs bf16": float((ref - ref_bf16).abs().mean()),
                    "max |diff| / max |logit|": float(diff.max() / ref.abs().max()),
                    "argmax agreement": float((theirs.argmax(-1) == ref.argmax(-1)).float().mean()),
                }
            )
        report[layout] = row
        print(layout, json.dumps(row, indent=2), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
