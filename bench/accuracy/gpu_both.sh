#!/usr/bin/env bash
# Both families of the accuracy suite side by side on one GPU machine (run from the repo root with
# bench/accuracy/cache and bench/accuracy/cache-mobilenetv2 carried along): build neurokern with its
# CUDA kernels, then the text suite and the vision suite as two processes, each with its own test-time
# worker processes; after at most $LIMIT seconds (default 540, from the start) both stop and what they
# finished is packed into $OUT/accuracy.tar.gz (each suite rewrites its report after every method).
# TEXT_ARGS / VISION_ARGS: extra arguments of each suite (e.g. --grid lr,lambda,layer --workers 10).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-gpu-out}
limit=${LIMIT:-540}
start=$(date +%s)
mkdir -p "$out/text" "$out/vision"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/env.txt" 2>&1
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 NEUROKERN_FORCE_CUDA=1 python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s" >> "$out/env.txt"
left=$(( limit - ($(date +%s) - start) ))
# Each suite under its own `timeout`, which leads a process group holding the suite's test-time
# workers: killing the group ends the workers of a suite that the time limit stopped.
# shellcheck disable=SC2086
timeout "$left" python3 -m bench.accuracy --device cuda --out "$out/text" --ckpt-dir /tmp/nk-ckpt-text \
  ${TEXT_ARGS:-} > "$out/text/accuracy.log" 2>&1 &
text=$!
# shellcheck disable=SC2086
timeout "$left" python3 -m bench.accuracy --family mobilenetv2 --device cuda --out "$out/vision" \
  --ckpt-dir /tmp/nk-ckpt-vision ${VISION_ARGS:-} > "$out/vision/accuracy.log" 2>&1 &
vision=$!
wait
kill -- "-$text" "-$vision" 2>/dev/null
echo "total: $(( $(date +%s) - start )) s" >> "$out/env.txt"
rm -f "$out"/*/*.tmp
tar czf "$out/accuracy.tar.gz" -C "$out" env.txt build.log text vision && rm -rf "$out/text" "$out/vision"
