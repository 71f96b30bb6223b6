"""Per-layer state of an interrupted run, written atomically, so a restart resumes bit for bit.

The work dir holds ``layer_NNNN.safetensors`` (that layer's codes and grids, and its router when the method
changed it), the calibration streams after the last finished layer, and ``progress.json``, written last: a
kill at any point leaves a consistent state. A fingerprint of the model, data and config guards against
resuming another run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .calibration import CalibrationError
from .config import QuantConfig
from .models import MoEAdapter, MoELayer
from .quantizer import QuantizedWeight
from .solve import dequantize_grid

_FIELDS = ("codes", "scales", "zeros", "g_idx")
ROUTER_KEY = "__router__"


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``save_file`` to a temporary name beside ``path``, then rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():  # safetensors refuses tensors that share memory (gate/up share g_idx)
        v = v.detach().contiguous().cpu()
        out[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    save_file(out, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fingerprint(config: QuantConfig, windows: torch.Tensor | None, parts: list[bytes]) -> str:
    """A hash of the settings that change the result, the calibration windows and the model (``parts``)."""
    h = hashlib.sha256()
    memory_only = ("offload", "expert_chunk")  # where and how much is held, not what comes out
    settings = {k: v for k, v in config.to_dict().items() if k not in memory_only}
    h.update(json.dumps(settings, sort_keys=True).encode())
    if windows is not None:
        h.update(windows.cpu().numpy().tobytes())
    for p in parts:
        h.update(p)
    return h.hexdigest()


class ResumeState:
    """The work dir of one run (see the module docstring)."""

    def __init__(self, work_dir: str | Path, fingerprint: str, dist=None):
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.dist = dist  # distributed runs: rank 0 writes the layers and the progress, every rank its streams

    def _streams(self, index: int) -> Path:
        d = self.dist
        suffix = "" if d is None or not d.active or d.world == 1 else f".r{d.rank}"
        return self.dir / f"streams_{index:04d}{suffix}.safetensors"

    def completed(self) -> int:
        """Layers finished by an earlier run with the same fingerprint (0 for a fresh work dir)."""
        prog = self.dir / "progress.json"
        if not prog.exists():
            return 0
        data = json.loads(prog.read_text())
        if data.get("fingerprint") != self.fingerprint:
            raise CalibrationError(
                f"the work dir {self.dir} belongs to another run (model, calibration data or config differ); "
                "delete it or pass a fresh one."
            )
        return int(data["completed_layers"])

    def summary(self) -> dict:
        data = json.loads((self.dir / "progress.json").read_text())
        keep = ("fallbacks", "layer_seconds", "layer_comm_bytes", "router_agreement")
        per_layer = ("expert_bits", "expert_damage", "expert_down_bits", "expert_down_damage", "router_cg")
        per_layer += ("expert_layer_budgets", "expert_layer_budget_params")  # budget_scope="model": the pre-pass's
        keep += ("expert_bits_scores", *per_layer)
        out = {k: v for k, v in data["summary"].items() if k in keep}
        for k in per_layer:
            # JSON made the layer indices strings
            if isinstance(out.get(k), dict):
                out[k] = {int(i): v for i, v in out[k].items()}
        return out

    def load_layer(self, index: int, cfg: QuantConfig) -> tuple[dict[str, QuantizedWeight], torch.Tensor | None]:
        """A finished layer's results by name, and its router weight when the run changed it."""
        tensors = load_file(str(self.dir / f"layer_{index:04d}.safetensors"))
        names = sorted({k.rsplit(".", 1)[0] for k in tensors if not k.startswith("__") and not k.endswith(".bits")})
        return {name: _from_tensors(tensors, name, cfg) for name in names}, tensors.get(ROUTER_KEY)

    def load_streams(self, done: int, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        streams = load_file(str(self._streams(done - 1)))
        n = len([k for k in streams if k.startswith("q.")])
        x_q = [streams[f"q.{i}"].to(device) for i in range(n)]
        x_fp = [streams[f"f.{i}"].to(device) for i in range(n)] if "f.0" in streams else None
        return x_q, x_fp

    def save_layer(
        self,
        index: int,
        weights: dict[str, QuantizedWeight],
        router: torch.Tensor | None,
        summary: dict,
        x_q: list[torch.Tensor],
        x_fp: list[torch.Tensor] | None,
    ) -> None:
        """Record layer ``index`` as finished: its results, then the streams, then the progress (last)."""
        writer = self.dist is None or self.dist.writer
        tensors = {}
        if router is not None:  # VSRAQ re-fits the 16-bit router: it is part of the layer's result
            tensors[ROUTER_KEY] = router
        for name, qw in weights.items():
            for f in _FIELDS:
                tensors[f"{name}.{f}"] = getattr(qw, f)
            if qw.bits_per_matrix is not None:
                tensors[f"{name}.bits"] = qw.bits_per_matrix
        if writer:
            atomic_save(tensors, self.dir / f"layer_{index:04d}.safetensors")
        streams = {f"q.{i}": t for i, t in enumerate(x_q)}
        streams.update({f"f.{i}": t for i, t in enumerate(x_fp or [])})
        atomic_save(streams, self._streams(index))
        if self.dist is not None:
            self.dist.barrier()  # every rank's streams are on disk before the progress says the layer is done
        if writer:
            atomic_write_text(
                self.dir / "progress.json",
                json.dumps(
                    {"fingerprint": self.fingerprint, "completed_layers": index + 1, "summary": summary}, indent=1
                ),
            )
        if self.dist is not None:
            self.dist.barrier()
        old = self._streams(index - 1)
        if old.exists():
            old.unlink()


def _from_tensors(tensors: dict[str, torch.Tensor], name: str, cfg: QuantConfig) -> QuantizedWeight:
    codes, scales = tensors[f"{name}.codes"], tensors[f"{name}.scales"]
    zeros, g_idx = tensors[f"{name}.zeros"], tensors[f"{name}.g_idx"]
    per_matrix = tensors.get(f"{name}.bits")
    bits = int(per_matrix.max()) if per_matrix is not None else cfg.bits
    return QuantizedWeight(
        codes, scales, zeros, g_idx, dequantize_grid(codes, scales, zeros, g_idx), bits, cfg.group_size, per_matrix
    )


@torch.no_grad()
def apply_layer(
    adapter: MoEAdapter, layer: MoELayer, weights: dict[str, QuantizedWeight], router: torch.Tensor | None
) -> None:
    """Write a restored layer's dequantized weights (and router) into the model's layer."""
    from .methods import router_name

    prefix = f"model.layers.{layer.index}"
    for name, lin in {**adapter.attention_linears(layer), **adapter.dense_mlp_linears(layer)}.items():
        if f"{prefix}.{name}" in weights:  # (absent: left unquantized by a "-:" dynamic pattern)
            lin.weight.copy_(weights[f"{prefix}.{name}"].weight[0])
    if layer.is_moe:
        ex = layer.experts
        gate, up = weights[f"{prefix}.mlp.experts.gate_proj"], weights[f"{prefix}.mlp.experts.up_proj"]
        ex.gate_up_proj.copy_(torch.cat([gate.weight, up.weight], dim=1))
        ex.down_proj.copy_(weights[f"{prefix}.mlp.experts.down_proj"].weight)
        if router_name(layer) in weights:
            layer.router.weight.copy_(weights[router_name(layer)].weight[0])
        if router is not None:  # the router as the run left it (re-fitted, or quantized)
            layer.router.weight.copy_(router)
