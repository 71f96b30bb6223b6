"""Tiny random-weight models of every supported family, built from their transformers-5 configs."""

from __future__ import annotations

import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "mixtral":
        cfg = MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2)
        model = MixtralForCausalLM(cfg)
    elif family == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            **COMMON,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        )
        model = Qwen2MoeForCausalLM(cfg)
    elif family == "qwen3_moe":
        cfg = Qwen3MoeConfig(
            **COMMON,
            head_dim=16,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        )
        model = Qwen3MoeForCausalLM(cfg)
    elif family == "olmoe":
        cfg = OlmoeConfig(**COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2)
        model = OlmoeForCausalLM(cfg)
    elif family == "deepseek_v3":
        cfg = DeepseekV3Config(
            **{**COMMON, "num_hidden_layers": 3},
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        )
        model = DeepseekV3ForCausalLM(cfg)
        # Random init leaves the routers at zero; give them (and the correction bias) real values.
        for layer in model.model.layers[1:]:
            torch.nn.init.normal_(layer.mlp.gate.weight, std=0.2)
            layer.mlp.gate.e_score_correction_bias.normal_(std=0.05)
    elif family == "llama":
        cfg = LlamaConfig(**COMMON, intermediate_size=96)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(family)
    for module in model.modules():  # routers of several families start at exactly zero
        if (
            hasattr(module, "weight")
            and module.__class__.__name__.endswith("Router")
            and module.weight.abs().max() == 0
        ):
            torch.nn.init.normal_(module.weight, std=0.2)
    return model.float().eval()


MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
