"""Every bad input a new user can give (issue #17): one clear line naming the problem and the fix, exit status 2
on the command line (no traceback), and nothing written: no output folder, no temporary folder or lock beside it.

Each case builds what it needs from a few tiny models saved once per module; a case is the command line (a list
of arguments for ``vsraq``) or a Python call (the API, the loader, the integrations), and the fragment its
message must hold.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vsraq_plugin
from tiny_models import tiny_model
from vsraq_plugin.cli import fixture_path, main
from vsraq_plugin.config import QuantConfig

TEXT = (fixture_path() / "calib.txt").read_text()[:6000]
RTN = ["--method", "rtn", "--group-size", "32", "--threads", "1"]
GPTQ = ["--method", "gptq", "--group-size", "32", "--seq-len", "16", "--n-samples", "2", "--threads", "1"]
EVAL = ["--seq-len", "16", "--max-windows", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """``tiny``: a tiny Mixtral with the fixture's tokenizer and a calib.txt; ``tiny96``: the same family with its
    own 96-token vocabulary (the fixture's tokenizer does not fit it); ``q``: an RTN checkpoint of ``tiny``;
    ``gpt2``: a model family without ``model.layers``; ``text.txt``: an evaluation text."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from vsraq_plugin.pipeline import quantize_folder

    root = tmp_path_factory.mktemp("assets")
    tok = AutoTokenizer.from_pretrained(fixture_path())
    model = tiny_model("mixtral", seed=2)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    (root / "tiny" / "calib.txt").write_text(TEXT)
    tiny_model("mixtral", seed=2).save_pretrained(root / "tiny96")
    tok.save_pretrained(root / "tiny96")
    quantize_folder(
        root / "tiny", None, QuantConfig(method="rtn", group_size=32), root / "q", tokenizer=tok, progress=False
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64)).save_pretrained(
        root / "gpt2"
    )
    tok.save_pretrained(root / "gpt2")
    (root / "text.txt").write_text(TEXT)
    return root


@dataclass
class Ctx:
    root: Path  # the shared assets (read only)
    tmp: Path  # this case's folder
    out: Path  # where the case would write (must stay as it was)

    def copy(self, name: str, to: str = "m") -> Path:
        dst = self.tmp / to
        shutil.copytree(self.root / name, dst)
        return dst

    def file(self, name: str, data: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path


def _experts(c: Ctx) -> int:
    """The routed experts of the "tiny" asset (its config's count)."""
    cfg = json.loads((c.root / "tiny" / "config.json").read_text())
    return cfg["num_local_experts"]


def _edit_config(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _edit_weights(folder: Path, key: str, fn) -> Path:
    tensors = load_file(str(folder / "model.safetensors"))
    fn(tensors[key])
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _nan_in_layer_1(c: Ctx) -> Path:
    def poison(t):
        t[0, 0] = float("nan")

    return _edit_weights(c.copy("tiny"), "model.layers.1.self_attn.q_proj.weight", poison)


def _huge_column(c: Ctx) -> Path:
    def blow_up(t):
        t[:, 5] = 1e7  # a range the GPTQ format's fp16 scales cannot hold

    return _edit_weights(c.copy("tiny"), "model.layers.0.self_attn.q_proj.weight", blow_up)


def _truncated(c: Ctx, name: str = "tiny") -> Path:
    m = c.copy(name)
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[: len(data) // 2])
    return m


def _missing_shard(c: Ctx) -> Path:
    m = c.copy("tiny")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    return m


def _pickled(c: Ctx) -> Path:
    m = c.copy("tiny")
    (m / "model.safetensors").unlink()
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    return m


def _no_tokenizer(c: Ctx) -> Path:
    m = c.copy("tiny")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (m / f).unlink()
    return m


def _gpt_oss(c: Ctx) -> Path:
    from transformers import GptOssConfig

    m = c.copy("tiny")
    GptOssConfig(num_local_experts=8, num_experts_per_tok=2, hidden_size=64, num_hidden_layers=2).to_json_file(
        m / "config.json"
    )
    return m


def _broken_config(c: Ctx, name: str, text: str) -> Path:
    m = c.copy(name)
    (m / "config.json").write_text(text)
    return m


def _quantized_edit(c: Ctx, **qcfg) -> Path:
    return _edit_config(c.copy("q"), quantization_config=qcfg)


def _not_a_model(c: Ctx) -> Path:
    m = c.tmp / "m"
    m.mkdir()
    (m / "notes.txt").write_text("not a model")
    return m


def q(model, *extra: str, out: str | None = None) -> Callable[[Ctx], list[str]]:
    """``vsraq quantize``: ``model`` is an asset name, or a function of the case that builds the folder."""

    def argv(c: Ctx) -> list[str]:
        path = model(c) if callable(model) else c.root / model
        return ["quantize", str(path), "--out", str(out(c) if callable(out) else c.out), *extra]

    return argv


def ev(model="q", reference="tiny", text=None, *extra: str) -> Callable[[Ctx], list[str]]:
    def argv(c: Ctx) -> list[str]:
        m = model(c) if callable(model) else c.root / model
        r = reference(c) if callable(reference) else c.root / reference
        t = text(c) if callable(text) else c.root / "text.txt"
        return ["eval", "--reference", str(r), "--model", str(m), "--text", str(t), "--out", str(c.out), *EVAL, *extra]

    return argv


def demo(*extra: str) -> Callable[[Ctx], list[str]]:
    return lambda c: ["demo", "--out", str(c.out), "--threads", "1", *extra]


# ---------------------------------------------------------------------------------------------- API calls
def _tok(c: Ctx):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(c.root / "tiny")


def _module(c: Ctx):
    from vsraq_plugin.cli import load_model

    return load_model(c.root / "tiny")


def _api_inf_module(c: Ctx):
    model = _module(c)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[3, 0, 0] = float("inf")
    vsraq_plugin.quantize(model, None, QuantConfig(method="rtn", group_size=32), out=c.out)


def _api_vsraq_every_expert_routed(c: Ctx):
    model = _module(c)
    model.config.num_experts_per_tok = _experts(c)
    vsraq_plugin.quantize(model, torch.zeros(2, 16, dtype=torch.long), QuantConfig(method="vsraq", group_size=32),
                          out=c.out, seq_len=16)  # fmt: skip


def _api_windows_out_of_vocab(c: Ctx):
    windows = torch.full((2, 16), 10_000)
    vsraq_plugin.quantize(_module(c), windows, QuantConfig(method="gptq", group_size=32), out=c.out, seq_len=16)


def _api_no_model_layers(c: Ctx):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(c.root / "gpt2")
    vsraq_plugin.quantize(model, None, QuantConfig(method="rtn", group_size=32), out=c.out)


def _optimum_short_dataset(c: Ctx):
    from optimum.gptq import GPTQQuantizer

    quantizer = GPTQQuantizer(bits=4, group_size=32, dataset=["far too short"], quantizer="vsraq", model_seqlen=64)
    quantizer.quantize_model(_module(c), _tok(c))


def _transformers_hub_dataset(c: Ctx):
    from transformers import AutoModelForCausalLM, GPTQConfig

    cfg = GPTQConfig(bits=4, group_size=32, dataset="c4", tokenizer=_tok(c), quantizer="vsraq")
    AutoModelForCausalLM.from_pretrained(c.root / "tiny", quantization_config=cfg)


def _gptqconfig_bad_knob(c: Ctx):
    from transformers import GPTQConfig

    GPTQConfig(bits=4, quantizer="vsraq", vsraq={"lambda_value": -1})


def _call(fn) -> Callable[[Ctx], Callable[[], object]]:
    return lambda c: lambda: fn(c)


# fmt: off
CASES: list[tuple[str, Callable, str]] = [
    # --- vsraq quantize: the model folder
    ("q-model-missing", q(lambda c: c.tmp / "nope", *RTN), "does not exist; pass a folder saved by save_pretrained"),
    ("q-model-not-a-model", q(_not_a_model, *RTN), "is not a model directory (no config.json)"),
    ("q-config-broken-json", q(lambda c: _broken_config(c, "tiny", "{not"), *RTN), "config.json is not valid JSON"),
    ("q-config-no-model-type", q(lambda c: _edit_config(c.copy("tiny"), model_type=None), *RTN), "has no model_type"),
    ("q-config-unknown-type", q(lambda c: _edit_config(c.copy("tiny"), model_type="nonesuch"), *RTN),
     "unknown to transformers"),
    ("q-moe-family-without-adapter", q(_gpt_oss, *RTN), "supported MoE families"),
    ("q-family-without-model-layers", q("gpt2", *RTN), "has no `model.layers`"),
    ("q-weights-pickled-only", q(_pickled, *RTN), "never unpickles"),
    ("q-weights-truncated", q(_truncated, *RTN), "is not a readable safetensors file"),
    ("q-weights-shard-missing", q(_missing_shard, *RTN), "names shards that are missing"),
    ("q-weights-nan", q(_nan_in_layer_1, *RTN), "model.layers.1.self_attn.q_proj.weight holds 1 NaN/Inf"),
    ("q-weights-beyond-fp16-scales", q(_huge_column, *GPTQ), "overflows the fp16 scale"),
    ("q-weights-do-not-match-config", q(lambda c: _edit_config(c.copy("tiny"), num_local_experts=4), *RTN),
     "the config does not describe these weights"),
    ("q-config-more-experts-per-token-than-experts",
     q(lambda c: _edit_config(c.copy("tiny"), num_experts_per_tok=99), *RTN), "num_experts_per_tok=99 experts, but"),
    ("q-vsraq-every-expert-routed",
     q(lambda c: _edit_config(c.copy("tiny"), num_experts_per_tok=_experts(c)), *GPTQ[2:], "--method", "vsraq"),
     "no routing decision for VSRAQ to keep"),
    ("q-model-already-quantized", q("q", *RTN), "is already quantized"),
    ("q-tokenizer-missing", q(_no_tokenizer, *RTN), "holds no tokenizer"),
    ("q-tokenizer-of-another-model", q("tiny96", *GPTQ, "--calib", "CALIB"), "the tokenizer does not belong"),
    # --- vsraq quantize: calibration data and counts
    ("q-calib-not-utf8", q("tiny", *GPTQ, "--calib", "LATIN1"), "is not UTF-8 text"),
    ("q-calib-missing", q("tiny", *GPTQ, "--calib", "/nonexistent/calib.txt"), "does not exist"),
    ("q-calib-empty", q("tiny", *GPTQ, "--calib", "EMPTY"), "the calibration set is empty"),
    ("q-calib-too-short", q("tiny", *GPTQ, "--calib", "SHORT"), "fewer than one window"),
    ("q-calib-jsonl-broken", q("tiny", *GPTQ, "--calib", "BADJSONL"), "line 2 is not JSON"),
    ("q-calib-jsonl-without-text", q("tiny", *GPTQ, "--calib", "NOTEXT"), "has no 'text' string"),
    ("q-n-samples-zero", q("tiny", *GPTQ, "--n-samples", "0"), "--n-samples 0 must be a positive integer"),
    ("q-seq-len-zero", q("tiny", *GPTQ, "--seq-len", "0"), "--seq-len 0 must be a positive integer"),
    ("q-batch-size-zero", q("tiny", *GPTQ, "--batch-size", "0"), "--batch-size 0 must be a positive integer"),
    ("q-more-windows-than-data", q("tiny", *GPTQ, "--n-samples", "500"), "fewer than the 500 asked"),
    # --- vsraq quantize: settings and output
    ("q-group-size-not-dividing", q("tiny", *RTN, "--group-size", "48"), "does not divide"),
    ("q-damp-out-of-range", q("tiny", *GPTQ, "--damp-percent", "2"), "must lie in (0, 1)"),
    ("q-budget-without-levels", q("tiny", *GPTQ, "--bits-budget", "3"), "go together"),
    ("q-allocation-unknown", q("tiny", *GPTQ, "--bits-budget", "3", "--bit-levels", "2,4", "--allocation", "best"),
     "allocation='best' is unknown"),
    ("q-budget-scope-with-a-rule", q("tiny", *GPTQ, "--bits-budget", "3", "--bit-levels", "2,4", "--allocation",
                                     "random", "--budget-scope", "model"), "use it with allocation='measured'"),
    ("q-fragility-without-vsraq", q("tiny", *GPTQ, "--bits-budget", "3", "--bit-levels", "2,4",
                                    "--allocation-weight", "fragility"), "reads the next router's fragility"),
    ("q-damage-metric-unknown", q("tiny", *GPTQ, "--bits-budget", "3", "--bit-levels", "2,4", "--damage-metric",
                                  "fisher"), "damage_metric='fisher' is unknown"),
    ("q-shard-size-not-a-size", q("tiny", *RTN, "--max-shard-size", "lots"), "is not a size"),
    ("q-rtn-with-refinement", q("tiny", *RTN, "--refine-steps", "2"), "refinement starts from a GPTQ solve"),
    ("q-out-is-a-file", q("tiny", *RTN, out=lambda c: c.file("afile", "x")), "is a file; pass a folder path"),
    ("q-out-not-empty", q("tiny", *RTN, out=lambda c: c.file("full/x", "x").parent), "exists and is not empty"),
    ("q-out-is-the-model", q(lambda c: c.copy("tiny"), *RTN, "--overwrite", out=lambda c: c.tmp / "m"),
     "is the model folder"),
    ("q-resume-dir-inside-out", q("tiny", *RTN, "--resume-dir", "OUT/work"), "lies inside --out"),
    # --- vsraq eval
    ("e-text-empty", ev(text=lambda c: c.file("t.txt", "")), "is empty (or only whitespace)"),
    ("e-text-whitespace", ev(text=lambda c: c.file("t.txt", " \n\n \t\n")), "is empty (or only whitespace)"),
    ("e-text-not-utf8", ev(text=lambda c: c.file("t.txt", "café ".encode("latin-1") * 50)), "is not UTF-8 text"),
    ("e-text-too-short", ev(text=lambda c: c.file("t.txt", "hello")), "fewer than one window"),
    ("e-text-missing", ev(text=lambda c: c.tmp / "none.txt"), "does not exist"),
    ("e-seq-len-one", ev("q", "tiny", None, "--seq-len", "1"), "--seq-len 1 must be an integer >= 2"),
    ("e-reference-missing", ev(reference=lambda c: c.tmp / "nope"), "--reference"),
    ("e-reference-not-a-model", ev(reference=_not_a_model), "is not a model directory (no config.json)"),
    ("e-reference-broken-config", ev(reference=lambda c: _broken_config(c, "tiny", "{")),
     "config.json is not valid JSON"),
    ("e-checkpoint-bits-disagree", ev(model=lambda c: _quantized_edit(c, bits=3)),
     "config.json does not match the weights"),
    ("e-checkpoint-group-size-disagree", ev(model=lambda c: _quantized_edit(c, group_size=64)),
     "config.json does not match the weights"),
    ("e-checkpoint-bits-invalid", ev(model=lambda c: _quantized_edit(c, bits=5)), "is not a GPTQ width"),
    ("e-model-truncated", ev(model=_truncated), "is not a readable safetensors file"),
    ("e-model-nan", ev(model=_nan_in_layer_1), "holds 1 NaN/Inf"),
    ("e-model-other-vocabulary", ev(model="tiny96"), "has a vocabulary of 96 tokens"),
    # --- vsraq demo
    ("d-text-missing", demo("--text", "/nonexistent/eval.txt"), "does not exist"),
    ("d-n-samples-zero", demo("--n-samples", "0"), "--n-samples 0 must be a positive integer"),
    ("d-model-missing", demo("--model", "/nonexistent/model"), "the demo model is missing"),
    # --- the Python API, the loader and the integrations
    ("api-folder-without-out", _call(lambda c: vsraq_plugin.quantize(c.root / "tiny", TEXT)), "pass out="),
    ("api-out-is-the-model", _call(lambda c: vsraq_plugin.quantize(c.copy("tiny"), TEXT, out=c.tmp / "m",
     overwrite=True)), "is the model folder"),
    ("api-texts-without-tokenizer", _call(lambda c: vsraq_plugin.quantize(_module(c), [TEXT], out=c.out)),
     "need a tokenizer"),
    ("api-n-samples-zero", _call(lambda c: vsraq_plugin.quantize(_module(c), [TEXT], tokenizer=_tok(c), n_samples=0)),
     "n_samples=0 must be a positive integer"),
    ("api-config-not-quantconfig", _call(lambda c: vsraq_plugin.quantize(_module(c), [TEXT], {"bits": 4})),
     "config must be a QuantConfig"),
    ("api-weights-inf", _call(_api_inf_module), "model.layers.1.mlp.experts.down_proj holds 1 NaN/Inf"),
    ("api-windows-out-of-vocab", _call(_api_windows_out_of_vocab), "the tokenizer does not belong to this model"),
    ("api-vsraq-every-expert-routed", _call(_api_vsraq_every_expert_routed), "no routing decision for VSRAQ to keep"),
    ("api-no-model-layers", _call(_api_no_model_layers), "has no `model.layers`"),
    ("load-missing", _call(lambda c: vsraq_plugin.load(c.tmp / "nope")), "does not exist"),
    ("load-not-gptq", _call(lambda c: vsraq_plugin.load(c.root / "tiny")), "is not a GPTQ checkpoint"),
    ("load-bits-disagree", _call(lambda c: vsraq_plugin.load(_quantized_edit(c, bits=8))),
     "config.json does not match the weights"),
    ("load-broken-config", _call(lambda c: vsraq_plugin.load(_broken_config(c, "q", "["))),
     "config.json is not valid JSON"),
    ("load-bad-dtype", _call(lambda c: vsraq_plugin.load(c.root / "q", dtype="float9")), "is not a floating dtype"),
    ("load-bad-device", _call(lambda c: vsraq_plugin.load(c.root / "q", device_map="gpu")), "is not a device"),
    ("optimum-dataset-too-short", _call(_optimum_short_dataset), "fewer than one window"),
    ("transformers-hub-dataset", _call(_transformers_hub_dataset), "can read offline"),
    ("gptqconfig-bad-knob", _call(_gptqconfig_bad_knob), "lambda_value=-1 must be a finite number >= 0"),
]
# fmt: on

FILES = {
    "CALIB": lambda c: c.file("calib.txt", TEXT),
    "LATIN1": lambda c: c.file("calib.txt", "caf\xe9 au lait ".encode("latin-1") * 100),
    "EMPTY": lambda c: c.file("calib.txt", "\n\n"),
    "SHORT": lambda c: c.file("calib.txt", "hello"),
    "BADJSONL": lambda c: c.file("calib.jsonl", '{"text": "fine"}\n{not json\n'),
    "NOTEXT": lambda c: c.file("calib.jsonl", '{"body": "no text field"}\n'),
    "OUT/work": lambda c: c.out / "work",
}


def _snapshot(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    if folder.is_file():
        return {"": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _record(request, message: str) -> None:
    """``VSRAQ_CASES_LOG=FILE``: append each case's message (the table of cases and messages for the docs)."""
    log = os.environ.get("VSRAQ_CASES_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{request.node.callspec.id}\t{message}\n")


@pytest.mark.parametrize(("build", "fragment"), [pytest.param(b, f, id=i) for i, b, f in CASES])
def test_bad_input_is_one_clear_line_and_writes_nothing(build, fragment, assets, tmp_path, capsys, request):
    c = Ctx(assets, tmp_path, tmp_path / "out")
    made = build(c)
    if isinstance(made, list):  # the command line
        argv = [str(FILES[a](c)) if a in FILES else a for a in made]
        out = Path(argv[argv.index("--out") + 1])
        before = _snapshot(out)
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"vsraq {argv[0]}: error: "), err
        assert fragment in last, last
        _record(request, last)
    else:  # a Python call
        out, before = c.out, None
        with pytest.raises((ValueError, NotImplementedError)) as info:
            made()
        message = str(info.value)
        assert fragment in message, message
        assert "\n" not in message.strip(), message
        _record(request, f"{type(info.value).__name__}: {message}")
    assert _snapshot(out) == before  # nothing written, nothing changed
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []  # no temporary folder, no lock file


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_count_in_slices(dtype, monkeypatch):
    """The NaN/Inf check behind every weight check counts exactly whichever slice a bad value falls in, never
    takes large finite values for an overflow, and reduces a slice at a time (a float64 sum copies what it sums:
    DeepSeek-V3's fused experts at once would be 60 GB)."""
    from vsraq_plugin import validation

    monkeypatch.setattr(validation, "NONFINITE_CHUNK", 7)
    sizes = []
    sum_ = torch.Tensor.sum
    monkeypatch.setattr(torch.Tensor, "sum", lambda self, *a, **k: sizes.append(self.numel()) or sum_(self, *a, **k))
    t = torch.full((5, 9), 3e38, dtype=dtype)  # the float32 sum of these would overflow; float64's does not
    assert validation.nonfinite_count(t) == 0 and max(sizes) == 7
    t[0, 1], t[2, 3], t[4, 8] = float("inf"), float("-inf"), float("nan")  # +inf and -inf in different slices
    assert validation.nonfinite_count(t) == 3
    assert validation.nonfinite_count(t.T) == 3  # not contiguous
