"""The trained benchmark fixtures (``benchmarks/fixtures/tiny-*``): shapes the quantizer relies on, the shared
vocabulary, live experts, and the plugin's routing rule against each model's own router on real activations."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from vsraq_plugin.cli import fixture_path
from vsraq_plugin.models import get_adapter
from vsraq_plugin.routing import topk_set_agreement

ROOT = Path(__file__).resolve().parents[1] / "benchmarks" / "fixtures"
FIXTURES = {"tiny-qwen3-moe": ("qwen3_moe", range(6)), "tiny-deepseek-v3": ("deepseek_v3", range(1, 6))}


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def fixture(request):
    path = ROOT / request.param
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"{path} not present")
    return request.param, path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_shapes_tokenizer_and_load(fixture):
    name, path, model = fixture
    family, moe = FIXTURES[name]
    adapter = get_adapter(model)
    assert adapter.family == family
    assert [m.index for m in adapter.moe_layers(model)] == list(moe)
    assert adapter.num_experts() == 32 and model.config.num_experts_per_tok == 8 and model.config.norm_topk_prob
    assert model.config.tie_word_embeddings and model.config.vocab_size == 4096
    # Group size 64: every linear the quantizer solves reads a multiple of 64 inputs.
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod_name != "lm_head":
            assert mod.in_features % 64 == 0, mod_name
    for m in adapter.moe_layers(model):
        assert all(w.shape[-1] % 64 == 0 for w in adapter.expert_weights(m.experts).values())
    for f in ("tokenizer.json", "tokenizer_config.json"):  # one vocabulary for every fixture
        assert (path / f).read_bytes() == (fixture_path() / f).read_bytes()
    assert (path / "model.safetensors").stat().st_size < 12_000_000
    report = json.loads((path / "train_report.json").read_text())
    assert report["moe_layers"] == list(moe)
    assert min(report["min_expert_load_per_layer"]) > 0.25 / 32  # no dead experts: > 1/4 of uniform share


def test_plugin_routing_equals_the_models_router_on_real_text(fixture):
    """The adapter's rule (for DeepSeek-V3: sigmoid + trained correction bias + group limit) reproduces each
    trained router's own top-k on the model's real hidden states."""
    name, path, model = fixture
    adapter = get_adapter(model)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok((path / "eval.txt").read_text(encoding="utf-8")[:4000], return_tensors="pt")["input_ids"][:, :256]
    seen = {}
    handles = [
        m.router.register_forward_hook(lambda _m, _i, out, i=m.index: seen.__setitem__(i, out))
        for m in adapter.moe_layers(model)
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    for m in adapter.moe_layers(model):
        logits, _weights, indices = seen[m.index]
        ours = adapter.route(logits, m.router)
        assert topk_set_agreement(indices, ours.indices, adapter.num_experts()).all(), m.index
    if name == "tiny-deepseek-v3":  # the trained bias is real (not zero), and stored in float32 with the router
        bias = adapter.moe_layers(model)[0].router.e_score_correction_bias
        assert bias.abs().max() > 1e-3
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            names = [k for k in f.keys() if k.endswith(("gate.weight", "correction_bias"))]  # noqa: SIM118
            stored = {k: f.get_slice(k).get_dtype() for k in names}
        assert len(stored) == 10 and set(stored.values()) == {"F32"}
