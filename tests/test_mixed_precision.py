import pytest
import torch

from vsraq_plugin.mixed_precision import (
    ExpertScores,
    allocate_bits,
    level_counts,
    max_intra_neuron_variance,
    router_norm_change,
    sensitivity_order,
)


@pytest.mark.parametrize(
    ("E", "levels", "budget", "expected"),
    [
        (8, [2, 3], 2.5, [4, 4]),
        (8, [2, 3, 4], 3.0, [3, 2, 3]),
        (64, [2, 3, 4], 3.0, [21, 22, 21]),
        (60, [2, 3, 4], 3.0, [20, 20, 20]),
        (128, [2, 3], 2.25, [96, 32]),
    ],
)
def test_level_counts_meet_the_budget_exactly(E, levels, budget, expected):
    counts = level_counts(E, levels, budget)
    assert counts == expected
    assert sum(counts) == E and sum(n * b for n, b in zip(counts, sorted(levels), strict=True)) == budget * E


def test_unreachable_budget_names_the_nearest_ones():
    with pytest.raises(ValueError, match=r"nearest reachable budgets are 2 and 2.25"):
        level_counts(8, [2, 4], 2.2)
    with pytest.raises(ValueError, match="2 or 3 distinct widths"):
        level_counts(8, [4, 4], 4.0)


def test_ranking_follows_the_scores_on_constructed_examples():
    change = torch.tensor([3.0, 1.0, 2.0, 0.0])  # expert 3 changed least: most sensitive
    flat = ExpertScores(change, torch.ones(4), True)
    assert sensitivity_order(flat).tolist() == [3, 1, 2, 0]
    spiky = ExpertScores(change, torch.tensor([10.0, 1.0, 1.0, 1.0]), True)  # expert 0: high variance
    assert sensitivity_order(spiky, promote_factor=2.0).tolist() == [0, 3, 1, 2]
    bits = allocate_bits(sensitivity_order(spiky), [2, 3, 4], 3.0)
    assert bits.float().mean().item() == 3.0
    assert bits[0] == 4 and bits[2] == 2  # promoted expert gets the widest level, the least sensitive the least


def test_scores_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    r0, r1 = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    change, used = router_norm_change(r1, r0)
    assert used and torch.allclose(change, torch.tensor([abs(r1[e].norm() - r0[e].norm()) for e in range(4)]))
    final, used = router_norm_change(r1, None)
    assert not used and torch.allclose(final, r1.norm(dim=-1))
    with pytest.raises(ValueError, match="belongs to another model"):
        router_norm_change(r1, r0[:3])
    w = {"gate_proj": torch.randn(4, 6, 16, generator=g), "down_proj": torch.randn(4, 16, 6, generator=g)}
    brute = torch.tensor([max(float(row.var(unbiased=False)) for p in w.values() for row in p[e]) for e in range(4)])
    assert torch.allclose(max_intra_neuron_variance(w), brute)


def test_mixed_width_checkpoint_reloads_with_the_same_logits(tmp_path):
    import json

    from grid_checks import assert_model_holds_the_grid
    from tiny_models import tiny_model
    from vsraq_plugin.checkpoint import load_checkpoint, save_checkpoint
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.nn import QuantExperts
    from vsraq_plugin.pipeline import quantize_model

    model = tiny_model("mixtral", seed=11)
    windows = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    init = {i: torch.randn(8, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)}
    cfg = QuantConfig(
        bits=4, group_size=16, method="gptq", bits_budget=3.0, bit_levels=[2, 3, 4], allocation="router-norm"
    )
    res = quantize_model(model, windows, cfg, batch_size=2, progress=False, router_init=init)
    assert res.summary["expert_bits_scores"].startswith("router-norm change")
    for widths in res.summary["expert_bits"].values():
        assert sorted(widths) == [2, 2, 2, 3, 3, 4, 4, 4] and sum(widths) == 3.0 * 8  # budget met exactly
    qw = res.weights["model.layers.0.mlp.experts.down_proj"]
    assert qw.bits_per_matrix.tolist() == res.summary["expert_bits"][0]
    for e, b in enumerate(qw.bits_per_matrix.tolist()):
        # Each expert on its own grid: its codes reach that grid's top code and not beyond (a <= alone cannot fail
        # when the solver clamps to the wrong, narrower width).
        assert int(qw.codes[e].max()) == 2**b - 1, (e, b)
    assert_model_holds_the_grid(model, res)  # codes, per-expert grids, weights and the model agree bit for bit
    out = save_checkpoint(model, res, tmp_path / "q")
    dynamic = json.loads((out / "config.json").read_text())["quantization_config"]["dynamic"]
    assert len(dynamic) == 2 * 5 and all(v["bits"] in (2, 3) for v in dynamic.values())  # 5 non-4-bit experts
    loaded = load_checkpoint(out)
    experts = [m for m in loaded.modules() if isinstance(m, QuantExperts)]
    assert [m.expert_bits for m in experts] == [res.summary["expert_bits"][i] for i in range(2)]
    with torch.no_grad():
        assert torch.equal(model(input_ids=windows).logits, loaded(input_ids=windows).logits)


# ---------------------------------------------------------------------------------------------- measured allocation
@pytest.mark.parametrize("seed", range(25))
def test_knapsack_is_the_exact_optimum_of_brute_force(seed):
    import itertools

    from vsraq_plugin.mixed_precision import knapsack

    g = torch.Generator().manual_seed(seed)
    N, L = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g))
    damage = torch.rand(N, L, generator=g, dtype=torch.float64) * torch.rand(N, 1, generator=g, dtype=torch.float64)
    cost = torch.randint(0, 7, (N, L), generator=g)
    capacity = int(cost.min(1).values.sum()) + int(torch.randint(0, 12, (1,), generator=g))
    pick = knapsack(damage, cost, capacity)
    rows = torch.arange(N)
    assert int(cost[rows, pick].sum()) <= capacity  # the budget holds
    best = min(
        sum(float(damage[i, c[i]]) for i in range(N))
        for c in itertools.product(range(L), repeat=N)
        if sum(int(cost[i, c[i]]) for i in range(N)) <= capacity
    )
    assert float(damage[rows, pick].sum()) == pytest.approx(best, rel=1e-12, abs=1e-15)  # and it is the optimum


def test_measured_allocation_against_brute_force_with_unequal_sizes():
    """Widths weighted by parameter count (experts of different sizes): exact optimum, budget respected."""
    import itertools

    from vsraq_plugin.config import ConfigError
    from vsraq_plugin.mixed_precision import allocate_measured, budget_bit_params

    g = torch.Generator().manual_seed(3)
    levels, params = [2, 3, 4], [96, 64, 64, 32, 128]
    damage = (torch.rand(5, 1, generator=g) * torch.tensor([16.0, 4.0, 1.0])).double()  # damage falls with width
    for budget in (2.0, 2.4, 3.0, 3.1, 3.7, 4.0):
        cap = budget_bit_params(budget, params)
        widths = allocate_measured(damage, levels, cap, params)
        assert sum(int(b) * p for b, p in zip(widths, params, strict=True)) <= budget * sum(params) + 1e-9
        best = min(
            sum(float(damage[i, levels.index(c[i])]) for i in range(5))
            for c in itertools.product(levels, repeat=5)
            if sum(b * p for b, p in zip(c, params, strict=True)) <= cap
        )
        got = sum(float(damage[i, levels.index(int(widths[i]))]) for i in range(5))
        assert got == pytest.approx(best, rel=1e-12), budget
    assert budget_bit_params(2.5, [1] * 8) == 20  # 2.5 * 8, not 19 by a float's last bit
    with pytest.raises(ConfigError, match="below the narrowest choice"):
        allocate_measured(damage, levels, 2 * sum(params) - 1, params)


def _routed_inputs(model, experts, windows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``model`` (as it now is) routes to ``experts`` over ``windows`` in batches of two: the inputs ``(T, d)``,
    the chosen experts ``(T, k)`` and their gate weights, float64."""
    from vsraq_plugin.capture import routing_args

    seen = []
    handle = experts.register_forward_pre_hook(lambda m, a, k: seen.append(routing_args(a, k)), with_kwargs=True)
    with torch.no_grad():
        for i in range(0, windows.shape[0], 2):
            model(input_ids=windows[i : i + 2])
    handle.remove()
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x, _, _ in seen]).double()
    return X, torch.cat([i for _, i, _ in seen]), torch.cat([w for _, _, w in seen]).double()


def _expert_view(res, X, idx, gate_w, e: int):
    """Expert ``e`` of layer 0 in a quantization result: its routed tokens' inputs, the routing mass it receives, and
    its gate/up (stacked) and down as a dequantize of the stored codes, in float64."""
    from vsraq_plugin.solve import dequantize_grid

    def deq(name):
        qw = res.weights[f"model.layers.0.mlp.experts.{name}"]
        return dequantize_grid(qw.codes, qw.scales, qw.zeros, qw.g_idx)[e].double()

    rows = (idx == e).any(-1)
    return X[rows], float(gate_w[idx == e].sum()), torch.cat([deq("gate_proj"), deq("up_proj")]), deq("down_proj")


def _tiny_measured(budget: float, levels: list[int], prepare=None, **kw):
    from tiny_models import tiny_model
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.pipeline import quantize_model

    model = tiny_model("mixtral", seed=11)
    if prepare is not None:
        prepare(model)
    fp = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=4, group_size=16, method="gptq", bits_budget=budget, bit_levels=levels, **kw)
    res = quantize_model(model, windows, cfg, batch_size=2, progress=False)
    return model, fp, windows, res


def test_measured_damage_is_the_solve_loss_times_the_routing_mass():
    """One expert's recorded damage at its chosen width equals mass x (tr(E H E^T) of gate/up + of down), with E from
    a dequantize of the stored codes and H rebuilt here from the tokens the quantized model routes to it."""
    from vsraq_plugin.capture import expert_gate

    levels = [2, 3, 4]
    model, fp, windows, res = _tiny_measured(2.5, levels, width_per_projection=False)  # one width per expert
    experts = model.model.layers[0].mlp.experts
    X, idx, gate_w = _routed_inputs(model, experts, windows)  # attention quantized, router untouched (gptq)
    counts = torch.bincount(idx.flatten(), minlength=8)
    e = int(counts.argmax())  # well above min_expert_tokens: no coverage blending
    xs, mass, q_gu, q_dn = _expert_view(res, X, idx, gate_w, e)
    e_gu = fp["model.layers.0.mlp.experts.gate_up_proj"][e].double() - q_gu
    loss_gu = float(((xs @ e_gu.T) ** 2).sum(1).mean())  # tr(E H E^T), H = mean x x^T
    h = expert_gate(experts, q_gu[None].float(), 0, xs.float()).double()  # down's inputs through quantized gate/up
    e_dn = fp["model.layers.0.mlp.experts.down_proj"][e].double() - q_dn
    loss_dn = float(((h @ e_dn.T) ** 2).sum(1).mean())
    width = res.summary["expert_bits"][0][e]
    recorded = res.summary["expert_damage"][0][e][levels.index(width)]
    assert recorded == pytest.approx(mass * (loss_gu + loss_dn), rel=1e-4)
    damage = torch.tensor(res.summary["expert_damage"][0])
    assert (damage[:, :-1] > damage[:, 1:]).all()  # more bits, less damage, for every expert of the layer


def test_measured_allocation_solves_each_width_once_and_reloads(tmp_path, monkeypatch):
    """A measured allocation: one batched solve per width and projection (the chosen codes are reused, never
    solved again), the budget holds, and its checkpoint reloads with the per-expert widths and the same logits."""
    import json

    import vsraq_plugin.solve as solve_mod
    from grid_checks import assert_model_holds_the_grid
    from vsraq_plugin.checkpoint import load_checkpoint, save_checkpoint
    from vsraq_plugin.nn import QuantExperts

    calls = []
    real = solve_mod.gptq_quantize

    def counted(W, H, bits, *args, **kwargs):
        calls.append((W.shape, bits))
        return real(W, H, bits, *args, **kwargs)

    monkeypatch.setattr(solve_mod, "gptq_quantize", counted)
    model, _, windows, res = _tiny_measured(2.75, [2, 3, 4], width_per_projection=False)
    expert_calls = sorted((s[1], b) for s, b in calls if s[0] == 8)  # the 8 experts of a layer, batched
    assert expert_calls == sorted([(128, b) for b in (2, 3, 4)] * 2 + [(64, b) for b in (2, 3, 4)] * 2)
    widths = res.summary["expert_bits"]
    assert res.summary["expert_bits_scores"].startswith("measured damage")
    assert all(sum(w) <= 2.75 * 8 for w in widths.values()) and any(len(set(w)) > 1 for w in widths.values())
    for i in range(2):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            qw = res.weights[f"model.layers.{i}.mlp.experts.{proj}"]
            got = qw.bits_per_matrix.tolist() if qw.bits_per_matrix is not None else [qw.bits] * 8
            assert got == widths[i], (i, proj)
    assert_model_holds_the_grid(model, res)
    out = save_checkpoint(model, res, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["meta"]["vsraq"]["allocation"] == "measured"
    assert len(qc["dynamic"]) == sum(b != 4 for w in widths.values() for b in w)
    loaded = load_checkpoint(out)
    experts = [m for m in loaded.modules() if isinstance(m, QuantExperts)]
    assert [m.expert_bits for m in experts] == [widths[i] for i in range(2)]
    assert "expert_down_bits" not in res.summary and all(m.down_bits == m.expert_bits for m in experts)
    with torch.no_grad():
        assert torch.equal(model(input_ids=windows).logits, loaded(input_ids=windows).logits)


@pytest.mark.parametrize("allocation", ["random", "frequency"])
def test_baseline_allocations_meet_the_budget_exactly(allocation):
    _, _, _, res = _tiny_measured(3.0, [2, 3, 4], allocation=allocation)
    for w in res.summary["expert_bits"].values():
        assert sorted(w) == [2, 2, 2, 3, 3, 4, 4, 4]
    assert res.summary["expert_bits_scores"].split(" ")[0] in ("random", "routed")


def test_model_scope_budget_holds_over_the_model_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """``budget_scope="model"``: the model's mean width is within the budget (not each layer's), the allocation is
    deterministic, and a run interrupted after layer 0 resumes to the same widths and codes."""
    import copy

    from tiny_models import tiny_model
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.pipeline import quantize_model

    fp = tiny_model("mixtral", seed=5)
    windows = torch.randint(0, fp.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(2))
    cfg = QuantConfig(bits=4, group_size=16, bits_budget=2.75, bit_levels=[2, 3, 4], budget_scope="model")
    straight = quantize_model(copy.deepcopy(fp), windows, cfg, batch_size=2, progress=False)
    widths = straight.summary["expert_bits"]
    assert sum(sum(w) for w in widths.values()) <= 2.75 * 16
    shares = straight.summary["expert_layer_budgets"]
    assert sum(shares.values()) <= 2.75 * 2 + 1e-9 and all(sum(widths[i]) <= shares[i] * 8 + 1e-9 for i in shares)

    def crash(i):
        if i == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(copy.deepcopy(fp), windows, cfg, batch_size=2, progress=False, work_dir=tmp_path,
                       on_layer_done=crash)  # fmt: skip
    import vsraq_plugin.pipeline as pipeline

    def no_prepass(*_a, **_k):
        raise AssertionError("a resumed run must reuse its model-scope shares, not run the pre-pass again")

    monkeypatch.setattr(pipeline, "_model_budgets", no_prepass)
    resumed = quantize_model(copy.deepcopy(fp), windows, cfg, batch_size=2, progress=False, work_dir=tmp_path)
    assert resumed.summary["expert_bits"] == widths
    assert resumed.summary["expert_layer_budgets"] == shares
    for name, qw in straight.weights.items():
        assert torch.equal(qw.codes, resumed.weights[name].codes), name


# ---------------------------------------------------------------------------------------------- widths per projection
@pytest.mark.parametrize("seed", range(6))
def test_per_part_allocation_is_the_exact_optimum_of_brute_force(seed):
    """Widths per projection: each expert's gate/up (2x the parameters) and its down are separate items of one
    knapsack. Against brute force over every (gate/up, down) width of every expert, at several budgets."""
    import itertools

    from vsraq_plugin.mixed_precision import allocate_parts, budget_bit_params

    g = torch.Generator().manual_seed(seed)
    E, levels, p = 3, [2, 3, 4], 16  # down: p parameters, gate/up: 2p
    falls = torch.tensor([16.0, 4.0, 1.0])
    d_gu = (torch.rand(E, 1, generator=g) * falls ** (2 * torch.rand(E, 1, generator=g))).double()
    d_dn = (torch.rand(E, 1, generator=g) * falls ** (2 * torch.rand(E, 1, generator=g))).double()
    params = [2 * p] * E + [p] * E
    damage = torch.cat([d_gu, d_dn])

    def total(c):
        return sum(float(damage[i, levels.index(c[i])]) for i in range(2 * E))

    differ = False
    for budget in (2.0, 2.4, 2.75, 3.0, 3.3, 3.7, 4.0):
        cap = budget_bit_params(budget, params)
        gu, dn = allocate_parts([d_gu, d_dn], levels, cap, [[2 * p] * E, [p] * E])
        widths = [*gu.tolist(), *dn.tolist()]
        assert sum(b * n for b, n in zip(widths, params, strict=True)) <= budget * sum(params) + 1e-9
        best = min(
            total(c)
            for c in itertools.product(levels, repeat=2 * E)
            if sum(b * n for b, n in zip(c, params, strict=True)) <= cap
        )
        assert total(widths) == pytest.approx(best, rel=1e-12), budget
        differ |= gu.tolist() != dn.tolist()
    assert differ  # the case covers an expert whose down gets another width than its gate/up


def _per_projection(budget: float, levels: list[int], **kw):
    """tiny-mixtral (seed 5), gptq, widths per projection; every GPTQ solve recorded as (W, H, bits, result)."""
    import vsraq_plugin.solve as solve_mod
    from tiny_models import tiny_model
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.pipeline import quantize_model

    calls = []
    real = solve_mod.gptq_quantize

    def recording(W, H, bits, *args, **kwargs):
        out = real(W, H, bits, *args, **kwargs)
        calls.append((W.clone(), H.clone(), bits, out[0]))
        return out

    model = tiny_model("mixtral", seed=5)
    windows = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(2))
    cfg = QuantConfig(bits=4, group_size=16, method="gptq", bits_budget=budget, bit_levels=levels,
                      width_per_projection=True, **kw)  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(solve_mod, "gptq_quantize", recording)
        res = quantize_model(model, windows, cfg, batch_size=2, progress=False)
    return model, windows, res, calls


@pytest.fixture(scope="module")
def per_projection_run():
    return _per_projection(2.4, [2, 3, 4])  # widths of every kind: gate/up = down (2, 3) and gate/up 3, down 2


def _part_params(model) -> tuple[int, int]:
    experts = model.model.layers[0].mlp.experts
    return experts.gate_up_proj[0].numel(), experts.down_proj[0].numel()


def test_width_per_projection_allocation_holds_the_budget_and_is_optimal(per_projection_run):
    """Some expert's down width differs from its gate/up's; each layer: width x parameters summed over both parts
    of every expert is within the budget, the widths are stored per projection, and no exchange of
    one or two parts' widths lowers the recorded damage within the budget (the knapsack's optimum is that stable)."""
    import itertools

    from grid_checks import assert_model_holds_the_grid

    model, _, res, _ = per_projection_run
    s = res.summary
    assert s["expert_bits_scores"].endswith("widths per projection (gate/up, down)")
    p_gu, p_dn = _part_params(model)
    assert (p_gu, p_dn) == (2 * 64 * 64, 64 * 64)
    levels = [2, 3, 4]
    assert any(a != b for i in range(2) for a, b in zip(s["expert_bits"][i], s["expert_down_bits"][i], strict=True))
    for i in range(2):
        gu, dn = s["expert_bits"][i], s["expert_down_bits"][i]
        cap = 2.4 * 8 * (p_gu + p_dn)
        spent = sum(gu) * p_gu + sum(dn) * p_dn
        assert cap - p_dn < spent <= cap  # within the budget, less left than the cheapest step (a down by one bit)
        for proj, want in (("gate_proj", gu), ("up_proj", gu), ("down_proj", dn)):
            qw = res.weights[f"model.layers.{i}.mlp.experts.{proj}"]
            got = qw.bits_per_matrix.tolist() if qw.bits_per_matrix is not None else [qw.bits] * 8
            assert got == want, (i, proj)
            for e, b in enumerate(want):
                assert int(qw.codes[e].max()) <= 2**b - 1 and int(qw.codes[e].max()) >= 2 ** (b - 1), (i, proj, e)
        total = torch.tensor(s["expert_damage"][i], dtype=torch.float64)
        down = torch.tensor(s["expert_down_damage"][i], dtype=torch.float64)
        damage = torch.cat([total - down, down])  # gate/up's and down's damage, item by item
        widths = gu + dn
        params = [p_gu] * 8 + [p_dn] * 8
        value = sum(float(damage[k, levels.index(widths[k])]) for k in range(16))
        for a, b in itertools.combinations(range(16), 2):
            for wa, wb in itertools.product(levels, repeat=2):
                c = list(widths)
                c[a], c[b] = wa, wb
                if sum(x * n for x, n in zip(c, params, strict=True)) <= cap:
                    alt = sum(float(damage[k, levels.index(c[k])]) for k in range(16))
                    assert alt >= value * (1 - 1e-12), (i, a, b, wa, wb)
    assert_model_holds_the_grid(model, res)  # codes, per-projection grids, weights and the model agree bit for bit


def test_down_with_its_own_width_is_solved_again_on_the_chosen_gate_up(per_projection_run):
    """An expert whose down width differs from its gate/up's: its stored down codes come from one more solve whose
    Hessian is the one of the down inputs the quantized model really gives it (rebuilt here from the routed tokens
    and the stored gate/up), not the measured pass's (gate/up at the down's width)."""
    from vsraq_plugin.capture import expert_gate
    from vsraq_plugin.solve import dequantize_grid

    model, windows, res, calls = per_projection_run
    gu, dn = res.summary["expert_bits"][0], res.summary["expert_down_bits"][0]
    experts = model.model.layers[0].mlp.experts
    X, idx, _ = _routed_inputs(model, experts, windows)
    counts = torch.bincount(idx.flatten(), minlength=8)
    again = [e for e in range(8) if gu[e] != dn[e]]
    e = max(again, key=lambda k: int(counts[k]))
    assert int(counts[e]) >= 16  # no coverage blending in its Hessian
    qw = {p: res.weights[f"model.layers.0.mlp.experts.{p}"] for p in ("gate_proj", "up_proj")}
    q_gu = torch.cat([dequantize_grid(q.codes, q.scales, q.zeros, q.g_idx)[e] for q in qw.values()])
    h = expert_gate(experts, q_gu[None].double(), 0, X[(idx == e).any(-1)]).double()
    H = h.T @ h / h.shape[0]
    # Layer 0's down solves (8 experts of (64, 64)), up to layer 1's first gate/up solve: one per width, then the
    # experts solved again, one call per down width, on their original down weights (attention's single (64, 64)
    # matrices hold other weights).
    layer_1 = [n for n, c in enumerate(calls) if c[0].shape[1:] == (128, 64)][3]
    downs = [c for c in calls[:layer_1] if c[0].shape[1:] == (64, 64)]
    measured = {c[2]: c for c in [c for c in downs if c[0].shape[0] == 8][:3]}
    fp_down = next(iter(measured.values()))[0]
    redo = [e2 for e2 in again if dn[e2] == dn[e]]
    (call,) = [c for c in downs if c[2] == dn[e] and c[0].shape[0] == len(redo) and torch.equal(c[0], fp_down[redo])]
    k = redo.index(e)
    rel = lambda A: float((A.double() - H).norm() / H.norm())  # noqa: E731
    assert rel(call[1][k]) < 1e-5
    assert rel(measured[dn[e]][1][e]) > 0.1  # the measured pass's Hessian (gate/up at the down's width) differs
    stored = res.weights["model.layers.0.mlp.experts.down_proj"]
    assert torch.equal(stored.codes[e], call[3].codes[k])


def test_width_per_projection_checkpoint_reloads_with_the_same_logits(per_projection_run, tmp_path):
    """GPTQ v1 with `dynamic` overrides that give every expert projection its width (read here as a GPTQ loader
    reads them: the module name against the patterns), the plugin's loader rebuilds the per-projection widths and
    the same logits; a block that gives gate and up different widths is refused (they run as one fused weight)."""
    import json
    import re

    from vsraq_plugin.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from vsraq_plugin.nn import QuantExperts

    model, windows, res, _ = per_projection_run
    gu, dn = res.summary["expert_bits"], res.summary["expert_down_bits"]
    out = save_checkpoint(model, res, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4
    assert qc["meta"]["vsraq"]["width_per_projection"] is True
    assert {int(i): w for i, w in qc["meta"]["vsraq"]["expert_down_bits"].items()} == dn
    dyn = qc["dynamic"]
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}  # Mixtral's original names
    for i in range(2):
        for e in range(8):
            for proj, leaf in names.items():
                module = f"model.layers.{i}.block_sparse_moe.experts.{e}.{leaf}"
                hits = [v["bits"] for k, v in dyn.items() if re.match(k.removeprefix("+:"), module)]
                assert len(hits) <= 1, module  # the entries never overlap: no order to depend on
                assert (hits[0] if hits else 4) == (dn if proj == "down_proj" else gu)[i][e], module
    whole = sum(g == d != 4 for i in range(2) for g, d in zip(gu[i], dn[i], strict=True))
    split = sum((g != 4) + (d != 4) for i in range(2) for g, d in zip(gu[i], dn[i], strict=True) if g != d)
    assert whole and split and len(dyn) == whole + split  # both kinds of entry, and nothing else
    loaded = load_checkpoint(out)
    experts = [m for m in loaded.modules() if isinstance(m, QuantExperts)]
    assert [m.expert_bits for m in experts] == [gu[i] for i in range(2)]
    assert [m.down_bits for m in experts] == [dn[i] for i in range(2)]
    tf = save_checkpoint(model, res, tmp_path / "tf", key_layout="transformers")  # gptqmodel's names
    tf_dyn = json.loads((tf / "config.json").read_text())["quantization_config"]["dynamic"]
    assert len(tf_dyn) == len(dyn) and all(r"\.mlp\.experts\." in k for k in tf_dyn)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
        assert torch.equal(logits, loaded(input_ids=windows).logits)
        assert torch.equal(logits, load_checkpoint(tf)(input_ids=windows).logits)
    up = r"+:^model\.layers\.0\.block_sparse_moe\.experts\.0\.w3$"
    config["quantization_config"]["dynamic"] = {up: {"bits": 8}, **dyn}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="gate_proj at 2 bits and up_proj at 8"):
        load_checkpoint(out)


def test_model_scope_with_widths_per_projection_shares_the_budget_by_part(monkeypatch):
    """``budget_scope="model"`` with widths per projection: the pre-pass's knapsack has the same items as the layers'
    (each expert's gate/up and its down), the model's width x parameters over both parts is within the budget, and
    each layer spends no more than its share."""
    import vsraq_plugin.mixed_precision as mp

    items = []
    real = mp.allocate_measured

    def spy(damage, levels, cap, params=None):
        items.append(list(params))
        return real(damage, levels, cap, params)

    monkeypatch.setattr(mp, "allocate_measured", spy)
    model, _, res, _ = _per_projection(2.75, [2, 3, 4], budget_scope="model")
    p_gu, p_dn = _part_params(model)
    assert items[0] == ([p_gu] * 8 + [p_dn] * 8) * 2  # the pre-pass: both MoE layers, two items per expert
    assert items[1:] == [[p_gu] * 8 + [p_dn] * 8] * 2  # each layer's own allocation
    gu, dn = res.summary["expert_bits"], res.summary["expert_down_bits"]
    spent = {i: sum(gu[i]) * p_gu + sum(dn[i]) * p_dn for i in range(2)}
    assert sum(spent.values()) <= 2.75 * 16 * (p_gu + p_dn)
    shares = res.summary["expert_layer_budget_params"]
    assert all(spent[i] <= shares[i] for i in range(2)) and sum(shares.values()) <= 2.75 * 16 * (p_gu + p_dn)


def test_width_per_projection_resumes_bit_for_bit(per_projection_run, tmp_path):
    """A per-projection run interrupted after layer 0 resumes to the same widths of both parts, the same recorded
    damages and the same codes as the run that went straight through."""
    from tiny_models import tiny_model
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.pipeline import quantize_model

    _, windows, straight, _ = per_projection_run
    cfg = QuantConfig(bits=4, group_size=16, method="gptq", bits_budget=2.4, bit_levels=[2, 3, 4],
                      width_per_projection=True)  # fmt: skip

    def crash(i):
        if i == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(tiny_model("mixtral", seed=5), windows, cfg, batch_size=2, progress=False, work_dir=tmp_path,
                       on_layer_done=crash)  # fmt: skip
    resumed = quantize_model(tiny_model("mixtral", seed=5), windows, cfg, batch_size=2, progress=False,
                             work_dir=tmp_path)  # fmt: skip
    for key in ("expert_bits", "expert_down_bits", "expert_damage", "expert_down_damage"):
        assert resumed.summary[key] == straight.summary[key], key
    assert straight.weights.keys() == resumed.weights.keys()
    for name, qw in straight.weights.items():
        assert torch.equal(qw.codes, resumed.weights[name].codes), name
        assert torch.equal(qw.scales, resumed.weights[name].scales), name
        widths = [
            None if q.bits_per_matrix is None else q.bits_per_matrix.tolist() for q in (qw, resumed.weights[name])
        ]
        assert widths[0] == widths[1] and qw.bits == resumed.weights[name].bits, name


@pytest.mark.parametrize("in_read_metric", [False, True])
def test_gate_up_output_loss_against_a_per_token_reference(in_read_metric):
    """Gate/up's damage in the residual stream (widths per projection): against a float64 loop over the (token,
    expert) pairs with the family's SiLU gate written out, ``w ||W_down (silu(g~) u~ - silu(g) u)||^2 / sum w``, over
    two batches (in the read metric: ``||.||_M^2``, ``M`` written out); an expert no pair reaches gets 0."""
    from tiny_models import tiny_model
    from vsraq_plugin.mixed_precision import gate_up_output_loss, read_metric
    from vsraq_plugin.quantizer import rtn

    experts = tiny_model("mixtral", seed=3).model.layers[0].mlp.experts
    gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()
    E, two_i, d = gu.shape
    g = torch.Generator().manual_seed(0)
    batches = []
    for n in (30, 17):
        X = torch.randn(n, d, generator=g)
        tokens = torch.randint(0, n, (40,), generator=g)
        eids = torch.randint(0, E - 1, (40,), generator=g)  # expert E - 1 receives nothing
        batches.append((X, tokens, eids, torch.rand(40, generator=g)))
    gate_ups = {b: rtn(gu.float(), b, 16, False).weight for b in (2, 3)}
    rm, M = None, torch.eye(d, dtype=torch.float64)
    if in_read_metric:
        rm = read_metric([torch.randn(6, d, generator=g), torch.randn(20, d, generator=g)])
        M = _dense(rm)
    got = gate_up_output_loss(experts, gu, gate_ups, dn, batches, read=rm)
    inter = two_i // 2
    for b, q in gate_ups.items():
        num, den = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
        for X, tokens, eids, w in batches:
            for t, e, wt in zip(tokens.tolist(), eids.tolist(), w.double().tolist(), strict=True):
                x = X[t].double()

                def h(W, x=x, e=e):
                    out = W[e].double() @ x
                    return torch.nn.functional.silu(out[:inter]) * out[inter:]

                out = dn[e].double() @ (h(q) - h(gu))
                num[e] += wt * float(out @ M @ out)
                den[e] += wt
        want = num / den.clamp(min=1e-300)
        assert want[-1] == 0 and got[b][-1] == 0
        torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-12)
    assert (got[2][:-1] > got[3][:-1]).all()  # narrower, more damage (rtn on random weights)


def _dense(rm) -> torch.Tensor:
    """A ``ReadMetric`` as the matrix it stands for, ``mu I + U diag(coef) U^T`` (float64)."""
    U = rm.U.double()
    return U @ torch.diag(rm.coef.double()) @ U.T + rm.mu * torch.eye(U.shape[0], dtype=torch.float64)


def _explicit_read_metric(readers: list[torch.Tensor]) -> torch.Tensor:
    d = readers[0].shape[1]
    M = sum(W.double().T @ W.double() / W.double().pow(2).sum() for W in readers)
    return M * d / torch.trace(M)


def test_read_metric_against_its_definition():
    """Full rank (``d`` at most ``rank``): ``mu I + U diag(coef) U^T`` is ``sum_j W_j^T W_j / ||W_j||^2`` scaled to
    trace ``d``; a reader scaled by 10 counts the same; ``sq_norms`` and ``damage`` are ``v^T M v`` and
    ``tr(M E H E^T)`` written out."""
    from vsraq_plugin.mixed_precision import read_metric

    g = torch.Generator().manual_seed(0)
    d = 12
    readers = [torch.randn(n, d, generator=g) for n in (5, 20, 3)]
    M = _explicit_read_metric(readers)
    rm = read_metric(readers)
    torch.testing.assert_close(_dense(rm), M, rtol=1e-5, atol=1e-5)
    again = read_metric([readers[0] * 10, readers[1], readers[2] / 7])
    torch.testing.assert_close(again.sq_norms(torch.eye(d)), rm.sq_norms(torch.eye(d)), rtol=1e-4, atol=1e-5)
    v = torch.randn(9, d, generator=g)
    torch.testing.assert_close(rm.sq_norms(v).double(), ((v.double() @ M) * v.double()).sum(-1), rtol=1e-4, atol=1e-4)
    E, X = torch.randn(3, d, 6, generator=g).double(), torch.randn(3, 50, 6, generator=g).double()
    H = X.transpose(1, 2) @ X / 50
    want = torch.stack([torch.trace(M @ E[b] @ H[b] @ E[b].T) for b in range(3)])
    torch.testing.assert_close(rm.damage(E, H), want, rtol=1e-5, atol=1e-8)


def test_read_metric_low_rank_keeps_the_top_directions_and_the_trace():
    """Above ``rank`` directions: the kept ones are ``M``'s top eigenvectors with their exact weights, every other
    direction weighs the mean of the rest, and the trace is ``d`` as ``M``'s."""
    from vsraq_plugin.mixed_precision import read_metric

    g = torch.Generator().manual_seed(1)
    d, rank = 40, 6
    readers = [torch.randn(8, d, generator=g), torch.randn(30, d, generator=g) * torch.linspace(0.1, 3, d)]
    M = _explicit_read_metric(readers)
    lam, V = torch.linalg.eigh(M)
    rm = read_metric(readers, rank=rank)
    top = V[:, -rank:].T.float()  # the top directions: exact
    torch.testing.assert_close(rm.sq_norms(top).double(), lam[-rank:], rtol=1e-4, atol=1e-5)
    rest = V[:, :-rank].T.float()
    mean_rest = float(lam[:-rank].sum()) / (d - rank)
    torch.testing.assert_close(rm.sq_norms(rest).double(), torch.full((d - rank,), mean_rest, dtype=torch.float64),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    assert float(rm.sq_norms(torch.eye(d)).sum()) == pytest.approx(d, rel=1e-5)


def test_expert_damage_in_the_read_metric():
    """``expert_damage`` with a read metric is ``tr(M (W - Q) H (W - Q)^T)``; without, the plain solve loss."""
    from vsraq_plugin.mixed_precision import expert_damage, read_metric

    g = torch.Generator().manual_seed(2)
    d, n = 10, 7
    rm = read_metric([torch.randn(4, d, generator=g), torch.randn(9, d, generator=g)])
    W, Q = torch.randn(2, d, n, generator=g), torch.randn(2, d, n, generator=g)
    X = torch.randn(2, 30, n, generator=g)
    H = X.transpose(1, 2) @ X / 30
    M = _dense(rm)
    E = (W - Q).double()
    want = torch.stack([torch.trace(M @ E[b] @ H[b].double() @ E[b].T) for b in range(2)])
    torch.testing.assert_close(expert_damage(W, Q, H, rm), want, rtol=1e-5, atol=1e-8)
    plain = torch.stack([torch.trace(E[b] @ H[b].double() @ E[b].T) for b in range(2)])
    torch.testing.assert_close(expert_damage(W, Q, H), plain, rtol=1e-6, atol=1e-8)


def test_read_metric_of_a_layer_reads_its_attention_router_and_shared_experts():
    """The pipeline's read metric of a DeepSeek-V3 MoE layer (MLA, shared experts): the linears that read the
    stream, ``q_a_proj`` and ``kv_a_proj_with_mqa`` through ``input_layernorm``, the router and the shared experts'
    gate and up through ``post_attention_layernorm``; nothing with ``damage_metric="residual"`` or one width per
    expert."""
    from tiny_models import tiny_model
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.models import get_adapter
    from vsraq_plugin.pipeline import _read_metric

    model = tiny_model("deepseek_v3", seed=4)
    adapter = get_adapter(model)
    layer = next(lay for lay in adapter.moe_layers(model))
    block = layer.layer
    with torch.no_grad():  # norms that are not all ones, so that folding them in shows
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(3)) + 0.5)
    g1, g2 = block.input_layernorm.weight.detach(), block.post_attention_layernorm.weight.detach()
    att, shared = block.self_attn, block.mlp.shared_experts
    readers = [att.q_a_proj.weight * g1, att.kv_a_proj_with_mqa.weight * g1, block.mlp.gate.weight * g2,
               shared.gate_proj.weight * g2, shared.up_proj.weight * g2]  # fmt: skip
    M = _explicit_read_metric([r.detach() for r in readers])
    cfg = QuantConfig(bits=4, group_size=16, bits_budget=3.0, bit_levels=[2, 3, 4])
    rm = _read_metric(adapter, layer, cfg)
    d = M.shape[0]
    torch.testing.assert_close(rm.sq_norms(torch.eye(d)).double(), torch.diagonal(M), rtol=1e-4, atol=1e-5)
    assert _read_metric(adapter, layer, cfg.replace(damage_metric="residual")) is None
    assert _read_metric(adapter, layer, cfg.replace(width_per_projection=False)) is None


def test_per_projection_down_damage_is_measured_in_the_read_metric():
    """With widths per projection, an expert's recorded down damage (its down at its gate/up's width, so measured
    on the inputs it sees) is mass x ``tr(M E H E^T)``: ``E`` from the stored codes, ``H`` rebuilt from the tokens
    the quantized model routes to it, ``M`` the read metric of the layer."""
    from vsraq_plugin.capture import expert_gate
    from vsraq_plugin.models import get_adapter
    from vsraq_plugin.pipeline import _read_metric

    def read_half(model):  # the layers' readers see little of half the stream: a read metric far from I
        with torch.no_grad():
            for block in model.model.layers:
                for lin in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.mlp.gate):
                    lin.weight[:, lin.weight.shape[1] // 2 :] *= 0.05

    levels = [2, 3, 4]
    model, fp, windows, res = _tiny_measured(2.5, levels, prepare=read_half, width_per_projection=True)
    adapter = get_adapter(model)
    layer = adapter.moe_layers(model)[0]
    experts = layer.experts
    X, idx, gate_w = _routed_inputs(model, experts, windows)
    gu, dn = res.summary["expert_bits"][0], res.summary["expert_down_bits"][0]
    counts = torch.bincount(idx.flatten(), minlength=8)
    same = [e for e in range(8) if gu[e] == dn[e]]
    e = max(same, key=lambda j: int(counts[j]))
    assert int(counts[e]) >= 8
    xs, mass, q_gu, q_dn = _expert_view(res, X, idx, gate_w, e)
    h = expert_gate(experts, q_gu[None].float(), 0, xs.float()).double()
    e_dn = fp["model.layers.0.mlp.experts.down_proj"][e].double() - q_dn
    rm = _read_metric(adapter, layer, res.config)
    M = _dense(rm)
    out = h @ e_dn.T  # (tokens, d): down's error in the stream
    want = mass * float(((out @ M) * out).sum(1).mean())
    recorded = res.summary["expert_down_damage"][0][e][levels.index(dn[e])]
    assert recorded == pytest.approx(want, rel=1e-4)
    plain = mass * float(out.pow(2).sum(1).mean())
    assert abs(plain - want) > 0.05 * want  # the metric is not the plain norm here: the check can tell them apart
