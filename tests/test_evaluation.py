import copy
import importlib.util
import json
import math

import pytest
import torch

from tiny_models import tiny_model
from vsraq_plugin.evaluation import build_report, evaluate, markdown_table, token_windows, write_report
from vsraq_plugin.routing import (
    RouterRule,
    boundary_margin,
    route,
    top1_agreement,
    topk_overlap,
    topk_set_agreement,
)


def test_metrics_on_hand_computed_cases():
    ref = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    other = torch.tensor([[1, 0], [2, 4], [6, 7], [0, 1]])
    # token 0: same set, other order; token 1: one of two; token 2: none; token 3: none
    assert topk_set_agreement(ref, other, 8).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert topk_overlap(ref, other, 8).tolist() == [1.0, 0.5, 0.0, 0.0]
    sel_a = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    sel_b = torch.tensor([[3.0, 4.0, 0.0], [0.0, 2.0, 1.0]])
    assert top1_agreement(sel_a, sel_b).tolist() == [0.0, 1.0]


def test_margin_and_rules_by_hand():
    logits = torch.tensor([[2.0, 0.5, 1.0, -1.0]])
    # top-2 = {0, 2}; margin = 1.0 - 0.5
    assert boundary_margin(logits, 2).item() == pytest.approx(0.5)
    r = route(logits, RouterRule("softmax", 2, 4, renormalize=True))
    assert sorted(r.indices[0].tolist()) == [0, 2]
    p = torch.softmax(logits, -1)[0]
    assert r.weights[0].tolist() == pytest.approx([(p[0] / (p[0] + p[2])).item(), (p[2] / (p[0] + p[2])).item()])
    # sigmoid + bias, 2 groups of 2, keep 1 group: group {2,3} wins through the bias although expert 0 is best.
    rule = RouterRule("sigmoid_group", 1, 4, n_group=2, topk_group=1, scaling=2.0)
    bias = torch.tensor([0.0, 0.0, 0.6, 0.6])
    r = route(logits, rule, bias)
    assert r.indices.tolist() == [[2]]
    assert r.weights.item() == pytest.approx(2.0 * torch.sigmoid(torch.tensor(1.0)).item())  # unbiased score
    assert boundary_margin(torch.tensor([[1.0, 0.0]]), 2).item() == math.inf


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("mixtral", seed=1)
    windows = torch.randint(0, model.config.vocab_size, (6, 32), generator=torch.Generator().manual_seed(0))
    return model, windows


def test_model_against_itself_agrees_fully(setup):
    model, windows = setup
    m = evaluate(model, {"same": copy.deepcopy(model)}, windows, batch_size=4, progress=False)
    assert m["same"]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert m["same"]["topk_set_agreement"] == 1.0 and m["same"]["top1_agreement"] == 1.0
    assert m["same"]["topk_overlap"] == 1.0
    assert m["same"]["perplexity"] == pytest.approx(m["__reference__"]["perplexity"], rel=1e-6)


def test_perplexity_equals_direct_computation(setup):
    model, windows = setup
    m = evaluate(model, {}, windows, batch_size=4, progress=False)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
    direct = math.exp(torch.stack(losses).mean().item())  # equal-length windows: mean of means
    assert m["__reference__"]["perplexity"] == pytest.approx(direct, rel=1e-5)


def test_perturbed_router_lowers_agreement_only_where_expected(setup):
    model, windows = setup
    bad = copy.deepcopy(model)
    with torch.no_grad():
        gate = bad.model.layers[1].mlp.gate.weight
        gate.add_(0.5 * torch.randn(gate.shape, generator=torch.Generator().manual_seed(3)))
    m = evaluate(model, {"bad": bad}, windows, batch_size=4, progress=False)["bad"]
    assert m["per_layer"]["topk_set_agreement"][0] == 1.0  # layer 0 is upstream of the change
    assert m["per_layer"]["top1_agreement"][0] == 1.0
    assert m["per_layer"]["topk_set_agreement"][1] < 0.9
    assert m["kl"] > 1e-6  # other experts now combine: the output distribution moves (tiny at random init)


def test_report_files(setup, tmp_path):
    model, windows = setup
    report = build_report(evaluate(model, {"q": copy.deepcopy(model)}, windows, progress=False), "fp", "t.txt", 192)
    paths = write_report(report, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data) == {"reference", "text", "models"}
    assert set(data["models"]["q"]) >= {
        "perplexity",
        "kl",
        "topk_set_agreement",
        "topk_overlap",
        "top1_agreement",
        "per_layer",
    }
    assert len(data["models"]["q"]["per_layer"]["topk_set_agreement"]) == 2
    assert "| q |" in markdown_table(report)
    names = ["report.json", "report.md"]
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is written exactly when it can be
        names.append("agreement.png")
        assert (tmp_path / "agreement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths == [tmp_path / n for n in names]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # and nothing else (no temp files)


def test_token_windows_are_non_overlapping_and_validated():
    class Tok:
        eos_token_id = 0

        def __call__(self, docs, add_special_tokens=False):
            return {"input_ids": [[len(w) for w in d.split()] for d in docs]}

    w = token_windows(Tok(), "a bb ccc\n\ndddd eeeee", seq_len=3)
    assert w.tolist() == [[1, 2, 3], [0, 4, 5]]
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(Tok(), "a", seq_len=8)


# ---------------------------------------------------------------------------------------------- attribution
def _three_layer_mixtral(seed: int = 1):
    """A random tiny Mixtral with three MoE layers (so a perturbed middle layer has one before and after)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from tiny_models import COMMON

    torch.manual_seed(seed)
    cfg = MixtralConfig(**{**COMMON, "num_hidden_layers": 3}, intermediate_size=64, num_local_experts=8)
    model = MixtralForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:  # routers start at zero in some versions: make them route
            torch.nn.init.normal_(layer.mlp.gate.weight, std=0.2)
    return model


def _perturb_attention(model, layer: int, scale: float = 0.5, seed: int = 5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in model.model.layers[layer].self_attn.modules():
            if isinstance(lin, torch.nn.Linear):
                lin.weight.add_(scale * lin.weight.std() * torch.randn(lin.weight.shape, generator=gen))


def _attributed(reference, model, windows) -> dict:
    return evaluate(reference, {"q": model}, windows, batch_size=4, progress=False, attribution=True)["q"]["per_layer"]


def _total(per_layer: dict) -> list[float]:
    return [1.0 - a for a in per_layer["topk_set_agreement"]]


def test_attribution_of_the_reference_against_itself_is_zero(setup):
    model, windows = setup
    pl = _attributed(model, copy.deepcopy(model), windows)
    for key in ("local_disagreement", "inherited_disagreement", "drift_flips", "drift_unflips"):
        assert pl[key] == [0.0, 0.0], key


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_flips_are_local_at_the_perturbed_layer_and_inherited_after_it(family):
    # mixtral: decoder layers 0-2 all MoE, layer 1 perturbed; deepseek_v3: layer 0 dense, MoE layers 1-2,
    # layer 1 (the first MoE layer, slot 0) perturbed: checks decoder index vs MoE slot.
    ref = _three_layer_mixtral() if family == "mixtral" else tiny_model("deepseek_v3", seed=1)
    windows = torch.randint(0, ref.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    q = copy.deepcopy(ref)
    _perturb_attention(q, layer=1)
    pl = _attributed(ref, q, windows)
    total = _total(pl)
    slot = 1 if family == "mixtral" else 0  # MoE slot of decoder layer 1
    for i in range(slot):  # upstream of the change: nothing at all
        assert total[i] == 0.0 and pl["local_disagreement"][i] == 0.0
    # At the perturbed layer the input is exactly FP in both runs: every flip is local (bitwise, same ops).
    assert total[slot] > 0.05
    assert pl["local_disagreement"][slot] == total[slot]
    assert pl["inherited_disagreement"][slot] == 0.0
    # Later layers are unchanged: fed the FP stream they route exactly as FP, so all flips are inherited.
    for i in range(slot + 1, len(total)):
        assert total[i] > 0.0
        assert pl["local_disagreement"][i] == 0.0
        assert pl["inherited_disagreement"][i] == pytest.approx(total[i], abs=1e-12)


def test_local_flips_equal_those_of_a_hybrid_model_and_parts_add_up():
    """Independent reference for 'local': the FP model with only decoder layer l swapped for the candidate's."""
    ref = _three_layer_mixtral(seed=2)
    windows = torch.randint(0, ref.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(1))
    q = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in q.model.layers:  # every layer's attention and router changed, as quantization does
            _perturb_attention(q, layer.self_attn.layer_idx, scale=0.3, seed=layer.self_attn.layer_idx)
            layer.mlp.gate.weight.add_(0.05 * torch.randn(layer.mlp.gate.weight.shape, generator=gen))
    pl = _attributed(ref, q, windows)
    total = _total(pl)
    for i in range(3):
        hybrid = copy.deepcopy(ref)
        hybrid.model.layers[i] = copy.deepcopy(q.model.layers[i])
        direct = evaluate(ref, {"h": hybrid}, windows, batch_size=4, progress=False)["h"]["per_layer"]
        assert pl["local_disagreement"][i] == pytest.approx(1.0 - direct["topk_set_agreement"][i], abs=1e-12)
        assert pl["local_disagreement"][i] + pl["inherited_disagreement"][i] == pytest.approx(total[i], abs=1e-12)
        drift = pl["drift_flips"][i] - pl["drift_unflips"][i]
        assert drift == pytest.approx(pl["inherited_disagreement"][i], abs=1e-12)
    assert pl["inherited_disagreement"][0] == 0.0  # nothing upstream of layer 0: counted exactly
    assert max(pl["inherited_disagreement"][1:]) > 0.0  # drift from the changed layers reaches the later routers


def test_attribution_in_the_report_table_and_plot(setup, tmp_path):
    model, windows = setup
    q = copy.deepcopy(model)
    _perturb_attention(q, layer=0)
    metrics = evaluate(model, {"q": q}, windows, batch_size=4, progress=False, attribution=True)
    report = build_report(metrics, "fp", "t.txt", windows.numel())
    write_report(report, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())["models"]["q"]["per_layer"]
    assert len(data["local_disagreement"]) == len(data["inherited_disagreement"]) == 2
    md = (tmp_path / "report.md").read_text()
    loc, inh = data["local_disagreement"][0], data["inherited_disagreement"][0]
    assert f"| q | {100 * loc:.2f} / {100 * inh:.2f} %" in md
    plain = build_report(evaluate(model, {"q": q}, windows, progress=False), "fp", "t.txt", windows.numel())
    assert "local_disagreement" not in plain["models"]["q"]["per_layer"] and "inherited" not in markdown_table(plain)


def test_component_groups_cover_every_module_and_are_put_back():
    """Every quantized kind of a DeepSeek-V3 model (MLA attention, routers, routed and shared experts, the dense
    MLP) is in a group: a model whose weights all differ from the reference gives the reference's logits exactly
    with every group put back, and its own again afterwards; perturbing one group only, that group's share is 1
    and the others' 0."""
    from vsraq_plugin.evaluation import _reference_modules, component_attribution, component_groups
    from vsraq_plugin.models import get_adapter

    ref = tiny_model("deepseek_v3")
    other = copy.deepcopy(ref)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name.startswith("model.layers.") and "norm" not in name:
                p.add_(0.05 * torch.randn_like(p))
    groups = component_groups(get_adapter(ref), ref)
    assert list(groups) == ["attention", "dense MLPs", "routers", "routed experts", "shared experts"]
    ids = torch.randint(0, ref.config.vocab_size, (2, 24))
    with torch.no_grad():
        own, target = other(input_ids=ids).logits, ref(input_ids=ids).logits
        with _reference_modules(other, ref, [p for paths in groups.values() for p in paths]):
            assert torch.equal(other(input_ids=ids).logits, target)
        assert torch.equal(other(input_ids=ids).logits, own)
    one = copy.deepcopy(ref)
    with torch.no_grad():
        one.model.layers[0].self_attn.o_proj.weight.mul_(-3.0)
    comps = component_attribution(ref, one, ids, batch_size=2, progress=False)
    assert comps["attention"]["disagreement_share"] == 1.0 and comps["attention"]["topk_set_agreement"] == 1.0
    assert all(comps[k]["disagreement_share"] == 0.0 for k in comps if k != "attention")


# ---------------------------------------------------------------------------------------------- write sources
def test_logit_error_sources_match_autograd_jvps():
    """The linearised router-logit error and every source's term, against jvps of the router-through-its-norm map
    taken by autograd (an independent derivative), and the linearisation against the exact difference."""
    from vsraq_plugin.evaluation import logit_error_sources

    g = torch.Generator().manual_seed(3)
    T, d, E, eps = 40, 16, 6, 1e-6
    h = 3.0 * torch.randn(T, d, generator=g, dtype=torch.float64)
    gamma = 1.0 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    R = torch.randn(E, d, generator=g, dtype=torch.float64)
    Rq = R + 0.01 * torch.randn(E, d, generator=g, dtype=torch.float64)
    deltas = {f"s{i}": 1e-4 * torch.randn(T, d, generator=g, dtype=torch.float64) for i in range(3)}

    def norm(x):
        return gamma * x * (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt()

    x_q = norm(h + sum(deltas.values()))
    e, terms = logit_error_sources(h, deltas, x_q, R, Rq, gamma, eps)
    parts = {n: torch.func.jvp(lambda x: norm(x) @ R.T, (h,), (dh,))[1] for n, dh in deltas.items()}
    parts["router"] = x_q @ (Rq - R).T
    torch.testing.assert_close(e, sum(parts.values()), rtol=1e-10, atol=1e-14)
    for n, p in parts.items():
        assert terms[n] == pytest.approx(float((p * e).sum()), rel=1e-9, abs=1e-18), n
    assert sum(terms.values()) == pytest.approx(float(e.pow(2).sum()), rel=1e-9)  # the shares add up to one
    exact = x_q @ Rq.T - norm(h) @ R.T
    assert float((exact - e).norm() / exact.norm()) < 1e-3  # second order in the 1e-4 writes


def _sourced(reference, model, windows) -> dict:
    return evaluate(reference, {"q": model}, windows, batch_size=4, progress=False, write_sources=True)["q"][
        "per_layer"
    ]


def test_write_sources_name_the_changed_write_and_nothing_before_it():
    """Three MoE layers, only layer 1's attention changed: routers 0 has no error; router 1's error is all layer 1's
    attention (every other write is bit-identical, so their terms are exactly 0); router 2's comes from layer 1's
    attention and what it moved after it (layer 1's MLP, layer 2's attention), never from before layer 1."""
    ref = _three_layer_mixtral(seed=3)
    windows = torch.randint(0, ref.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(2))
    q = copy.deepcopy(ref)
    _perturb_attention(q, layer=1, scale=0.02)
    pl = _sourced(ref, q, windows)
    src, fit = pl["write_sources"], pl["write_sources_fit"]
    assert src[0] == {} and fit[0] is None
    assert src[1]["layer 1 attention"] == pytest.approx(1.0, abs=1e-12)
    assert all(v == 0.0 for n, v in src[1].items() if n != "layer 1 attention")
    for n in ("embeddings", "layer 0 attention", "layer 0 mlp", "router"):
        assert src[2][n] == 0.0, n
    assert sum(src[2].values()) == pytest.approx(1.0, abs=1e-6)
    assert src[2]["layer 1 attention"] > 0.1 and src[2]["layer 1 mlp"] != 0.0 and src[2]["layer 2 attention"] != 0.0
    assert fit[1] > 0.99 and fit[2] > 0.95  # small writes: the linearisation explains nearly all of the error


def test_write_sources_a_changed_router_is_its_own_source_exactly():
    ref = _three_layer_mixtral(seed=4)
    windows = torch.randint(0, ref.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(3))
    q = copy.deepcopy(ref)
    with torch.no_grad():
        q.model.layers[2].mlp.gate.weight.mul_(1.1)  # a re-fitted router: its input is unchanged
    pl = _sourced(ref, q, windows)
    assert pl["write_sources"][0] == {} and pl["write_sources"][1] == {}
    assert pl["write_sources"][2]["router"] == pytest.approx(1.0, abs=1e-12)
    assert pl["write_sources_fit"][2] == pytest.approx(1.0, abs=1e-6)  # the router term is exact, not linearised


def test_write_sources_on_deepseek_dense_first_layer_and_in_the_report(tmp_path):
    """DeepSeek-V3 (dense layer 0, MLA, shared experts): a change of the dense MLP reaches the first router (MoE slot 0,
    decoder layer 1) as the source "layer 0 mlp"; the table of report.md lists it."""
    ref = tiny_model("deepseek_v3", seed=2)
    windows = torch.randint(0, ref.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(4))
    q = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for lin in q.model.layers[0].mlp.modules():
            if isinstance(lin, torch.nn.Linear):
                lin.weight.add_(0.02 * lin.weight.std() * torch.randn(lin.weight.shape, generator=gen))
    metrics = evaluate(ref, {"q": q}, windows, batch_size=4, progress=False, write_sources=True)
    pl = metrics["q"]["per_layer"]
    first = pl["write_sources"][0]
    assert set(first) == {"router", "embeddings", "layer 0 attention", "layer 0 mlp", "layer 1 attention"}
    assert first["embeddings"] == first["layer 0 attention"] == first["router"] == 0.0
    assert first["layer 0 mlp"] > 0.5 and sum(first.values()) == pytest.approx(1.0, abs=1e-6)
    assert pl["write_sources_fit"][0] > 0.95
    report = build_report(metrics, "fp", "t.txt", windows.numel())
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    rms = pl["router_logit_error_rms"][0]
    assert (
        f"| q | 0 | {rms:.4f} | {pl['write_sources_fit'][0]:.3f} | layer 0 mlp {100 * first['layer 0 mlp']:.0f} %" in md
    )
    from vsraq_plugin.models import get_adapter, record_router_logits

    adapter = get_adapter(ref)  # the rms against the two models' router logits, recorded directly
    with (
        torch.no_grad(),
        record_router_logits(adapter.moe_layers(ref)) as zr,
        record_router_logits(adapter.moe_layers(q)) as zq,
    ):
        ref(input_ids=windows, use_cache=False)
        q(input_ids=windows, use_cache=False)
    assert rms == pytest.approx(float((zq[0][0] - zr[0][0]).pow(2).mean().sqrt()), rel=1e-4)
    plain = build_report(evaluate(ref, {"q": q}, windows, progress=False), "fp", "t.txt", windows.numel())
    assert "write_sources" not in plain["models"]["q"]["per_layer"] and "by its source" not in markdown_table(plain)
