"""GPTQ v1 checkpoints (DESIGN 5): save with atomic rename, load back onto transformers 5 models.

A saved folder holds ``model.safetensors`` (per-expert ``qweight``/``qzeros``/``scales``/``g_idx`` under the
family's original names; routers, norms, embeddings and ``lm_head`` unquantized), ``config.json`` with
``quantization_config`` (``quant_method: "gptq"``, ``meta.quantizer`` = ``["vsraq:<version>"]``, and a
``vsraq`` block with every setting), ``quantize_config.json``, and the tokenizer when given.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import __version__
from .config import QuantConfig, dynamic_override
from .methods import router_name
from .models import EXPERT_PROJECTIONS, MoEAdapter, MoELayer, child_name, get_adapter, set_module
from .nn import QuantExperts, QuantLinear
from .packing import pack_linear
from .quantizer import QuantizedWeight
from .solve import QuantizationResult
from .validation import InputError, check_gptq_tensors, check_model_dir, nonfinite_count, one_line

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")  # the GPTQ v1 tensors of one quantized linear
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class CheckpointError(InputError):
    """A checkpoint cannot be written or read; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------- names
def _native_to_checkpoint(adapter: MoEAdapter, name: str) -> str:
    """Transformers-5 parameter name -> the family's original checkpoint name (Mixtral: block_sparse_moe)."""
    return adapter.checkpoint_name(name)


KEY_LAYOUTS = ("original", "transformers")


def _param_key(adapter: MoEAdapter, name: str, layout: str) -> str:
    return _native_to_checkpoint(adapter, name) if layout == "original" else name


def _expert_key(adapter: MoEAdapter, layer_index: int, expert: int, proj: str, layout: str) -> str:
    """``original``: the family's names (Mixtral ``block_sparse_moe.experts.{e}.w1``: vLLM, AutoGPTQ, the Hub);
    ``transformers``: transformers-5 module names (``mlp.experts.{e}.gate_proj``: what gptqmodel 7 reads)."""
    if layout == "original":
        return adapter.expert_key(layer_index, expert, proj)
    return f"model.layers.{layer_index}.mlp.experts.{expert}.{proj}"


def _linear_targets(adapter: MoEAdapter, layer: MoELayer) -> dict[str, nn.Linear]:
    return {**adapter.attention_linears(layer), **adapter.dense_mlp_linears(layer)}


def dynamic_overrides(
    adapter: MoEAdapter, expert_bits: dict, base_bits: int, layout: str = "original", down_bits: dict | None = None
) -> dict:
    """GPTQ ``dynamic`` entries (module-name regex -> settings) for every expert whose width differs from
    ``bits``: the form gptqmodel and vLLM read for per-module widths. ``down_bits`` (widths per projection): an
    expert whose down has another width than its gate/up gets one entry for gate/up and one for down instead."""
    out = {}
    for layer_index, widths in sorted(expert_bits.items(), key=lambda kv: int(kv[0])):
        downs = widths if down_bits is None else down_bits[layer_index]
        for e, (b, b_down) in enumerate(zip(widths, downs, strict=True)):
            if b == b_down and b != base_bits:  # the whole expert
                prefix = _expert_key(adapter, int(layer_index), e, "gate_proj", layout).rsplit(".", 1)[0]
                out["+:^" + re.escape(prefix) + r"\."] = {"bits": int(b)}
            elif b != b_down:
                name = {p: re.escape(_expert_key(adapter, int(layer_index), e, p, layout)) for p in EXPERT_PROJECTIONS}
                if b != base_bits:
                    out[f"+:^(?:{name['gate_proj']}|{name['up_proj']})$"] = {"bits": int(b)}
                if b_down != base_bits:
                    out[f"+:^{name['down_proj']}$"] = {"bits": int(b_down)}
    return out


def dynamic_bits(dynamic: dict | None, module: str, default: int) -> int:
    """The width a ``dynamic`` block gives ``module`` (the first pattern that matches it decides, as in gptqmodel),
    else ``default``."""
    override = dynamic_override(dynamic, module)
    return int(override["bits"]) if override and "bits" in override else default


def quantization_config(
    config: QuantConfig, summary: dict | None = None, adapter: MoEAdapter | None = None, layout: str = "original"
) -> dict:
    """The ``quantization_config`` block that GPTQ loaders (transformers, gptqmodel, vLLM) read."""
    vsraq = config.to_dict()
    if summary:
        # One order whatever the expert chunks or ranks that produced them.
        vsraq["fallbacks"] = sorted(summary.get("fallbacks", []), key=lambda f: (f["target"], f["index"], f["action"]))
        if "expert_bits" in summary:
            vsraq["expert_bits"] = summary["expert_bits"]
            vsraq["expert_bits_scores"] = summary.get("expert_bits_scores")
        if "expert_down_bits" in summary:
            vsraq["expert_down_bits"] = summary["expert_down_bits"]
    # The run's own overrides, one exact pattern per module they changed: config.json is written (by us and by
    # transformers) with sorted keys, so the order of the user's patterns, whose first match decides, is not kept
    # there (the patterns themselves are, in meta.vsraq); then the experts' widths.
    dynamic = dict(config.dynamic or {})
    if summary is not None and adapter is not None and config.dynamic:
        dynamic = {}
        for name, entry in sorted(summary.get("module_overrides", {}).items()):
            exact = "^(?:" + "|".join(re.escape(n) for n in adapter.module_names(name)) + ")$"
            dynamic[("-:" if entry is None else "+:") + exact] = {} if entry is None else dict(entry)
    if summary and "expert_bits" in summary and adapter is not None:
        down_bits = summary.get("expert_down_bits")
        dynamic.update(dynamic_overrides(adapter, summary["expert_bits"], config.bits, layout, down_bits))
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": config.bits,
        "group_size": config.group_size,
        "desc_act": config.desc_act,
        "sym": config.sym,
        "static_groups": config.static_groups,
        "true_sequential": config.true_sequential,
        "damp_percent": config.damp_percent,
        "lm_head": False,
        "dynamic": dynamic or None,
        "meta": {"quantizer": [f"vsraq:{__version__}"], "vsraq": vsraq},
    }


# ---------------------------------------------------------------------------------------------- save
def _pack(qw: QuantizedWeight, e: int, bits: int | None = None) -> dict[str, torch.Tensor]:
    """Matrix ``e`` packed where its codes are (a streamed run's stay on the solve device), then on the host:
    only the packed words cross, one matrix at a time."""
    packed = pack_linear(qw.codes[e], qw.scales[e], qw.zeros[e], qw.g_idx[e], bits or qw.bits)
    return {k: v.cpu() for k, v in packed.state_dict().items()}


def layer_tensors(
    adapter: MoEAdapter,
    layer: MoELayer,
    weights: dict[str, QuantizedWeight],
    layout: str = "original",
    dtype_of=None,
    config: QuantConfig | None = None,
) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor of one decoder layer, by its name in the file: the packed GPTQ v1 tensors of its
    quantized linears and experts, and its other tensors (norms, router, biases, the linears ``config.dynamic``
    leaves unquantized) from the layer's modules, cast by ``dtype_of(native name)`` (the source dtype; None keeps
    the module's)."""
    if layout not in KEY_LAYOUTS:
        raise CheckpointError(f"key_layout={layout!r} is unknown; use one of {KEY_LAYOUTS}.")

    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        return t if dtype_of is None or not t.is_floating_point() else t.to(dtype_of(name))

    prefix = f"model.layers.{layer.index}"
    tensors: dict[str, torch.Tensor] = {}
    quantized_params: set[str] = set()
    for name, lin in _linear_targets(adapter, layer).items():
        full = f"{prefix}.{name}"
        if full not in weights:
            if config is not None and config.for_module(*adapter.module_names(full)) is None:
                continue  # a "-:" dynamic pattern: its 16-bit weight is written with the layer's other tensors
            raise CheckpointError(f"{full} was not quantized; run the quantization before saving.")
        key = _param_key(adapter, full, layout)
        tensors.update({f"{key}.{k}": v for k, v in _pack(weights[full], 0).items()})
        if lin.bias is not None:
            tensors[f"{key}.bias"] = cast(f"{full}.bias", lin.bias.detach())
        quantized_params.update({f"{full}.weight", f"{full}.bias"})
    if layer.is_moe:
        for proj in EXPERT_PROJECTIONS:
            qw = weights[f"{prefix}.mlp.experts.{proj}"]
            widths = None if qw.bits_per_matrix is None else qw.bits_per_matrix.tolist()
            for e in range(qw.codes.shape[0]):
                bits = qw.bits if widths is None else int(widths[e])
                key = _expert_key(adapter, layer.index, e, proj, layout)
                tensors.update({f"{key}.{k}": v for k, v in _pack(qw, e, bits).items()})
        quantized_params.update({f"{prefix}.mlp.experts.gate_up_proj", f"{prefix}.mlp.experts.down_proj"})
        rname = router_name(layer)
        if rname in weights:  # router_mode="quantize": the router is a GPTQ linear too
            key = _param_key(adapter, rname, layout)
            tensors.update({f"{key}.{k}": v for k, v in _pack(weights[rname], 0).items()})
            quantized_params.add(f"{rname}.weight")
    for name, tensor in layer.layer.state_dict().items():
        full = f"{prefix}.{name}"
        if full not in quantized_params:
            tensors[_param_key(adapter, full, layout)] = cast(full, tensor.detach())
    return {k: v.contiguous().cpu() for k, v in tensors.items()}


def kept_in_float32(model: nn.Module, name: str) -> bool:
    """Whether transformers keeps the tensor ``name`` in float32 whatever the model's dtype (the class's
    ``_keep_in_fp32_modules(_strict)``, matched as transformers matches them: DeepSeek-V3's router weight and
    correction bias). The checkpoint stores such a tensor in float32, as ``save_pretrained`` does: a re-fitted
    router keeps its precision, and both doors write the same bytes."""
    patterns = [*(getattr(model, "_keep_in_fp32_modules", None) or ())]
    patterns += getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    return any(p in name for p in patterns)


def checkpoint_tensors(
    model: nn.Module, result: QuantizationResult, layout: str = "original"
) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint of an in-memory quantized model, by its name in the file (``layout``: see
    ``_expert_key``); unquantized tensors in ``result.source_dtype`` (the model's dtype before quantization), those
    transformers keeps in float32 in float32 (``kept_in_float32``)."""
    adapter = get_adapter(model)
    source_dtype = result.source_dtype

    def dtype(name: str) -> torch.dtype | None:
        return torch.float32 if source_dtype is not None and kept_in_float32(model, name) else source_dtype

    dtype_of = None if source_dtype is None else dtype
    tensors: dict[str, torch.Tensor] = {}
    for layer in adapter.layers(model):
        tensors.update(layer_tensors(adapter, layer, result.weights, layout, dtype_of, result.config))
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers.") or (tied and name == "lm_head.weight"):
            continue
        cast = dtype(name)
        t = tensor.detach() if cast is None or not tensor.is_floating_point() else tensor.detach().to(cast)
        tensors[_param_key(adapter, name, layout)] = t.contiguous()
    return tensors


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a model that holds ``QuantLinear``/``QuantExperts`` (a loaded checkpoint):
    the same names and per-expert layout ``checkpoint_tensors`` writes, so a loaded model re-saves as it came."""
    adapter = get_adapter(model)
    tensors: dict[str, torch.Tensor] = {}
    skip: set[str] = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, QuantExperts):
            index = int(re.match(r"model\.layers\.(\d+)\.", mod_name + ".").group(1))
            for proj in EXPERT_PROJECTIONS:
                for e in range(mod.num_experts):
                    key = adapter.expert_key(index, e, proj)
                    tensors.update({f"{key}.{k}": v for k, v in mod.expert_tensors(proj, e).items()})
            skip.update(f"{mod_name}.{k}" for k in mod.state_dict())
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if name in skip or (tied and name == "lm_head.weight"):
            continue
        tensors[_native_to_checkpoint(adapter, name)] = tensor.detach().contiguous()
    return tensors


def parse_size(size: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"64KiB"`` or a byte count, in bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise CheckpointError(f"max_shard_size={size!r} is not a size; use e.g. '5GB', '500MB' or a byte count.")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def _open_for_write(path: Path):
    """Every file the checkpoint writers create goes through here (tests put a disk that fills up behind it)."""
    return open(path, "wb")


class ShardWriter:
    """safetensors shards written as tensors arrive, each at most ``max_bytes``, never holding more than one
    tensor: a shard's data is spooled to disk (one spool per alignment), and its file (8-byte header size, JSON
    header, data with the widest dtypes first so every tensor is aligned) is assembled when the shard closes.
    safetensors' own ``save_file`` needs every tensor of a file in memory at once; the files written here are
    read by it (and by every safetensors reader) unchanged. One shard is named ``model.safetensors``; several
    are ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.shards: list[tuple[Path, list[str]]] = []  # closed shards: file, tensor names
        self.total = 0
        self.names: set[str] = set()
        self._open()

    def _open(self) -> None:
        self.entries: list[tuple[str, str, list[int], int, int]] = []  # name, dtype, shape, align, nbytes
        self.spools: dict[int, object] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor; a tensor holding NaN or Inf is refused (no checkpoint ever carries one)."""
        if name in self.names:
            raise CheckpointError(f"tensor {name!r} written twice; internal error.")
        t = tensor.detach().contiguous().cpu()
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{name}: dtype {t.dtype} cannot be stored in safetensors.")
        bad = nonfinite_count(t)
        if bad:
            raise CheckpointError(
                f"refusing to write {name}: it holds {bad} NaN/Inf value(s) (a numerical overflow in the "
                "quantization, or damaged weights); no checkpoint was written. Rerun with --debug and report it."
            )
        nbytes = t.numel() * t.element_size()
        if self.entries and self.size + nbytes > self.max_bytes:
            self._close()
            self._open()
        align = min(t.element_size(), 8)
        spool = self.spools.get(align)
        if spool is None:
            spool = self.spools[align] = _open_for_write(self.folder / f".spool-{len(self.shards)}-{align}")
        if nbytes:
            spool.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        self.entries.append((name, _ST_DTYPES[t.dtype], list(t.shape), align, nbytes))
        self.names.add(name)
        self.size += nbytes

    def _close(self) -> None:
        header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        offset = 0
        order = sorted(range(len(self.entries)), key=lambda i: -self.entries[i][3])  # stable: arrival order
        for i in order:
            name, dtype, shape, _, nbytes = self.entries[i]
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        with _open_for_write(path) as out:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            for align in sorted(self.spools, reverse=True):
                spool = self.spools[align]
                spool.close()
                with open(spool.name, "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
                os.unlink(spool.name)
            out.flush()
            os.fsync(out.fileno())
        self.shards.append((path, [e[0] for e in self.entries]))
        self.total += offset

    def close(self) -> list[str]:
        """Close the last shard, give the shards their final names (and the index); returns the file names."""
        if self.entries or not self.shards:
            self._close()
        n = len(self.shards)
        names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (path, tensors), name in zip(self.shards, names, strict=True):
            os.replace(path, self.folder / name)
            weight_map.update(dict.fromkeys(tensors, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_text(self.folder / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        return names

    def abort(self) -> None:
        for spool in self.spools.values():
            with contextlib.suppress(OSError):  # a full disk fails the flush too; the folder is removed anyway
                spool.close()


def _write_text(path: Path, text: str) -> None:
    with _open_for_write(path) as f:
        f.write(text.encode())


@contextmanager
def _write_errors(out: Path) -> Iterator[None]:
    """An ``OSError`` while the checkpoint is built (a full disk, a lost mount) as one ``CheckpointError`` that says
    the previous content of ``out`` is untouched (the folder under construction is removed by the caller)."""
    try:
        yield
    except OSError as exc:
        why = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "the write failed"
        raise CheckpointError(
            f"writing the checkpoint for {out} failed: {why} ({exc.strerror or one_line(exc)}); nothing was "
            f"written and {out} was left as it was: free space on {out.parent} (or pick another out) and rerun."
        ) from exc


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP held back (delivered right after) while a few renames or a cleanup run: they are
    not left half done by an impatient second Ctrl-C."""
    sigs = {signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)}
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


class FolderLock:
    """An exclusive claim on a folder that a run writes (``--out``, ``--resume-dir``): ``.{name}.lock`` beside it,
    held with ``flock`` for the run. The kernel drops the lock when the process dies (even by ``kill -9``), so a
    stale file never blocks a later run; a second run while the first holds it is refused with its pid."""

    def __init__(self, target: str | Path, what: str = "out") -> None:
        self.target = Path(target)
        self.path = self.target.with_name(f".{self.target.name}.lock")
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no protection against concurrent runs
            return self
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise CheckpointError(
                    f"cannot create {self.path} ({exc.strerror}); pick a writable {self.what}."
                ) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise CheckpointError(
                    f"another vsraq run (pid {holder}) is writing {self.target}; wait for it to finish or choose "
                    f"another {self.what}."
                ) from None
            try:  # the holder before us may have unlinked the file after we opened it: lock the current one
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while holding it: a waiting run then re-opens a fresh file
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class _OutputFolder:
    """A checkpoint folder built under a temporary name beside ``out`` and renamed into place when complete: a
    failure (or a kill) never leaves a half-written checkpoint at ``out``, and an existing ``out`` (``overwrite``)
    is replaced whole, atomically where the OS can swap two folders. ``out`` is locked (``FolderLock``) from here to
    the rename: a second run writing the same ``out`` meanwhile is refused. Temporary folders that a killed run
    left beside ``out`` are removed when the next run takes the lock."""

    def __init__(self, out: str | Path, overwrite: bool) -> None:
        self.out = Path(out)
        self.overwrite = overwrite
        if self.out.exists() and not self.out.is_dir():
            raise CheckpointError(f"{self.out} is a file; pass a folder path as out (the folder is created).")
        self._check_empty()
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot write to {self.out.parent}: {exc.strerror}; pick a writable --out.") from exc
        self.lock = FolderLock(self.out).acquire()
        try:
            self._recover()
            self._check_empty()  # again, under the lock: a run that finished meanwhile may have written it
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        except OSError as exc:
            self.lock.release()
            raise CheckpointError(f"cannot write to {self.out.parent}: {exc.strerror}; pick a writable --out.") from exc
        except BaseException:
            self.lock.release()
            raise

    def _check_empty(self) -> None:
        if self.out.is_dir() and any(self.out.iterdir()) and not self.overwrite:
            raise CheckpointError(f"{self.out} exists and is not empty; choose another --out or pass overwrite=True.")

    def _recover(self) -> None:
        """Under the lock: what a killed run left beside ``out`` (its temporary folder; a backup of ``out`` when it
        died between the two renames of a replacement, which is restored)."""
        for stale in self.out.parent.glob(f".{self.out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        backup = self.out.with_name(f".{self.out.name}.old")
        if backup.exists():
            if self.out.exists():
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.replace(backup, self.out)

    def commit(self) -> Path:
        with _signals_deferred():
            os.chmod(self.tmp, 0o755)
            if self.out.exists():
                if _exchange(self.tmp, self.out):  # one atomic swap: ``out`` is always a whole checkpoint
                    shutil.rmtree(self.tmp, ignore_errors=True)
                else:
                    backup = self.out.with_name(f".{self.out.name}.old")
                    shutil.rmtree(backup, ignore_errors=True)
                    os.replace(self.out, backup)
                    os.replace(self.tmp, self.out)
                    shutil.rmtree(backup, ignore_errors=True)
            else:
                os.replace(self.tmp, self.out)
            self.lock.release()
        return self.out

    def abort(self) -> None:
        with _signals_deferred():
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.lock.release()


def _write_configs(folder: Path, config_dict: dict, qcfg: dict, dtype: torch.dtype | None, tokenizer) -> None:
    cfg = dict(config_dict)
    cfg.pop("quantization_config", None)
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")  # what the unquantized tensors are stored in
    cfg["quantization_config"] = qcfg
    _write_text(folder / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    _write_text(folder / "quantize_config.json", json.dumps(qcfg, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_checkpoint(
    model: nn.Module,
    result: QuantizationResult,
    out_dir: str | Path,
    tokenizer=None,
    overwrite: bool = False,
    key_layout: str = "original",
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write the GPTQ v1 checkpoint of an in-memory quantized model into ``out_dir``: built in a temporary folder
    beside it, then renamed, so a failure never leaves a half-written checkpoint. ``key_layout``: ``original``
    (the family's names, as vLLM and the Hub's GPTQ models use) or ``transformers`` (transformers-5 names, as
    gptqmodel 7 reads). Unquantized tensors are stored in the model's dtype before quantization."""
    if key_layout not in KEY_LAYOUTS:
        raise CheckpointError(f"key_layout={key_layout!r} is unknown; use one of {KEY_LAYOUTS}.")
    max_bytes = parse_size(max_shard_size)
    folder = _OutputFolder(out_dir, overwrite)
    try:
        with _write_errors(folder.out):
            writer = ShardWriter(folder.tmp, max_bytes)
            try:
                for name, tensor in checkpoint_tensors(model, result, key_layout).items():
                    writer.add(name, tensor)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            qcfg = quantization_config(result.config, result.summary, get_adapter(model), key_layout)
            _write_configs(folder.tmp, model.config.to_dict(), qcfg, result.source_dtype, tokenizer)
            return folder.commit()
    except BaseException:
        folder.abort()
        raise


class StreamingCheckpoint:
    """The checkpoint of a streamed run (``pipeline.quantize_folder``), written as layers finish: each layer's
    packed tensors and its unquantized tensors (in the source dtype) go to the shards at once; embeddings, the
    final norm and ``lm_head`` are copied from the source at the end, then the configs, then the rename."""

    def __init__(self, out, store, config: QuantConfig, layout: str, overwrite: bool, max_shard_size) -> None:
        if layout not in KEY_LAYOUTS:
            raise CheckpointError(f"key_layout={layout!r} is unknown; use one of {KEY_LAYOUTS}.")
        self.store, self.config, self.layout = store, config, layout
        self.adapter = store.adapter
        max_bytes = parse_size(max_shard_size)
        self.folder = _OutputFolder(out, overwrite)
        self.writer = ShardWriter(self.folder.tmp, max_bytes)  # opens no file yet: cannot fail

    def _dtype_of(self, native: str) -> torch.dtype:
        from .streaming import native_to_source

        if kept_in_float32(self.store.model, native):
            return torch.float32
        source = self.store.source
        for key in (native, native_to_source(self.adapter, native)):
            if key in source:
                return source.dtype_of(key)
        return source.dtype

    def write_layer(self, layer: MoELayer, weights: dict[str, QuantizedWeight]) -> None:
        with _write_errors(self.folder.out):
            for name, tensor in layer_tensors(
                self.adapter, layer, weights, self.layout, self._dtype_of, self.config
            ).items():
                self.writer.add(name, tensor)

    def finish(self, result: QuantizationResult, tokenizer=None) -> Path:
        with _write_errors(self.folder.out):
            return self._finish(result, tokenizer)

    def _finish(self, result: QuantizationResult, tokenizer=None) -> Path:
        source = self.store.source
        model = self.store.model
        tied = getattr(model.config, "tie_word_embeddings", False)
        rest = [
            n for n in model.state_dict() if not n.startswith("model.layers.") and not (tied and n == "lm_head.weight")
        ]
        for name in rest:
            from .streaming import ModelSourceError, native_to_source

            key = next((k for k in (name, native_to_source(self.adapter, name)) if k in source), None)
            if key is None:
                raise ModelSourceError(f"{source.path}: tensor {name!r} is missing from the model folder.")
            self.writer.add(_param_key(self.adapter, name, self.layout), source.read([key])[key])
        self.writer.close()
        qcfg = quantization_config(self.config, result.summary, self.adapter, self.layout)
        _write_configs(self.folder.tmp, source.config.to_dict(), qcfg, source.dtype, tokenizer)
        return self.folder.commit()

    def abort(self) -> None:
        self.writer.abort()
        self.folder.abort()


# ---------------------------------------------------------------------------------------------- load
class SafetensorsFiles(Mapping):
    """A checkpoint's tensors by name across its safetensors files, each read on first access (no full copy in
    memory). Anything but safetensors is refused; an unreadable file is a ``CheckpointError``."""

    def __init__(self, files) -> None:
        bad = [f for f in files if not str(f).endswith(".safetensors")]
        if bad:
            raise CheckpointError(f"{bad[0]} is not safetensors; vsraq never unpickles weights: re-save it.")
        self._where = {}
        for f in files:
            handle = self._guard(f, lambda f=f: safe_open(str(f), framework="pt"))
            self._where.update({k: (f, handle) for k in handle.keys()})  # noqa: SIM118 (no __iter__)

    @staticmethod
    def _guard(f, read):
        try:
            return read()
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"{f} is not a readable safetensors file ({exc}); the checkpoint is corrupt or truncated: re-create it."
            ) from exc

    def __getitem__(self, key: str) -> torch.Tensor:
        f, handle = self._where[key]
        return self._guard(f, lambda: handle.get_tensor(key))

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _open_weights(path: Path) -> SafetensorsFiles:
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = f" (found pickled {pickles}: vsraq never unpickles weights)" if pickles else ""
        raise CheckpointError(f"{path} holds no *.safetensors weights{hint}; save the model with safetensors.")
    return SafetensorsFiles(files)


@dataclass
class QuantSlot:
    """One module a GPTQ checkpoint replaces: where it sits, its shape, and its candidate checkpoint names."""

    path: str  # dotted module path from the model root
    kind: str  # "linear" | "experts"
    keys: tuple[str, ...]  # linears: candidate checkpoint prefixes (original name first, then transformers 5)
    in_features: int = 0
    out_features: int = 0
    bias: bool = False
    experts: nn.Module | None = None  # the family's experts module (its implementation is reused)
    layer_index: int = 0

    def rule(self, dynamic: dict | None) -> dict | bool | None:
        """A linear's GPTQ ``dynamic`` rule under any of its names (``config.dynamic_override``: False = left
        unquantized); None for the experts (their widths are read per expert, ``dynamic_bits``)."""
        return dynamic_override(dynamic, *self.keys) if self.kind == "linear" else None


def quantized_slots(model: nn.Module) -> list[QuantSlot]:
    """Every module a GPTQ MoE checkpoint of this family quantizes, read from the unquantized model (its
    weights may be on the meta device)."""
    adapter = get_adapter(model)
    slots = []
    for layer in adapter.layers(model):
        prefix = f"model.layers.{layer.index}"
        for name, lin in _linear_targets(adapter, layer).items():
            full = f"{prefix}.{name}"
            keys = (_native_to_checkpoint(adapter, full), full)
            slots.append(QuantSlot(full, "linear", keys, lin.in_features, lin.out_features, lin.bias is not None))
        if layer.is_moe:
            path = f"{prefix}.mlp.{child_name(layer.mlp, layer.experts)}"
            slots.append(QuantSlot(path, "experts", (), experts=layer.experts, layer_index=layer.index))
    return slots


class _TensorSource:
    """Checkpoint tensors by name; remembers which were used, so leftovers can be reported."""

    def __init__(self, tensors: dict[str, torch.Tensor], origin: str) -> None:
        self.tensors, self.origin, self.consumed = tensors, origin, set()

    def take(self, *keys: str) -> torch.Tensor:
        """The first of the candidate names present: the family's original name (what vsraq, vLLM and
        AutoGPTQ write), then the transformers-5 module name (what gptqmodel 7 writes)."""
        for key in keys:
            if key in self.tensors:
                self.consumed.add(key)
                return self.tensors[key]
        fused = [k for k in self.tensors if k.endswith((".experts.gate_up_proj", ".experts.down_proj"))]
        if ".experts." in keys[0] and fused:
            raise CheckpointError(
                f"{self.origin}: the experts are stored unquantized (fused 3D weights, e.g. {fused[0]!r}): the tool "
                "that wrote it skipped them (stock optimum GPTQ does on transformers 5). Re-quantize with "
                "quantizer='vsraq' (optimum/transformers) or `vsraq quantize`."
            )
        raise CheckpointError(
            f"{self.origin}: tensor {keys[0]!r} is missing; the checkpoint is incomplete or of another "
            "layout (expected per-expert GPTQ tensors under the family's names)."
        )


def build_quantized(slot: QuantSlot, source: _TensorSource, qcfg: dict, adapter: MoEAdapter, dtype) -> nn.Module:
    """The ``QuantLinear`` / ``QuantExperts`` for one slot, filled from the checkpoint tensors."""
    bits, group_size = int(qcfg["bits"]), int(qcfg["group_size"])
    if slot.kind == "linear":
        override = slot.rule(qcfg.get("dynamic")) or {}
        bits, group_size = int(override.get("bits", bits)), int(override.get("group_size", group_size))
        ql = QuantLinear(slot.in_features, slot.out_features, bits, group_size, bias=slot.bias, dtype=dtype)
        parts = {buf: source.take(*(f"{k}.{buf}" for k in slot.keys)) for buf in QUANT_SUFFIXES}
        check_gptq_tensors(source.origin, slot.keys[0], parts, slot.in_features, slot.out_features, bits, group_size,
                           CheckpointError)  # fmt: skip
        for buf in QUANT_SUFFIXES:
            getattr(ql, buf).copy_(parts[buf])
        if slot.bias:
            ql.bias.copy_(source.take(*(f"{k}.bias" for k in slot.keys)))
        return ql
    i = slot.layer_index
    E = slot.experts.gate_up_proj.shape[0]
    dyn = qcfg.get("dynamic")
    widths = {  # per projection (an override may name one projection or the whole expert), in either layout
        proj: [dynamic_bits(dyn, _expert_key(adapter, i, e, proj, "transformers"),
                            dynamic_bits(dyn, adapter.expert_key(i, e, proj), bits)) for e in range(E)]
        for proj in EXPERT_PROJECTIONS
    }  # fmt: skip
    if widths["gate_proj"] != widths["up_proj"]:
        e = next(e for e in range(E) if widths["gate_proj"][e] != widths["up_proj"][e])
        raise CheckpointError(
            f"{source.origin}: layer {i} expert {e} has gate_proj at {widths['gate_proj'][e]} bits and up_proj at "
            f"{widths['up_proj'][e]} (the `dynamic` overrides); vsraq runs gate and up as one fused weight of one "
            "width per expert, so it cannot load this checkpoint."
        )
    qe = QuantExperts(slot.experts, widths["gate_proj"], group_size, widths["down_proj"])
    for proj in EXPERT_PROJECTIONS:
        for e in range(E):
            keys = (  # original names (vsraq, vLLM); transformers-5 names (gptqmodel); the mix AutoRound writes
                adapter.expert_key(i, e, proj),
                f"model.layers.{i}.mlp.experts.{e}.{proj}",
                f"model.layers.{i}.{adapter.moe_block_key}.experts.{e}.{proj}",
            )
            parts = {b: source.take(*(f"{k}.{b}" for k in keys)) for b in QUANT_SUFFIXES}
            fin, fout = qe._shapes[proj]
            check_gptq_tensors(source.origin, keys[0], parts, fin, fout, widths[proj][e], group_size, CheckpointError)
            qe.load_expert(proj, e, *(parts[b] for b in QUANT_SUFFIXES))
    return qe


def check_gptq_config(qcfg, origin: str) -> dict:
    """The checkpoint's ``quantization_config`` as a dict, checked to be GPTQ v1."""
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "gptq":
        raise CheckpointError(
            f"{origin} is not a GPTQ checkpoint (quantization_config.quant_method != 'gptq'); "
            "load it with transformers' from_pretrained instead."
        )
    fmt = qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"
    if fmt != "gptq":
        raise CheckpointError(f"checkpoint_format={fmt!r} is not supported; vsraq reads GPTQ v1 ('gptq').")
    bits, group_size = qcfg.get("bits"), qcfg.get("group_size", -1)
    if isinstance(bits, bool) or bits not in (2, 3, 4, 8):
        raise CheckpointError(
            f"{origin}: quantization_config.bits={bits!r} is not a GPTQ width (2, 3, 4 or 8); config.json is damaged: "
            "restore the config.json written with the weights."
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise CheckpointError(
            f"{origin}: quantization_config.group_size={group_size!r} is not -1 or a positive size; config.json is "
            "damaged: restore the config.json written with the weights."
        )
    return qcfg


def quantized_routers(model: nn.Module, keys) -> dict[str, tuple[str, ...]]:
    """Router parameters a checkpoint stores as GPTQ tensors (``router_mode="quantize"``): parameter name ->
    the checkpoint prefixes found (original name first)."""
    adapter = get_adapter(model)
    out = {}
    for layer in adapter.moe_layers(model):
        rname = router_name(layer)
        found = tuple(k for k in (_native_to_checkpoint(adapter, rname), rname) if f"{k}.qweight" in keys)
        if found:
            out[f"{rname}.weight"] = found
    return out


def install_quantized(
    model: nn.Module,
    slots: list[QuantSlot],
    tensors: dict[str, torch.Tensor],
    qcfg: dict,
    origin: str,
    dtype,
    placement=None,
) -> tuple[set[str], set[str]]:
    """Put the checkpoint's quantized modules in place of ``slots`` (on ``placement(module path)``, default: where
    the model's embeddings are) and dequantize quantized routers into their weights; returns the tensor names
    used and the parameter names filled. Any quantized tensor (``qweight``...) left unused is an error: a module
    the loader would leave unquantized."""
    from .packing import dequantize_packed

    adapter = get_adapter(model)
    source = _TensorSource(tensors, origin)
    routers = quantized_routers(model, tensors.keys())
    if placement is None:
        device = model.get_input_embeddings().weight.device
        placement = lambda name: device  # noqa: E731
    with torch.no_grad():
        for slot in slots:
            if slot.rule(qcfg.get("dynamic")) is False:
                continue  # a "-:" dynamic pattern: the module stays a 16-bit linear, filled like the other tensors
            set_module(model, slot.path, build_quantized(slot, source, qcfg, adapter, dtype).to(placement(slot.path)))
        for param, keys in routers.items():
            weight = model.get_parameter(param)
            parts = [source.take(*(f"{k}.{b}" for k in keys)) for b in QUANT_SUFFIXES]
            out_f, in_f = weight.shape
            value = dequantize_packed(*parts, int(qcfg["bits"]), in_f, out_f, torch.float32).to(weight.dtype)
            _assign(model, param, value.to(placement(param) if weight.is_meta else weight.device))
    leftover = sorted(k for k in tensors if k not in source.consumed and k.rsplit(".", 1)[-1] in QUANT_SUFFIXES)
    if leftover:
        raise CheckpointError(
            f"{origin}: quantized tensors {leftover[:4]} belong to no module vsraq knows for this family; "
            "loading would leave those modules unquantized. The checkpoint does not match this model's layout."
        )
    return source.consumed, set(routers)


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter (possibly on the meta device) by ``value``."""
    parent, _, leaf = name.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    module._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def placement_of(device_map) -> callable:
    """``device_map`` as a function of a module or parameter path: a device (``"cpu"``, ``"cuda:0"``,
    ``torch.device``), ``"auto"`` (the current CUDA device when there is one, else the CPU), or a dict of module
    prefixes to devices as transformers takes it (the longest matching prefix wins; ``""`` is the default)."""
    from .streaming import resolve_device

    def device(value):
        try:
            return resolve_device(value if not isinstance(value, int) else f"cuda:{value}")
        except RuntimeError as exc:
            raise CheckpointError(
                f"device_map={device_map!r}: {value!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or 'auto'."
            ) from exc

    if device_map is None or isinstance(device_map, (str, torch.device, int)):
        dev = device("auto" if device_map is None else device_map)
        return lambda name: dev
    if not isinstance(device_map, dict):
        raise CheckpointError(f"device_map={device_map!r} must be a device, 'auto' or a dict of module -> device.")
    table = {k: device(v) for k, v in device_map.items()}
    default = table.get("", torch.device("cpu"))

    def place(name: str) -> torch.device:
        best, dev = -1, default
        for prefix, d in table.items():
            if prefix and (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, dev = len(prefix), d
        return dev

    return place


_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


def _load_dtype(dtype):
    """A torch floating dtype, its name (``"bfloat16"``) or ``"auto"``; anything else is a ``CheckpointError``."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.removeprefix("torch.")]
    raise CheckpointError(f"dtype={dtype!r} is not a floating dtype; use torch.float32, torch.bfloat16, "
                          "torch.float16 or 'auto'.")  # fmt: skip


def load_checkpoint(path: str | Path, dtype: torch.dtype | str = torch.float32, device_map="cpu") -> nn.Module:
    """Load a GPTQ v1 MoE checkpoint (ours, or any per-expert GPTQ checkpoint of a supported family) onto
    the transformers 5 model, with ``QuantLinear``/``QuantExperts`` in place of the quantized modules.

    The model is built on the meta device and each module is filled from the (lazily read) safetensors files
    directly on its device, in ``dtype`` (``"auto"``: the dtype the checkpoint stores its unquantized tensors
    in): no full-size float32 copy is ever made. ``device_map``: see ``placement_of``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; it is not a saved model folder.")
    check_model_dir(path, "checkpoint folder", CheckpointError)
    dtype = _load_dtype(dtype)
    place = placement_of(device_map)
    tensors = _open_weights(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(
            f"{path}/config.json cannot be read as a transformers config ({one_line(exc)[:300]}); restore it."
        ) from exc
    qcfg = check_gptq_config(getattr(config, "quantization_config", None), str(path))
    del config.quantization_config
    if dtype == "auto":
        dtype = config.dtype if isinstance(getattr(config, "dtype", None), torch.dtype) else torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = get_adapter(model)
    consumed, filled = install_quantized(model, quantized_slots(model), tensors, qcfg, str(path), dtype, place)
    quant_names = {
        f"{mod_name}.{k}"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, (QuantLinear, QuantExperts))
        for k in mod.state_dict()
    }
    with torch.no_grad():
        rest = {}
        for name in model.state_dict():
            if name in quant_names or name in filled:
                continue
            for key in (_native_to_checkpoint(adapter, name), name):
                if key in tensors and key not in consumed:
                    value = tensors[key]
                    bad = nonfinite_count(value)
                    if bad:
                        raise CheckpointError(
                            f"{path}: {key} holds {bad} NaN/Inf value(s); the checkpoint is damaged: re-create it."
                        )
                    if value.is_floating_point():  # (what transformers keeps in float32 stays so, as it loads it)
                        value = value.to(torch.float32 if kept_in_float32(model, name) else dtype)
                    rest[name] = value.to(place(name))
                    consumed.add(key)
                    break
        model.load_state_dict(rest, strict=False, assign=True)
        tied = getattr(config, "tie_word_embeddings", False)
        if tied:
            model.tie_weights()
        for mod_name, mod in model.named_modules():  # non-persistent buffers (rotary frequencies): recomputed
            if any(b is not None and b.is_meta for b in mod.buffers(recurse=False)) and mod._non_persistent_buffers_set:
                mod.to_empty(device=place(mod_name), recurse=False)
                model._init_weights(mod)
    missing = [n for n, t in model.state_dict().items() if t.is_meta] + [
        n for n, b in model.named_buffers() if b.is_meta
    ]
    leftover = sorted(set(tensors) - consumed)
    if missing or leftover:
        raise CheckpointError(
            f"{path}: tensors missing from the checkpoint {missing[:5]} or not used {leftover[:5]}; "
            "it does not match this model family's layout."
        )
    return model.eval()
