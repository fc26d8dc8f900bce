#!/usr/bin/env bash
# The GPU benchmark suite in one command, for a lent GPU machine (see BENCHMARKS.md):
#
#   bash bench/gpu_suite.sh [gpu_suite.py options]
#
# run from anywhere, with the offline wheels in .whl/ (../shared/gpu/wheels.sh .whl, carried
# along). Writes results.json, results.md, logs/ and the updated BENCHMARKS.md under $OUT
# (default ./bench-out).
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
else
  echo "note: no wheels in .whl/: using the packages already installed" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Hopper images set TORCH_CUDA_ARCH_LIST=9.0a, which DeepSpeed's op builder cannot parse;
# rlhf_tasks.runtime.engine normalises it too, this covers anything that builds an op before.
if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  export TORCH_CUDA_ARCH_LIST="$(echo "$TORCH_CUDA_ARCH_LIST" | sed -E 's/([0-9]+\.[0-9]+)[a-z]/\1/g')"
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT="${OUT:-$PWD/bench-out}"
mkdir -p "$OUT"
export RLHF_BENCH_COMMAND="bash bench/gpu_suite.sh${*:+ $*}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
rc=0
python3 bench/gpu_suite.py --out "$OUT" "$@" || rc=$?
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
exit $rc
