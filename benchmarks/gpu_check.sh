#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run of under 10 minutes on an H100/H200: each step has its own
# time limit (together 580 s, under the device tool's 600 s a command), so one slow step cannot eat the others'
# time, and the steps run in order of what a short loan must not miss. Run it from the repository root:
#
#     bash benchmarks/gpu_check.sh            # logs and JSON under $OUT (default ./gpu_check_out)
#
# Steps:
#   env          nvidia-smi, torch / transformers / triton versions, and an import of the plugin's pipeline and
#                the three fixture families (the carried wheels are dropped if that import fails with them)
#   kernels      tests/test_kernels.py compiled for the GPU (not the interpreter), 8 pytest workers (compiles),
#                and the two CUDA-only tests: a streamed run packing on the device, the router re-fit's batch form
#   metric       benchmarks/bench_gptq.py --metric --no-exact --fused --device cuda: the fast (low-rank)
#                output-metric solve against GPTQ's solve, 8 experts of each real width, with its columns rounded
#                in torch and by the one-launch kernel (kernels/metric_round.py); the exact wavefront took 4.5 s
#                at OLMoE's down shape alone on an H200, so it is left to a separate run
#   scale        benchmarks/bench_scale.py --device cuda: gptq vs vsraq wall time, peak GPU memory and host RSS
#                on a random Qwen3-MoE at Qwen3-30B-A3B's widths with its 128 experts (2 layers)
#   scale-fused  the same vsraq run with VSRAQ_ROUND_KERNEL=1 (the metric rounding as one launch per column)
#   profile      (GPU_CHECK_PROFILE=1 only) benchmarks/profile_quantize.py on the scale step's model: vsraq under
#                cProfile (where the host waits for the device): the listing in the log
#   fixture      benchmarks/gpu_fixture.py: the shipped fixture quantized on the GPU and on the CPU, gptq and
#                vsraq at W3g64 (codes equal on >= 99.9 % of weights, agreement / KL / perplexity side
#                by side), then tiny-qwen3-moe and tiny-deepseek-v3 on the GPU alone; vsraq / gptq GPU time
#   bench        benchmarks/bench_kernels.py: dense and fused-MoE kernels at Mixtral / Qwen3-30B shapes, speed
#                against fp16 matmul and the per-expert loop, error against dequantize-then-matmul; then the
#                mixed-width layer (widths 2/3/4 at Qwen3-30B-A3B's expert shape): one launch pair reading each
#                expert's width from a table against one pair per width and a uniform W4 layer
#
# The machine's image may lack packages the project needs or carry an older transformers: put wheels in ./.whl
# (see the device tool's README) and they are installed into /tmp/site first. For transformers 5.25 on an image
# with 5.17 (H200, 2026-12): transformers, huggingface_hub 2.x, httpx2, httpcore2, truststore, click, regex,
# tomlkit and kernels (without kernels, 5.25's from_pretrained refuses to load on a CUDA machine).
#
# Measured once on an H200 (README, "Measured on a GPU"): env 15 s, kernels 38 s, scale 137 s, bench 96 s.
# $OUT receives at most 8 files (the device tool's limit): the step logs. The JSON and the raw profile stay
# in /tmp; the tables and the profile's listing are in the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" SITE=1
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
probe='import torch, transformers, triton, vsraq_plugin.pipeline
from transformers import DeepseekV3ForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM
print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())'
if [ -n "${SITE:-}" ] && ! python3 -c "$probe" >/tmp/import_with_wheels.log 2>&1; then
  echo "the carried wheels break the import (below); running on the image's own packages"
  tail -n 5 /tmp/import_with_wheels.log
  export PYTHONPATH=${PYTHONPATH%:/tmp/site}
fi
step env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; python3 -c '$probe'"
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")  # pytest-xdist, where the image has it
step kernels 90 python3 -m pytest -q -x $workers -p no:cacheprovider tests/test_kernels.py \
  tests/test_streaming.py::test_cuda_streamed_run_packs_on_the_device_and_equals_in_memory \
  tests/test_vsraq.py::test_cuda_router_excess_takes_the_batch_form_and_equals_the_cpu_loop
step metric 60 python3 benchmarks/bench_gptq.py --metric --no-exact --fused --experts 8 --repeats 2 --device cuda
step scale 150 python3 benchmarks/bench_scale.py --layers 2 --experts 128 --methods gptq vsraq --device cuda \
  --threads 16 --n-samples 64 --work /tmp/vsraq-scale --out /tmp/vsraq-scale/bench_scale.json
step scale-fused 90 env VSRAQ_ROUND_KERNEL=1 python3 benchmarks/bench_scale.py --layers 2 --experts 128 --methods vsraq \
  --device cuda --threads 16 --n-samples 64 --work /tmp/vsraq-scale --out /tmp/vsraq-scale/bench_scale_fused.json
if [ -n "${GPU_CHECK_PROFILE:-}" ]; then  # a second run: 90 s more than the one 600-s command holds
  step profile 120 python3 benchmarks/profile_quantize.py /tmp/vsraq-scale/qwen3moe-2L --methods vsraq --device cuda \
    --threads 16 --n-samples 64 --top 30 --out /tmp/vsraq-prof/prof
fi
step fixture 90 python3 benchmarks/gpu_fixture.py --bits 3 --methods gptq vsraq --threads 16 --cpu-models 1 \
  --models src/vsraq_plugin/data/tiny-mixtral benchmarks/fixtures/tiny-qwen3-moe benchmarks/fixtures/tiny-deepseek-v3
step bench 70 python3 benchmarks/bench_kernels.py --cases dense moe mixed --mixed-widths 2 3 4 --m 1 64 4096
echo "gpu_check: $([ $status -eq 0 ] && echo ALL PASSED || echo SOME STEPS FAILED) (logs in $OUT)"
exit $status
