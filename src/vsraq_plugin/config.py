"""``QuantConfig``: every setting of a quantization run, validated up front with errors that say the fix."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .validation import InputError

SUPPORTED_BITS = (2, 3, 4, 8)
METHODS = ("rtn", "gptq", "agq", "vsraq")
ROUTER_MODES = ("refit", "quantize", "keep")
OFFLOAD_MODES = ("auto", "device", "cpu")
ALLOCATIONS = ("measured", "router-norm", "random", "frequency")
ALLOCATION_WEIGHTS = ("mass", "fragility")
BUDGET_SCOPES = ("layer", "model")
DAMAGE_METRICS = ("readers", "residual")
METRIC_SOLVES = ("fast", "exact")
ROUTER_SOLVES = ("auto", "dense", "cg")
VSRAQ_MSE = 2.4  # vsraq's default clipping-search norm (the GPTQ reference's)
MSE_NORMS = (1.0, 16.0)  # the norms the clipping search takes (0: no search)
DYNAMIC_SETTINGS = ("bits", "group_size")  # what a ``dynamic`` override may set per module


def dynamic_override(dynamic: dict | None, *names: str) -> dict | bool | None:
    """The GPTQ ``dynamic`` rule for one module, read as gptqmodel reads it: the first pattern, in order, that
    matches the start of one of the module's ``names`` (``re.match``) decides: ``"-:pattern"`` gives False (the
    module stays unquantized), ``"+:pattern"`` or a bare pattern its overrides; None when no pattern matches."""
    for pattern, override in (dynamic or {}).items():
        raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        if any(re.match(raw, name) for name in names):
            return False if pattern.startswith("-:") else dict(override)
    return None


def _valid_device(device: str) -> bool:
    if device == "auto":
        return True
    try:
        import torch

        torch.device(device)
    except (RuntimeError, ValueError):
        return False
    return True


class ConfigError(InputError):
    """A setting is out of range; the message names the field and what to use instead."""


@dataclass
class QuantConfig:
    """Settings of one quantization run (GPTQ conventions, plus the VSRAQ knobs of DESIGN 3).

    ``method``: ``rtn`` (round to nearest), ``gptq`` (stock GPTQ), ``agq`` (MoEQuant's affinity-guided
    GPTQ) or ``vsraq`` (GPTQ with the routing-alignment terms). With every ``lambda_*`` = 0, ``vsraq``
    solves exactly what ``gptq`` solves.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    # Group-aware act-order (GAR, gptqmodel's and optimum's default): important columns first, groups intact.
    act_group_aware: bool = True
    # The clipping search of each group's grid (quantizer.search_qparams), gptqmodel's ``mse``: the norm of the
    # rounding error it minimises over shrunk ranges (2.4 in the GPTQ reference), 0 for the full range (stock
    # GPTQ). None: the method's default, 2.4 for vsraq (less KL on the three fixtures and on two of three held-out
    # trained models, README) and 0 for the stock methods.
    mse: float | None = None
    damp_percent: float = 0.01
    damp_auto_increment: float = 0.01
    block_size: int = 128
    method: str = "vsraq"
    true_sequential: bool = True
    # Experts with fewer calibration tokens than this fall back to all-token coverage, then RTN (DESIGN 3.5).
    min_expert_tokens: int = 16

    # --- VSRAQ knobs (DESIGN 3.3-3.6); 0 switches a term off ---
    lambda_value: float = 1.0  # router token fragility weight: w_t = 1 + lambda_value * phi(m_t)
    lambda_structure: float = 1.0  # extra weight on boundary-participant rows of the router
    lambda_expert: float = 1.0  # expert tokens: downstream (next-layer) fragility
    lambda_attention: float = 4.0  # attention / shared experts: own-layer fragility
    lambda_metric: float = 32.0  # output metric of the residual writers (DESIGN 3.5b): M = I + lambda * A / ||A||
    lambda_metric_v: float = 256.0  # the same metric carried back to v_proj through o_proj (DESIGN 3.5d)
    lambda_metric_up: float = 0.0  # ... and to the experts' gate/up through their down_proj (DESIGN 3.5d)
    lambda_metric_qk: float = 32.0  # ... and to attention's other input projections (q, k) through softmax, by probes
    lambda_metric_mlp: float = 128.0  # ... and to the dense / shared MLP's gate/up through its down_proj, by probes
    probe_directions: int = 8  # the boundary matrix's top directions probed (one backward pass each, per batch)
    probe_tokens: int = 4096  # the probes run on the first calibration batches that hold this many tokens
    # How a column is rounded under an output metric: "fast" (low-rank coordinate descent, DESIGN 3.5f, about
    # GPTQ's cost) or "exact" (nearest plane over the rows on a tiled wavefront, 5-20x GPTQ's solve).
    metric_solve: str = "fast"
    near_miss_weight: float = 0.1  # weight of near-miss tokens in an expert's Hessian
    margin_band: float = 1.0  # near-miss band, in units of the margin scale tau
    reweight_rounds: int = 2  # structure-alignment reweighting rounds for the router
    router_ridge: float = 0.1  # pull of the re-fitted router toward the original, relative to mean diag(X^T W X)
    fp_target_alpha: float = 1.0  # residual writers' target: alpha * FP + (1 - alpha) * quantized stream (3.5c)
    metric_horizon: int = 8  # MoE routers in the down projections' metric (3.5e (i)); 1: the next router only
    metric_decay: float = 0.5  # weight of the j-th router after the next (uniform expert pairs): decay^j
    drift_beta: float = 0.0  # o_proj also cancels beta x the residual stream's drift (3.5e (ii)); no gain measured
    router_mode: str = "refit"  # refit (16-bit, closed form) | quantize (GPTQ on router) | keep
    # How the router re-fit is solved: "dense" (E Cholesky solves of the (E, d, d) normal equations), "cg"
    # (matrix-free preconditioned conjugate gradients, O(d^2 + E d + nnz) memory) or "auto" (dense up to 256 MiB).
    router_solve: str = "auto"

    # Block-wise refinement (DESIGN 3.7, refine.py): AutoRound-style rounding offsets and clipping after each
    # block's solve, against the FP stream plus the next router's value/structure terms. Off (0 steps) by default.
    refine_steps: int = 0
    refine_lr: float = 1e-3  # signed-gradient step on the offsets (in grid steps) and clip factors; 5e-3 was worse
    refine_lambda_value: float = 0.0  # fragility-weighted MSE of the next router's logits
    refine_lambda_structure: float = 0.0  # hinge on the next router's top-k boundary margin (and order)
    refine_clip_min: float = 0.5  # lower bound of the per-group clipping factors
    refine_seed: int = 0  # order of the calibration batches

    # Expert-wise mixed precision (DESIGN 6): an average width over ``bit_levels`` for the routed experts of
    # each MoE layer; attention, shared experts and dense layers keep ``bits``.
    bits_budget: float | None = None
    bit_levels: list[int] | None = None
    # Which experts get the bits (mixed_precision.py): "measured" (each expert's solve loss at every width times
    # its routing mass, then the exact knapsack under the budget), "router-norm" (the seed paper's rule),
    # "random" (seeded by allocation_seed) or "frequency" (most-routed experts widest).
    allocation: str = "measured"
    # measured: the damage's weight per expert: "mass" (sum of its gate weights over the calibration tokens) or
    # "fragility" (vsraq: the gate weights times the next router's fragility, the weights of its Hessian).
    allocation_weight: str = "mass"
    # measured: the budget holds per MoE layer ("layer") or over all routed experts of the model ("model": per-layer
    # budgets from a cheap full-precision pre-pass, then the exact allocation per layer under its share).
    budget_scope: str = "layer"
    # measured: gate/up and down of an expert get their own widths (one knapsack over both parts of every expert)
    # instead of one width per expert; gate and up keep one width (they are one fused matrix in the solve).
    # None (default): per projection for the measured allocation (it paid at 2.5 and 3.5 bits on the fixtures).
    width_per_projection: bool | None = None
    # measured, widths per projection: the norm both parts' damages are measured in, in the residual stream:
    # "readers" (the read metric of the linears that read the stream, mixed_precision.read_metric) or "residual"
    # (the plain norm).
    damage_metric: str = "readers"
    allocation_seed: int = 0  # random allocation
    promote_factor: float = 2.0  # max-variance promotion threshold, x the layer's median (router-norm)

    # Per-module overrides, GPTQ ``dynamic`` style: {"regex": {"bits": 3}}.
    dynamic: dict[str, dict[str, Any]] = field(default_factory=dict)

    # Where the solve runs (DESIGN 7): "auto" = the current CUDA device when there is one, else the CPU; or a
    # torch device string ("cpu", "cuda", "cuda:1"). Layers move there one at a time, in float32.
    device: str = "auto"
    # Where the calibration streams live between layers: "auto" (on the device when they fit), "device", "cpu".
    offload: str = "auto"
    # Sums over calibration tokens (Hessians, cross-Grams) as float64 sums of per-batch float32 terms: the result
    # does not depend on how batches are split over ranks (distributed runs equal one process, bit for bit).
    # False: float32 running sums (half the accumulator memory; results differ in the last bits).
    exact_sums: bool = True
    # Routed experts whose Hessians are built and solved together (a chunk at a time, so only that chunk's
    # Hessians are held: DeepSeek-V3's 256 gate/up Hessians are 105 GB in float64). 0 (default): as many as fit in
    # 8 GiB of Hessian sums on a GPU, 1 GiB on the CPU. The codes do not depend on it.
    expert_chunk: int = 0

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first bad field and the fix."""
        if self.bits not in SUPPORTED_BITS or isinstance(self.bits, bool):
            raise ConfigError(f"bits={self.bits!r} is not supported; use one of {SUPPORTED_BITS}.")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool):
            raise ConfigError(f"group_size={self.group_size!r} must be an int: -1 (per row) or a positive size.")
        if self.group_size != -1 and self.group_size <= 0:
            raise ConfigError(
                f"group_size={self.group_size} is invalid; use -1 for one group per row or a positive size "
                "such as 32, 64 or 128."
            )
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is unknown; use one of {METHODS}.")
        if self.mse is not None and (
            isinstance(self.mse, bool)
            or not isinstance(self.mse, (int, float))
            or not (self.mse == 0 or MSE_NORMS[0] <= self.mse <= MSE_NORMS[1])
        ):
            raise ConfigError(
                f"mse={self.mse!r} must be 0 (the full range), a norm in {list(MSE_NORMS)} for the clipping search "
                "(e.g. 2.4), or None (the method's default: 2.4 for vsraq, 0 otherwise)."
            )
        if self.metric_solve not in METRIC_SOLVES:
            raise ConfigError(f"metric_solve={self.metric_solve!r} is unknown; use one of {METRIC_SOLVES}.")
        if self.router_solve not in ROUTER_SOLVES:
            raise ConfigError(
                f"router_solve={self.router_solve!r} is unknown; use one of {ROUTER_SOLVES} ('auto' picks dense "
                "while the (E, d, d) normal equations fit in 256 MiB, else cg)."
            )
        if self.router_mode not in ROUTER_MODES:
            raise ConfigError(f"router_mode={self.router_mode!r} is unknown; use one of {ROUTER_MODES}.")
        if not (0.0 < self.damp_percent < 1.0) or not math.isfinite(self.damp_percent):
            raise ConfigError(f"damp_percent={self.damp_percent} must lie in (0, 1); GPTQ's usual value is 0.01.")
        if not (0.0 <= self.damp_auto_increment < 1.0):
            raise ConfigError(
                f"damp_auto_increment={self.damp_auto_increment} must lie in [0, 1); 0 disables escalation."
            )
        if self.block_size <= 0:
            raise ConfigError(f"block_size={self.block_size} must be positive; 128 is GPTQ's default.")
        if self.min_expert_tokens < 0:
            raise ConfigError(f"min_expert_tokens={self.min_expert_tokens} must be >= 0.")
        for name in (
            "lambda_value",
            "lambda_structure",
            "lambda_expert",
            "lambda_attention",
            "lambda_metric",
            "lambda_metric_v",
            "lambda_metric_up",
            "lambda_metric_qk",
            "lambda_metric_mlp",
            "near_miss_weight",
            "margin_band",
            "router_ridge",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}={value!r} must be a finite number >= 0; 0 switches the term off.")
        if not (0.0 <= self.drift_beta <= 1.0):
            raise ConfigError(f"drift_beta={self.drift_beta} must lie in [0, 1]; 0 switches the drift term off.")
        if isinstance(self.metric_horizon, bool) or not isinstance(self.metric_horizon, int) or self.metric_horizon < 1:
            raise ConfigError(
                f"metric_horizon={self.metric_horizon!r} must be an int >= 1 (1: the next router only, e.g. 8)."
            )
        for name in ("probe_directions", "probe_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"{name}={value!r} must be an int >= 1 (defaults: probe_directions=8, probe_tokens=4096)."
                )
        if not (0.0 < self.metric_decay <= 1.0):
            raise ConfigError(f"metric_decay={self.metric_decay} must lie in (0, 1], e.g. 0.5.")
        if not (0.0 <= self.fp_target_alpha <= 1.0):
            raise ConfigError(f"fp_target_alpha={self.fp_target_alpha} must lie in [0, 1].")
        if not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise ConfigError(f"refine_steps={self.refine_steps!r} must be an int >= 0; 0 switches refinement off.")
        for name in ("refine_lr", "refine_lambda_value", "refine_lambda_structure"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}={value!r} must be a finite number >= 0.")
        if not (0.0 < self.refine_clip_min <= 1.0):
            raise ConfigError(f"refine_clip_min={self.refine_clip_min} must lie in (0, 1].")
        if self.reweight_rounds < 0:
            raise ConfigError(f"reweight_rounds={self.reweight_rounds} must be >= 0.")
        if (self.bits_budget is None) != (self.bit_levels is None):
            raise ConfigError("bits_budget and bit_levels go together, e.g. bits_budget=3.0, bit_levels=[2, 3, 4].")
        if self.bit_levels is not None:
            if not 2 <= len(set(self.bit_levels)) == len(self.bit_levels) <= 3 or any(
                b not in SUPPORTED_BITS for b in self.bit_levels
            ):
                raise ConfigError(
                    f"bit_levels={self.bit_levels} must be 2 or 3 distinct widths from {SUPPORTED_BITS}, "
                    "e.g. [2, 3, 4]."
                )
            if not min(self.bit_levels) <= self.bits_budget <= max(self.bit_levels):
                raise ConfigError(f"bits_budget={self.bits_budget} must lie within bit_levels={self.bit_levels}.")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation={self.allocation!r} is unknown; use one of {ALLOCATIONS}.")
        if self.allocation_weight not in ALLOCATION_WEIGHTS:
            raise ConfigError(
                f"allocation_weight={self.allocation_weight!r} is unknown; use one of {ALLOCATION_WEIGHTS}."
            )
        if self.budget_scope not in BUDGET_SCOPES:
            raise ConfigError(f"budget_scope={self.budget_scope!r} is unknown; use one of {BUDGET_SCOPES}.")
        if self.budget_scope == "model" and self.allocation != "measured":
            raise ConfigError(
                f"budget_scope='model' balances measured damages across layers; use it with allocation='measured', "
                f"not {self.allocation!r}."
            )
        if self.damage_metric not in DAMAGE_METRICS:
            raise ConfigError(f"damage_metric={self.damage_metric!r} is unknown; use one of {DAMAGE_METRICS}.")
        if self.width_per_projection is not None and not isinstance(self.width_per_projection, bool):
            raise ConfigError(f"width_per_projection={self.width_per_projection!r} must be True, False or None.")
        if self.width_per_projection and (self.bits_budget is None or self.allocation != "measured"):
            raise ConfigError(
                "width_per_projection=True splits the measured allocation's widths between gate/up and down; use it "
                f"with a bits_budget and allocation='measured' (got bits_budget={self.bits_budget}, "
                f"allocation={self.allocation!r})."
            )
        if self.allocation_weight == "fragility" and (self.method != "vsraq" or self.lambda_expert <= 0):
            raise ConfigError(
                "allocation_weight='fragility' reads the next router's fragility that method='vsraq' computes "
                "(lambda_expert > 0); use allocation_weight='mass' with other methods."
            )
        if not isinstance(self.allocation_seed, int) or isinstance(self.allocation_seed, bool):
            raise ConfigError(f"allocation_seed={self.allocation_seed!r} must be an int.")
        if not isinstance(self.device, str) or not _valid_device(self.device):
            raise ConfigError(f"device={self.device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
        if self.offload not in OFFLOAD_MODES:
            raise ConfigError(f"offload={self.offload!r} is unknown; use one of {OFFLOAD_MODES}.")
        if not isinstance(self.expert_chunk, int) or isinstance(self.expert_chunk, bool) or self.expert_chunk < 0:
            raise ConfigError(
                f"expert_chunk={self.expert_chunk!r} must be an int >= 0: experts solved together, 0 for automatic "
                "(8 GiB of Hessians on a GPU, 1 GiB on the CPU)."
            )
        if not isinstance(self.dynamic, dict):
            raise ConfigError("dynamic must be a dict of {module-regex: {setting: value}}.")
        for pattern, override in self.dynamic.items():
            if not isinstance(pattern, str) or not isinstance(override, dict):
                raise ConfigError(f"dynamic[{pattern!r}] must map a module regex to a dict such as {{'bits': 8}}.")
            try:
                re.compile(pattern[2:] if pattern.startswith(("-:", "+:")) else pattern)
            except re.error as exc:
                raise ConfigError(f"dynamic: {pattern!r} is not a valid regular expression ({exc}).") from exc
            unknown = sorted(set(override) - set(DYNAMIC_SETTINGS))
            if unknown:
                raise ConfigError(
                    f"dynamic[{pattern!r}] sets {unknown}; a module override may set {DYNAMIC_SETTINGS} (the other "
                    "settings hold for the whole run), or use a '-:' pattern to leave modules unquantized."
                )
            if "bits" in override and (override["bits"] not in SUPPORTED_BITS or isinstance(override["bits"], bool)):
                raise ConfigError(
                    f"dynamic[{pattern!r}]['bits']={override['bits']!r} is not supported; use one of {SUPPORTED_BITS}."
                )
            g = override.get("group_size", -1)
            if not isinstance(g, int) or isinstance(g, bool) or (g != -1 and g <= 0):
                raise ConfigError(
                    f"dynamic[{pattern!r}]['group_size']={g!r} is invalid; use -1 (one group per row) or a positive "
                    "size such as 32, 64 or 128."
                )

    def check_in_features(self, in_features: int, name: str = "layer") -> None:
        """A group must tile the input dimension exactly (the GPTQ v1 format stores whole groups)."""
        if self.group_size != -1 and in_features % self.group_size != 0:
            divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
            hint = f"use group_size in {divisors} or -1" if divisors else "use group_size=-1"
            raise ConfigError(
                f"group_size={self.group_size} does not divide {name}'s input dimension {in_features}; {hint}."
            )

    def for_module(self, *names: str) -> QuantConfig | None:
        """The settings one linear is quantized with under ``dynamic`` (its names: the model's module name, then
        the checkpoint's), or None when a ``-:`` pattern leaves it unquantized."""
        override = dynamic_override(self.dynamic, *names)
        if override is False:
            return None
        if not override or all(getattr(self, k) == v for k, v in override.items()):
            return self
        return dataclasses.replace(self, **override)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown QuantConfig field(s) {unknown}; known fields are {sorted(known)}.")
        return cls(**data)

    @property
    def per_projection(self) -> bool:
        """Whether the measured allocation gives each expert's gate/up and down their own widths
        (``width_per_projection``; None: yes, wherever the measured allocation runs)."""
        if self.width_per_projection is not None:
            return self.width_per_projection
        return self.bits_budget is not None and self.allocation == "measured"

    @property
    def mse_norm(self) -> float:
        """The clipping search's norm for this run (``mse``; None: 2.4 for vsraq, 0 for the other methods)."""
        if self.mse is not None:
            return float(self.mse)
        return VSRAQ_MSE if self.method == "vsraq" else 0.0

    def replace(self, **changes: Any) -> QuantConfig:
        return dataclasses.replace(self, **changes)
