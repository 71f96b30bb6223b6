"""Faults a run must survive (issue #17): SIGINT and SIGTERM leave nothing at --out and resume bit for bit (kill -9
is covered by test_resume.py and test_streaming.py); a disk that fills up mid-checkpoint leaves the previous output
intact and says why in one line; two runs writing the same --out do not mix (the second is refused while the first
holds the folder's lock); what a killed run leaves beside --out does not block the next; no checkpoint ever holds a
NaN or Inf (both writers refuse it, naming the tensor)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import vsraq_plugin
from tiny_models import tiny_model
from vsraq_plugin import checkpoint
from vsraq_plugin.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vsraq_plugin.cli import fixture_path, load_model, main
from vsraq_plugin.config import QuantConfig
from vsraq_plugin.pipeline import quantize_model

ARGS = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--seq-len", "16", "--n-samples", "4", "--threads",
        "1"]  # fmt: skip

# Runs ``vsraq`` with a fault injected: SIGINT to itself after a layer, SIGTERM to itself in the middle of writing
# layer 1's tensors, or a pause after layer 0 (holding --out) until the test says go.
SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from vsraq_plugin import checkpoint, cli, pipeline

    mode, arg, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    stock_quantize_folder = pipeline.quantize_folder

    def quantize_folder(*args, **kwargs):
        def on_layer_done(i):
            if mode == "sigint-after-layer" and i == int(arg):
                os.kill(os.getpid(), signal.SIGINT)
            if mode == "pause-after-layer-0" and i == 0:
                Path(arg + ".ready").write_text(str(os.getpid()))
                while not Path(arg + ".go").exists():
                    time.sleep(0.05)

        return stock_quantize_folder(*args, on_layer_done=on_layer_done, **kwargs)

    pipeline.quantize_folder = quantize_folder
    if mode == "sigterm-mid-write":
        stock_add, seen = checkpoint.ShardWriter.add, []

        def add(self, name, tensor):
            if name.startswith("model.layers.1."):
                seen.append(name)
                if len(seen) == 3:  # some of layer 1's tensors spooled, the rest not
                    os.kill(os.getpid(), signal.SIGTERM)
            return stock_add(self, name, tensor)

        checkpoint.ShardWriter.add = add
    sys.exit(cli.main(argv))
    """
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("fp")
    tok = AutoTokenizer.from_pretrained(fixture_path())
    model = tiny_model("mixtral", seed=2)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(root / "m")
    tok.save_pretrained(root / "m")
    (root / "m" / "calib.txt").write_text((fixture_path() / "calib.txt").read_text()[:6000])
    (root / "run.py").write_text(SCRIPT)
    return root / "m"


@pytest.fixture(scope="module")
def straight(model_dir, tmp_path_factory) -> Path:
    """The checkpoint of an uninterrupted run (in this process)."""
    out = tmp_path_factory.mktemp("straight") / "q"
    assert main(["quantize", str(model_dir), "--out", str(out), *ARGS]) == 0
    return out


def _cmd(model_dir: Path, mode: str, arg: str, *argv: str) -> list[str]:
    return [sys.executable, str(model_dir.parent / "run.py"), mode, arg, *argv]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(folder: Path) -> list[str]:
    """Temporary folders, lock files, backups: everything hidden beside the outputs."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    ("mode", "arg", "signal_name", "code", "layers_saved"),
    [("sigint-after-layer", "0", "SIGINT", 130, 1), ("sigterm-mid-write", "-", "SIGTERM", 143, 2)],
)
def test_interrupted_run_leaves_nothing_at_out_and_resumes_bit_for_bit(
    mode, arg, signal_name, code, layers_saved, model_dir, straight, tmp_path
):
    out, work = tmp_path / "q", tmp_path / "work"
    argv = ["quantize", str(model_dir), "--out", str(out), "--resume-dir", str(work), *ARGS]
    killed = subprocess.run(_cmd(model_dir, mode, arg, *argv), env=_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == code, killed.stderr
    assert "Traceback" not in killed.stderr
    last = killed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vsraq quantize: interrupted by {signal_name}; nothing was written to {out}"), last
    assert "rerun the same command to resume" in last
    assert not out.exists()
    assert _leftovers(tmp_path) == []  # no temporary folder, no lock of --out or --resume-dir
    saved = sorted(p.name for p in work.glob("layer_*.safetensors"))
    assert saved == [f"layer_{i:04d}.safetensors" for i in range(layers_saved)]

    assert main(argv) == 0  # the same command resumes
    assert _files(out) == _files(straight)  # bit for bit: tensors, configs, tokenizer
    assert _leftovers(tmp_path) == []


def test_a_second_run_on_the_same_out_is_refused_while_the_first_writes(model_dir, straight, tmp_path, capsys):
    out, flag = tmp_path / "q", tmp_path / "flag"
    argv = ["quantize", str(model_dir), "--out", str(out), *ARGS]
    first = subprocess.Popen(_cmd(model_dir, "pause-after-layer-0", str(flag), *argv), env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not Path(f"{flag}.ready").exists():
            assert first.poll() is None, first.communicate()[1]
            assert time.monotonic() < deadline, "the first run never reached layer 0"
            time.sleep(0.1)
        # The first run holds --out (its folder is under construction): a second one is refused at once, with or
        # without --overwrite, from the command line and from Python, and touches nothing.
        for extra in ([], ["--overwrite"]):
            capsys.readouterr()
            assert main([*argv, *extra]) == 2
            last = capsys.readouterr().err.strip().splitlines()[-1]
            assert f"another vsraq run (pid {first.pid}) is writing {out}" in last, last
        with pytest.raises(CheckpointError, match=f"another vsraq run \\(pid {first.pid}\\)"):
            vsraq_plugin.quantize(model_dir, model_dir / "calib.txt", QuantConfig(method="rtn", group_size=32),
                                  out=out, overwrite=True, progress=False)  # fmt: skip
        assert not out.exists()
    finally:
        Path(f"{flag}.go").touch()
        _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert _files(out) == _files(straight)  # the first run's checkpoint, whole and unmixed
    # Once it is done, a run with --overwrite replaces the folder whole (here with another width).
    assert main([*argv, "--bits", "3", "--overwrite"]) == 0
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 3
    assert load_checkpoint(out).model.layers[0].self_attn.q_proj.bits == 3
    assert _leftovers(tmp_path) == []


def test_two_runs_sharing_a_resume_dir_are_refused(model_dir, tmp_path, capsys):
    work = tmp_path / "work"
    with checkpoint.FolderLock(work, "--resume-dir"):  # as a running `vsraq quantize --resume-dir work` holds it
        capsys.readouterr()
        argv = ["quantize", str(model_dir), "--out", str(tmp_path / "q"), "--resume-dir", str(work), *ARGS]
        assert main(argv) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"another vsraq run (pid {os.getpid()}) is writing {work}; wait for it" in last, last
    assert not (tmp_path / "q").exists() and not work.exists()
    assert _leftovers(tmp_path) == []


class FullDisk:
    """A file whose writes fail with ENOSPC once the disk's ``budget`` (bytes, shared by every file) is spent."""

    def __init__(self, f, budget: list[int]) -> None:
        self._f, self._budget = f, budget

    def write(self, data) -> int:
        n = len(data)
        if n > self._budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._f.name)
        self._budget[0] -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("stage", ["spool", "shard", "config"])
@pytest.mark.parametrize("writer", ["streamed", "in-memory"])
def test_a_full_disk_leaves_the_previous_output_intact(
    writer, stage, model_dir, straight, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "q"
    shutil.copytree(straight, out)  # the previous output, replaced with --overwrite
    before = _files(out)
    shard = (straight / "model.safetensors").read_bytes()
    size, data = len(shard), len(shard) - 8 - int.from_bytes(shard[:8], "little")
    # Every tensor byte is written twice (spooled, then assembled into the shard after its header), then the
    # configs (a few KiB): the disk fills up in the stage named.
    budget = [{"spool": data // 3, "shard": data + size // 2, "config": data + size + 64}[stage]]
    monkeypatch.setattr(checkpoint, "_open_for_write", lambda path: FullDisk(open(path, "wb"), budget))  # noqa: SIM115
    if writer == "streamed":
        capsys.readouterr()
        assert main(["quantize", str(model_dir), "--out", str(out), "--overwrite", *ARGS]) == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]
    else:
        model = load_model(model_dir)
        result = quantize_model(model, None, QuantConfig(method="rtn", group_size=32), progress=False)
        with pytest.raises(CheckpointError) as info:
            save_checkpoint(model, result, out, overwrite=True)
        message = str(info.value)
    assert "the disk is full (No space left on device)" in message, message
    assert f"{out} was left as it was" in message
    assert _files(out) == before
    assert _leftovers(tmp_path) == []


def test_a_non_finite_tensor_is_never_written(model_dir, tmp_path, monkeypatch, capsys):
    """Both writers check every tensor before it goes to disk: a NaN or Inf aborts the checkpoint, naming it."""
    model = load_model(model_dir)
    result = quantize_model(model, None, QuantConfig(method="rtn", group_size=32), progress=False)
    result.weights["model.layers.0.self_attn.k_proj"].scales[0, 1, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"refusing to write model\.layers\.0\.self_attn\.k_proj\.scales: it"):
        save_checkpoint(model, result, tmp_path / "mem")
    assert not (tmp_path / "mem").exists()

    bad = "model.layers.1.block_sparse_moe.experts.2.w1.scales"
    stock = checkpoint.layer_tensors

    def poisoned(*args, **kwargs):
        tensors = stock(*args, **kwargs)
        if bad in tensors:
            tensors[bad][0, 0] = float("nan")
        return tensors

    monkeypatch.setattr(checkpoint, "layer_tensors", poisoned)
    capsys.readouterr()
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "str"), *ARGS]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"refusing to write {bad}: it holds 1 NaN/Inf value(s)" in last, last
    assert not (tmp_path / "str").exists()
    assert _leftovers(tmp_path) == []


def test_what_a_killed_run_left_beside_out_does_not_block_the_next(model_dir, tmp_path):
    """kill -9 leaves a lock file (no longer held), a temporary folder, and, if it struck between the two renames
    of a replacement, the previous output under a backup name: the next run takes the lock, removes the temporary
    folder and restores the backup."""
    model = load_model(model_dir)
    result = quantize_model(model, None, QuantConfig(method="rtn", group_size=32), progress=False)
    out = tmp_path / "q"
    (tmp_path / ".q.lock").write_text("999999\n")
    (tmp_path / ".q.tmp-dead").mkdir()
    (tmp_path / ".q.tmp-dead" / ".spool-0-4").write_bytes(b"x" * 100)
    save_checkpoint(model, result, out)
    assert _leftovers(tmp_path) == []
    before = _files(out)
    out.rename(tmp_path / ".q.old")
    with pytest.raises(CheckpointError, match="exists and is not empty"):  # the restored output is not overwritten
        save_checkpoint(model, result, out)
    assert _files(out) == before
    assert _leftovers(tmp_path) == []


def test_debug_shows_the_traceback_and_keeps_the_exit_status(tmp_path, capsys):
    argv = ["quantize", str(tmp_path / "none"), "--out", str(tmp_path / "q"), "--method", "rtn"]
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "CLIError" in err
    assert err.strip().splitlines()[-1].startswith("vsraq quantize: error: model folder")
    assert main([*argv, "--debug"]) == 2  # after the command too
    assert "Traceback" in capsys.readouterr().err


def test_an_unexpected_failure_is_one_line_with_exit_status_1(model_dir, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("something deep inside\nover two lines")

    monkeypatch.setattr(vsraq_plugin.pipeline, "quantize_folder", broken)
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "q"), "--method", "rtn"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "vsraq quantize: internal error (RuntimeError: something deep inside over two lines); rerun with --debug "
        "for the traceback and report it."
    )
    assert not (tmp_path / "q").exists()


def test_sigterm_handler_is_restored_after_main(tmp_path):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    main(["quantize", str(tmp_path / "none"), "--out", str(tmp_path / "q")])
    assert signal.getsignal(signal.SIGTERM) is before


def test_checkpoint_in_memory_with_inf_weights_is_refused_before_any_work():
    model = tiny_model("qwen2_moe", seed=1)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[2, 3] = float("-inf")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.v_proj\.weight holds 1 NaN/Inf"):
        quantize_model(model, None, QuantConfig(method="rtn", group_size=16), progress=False)
