"""The ``vsraq`` command line: ``quantize``, ``eval`` and ``demo``."""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from importlib import resources
from pathlib import Path

FIXTURE = "tiny-mixtral"


def fixture_path() -> Path:
    """The trained tiny Mixtral shipped inside the package (the default model of ``vsraq demo``)."""
    return Path(str(resources.files("vsraq_plugin") / "data" / FIXTURE))


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


DTYPES = ("float32", "bfloat16", "float16")


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """A transformers causal LM in ``dtype`` on ``device``, with a clear error for a path that is not a model."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CLIError(f"{path} is not a model directory (no config.json); pass a folder saved by save_pretrained.")
    if list(path.glob("*.bin")) and not list(path.glob("*.safetensors")):
        raise CLIError(
            f"{path} holds only pickled *.bin weights; vsraq loads safetensors only. Re-save the model "
            "with save_pretrained(safe_serialization=True)."
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def load_any(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """A GPTQ checkpoint through the plugin's loader, any other model through transformers."""
    import json

    path = Path(path)
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        qcfg = json.loads(cfg_file.read_text()).get("quantization_config") or {}
        if qcfg.get("quant_method") == "gptq":
            import torch

            from .checkpoint import CheckpointError, load_checkpoint

            try:
                return load_checkpoint(path, getattr(torch, dtype), device)
            except CheckpointError as exc:
                raise CLIError(str(exc)) from exc
    return load_model(path, dtype, device)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CLIError(f"no tokenizer found in {path}: {exc}. The reference model's folder must hold one.") from exc


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def resolve_model(name: str) -> Path:
    """A model folder, or the name of the shipped fixture (``tiny-mixtral``)."""
    return fixture_path() if name == FIXTURE else Path(name)


def load_calibration(calib: str):
    """A text file, a ``.json``/``.jsonl`` file with a ``text`` field, or a ``datasets`` folder (save_to_disk)."""
    path = Path(calib)
    if path.is_dir():
        from datasets import load_from_disk

        try:
            return load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise CLIError(f"--calib {path} is a folder but not a dataset saved with save_to_disk ({exc}).") from exc
    if not path.is_file():
        raise CLIError(f"--calib {path} does not exist; pass a text file, a JSON-lines file or a dataset folder.")
    if path.suffix in (".json", ".jsonl"):
        from datasets import load_dataset

        return load_dataset("json", data_files=str(path), split="train")
    return str(path)


def load_router_init(path: Path) -> dict[int, torch.Tensor] | None:  # noqa: F821
    """Every router's weight at initialisation (``router_init.safetensors``, keys ``model.layers.{i}...``)."""
    import re

    from safetensors.torch import load_file

    f = path / "router_init.safetensors"
    if not f.is_file():
        return None
    out = {}
    for key, tensor in load_file(str(f)).items():
        m = re.match(r"model\.layers\.(\d+)\.", key)
        if m:
            out[int(m.group(1))] = tensor
    return out


def cmd_quantize(args: argparse.Namespace) -> int:
    from .config import QuantConfig
    from .pipeline import calibration_windows, quantize_folder

    _set_threads(args.threads)
    path = resolve_model(args.model)
    levels = [int(b) for b in args.bit_levels.split(",")] if args.bit_levels else None
    cfg = QuantConfig(
        bits_budget=args.bits_budget,
        bit_levels=levels,
        bits=args.bits,
        group_size=args.group_size,
        sym=not args.asym,
        desc_act=args.desc_act,
        damp_percent=args.damp_percent,
        method=args.method,
        refine_steps=args.refine_steps,
        refine_lambda_value=args.refine_lambda_value,
        refine_lambda_structure=args.refine_lambda_structure,
        device=args.device,
        offload=args.offload,
    )
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite.")
    if not (path / "config.json").is_file():
        raise CLIError(f"{path} is not a model directory (no config.json); pass a folder saved by save_pretrained.")
    tok = load_tokenizer(path)
    windows = None
    if cfg.method != "rtn":
        calib = args.calib or (str(path / "calib.txt") if (path / "calib.txt").is_file() else None)
        if calib is None:
            raise CLIError(f"method {cfg.method} needs calibration data: pass --calib FILE|DATASET_DIR.")
        windows = calibration_windows(tok, load_calibration(calib), args.seq_len, args.n_samples)
        print(f"calibration: {windows.shape[0]} windows x {windows.shape[1]} tokens from {calib}")
    router_init = load_router_init(path) if cfg.bits_budget is not None else None
    result = quantize_folder(
        path, windows, cfg, out, tokenizer=tok, batch_size=args.batch_size, work_dir=args.resume_dir,
        router_init=router_init, key_layout=args.key_layout, overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
    )  # fmt: skip
    fallbacks = result.summary["fallbacks"]
    where = f"on {result.summary.get('device', 'cpu')}"
    print(f"{cfg.method} W{cfg.bits}g{cfg.group_size} {where}: {result.summary['seconds']:.1f}s, wrote {out}")
    seconds = result.summary.get("layer_seconds") or [0.0]
    print(f"  {len(seconds)} layers, {sum(seconds) / len(seconds):.1f} s per layer on average")
    if "peak_device_memory_mb" in result.summary:
        print(f"  peak device memory: {result.summary['peak_device_memory_mb']:.0f} MiB")
    for f in fallbacks:
        print(f"  fallback: {f['target']}[{f['index']}] -> {f['action']} ({f['reason']})")
    if "expert_bits" in result.summary:
        print(f"bits per expert ({result.summary['expert_bits_scores']}):")
        for layer, widths in result.summary["expert_bits"].items():
            print(f"  layer {layer}: {widths}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import build_report, evaluate, markdown_table, named, token_windows, write_report
    from .streaming import resolve_device

    _set_threads(args.threads)
    text_path = Path(args.text)
    if not text_path.is_file():
        raise CLIError(f"--text {text_path} does not exist; pass a UTF-8 text file.")
    tok = load_tokenizer(resolve_model(args.reference))
    windows = token_windows(tok, text_path.read_text(encoding="utf-8"), args.seq_len, args.max_windows)
    device = str(resolve_device(args.device))
    reference = load_model(resolve_model(args.reference), args.dtype, device)
    models = named((m, load_any(m, args.dtype, device)) for m in args.model)
    report = build_report(
        evaluate(reference, models, windows, args.batch_size, attribution=args.attribution),
        args.reference,
        str(text_path),
        windows.numel(),
    )
    report["dtype"] = args.dtype
    for name, path in zip(models, args.model, strict=True):  # mixed precision: widths per expert, per layer
        meta = _quantization_meta(Path(path))
        if "expert_bits" in meta:
            report["models"][name]["expert_bits"] = meta["expert_bits"]
    paths = write_report(report, Path(args.out))
    print(markdown_table(report))
    for name, m in report["models"].items():
        for layer, widths in (m.get("expert_bits") or {}).items():
            print(f"{name}: layer {layer} bits per expert {widths}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _quantization_meta(path: Path) -> dict:
    import json

    cfg = path / "config.json"
    if not cfg.is_file():
        return {}
    qcfg = json.loads(cfg.read_text()).get("quantization_config") or {}
    return (qcfg.get("meta") or {}).get("vsraq") or {}


def cmd_demo(args: argparse.Namespace) -> int:
    from .config import QuantConfig
    from .evaluation import build_report, evaluate, markdown_table, token_windows, write_report
    from .pipeline import calibration_windows, quantize_model

    _set_threads(args.threads)
    path = resolve_model(args.model)
    if not (path / "config.json").is_file():
        raise CLIError(f"the demo model is missing at {path}; reinstall vsraq-plugin or pass --model.")
    tok = load_tokenizer(path)
    text = Path(args.text) if args.text else path / "eval.txt"
    windows = token_windows(tok, text.read_text(encoding="utf-8"), args.seq_len, args.max_windows)
    reference = load_model(path)
    print(
        f"model {path.name}: {sum(p.numel() for p in reference.parameters()):,} parameters; "
        f"eval text {text.name}: {windows.numel():,} tokens"
    )
    calib = calibration_windows(tok, path / "calib.txt", args.seq_len, args.n_samples)
    models = {}
    for bits in args.bits:
        for method in args.methods:
            cfg = QuantConfig(bits=bits, group_size=args.group_size, method=method, device=args.device)
            t0 = time.perf_counter()
            model = copy.deepcopy(reference)
            quantize_model(model, calib, cfg, batch_size=args.batch_size)
            models[f"{method} W{bits}g{args.group_size}"] = model
            print(f"{method} W{bits}g{args.group_size}: {time.perf_counter() - t0:.1f}s")
    metrics = evaluate(reference, models, windows, args.batch_size, attribution=args.attribution)
    report = build_report(metrics, str(path), str(text), windows.numel())
    paths = write_report(report, Path(args.out))
    print()
    print(markdown_table(report))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="vsraq", description="Routing-aware GPTQ (VSRAQ) for MoE language models.")
    p.add_argument("--version", action="version", version=f"vsraq-plugin {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--seq-len", type=int, default=256, help="evaluation window length in tokens")
        sp.add_argument("--max-windows", type=int, default=64, help="at most this many windows of the text")
        sp.add_argument("--batch-size", type=int, default=8)
        sp.add_argument(
            "--threads",
            type=int,
            default=int(os.environ.get("OMP_NUM_THREADS", 0)) or None,
            help="torch threads (default: OMP_NUM_THREADS, else torch's default)",
        )

    def attribution(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--attribution",
            action="store_true",
            help="split each MoE layer's routing flips into local (the layer fed the FP stream) and inherited "
            "(total - local)",
        )

    q = sub.add_parser("quantize", help="quantize a model and write a GPTQ v1 checkpoint")
    q.add_argument("model", help=f"model folder (safetensors), or '{FIXTURE}' for the shipped fixture")
    q.add_argument("--method", choices=["vsraq", "gptq", "agq", "rtn"], default="vsraq")
    q.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    q.add_argument("--group-size", type=int, default=128, help="-1 for one group per row")
    q.add_argument("--asym", action="store_true", help="asymmetric grid (default: symmetric)")
    q.add_argument("--desc-act", action="store_true", help="act-order (quantize columns by decreasing diag(H))")
    q.add_argument("--damp-percent", type=float, default=0.01)
    q.add_argument("--bits-budget", type=float, help="average width of the routed experts, e.g. 3.0 (DESIGN 6)")
    q.add_argument("--bit-levels", help="expert widths to choose from, e.g. 2,3,4 (with --bits-budget)")
    q.add_argument("--calib", help="text file, JSON-lines with 'text', or a datasets folder (default: MODEL/calib.txt)")
    q.add_argument("--n-samples", type=int, default=128, help="calibration windows")
    q.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--resume-dir", help="keep per-layer state here; a re-run resumes after the last finished layer")
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--refine-steps", type=int, default=0, help="block-wise refinement steps per layer (0: off)")
    q.add_argument("--refine-lambda-value", type=float, default=0.0, help="refinement: next router's logits")
    q.add_argument("--refine-lambda-structure", type=float, default=0.0, help="refinement: next router's margins")
    q.add_argument(
        "--key-layout",
        choices=("original", "transformers"),
        default="original",
        help="tensor names: the family's original ones (vLLM, SGLang, the Hub) or transformers-5 module names "
        "(gptqmodel 7 reads only these for MoE experts)",
    )
    q.add_argument("--device", default="auto", help="where the solve runs: auto (CUDA when present), cpu, cuda[:N]")
    q.add_argument(
        "--offload",
        choices=("auto", "device", "cpu"),
        default="auto",
        help="where the calibration activations live between layers (auto: on the device when they fit)",
    )
    q.add_argument("--max-shard-size", default="5GB", help="largest checkpoint shard, e.g. 5GB, 500MB")
    q.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or None)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="compare quantized models with their full-precision reference")
    e.add_argument("--model", action="append", required=True, help="a model folder to evaluate (repeatable)")
    e.add_argument("--reference", required=True, help="the full-precision model folder (and its tokenizer)")
    e.add_argument("--text", required=True, help="UTF-8 evaluation text")
    e.add_argument("--out", required=True, help="folder for report.json, report.md, agreement.png")
    e.add_argument(
        "--dtype", choices=DTYPES, default="float32",
        help="compute dtype of the reference and the models (bfloat16: what a server computes)",
    )  # fmt: skip
    e.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    common(e)
    attribution(e)
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="quantize the shipped tiny Mixtral with every method and compare")
    d.add_argument("--model", default=FIXTURE, help="model folder with calib.txt (default: the shipped fixture)")
    d.add_argument(
        "--methods", nargs="+", default=["rtn", "gptq", "agq", "vsraq"], choices=["rtn", "gptq", "agq", "vsraq"]
    )
    d.add_argument("--n-samples", type=int, default=64, help="calibration windows")
    d.add_argument("--text", help="evaluation text (default: the fixture's eval.txt)")
    d.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    d.add_argument("--group-size", type=int, default=64)
    d.add_argument("--out", default="vsraq-demo", help="report folder (default: ./vsraq-demo)")
    d.add_argument("--device", default="auto", help="where the solve runs: auto (CUDA when present), cpu, cuda[:N]")
    common(d)
    attribution(d)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .gptq import HessianError
    from .models import UnsupportedModelError
    from .pipeline import CalibrationError
    from .streaming import ModelSourceError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        CLIError,
        ConfigError,
        CalibrationError,
        CheckpointError,
        UnsupportedModelError,
        HessianError,
        ModelSourceError,
    ) as exc:
        print(f"vsraq {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
