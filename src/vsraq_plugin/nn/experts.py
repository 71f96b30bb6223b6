"""``QuantExperts``: a transformers-5 fused experts module whose weights are per-expert GPTQ v1 tensors.

It stands in for the family's experts module (``MixtralExperts``, ``Qwen3MoeExperts`` ...) and computes
through the *same* transformers experts implementation (``config._experts_implementation``: grouped_mm,
batched_mm or the family's eager loop), fed with the dequantized weights, so a loaded checkpoint computes
exactly what the in-memory quantized model computed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import takes_triton_path
from ..packing import dequantize_packed, packed_rows

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# The name under which the plugin registers its experts implementation in transformers' ExpertsInterface.
EXPERTS_IMPLEMENTATION = "vsraq"


class QuantExperts(nn.Module):
    def __init__(
        self, experts: nn.Module, bits: int | list[int], group_size: int, down_bits: int | list[int] | None = None
    ) -> None:
        """``bits``: the experts' width (one, or one per expert) for gate/up, and for down unless ``down_bits``
        gives down its own (widths per projection)."""
        super().__init__()
        E, two_i, d = experts.gate_up_proj.shape
        inter = two_i // 2
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, d, inter
        # Mixed precision: one width per expert and projection (gate and up share one); each projection's buffers
        # are sized for its widest expert and each expert uses the first packed rows its width needs.
        per_expert = lambda b: [b] * E if isinstance(b, int) else [int(x) for x in b]  # noqa: E731
        self.expert_bits = per_expert(bits)
        self.down_bits = self.expert_bits if down_bits is None else per_expert(down_bits)
        self.bits, self.group_size = max(self.expert_bits + self.down_bits), group_size
        # What transformers' experts implementations read from the module.
        self.config = experts.config
        self.act_fn = experts.act_fn
        for attr, default in (
            ("has_gate", True),
            ("has_bias", False),
            ("is_transposed", False),
            ("is_concatenated", True),
            ("_is_expert_parallel", False),
            ("has_post_expert_norm", False),
        ):
            setattr(self, attr, getattr(experts, attr, default))
        cls = type(experts)
        self._eager_forward = getattr(cls.forward, "__wrapped__", cls.forward)
        self._gate_fn = getattr(cls, "_apply_gate", None)
        shapes = {"gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}  # (in, out)
        for proj, (fin, fout) in shapes.items():
            groups = 1 if group_size == -1 else fin // group_size
            bits = max(self.widths(proj))
            self.register_buffer(f"{proj}_qweight", torch.zeros(E, packed_rows(fin, bits), fout, dtype=torch.int32))
            self.register_buffer(f"{proj}_qzeros", torch.zeros(E, groups, packed_rows(fout, bits), dtype=torch.int32))
            self.register_buffer(f"{proj}_scales", torch.zeros(E, groups, fout, dtype=torch.float16))
            self.register_buffer(f"{proj}_g_idx", torch.zeros(E, fin, dtype=torch.int32))
        self._shapes = shapes

    def widths(self, proj: str) -> list[int]:
        """The width of every expert's ``proj`` (``gate_proj``, ``up_proj``: ``expert_bits``; ``down_proj``)."""
        return self.down_bits if proj == "down_proj" else self.expert_bits

    def _dequantize(self, proj: str, dtype: torch.dtype) -> torch.Tensor:
        fin, fout = self._shapes[proj]
        q, z = getattr(self, f"{proj}_qweight"), getattr(self, f"{proj}_qzeros")
        s, g = getattr(self, f"{proj}_scales"), getattr(self, f"{proj}_g_idx")
        out = []
        for e, b in enumerate(self.widths(proj)):
            qe, ze = q[e][: packed_rows(fin, b)], z[e][:, : packed_rows(fout, b)]
            out.append(dequantize_packed(qe, ze, s[e], g[e], b, fin, fout, dtype))
        return torch.stack(out)

    def load_expert(self, proj: str, e: int, qweight, qzeros, scales, g_idx) -> None:
        """Copy one expert's GPTQ v1 tensors (packed at its own width) into the stacked buffers."""
        getattr(self, f"{proj}_qweight")[e].zero_()[: qweight.shape[0]].copy_(qweight)
        getattr(self, f"{proj}_qzeros")[e].zero_()[:, : qzeros.shape[1]].copy_(qzeros)
        getattr(self, f"{proj}_scales")[e].copy_(scales)
        getattr(self, f"{proj}_g_idx")[e].copy_(g_idx)

    def expert_tensors(self, proj: str, e: int) -> dict[str, torch.Tensor]:
        """One expert's GPTQ v1 tensors at its own width (the inverse of ``load_expert``)."""
        fin, fout = self._shapes[proj]
        b = self.widths(proj)[e]
        return {
            "qweight": getattr(self, f"{proj}_qweight")[e][: packed_rows(fin, b)].contiguous(),
            "qzeros": getattr(self, f"{proj}_qzeros")[e][:, : packed_rows(fout, b)].contiguous(),
            "scales": getattr(self, f"{proj}_scales")[e].contiguous(),
            "g_idx": getattr(self, f"{proj}_g_idx")[e].contiguous(),
        }

    @property
    def gate_up_proj(self) -> torch.Tensor:
        dtype = self.gate_proj_scales.dtype if self._compute_dtype is None else self._compute_dtype
        return torch.cat([self._dequantize("gate_proj", dtype), self._dequantize("up_proj", dtype)], dim=1)

    @property
    def down_proj(self) -> torch.Tensor:
        dtype = self.gate_proj_scales.dtype if self._compute_dtype is None else self._compute_dtype
        return self._dequantize("down_proj", dtype)

    _compute_dtype: torch.dtype | None = None

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        if self._gate_fn is not None:
            return self._gate_fn(self, gate_up_out)
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    use_triton: bool | None = None

    def _triton_path(self, x: torch.Tensor) -> bool:
        return takes_triton_path(x, self.use_triton)

    def kernel_weights(self):
        """The stacked kernel layouts of every expert, gate and up fused along N, and down, built once at first
        use: one launch each, whatever the experts' widths (mixed widths carry a per-expert width table per stack,
        so down's widths may differ from gate/up's)."""
        if getattr(self, "_kernel_weights", None) is None:
            from ..kernels.layout import KernelWeight, to_kernel_layout
            from ..kernels.moe_gemm import stack_experts

            def layout(proj: str, e: int) -> KernelWeight:
                fin, fout = self._shapes[proj]
                b = self.widths(proj)[e]
                return to_kernel_layout(
                    getattr(self, f"{proj}_qweight")[e][: packed_rows(fin, b)],
                    getattr(self, f"{proj}_qzeros")[e][:, : packed_rows(fout, b)],
                    getattr(self, f"{proj}_scales")[e],
                    getattr(self, f"{proj}_g_idx")[e],
                    b,
                    fin,
                    fout,
                )

            fused = []
            for e in range(self.num_experts):
                g, u = layout("gate_proj", e), layout("up_proj", e)
                if (
                    not torch.equal(g.g_idx, u.g_idx)
                    or (g.perm is None) != (u.perm is None)
                    or (g.perm is not None and not torch.equal(g.perm, u.perm))
                ):
                    raise NotImplementedError("gate and up with different g_idx cannot share a fused launch.")
                fused.append(
                    KernelWeight(
                        torch.cat([g.qweight, u.qweight], 1),
                        torch.cat([g.zeros, u.zeros], 1),
                        torch.cat([g.scales, u.scales], 1),
                        g.g_idx,
                        g.bits,
                        g.in_features,
                        2 * g.out_features,
                        g.group_size,
                        g.perm,
                    )
                )
            down = [layout("down_proj", e) for e in range(self.num_experts)]
            self._kernel_weights = (stack_experts(fused), stack_experts(down))
        return self._kernel_weights

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        if self._triton_path(hidden_states):
            from ..kernels.moe_gemm import fused_moe

            gate_up, down = self.kernel_weights()
            return fused_moe(hidden_states, gate_up, down, top_k_index, top_k_weights, act=self.act_fn)

        name = getattr(self.config, "_experts_implementation", None) or "eager"
        if name == EXPERTS_IMPLEMENTATION:  # "vsraq" off the Triton path: the family's own loop, dequantized
            name = "eager"
        impl = ALL_EXPERTS_FUNCTIONS.get_interface(name, self._eager_forward)
        self._compute_dtype = hidden_states.dtype
        try:
            return impl(self, hidden_states, top_k_index, top_k_weights)
        finally:
            self._compute_dtype = None

    def extra_repr(self) -> str:
        bits = self.expert_bits if len(set(self.expert_bits)) > 1 else self.expert_bits[0]
        down = "" if self.down_bits == self.expert_bits else f", down_bits={self.down_bits}"
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
            f"intermediate_dim={self.intermediate_dim}, bits={bits}{down}, group_size={self.group_size}"
        )


def vsraq_experts_forward(module: nn.Module, hidden_states, top_k_index, top_k_weights):
    """transformers experts implementation ``"vsraq"`` (``from_pretrained(..., experts_implementation="vsraq")``
    or ``model.set_experts_implementation("vsraq")``): a ``QuantExperts`` runs the fused MoE Triton kernel on
    CUDA and its dequantized loop elsewhere; an unquantized experts module runs its family's eager loop."""
    if isinstance(module, QuantExperts):
        return module(hidden_states, top_k_index, top_k_weights)
    eager = getattr(type(module).forward, "__wrapped__", type(module).forward)
    return eager(module, hidden_states, top_k_index, top_k_weights)
