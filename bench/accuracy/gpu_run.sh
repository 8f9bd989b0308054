#!/usr/bin/env bash
# The accuracy suite on one GPU machine, in one go (run from the repo root, e.g. through the
# device tool, with the family's cache carried along): build neurokern with its CUDA kernels,
# then fine-tune one encoder per task (or reuse the checkpoints a run on this machine left in
# $CKPT_DIR), merge with every method, run the test-time methods (and any --grid ablations) in
# parallel processes, evaluate. No network and no package installs are needed there.
# Results go to $OUT (or ./gpu-out): accuracy.json, accuracy.md, accuracy.png, accuracy-curves.png,
# accuracy.log, build.log. Extra arguments go to the suite (e.g. --family, --grid lr,lambda,
# --tasks a,b, --methods ..., --investigate).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-gpu-out}
mkdir -p "$out"
start=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 -c "import transformers, tokenizers; print('transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)"
} 2>&1 | tee -a "$out/accuracy.log"
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 NEUROKERN_FORCE_CUDA=1 python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$out/accuracy.log"
python3 -m bench.accuracy --device cuda --out "$out" --ckpt-dir "${CKPT_DIR:-/tmp/nk-accuracy-ckpt}" "$@" \
  2>&1 | tee -a "$out/accuracy.log"
echo "total: $(( $(date +%s) - start )) s" | tee -a "$out/accuracy.log"
