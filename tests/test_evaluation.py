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
