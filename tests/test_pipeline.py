import copy
import json

import pytest
import torch
import torch.nn.functional as F

from tiny_models import MOE_FAMILIES, tiny_model
from vsraq_plugin.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vsraq_plugin.config import QuantConfig
from vsraq_plugin.gptq import HessianAccumulator, gptq_quantize
from vsraq_plugin.models import UnsupportedModelError, get_adapter
from vsraq_plugin.pipeline import CalibrationError, calibration_windows, quantize_model, solve_batch


def _windows(model, n=4, seq=32, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, seq), generator=torch.Generator().manual_seed(seed))


def _one_layer_mixtral():
    model = tiny_model("mixtral", seed=5)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    return model


@pytest.mark.parametrize("method", ["gptq", "agq"])
def test_one_layer_pipeline_equals_engine_by_hand(method):
    """Re-derive every solve of a 1-layer model by hand: capture inputs with plain forwards, build the
    Hessians with an explicit per-expert loop, call the engine, and compare with the pipeline's output."""
    model = _one_layer_mixtral()
    windows = _windows(model)
    cfg = QuantConfig(bits=4, group_size=16, method=method)
    piped = copy.deepcopy(model)
    res = quantize_model(piped, windows, cfg, batch_size=2, progress=False)

    ref = copy.deepcopy(model)
    layer = ref.model.layers[0]
    attn, moe = layer.self_attn, layer.mlp

    def solve(W, H):
        qw, _, _ = gptq_quantize(W, H, 4, 16, True, act_group_aware=True)
        return qw

    def capture(module, fn):
        seen = []
        h = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            for i in range(0, 4, 2):
                fn(windows[i : i + 2])
        h.remove()
        return torch.cat(seen)

    def run(ids):
        ref(input_ids=ids)

    with torch.no_grad():
        x = capture(attn.q_proj, run)
        acc = HessianAccumulator(x.shape[1])
        acc.add(x)
        for name in ("q_proj", "k_proj", "v_proj"):
            lin = getattr(attn, name)
            qw = solve(lin.weight[None].float(), acc.H)
            assert torch.equal(qw.codes, res.weights[f"model.layers.0.self_attn.{name}"].codes), name
            lin.weight.copy_(qw.weight[0])
        x = capture(attn.o_proj, run)
        acc = HessianAccumulator(x.shape[1])
        acc.add(x)
        qw = solve(attn.o_proj.weight[None].float(), acc.H)
        assert torch.equal(qw.codes, res.weights["model.layers.0.self_attn.o_proj"].codes)
        attn.o_proj.weight.copy_(qw.weight[0])

        # Experts: the tokens the (attention-quantized) model routes to each expert, one accumulator each.
        routed = []
        hook = moe.experts.register_forward_pre_hook(lambda m, a: routed.append((a[0].detach(), a[1], a[2])))
        for i in range(0, 4, 2):
            ref(input_ids=windows[i : i + 2])
        hook.remove()
        E, two_i, d = moe.experts.gate_up_proj.shape
        H = torch.zeros(E, d, d)
        for e in range(E):
            acc = HessianAccumulator(d)
            for xb, idx, w in routed:
                tok, slot = (idx == e).nonzero(as_tuple=True)
                acc.add(xb[tok], w[tok, slot].float() if method == "agq" else None)
            H[e] = acc.H[0]
        qw = solve(moe.experts.gate_up_proj.float(), H)
        got = torch.cat(
            [
                res.weights["model.layers.0.mlp.experts.gate_proj"].codes,
                res.weights["model.layers.0.mlp.experts.up_proj"].codes,
            ],
            dim=1,
        )
        same = (qw.codes == got).float().mean().item()
        assert same > 0.999, same  # per-expert loop vs one scatter: equal up to float summation order
        moe.experts.gate_up_proj.copy_(piped.model.layers[0].mlp.experts.gate_up_proj)
        Hd = torch.zeros(E, two_i // 2, two_i // 2)
        for e in range(E):
            acc = HessianAccumulator(two_i // 2)
            for xb, idx, w in routed:
                tok, slot = (idx == e).nonzero(as_tuple=True)
                g, u = F.linear(xb[tok], moe.experts.gate_up_proj[e]).chunk(2, dim=-1)
                acc.add(F.silu(g) * u, w[tok, slot].float() if method == "agq" else None)
            Hd[e] = acc.H[0]
        qw = solve(moe.experts.down_proj.float(), Hd)
        same = (qw.codes == res.weights["model.layers.0.mlp.experts.down_proj"].codes).float().mean().item()
        assert same > 0.999, same


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_family_quantizes_saves_and_reloads(family, tmp_path):
    model = tiny_model(family)
    windows = _windows(model)
    res = quantize_model(
        model, windows, QuantConfig(bits=4, group_size=16, desc_act=True), batch_size=2, progress=False
    )
    adapter = get_adapter(model)
    for layer in adapter.moe_layers(model):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            qw = res.weights[f"model.layers.{layer.index}.mlp.experts.{proj}"]
            assert qw.codes.shape[0] == adapter.num_experts() and torch.isfinite(qw.weight).all()
    out = save_checkpoint(model, res, tmp_path / "q")
    loaded = load_checkpoint(out)
    ids = windows[:2]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    if family == "mixtral":  # HF generation runs through the plugin's modules
        prompt = windows[:1, :5]
        assert torch.equal(
            model.generate(prompt, max_new_tokens=3, do_sample=False),
            loaded.generate(prompt, max_new_tokens=3, do_sample=False),
        )
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["meta"]["quantizer"][0].startswith("vsraq:")


def test_uneven_last_batch_is_handled():
    """5 windows in batches of 2: the last batch has its own mask and position embeddings."""
    model = tiny_model("olmoe", seed=9)
    windows = _windows(model, n=5, seq=16)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = quantize_model(a, windows, QuantConfig(bits=4, group_size=16, method="gptq"), batch_size=2, progress=False)
    rb = quantize_model(b, windows, QuantConfig(bits=4, group_size=16, method="gptq"), batch_size=5, progress=False)
    for name in ra.weights:  # same tokens, other batching: the same Hessians up to summation order
        same = (ra.weights[name].codes == rb.weights[name].codes).float().mean().item()
        assert same > 0.99, name


def test_gptq_beats_rtn_on_a_trained_shape_model():
    """Sanity on the tiny model: GPTQ's output is closer to FP than RTN's at 3 bits."""
    fp = tiny_model("mixtral", seed=7)
    windows = _windows(fp, n=8)
    errs = {}
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(fp)
        quantize_model(m, windows, QuantConfig(bits=3, group_size=16, method=method), progress=False)
        with torch.no_grad():
            errs[method] = (m(input_ids=windows).logits - fp(input_ids=windows).logits).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"]


def test_starved_experts_fall_back_and_are_reported():
    model = tiny_model("mixtral", seed=3)
    cfg = QuantConfig(bits=4, group_size=16, min_expert_tokens=10_000)
    res = quantize_model(model, _windows(model, n=2, seq=8), cfg, progress=False)
    fb = res.summary["fallbacks"]
    assert {f["action"] for f in fb} == {"all-token coverage"}
    assert len(fb) == 2 * 2 * 8  # 2 layers x (gate_up, down) x 8 experts
    assert all(torch.isfinite(qw.weight).all() for qw in res.weights.values())
    W = torch.randn(3, 4, 16)
    H = torch.eye(16).repeat(3, 1, 1)
    H[1] = 0  # an expert no token reached, not even through coverage
    fallbacks = []
    qw = solve_batch(W, H, QuantConfig(bits=4, group_size=16), "x", fallbacks)
    assert fallbacks == [{"target": "x", "index": 1, "action": "rtn", "reason": "no calibration token"}]
    assert torch.isfinite(qw.weight).all()


def test_experts_missing_from_the_first_batch_are_still_solved():
    """One window per batch: some experts receive no token in the first batch, then tokens in later ones. Their
    Hessians must still be theirs (an all-zero start, not NaN), so every expert is GPTQ-solved, none falls back
    to RTN as "no calibration token" (what a NaN start made the pipeline do)."""
    from grid_checks import model_tensor
    from vsraq_plugin.quantizer import rtn

    model = tiny_model("mixtral", seed=3)
    windows = _windows(model, n=8, seq=8)
    first = []
    hook = model.model.layers[0].mlp.experts.register_forward_pre_hook(lambda m, a: first.append(a[1].unique()))
    with torch.no_grad():
        model(input_ids=windows[:1])
    hook.remove()
    assert len(first[0]) < 8  # the case: an expert of layer 0 sees no token in the first batch
    cfg = QuantConfig(bits=4, group_size=16, method="gptq", min_expert_tokens=0)
    res = quantize_model(copy.deepcopy(model), windows, cfg, batch_size=1, progress=False)
    assert res.summary["fallbacks"] == []
    for name, qw in res.weights.items():
        if ".experts." in name:  # GPTQ, not RTN of the original weight, for every expert
            original = model_tensor(model, name)
            for e in range(qw.codes.shape[0]):
                assert not torch.equal(qw.codes[e], rtn(original[e], 4, 16).codes), (name, e)


def test_bad_inputs_give_clear_errors_and_no_partial_output(tmp_path):
    model = tiny_model("mixtral")

    class Tok:
        eos_token_id = 0

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[1, 2, 3] for _ in texts]}

    with pytest.raises(CalibrationError, match="empty"):
        calibration_windows(Tok(), ["", "  "], 16)
    with pytest.raises(CalibrationError, match="fewer than one window"):
        calibration_windows(Tok(), ["a short text"], 256)
    with pytest.raises(CalibrationError, match="does not exist"):
        calibration_windows(Tok(), str(tmp_path / "nope.txt"), 16)
    with pytest.raises(CalibrationError, match="needs calibration windows"):
        quantize_model(copy.deepcopy(model), None, QuantConfig(method="gptq", group_size=16), progress=False)
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        quantize_model(copy.deepcopy(model), _windows(model), QuantConfig(group_size=48), progress=False)
    from transformers import GptOssConfig

    with pytest.raises(UnsupportedModelError, match="supported MoE families"):
        get_adapter(GptOssConfig(num_local_experts=4, num_experts_per_tok=2, hidden_size=64, num_hidden_layers=1))

    res = quantize_model(model, None, QuantConfig(method="rtn", group_size=16), progress=False)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="cannot write"):
        save_checkpoint(model, res, tmp_path / "file.txt" / "q")  # parent is a file: unwritable
    out = save_checkpoint(model, res, tmp_path / "q")
    with pytest.raises(CheckpointError, match="not empty"):
        save_checkpoint(model, res, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "q"]  # no temp folders left

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((out / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(corrupt)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((out / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(pickled)
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_checkpoint(tmp_path)


def test_experts_without_calibration_tokens_get_rtn_of_their_own_weights():
    """With min_expert_tokens=0 no coverage is mixed in: an expert no calibration token reaches has an all-zero
    Hessian, so it falls back to RTN, reported; exactly those experts do (counted independently, by running the
    quantized model: GPTQ leaves the routers alone, so its routing is what each stage saw), and their codes are
    exactly RTN of their original weights (the reference)."""
    from grid_checks import model_tensor
    from vsraq_plugin.quantizer import rtn

    model = tiny_model("mixtral", seed=3)
    original = copy.deepcopy(model)
    windows = _windows(model, n=1, seq=3)
    cfg = QuantConfig(bits=4, group_size=16, method="gptq", min_expert_tokens=0)
    res = quantize_model(model, windows, cfg, progress=False)
    fb = res.summary["fallbacks"]
    assert fb and all(f["action"] == "rtn" and f["reason"] == "no calibration token" for f in fb)
    starved = {(f["target"], f["index"]) for f in fb}

    routed: dict[int, set[int]] = {}
    hooks = [
        layer.mlp.experts.register_forward_pre_hook(lambda m, a, i=i: routed.setdefault(i, set()).update(
            a[1].flatten().tolist()))
        for i, layer in enumerate(model.model.layers)
    ]  # fmt: skip
    with torch.no_grad():
        model(input_ids=windows)
    for h in hooks:
        h.remove()
    expect = {
        (f"model.layers.{i}.mlp.experts.{proj}", e)
        for i in routed
        for proj in ("gate_up_proj", "down_proj")
        for e in range(8)
        if e not in routed[i]
    }
    assert starved == expect and len(expect) < 2 * 2 * 8  # some experts starved, some not
    for name, qw in res.weights.items():
        if ".experts." not in name:
            continue
        assert torch.isfinite(qw.weight).all(), name
        fused = name.rsplit(".", 1)[0] + (".gate_up_proj" if not name.endswith("down_proj") else ".down_proj")
        for e in range(qw.codes.shape[0]):
            if (fused, e) in starved:
                by_hand = rtn(model_tensor(original, name)[e], 4, 16)
                assert torch.equal(qw.codes[e], by_hand.codes) and torch.equal(qw.weight[e], by_hand.weight), (name, e)


def test_zero_layers_and_outlier_columns_survive_the_checkpoint(tmp_path):
    """A layer whose weights are all zero stays exactly zero, and a column 1e4 times the rest is quantized on its
    own coarse group grid, through the solve, the checkpoint and the loader; no tensor of the checkpoint is NaN."""
    from safetensors.torch import load_file

    model = tiny_model("mixtral", seed=4)
    with torch.no_grad():
        for p in model.model.layers[0].parameters():
            if p.dim() >= 2 and p is not model.model.layers[0].mlp.gate.weight:
                p.zero_()
        model.model.layers[1].self_attn.q_proj.weight[:, 7] *= 1e4
    big = model.model.layers[1].self_attn.q_proj.weight[:, 7].clone()
    res = quantize_model(model, _windows(model, n=4, seq=16), QuantConfig(bits=4, group_size=16, method="gptq"),
                         progress=False)  # fmt: skip
    out = save_checkpoint(model, res, tmp_path / "q")
    assert all(
        torch.isfinite(t).all() for t in load_file(str(out / "model.safetensors")).values() if t.is_floating_point()
    )
    loaded = load_checkpoint(out)
    layer0 = loaded.model.layers[0]
    assert torch.equal(layer0.self_attn.q_proj.dequantized_weight(), torch.zeros(64, 64))
    assert torch.equal(layer0.mlp.experts.gate_up_proj, torch.zeros_like(layer0.mlp.experts.gate_up_proj))
    q = loaded.model.layers[1].self_attn.q_proj
    assert torch.equal(q.dequantized_weight(), res.weights["model.layers.1.self_attn.q_proj"].weight[0])
    step = q.scales.float()[0]  # group 0 holds column 7
    assert ((q.dequantized_weight()[:, 7] - big).abs() <= 1.5 * step).all()  # GPTQ moves it by < a step
    assert (q.scales.float()[1:] < 1).all()  # the other groups keep a fine grid


@pytest.mark.parametrize("runs", [1, 2, 12])
def test_pairs_by_batch_keeps_the_masks_pairs_in_their_order(runs):
    """VSRAQ's (token, expert, weight) pairs split by calibration batch: in a few ascending runs of tokens (the FP
    choices, then the near misses) found by binary search, and in many (the mask per batch), the same pairs in the
    same order as a mask over every pair per batch; an empty batch gets none."""
    from vsraq_plugin.pipeline import _pairs_by_batch

    g = torch.Generator().manual_seed(runs)
    bounds = [(0, 10), (10, 10), (10, 37), (37, 64)]
    parts = [torch.randint(0, 64, (int(torch.randint(20, 60, (), generator=g)),), generator=g).sort().values
             for _ in range(runs)]  # fmt: skip
    tokens = torch.cat(parts)
    eids = torch.randint(0, 8, tokens.shape, generator=g)
    w = torch.rand(tokens.shape, generator=g)
    X = torch.randn(64, 4, generator=g)
    inputs, got = _pairs_by_batch((X, tokens, eids, w), bounds)
    for (t0, t1), (x, _, _), (tk, e, ww) in zip(bounds, inputs, got, strict=True):
        sel = (tokens >= t0) & (tokens < t1)
        assert torch.equal(x, X[t0:t1])
        assert torch.equal(tk, tokens[sel] - t0) and torch.equal(e, eids[sel]) and torch.equal(ww, w[sel])


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_the_lookahead_attention_replayed_changes_nothing(family, monkeypatch):
    """The look-ahead runs the next layer's attention on the FP stream to reach its router; that layer's own FP
    forward replays it (and its o_proj's FP inputs) instead of computing it again. Same input, same weights: the
    quantized model must be the same bit for bit as with the attention computed twice, and the replay must happen
    (once per MoE layer after the first layer; DeepSeek-V3's first layer is dense)."""
    import vsraq_plugin.pipeline as pipeline

    fp = tiny_model(family, seed=4)
    windows = _windows(fp, n=4, seq=24)
    cfg = QuantConfig(bits=3, group_size=16, method="vsraq")
    replays, lookahead, replayed = [], pipeline._lookahead_logits, pipeline._replayed

    def counting(*args):
        replays.append(args[0])
        return replayed(*args)

    monkeypatch.setattr(pipeline, "_replayed", counting)
    a = copy.deepcopy(fp)
    quantize_model(a, windows, cfg, batch_size=2, progress=False)
    assert len(replays) == len(fp.model.layers) - 1
    monkeypatch.setattr(pipeline, "_lookahead_logits", lambda *args: (lookahead(*args)[0], None))
    b = copy.deepcopy(fp)
    quantize_model(b, windows, cfg, batch_size=2, progress=False)
    assert len(replays) == len(fp.model.layers) - 1  # no replay without the kept attention
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
