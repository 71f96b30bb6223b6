"""The optimum / transformers entry points against the native API: same checkpoint tensors bit for bit, same
config, reload through ``from_pretrained`` equal to the plugin's loader, and clear errors where stock
transformers would load random or unquantized experts."""

import json

import pytest
import torch
from safetensors.torch import load_file

import vsraq_plugin
from tiny_models import tiny_model
from vsraq_plugin.api import config_from_gptq
from vsraq_plugin.checkpoint import CheckpointError, _TensorSource
from vsraq_plugin.cli import fixture_path

TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families. " * 3,
    "The sea was calm that morning, and the boats went out before the sun had cleared the hills. " * 6,
]
SEQ, BATCH = 64, 4


@pytest.fixture(scope="module", params=["fixture", "mixtral", "qwen2_moe"])
def model_dir(request, tmp_path_factory):
    """The shipped trained fixture, and tiny random MoEs (Mixtral; Qwen2-MoE: shared expert, attention biases)
    saved with the fixture's tokenizer."""
    from transformers import AutoTokenizer

    if request.param == "fixture":
        return fixture_path()
    root = tmp_path_factory.mktemp(request.param)
    tok = AutoTokenizer.from_pretrained(fixture_path())
    model = tiny_model(request.param, seed=3)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(root / "fp")
    tok.save_pretrained(root / "fp")
    return root / "fp"


def _native(model_dir, out, dtype="auto", **gptq_fields):
    """The reference: vsraq_plugin.quantize with the translated config, on the model loaded in ``dtype`` (``auto``:
    its stored dtype, as ``from_pretrained`` loads it by default; the fixture's is bf16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config_from_gptq(gptq_fields, gptq_fields.pop("knobs", None))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(model_dir)
    vsraq_plugin.quantize(model, TEXTS, cfg, out=out, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, progress=False)
    return out


def _same_checkpoint(a, b):
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    qa = json.loads((a / "config.json").read_text())["quantization_config"]
    qb = json.loads((b / "config.json").read_text())["quantization_config"]
    assert qa == qb


def _logits(model, n=32):
    ids = (torch.arange(n) * 7 % 200 + 3)[None]
    with torch.no_grad():
        return model(ids).logits.float()


def test_transformers_gptqconfig_quantizer_vsraq_equals_native(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = GPTQConfig(
        bits=4, group_size=32, dataset=TEXTS, tokenizer=tok, quantizer="vsraq", model_seqlen=SEQ, batch_size=BATCH
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg)
    stored = json.loads((model_dir / "config.json").read_text()).get("dtype", "float32")
    assert model.dtype == getattr(torch, stored)  # quantized in its own dtype, never cast whole to float32
    model.save_pretrained(tmp_path / "hf")
    native = _native(model_dir, tmp_path / "native", bits=4, group_size=32, damp_percent=cfg.damp_percent)
    _same_checkpoint(tmp_path / "hf", native)
    # from_pretrained of the checkpoint rebuilds the quantized experts: equal to the plugin's loader and to the
    # in-memory quantized model, bit for bit.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(reloaded.model.layers[0].mlp.experts).__name__ == "QuantExperts"
    ref = vsraq_plugin.load(native, dtype="auto")
    assert torch.equal(_logits(reloaded), _logits(ref))
    assert torch.equal(_logits(model), _logits(ref))
    # A loaded checkpoint re-saves as it came.
    reloaded.save_pretrained(tmp_path / "resaved")
    _same_checkpoint(tmp_path / "resaved", native)


def test_optimum_quantizer_vsraq_equals_native(model_dir, tmp_path):
    from optimum.gptq import GPTQQuantizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    q = GPTQQuantizer(bits=3, group_size=32, dataset=TEXTS, quantizer="vsraq", model_seqlen=SEQ, batch_size=BATCH)
    assert isinstance(q, GPTQQuantizer) and type(q).__name__ == "VsraqGPTQQuantizer"
    again = GPTQQuantizer.from_dict(q.to_dict())
    assert type(again) is type(q) and again.to_dict() == q.to_dict() and again.to_dict()["quantizer"] == "vsraq"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    q.save(q.quantize_model(model, AutoTokenizer.from_pretrained(model_dir)), str(tmp_path / "opt"))
    native = _native(model_dir, tmp_path / "native", torch.float32, bits=3, group_size=32, damp_percent=0.1)
    _same_checkpoint(tmp_path / "opt", native)


def test_registered_vsraq_method_with_knobs_equals_native(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vsraq_plugin.integrations.transformers import VsraqConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    knobs = {"lambda_value": 2.0, "reweight_rounds": 1}
    cfg = VsraqConfig(bits=4, group_size=32, dataset=TEXTS, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, **knobs)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg)
    model.save_pretrained(tmp_path / "hf")
    native = _native(model_dir, tmp_path / "native", bits=4, group_size=32, knobs=knobs)
    _same_checkpoint(tmp_path / "hf", native)
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "gptq" and saved["meta"]["vsraq"]["lambda_value"] == 2.0


def test_gptqconfig_keeps_quantizer_and_rejects_unknown():
    from transformers import GPTQConfig

    from vsraq_plugin.integrations import install
    from vsraq_plugin.integrations.transformers import _wants_plugin

    assert install() == {"transformers": "installed", "optimum": "installed"}  # idempotent: a second install
    cfg = GPTQConfig(bits=4, quantizer="vsraq", vsraq={"lambda_value": 0.5})
    back = GPTQConfig.from_dict(cfg.to_dict())
    assert back.quantizer == "vsraq" and back.vsraq == {"lambda_value": 0.5}
    assert _wants_plugin(back, {"pre_quantized": False})
    assert not _wants_plugin(GPTQConfig(bits=4), {"pre_quantized": False})  # stock GPTQ stays stock
    assert "quantizer" not in GPTQConfig(bits=4).to_dict()
    with pytest.raises(ValueError, match="quantizer='awq' is unknown"):
        GPTQConfig(bits=4, quantizer="awq")
    with pytest.raises(ValueError, match="lambda_valu"):
        GPTQConfig(bits=4, quantizer="vsraq", vsraq={"lambda_valu": 1.0})


def test_unsupported_moe_gptq_checkpoint_is_an_error_not_random_experts(tmp_path):
    from transformers import AutoModelForCausalLM, PhimoeConfig

    cfg = PhimoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    cfg.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no adapter for"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_unquantized_fused_experts_get_a_fix_it_message():
    source = _TensorSource({"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(1)}, "ckpt")
    with pytest.raises(CheckpointError, match="experts are stored unquantized"):
        source.take("model.layers.0.block_sparse_moe.experts.0.w1.qweight")


def test_transformers_key_layout_loads_to_the_same_model(model_dir, tmp_path):
    """``key_layout="transformers"`` (what gptqmodel 7 reads) holds the same tensors under other names, with the
    mixed-precision ``dynamic`` block renamed alike: both layouts load to the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vsraq_plugin.checkpoint import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = config_from_gptq({"bits": 4, "group_size": 32}, {"bits_budget": 3.0, "bit_levels": [2, 4]})
    tok = AutoTokenizer.from_pretrained(model_dir)
    _, result = vsraq_plugin.quantize(model, TEXTS, cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, progress=False)
    a = save_checkpoint(model, result, tmp_path / "orig")
    b = save_checkpoint(model, result, tmp_path / "tf", key_layout="transformers")
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert len(ta) == len(tb) and any(".mlp.experts.0.gate_proj.qweight" in k for k in tb)
    dyn = json.loads((b / "config.json").read_text())["quantization_config"]["dynamic"]
    assert dyn and all(".mlp\\.experts\\." in k for k in dyn)
    la = _logits(vsraq_plugin.load(a))
    assert torch.equal(la, _logits(vsraq_plugin.load(b)))
    assert torch.equal(la, _logits(AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32)))
    assert torch.equal(la, _logits(model))


def test_experts_implementation_vsraq(model_dir, tmp_path):
    """``experts_implementation="vsraq"`` is registered: on a quantized checkpoint it runs QuantExperts (here on
    the CPU, the dequantized loop: equal to eager bit for bit); on an unquantized model, the family's loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vsraq_plugin.checkpoint import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    fp_eager = _logits(model)
    model.set_experts_implementation("vsraq")
    assert torch.equal(_logits(model), fp_eager)
    cfg = config_from_gptq({"bits": 4, "group_size": 32})
    tok = AutoTokenizer.from_pretrained(model_dir)
    _, result = vsraq_plugin.quantize(model, TEXTS, cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, progress=False)
    ckpt = save_checkpoint(model, result, tmp_path / "q")
    eager = AutoModelForCausalLM.from_pretrained(ckpt, experts_implementation="eager")
    fast = AutoModelForCausalLM.from_pretrained(ckpt, experts_implementation="vsraq")
    assert fast.config._experts_implementation == "vsraq"
    assert torch.equal(_logits(fast), _logits(eager))


def test_autoround_mixed_names_load(model_dir, tmp_path):
    """AutoRound writes Mixtral experts as ``block_sparse_moe.experts.{e}.gate_proj`` (original block name,
    transformers-5 projection names): the loader reads that layout too."""
    import json as _json
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vsraq_plugin.checkpoint import save_checkpoint

    if _json.loads((model_dir / "config.json").read_text())["model_type"] != "mixtral":
        pytest.skip("the mixed layout is Mixtral's")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = config_from_gptq({"bits": 4, "group_size": 32}, {"fp_target_alpha": 0.0, "lambda_metric_v": 0.0})
    tok = AutoTokenizer.from_pretrained(model_dir)
    _, result = vsraq_plugin.quantize(model, TEXTS, cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, progress=False)
    src = save_checkpoint(model, result, tmp_path / "tf", key_layout="transformers")
    mixed = tmp_path / "mixed"
    shutil.copytree(src, mixed)
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {k.replace(".mlp.experts.", ".block_sparse_moe.experts."): v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(mixed / "model.safetensors"), metadata={"format": "pt"})
    assert torch.equal(_logits(vsraq_plugin.load(mixed)), _logits(model))


def test_dynamic_overrides_through_transformers_equal_native_and_load_back(model_dir, tmp_path):
    """``dynamic`` as a knob of the registered config: the same checkpoint as the plugin's own run; transformers'
    from_pretrained of it rebuilds the 8-bit linear as such and leaves the ``-:`` linear a 16-bit one, with the
    plugin loader's logits bit for bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vsraq_plugin.integrations.transformers import VsraqConfig
    from vsraq_plugin.nn import QuantLinear

    tok = AutoTokenizer.from_pretrained(model_dir)
    knobs = {"dynamic": {r"-:.*\.layers\.0\.self_attn\.o_proj$": {}, r"+:.*\.self_attn\.q_proj$": {"bits": 8}}}
    cfg = VsraqConfig(bits=4, group_size=32, dataset=TEXTS, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, **knobs)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg)
    model.save_pretrained(tmp_path / "hf")
    native = _native(model_dir, tmp_path / "native", bits=4, group_size=32, knobs=knobs)
    _same_checkpoint(tmp_path / "hf", native)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    attn0 = reloaded.model.layers[0].self_attn
    assert type(attn0.o_proj) is torch.nn.Linear and isinstance(attn0.k_proj, QuantLinear)
    assert attn0.q_proj.bits == 8 and attn0.k_proj.bits == 4
    ref = vsraq_plugin.load(native, dtype="auto")
    assert torch.equal(attn0.o_proj.weight, ref.model.layers[0].self_attn.o_proj.weight)
    assert torch.equal(_logits(reloaded), _logits(ref))
