"""GPTQ ``dynamic`` per-module overrides (as gptqmodel reads them): bits / group size per attention, dense-MLP and
shared-expert linear, and ``-:`` patterns that leave a linear unquantized, through the solve, the checkpoint and
the loaders."""

import copy
import json
import re

import pytest
import torch

from tiny_models import tiny_model
from vsraq_plugin.checkpoint import load_checkpoint, save_checkpoint
from vsraq_plugin.config import ConfigError, QuantConfig, dynamic_override
from vsraq_plugin.nn import QuantLinear
from vsraq_plugin.pipeline import quantize_model

Q_A = "model.layers.0.self_attn.q_a_proj"  # MLA's first stage: it reads the embeddings, whatever else is quantized
KV_A = "model.layers.0.self_attn.kv_a_proj_with_mqa"
O_1 = "model.layers.1.self_attn.o_proj"
DYNAMIC = {
    r"+:.*\.layers\.0\.self_attn\.q_a_proj$": {"bits": 8, "group_size": 32},
    r"-:.*\.layers\.1\.self_attn\.o_proj$": {},
    r"+:.*\.layers\.1\.self_attn\..*": {"bits": 3},  # after the "-:" rule: o_proj stays unquantized
}


def test_the_first_matching_pattern_decides_anchored_at_the_start():
    dyn = {r"-:.*\.0\.mlp\..*": {}, r"+:.*\.mlp\..*": {"bits": 8}, r"self_attn": {"bits": 2}}
    assert dynamic_override(dyn, "model.layers.0.mlp.down_proj") is False
    assert dynamic_override(dyn, "model.layers.1.mlp.down_proj") == {"bits": 8}
    # re.match, as gptqmodel: a bare "self_attn" does not match a name that does not start with it
    assert dynamic_override(dyn, "model.layers.1.self_attn.q_proj") is None
    assert dynamic_override(dyn, "self_attn.q_proj") == {"bits": 2}
    # any of a module's names (the model's, then the checkpoint's) may match
    assert dynamic_override({r"+:.*block_sparse_moe\.": {"bits": 3}}, "m.mlp.x", "m.block_sparse_moe.x") == {"bits": 3}
    assert dynamic_override(None, "anything") is None


@pytest.mark.parametrize(
    "dynamic, match",
    [
        ({"+:(": {"bits": 8}}, "regular expression"),
        ({".*q_proj": {"desc_act": True}}, "may set"),
        ({".*q_proj": {"bits": 5}}, "not supported"),
        ({".*q_proj": {"group_size": 0}}, "group_size"),
        ({".*q_proj": 8}, "dict"),
    ],
)
def test_bad_overrides_are_refused_with_the_fix(dynamic, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(dynamic=dynamic)


@pytest.mark.parametrize(
    "dynamic, extra, match",
    [
        ({r"-:.*\.experts\.3\..*": {}}, {}, "leaves it unquantized"),
        ({r".*\.experts\.3\..*": {"bits": 8, "group_size": 32}}, {}, "group_size"),
        ({r".*\.experts\.3\.down_proj$": {"bits": 8}}, {}, "would get"),
        ({r".*\.experts\.3\..*": {"bits": 8}}, {"bits_budget": 3.0, "bit_levels": [2, 3, 4]}, "bits_budget"),
        ({r".*\.experts\.3\..*": {"bits": 8}}, {"method": "rtn"}, "not rtn"),
        ({r".*layers\.0\.mlp\.down_proj$": {"group_size": 64}}, {}, "does not divide"),  # down's input: 96
    ],
)
def test_what_dynamic_cannot_do_fails_before_any_work(dynamic, extra, match):
    fp = tiny_model("deepseek_v3")
    windows = torch.randint(0, fp.config.vocab_size, (2, 16))
    with pytest.raises((NotImplementedError, ConfigError), match=match):
        quantize_model(fp, windows, QuantConfig(**{"group_size": 16, "dynamic": dynamic, **extra}), progress=False)


def _run(fp, windows, **kw):
    model = copy.deepcopy(fp)
    res = quantize_model(model, windows, QuantConfig(**{"method": "gptq", "group_size": 16, **kw}), progress=False)
    return model, res


def test_overrides_solve_each_linear_at_its_own_settings_and_load_back(tmp_path):
    """Against independent runs: the overridden linear has the codes of a run that gives every linear its
    settings, the linear beside it (same stage, same inputs) those of the plain run; the ``-:`` linear keeps its
    original weight bit for bit, is written as a 16-bit tensor and loads as a plain linear; the loaded model gives
    the in-memory model's logits exactly."""
    fp = tiny_model("deepseek_v3")
    windows = torch.randint(0, fp.config.vocab_size, (4, 16))
    model, res = _run(fp, windows, dynamic=DYNAMIC)
    _, plain = _run(fp, windows)
    # every linear at 8 bits, groups of 32 (kv_b_proj, 16 inputs wide, cannot take them: left out; it comes after)
    _, wide = _run(fp, windows, bits=8, group_size=32, dynamic={r"-:.*kv_b_proj$": {}})
    for field in ("codes", "scales", "zeros"):
        assert torch.equal(getattr(res.weights[Q_A], field), getattr(wide.weights[Q_A], field))
        assert torch.equal(getattr(res.weights[KV_A], field), getattr(plain.weights[KV_A], field))
    assert res.weights[Q_A].bits == 8 and res.weights[Q_A].scales.shape[-1] == 64 // 32
    assert res.weights["model.layers.1.self_attn.q_a_proj"].bits == 3
    assert O_1 not in res.weights
    o_fp, o_q = fp.get_submodule(O_1).weight, model.get_submodule(O_1).weight
    assert torch.equal(o_q, o_fp)

    out = save_checkpoint(model, res, tmp_path / "q")
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    assert torch.equal(tensors[f"{O_1}.weight"], o_fp) and f"{O_1}.qweight" not in tensors
    assert tensors[f"{Q_A}.qweight"].shape[0] == 64 * 8 // 32  # 8-bit rows packed into int32
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    # one exact pattern per module the rules changed (config.json's keys are sorted: the rules' order is not kept)
    layer1 = [f"model.layers.1.self_attn.{n}" for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")]
    expected = {f"+:^(?:{re.escape(Q_A)})$": {"bits": 8, "group_size": 32}}
    expected |= {f"+:^(?:{re.escape(n)})$": {"bits": 3, "group_size": 16} for n in layer1}
    expected[f"-:^(?:{re.escape(O_1)})$"] = {}
    assert qc["dynamic"] == expected and qc["bits"] == 4
    assert qc["meta"]["vsraq"]["dynamic"] == DYNAMIC
    loaded = load_checkpoint(out)
    assert type(loaded.get_submodule(O_1)) is torch.nn.Linear
    assert isinstance(loaded.get_submodule(Q_A), QuantLinear) and loaded.get_submodule(Q_A).bits == 8
    with torch.no_grad():
        assert torch.equal(model(input_ids=windows).logits, loaded(input_ids=windows).logits)


def test_rtn_honours_overrides_too():
    fp = tiny_model("mixtral")
    windows = torch.randint(0, fp.config.vocab_size, (2, 16))
    model = copy.deepcopy(fp)
    dyn = {r"-:.*\.0\.self_attn\.q_proj$": {}, r".*\.0\.self_attn\.k_proj$": {"bits": 8}}
    res = quantize_model(model, windows, QuantConfig(method="rtn", group_size=16, dynamic=dyn), progress=False)
    assert "model.layers.0.self_attn.q_proj" not in res.weights
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, fp.model.layers[0].self_attn.q_proj.weight)
    assert res.weights["model.layers.0.self_attn.k_proj"].bits == 8
    assert res.weights["model.layers.0.self_attn.v_proj"].bits == 4


def test_cli_dynamic_from_a_file_streams_the_same_checkpoint_as_the_api(tmp_path):
    """``vsraq quantize --dynamic FILE`` (the streamed writer): the API's checkpoint tensor for tensor, the ``-:``
    linear stored as its source weight; a bad ``--dynamic`` is a CLIError that shows the form."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from vsraq_plugin.calibration import calibration_windows
    from vsraq_plugin.cli import CLIError, _dynamic_arg, fixture_path, main
    from vsraq_plugin.pipeline import quantize_folder

    tok = AutoTokenizer.from_pretrained(fixture_path())
    fp = tiny_model("deepseek_v3", seed=1)
    fp.resize_token_embeddings(len(tok))
    fp.save_pretrained(tmp_path / "fp")
    tok.save_pretrained(tmp_path / "fp")
    (tmp_path / "calib.txt").write_text((fixture_path() / "calib.txt").read_text()[:20000])
    (tmp_path / "dyn.json").write_text(json.dumps(DYNAMIC))
    args = ["--method", "gptq", "--group-size", "16", "--n-samples", "4", "--seq-len", "32", "--batch-size", "2"]
    rc = main(["quantize", str(tmp_path / "fp"), "--calib", str(tmp_path / "calib.txt"), *args, "--threads", "1",
               "--dynamic", str(tmp_path / "dyn.json"), "--out", str(tmp_path / "cli")])  # fmt: skip
    assert rc == 0
    windows = calibration_windows(tok, tmp_path / "calib.txt", 32, 4, exact=True)
    cfg = QuantConfig(method="gptq", group_size=16, dynamic=DYNAMIC, device="cpu")
    quantize_folder(tmp_path / "fp", windows, cfg, tmp_path / "api", tokenizer=tok, batch_size=2, progress=False)
    cli, api = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("cli", "api"))
    assert sorted(cli) == sorted(api) and all(torch.equal(cli[k], api[k]) for k in cli)
    assert f"{O_1}.qweight" not in cli and torch.equal(cli[f"{O_1}.weight"], fp.get_submodule(O_1).weight)
    qc = [json.loads((tmp_path / n / "config.json").read_text())["quantization_config"] for n in ("cli", "api")]
    assert qc[0]["dynamic"] == qc[1]["dynamic"] and len(qc[0]["dynamic"]) == 6
    assert type(load_checkpoint(tmp_path / "cli").get_submodule(O_1)) is torch.nn.Linear
    assert _dynamic_arg('{"+:.*q_proj$": {"bits": 8}}') == {"+:.*q_proj$": {"bits": 8}}
    with pytest.raises(CLIError, match="JSON object"):
        _dynamic_arg("{not json")
    with pytest.raises(CLIError, match="JSON object"):
        _dynamic_arg('["+:.*q_proj$"]')


def test_routed_experts_widths_by_dynamic_equal_the_same_widths_given_directly(tmp_path):
    """Whole routed experts at another width through ``dynamic``: the codes of the run that gives the same widths
    as ``expert_bits``; the checkpoint names each expert's width and loads back with the in-memory logits."""
    from vsraq_plugin.nn import QuantExperts

    fp = tiny_model("qwen2_moe")
    windows = torch.randint(0, fp.config.vocab_size, (4, 16))
    dyn = {r"+:.*\.layers\.1\.mlp\.experts\.(2|5)\..*": {"bits": 8}, r"+:.*\.layers\.0\.mlp\.experts\.0\.": {"bits": 2}}
    model, res = _run(fp, windows, method="vsraq", dynamic=dyn)
    given = {0: torch.tensor([2, 4, 4, 4, 4, 4, 4, 4]), 1: torch.tensor([4, 4, 8, 4, 4, 8, 4, 4])}
    ref = copy.deepcopy(fp)
    want = quantize_model(ref, windows, QuantConfig(method="vsraq", group_size=16), progress=False, expert_bits=given)
    assert res.summary["expert_bits"] == {i: w.tolist() for i, w in given.items()}
    for name, qw in want.weights.items():
        assert torch.equal(res.weights[name].codes, qw.codes), name
    out = save_checkpoint(model, res, tmp_path / "q")
    loaded = load_checkpoint(out)
    widths = [m.expert_bits for m in loaded.modules() if isinstance(m, QuantExperts)]
    assert widths == [given[0].tolist(), given[1].tolist()]
    with torch.no_grad():
        assert torch.equal(model(input_ids=windows).logits, loaded(input_ids=windows).logits)
    with pytest.raises(NotImplementedError, match="one way"):
        quantize_model(copy.deepcopy(fp), windows, QuantConfig(group_size=16, dynamic=dyn), progress=False,
                       expert_bits=given)  # fmt: skip
