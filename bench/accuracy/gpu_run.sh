#!/usr/bin/env bash
# The accuracy suite on one GPU machine, in one go (run from the repo root, e.g. through the
# device tool, with bench/accuracy/cache carried along): build neurokern with its CUDA kernels,
# then fine-tune one MiniLM encoder per task, merge with every method, evaluate. No network and
# no package installs are needed there: the task cache and the fp16 MiniLM copy come with the
# repo (bench/accuracy/prepare.sh makes them on a machine with the packages).
# Results go to $OUT (or ./gpu-out): accuracy.json, accuracy.md, accuracy.png, accuracy.log,
# build.log. Fine-tuned encoders (HF folders) go to ${CKPT_DIR:-/tmp/nk-accuracy-ckpt}, not $OUT.
# Extra arguments go to the suite (e.g. --tta-steps 300, --tasks a,b, --methods ...).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-gpu-out}
cache=${CACHE:-bench/accuracy/cache}
budget=${BUDGET:-540}   # seconds for build + suite; the suite starts no method after it
mkdir -p "$out"
start=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 -c "import transformers, tokenizers; print('transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)"
} 2>&1 | tee "$out/accuracy.log"
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 NEUROKERN_FORCE_CUDA=1 python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
built=$(( $(date +%s) - start ))
echo "build: ${built} s" | tee -a "$out/accuracy.log"
python3 -m neurokern.accuracy --device cuda --data "$cache/data" --model "$cache/minilm-fp16" --out "$out" \
  --ckpt-dir "${CKPT_DIR:-/tmp/nk-accuracy-ckpt}" --investigate --time-budget $(( budget - built )) "$@" \
  2>&1 | tee -a "$out/accuracy.log"
echo "total: $(( $(date +%s) - start )) s" | tee -a "$out/accuracy.log"
