#!/usr/bin/env bash
# One GPU-machine session (run through the device tool from the repo root): build neurokern with
# its CUDA kernels, run the whole test suite (GPU tests included), then the kernel benchmark.
# Logs and results go to $OUT (or ./gpu-out).
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-gpu-out}
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$out/env.txt"
start=$(date +%s)
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 NEUROKERN_FORCE_CUDA=1 python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
python3 -m pytest -q -p no:cacheprovider ${TEST_PATHS:-tests} 2>&1 | tee "$out/tests.log" | tail -25
[ "${SKIP_BENCH:-0}" = 1 ] || python3 bench/kernels.py 2>&1 | tee "$out/bench.log"
cp bench/results/kernels-*.json bench/results/kernels-*.png "$out/" 2>/dev/null
true
