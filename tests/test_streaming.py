"""Streaming (DESIGN 7): a model folder quantized layer by layer must give the in-memory run's codes bit for bit,
write unquantized tensors in the source dtype, read sharded sources, shard its own output, resume after a kill,
and load back module by module in the dtype a server uses."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tiny_models import MOE_FAMILIES, tiny_model
from vsraq_plugin.checkpoint import (
    QUANT_SUFFIXES,
    CheckpointError,
    ShardWriter,
    kept_in_float32,
    load_checkpoint,
    save_checkpoint,
)
from vsraq_plugin.cli import fixture_path, load_model, load_tokenizer
from vsraq_plugin.config import ConfigError, QuantConfig
from vsraq_plugin.pipeline import calibration_windows, quantize_folder, quantize_model
from vsraq_plugin.streaming import InMemoryLayers, ModelSource, ModelSourceError, resolve_device


def _checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) checkpoint folder."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_same_codes(a: dict, b: dict) -> None:
    quant = [k for k in a if k.rsplit(".", 1)[-1] in QUANT_SUFFIXES]
    assert quant and sorted(a) == sorted(b)
    for k in quant:
        assert torch.equal(a[k], b[k]), k


def _serving(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model as a server computes it: parameters in ``dtype``; the rotary frequencies and what the class keeps
    in float32 (DeepSeek-V3's routers) stay float32, as transformers keeps them when it loads a model in ``dtype``."""
    for name, p in model.named_parameters():
        if not kept_in_float32(model, name):
            p.data = p.data.to(dtype)
    return model


@pytest.fixture(scope="module")
def fixture_windows():
    tok = load_tokenizer(fixture_path())
    return tok, calibration_windows(tok, fixture_path() / "calib.txt", 128, 8)


@pytest.mark.parametrize("method", ["gptq", "vsraq"])
def test_streamed_fixture_equals_in_memory_and_keeps_bf16(method, fixture_windows, tmp_path):
    """The shipped fixture is stored in bf16: streamed from its folder it gives the in-memory run's codes bit for
    bit, stores every unquantized tensor in bf16 (config.json says so), and reloads in bf16 with exactly the logits
    of the in-memory quantized model computed in bf16."""
    tok, windows = fixture_windows
    cfg = QuantConfig(bits=3, group_size=64, method=method, device="cpu")
    model = load_model(fixture_path())
    res = quantize_model(model, windows, cfg, progress=False)
    save_checkpoint(model, res, tmp_path / "mem")
    streamed = quantize_folder(fixture_path(), windows, cfg, tmp_path / "str", tokenizer=tok, progress=False)
    assert streamed.weights == {}  # written as it went, nothing kept
    mem, st = _checkpoint(tmp_path / "mem"), _checkpoint(tmp_path / "str")
    _assert_same_codes(mem, st)
    rest = [k for k in st if k.rsplit(".", 1)[-1] not in QUANT_SUFFIXES]
    assert {st[k].dtype for k in rest} == {torch.bfloat16}
    assert {mem[k].dtype for k in rest} == {torch.float32}  # an in-memory float32 model saves float32
    for k in rest:  # the same values: bf16 -> float32 -> bf16 is exact
        assert torch.equal(mem[k].to(torch.bfloat16), st[k]), k
    config = json.loads((tmp_path / "str" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["quantization_config"]["quant_method"] == "gptq"
    loaded = load_checkpoint(tmp_path / "str", dtype="auto")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    ids = windows[:2]
    with torch.no_grad():
        assert torch.equal(_serving(model, torch.bfloat16)(input_ids=ids).logits, loaded(input_ids=ids).logits)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_streamed_equals_in_memory_on_every_family(family, tmp_path):
    """Each family's checkpoint layout (Mixtral's w1/w3/w2, the others' gate/up/down per expert) is mapped onto
    the fused transformers-5 experts when streaming; the codes equal the in-memory run's bit for bit."""
    model = tiny_model(family, seed=2)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "fp")
    windows = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=4, group_size=16, method="vsraq", device="cpu")
    mem_model = load_model(tmp_path / "fp")  # float32, from the same bf16 files
    res = quantize_model(mem_model, windows, cfg, batch_size=2, progress=False)
    save_checkpoint(mem_model, res, tmp_path / "mem")
    quantize_folder(tmp_path / "fp", windows, cfg, tmp_path / "str", batch_size=2, progress=False)
    _assert_same_codes(_checkpoint(tmp_path / "mem"), _checkpoint(tmp_path / "str"))
    loaded = load_checkpoint(tmp_path / "str", dtype="auto")  # bf16, as stored (the re-fitted routers too)
    with torch.no_grad():
        ref = _serving(mem_model, torch.bfloat16)(input_ids=windows[:2]).logits
        assert torch.equal(ref, loaded(input_ids=windows[:2]).logits)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_bf16_in_memory_model_is_never_float32_whole(family, tmp_path, monkeypatch):
    """A bf16 model quantized in memory stays bf16 (DeepSeek's float32 router and correction bias stay float32):
    at any time at most the current layer and the look-ahead's next layer (without its experts) are float32
    beside it, not the whole model, and each layer's values go back into the model's own tensors. Its codes equal
    the streamed run's bit for bit, and it computes exactly what its checkpoint loaded in bf16 computes."""
    model = tiny_model(family, seed=2)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "fp")
    windows = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=4, group_size=16, method="vsraq", device="cpu")
    mem = load_model(tmp_path / "fp", dtype="bfloat16")
    before = {n: t.dtype for n, t in [*mem.named_parameters(), *mem.named_buffers()]}
    storage = {n: p.data_ptr() for n, p in mem.named_parameters()}
    assert torch.float32 in before.values() if family == "deepseek_v3" else True

    def fp32(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if p.dtype == torch.float32)

    def size(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    layers = mem.model.layers
    experts = [size(layer.mlp.experts) if hasattr(layer.mlp, "experts") else 0 for layer in layers]
    bound = fp32(mem) + max(size(a) + size(b) - e for a, b, e in zip(layers, layers[1:], experts[1:], strict=False))
    assert bound < size(mem)  # the bound is below what a whole float32 model holds: the check can fail
    seen: list[int] = []
    onload = InMemoryLayers.onload

    def spy(self, index, experts=True):
        layer = onload(self, index, experts)
        seen.append(fp32(self.model))
        return layer

    monkeypatch.setattr(InMemoryLayers, "onload", spy)
    res = quantize_model(mem, windows, cfg, batch_size=2, progress=False)
    assert seen and max(seen) <= bound, (max(seen), bound)
    assert {n: t.dtype for n, t in [*mem.named_parameters(), *mem.named_buffers()]} == before
    assert {n: p.data_ptr() for n, p in mem.named_parameters()} == storage  # written back in place, no new copy
    assert all(qw.weight is None for qw in res.weights.values())  # no float32 copy of the weights in the result
    save_checkpoint(mem, res, tmp_path / "mem")
    quantize_folder(tmp_path / "fp", windows, cfg, tmp_path / "str", batch_size=2, progress=False)
    mem_ck, st_ck = _checkpoint(tmp_path / "mem"), _checkpoint(tmp_path / "str")
    _assert_same_codes(mem_ck, st_ck)
    for k in st_ck:  # the unquantized tensors too, in their stored dtype
        assert st_ck[k].dtype == mem_ck[k].dtype and torch.equal(st_ck[k], mem_ck[k]), k
    # Stored in float32: what transformers keeps in float32 (DeepSeek's routers and correction biases), no more.
    fp32 = {k for k in st_ck if st_ck[k].dtype == torch.float32}
    routers = {k for k in st_ck if k.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias"))}
    assert fp32 == (routers if family == "deepseek_v3" else set()) and routers
    loaded = load_checkpoint(tmp_path / "str", dtype="auto")
    with torch.no_grad():
        assert torch.equal(mem(input_ids=windows[:2]).logits, loaded(input_ids=windows[:2]).logits)


def test_sharded_source_and_sharded_output(tmp_path):
    """A source saved in several shards with an index is read; a small max_shard_size gives several output
    shards and an index that the plugin's loader and every safetensors reader accept."""
    model = tiny_model("qwen2_moe", seed=1)
    model.save_pretrained(tmp_path / "fp", max_shard_size="60KB")
    assert (tmp_path / "fp" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "fp").glob("*.safetensors"))) > 2
    windows = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(3))
    cfg = QuantConfig(bits=4, group_size=16, method="gptq", device="cpu")
    quantize_folder(tmp_path / "fp", windows, cfg, tmp_path / "one", batch_size=2, progress=False)
    quantize_folder(tmp_path / "fp", windows, cfg, tmp_path / "many", batch_size=2, progress=False,
                    max_shard_size="40KB")  # fmt: skip
    shards = sorted((tmp_path / "many").glob("*.safetensors"))
    data = [s.stat().st_size - 8 - int.from_bytes(s.read_bytes()[:8], "little") for s in shards]
    assert len(shards) > 2 and max(data) <= 40_000  # the cap counts tensor bytes, as transformers' does
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]
    one, many = _checkpoint(tmp_path / "one"), _checkpoint(tmp_path / "many")
    assert sorted(one) == sorted(many) and all(torch.equal(one[k], many[k]) for k in one)
    mem = tiny_model("qwen2_moe", seed=1)
    quantize_model(mem, windows, cfg, batch_size=2, progress=False)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "many")(input_ids=windows).logits, mem(input_ids=windows).logits)


def test_shard_writer_files_read_back_exactly(tmp_path):
    """The streaming shard writer against safetensors' own reader: every dtype, odd shapes, empty and scalar
    tensors, alignment of every tensor to its element size."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(2, 3, 1, generator=g).half(),
        "d.i32": torch.randint(-(2**31), 2**31 - 1, (9,), generator=g, dtype=torch.int32),
        "e.u8": torch.randint(0, 255, (5, 3), generator=g, dtype=torch.uint8),
        "f.i64": torch.arange(3),
        "g.f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "h.empty": torch.zeros(0, 4),
        "i.scalar": torch.tensor(1.5),
        "j.bool": torch.tensor([True, False, True]),
        "k.f32t": torch.randn(4, 6, generator=g).T,  # not contiguous
    }
    writer = ShardWriter(tmp_path, max_bytes=10**9)
    for k, v in tensors.items():
        writer.add(k, v)
    assert writer.close() == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and torch.equal(got, v), k
    raw = (tmp_path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert (8 + n) % 8 == 0
    for k, meta in header.items():
        if k != "__metadata__":
            assert meta["data_offsets"][0] % tensors[k].element_size() == 0, k
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "ref.safetensors"))
    assert load_file(str(tmp_path / "ref.safetensors")).keys() == load_file(str(tmp_path / "model.safetensors")).keys()


SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.pipeline import quantize_folder

    src, out, work, kill_after = sys.argv[1], sys.argv[2], sys.argv[3] or None, int(sys.argv[4])
    windows = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(5))

    def on_layer_done(i):
        if i == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: as a crash or an OOM kill

    quantize_folder(src, windows, QuantConfig(bits=3, group_size=16, fp_target_alpha=0.5, device="cpu"), out,
                    batch_size=2, work_dir=work, progress=False, on_layer_done=on_layer_done, max_shard_size="30KB")
    """
)


def test_streamed_run_killed_mid_stream_resumes_bit_for_bit(tmp_path):
    model = tiny_model("deepseek_v3", seed=6)  # 3 layers, the first dense
    model.to(torch.bfloat16).save_pretrained(tmp_path / "fp")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out, work, kill_after):
        cmd = [sys.executable, str(script), str(tmp_path / "fp"), str(out), work, str(kill_after)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    straight = run(tmp_path / "straight", "", -1)
    assert straight.returncode == 0, straight.stderr
    killed = run(tmp_path / "resumed", str(tmp_path / "work"), 1)
    assert killed.returncode == -9
    assert not (tmp_path / "resumed").exists()  # nothing at --out
    assert len(list(tmp_path.glob(".resumed.tmp-*"))) == 1  # what kill -9 leaves: the folder under construction
    assert (tmp_path / "work" / "layer_0001.safetensors").exists()
    assert not (tmp_path / "work" / "layer_0002.safetensors").exists()
    resumed = run(tmp_path / "resumed", str(tmp_path / "work"), -1)
    assert resumed.returncode == 0, resumed.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # removed by the next run
    names = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert "model.safetensors.index.json" in names
    for name in names:
        if name.endswith((".safetensors", ".json")):
            assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_load_checkpoint_honours_dtype_and_device_map(tmp_path):
    model = tiny_model("olmoe", seed=4)
    windows = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    res = quantize_model(model, windows, QuantConfig(bits=4, group_size=16, method="gptq"), progress=False)
    save_checkpoint(model, res, tmp_path / "q")
    half = load_checkpoint(tmp_path / "q", dtype=torch.float16, device_map={"": "cpu", "lm_head": "cpu"})
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    with torch.no_grad():
        got = half(input_ids=windows).logits.float()
        ref = _serving(model, torch.float16)(input_ids=windows).logits.float()
    assert torch.equal(got, ref)
    with pytest.raises(CheckpointError, match="device_map"):
        load_checkpoint(tmp_path / "q", device_map=["cpu"])


def test_device_settings_are_checked():
    with pytest.raises(ConfigError, match="not a device"):
        QuantConfig(device="gpu0")
    with pytest.raises(ConfigError, match="offload"):
        QuantConfig(offload="disk")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


def test_a_folder_that_does_not_match_its_config_is_refused(tmp_path):
    model = tiny_model("mixtral", seed=0)
    model.save_pretrained(tmp_path / "fp")
    cfg = json.loads((tmp_path / "fp" / "config.json").read_text())
    cfg["intermediate_size"] = 32  # the experts on disk are 64 wide
    (tmp_path / "fp" / "config.json").write_text(json.dumps(cfg))
    windows = torch.randint(0, 96, (2, 16))
    with pytest.raises(ModelSourceError, match="does not describe these weights"):
        quantize_folder(tmp_path / "fp", windows, QuantConfig(bits=4, group_size=16, method="gptq"), tmp_path / "q",
                        progress=False)  # fmt: skip
    assert not (tmp_path / "q").exists() and [p.name for p in tmp_path.iterdir()] == ["fp"]
    with pytest.raises(ModelSourceError, match=r"no config\.json"):
        ModelSource(tmp_path)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_streamed_vsraq_holds_one_layer_of_experts(family, tmp_path, monkeypatch):
    """The look-ahead to the next router reads that layer without its routed experts: a streamed VSRAQ run never
    holds two layers' experts at once (at DeepSeek-V3 widths one layer's are ~45 GB in float32), and the layer
    it reads so has real attention and router weights (the look-ahead's logits equal the in-memory run's: the
    codes of ``test_streamed_equals_in_memory_on_every_family``)."""
    from vsraq_plugin.streaming import StreamedLayers

    model = tiny_model(family, seed=2)
    model.save_pretrained(tmp_path / "fp")
    windows = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    peak, partial = [0], [0]
    onload = StreamedLayers.onload

    def counting(self, index, experts=True):
        layer = onload(self, index, experts)
        real = [lay for lay in self.layers if lay.is_moe and not lay.experts.gate_up_proj.is_meta]
        peak[0] = max(peak[0], len(real))
        if layer.is_moe and not experts:
            partial[0] += 1
            assert layer.experts.gate_up_proj.is_meta and layer.experts.down_proj.is_meta
            assert not layer.router.weight.is_meta
            assert not any(p.is_meta for p in layer.attention.parameters())
        return layer

    monkeypatch.setattr(StreamedLayers, "onload", counting)
    cfg = QuantConfig(bits=4, group_size=16, method="vsraq", device="cpu")
    quantize_folder(tmp_path / "fp", windows, cfg, tmp_path / "str", batch_size=2, progress=False)
    assert partial[0] >= 1 and peak[0] == 1


def test_streamed_results_reach_the_sink_without_their_dequantized_weights(tmp_path, monkeypatch):
    """A streamed layer's results go to the checkpoint as codes, scales and zeros only: the dequantized weight
    (the model's float32 parameter; 45 GB a layer at DeepSeek-V3's widths) is never copied to the host for the
    sink, which packs the codes where they were solved and moves the packed words. The checkpoint is unchanged
    (``test_streamed_equals_in_memory_on_every_family``)."""
    from vsraq_plugin.checkpoint import StreamingCheckpoint

    model = tiny_model("qwen3_moe", seed=2)
    model.save_pretrained(tmp_path / "fp")
    windows = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    seen = []
    write = StreamingCheckpoint.write_layer

    def recording(self, layer, weights):
        seen.extend(weights.values())
        return write(self, layer, weights)

    monkeypatch.setattr(StreamingCheckpoint, "write_layer", recording)
    cfg = QuantConfig(bits=4, group_size=16, method="vsraq", device="cpu")
    quantize_folder(tmp_path / "fp", windows, cfg, tmp_path / "str", batch_size=2, progress=False)
    assert len(seen) > model.config.num_hidden_layers  # every layer's linears and experts
    assert all(qw.weight is None and qw.codes.dtype == torch.uint8 for qw in seen)


def test_a_run_freezes_what_was_alive_collects_its_own_cycles_and_hands_the_freeze_back(tmp_path, monkeypatch):
    """The per-layer collection skips the objects alive before the run (``frozen_imports``), still frees the
    reference cycles a layer leaves, and leaves the collector as it found it: unfrozen, or frozen by the caller."""
    import gc
    import weakref

    from vsraq_plugin import pipeline

    class Cycle:
        pass

    model = tiny_model("qwen3_moe", seed=2)
    windows = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=4, group_size=16, method="gptq", device="cpu")
    frozen, freed = [], []
    release = pipeline.release_host_memory

    def watching():
        frozen.append(gc.get_freeze_count())
        a = Cycle()
        a.me = a  # a cycle made inside the run: only the collector frees it
        ref = weakref.ref(a)
        del a
        release()
        freed.append(ref() is None)

    monkeypatch.setattr(pipeline, "release_host_memory", watching)
    gc.unfreeze()
    quantize_model(model, windows, cfg, progress=False)
    assert frozen and all(n > 1000 for n in frozen) and all(freed)
    assert gc.get_freeze_count() == 0
    gc.freeze()  # the caller's own freeze is left alone: neither extended nor handed back
    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
    try:
        quantize_model(tiny_model("qwen3_moe", seed=2), windows, cfg, progress=False)
        assert calls == [] and gc.get_freeze_count() > 1000
    finally:
        monkeypatch.undo()
        gc.unfreeze()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
def test_cuda_streamed_run_packs_on_the_device_and_equals_in_memory(tmp_path, monkeypatch):
    """On a GPU the streamed results reach the sink on the device, its packed tensors come back on the host, and
    the checkpoint has the in-memory run's codes (both solved on the GPU)."""
    from vsraq_plugin import checkpoint

    model = tiny_model("qwen3_moe", seed=2)
    model.save_pretrained(tmp_path / "fp")
    windows = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=3, group_size=16, method="vsraq", device="cuda")
    devices, packed = set(), []
    layer_tensors = checkpoint.layer_tensors

    def recording(adapter, layer, weights, *args, **kwargs):
        devices.update(qw.codes.device.type for qw in weights.values())
        out = layer_tensors(adapter, layer, weights, *args, **kwargs)
        packed.extend(out.values())
        return out

    monkeypatch.setattr(checkpoint, "layer_tensors", recording)
    quantize_folder(tmp_path / "fp", windows, cfg, tmp_path / "str", batch_size=2, progress=False)
    assert devices == {"cuda"} and packed and all(t.device.type == "cpu" for t in packed)
    monkeypatch.setattr(checkpoint, "layer_tensors", layer_tensors)
    mem_model = load_model(tmp_path / "fp")
    res = quantize_model(mem_model, windows, cfg, batch_size=2, progress=False)
    save_checkpoint(mem_model, res, tmp_path / "mem")
    _assert_same_codes(_checkpoint(tmp_path / "mem"), _checkpoint(tmp_path / "str"))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_in_memory_onload_without_experts_moves_all_but_the_experts(family):
    """``InMemoryLayers.onload(i, experts=False)`` moves every tensor of the layer but its routed experts' to the
    solve device (here the meta device stands in for a GPU: what moved is what became meta)."""
    from vsraq_plugin.streaming import InMemoryLayers

    model = tiny_model(family, seed=2)
    store = InMemoryLayers(model, torch.device("meta"))
    index = next(i for i, lay in enumerate(store.layers) if lay.is_moe)
    layer = store.onload(index, experts=False)
    inside = {id(t) for t in [*layer.experts.parameters(), *layer.experts.buffers()]}
    tensors = [*layer.layer.parameters(), *layer.layer.buffers()]
    assert inside and all(t.is_meta == (id(t) not in inside) for t in tensors)


@pytest.mark.parametrize(
    ("family", "method", "exact", "extra"),
    [
        ("mixtral", "gptq", True, {}),
        ("mixtral", "vsraq", True, {}),
        ("deepseek_v3", "vsraq", True, {}),
        ("qwen2_moe", "vsraq", False, {}),
        ("olmoe", "vsraq", True, {"lambda_metric_up": 64.0}),
        ("mixtral", "vsraq", True, {"bits_budget": 3.0, "bit_levels": [2, 4]}),  # measured, widths per projection
        ("qwen2_moe", "gptq", True, {"bits_budget": 2.5, "bit_levels": [2, 3], "width_per_projection": False}),
        ("olmoe", "gptq", True, {"bits_budget": 3.0, "bit_levels": [2, 4], "allocation": "random"}),  # mixed chunks
    ],
)
def test_expert_chunks_hold_one_chunk_and_change_no_code(family, method, exact, extra, monkeypatch):
    """``expert_chunk``: a layer's routed experts get their Hessians built and solved a chunk at a time, so no
    accumulator ever holds more than a chunk's Hessians (DeepSeek-V3's 256 gate/up ones are 105 GB in float64),
    and the codes, grids and fallback notes (starved experts on these few tokens) are those of one chunk. The
    gate/up metric (``lambda_metric_up``, ``(E, 2I, 2I)``) is built per chunk too, and the measured allocation
    (``bits_budget``) solves every chunk at every width, keeps each width's results as codes only, and chooses the
    same widths."""
    from vsraq_plugin.gptq import HessianAccumulator

    windows = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(0))
    runs, sizes = {}, []
    measured = "bits_budget" in extra and extra.get("allocation", "measured") == "measured"
    init = HessianAccumulator.__init__

    def spy(self, in_features, num_matrices=1, *args, **kwargs):
        sizes.append(num_matrices)
        init(self, in_features, num_matrices, *args, **kwargs)

    monkeypatch.setattr(HessianAccumulator, "__init__", spy)
    from vsraq_plugin import vsraq as vsraq_math

    metrics, up_path = [], vsraq_math.up_path_matrices

    def up_spy(A, down, *args):
        metrics.append(down.shape[0])
        return up_path(A, down, *args)

    monkeypatch.setattr(vsraq_math, "up_path_matrices", up_spy)
    from vsraq_plugin import pipeline

    kept, add = [], pipeline._Measured.add

    def add_spy(self, part, width, qw, *args):  # every width's results: codes only, no float32 weights
        kept.append(qw.weight is None and qw.codes.dtype == torch.uint8)
        return add(self, part, width, qw, *args)

    monkeypatch.setattr(pipeline._Measured, "add", add_spy)
    for chunk in (0, 3):
        sizes.clear()
        metrics.clear()
        model = tiny_model(family, seed=2)
        cfg = QuantConfig(
            bits=3, group_size=16, method=method, device="cpu", exact_sums=exact, expert_chunk=chunk, **extra
        )
        res = quantize_model(model, windows, cfg, batch_size=2, progress=False)
        runs[chunk] = res, max(sizes)
        assert all(kept) and bool(kept) == measured
        assert bool(metrics) == ("lambda_metric_up" in extra) and all(m <= (chunk or 99) for m in metrics)
    (full, widest), (chunked, chunk_widest) = runs[0], runs[3]
    assert widest == model.config.num_local_experts if family == "mixtral" else widest > 3
    assert chunk_widest == 3
    assert full.weights.keys() == chunked.weights.keys()
    for name, qw in full.weights.items():
        other = chunked.weights[name]
        for attr in ("codes", "scales", "zeros", "g_idx", "weight"):
            assert torch.equal(getattr(qw, attr), getattr(other, attr)), (name, attr)
    assert ("expert_bits" in full.summary) == ("bits_budget" in extra)
    for key in ("expert_bits", "expert_down_bits"):
        assert full.summary.get(key) == chunked.summary.get(key)
    if "bits_budget" in extra:  # not vacuous: some experts got each width
        assert {b for per_layer in full.summary["expert_bits"].values() for b in per_layer} == set(extra["bit_levels"])
        if measured and extra.get("width_per_projection", True):  # downs solved again on their gate/up, per chunk
            assert full.summary["expert_down_bits"] != full.summary["expert_bits"]
    notes = full.summary["fallbacks"]
    assert any(f["action"] == "all-token coverage" for f in notes)  # the chunks' local indices mapped back
    key = lambda f: json.dumps(f, sort_keys=True)  # noqa: E731
    assert sorted(map(key, notes)) == sorted(map(key, chunked.summary["fallbacks"]))
