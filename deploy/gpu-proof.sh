#!/usr/bin/env bash
# The GPU proof (README "The GPU proof"): tests/test_cuda.py, then model-only and end-to-end
# figures at the production model sizes, bf16 and fp32, batch 16 and 32, one profiled batch and
# the bf16/fp32 label difference, into one JSON. No Ray and no network: the in-process flow.
#
#   deploy/gpu-proof.sh [OUT.json] [options of python -m engine.bench.gpu_proof]
#
# Needs PyTorch with CUDA, transformers, pyarrow, pillow, numpy, scikit-image, imagecodecs and
# webdataset (with braceexpand). Offline, bring the last three as wheels in WHEELS (a folder):
# they are installed into a scratch site first.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-proof.json}
shift || true
if [ -n "${WHEELS:-}" ]; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 -m engine.bench.gpu_proof --out "$out" "$@"
