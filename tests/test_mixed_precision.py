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
    cfg = QuantConfig(bits=4, group_size=16, method="gptq", bits_budget=3.0, bit_levels=[2, 3, 4])
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
