import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from tiny_models import tiny_model
    from vsraq_plugin.checkpoint import save_checkpoint
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.pipeline import quantize_model

    work_dir, out, kill_after = sys.argv[1] or None, sys.argv[2], int(sys.argv[3])
    model = tiny_model("qwen2_moe", seed=4)
    windows = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))

    def on_layer_done(i):
        if i == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: as a crash or an OOM kill

    res = quantize_model(model, windows, QuantConfig(bits=3, group_size=16, desc_act=True), batch_size=2,
                         work_dir=work_dir, progress=False, on_layer_done=on_layer_done)
    save_checkpoint(model, res, out)
    """
)


def _run(tmp_path: Path, work_dir: str, out: Path, kill_after: int) -> subprocess.CompletedProcess:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(script), work_dir, str(out), str(kill_after)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_killed_run_resumes_to_a_bit_identical_checkpoint(tmp_path):
    straight = _run(tmp_path, "", tmp_path / "straight", -1)
    assert straight.returncode == 0, straight.stderr
    work = tmp_path / "work"
    killed = _run(tmp_path, str(work), tmp_path / "resumed", 0)
    assert killed.returncode == -9  # SIGKILL after layer 0
    assert not (tmp_path / "resumed").exists()  # nothing half-written
    assert (work / "layer_0000.safetensors").exists() and not (work / "layer_0001.safetensors").exists()
    resumed = _run(tmp_path, str(work), tmp_path / "resumed", -1)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_vsraq_with_fp_targets_and_quantized_router_resumes_bit_for_bit(tmp_path):
    """The FP stream (FP targets, DESIGN 3.5c) and a quantized router are part of the resumable state: an
    interrupted run resumed from its work dir gives the straight run's codes and routers."""
    import copy

    import pytest
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_model
    from vsraq_plugin.config import QuantConfig
    from vsraq_plugin.pipeline import quantize_model

    fp = tiny_model("mixtral", seed=5)
    windows = torch.randint(0, fp.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(2))
    cfg = QuantConfig(bits=3, group_size=16, fp_target_alpha=0.5, router_mode="quantize")
    straight_model = copy.deepcopy(fp)
    straight = quantize_model(straight_model, windows, cfg, batch_size=2, progress=False)

    def crash(i):
        if i == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(
            copy.deepcopy(fp), windows, cfg, batch_size=2, progress=False, work_dir=tmp_path, on_layer_done=crash
        )
    resumed_model = copy.deepcopy(fp)
    resumed = quantize_model(resumed_model, windows, cfg, batch_size=2, progress=False, work_dir=tmp_path)
    assert straight.weights.keys() == resumed.weights.keys()
    for name, qw in straight.weights.items():
        assert torch.equal(qw.codes, resumed.weights[name].codes), name
    for (n, a), (_, b) in zip(straight_model.named_parameters(), resumed_model.named_parameters(), strict=True):
        assert torch.equal(a, b), n
