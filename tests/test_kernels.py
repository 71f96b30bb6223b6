"""Triton kernels against dequantize-then-matmul in float64 (CPU: TRITON_INTERPRET=1, small shapes).

Tolerance: the kernels round the dequantized weight and the activations' products to fp16/bf16 (unit
roundoff u = 2^-11 / 2^-8) and accumulate in fp32, so |y - y_ref| <= c * u * (|x| @ |W|^T) elementwise plus
the final rounding of y; c = 4 leaves room for the fp32 sum and the intermediate rounding of the MoE path.
Mixed widths change only how codes are unpacked (integer shifts and masks, exact), so the same bound holds;
a wrong row, shift or mask gives errors of the size of the weights themselves, far above it.
"""

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from vsraq_plugin.kernels import moe_gemm
from vsraq_plugin.kernels.gptq_gemm import dequant_gemm
from vsraq_plugin.kernels.layout import container_bits, to_kernel_layout
from vsraq_plugin.kernels.moe_gemm import align_slots, fused_moe, stack_experts
from vsraq_plugin.packing import dequantize_packed, pack_linear
from vsraq_plugin.quantizer import rtn

U = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

# On a GPU (benchmarks/gpu_check.sh) the kernels are compiled for it, not interpreted: the tests build their
# tensors on the CPU as here, and every kernel call moves its inputs to the GPU and its result back.
DEV = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")


def _to(obj, dev: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to(getattr(obj, f.name), dev) for f in dataclasses.fields(obj)
                                           if f.init})  # fmt: skip
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, dev) for o in obj)
    return obj


def _on_device(fn):
    if DEV.type == "cpu":
        return fn
    return lambda *a, **k: _to(fn(*_to(a, DEV), **_to(k, DEV)), torch.device("cpu"))


dequant_gemm, fused_moe = _on_device(dequant_gemm), _on_device(fused_moe)


def _layer(out_f, in_f, bits, gs, sym, act_order=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = rtn(torch.randn(out_f, in_f, generator=g), bits, gs, sym)
    g_idx = q.g_idx
    if act_order:  # a g_idx in scrambled column order, as act-order checkpoints have
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    p = pack_linear(q.codes, q.scales, q.zeros, g_idx, bits)
    W = dequantize_packed(p.qweight, p.qzeros, p.scales, p.g_idx, bits, in_f, out_f, torch.float64)
    return to_kernel_layout(p.qweight, p.qzeros, p.scales, p.g_idx, bits, in_f, out_f), W


def _check(y, ref, bound, dtype):
    err = (y.double() - ref).abs()
    tol = 4 * U[dtype] * bound + U[dtype] * ref.abs() + 1e-6
    assert (err <= tol).all(), f"max err {err.max():.3g} vs tol {tol[err.argmax() // tol.shape[-1]].max():.3g}"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("gs", "sym"), [(32, False), (-1, True)])
@pytest.mark.parametrize("M", [1, 17])
def test_dense_every_width(bits, gs, sym, M):
    kw, W = _layer(40, 96, bits, gs, sym, seed=bits)  # N=40, K=96: neither a multiple of the tiles
    x = torch.randn(M, 96, generator=torch.Generator().manual_seed(M)).half()
    y = dequant_gemm(x, kw)
    assert y.shape == (M, 40) and y.dtype == torch.float16
    _check(y, x.double() @ W.T, x.double().abs() @ W.abs().T, torch.float16)


@pytest.mark.parametrize("gs", [64, 128])
def test_dense_group_sizes_act_order_and_bf16(gs):
    kw, W = _layer(33, 256, 4, gs, False, act_order=True, seed=gs)
    x = torch.randn(5, 256).bfloat16()
    y = dequant_gemm(x, kw)
    _check(y, x.double() @ W.T, x.double().abs() @ W.abs().T, torch.bfloat16)


def test_dense_prefill_tiles():
    kw, W = _layer(70, 64, 4, 32, True, seed=3)
    x = torch.randn(130, 64).half()
    _check(dequant_gemm(x, kw), x.double() @ W.T, x.double().abs() @ W.abs().T, torch.float16)


def test_act_order_is_repacked_at_load():
    kw, _ = _layer(8, 64, 4, 16, False, act_order=True, seed=5)
    assert kw.perm is not None and kw.group_size == 16
    assert torch.equal(kw.g_idx.long(), torch.arange(64) // 16)  # groups contiguous after the repack
    plain, _ = _layer(8, 64, 4, 16, False, seed=5)
    assert plain.perm is None


def test_align_slots_by_hand():
    ids = torch.tensor([[2, 0], [0, 2], [2, 1]])  # slots: 0->2 1->0 2->0 3->2 4->2 5->1; expert 3 empty
    slots, blocks = align_slots(ids, 4, 2)
    assert slots.tolist() == [1, 2, 5, 6, 0, 3, 4, 6]
    assert blocks.tolist() == [0, 1, 2, 2]


def _moe_reference(x, ids, w, gate_up, down):
    """Float64 ``sum_j w_tj * down_e(silu(gate_e x) * up_e x)`` from dequantized weights, and the error
    bound's magnitude ``|w| (|silu(g)| |u| + |h|) @ |W_down|^T`` (the same sum over absolute values)."""
    T, top_k = ids.shape
    ref = torch.zeros(T, down[0].shape[0], dtype=torch.float64)
    bound = torch.zeros_like(ref)
    for t in range(T):
        for j in range(top_k):
            e = int(ids[t, j])
            gg, uu = (x[t].double() @ gate_up[e].T).chunk(2)
            h = F.silu(gg) * uu
            ref[t] += w[t, j].double() * (h @ down[e].T)
            hb = (x[t].double().abs() @ gate_up[e].abs().T).chunk(2)
            bound[t] += w[t, j].double() * ((hb[0].abs() * hb[1] + h.abs()) @ down[e].abs().T)
    return ref, bound


@pytest.mark.parametrize(
    ("top_k", "act_order", "fuse"), [(1, False, True), (2, True, True), (2, True, False), (4, False, True)]
)
def test_fused_moe_against_per_expert_reference(top_k, act_order, fuse):
    E, d, inter, T = 5, 64, 32, 9
    gate_up = [_layer(2 * inter, d, 4, 32, False, act_order=act_order, seed=10 + e) for e in range(E)]
    down = [_layer(d, inter, 4, 32, False, act_order=act_order, seed=20 + e) for e in range(E)]
    g = torch.Generator().manual_seed(top_k)
    scores = torch.randn(T, E, generator=g)
    scores[:, 4] = -1e9  # expert 4 never chosen: an empty expert
    ids = scores.topk(top_k, dim=-1).indices
    w = torch.softmax(torch.randn(T, top_k, generator=g), -1)
    x = torch.randn(T, d, generator=g).half()
    y = fused_moe(x, stack_experts([k for k, _ in gate_up]), stack_experts([k for k, _ in down]), ids, w, fuse_act=fuse)
    ref, bound = _moe_reference(x, ids, w, [W for _, W in gate_up], [W for _, W in down])
    _check(y, ref, bound, torch.float16)


class _CountLaunches:
    """Stands in for ``_moe_kernel``: counts launches (``kernel[grid](...)``) and records each one's ``BITS``."""

    def __init__(self, kernel):
        self.kernel, self.bits = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.bits.append(kwargs["BITS"])
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize(
    ("widths", "act_order", "route", "dtype"),
    [
        ([2, 3, 4, 4], False, "all", torch.float16),
        ([2, 3, 4, 4], True, "subset", torch.float16),
        ([3, 4], True, "all", torch.float16),  # one container width (3-bit is held in 4): no table needed
        ([2, 8], False, "all", torch.bfloat16),
        ([2, 8], True, "subset", torch.float16),
    ],
    ids=["2-3-4-4", "2-3-4-4-act-order-subset", "3-4-act-order", "2-8-bf16", "2-8-act-order-subset"],
)
def test_fused_moe_mixed_widths_in_one_launch_pair(widths, act_order, route, dtype, monkeypatch):
    """Experts of different widths in one stacked layer: two launches in all, against the float64 reference.
    Every width appears twice; the last expert gets no token; "subset" routes no token to the narrowest width."""
    bits = widths * 2
    E, d, inter, T, top_k = len(bits), 64, 32, 9, 2
    gate_up = [_layer(2 * inter, d, b, 32, False, act_order=act_order, seed=30 + e) for e, b in enumerate(bits)]
    down = [_layer(d, inter, b, 32, False, act_order=act_order, seed=50 + e) for e, b in enumerate(bits)]
    gu_s, dn_s = stack_experts([k for k, _ in gate_up]), stack_experts([k for k, _ in down])
    assert (gu_s.expert_bits is None) == (len({container_bits(b) for b in widths}) == 1)
    g = torch.Generator().manual_seed(len(widths))
    scores = torch.randn(T, E, generator=g)
    scores[:, -1] = -1e9  # an expert with zero tokens
    if route == "subset":
        scores[:, [e for e, b in enumerate(bits) if b == min(widths)]] = -1e9
    ids = scores.topk(top_k, dim=-1).indices
    w = torch.softmax(torch.randn(T, top_k, generator=g), -1)
    x = torch.randn(T, d, generator=g).to(dtype)
    counter = _CountLaunches(moe_gemm._moe_kernel)
    monkeypatch.setattr(moe_gemm, "_moe_kernel", counter)
    y = fused_moe(x, gu_s, dn_s, ids, w)
    table = gu_s.expert_bits is not None
    assert counter.bits == ([0, 0] if table else [gu_s.bits] * 2)  # BITS=0: the width comes from the table
    ref, bound = _moe_reference(x, ids, w, [W for _, W in gate_up], [W for _, W in down])
    _check(y, ref, bound, dtype)


def test_width_table_matches_the_constant_width_kernel_bit_for_bit():
    """The table path's runtime unpack (shifts by log2 of the width) is the constexpr path's arithmetic."""
    E, d, inter, T = 3, 64, 32, 6
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, d, generator=g).half()
    ids = torch.randn(T, E, generator=g).topk(2, dim=-1).indices
    w = torch.softmax(torch.randn(T, 2, generator=g), -1)
    for bits in (2, 4, 8):
        gu = stack_experts([_layer(2 * inter, d, bits, 32, False, seed=e)[0] for e in range(E)])
        dn = stack_experts([_layer(d, inter, bits, 32, False, seed=9 + e)[0] for e in range(E)])
        table = torch.full((E,), bits, dtype=torch.int32)
        gu_t, dn_t = dataclasses.replace(gu, expert_bits=table), dataclasses.replace(dn, expert_bits=table)
        assert torch.equal(fused_moe(x, gu, dn, ids, w), fused_moe(x, gu_t, dn_t, ids, w))


@pytest.mark.parametrize(
    ("widths", "down_widths"),
    [([2, 3, 4, 8], None), ([4], None), ([2, 3, 4, 8], [4]), ([4], [8, 2, 3])],
    ids=["mixed-2-3-4-8", "uniform-4", "per-projection-mixed-gate-up", "per-projection-mixed-down"],
)
def test_quant_experts_layer_makes_two_launches(widths, down_widths, monkeypatch):
    """A ``QuantExperts`` layer on the Triton path: exactly two kernel launches (gate/up, down) whether its
    experts share one width or not, also when down's widths differ from gate/up's (one width table per stack), and
    the output of the float64 reference of the experts dequantized from the tensors loaded into it."""
    from tiny_models import tiny_model
    from vsraq_plugin.nn import QuantExperts

    experts_fp = tiny_model("mixtral", seed=1).model.layers[0].mlp.experts  # 8 experts, d = inter = 64
    E = experts_fp.gate_up_proj.shape[0]
    bits = [widths[e % len(widths)] for e in range(E)]
    downs = bits if down_widths is None else [down_widths[e % len(down_widths)] for e in range(E)]
    width = lambda ws: ws if len(set(ws)) > 1 else ws[0]  # noqa: E731
    layer = QuantExperts(experts_fp, width(bits), 32, None if down_widths is None else width(downs))
    ref_w = {"gate_proj": [], "up_proj": [], "down_proj": []}
    for e in range(E):
        for i, proj in enumerate(("gate_proj", "up_proj", "down_proj")):
            b = downs[e] if proj == "down_proj" else bits[e]
            q = rtn(torch.randn(64, 64, generator=torch.Generator().manual_seed(100 * e + i)), b, 32, False)
            packed = pack_linear(q.codes, q.scales, q.zeros, q.g_idx, b).state_dict()
            layer.load_expert(proj, e, *packed.values())
            ref_w[proj].append(dequantize_packed(*packed.values(), b, 64, 64, torch.float64))
    layer.use_triton = True
    T, top_k = 7, 2
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(T, E, generator=g)
    scores[:, 5] = -1e9  # an expert with zero tokens
    ids = scores.topk(top_k, dim=-1).indices
    w = torch.softmax(torch.randn(T, top_k, generator=g), -1).half()
    x = torch.randn(T, 64, generator=g).half()
    counter = _CountLaunches(moe_gemm._moe_kernel)
    monkeypatch.setattr(moe_gemm, "_moe_kernel", counter)
    with torch.no_grad():
        y = _on_device(layer.to(DEV))(x, ids, w)
    layer.cpu()
    # Two launches; BITS=0 (a width table) exactly for the stacks whose experts' container widths differ.
    assert counter.bits == [
        0 if len({container_bits(b) for b in ws}) > 1 else container_bits(ws[0]) for ws in (bits, downs)
    ]
    gate_up = torch.cat([torch.stack(ref_w["gate_proj"]), torch.stack(ref_w["up_proj"])], 1)
    ref, bound = _moe_reference(x, ids, w, gate_up, torch.stack(ref_w["down_proj"]))
    _check(y, ref, bound, torch.float16)


def test_modules_give_the_same_logits_on_the_triton_and_torch_paths(tmp_path):
    """A loaded checkpoint in fp16: QuantLinear/QuantExperts through the kernels vs the torch path."""
    from tiny_models import tiny_model
    from vsraq_plugin.checkpoint import load_checkpoint, save_checkpoint
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.nn import QuantExperts, QuantLinear
    from vsraq_plugin.pipeline import quantize_model

    model = tiny_model("qwen3_moe", seed=2)
    res = quantize_model(model, None, QuantConfig(bits=4, group_size=16, method="rtn"), progress=False)
    loaded = load_checkpoint(save_checkpoint(model, res, tmp_path / "q")).half().to(DEV)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0)).to(DEV)
    modules = [m for m in loaded.modules() if isinstance(m, (QuantLinear, QuantExperts))]
    assert {type(m) for m in modules} == {QuantLinear, QuantExperts}
    outs = {}
    for flag in (False, True):
        for m in modules:
            m.use_triton = flag
        with torch.no_grad():
            outs[flag] = loaded(input_ids=ids).logits.float().cpu()
    with torch.no_grad():
        ref = model(input_ids=ids.cpu()).logits  # fp32 model holding the same dequantized weights
    scale = ref.abs().max()
    # Both fp16 paths sit within fp16 noise (~8 unit roundoffs over the layers) of the fp32 result and each other.
    assert (outs[True] - ref).abs().max() < 4e-3 * scale
    assert (outs[False] - ref).abs().max() < 4e-3 * scale
    assert (outs[True] - outs[False]).abs().max() < 4e-3 * scale


def test_mixed_width_experts_on_the_triton_path(tmp_path):
    """Experts of different widths in one layer (one launch pair for all widths): same logits as the torch path."""
    from tiny_models import tiny_model
    from vsraq_plugin.checkpoint import load_checkpoint, save_checkpoint
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.nn import QuantExperts
    from vsraq_plugin.pipeline import quantize_model

    model = tiny_model("mixtral", seed=4)
    windows = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig(
        bits=4, group_size=16, method="gptq", bits_budget=3.0, bit_levels=[2, 3, 4], allocation="router-norm"
    )  # the rule uses all three widths in every layer
    res = quantize_model(model, windows, cfg, batch_size=2, progress=False)
    loaded = load_checkpoint(save_checkpoint(model, res, tmp_path / "q")).half().to(DEV)
    experts = [m for m in loaded.modules() if isinstance(m, QuantExperts)]
    assert len(experts) == 2 and all(len(set(m.expert_bits)) == 3 for m in experts)  # both layers, mixed
    outs = {}
    for flag in (False, True):
        for m in experts:
            m.use_triton = flag
        with torch.no_grad():
            outs[flag] = loaded(input_ids=windows[:1, :10].to(DEV)).logits.float().cpu()
    scale = outs[False].abs().max()
    assert (outs[True] - outs[False]).abs().max() < 4e-3 * scale


# ---------------------------------------------------------------------------------------------- metric rounding
def _metric_column(seed, N, R, k, bits, shared):
    """A column overhanging its grid (clamped rows), per-row scales, a rank-k metric ``M = I + G G^T``: strong
    on every other matrix (joint moves overshoot, the single best move is taken), weak on the rest."""
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    G = torch.randn(N, R, k, generator=g) * (0.3 + 2 * torch.rand(N, 1, 1, generator=g))
    G[::2] *= 10
    scale = 0.5 + torch.rand(N, R, generator=g)
    zero = torch.full((N, R), float((maxq + 1) // 2))
    w = (torch.rand(N, R, generator=g) * (maxq + 1.4) - zero - 0.7) * scale
    w, scale, zero, G = (t.to(DEV) for t in (w, scale, zero, G))
    if shared:  # expanded on the device: .to() of an expanded tensor would copy it into N matrices
        G = G[:1].expand(N, R, k)
    return (w, scale, zero, G), maxq


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize(
    ("R", "k", "bits", "passes"), [(300, 6, 3, None), (200, 20, 4, 6), (130, 1, 2, None), (1100, 6, 3, None)]
)
@pytest.mark.parametrize("start", ["plane", "nearest"])
def test_fused_metric_rounding_against_the_torch_form(shared, R, k, bits, passes, start):
    """``kernels.metric_round``: one launch per column against ``metric_rounding.round_column`` in torch, same
    column, grid and metric. Row counts that are not a multiple of the kernel's row chunk, plane blocks that
    span two chunks (1100 rows: blocks of 138, chunks of 128), ranks from 1 to 20, blocked-plane and nearest
    starts, shared (expanded) and per-matrix ``G``. Under the interpreter the same codes exactly. Compiled, the
    sums run in another order, so a row on a tie may round the other way: codes equal on >= 99 % of rows and the
    objective within 1e-4. Always: never above nearest rounding's objective, and below it where the metric is
    strong (the descent ran)."""
    from vsraq_plugin.metric_rounding import default_plan, metric_objective, round_column
    from vsraq_plugin.quantizer import nearest_codes

    (w, scale, zero, G), maxq = _metric_column(7, 5, R, k, bits, shared)
    plan = default_plan(G) if start == "plane" else None
    fused = round_column(w, scale, zero, maxq, G, plan=plan, passes=passes, kernel=True)
    ref = round_column(w, scale, zero, maxq, G, plan=plan, passes=passes, kernel=False)
    assert torch.isfinite(fused).all() and (fused == fused.round()).all()
    assert ((fused >= 0) & (fused <= maxq)).all()

    def objective(codes):
        return metric_objective(w - scale * (codes - zero), G).double()

    if DEV.type == "cpu":
        assert torch.equal(fused, ref)
    assert (fused == ref).float().mean() >= 0.99
    torch.testing.assert_close(objective(fused), objective(ref), rtol=1e-4, atol=0)
    near = objective(nearest_codes(w, scale, zero, maxq))
    assert (objective(fused) <= near * (1 + 1e-6)).all()
    assert (objective(fused)[::2] < near[::2]).all()


@pytest.mark.parametrize("shared", [False, True])
def test_fused_metric_rounding_starts(shared):
    """With no descent pass (``passes=0``) the kernel's result is its start alone: the better, per matrix, of
    nearest rounding and the blocked nearest plane, as in torch; with no plan, nearest rounding itself."""
    from vsraq_plugin.metric_rounding import default_plan, round_column
    from vsraq_plugin.quantizer import nearest_codes

    (w, scale, zero, G), maxq = _metric_column(9, 6, 700, 5, 3, shared)
    plan = default_plan(G)
    fused = round_column(w, scale, zero, maxq, G, plan=plan, passes=0, kernel=True)
    ref = round_column(w, scale, zero, maxq, G, plan=plan, passes=0, kernel=False)
    assert not torch.equal(ref, nearest_codes(w, scale, zero, maxq))  # the plane was kept somewhere
    assert (fused == ref).float().mean() >= (1.0 if DEV.type == "cpu" else 0.99)


@pytest.mark.parametrize("shared", [False, True])
def test_fused_metric_rounding_inside_the_gptq_solve(shared, monkeypatch):
    """The kernel as the fast metric solve calls it (``gptq._solve_columns``: strided column views, one grid per
    group, the plan's stacked feed), for a per-matrix and a shared metric: one launch per column, the same
    quantized weights as the torch rounding on >= 99 % of codes, and the metric objective within 1e-4."""
    import vsraq_plugin.metric_rounding as mr
    from vsraq_plugin.gptq import gptq_quantize
    from vsraq_plugin.kernels import metric_round

    g = torch.Generator().manual_seed(3)
    B, rows, cols = 3, 64, 64
    W = torch.randn(B, rows, cols, generator=g)
    X = torch.randn(512, cols, generator=g)
    H = (X.T @ X / 512).expand(B, cols, cols).contiguous()
    U = torch.randn(B, rows, 5, generator=g)
    M = torch.eye(rows) + 8 * U @ U.transpose(1, 2) / rows
    W, H, M = W.to(DEV), H.to(DEV), M.to(DEV)
    if shared:  # expanded on the device, as the pipeline hands a metric shared by the experts
        M = M[:1].expand(B, rows, rows)
    kw = dict(bits=3, group_size=32, with_error=False, metric_solve="fast")
    launches = []
    real = metric_round.round_column_fused
    monkeypatch.setattr(metric_round, "round_column_fused", lambda *a: launches.append(1) or real(*a))
    monkeypatch.setattr(mr, "_kernel_by_default", lambda w: False)
    ref = gptq_quantize(W, H, row_metric=M, **kw)[0]
    assert not launches
    monkeypatch.setattr(mr, "_kernel_by_default", lambda w: True)
    fused = gptq_quantize(W, H, row_metric=M, **kw)[0]
    assert len(launches) == cols  # one launch per column
    if DEV.type == "cpu":  # the interpreter: the torch form's decisions exactly
        assert torch.equal(fused.codes, ref.codes)
    assert (fused.codes == ref.codes).float().mean() >= 0.99
    E_f, E_r = (W - fused.weight).double(), (W - ref.weight).double()
    obj = [torch.einsum("brd,bde,bsd,brs->", E, H.double(), E, M.double()) for E in (E_f, E_r)]
    torch.testing.assert_close(obj[0], obj[1], rtol=1e-4, atol=0)


_COMPILE_SM90 = """
import inspect, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vsraq_plugin.kernels.metric_round import _round_column_kernel as kernel
consts = {"PASSES": 2, "HAS_PLANE": True, "BR": 128, "KP": 16}
names = inspect.signature(kernel.fn).parameters
for plane in (True, False):
    consts["HAS_PLANE"] = plane
    sig = {n: "constexpr" if n in consts else "*fp32" if n.endswith("_ptr") else "fp32" if n in ("tau", "tiny")
           else "i32" for n in names}
    out = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    assert "cubin" in out.asm
print("compiled")
"""


def test_metric_round_kernel_compiles_for_hopper():
    """The interpreter runs any Python; the compiler is stricter (loop-carried types, scalar branches). Compile the
    rounding kernel for sm_90 with the ptxas of the triton wheel, no GPU needed, in a process without
    ``TRITON_INTERPRET``: a kernel that only runs interpreted fails here, not on a GPU loan."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
