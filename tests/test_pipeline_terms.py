"""Pipeline-internal VSRAQ terms against independent references: the FP-target cross term of the experts'
down projections (DESIGN 3.5c), the gate/up output metric (3.5d) and the starved experts' all-token coverage
(3.5). Expert hidden states come from the family's own experts forward (down_proj set to the identity), the
activation derivatives from autograd of that product, the sums from explicit loops in float64.

Tolerances: the functions compute in float32, the references in float64. Each is held to a bound derived from
the sizes: a float32 dot product of length n is off by <= n u sum |terms| (u = 2^-24), propagated through SiLU
with its Lipschitz constants (|silu'| <= 1.1, |silu''| <= 0.5); exact hand values are held to a few u.
"""

import contextlib
import copy

import pytest
import torch

from tiny_models import tiny_model
from vsraq_plugin.capture import ExpertCross, expert_gate
from vsraq_plugin.capture import expert_cross as _expert_cross
from vsraq_plugin.gptq import HessianAccumulator
from vsraq_plugin.methods import gate_up_metric as _gate_up_metric
from vsraq_plugin.models import get_adapter
from vsraq_plugin.solve import COVERAGE_WEIGHT
from vsraq_plugin.solve import with_coverage as _with_coverage

U32 = 2.0**-24  # float32 unit roundoff


def _experts(seed=0):
    """A tiny Mixtral's experts (hidden = intermediate = 64: down_proj can be the identity), its adapter, and a
    perturbed copy standing for the quantized experts."""
    model = tiny_model("mixtral", seed=seed)
    experts = model.model.layers[0].mlp.experts
    quantized = copy.deepcopy(experts)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        quantized.gate_up_proj.add_(0.01 * torch.randn(quantized.gate_up_proj.shape, generator=g))
    return get_adapter(model), experts, quantized


def _pairs(T, E, d, seed, idle=7):
    """(X, tokens, eids, w): two distinct experts per token, never expert ``idle``; weights in [0.1, 1.1]."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, d, generator=g)
    scores = torch.randn(T, E, generator=g)
    scores[:, idle] = -1e9
    eids = scores.topk(2, dim=-1).indices.reshape(-1)
    tokens = torch.arange(T).repeat_interleave(2)
    w = torch.rand(2 * T, generator=g) + 0.1
    return X, tokens, eids, w


def _hidden(experts, x, e):
    """``act(gate) * up`` of expert ``e`` for tokens ``x``, float64, through the experts module's own forward
    with down_proj[e] = I and combine weight 1."""
    ex = copy.deepcopy(experts).double()  # the copy has its own config
    ex.config._experts_implementation = "eager"  # the module's own loop (grouped_mm has no float64 kernel)
    d = x.shape[1]
    with torch.no_grad():
        assert ex.down_proj.shape[1:] == (d, d)
        ex.down_proj[e] = torch.eye(d, dtype=torch.float64)
        idx = torch.full((x.shape[0], 1), e, dtype=torch.long)
        return ex(x.double(), idx, torch.ones(x.shape[0], 1, dtype=torch.float64))


def _magnitudes(experts, x, e):
    """Elementwise bounds ``|W_g| |x|`` and ``|W_u| |x|`` of the gate / up pre-activations (float64)."""
    W = experts.gate_up_proj[e].detach().double().abs()
    inter = W.shape[0] // 2
    xa = x.double().abs()
    return xa @ W[:inter].T, xa @ W[inter:].T


def test_expert_cross_equals_the_per_pair_loop():
    """``C_e = sum_p w_p h~_p h_p^T / sum_p w_p`` over the (token, expert) pairs of e: h~ from the quantized experts
    on the quantized stream, h from the FP experts on the FP stream, same token; an expert without pairs gets 0."""
    _, fp_experts, q_experts = _experts()
    E, _, d = fp_experts.gate_up_proj.shape
    X, tokens, eids, w = _pairs(40, E, d, seed=2)
    x_fp = X + 0.3 * torch.randn(X.shape, generator=torch.Generator().manual_seed(3))  # the FP stream differs
    C = _expert_cross(q_experts, fp_experts.gate_up_proj, (X, tokens, eids, w), x_fp)
    assert C.shape == (E, d, d)
    assert torch.equal(C[7], torch.zeros(d, d))  # no pair reached expert 7
    dot = (d + 2) * U32  # a length-d float32 dot product, plus the input casts
    for e in range(E - 1):
        sel = (eids == e).nonzero().flatten()
        assert sel.numel() > 0
        t = tokens[sel]
        h_q, h_fp = _hidden(q_experts, X[t], e), _hidden(fp_experts, x_fp[t], e)
        ref = torch.zeros(d, d, dtype=torch.float64)
        mag = torch.zeros(d, d, dtype=torch.float64)
        for p in range(sel.numel()):  # explicit per-pair loop
            ref += w[sel[p]].double() * torch.outer(h_q[p], h_fp[p])
        ref /= w[sel].double().sum()
        # |h| <= |g| |u| <= G U; in float32, |dh| <= (1.1 dg) U + G du + 4u G U with dg <= dot G, du <= dot U.
        Gq, Uq = _magnitudes(q_experts, X[t], e)
        Gf, Uf = _magnitudes(fp_experts, x_fp[t], e)
        hq_mag, hf_mag = Gq * Uq, Gf * Uf
        for p in range(sel.numel()):
            mag += w[sel[p]].double() * torch.outer(hq_mag[p], hf_mag[p])
        mag /= w[sel].double().sum()
        rel = 2 * (2.1 * dot + 4 * U32) + (sel.numel() + 4) * U32  # both factors, then the weighted sum
        err = (C[e].double() - ref).abs()
        assert (err <= rel * mag).all(), (e, float(err.max()), float((rel * mag).max()))


@pytest.mark.parametrize("exact", [True, False])
def test_expert_cross_with_the_hessians_in_one_call_per_batch(exact):
    """``ExpertCross.add`` with an accumulator folds a batch's down-input Hessians in one ``acc.add`` whose
    per-expert transform also adds the cross term. The Hessians must be those of one ``acc.add`` per expert (each
    expert's samples alone, the order it had before) and of the plain gptq pass (``expert_gate`` as transform),
    bit for bit; the cross sums those of the pass without an accumulator, bit for bit; over two batches."""
    _, fp_experts, q_experts = _experts()
    E, two_i, d = fp_experts.gate_up_proj.shape
    gate_up = q_experts.gate_up_proj.detach().float()
    batches = [_pairs(40, E, d, seed=s) for s in (4, 5)]
    x_fp = [X + 0.3 * torch.randn(X.shape, generator=torch.Generator().manual_seed(6)) for X, *_ in batches]
    one_call = HessianAccumulator(two_i // 2, E, exact=exact)
    cross = ExpertCross(fp_experts.gate_up_proj, x_fp, exact)
    per_expert = HessianAccumulator(two_i // 2, E, exact=exact)
    plain = HessianAccumulator(two_i // 2, E, exact=exact)
    cross_alone = ExpertCross(fp_experts.gate_up_proj, x_fp, exact)
    for b, (X, tokens, eids, w) in enumerate(batches):
        cross.add(q_experts, gate_up, X, b, tokens, eids, w, one_call)
        cross_alone.add(q_experts, gate_up, X, b, tokens, eids, w)
        plain.add(X, w, index=eids, rows=tokens, transform=lambda e, xs: expert_gate(q_experts, gate_up, e, xs))
        for e in range(E):  # the previous code's calls: one per expert with samples, in sample order
            sel = (eids == e).nonzero().flatten()
            if sel.numel():
                h = expert_gate(q_experts, gate_up, e, X[tokens[sel]])
                per_expert.add(h, w[sel].float(), index=torch.full((sel.numel(),), e))
    assert torch.equal(one_call.H, per_expert.H)
    assert torch.equal(one_call.H, plain.H)
    assert torch.equal(one_call.weight_sum, per_expert.weight_sum)
    assert torch.equal(cross.S, cross_alone.S) and torch.equal(cross.wsum, cross_alone.wsum)
    assert bool(one_call.H[7].eq(0).all()) and bool(one_call.H[0].abs().sum() > 0)  # expert 7 idle, 0 reached


def test_gate_up_metric_equals_the_per_expert_loop_with_autograd():
    """Per expert: the per-unit RMS over the expert's tokens of d h / d gate (= act'(gate) * up) and d h / d up
    (= act(gate)), by autograd of the product the experts module computes; then ``M = I + lam * N / ||N||``,
    ``N = blockdiag(diag(s_g) B diag(s_g), diag(s_u) B diag(s_u))``, ``B = W_down^T A W_down``, float64. The pair
    weights play no part (an unweighted RMS); an expert without tokens gets M = I."""
    adapter, experts, _ = _experts(seed=4)
    E, two_i, d = experts.gate_up_proj.shape
    inter = two_i // 2
    X, tokens, eids, w = _pairs(48, E, d, seed=5)
    F = torch.randn(d, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    F /= torch.linalg.matrix_norm(F, ord=2)  # normalised, as the boundary factor is
    A = F @ F.T
    lam = 64.0
    M = _gate_up_metric(adapter, experts, (X, tokens, eids, w), F, lam)
    assert M.shape == (E, two_i, two_i)
    assert torch.equal(M[7], torch.eye(two_i))  # no token: no stress, the plain metric
    torch.testing.assert_close(_gate_up_metric(adapter, experts, (X, tokens, eids, 5 * w), F, lam), M, rtol=0, atol=0)
    dot = (d + 2) * U32
    for e in range(E - 1):
        x = X[tokens[eids == e]].double()
        Wgu = experts.gate_up_proj[e].detach().double()
        pre = x @ Wgu.T
        gate = pre[:, :inter].clone().requires_grad_(True)
        up = pre[:, inter:].clone().requires_grad_(True)
        h = experts.act_fn(gate) * up
        torch.testing.assert_close(h.detach(), _hidden(experts, x, e), rtol=1e-12, atol=1e-14)  # the module's split
        d_gate, d_up = torch.autograd.grad(h.sum(), (gate, up))  # h_i depends on gate_i, up_i only: diagonals
        s_gate, s_up = d_gate.pow(2).mean(0).sqrt(), d_up.pow(2).mean(0).sqrt()
        Wd = experts.down_proj[e].detach().double()
        B = Wd.T @ A @ Wd
        N = torch.block_diag(s_gate[:, None] * B * s_gate, s_up[:, None] * B * s_up)
        N /= torch.linalg.eigvalsh(N)[-1]
        ref = torch.eye(two_i, dtype=torch.float64) + lam * N

        # float32 scales: |dg| <= dot G, |du| <= dot U; d act(g) <= 1.1 dg; d(act'(g) u) <= 0.5 dg |u| + 1.1 du,
        # plus a few roundings of each result; an RMS moves by at most the RMS of the moves.
        G, Ug = _magnitudes(experts, x, e)
        g0, u0 = pre[:, :inter].detach(), pre[:, inter:].detach()
        da_up = 1.1 * dot * G + 4 * U32 * d_up.abs()
        da_gate = 0.5 * dot * G * u0.abs() + 1.1 * dot * Ug + 8 * U32 * (1 + g0.abs()) * u0.abs()
        eps = torch.cat([da_gate.pow(2).mean(0).sqrt() / s_gate, da_up.pow(2).mean(0).sqrt() / s_up])
        # N_ij = s_i B_ij s_j / lambda_max: eps_i + eps_j from the scales, 2 max(eps) from lambda_max (the
        # unnormalised N moves by at most that factor in the PSD order); then M is rounded to float32.
        bound = lam * (eps[:, None] + eps[None, :] + 2 * eps.max() + 8 * U32) * N.abs() + U32 * ref.abs()
        err = (M[e].double() - ref).abs()
        assert (err <= bound).all(), (e, float(err.max()), float(bound.flatten()[err.argmax()]))
        assert torch.equal(M[e, :inter, inter:], torch.zeros(inter, inter))  # no gate/up cross terms


def test_with_coverage_blends_starved_experts_by_hand():
    """``H_e = (n_e H_e + c n_all H_all) / (n_e + c n_all)`` with ``c = COVERAGE_WEIGHT`` for the starved experts
    only (``n_e`` the expert's weight sum: its token count for unit weights), on Hessians computed by hand."""
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [1.0, 2.0]])
    index = torch.tensor([0, 0, 2, 2, 2, 2, 2])  # expert 0: 2 tokens, expert 1: none, expert 2: 5
    acc = HessianAccumulator(2, num_matrices=3)
    acc.add(x, index=index)
    all_tokens = HessianAccumulator(2)
    all_tokens.add(x)
    H0 = torch.tensor([[1.0, 0.0], [0.0, 4.0]]) / 2  # (1,0)(1,0)^T + (0,2)(0,2)^T, over 2
    H2 = torch.tensor([[15.0, 6.0], [6.0, 7.0]]) / 5
    H_all = torch.tensor([[16.0, 6.0], [6.0, 11.0]]) / 7
    exact = {"rtol": 4 * U32, "atol": 0.0}  # a handful of float32 operations on small exact values
    torch.testing.assert_close(acc.H[0], H0, **exact)
    torch.testing.assert_close(acc.H[1], torch.zeros(2, 2), rtol=0, atol=0)
    torch.testing.assert_close(acc.H[2], H2, **exact)
    torch.testing.assert_close(all_tokens.H[0], H_all, **exact)
    before = acc.H.clone()
    c = COVERAGE_WEIGHT
    assert 0 < c < 1  # a small weight per all-token sample, relative to a routed token

    # The gate/up stage: one all-token Hessian shared by every starved expert.
    fallbacks = []
    H = _with_coverage(acc, all_tokens.H, 7, [0, 1], "layer.experts.gate_up_proj", fallbacks)
    torch.testing.assert_close(H[0], (2 * H0 + c * 7 * H_all) / (2 + c * 7), **exact)
    torch.testing.assert_close(H[1], H_all, **exact)  # no routed token: the coverage alone
    assert torch.equal(H[2], acc.H[2])  # not starved: untouched
    assert torch.equal(acc.H, before)  # the accumulator is not modified
    blended = H.clone()
    assert _with_coverage(acc, all_tokens.H, 7, [0, 1], "g", [], in_place=True) is acc.H  # ... unless asked to
    assert torch.equal(acc.H, blended)
    acc.H.copy_(before)
    assert fallbacks == [
        {
            "target": "layer.experts.gate_up_proj",
            "index": e,
            "action": "all-token coverage",
            "reason": f"{n} routed tokens < min_expert_tokens",
        }
        for e, n in ((0, 2), (1, 0))
    ]

    # The down stage: one coverage Hessian per starved expert (its own hidden states), in the starved order.
    own = torch.stack([torch.tensor([[2.0, 1.0], [1.0, 3.0]]), torch.tensor([[5.0, 0.0], [0.0, 1.0]])])
    H = _with_coverage(acc, own, 7, [1, 0], "d", [])
    torch.testing.assert_close(H[1], own[0], **exact)
    torch.testing.assert_close(H[0], (2 * H0 + c * 7 * own[1]) / (2 + c * 7), **exact)
    assert torch.equal(H[2], acc.H[2])

    # Weighted tokens (agq, VSRAQ): n_e is the expert's weight sum, not its token count.
    weighted = HessianAccumulator(2, num_matrices=3)
    weighted.add(x, torch.tensor([0.5, 0.25, 1.0, 1.0, 1.0, 1.0, 1.0]), index=index)
    Hw0 = (0.5 * torch.tensor([[1.0, 0.0], [0.0, 0.0]]) + 0.25 * torch.tensor([[0.0, 0.0], [0.0, 4.0]])) / 0.75
    H = _with_coverage(weighted, all_tokens.H, 7, [0], "w", [])
    torch.testing.assert_close(H[0], (0.75 * Hw0 + c * 7 * H_all) / (0.75 + c * 7), **exact)


@pytest.mark.parametrize(
    "family, layer_index, block, linear",
    [
        ("qwen3_moe", 1, "attention", "self_attn.q_proj"),  # through softmax attention to o_proj
        ("deepseek_v3", 0, "mlp", "mlp.gate_proj"),  # the dense MLP, through its activation to down_proj
        ("qwen2_moe", 1, "mlp", "mlp.shared_expert.up_proj"),  # a shared expert inside a MoE layer
    ],
)
def test_probe_matrices_equal_the_jacobian_by_hand(family, layer_index, block, linear):
    """``probe_matrices`` against the full Jacobian of the writer's output with respect to the linear's output,
    ``B = sum_{s,t} J_st^T A J_st`` by hand (``torch.autograd.functional.jacobian``), for linears whose output at a
    token reaches only that token: the probes are then exact (signs square to one) when ``A``'s rank is at most the
    number of directions. Tolerance: float32 forward and backward passes against the same, on a matrix normalised
    to top eigenvalue 1."""
    from vsraq_plugin.capture import LayerRunner, StopForward
    from vsraq_plugin.methods import probe_directions, probe_matrices

    fp = tiny_model(family, seed=3)
    adapter = get_adapter(fp)
    windows = torch.randint(0, fp.config.vocab_size, (4, 6), generator=torch.Generator().manual_seed(1))
    runner = LayerRunner(fp, adapter, windows, 2)
    layers = adapter.layers(fp)
    with torch.no_grad():
        hidden = runner.inputs
        for lay in layers[:layer_index]:
            hidden = runner.run(lay.layer, hidden)
    layer = layers[layer_index]
    linears = adapter.attention_linears(layer) if block == "attention" else adapter.dense_mlp_linears(layer)
    writer = linears[next(n for n in linears if n.endswith(("o_proj", "down_proj")))]
    lin = linears[linear]
    d = fp.config.hidden_size
    G = torch.randn(d, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    A = G @ G.T  # rank 3 <= the 4 directions probed

    def writer_output(h, kw, replace=None):
        seen = {}

        def swap(_m, _a, out):
            seen["z"] = out
            return out if replace is None else replace

        def stop(_m, _a, out):
            seen["y"] = out
            raise StopForward

        hooks = [lin.register_forward_hook(swap), writer.register_forward_hook(stop)]
        try:
            with torch.enable_grad(), contextlib.suppress(StopForward):
                layer.layer(h, **kw)
        finally:
            for hk in hooks:
                hk.remove()
        return seen

    ref = torch.zeros(lin.out_features, lin.out_features, dtype=torch.float64)
    for h, kw in zip(hidden, runner.kwargs, strict=True):
        z0 = writer_output(h, kw)["z"].detach()
        J = torch.autograd.functional.jacobian(lambda z, h=h, kw=kw: writer_output(h, kw, z)["y"], z0)
        T = z0.shape[:-1].numel()
        J = J.reshape(T, d, T, lin.out_features).double()
        ref += torch.einsum("sdtn,de,setm->nm", J, A, J)
    ref /= torch.linalg.eigvalsh(ref)[-1]
    args = (runner, layer.layer, hidden, {linear: lin}, writer, probe_directions(G, 4))  # A's factor
    # an MLP is probed alone on its captured input (the pipeline's shortcut), the reference ran the whole layer
    mlp = None if block == "attention" else (layer.mlp, layer.shared_experts if layer.is_moe else layer.mlp)
    got = probe_matrices(*args, batches=len(hidden), alone=mlp)
    assert torch.allclose(got[linear], ref, atol=1e-4), (got[linear] - ref).abs().max()
    # Cut into diagonal blocks (real widths, probe_blocks): the same blocks, normalised together.
    blocks = probe_matrices(*args, batches=len(hidden), blocks={linear: 2}, alone=mlp)[linear]
    m = lin.out_features // 2
    ref_blocks = torch.stack([ref[:m, :m], ref[m:, m:]])
    ref_blocks /= torch.linalg.eigvalsh(ref_blocks)[:, -1].max()
    assert blocks.shape == (2, m, m) and torch.allclose(blocks, ref_blocks, atol=1e-4)


def test_probe_blocks_follow_the_heads_at_real_widths():
    """Whole up to the fast solve's rank limit; beyond, one block per head (kv heads for k_proj), or contiguous blocks
    within the limit for an MLP (DeepSeek-V3's dense gate/up)."""
    from types import SimpleNamespace

    from vsraq_plugin.methods import METRIC_RANK, probe_blocks

    qwen3_30b = SimpleNamespace(num_attention_heads=32, num_key_value_heads=4)
    deepseek_v3 = SimpleNamespace(num_attention_heads=128, num_key_value_heads=128)
    assert probe_blocks(qwen3_30b, "self_attn.q_proj", 128) == 1  # the fixtures: whole
    assert probe_blocks(qwen3_30b, "self_attn.q_proj", 4096) == 32
    assert probe_blocks(qwen3_30b, "self_attn.k_proj", 512) == 4
    assert probe_blocks(deepseek_v3, "self_attn.q_b_proj", 24576) == 128
    assert probe_blocks(deepseek_v3, "self_attn.kv_b_proj", 32768) == 128
    assert probe_blocks(deepseek_v3, "self_attn.q_a_proj", 1536) == 6  # a latent: no heads
    assert probe_blocks(deepseek_v3, "mlp.gate_proj", 18432) == 72
    for n in (257, 1000, 18431):
        nb = probe_blocks(deepseek_v3, "mlp.up_proj", n)
        assert n % nb == 0 and n // nb <= METRIC_RANK


def test_probes_run_on_the_first_batches_that_hold_probe_tokens():
    from vsraq_plugin.methods import _batches_for

    assert _batches_for([2048] * 16, 4096) == 2  # the fixtures: 8 windows of 256 tokens a batch
    assert _batches_for([2048] * 16, 4097) == 3
    assert _batches_for([8192] * 4, 4096) == 1  # long real windows: one batch already holds them
    assert _batches_for([128] * 3, 4096) == 3  # fewer tokens than asked: every batch


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_expert_stash_forward_equals_the_family_forward(family):
    """While attached, ``ExpertStash`` is the experts module's forward: its output against the family's own eager
    loop, and each stashed row (token t, slot j) against ``act(gate) * up`` of expert ``idx[t, j]`` in float64.
    Tolerances: float32 products of length d and I (<= 96) summed over top-k experts, against the same in another
    order: a few hundred u of the magnitudes involved."""
    from vsraq_plugin.capture import ExpertStash, stashable

    model = tiny_model(family, seed=3)
    adapter = get_adapter(model)
    experts = adapter.moe_layers(model)[0].experts
    experts.config._experts_implementation = "eager"
    assert stashable(experts)
    E, two_i, d = experts.gate_up_proj.shape
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, d, generator=g)
    idx = torch.randn(30, E, generator=g).topk(2, dim=-1).indices
    w = torch.rand(30, 2, generator=g)
    with torch.no_grad():
        ref = experts(x, idx, w)
        stash = ExpertStash()
        with stash.attach(experts):
            out = experts(x, idx, w)
        assert "forward" not in vars(experts)  # detached again: the class's forward
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        (kept,) = stash.batches
        gu = experts.gate_up_proj.double()
        for t in range(30):
            for j in range(2):
                g_, u = (x[t].double() @ gu[idx[t, j]].T).chunk(2)
                want = experts.act_fn(g_) * u
                torch.testing.assert_close(kept.h[t * 2 + j].double(), want, rtol=1e-5, atol=1e-6)
    assert stash.bytes == 30 * 2 * (two_i // 2) * 4
    own = experts.forward  # an instance forward another library set (e.g. a kernel hub) comes back afterwards
    experts.forward = own
    with ExpertStash().attach(experts):
        assert experts.forward is not own
    assert vars(experts)["forward"] is own
    del experts.forward
    full = ExpertStash(limit=stash.bytes - 1)  # past the limit: computed, nothing kept
    with torch.no_grad(), full.attach(experts):
        torch.testing.assert_close(experts(x, idx, w), ref, rtol=1e-5, atol=1e-6)
    assert full.batches == [None] and full.bytes == 0


def test_a_completed_stash_gives_the_cross_gram_without_the_fp_weights():
    """The FP forward stashes the FP choices of two batches, ``complete`` adds near-miss pairs from the FP weights;
    then the weights change (as the gate/up solve writes them) and the cross-Gram built from the stash alone, with
    no FP copy, equals the one built from an FP copy (the products are the same float32 ones, up to the order of
    rows inside a matrix product: a few u of the magnitudes). A stash past its limit is not completed."""
    from vsraq_plugin.capture import ExpertStash

    _, fp_experts, q_experts = _experts(seed=1)
    E, two_i, d = fp_experts.gate_up_proj.shape
    experts = copy.deepcopy(fp_experts)
    experts.config._experts_implementation = "eager"
    g = torch.Generator().manual_seed(7)
    x_fp = [torch.randn(20, d, generator=g) for _ in range(2)]
    routing = [torch.randn(20, E, generator=g) for _ in range(2)]
    stash = ExpertStash()
    with torch.no_grad(), stash.attach(experts):
        for x, s in zip(x_fp, routing, strict=True):
            experts(x, s.topk(2, dim=-1).indices, torch.ones(20, 2))
    # VSRAQ's pairs: the FP choices of both batches (tokens numbered across them), then near misses (third choice)
    choices = torch.cat([s.topk(3, dim=-1).indices for s in routing])
    tokens = torch.cat([torch.arange(40).repeat_interleave(2), torch.arange(0, 40, 3)])
    eids = torch.cat([choices[:, :2].reshape(-1), choices[::3, 2]])
    w = torch.rand(tokens.numel(), generator=g) + 0.1
    fp_copy = experts.gate_up_proj.detach().clone()
    per_batch = [(tokens[(tokens >= t0) & (tokens < t0 + 20)] - t0, eids[(tokens >= t0) & (tokens < t0 + 20)])
                 for t0 in (0, 20)]  # fmt: skip
    assert stash.complete(experts, x_fp, per_batch) and stash.whole
    assert stash.bytes == (80 + 14) * (two_i // 2) * 4
    with torch.no_grad():
        experts.gate_up_proj.copy_(q_experts.gate_up_proj)  # "quantized" in place: the FP weights are gone
    gate_up = experts.gate_up_proj.detach().float()
    x_q = [x + 0.1 * torch.randn(x.shape, generator=g) for x in x_fp]
    crosses = [ExpertCross(fp_copy, x_fp, True), ExpertCross(None, x_fp, True, stash, 0, (E, two_i // 2))]
    for cross in crosses:
        for b in range(2):
            sel = ((tokens >= 20 * b) & (tokens < 20 * b + 20)).nonzero().flatten()
            cross.add(experts, gate_up, x_q[b], b, tokens[sel] - 20 * b, eids[sel], w[sel])
    ref, got = crosses[0].matrix(), crosses[1].matrix()
    assert ref.abs().sum() > 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="whole stash"):
        ExpertCross(None, x_fp, True, ExpertStash(), 0, (E, two_i // 2))
    small = ExpertStash(limit=0)
    with torch.no_grad(), small.attach(experts):
        experts(x_fp[0], routing[0].topk(2, dim=-1).indices, torch.ones(20, 2))
    assert not small.complete(experts, x_fp[:1], per_batch[:1]) and not small.whole


def test_the_pipeline_takes_the_fp_inputs_from_the_stash(monkeypatch):
    """A VSRAQ run builds the down projections' cross-Gram from the FP forward's stash, completed with the near
    misses, and copies no FP gate/up; with the stash off (limit 0) it copies them as before. With the family's eager
    loop (the stash's own order of operations) both runs compute the same float32 products: the same cross-Grams and
    the same quantized model, bit for bit."""
    import vsraq_plugin.capture as capture
    import vsraq_plugin.pipeline as pipeline
    from vsraq_plugin.config import QuantConfig

    copies, seen = [], []
    host_copy, matrix = pipeline._host_copy, capture.ExpertCross.matrix
    monkeypatch.setattr(pipeline, "_host_copy", lambda t: copies.append(t.shape) or host_copy(t))
    monkeypatch.setattr(capture.ExpertCross, "matrix", lambda self, *a: seen.append(matrix(self, *a)) or seen[-1])
    added, complete = [], capture.ExpertStash.complete

    def counting(self, *args):
        before = self.bytes
        ok = complete(self, *args)
        added.append(self.bytes - before)
        return ok

    monkeypatch.setattr(capture.ExpertStash, "complete", counting)
    fp = tiny_model("qwen3_moe", seed=2)
    fp.set_experts_implementation("eager")
    windows = torch.randint(0, fp.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=3, group_size=16, method="vsraq", near_miss_weight=0.5, margin_band=4.0)
    runs = []
    for limit in (capture.STASH_BYTES, 0):
        monkeypatch.setattr(capture, "STASH_BYTES", limit)
        copies.clear(), seen.clear()
        model = copy.deepcopy(fp)
        pipeline.quantize_model(model, windows, cfg, batch_size=2, progress=False)
        runs.append((list(copies), list(seen), model.state_dict()))
    (copies_on, seen_on, on), (copies_off, seen_off, off) = runs
    assert copies_on == [] and len(copies_off) == 2  # one FP gate/up copy per MoE layer without the stash
    assert len(added) == 4 and min(added[:2]) > 0 and added[2:] == [0, 0]  # near misses added; none past the limit
    assert len(seen_on) == len(seen_off) == 2 and all(map(torch.equal, seen_on, seen_off))
    for name in on:
        assert torch.equal(on[name], off[name]), name
