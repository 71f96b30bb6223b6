"""The ``vsraq`` command line: ``demo`` and ``eval`` (``quantize`` and ``bench`` join as they land)."""

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


def load_model(path: str | Path):
    """A transformers causal LM in float32 on CPU, with a clear error for a path that is not a model."""
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
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


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


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import build_report, evaluate, markdown_table, named, token_windows, write_report

    _set_threads(args.threads)
    text_path = Path(args.text)
    if not text_path.is_file():
        raise CLIError(f"--text {text_path} does not exist; pass a UTF-8 text file.")
    tok = load_tokenizer(args.reference)
    windows = token_windows(tok, text_path.read_text(encoding="utf-8"), args.seq_len, args.max_windows)
    reference = load_model(args.reference)
    models = named((m, load_model(m)) for m in args.model)
    report = build_report(
        evaluate(reference, models, windows, args.batch_size), args.reference, str(text_path), windows.numel()
    )
    paths = write_report(report, Path(args.out))
    print(markdown_table(report))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .config import QuantConfig
    from .evaluation import build_report, evaluate, markdown_table, token_windows, write_report
    from .pipeline import quantize_rtn

    _set_threads(args.threads)
    path = Path(args.model) if args.model else fixture_path()
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
    models = {}
    for bits in args.bits:
        cfg = QuantConfig(bits=bits, group_size=args.group_size, method="rtn")
        t0 = time.perf_counter()
        model = copy.deepcopy(reference)
        quantize_rtn(model, cfg)
        models[f"rtn W{bits}g{args.group_size}"] = model
        print(f"rtn W{bits}g{args.group_size}: {time.perf_counter() - t0:.1f}s")
    report = build_report(evaluate(reference, models, windows, args.batch_size), str(path), str(text), windows.numel())
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

    e = sub.add_parser("eval", help="compare quantized models with their full-precision reference")
    e.add_argument("--model", action="append", required=True, help="a model folder to evaluate (repeatable)")
    e.add_argument("--reference", required=True, help="the full-precision model folder (and its tokenizer)")
    e.add_argument("--text", required=True, help="UTF-8 evaluation text")
    e.add_argument("--out", required=True, help="folder for report.json, report.md, agreement.png")
    common(e)
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="quantize the shipped tiny Mixtral with every method and compare")
    d.add_argument("--model", help="model folder (default: the shipped fixture)")
    d.add_argument("--text", help="evaluation text (default: the fixture's eval.txt)")
    d.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    d.add_argument("--group-size", type=int, default=64)
    d.add_argument("--out", default="vsraq-demo", help="report folder (default: ./vsraq-demo)")
    common(d)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"vsraq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # config and input validation errors carry their own fix
        print(f"vsraq {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
