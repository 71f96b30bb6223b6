"""The ``vsraq`` command line: ``quantize``, ``eval`` and ``demo``."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import sys
import threading
import time
import traceback
from importlib import resources
from pathlib import Path

from .validation import (
    InputError,
    check_finite_model,
    check_model_dir,
    check_output_dir,
    check_paths,
    has_tokenizer_files,
    one_line,
    positive_int,
    read_text,
)

FIXTURE = "tiny-mixtral"


def fixture_path() -> Path:
    """The trained tiny Mixtral shipped inside the package (the default model of ``vsraq demo``)."""
    return Path(str(resources.files("vsraq_plugin") / "data" / FIXTURE))


class CLIError(InputError):
    """A user-facing error: printed as one line, exit status 2."""


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) turned into an exception, so ``finally`` blocks and cleanups run (Python's default for
    SIGTERM kills the process without them); the command line exits with 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


DTYPES = ("float32", "bfloat16", "float16")


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """A transformers causal LM in ``dtype`` on ``device``, with a clear error for a path that is not a model, or
    whose weights are unreadable or not finite."""
    import torch
    from transformers import AutoModelForCausalLM

    from .streaming import ModelSource

    path = Path(path)
    check_model_folder(path, "model folder")
    ModelSource(path)  # config, and every safetensors header (a truncated or damaged file is named here)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CLIError(
            f"{path} cannot be loaded as a causal LM ({type(exc).__name__}: {one_line(exc)[:300]}); check that its "
            "config.json and weights belong together."
        ) from exc
    check_finite_model(model, str(path), CLIError)
    return model.to(device).eval()


def check_model_folder(path: Path, what: str) -> dict:
    """A model folder's parsed config.json; pickled-only weights are named before anything else is checked."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise CLIError(f"{path} is not a model directory (no config.json); pass a folder saved by save_pretrained.")
    if path.is_dir() and list(path.glob("*.bin")) and not list(path.glob("*.safetensors")):
        raise CLIError(
            f"{path} holds only pickled *.bin weights; vsraq loads safetensors only. Re-save the model "
            "with save_pretrained(safe_serialization=True)."
        )
    return check_model_dir(path, what, CLIError)


def load_any(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """A GPTQ checkpoint through the plugin's loader, any other model through transformers."""
    path = Path(path)
    data = check_model_dir(path, "--model", CLIError) if path.is_dir() and (path / "config.json").is_file() else {}
    qcfg = data.get("quantization_config") or {}
    if isinstance(qcfg, dict) and qcfg.get("quant_method") == "gptq":
        import torch

        from .checkpoint import load_checkpoint

        return load_checkpoint(path, getattr(torch, dtype), device)
    return load_model(path, dtype, device)


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a model folder; a folder without one, or one that does not load, is one clear line."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise CLIError(f"model folder {path} does not exist; pass a folder saved by save_pretrained.")
    if not has_tokenizer_files(path):
        raise CLIError(
            f"{path} holds no tokenizer (no tokenizer.json or tokenizer_config.json); save the model's tokenizer "
            "into it with AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained(FOLDER)."
        )
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # tokenizers fail with anything from OSError to a bare Exception
        raise CLIError(
            f"the tokenizer in {path} cannot be loaded ({type(exc).__name__}: {one_line(exc)[:200]}); re-save it "
            "with tokenizer.save_pretrained, or install the package it names."
        ) from exc


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(positive_int(threads, "--threads", "torch threads"))


def resolve_model(name: str) -> Path:
    """A model folder, or the name of the shipped fixture (``tiny-mixtral``)."""
    return fixture_path() if name == FIXTURE else Path(name)


def _dynamic_arg(text: str | None) -> dict:
    """``--dynamic``: a JSON object of GPTQ ``dynamic`` overrides, inline or in a file."""
    if not text:
        return {}
    source = Path(text) if not text.lstrip().startswith("{") else None
    try:
        data = json.loads(source.read_text(encoding="utf-8") if source is not None else text)
    except (OSError, json.JSONDecodeError) as exc:
        raise CLIError(
            f"--dynamic {text[:80]!r} is neither a JSON object nor a readable JSON file ({one_line(exc)[:200]}); "
            'pass e.g. \'{"+:.*self_attn.*": {"bits": 8}}\' (JSON: write a regex backslash as two).'
        ) from exc
    if not isinstance(data, dict):
        raise CLIError(f"--dynamic must be a JSON object (module regex -> settings), not {type(data).__name__}.")
    return data


def _json_texts(path: Path) -> list[str]:
    """The ``text`` fields of a JSON-lines file (or a JSON list of objects), with the line of the first bad one."""
    text = read_text(path, "--calib", CLIError)
    try:
        data = json.loads(text)
        rows = list(enumerate(data if isinstance(data, list) else [data], 1))
    except json.JSONDecodeError:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise CLIError(
                    f"--calib {path}: line {i} is not JSON ({exc.msg}); each line must be an object such as "
                    '{"text": "..."}.'
                ) from exc
    texts = []
    for i, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise CLIError(
                f"--calib {path}: record {i} has no 'text' string (got {got}); each record must be an object "
                'such as {"text": "..."}.'
            )
        texts.append(row["text"])
    return texts


def load_calibration(calib: str):
    """A text file, a ``.json``/``.jsonl`` file with a ``text`` field, or a ``datasets`` folder (save_to_disk)."""
    path = Path(calib)
    if path.is_dir():
        from datasets import load_from_disk

        try:
            return load_from_disk(str(path))
        except Exception as exc:  # datasets raises FileNotFoundError, ValueError, or its own errors
            raise CLIError(
                f"--calib {path} is a folder but not a dataset saved with save_to_disk ({one_line(exc)[:200]})."
            ) from exc
    if not path.is_file():
        raise CLIError(f"--calib {path} does not exist; pass a text file, a JSON-lines file or a dataset folder.")
    if path.suffix in (".json", ".jsonl"):
        return _json_texts(path)
    read_text(path, "--calib", CLIError)  # decodable, named as the flag
    return str(path)


def load_router_init(path: Path) -> dict[int, torch.Tensor] | None:  # noqa: F821
    """Every router's weight at initialisation (``router_init.safetensors``, keys ``model.layers.{i}...``)."""
    import re

    from safetensors.torch import load_file

    f = path / "router_init.safetensors"
    if not f.is_file():
        return None
    out = {}
    try:
        tensors = load_file(str(f))
    except Exception as exc:  # SafetensorError, OSError
        raise CLIError(f"{f} cannot be read ({one_line(exc)}); delete or re-create it.") from exc
    for key, tensor in tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.", key)
        if m:
            out[int(m.group(1))] = tensor
    return out


def _windows_args(args: argparse.Namespace, default_samples: int) -> tuple[int, int, bool]:
    """``--seq-len``, ``--n-samples`` (the default, as many as the data hold up to it, or exactly what was asked)."""
    seq_len = positive_int(args.seq_len, "--seq-len", "tokens per window, e.g. 256", error=CLIError)
    positive_int(args.batch_size, "--batch-size", "windows per forward pass, e.g. 8", error=CLIError)
    if args.n_samples is None:
        return seq_len, default_samples, False
    return seq_len, positive_int(args.n_samples, "--n-samples", "calibration windows, e.g. 128", error=CLIError), True


def cmd_quantize(args: argparse.Namespace) -> int:
    from .checkpoint import FolderLock, parse_size
    from .config import QuantConfig
    from .models import get_adapter
    from .pipeline import calibration_windows, quantize_folder
    from .streaming import ModelSource, check_unquantized

    _set_threads(args.threads)
    seq_len, n_samples, exact = _windows_args(args, 128)
    path = resolve_model(args.model)
    levels = None
    if args.bit_levels:
        try:
            levels = [int(b) for b in args.bit_levels.split(",")]
        except ValueError:
            raise CLIError(f"--bit-levels {args.bit_levels!r} must be widths joined by commas, e.g. 2,3,4.") from None
    cfg = QuantConfig(
        dynamic=_dynamic_arg(args.dynamic),
        bits_budget=args.bits_budget,
        bit_levels=levels,
        allocation=args.allocation,
        allocation_weight=args.allocation_weight,
        budget_scope=args.budget_scope,
        width_per_projection=args.width_per_projection,
        damage_metric=args.damage_metric,
        bits=args.bits,
        group_size=args.group_size,
        sym=not args.asym,
        desc_act=args.desc_act,
        damp_percent=args.damp_percent,
        mse=args.mse,
        method=args.method,
        metric_solve=args.metric_solve,
        router_solve=args.router_solve,
        refine_steps=args.refine_steps,
        refine_lambda_value=args.refine_lambda_value,
        refine_lambda_structure=args.refine_lambda_structure,
        device=args.device,
        offload=args.offload,
        exact_sums=not args.float32_sums,
        expert_chunk=args.expert_chunk,
    )
    parse_size(args.max_shard_size)
    # Everything a run is given, checked before the long work: output, model folder, weights' headers, tokenizer,
    # calibration data. Nothing is written until all of it passed.
    out = check_output_dir(args.out, args.overwrite, "--out", CLIError)
    check_model_dir(path, error=CLIError)
    work = Path(args.resume_dir) if args.resume_dir else None
    check_paths(path, out, work, ("--out", "--resume-dir"), CLIError)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 writes and reports
    if rank0:
        FolderLock(out, "--out").acquire().release()  # another run writing --out: refused now, not after the work
    source = ModelSource(path)
    check_unquantized(source)
    get_adapter(source.config)
    tok = load_tokenizer(path)
    windows = None
    if cfg.method != "rtn":
        calib = args.calib or (str(path / "calib.txt") if (path / "calib.txt").is_file() else None)
        if calib is None:
            raise CLIError(f"method {cfg.method} needs calibration data: pass --calib FILE|DATASET_DIR.")
        windows = calibration_windows(tok, load_calibration(calib), seq_len, n_samples, exact=exact)
        note = "" if exact or len(windows) == n_samples else f" (all the data hold; the default is up to {n_samples})"
        if rank0:
            print(f"calibration: {windows.shape[0]} windows x {windows.shape[1]} tokens from {calib}{note}")
    router_init = load_router_init(path) if cfg.bits_budget is not None and cfg.allocation == "router-norm" else None
    with FolderLock(work, "--resume-dir") if work is not None and rank0 else contextlib.nullcontext():
        result = quantize_folder(
            path, windows, cfg, out, tokenizer=tok, batch_size=args.batch_size, work_dir=work,
            router_init=router_init, key_layout=args.key_layout, overwrite=args.overwrite,
            max_shard_size=args.max_shard_size, progress=rank0, dist_timeout=args.dist_timeout,
        )  # fmt: skip
    if not rank0:
        return 0
    fallbacks = result.summary["fallbacks"]
    if "world_size" in result.summary:
        moved = result.summary.get("layer_comm_bytes") or [0]
        print(f"distributed over {result.summary['world_size']} ranks: {sum(moved) / 2**20:.1f} MiB moved by rank 0 "
              f"({max(moved) / 2**20:.1f} MiB in the largest layer)")  # fmt: skip
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
        downs = result.summary.get("expert_down_bits", {})
        for layer, widths in result.summary["expert_bits"].items():
            down = f" (gate/up), down {downs[layer]}" if layer in downs else ""
            print(f"  layer {layer}: {widths}{down}")
    return 0


def _check_vocab(models: dict, windows) -> None:
    """Every model embeds every token id of the windows (else they were tokenised for another vocabulary)."""
    top = int(windows.max())
    for name, model in models.items():
        n = model.get_input_embeddings().weight.shape[0]
        if top >= n:
            raise CLIError(
                f"{name} has a vocabulary of {n} tokens but the reference's tokenizer gives ids up to {top}; "
                "evaluate models that share the reference's tokenizer."
            )


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import (
        build_report,
        component_attribution,
        evaluate,
        markdown_table,
        named,
        token_windows,
        write_report,
    )
    from .streaming import resolve_device

    _set_threads(args.threads)
    seq_len = positive_int(args.seq_len, "--seq-len", "a window needs a next token to predict", 2, CLIError)
    positive_int(args.max_windows, "--max-windows", "windows of the text to evaluate", error=CLIError)
    positive_int(args.batch_size, "--batch-size", "windows per forward pass, e.g. 8", error=CLIError)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; pass a folder for the report (it is created).")
    text_path = Path(args.text)
    text = read_text(text_path, "--text", CLIError)
    if not text.strip():
        raise CLIError(f"--text {text_path} is empty (or only whitespace); pass a real evaluation text.")
    ref_path = resolve_model(args.reference)
    check_model_folder(ref_path, "--reference")
    for m in args.model:
        check_model_folder(Path(m), "--model")
    tok = load_tokenizer(ref_path)
    windows = token_windows(tok, text, seq_len, args.max_windows)
    device = str(resolve_device(args.device))
    reference = load_model(ref_path, args.dtype, device)
    models = named((m, load_any(m, args.dtype, device)) for m in args.model)
    _check_vocab({f"--reference {args.reference}": reference, **{f"--model {k}": v for k, v in models.items()}},
                 windows)  # fmt: skip
    report = build_report(
        evaluate(
            reference, models, windows, args.batch_size, attribution=args.attribution, write_sources=args.write_sources
        ),
        args.reference,
        str(text_path),
        windows.numel(),
    )
    report["dtype"] = args.dtype
    if args.components:  # which modules the flips come from: each group put back to the reference's, alone
        report["components"] = {
            name: component_attribution(reference, model, windows, args.batch_size, args.components == "layer")
            for name, model in models.items()
        }
    for name, path in zip(models, args.model, strict=True):  # mixed precision: widths per expert, per layer
        meta = _quantization_meta(Path(path))
        for key in ("expert_bits", "expert_down_bits"):
            if key in meta:
                report["models"][name][key] = meta[key]
    paths = write_report(report, out)
    print(markdown_table(report))
    for name, m in report["models"].items():
        downs = m.get("expert_down_bits") or {}
        for layer, widths in (m.get("expert_bits") or {}).items():
            down = f", down {downs[layer]}" if layer in downs else ""
            print(f"{name}: layer {layer} bits per expert {widths}{down}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _quantization_meta(path: Path) -> dict:
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
    seq_len, n_samples, exact = _windows_args(args, 64)
    positive_int(seq_len, "--seq-len", "a window needs a next token to predict", 2, CLIError)
    positive_int(args.max_windows, "--max-windows", "windows of the text to evaluate", error=CLIError)
    path = resolve_model(args.model)
    if not (path / "config.json").is_file():
        raise CLIError(f"the demo model is missing at {path}; reinstall vsraq-plugin or pass --model.")
    check_model_dir(path, "--model", CLIError)
    for bits in args.bits:  # every setting, before the first of the runs
        for method in args.methods:
            QuantConfig(bits=bits, group_size=args.group_size, method=method, device=args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; pass a folder for the report (it is created).")
    text = Path(args.text) if args.text else path / "eval.txt"
    body = read_text(text, "--text", CLIError)
    if not body.strip():
        raise CLIError(f"--text {text} is empty (or only whitespace); pass a real evaluation text.")
    tok = load_tokenizer(path)
    windows = token_windows(tok, body, seq_len, args.max_windows)
    calib = calibration_windows(tok, path / "calib.txt", seq_len, n_samples, exact=exact)
    reference = load_model(path)
    print(
        f"model {path.name}: {sum(p.numel() for p in reference.parameters()):,} parameters; "
        f"eval text {text.name}: {windows.numel():,} tokens"
    )
    models = {}
    for bits in args.bits:
        for method in args.methods:
            cfg = QuantConfig(bits=bits, group_size=args.group_size, method=method, device=args.device)
            t0 = time.perf_counter()
            model = copy.deepcopy(reference)
            quantize_model(model, calib, cfg, batch_size=args.batch_size)
            models[f"{method} W{bits}g{args.group_size}"] = model
            print(f"{method} W{bits}g{args.group_size}: {time.perf_counter() - t0:.1f}s")
    metrics = evaluate(
        reference, models, windows, args.batch_size, attribution=args.attribution, write_sources=args.write_sources
    )
    report = build_report(metrics, str(path), str(text), windows.numel())
    paths = write_report(report, out)
    print()
    print(markdown_table(report))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="vsraq", description="Routing-aware GPTQ (VSRAQ) for MoE language models.")
    p.add_argument("--version", action="version", version=f"vsraq-plugin {__version__}")
    debug_help = "on an error, print the Python traceback too (default: one line; also VSRAQ_DEBUG=1)"
    p.add_argument("--debug", action="store_true", help=debug_help)
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
        sp.add_argument(
            "--write-sources",
            action="store_true",
            help="split each MoE router's logit error over the residual writes before it (embeddings, every "
            "layer's attention and MLP) and the router itself: which layers' errors the flips come from",
        )

    q = sub.add_parser("quantize", help="quantize a model and write a GPTQ v1 checkpoint")
    q.add_argument("model", help=f"model folder (safetensors), or '{FIXTURE}' for the shipped fixture")
    q.add_argument("--method", choices=["vsraq", "gptq", "agq", "rtn"], default="vsraq")
    q.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    q.add_argument("--group-size", type=int, default=128, help="-1 for one group per row")
    q.add_argument("--asym", action="store_true", help="asymmetric grid (default: symmetric)")
    q.add_argument("--desc-act", action="store_true", help="act-order (quantize columns by decreasing diag(H))")
    q.add_argument("--damp-percent", type=float, default=0.01)
    q.add_argument(
        "--mse",
        type=float,
        default=None,
        help="clipping search of each group's grid in this norm (gptqmodel's mse; e.g. 2.4), 0 for the full range "
        "(stock GPTQ); default: 2.4 with vsraq, 0 with the other methods",
    )
    q.add_argument(
        "--metric-solve",
        choices=("fast", "exact"),
        default="fast",
        help="vsraq: how a residual writer's columns are rounded under the routing metric: fast (low-rank "
        "coordinate descent, about GPTQ's cost) or exact (nearest plane on a tiled wavefront, 5-20x slower)",
    )
    q.add_argument(
        "--router-solve",
        choices=("auto", "dense", "cg"),
        default="auto",
        help="vsraq: how the router re-fit is solved: dense (E Cholesky solves, (E, d, d) float64 memory), cg "
        "(matrix-free conjugate gradients, O(d^2 + E d) memory) or auto (dense while it fits in 256 MiB)",
    )
    q.add_argument("--bits-budget", type=float, help="average width of the routed experts, e.g. 3.0 (DESIGN 6)")
    q.add_argument("--bit-levels", help="expert widths to choose from, e.g. 2,3,4 (with --bits-budget)")
    q.add_argument(
        "--allocation", default="measured",
        help="which experts get the bits: measured (each expert's solve loss at every width x its routing mass, "
        "exact knapsack; default), router-norm (the seed paper's rule), random, frequency",
    )  # fmt: skip
    q.add_argument(
        "--allocation-weight", default="mass",
        help="measured: weight of an expert's damage: mass (its gate weights) or fragility (vsraq: times the next "
        "router's fragility)",
    )  # fmt: skip
    q.add_argument(
        "--budget-scope", default="layer",
        help="measured: the budget holds per MoE layer (layer) or over all routed experts of the model (model)",
    )  # fmt: skip
    q.add_argument(
        "--width-per-projection", action=argparse.BooleanOptionalAction, default=None,
        help="measured: an expert's down projection gets its own width, apart from its gate/up (the default with "
        "the measured allocation; --no-width-per-projection: one width per expert)",
    )  # fmt: skip
    q.add_argument(
        "--damage-metric", default="readers",
        help="measured, widths per projection: the norm of the damages in the residual stream: readers (what the "
        "linears reading the stream see of an error) or residual (the plain norm)",
    )  # fmt: skip
    q.add_argument(
        "--dynamic",
        help="GPTQ `dynamic` overrides for the attention, dense-MLP and shared-expert linears, as gptqmodel reads "
        "them: a JSON object (or a JSON file) of module regex -> {bits, group_size}; '+:' patterns override, "
        "'-:' patterns leave modules unquantized, the first match decides",
    )
    q.add_argument("--calib", help="text file, JSON-lines with 'text', or a datasets folder (default: MODEL/calib.txt)")
    q.add_argument(
        "--n-samples", type=int, default=None,
        help="calibration windows; given, the data must hold that many (default: up to 128, as many as they hold)",
    )  # fmt: skip
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
    q.add_argument(
        "--expert-chunk",
        type=int,
        default=0,
        help="routed experts whose Hessians are built and solved together (bounds their memory; the codes do not "
        "change); 0 (default): as many as fit in 8 GiB of Hessians on a GPU, 1 GiB on the CPU",
    )
    q.add_argument(
        "--float32-sums",
        action="store_true",
        help="one process: float32 running Hessian sums (half the memory of the default float64 ones; the codes "
        "then differ from a torchrun of the same settings)",
    )
    q.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        help="under torchrun: seconds a collective may wait for the other ranks before the run stops with an error",
    )
    q.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or None)
    q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
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
    e.add_argument(
        "--components",
        nargs="?",
        const="kind",
        choices=("kind", "layer"),
        help="which modules the routing flips come from: every layer's attention, routers, routed experts, shared "
        "experts, dense MLPs (kind), or each of those per layer (layer), put back to the reference's one group at "
        "a time (one extra evaluation per group); points --dynamic overrides at the model",
    )
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="quantize the shipped tiny Mixtral with every method and compare")
    d.add_argument("--model", default=FIXTURE, help="model folder with calib.txt (default: the shipped fixture)")
    d.add_argument(
        "--methods", nargs="+", default=["rtn", "gptq", "agq", "vsraq"], choices=["rtn", "gptq", "agq", "vsraq"]
    )
    d.add_argument("--n-samples", type=int, default=None, help="calibration windows (default: up to 64)")
    d.add_argument("--text", help="evaluation text (default: the fixture's eval.txt)")
    d.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    d.add_argument("--group-size", type=int, default=64)
    d.add_argument("--out", default="vsraq-demo", help="report folder (default: ./vsraq-demo)")
    d.add_argument("--device", default="auto", help="where the solve runs: auto (CUDA when present), cpu, cuda[:N]")
    common(d)
    attribution(d)
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    d.set_defaults(func=cmd_demo)
    return p


def _install_signal_handlers():
    """SIGTERM and SIGHUP raise ``Terminated`` (a ``BaseException``), so the run unwinds like on Ctrl-C: the
    checkpoint under construction is removed, the resume state kept. A second such signal during the cleanup is
    ignored (``kill -9`` still ends it). Signals already ignored (``nohup``) stay ignored. Returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def handler(signum, frame):
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        raise Terminated(signum)

    for name in ("SIGTERM", "SIGHUP"):
        s = getattr(signal, name, None)
        if s is not None and signal.getsignal(s) is not signal.SIG_IGN:
            previous[s] = signal.signal(s, handler)

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


def _interrupted(args: argparse.Namespace, name: str) -> str:
    if args.command != "quantize":
        return f"interrupted by {name}; no report was written."
    resume = (
        f"rerun the same command to resume after the last finished layer (state in {args.resume_dir})"
        if args.resume_dir
        else "pass --resume-dir DIR to let a rerun resume after the last finished layer"
    )
    return f"interrupted by {name}; nothing was written to {args.out}; {resume}."


def _close_progress_bars() -> None:
    """End the progress bars a failure left open, so the error gets a line of its own."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


def _user_errors() -> tuple[type[BaseException], ...]:
    from .distributed import DistributedError
    from .gptq import HessianError

    # NotImplementedError: settings the pipeline refuses on purpose (e.g. refinement with rtn), with the fix.
    # DistributedError: another rank died or hung; its message says how to resume.
    return (InputError, HessianError, NotImplementedError, DistributedError)


def main(argv: list[str] | None = None) -> int:
    """Run one command. User-facing failures print one line ``vsraq CMD: error: ...`` and exit with status 2;
    Ctrl-C exits 130, SIGTERM 143 (SIGHUP 129), with nothing half-written at ``--out``; an unexpected failure
    prints one line and exits 1. ``--debug`` (or ``VSRAQ_DEBUG=1``) prints the traceback as well."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("VSRAQ_DEBUG", "") not in ("", "0")
    restore = _install_signal_handlers()

    def fail(message: str, code: int) -> int:
        _close_progress_bars()
        if debug:
            traceback.print_exc()
        print(f"vsraq {args.command}: {message}", file=sys.stderr)
        return code

    try:
        return args.func(args)
    except KeyboardInterrupt:
        return fail(_interrupted(args, "SIGINT"), 130)
    except Terminated as exc:
        return fail(_interrupted(args, signal.Signals(exc.signum).name), 128 + exc.signum)
    except _user_errors() as exc:
        return fail(f"error: {one_line(exc)}", 2)
    except MemoryError:
        return fail("error: out of memory; lower --batch-size (or --n-samples / --seq-len), or use --offload cpu.", 2)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        why = exc.strerror or one_line(exc)
        return fail(f"error: {why}{where}; check the path, its permissions and the free disk space.", 2)
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA), without importing torch here
            return fail("error: the device ran out of memory; lower --batch-size, or use --offload cpu.", 2)
        hint = "" if debug else "; rerun with --debug for the traceback and report it"
        return fail(f"internal error ({type(exc).__name__}: {one_line(exc)[:300]}){hint}.", 1)
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
