#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run of under 10 minutes on an H100/H200 (each step has its own
# time limit, so one slow step cannot eat the others' time). Run it from the repository root:
#
#     bash benchmarks/gpu_check.sh            # logs and JSON under $OUT (default ./gpu_check_out)
#
# Steps:
#   env          nvidia-smi, torch / transformers / triton versions
#   kernels      tests/test_kernels.py compiled for the GPU (not the interpreter)
#   bench        benchmarks/bench_kernels.py: dense and fused-MoE kernels at Mixtral / Qwen3-30B shapes,
#                speed against fp16 matmul and the per-expert loop, and their error against
#                dequantize-then-matmul (PASS below 1e-2 relative)
#   mixed        benchmarks/bench_kernels.py --cases mixed: a mixed-width layer at Qwen3-30B-A3B's expert shape
#                (hidden 2048, moe intermediate 768, 128 experts, top-8; widths 2/3/4 dealt round-robin), the
#                single launch pair with the per-expert width table against one launch pair per width and
#                against a uniform W4 layer, and its error against the per-expert dequantize loop
#   fixture      benchmarks/gpu_fixture.py: the fixture quantized on the GPU and on the CPU, gptq and vsraq at
#                W4g64 / W3g64: codes equal on >= 99.9 % of weights, agreement / KL / perplexity side by side
#   metric       benchmarks/bench_gptq.py --metric on the GPU: the output-metric solve against GPTQ's solve
#   scale        benchmarks/bench_scale.py on the GPU: gptq vs vsraq wall time, peak GPU memory and host RSS
#                on the Qwen3-30B-A3B-width model (4 layers, 16 experts), each also 4 experts at a time
#                (--expert-chunk 4: the FP gate/up copy moved from pinned host memory per chunk)
#
# The machine's image may lack packages the project needs (optimum, datasets) or carry an older transformers:
# put wheels in ./.whl (see the device tool's README) and they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
status=0
step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  echo "=== $name: exit $rc after $(( $(date +%s) - start ))s"
  [ "$rc" -eq 0 ] || status=1
}
step env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "
import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())"'
step kernels 90 python3 -m pytest -q -x tests/test_kernels.py
step bench 120 python3 benchmarks/bench_kernels.py --cases dense moe --m 1 16 64 512 4096
step mixed 90 python3 benchmarks/bench_kernels.py --cases mixed --mixed-widths 2 3 4 --m 1 16 64 512 4096
step fixture 120 python3 benchmarks/gpu_fixture.py --bits 4 3 --methods gptq vsraq --threads 16
step metric 45 python3 benchmarks/bench_gptq.py --metric --experts 8 --threads 16 --device cuda
step scale 180 python3 benchmarks/bench_scale.py --layers 4 --methods gptq vsraq --device cuda --threads 16 \
  --n-samples 64 --expert-chunk 0 4 --work /tmp/vsraq-scale --out "$OUT/bench_scale.json"
echo "gpu_check: $([ $status -eq 0 ] && echo ALL PASSED || echo SOME STEPS FAILED) (logs in $OUT)"
exit $status
