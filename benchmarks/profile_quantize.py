"""Where `vsraq quantize` spends its time: the command run in this process under cProfile, one method at a time.

Prints, per method, the wall time and the plugin's functions by cumulative time (then every function by own
time), and writes the raw profile next to ``--out`` for ``pstats``. On a GPU the work is asynchronous: time
shows up where the host waits for the device (a ``.item()``, a ``bool()`` of a tensor, a copy to the host), so
a function that waits is charged with the launches queued before it. That is how the metric rounding's host
reads were found on an H200 (README, "Measured on a GPU").

    python benchmarks/profile_quantize.py MODEL_DIR --methods gptq vsraq --device cuda --threads 16 \\
        --n-samples 64 --out prof
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="model folder (e.g. one made by bench_scale.py)")
    ap.add_argument("--methods", nargs="+", default=["vsraq"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=40, help="rows of each listing")
    ap.add_argument("--out", type=Path, default=Path("prof"), help="prefix of the .pstats and .txt files")
    args = ap.parse_args()
    from vsraq_plugin.cli import main as cli

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        dest = Path(tempfile.mkdtemp(prefix=f"prof-{method}-"))
        argv = ["quantize", str(args.model), "--method", method, "--bits", str(args.bits), "--group-size"]
        argv += [str(args.group_size), "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len)]
        argv += ["--device", args.device, "--threads", str(args.threads), "--out", str(dest / "q")]
        profile = cProfile.Profile()
        sync()
        t0 = time.perf_counter()
        profile.enable()
        try:
            rc = cli(argv)
        finally:
            profile.disable()
            sync()
            seconds = time.perf_counter() - t0
            shutil.rmtree(dest, ignore_errors=True)
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats("cumulative").print_stats("vsraq_plugin", args.top)
        stats.sort_stats("tottime").print_stats(args.top)
        stats.dump_stats(f"{args.out}_{method}.pstats")
        Path(f"{args.out}_{method}.txt").write_text(text.getvalue())
        print(f"=== {method}: {seconds:.1f} s (exit {rc}); plugin functions by cumulative time:")
        for line in text.getvalue().splitlines()[: args.top + 12]:
            print(line[:160])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
