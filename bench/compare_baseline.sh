#!/usr/bin/env bash
# A bench script on this tree and on an earlier commit's tree, alternated, in one GPU-machine call:
# the comparison bench/results asks for (the previous code rerun as the baseline on the same machine).
#
#   here:    git archive --format=tar.gz -o .baseline/REV.tar.gz REV     (.baseline/ is git-ignored:
#            name it in the device call's carry)
#   there:   bash bench/compare_baseline.sh .baseline/REV.tar.gz "bench/kernels.py --skip-eager" [ROUNDS]
#
# Each tree is built once (CUDA for sm_90, as bench/gpu_session.sh builds; BUILD=0 skips the builds,
# for trees built by an earlier call on a warm machine), then the command runs ROUNDS times (default
# 2) in each tree, alternated (this tree first), with PYTHONPATH and the working directory set to
# that tree. Round r of tree T writes its log to $OUT/T-r.log and gets --out $OUT/T-r appended
# when APPEND_OUT=1 (the bench scripts' results folder). T is "head" or the archive's name. The
# archive is unpacked once into BASELINE_DIR (default /tmp/neurokern-baseline-<name>).
set -uo pipefail
[ $# -ge 2 ] || { sed -n '2,/^set /p' "$0" | grep '^#'; exit 2; }
archive=$1 command=$2 rounds=${3:-2}
out=${OUT:-compare-out}
head=$(pwd)
name=$(basename "$archive" .tar.gz)
base=${BASELINE_DIR:-/tmp/neurokern-baseline-$name}  # kept for the next call on a warm machine
mkdir -p "$out" "$base"
[ -f "$base/setup.py" ] || tar xzf "$archive" -C "$base" || { echo "cannot unpack $archive"; exit 1; }

build() {  # tree, log
    [ "${BUILD:-1}" = 0 ] && return 0
    (cd "$1" && MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 NEUROKERN_FORCE_CUDA=1 \
        python3 setup.py build_ext --inplace > "$2" 2>&1) || { tail -30 "$2"; return 1; }
}
build "$head" "$out/build-head.log" && build "$base" "$out/build-$name.log" || exit 1

for round in $(seq 1 "$rounds"); do
    for tree in head "$name"; do
        dir=$head; [ "$tree" = head ] || dir=$base
        extra=(); [ "${APPEND_OUT:-0}" = 1 ] && extra=(--out "$out/$tree-$round")
        echo "== $tree, round $round: $command"
        # shellcheck disable=SC2086 (the command's own words)
        (cd "$dir" && PYTHONPATH=$dir PYTHONUNBUFFERED=1 python3 $command "${extra[@]}") > "$out/$tree-$round.log" 2>&1
        echo "   exit $?; $out/$tree-$round.log"
    done
done
