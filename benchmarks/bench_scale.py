"""Memory flat in depth: `vsraq quantize` streams a model folder layer by layer (DESIGN 7), side by side with
GPTQModel (its default offloading) on the same models and calibration tokens, in one run.

The models are random-weight Qwen3-MoE at Qwen3-30B-A3B's widths (hidden 2048, 32 query / 4 kv heads of 128,
expert intermediate 768, top-8) with ``--experts`` experts (16 by default: the layer shapes of the real model
with fewer experts, so a layer fits a CPU run), saved in bf16 in several shards, at each ``--layers`` depth.
Every quantization runs in its own process; its peak RSS and peak anonymous RSS are sampled from ``/proc``
(that process alone) and its wall time comes from the parent. Printed: peak RSS and wall time per tool and
depth, the RSS ratio between the deepest and the shallowest model (1.0 = flat in depth), and the bf16 size of
each model for scale. ``--expert-chunk 0 4`` adds, per method, a run that builds and solves the routed experts'
Hessians 4 experts at a time and prints its peak RSS and wall time as ratios to the one-chunk run, and whether
the two checkpoints' tensors are bitwise equal (they are on the CPU; on a GPU, batched factorisations of
different batch sizes might round differently). ``--in-memory`` adds, per method, the other door: the model
loaded whole in bf16 (``from_pretrained(dtype=torch.bfloat16)``, as a transformers / optimum user holds it) and
quantized in place by ``vsraq_plugin.quantize``. Its peak anonymous RSS is what that door holds: the model, one
float32 layer, the calibration streams and the result's codes (its total RSS also counts the clean pages of the
shards the bf16 model stays mapped to).

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --layers 4 8 --methods gptq vsraq \
        --gptqmodel-python /tmp/gqvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def make_model(folder: Path, layers: int, experts: int, seed: int = 0) -> int:
    """A random Qwen3-MoE at Qwen3-30B-A3B's widths, saved in bf16 with the fixture's tokenizer; returns bytes."""
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from vsraq_plugin.cli import fixture_path

    tok = AutoTokenizer.from_pretrained(fixture_path())
    cfg = Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=2048,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_hidden_layers=layers,
        moe_intermediate_size=768,
        intermediate_size=6144,
        num_experts=experts,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    for layer in model.model.layers:  # give the routers real spread (they start near zero)
        torch.nn.init.normal_(layer.mlp.gate.weight, std=0.05)
    model.save_pretrained(folder, max_shard_size="1GB")
    tok.save_pretrained(folder)
    (folder / "calib.txt").write_text((fixture_path() / "calib.txt").read_text())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return size


def sample_memory(pid: int, stop: threading.Event, peak: dict[str, float]) -> None:
    """Every 50 ms until ``stop``: the process's high-water RSS (``VmHWM``) and its peak anonymous RSS
    (``RssAnon``), in MiB. Not ``wait4``'s ``ru_maxrss``: exec carries the forking parent's high-water mark into
    the child's, so a child forked by a parent that had just built a 1.5 GB model reported that parent's peak.
    RSS also counts the clean pages of memory-mapped files (a model from ``from_pretrained`` maps its shards),
    which the kernel drops under pressure; the anonymous part is what the process itself holds."""
    keys = {"VmHWM": "rss", "RssAnon": "anon"}
    while not stop.is_set():
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    name, _, value = line.partition(":")
                    if name in keys:
                        peak[keys[name]] = max(peak[keys[name]], int(value.split()[0]) / 1024)
        except OSError:
            return
        stop.wait(0.05)


def measure(cmd: list[str], env: dict, cwd: Path) -> dict:
    """Run ``cmd``: its wall seconds, peak RSS and peak anonymous RSS in MiB (that process alone, sampled)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, text=True)
        stop, peak = threading.Event(), {"rss": 0.0, "anon": 0.0}
        sampler = threading.Thread(target=sample_memory, args=(proc.pid, stop, peak), daemon=True)
        sampler.start()
        proc.wait()
        stop.set()
        sampler.join()
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{stderr[-3000:]}")
    device = re.search(r"peak device memory: (\d+) MiB", stdout)
    return {
        "seconds": seconds,
        "peak_rss_mb": peak["rss"],
        "peak_anon_mb": peak["anon"],
        "peak_device_mb": float(device.group(1)) if device else None,
        "stdout": stdout[-2000:],
    }


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two checkpoint folders hold the same tensor names with bitwise equal values."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
        return out

    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def in_memory_child(model_dir: str, method: str, bits: int, group_size: int, n: int, seq: int, device: str) -> None:
    """The in-memory door, in its own process: the model loaded whole in bf16 and quantized in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import vsraq_plugin
    from vsraq_plugin import QuantConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = QuantConfig(method=method, bits=bits, group_size=group_size, device=device)
    calib = str(Path(model_dir) / "calib.txt")
    vsraq_plugin.quantize(model, calib, cfg, tokenizer=tok, seq_len=seq, n_samples=n, progress=False)


def main() -> int:
    if sys.argv[1:2] == ["--in-memory-child"]:
        a = sys.argv[2:]
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        in_memory_child(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), int(a[5]), a[6])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--methods", nargs="+", default=["gptq", "vsraq"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--n-samples", type=int, default=16, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="auto", help="vsraq quantize --device")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--expert-chunk",
        type=int,
        nargs="+",
        default=[0],
        help="vsraq quantize --expert-chunk values, a row each (e.g. 0 4: one chunk vs 4 experts at a time)",
    )
    ap.add_argument("--in-memory", action="store_true", help="add the in-memory door (bf16 nn.Module) per method")
    ap.add_argument("--gptqmodel-python", help="python of a venv with gptqmodel 7.7: adds it as a row")
    ap.add_argument("--work", type=Path, help="folder for the models and checkpoints (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path("bench_scale.json"))
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="vsraq-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "GPTQMODEL_CPU_WORKERS": str(max(2, args.threads))}
    vsraq = [sys.executable, "-m", "vsraq_plugin"]
    rows, sizes = [], {}
    for depth in args.layers:
        model_dir = work / f"qwen3moe-{depth}L"
        if not (model_dir / "config.json").exists():
            sizes[depth] = make_model(model_dir, depth, args.experts)
        else:
            sizes[depth] = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        for method, chunk in [(m, c) for m in args.methods for c in args.expert_chunk]:
            out = work / f"q-{method}-{chunk}-{depth}L"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [*vsraq, "quantize", str(model_dir), "--method", method, "--bits", str(args.bits)]
            cmd += ["--group-size", str(args.group_size), "--n-samples", str(args.n_samples), "--seq-len"]
            cmd += [str(args.seq_len), "--device", args.device, "--threads", str(args.threads), "--out", str(out)]
            cmd += ["--expert-chunk", str(chunk)]
            r = measure(cmd, env, work)
            tool = f"vsraq quantize --method {method}" + (f" --expert-chunk {chunk}" if chunk else "")
            one = work / f"q-{method}-0-{depth}L"
            if chunk and one.exists():  # the chunks change memory, never the checkpoint's tensors
                r["same_tensors_as_one_chunk"] = same_tensors(one, out)
            rows.append({"tool": tool, "layers": depth, **r})
            print(f"{depth} layers, {tool}: {r['seconds']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)
        for method in args.methods if args.in_memory else []:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--in-memory-child", str(model_dir), method]
            cmd += [str(args.bits), str(args.group_size), str(args.n_samples), str(args.seq_len), args.device]
            r = measure(cmd, env, work)
            tool = f"vsraq_plugin.quantize(bf16 nn.Module) --method {method}"
            rows.append({"tool": tool, "layers": depth, **r})
            print(f"{depth} layers, {tool}: {r['seconds']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)
        if args.gptqmodel_python:
            from safetensors.torch import save_file
            from transformers import AutoTokenizer

            from vsraq_plugin.calibration import calibration_windows

            tok = AutoTokenizer.from_pretrained(model_dir)
            windows = calibration_windows(tok, model_dir / "calib.txt", args.seq_len, args.n_samples)
            wfile = work / "windows.safetensors"
            save_file({"windows": windows.contiguous()}, str(wfile))
            out = work / f"q-gptqmodel-{depth}L"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [args.gptqmodel_python, str(HERE / "peers" / "gptqmodel_quantize.py"), str(model_dir), str(wfile)]
            cmd += ["--bits", str(args.bits), "--group-size", str(args.group_size), "--out", str(out)]
            cmd += ["--threads", str(args.threads), "--device", "cuda" if torch.cuda.is_available() else "cpu"]
            r = measure(cmd, env, work)
            rows.append({"tool": "gptqmodel 7.7 gptq", "layers": depth, **r})
            print(f"{depth} layers, gptqmodel: {r['seconds']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)

    print()
    print(
        f"Random Qwen3-MoE at Qwen3-30B-A3B widths, {args.experts} experts, W{args.bits}g{args.group_size}, "
        f"{args.n_samples} x {args.seq_len} calibration tokens, {args.threads} thread(s), device {args.device}"
    )
    print("| tool | layers | bf16 model MiB | wall s | s / layer | peak RSS MiB | peak anon RSS MiB | RSS / bf16 size "
          "| peak GPU MiB |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mb = sizes[r["layers"]] / 2**20
        gpu = "-" if r.get("peak_device_mb") is None else f"{r['peak_device_mb']:.0f}"
        print(f"| {r['tool']} | {r['layers']} | {mb:.0f} | {r['seconds']:.0f} | {r['seconds'] / r['layers']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_anon_mb']:.0f} | {r['peak_rss_mb'] / mb:.2f}x | {gpu} |")  # fmt: skip
    lo, hi = min(args.layers), max(args.layers)
    for r in rows:  # the same tool one chunk of experts at a time (same codes, less memory)
        if " --expert-chunk " in r["tool"]:
            name = r["tool"].split(" --expert-chunk ")[0]
            base = next(b for b in rows if b["tool"] == name and b["layers"] == r["layers"])
            same = {True: "same tensors", False: "TENSORS DIFFER", None: "tensors not compared"}
            print(f"{r['tool']} ({r['layers']} layers): peak RSS {r['peak_rss_mb'] / base['peak_rss_mb']:.3f}x, "
                  f"wall {r['seconds'] / base['seconds']:.3f}x of one chunk, "
                  f"{same[r.get('same_tensors_as_one_chunk')]}")  # fmt: skip
    ratios = {}
    for tool in dict.fromkeys(r["tool"] for r in rows):
        a = next(r for r in rows if r["tool"] == tool and r["layers"] == lo)
        b = next(r for r in rows if r["tool"] == tool and r["layers"] == hi)
        ratios[tool] = b["peak_rss_mb"] / a["peak_rss_mb"]
        print(f"{tool}: peak RSS at {hi} layers / at {lo} layers = {ratios[tool]:.3f}x "
              f"(anonymous {b['peak_anon_mb'] / max(a['peak_anon_mb'], 1e-9):.3f}x)")  # fmt: skip
    args.out.write_text(json.dumps({"rows": rows, "model_bytes": sizes, "rss_ratio": ratios}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
