import json

import pytest
import torch

from tiny_models import tiny_model
from vsraq_plugin.cli import fixture_path, main


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    """A tiny Mixtral and a perturbed copy saved as model folders, with a tokenizer from the fixture."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("models")
    tok = AutoTokenizer.from_pretrained(fixture_path())
    ref = tiny_model("mixtral", seed=2)
    ref.resize_token_embeddings(len(tok))
    ref.save_pretrained(root / "fp")
    tok.save_pretrained(root / "fp")
    with torch.no_grad():
        ref.model.layers[0].mlp.gate.weight.mul_(-1.0)  # reverses layer 0's expert ranking
    ref.save_pretrained(root / "q")
    (root / "text.txt").write_text("It is a truth universally acknowledged, that a single man. " * 80)
    return root


def test_eval_writes_report_and_flags_the_changed_router(saved_pair, tmp_path, capsys):
    root = saved_pair
    rc = main(
        [
            "eval",
            "--reference",
            str(root / "fp"),
            "--model",
            str(root / "q"),
            "--model",
            str(root / "fp"),
            "--text",
            str(root / "text.txt"),
            "--out",
            str(tmp_path),
            "--seq-len",
            "32",
            "--max-windows",
            "4",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    q, same = report["models"][str(root / "q")], report["models"][str(root / "fp")]
    assert same["topk_set_agreement"] == 1.0 and same["kl"] == pytest.approx(0, abs=1e-7)
    assert q["per_layer"]["topk_set_agreement"][0] == 0.0  # negated logits: top-2 becomes bottom-2
    assert report["text"]["tokens"] == 4 * 32
    assert "| FP reference |" in capsys.readouterr().out


def test_eval_errors_are_one_clear_line(saved_pair, tmp_path, capsys):
    root = saved_pair
    rc = main(
        [
            "eval",
            "--reference",
            str(root / "fp"),
            "--model",
            str(tmp_path),
            "--text",
            str(root / "text.txt"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert "is not a model directory (no config.json)" in capsys.readouterr().err
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"")
    rc = main(
        [
            "eval",
            "--reference",
            str(root / "fp"),
            "--model",
            str(pickled),
            "--text",
            str(root / "text.txt"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert "safetensors only" in capsys.readouterr().err
    rc = main(
        [
            "eval",
            "--reference",
            str(root / "fp"),
            "--model",
            str(root / "q"),
            "--text",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_attribution_splits_flips_into_local_and_inherited(saved_pair, tmp_path, capsys):
    root = saved_pair
    args = ["eval", "--reference", str(root / "fp"), "--model", str(root / "q"), "--text", str(root / "text.txt")]
    args += ["--out", str(tmp_path), "--seq-len", "32", "--max-windows", "4", "--threads", "1", "--attribution"]
    assert main([*args, "--write-sources"]) == 0
    pl = json.loads((tmp_path / "report.json").read_text())["models"][str(root / "q")]["per_layer"]
    # Write sources: router 0's error is the router itself, exactly (its input is FP); router 1's comes from the
    # writes that router 0's flips changed (layer 0's MLP) and what they moved (layer 1's attention).
    src = pl["write_sources"]
    assert src[0]["router"] == pytest.approx(1.0, abs=1e-12) and pl["write_sources_fit"][0] == pytest.approx(1.0)
    assert src[1]["router"] == 0.0 and src[1]["layer 0 attention"] == 0.0 and src[1]["layer 0 mlp"] > 0.0
    # Layer 0's router is negated: every token flips there, all locally; layer 1 is unchanged, so whatever
    # flips there is inherited from layer 0's changed output.
    assert pl["local_disagreement"][0] == 1.0 and pl["inherited_disagreement"][0] == 0.0
    assert pl["local_disagreement"][1] == 0.0
    assert pl["inherited_disagreement"][1] == pytest.approx(1.0 - pl["topk_set_agreement"][1], abs=1e-12)
    assert "local / inherited" in capsys.readouterr().out


def _eval_on_fixture(model_dir, out_dir, windows: int, *extra: str, dtype: str = "float32") -> dict:
    """`vsraq eval` of a checkpoint against the shipped fixture on its eval text; the report.json."""
    args = [
        "eval",
        "--reference",
        "tiny-mixtral",
        "--model",
        str(model_dir),
        "--text",
        str(fixture_path() / "eval.txt"),
        "--out",
        str(out_dir),
        "--seq-len",
        "64",
        "--max-windows",
        str(windows),
        "--dtype",
        dtype,
        "--threads",
        "1",
        *extra,
    ]
    assert main(args) == 0
    return json.loads((out_dir / "report.json").read_text())


def test_quantize_then_eval_the_shipped_fixture(tmp_path, capsys):
    q = tmp_path / "q"
    args = [
        "quantize",
        "tiny-mixtral",
        "--method",
        "gptq",
        "--bits",
        "4",
        "--group-size",
        "64",
        "--n-samples",
        "4",
        "--seq-len",
        "64",
        "--out",
        str(q),
        "--threads",
        "1",
        "--device",
        "cpu",
        "--offload",
        "cpu",
        "--max-shard-size",
        "3MB",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "on cpu" in out and "4 layers" in out
    shards = sorted(q.glob("model-*-of-*.safetensors"))  # the fixture's ~5 MB of tensors, streamed in 3 MB shards
    assert len(shards) >= 2 and (q / "model.safetensors.index.json").is_file() and (q / "tokenizer.json").is_file()
    config = json.loads((q / "config.json").read_text())
    assert config["dtype"] == "bfloat16"  # the fixture is stored in bf16: its unquantized tensors stay bf16
    qcfg = json.loads((q / "quantize_config.json").read_text())
    assert qcfg["bits"] == 4 and qcfg["meta"]["vsraq"]["method"] == "gptq"
    assert main(args) == 2 and "exists and is not empty" in capsys.readouterr().err
    m = _eval_on_fixture(q, tmp_path / "rep", windows=4)["models"][str(q)]
    assert 0 < m["kl"] < 0.1 and 0.8 < m["topk_set_agreement"] < 1.0  # quantized: close, not identical
    bf16 = _eval_on_fixture(q, tmp_path / "rep16", windows=4, dtype="bfloat16")
    assert bf16["dtype"] == "bfloat16" and bf16["models"][str(q)]["kl"] != m["kl"]  # computed in bf16
    # Attribution through the plugin's loader (quantized modules): first layer all local, parts add up.
    a = _eval_on_fixture(q, tmp_path / "rep2", 4, "--attribution")["models"][str(q)]["per_layer"]
    total = [1.0 - x for x in a["topk_set_agreement"]]
    assert a["local_disagreement"][0] == pytest.approx(total[0], abs=1e-12)
    assert min(a["local_disagreement"]) >= 0.0
    for loc, inh, t in zip(a["local_disagreement"], a["inherited_disagreement"], total, strict=True):
        assert loc + inh == pytest.approx(t, abs=1e-12)


def test_mixed_precision_from_the_command_line(tmp_path, capsys):
    q = tmp_path / "q"
    args = [
        "quantize",
        "tiny-mixtral",
        "--method",
        "gptq",
        "--bits",
        "4",
        "--group-size",
        "64",
        "--bits-budget",
        "2.5",
        "--bit-levels",
        "2,3",
        "--n-samples",
        "4",
        "--seq-len",
        "64",
        "--out",
        str(q),
        "--threads",
        "1",
        "--no-width-per-projection",  # one width per expert (per projection is test_width_per_projection_...)
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "measured damage" in out  # the default allocation
    meta = json.loads((q / "config.json").read_text())["quantization_config"]["meta"]["vsraq"]
    assert len(meta["expert_bits"]) == 4  # every MoE layer of the fixture (an empty dict would pass the next line)
    assert all(sorted(w) == [2, 2, 2, 2, 3, 3, 3, 3] for w in meta["expert_bits"].values())
    report = _eval_on_fixture(q, tmp_path / "rep", windows=2)
    assert report["models"][str(q)]["expert_bits"] == meta["expert_bits"]
    bad = [*args[:-5], "--bits-budget", "2.2", "--allocation", "router-norm", "--out", str(tmp_path / "bad")]
    assert main(bad) == 2  # the rule needs exact level counts; the measured allocation takes any budget (<=)
    assert "nearest reachable budgets" in capsys.readouterr().err


def test_width_per_projection_from_the_command_line(tmp_path, capsys):
    """``--width-per-projection``: the checkpoint's meta, the printed widths and the eval report carry down's widths
    beside gate/up's, and the budget holds over both parts; without a budget the flag is refused."""
    q = tmp_path / "q"
    common = ["quantize", "tiny-mixtral", "--method", "gptq", "--group-size", "64", "--n-samples", "4", "--seq-len",
              "64", "--threads", "1", "--width-per-projection"]  # fmt: skip
    assert main([*common, "--bits-budget", "2.5", "--bit-levels", "2,3", "--out", str(q)]) == 0
    out = capsys.readouterr().out
    assert "damages in the stream's read metric, widths per projection (gate/up, down)" in out
    meta = json.loads((q / "config.json").read_text())["quantization_config"]["meta"]["vsraq"]
    assert meta["width_per_projection"] is True and meta["expert_down_bits"].keys() == meta["expert_bits"].keys()
    for layer, gu in meta["expert_bits"].items():
        dn = meta["expert_down_bits"][layer]
        assert f"layer {layer}: {gu} (gate/up), down {dn}" in out
        assert 2 * sum(gu) + sum(dn) <= 2.5 * 3 * len(gu)  # gate/up has twice down's parameters
    report = _eval_on_fixture(q, tmp_path / "rep", windows=2)
    assert report["models"][str(q)]["expert_down_bits"] == meta["expert_down_bits"]
    assert main([*common, "--out", str(tmp_path / "bad")]) == 2
    assert "width_per_projection=True" in capsys.readouterr().err


def test_demo_runs_every_method(tmp_path, capsys):
    rc = main(
        [
            "demo",
            "--bits",
            "3",
            "--methods",
            "rtn",
            "gptq",
            "--n-samples",
            "4",
            "--seq-len",
            "64",
            "--max-windows",
            "4",
            "--out",
            str(tmp_path),
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["models"]) == {"rtn W3g64", "gptq W3g64"}
    assert "| gptq W3g64 |" in capsys.readouterr().out


def test_float32_sums_flag_is_the_config_switch(saved_pair, tmp_path, monkeypatch):
    """``--float32-sums`` quantizes with ``exact_sums=False`` (float32 running sums): the same codes as the API
    with that setting, and every Hessian accumulator of the run in float32 mode, where the default run's are all
    exact (so the flag is not silently ignored; whether the codes differ too is left to chance)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from vsraq_plugin import gptq as gptq_module
    from vsraq_plugin.calibration import calibration_windows
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.pipeline import quantize_folder

    root = saved_pair
    (root / "calib.txt").write_text((fixture_path() / "calib.txt").read_text()[:20000])
    args = ["--method", "gptq", "--group-size", "32", "--n-samples", "8", "--seq-len", "32", "--batch-size", "1"]
    args += ["--threads", "1"]  # 8 batches: float32 running sums round differently from float64 ones
    modes: list[bool] = []
    real_init = gptq_module.HessianAccumulator.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        modes.append(self.exact)

    monkeypatch.setattr(gptq_module.HessianAccumulator, "__init__", spy)
    made = {}
    for flag, out in (([], "exact"), (["--float32-sums"], "f32")):
        modes.clear()
        rc = main(["quantize", str(root / "fp"), "--calib", str(root / "calib.txt"), *args, *flag,
                   "--out", str(tmp_path / out)])  # fmt: skip
        assert rc == 0
        made[out] = list(modes)
    monkeypatch.undo()
    assert made["exact"] and all(made["exact"]), made["exact"]
    assert made["f32"] and not any(made["f32"]), made["f32"]
    tok = AutoTokenizer.from_pretrained(root / "fp")
    windows = calibration_windows(tok, root / "calib.txt", 32, 8, exact=True)
    cfg = QuantConfig(method="gptq", group_size=32, exact_sums=False, device="cpu")
    quantize_folder(root / "fp", windows, cfg, tmp_path / "api", tokenizer=tok, batch_size=1, progress=False)
    read = {n: load_file(str(tmp_path / n / "model.safetensors")) for n in ("f32", "api")}
    qweights = [k for k in read["api"] if k.endswith(".qweight")]
    assert qweights and all(torch.equal(read["f32"][k], read["api"][k]) for k in qweights)


def test_eval_components_find_the_changed_router(saved_pair, tmp_path, capsys):
    """`--components`: the pair differs only in layer 0's router, so putting the routers back removes every flip
    (share 1) and putting back any other group changes nothing (share 0); per layer, only layer 0's router."""
    root = saved_pair
    args = ["eval", "--reference", str(root / "fp"), "--model", str(root / "q"), "--text", str(root / "text.txt")]
    args += ["--out", str(tmp_path), "--seq-len", "32", "--max-windows", "4", "--threads", "1"]
    assert main([*args, "--components"]) == 0
    comps = json.loads((tmp_path / "report.json").read_text())["components"][str(root / "q")]
    assert sorted(comps) == ["attention", "routed experts", "routers"]
    assert comps["routers"]["disagreement_share"] == 1.0 and comps["routers"]["topk_set_agreement"] == 1.0
    assert comps["routers"]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert comps["attention"]["disagreement_share"] == 0.0 and comps["routed experts"]["disagreement_share"] == 0.0
    assert "disagreement share" in capsys.readouterr().out
    assert main([*args, "--components", "layer"]) == 0
    comps = json.loads((tmp_path / "report.json").read_text())["components"][str(root / "q")]
    assert len(comps) == 6 and {k for k, v in comps.items() if v["disagreement_share"] != 0} == {"layer 0 routers"}
