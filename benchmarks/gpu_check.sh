#!/usr/bin/env bash
# The GPU check: CUDA tests, a 300-step bf16 FD run of the CLIP ViT-B/16 recipe under torchrun
# (loss falls, checkpoint, resume), fp16 with the loss scaler, data.gpu_decode, and
# bench_distill.py --record for the GPU configs -- under 8 minutes on one CUDA GPU; one JSON
# summary (--out, default $OUT/gpu_check.json if $OUT is set, else runs/gpu_check.json).
#
#   bash benchmarks/gpu_check.sh                      # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/gpu_check.json   # CPU, tiny sizes (~1 min)
#
# The logic is benchmarks/gpu_check.py (--help); this wrapper only picks the interpreter:
# $PYTHON, else the repository's .venv, else python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
