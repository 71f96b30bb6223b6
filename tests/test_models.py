import pytest
import torch
from transformers import GptOssConfig

from tiny_models import MOE_FAMILIES, tiny_model
from vsraq_plugin.models import ADAPTERS, UnsupportedModelError, get_adapter
from vsraq_plugin.routing import topk_set_agreement


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_adapter_top_k_equals_the_models_own_routing(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    assert adapter.family == family
    layers = adapter.moe_layers(model)
    assert layers, "every tiny model has MoE layers"
    E = adapter.num_experts()
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        x = torch.randn(512, model.config.hidden_size, generator=g)
        logits, weights, indices = layer.router(x)
        ours = adapter.route(logits, layer.router)
        assert topk_set_agreement(indices, ours.indices, E).all()
        # Combine weights equal the model's, matched per expert (the model may not sort its top-k).
        order_model = indices.argsort(-1)
        order_ours = ours.indices.argsort(-1)
        torch.testing.assert_close(
            weights.float().gather(1, order_model), ours.weights.gather(1, order_ours), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_views_are_the_fused_weights(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    layer = adapter.moe_layers(model)[0]
    views = adapter.expert_weights(layer.experts)
    E, inter = adapter.num_experts(), layer.experts.down_proj.shape[-1]
    assert views["gate_proj"].shape == (E, inter, model.config.hidden_size)
    assert views["down_proj"].shape == (E, model.config.hidden_size, inter)
    # Views, not copies: recompute expert 1's output from them and from the module's own forward.
    x = torch.randn(5, model.config.hidden_size)
    act = layer.experts.act_fn
    ref = (act(x @ views["gate_proj"][1].T) * (x @ views["up_proj"][1].T)) @ views["down_proj"][1].T
    idx = torch.ones(5, 1, dtype=torch.long)
    out = layer.experts(x, idx, torch.ones(5, 1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_shared_experts_and_dense_layers_found():
    qwen2 = tiny_model("qwen2_moe")
    a = get_adapter(qwen2)
    layer = a.moe_layers(qwen2)[0]
    assert layer.shared_experts is qwen2.model.layers[0].mlp.shared_expert
    assert layer.shared_expert_gate is qwen2.model.layers[0].mlp.shared_expert_gate
    assert set(a.dense_mlp_linears(layer)) == {
        "mlp.shared_expert.gate_proj",
        "mlp.shared_expert.up_proj",
        "mlp.shared_expert.down_proj",
    }
    ds = tiny_model("deepseek_v3")
    a = get_adapter(ds)
    layers = a.layers(ds)
    assert [lay.is_moe for lay in layers] == [False, True, True]  # first_k_dense_replace=1
    assert "self_attn.kv_a_proj_with_mqa" in a.attention_linears(layers[1])


def test_checkpoint_key_names_follow_each_family():
    assert get_adapter(tiny_model("mixtral")).expert_key(3, 5, "down_proj") == (
        "model.layers.3.block_sparse_moe.experts.5.w2"
    )
    assert get_adapter(tiny_model("mixtral")).expert_key(0, 0, "up_proj").endswith("experts.0.w3")
    assert get_adapter(tiny_model("olmoe")).expert_key(1, 2, "gate_proj") == "model.layers.1.mlp.experts.2.gate_proj"


def test_dense_model_is_accepted_without_routers():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    assert adapter.moe_layers(model) == []
    assert len(adapter.layers(model)) == 2


def test_unknown_moe_family_lists_supported_ones():
    cfg = GptOssConfig(num_local_experts=4, num_experts_per_tok=2, hidden_size=64, num_hidden_layers=1)
    with pytest.raises(UnsupportedModelError, match=r"gpt_oss.*supported MoE families.*mixtral"):
        get_adapter(cfg)
    assert set(ADAPTERS) == set(MOE_FAMILIES)
