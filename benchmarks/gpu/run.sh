#!/usr/bin/env bash
# GPU sizing benchmark for a GPU node (H200-class, 16 cores, torch with CUDA, CPU-only onnxruntime is fine).
#   benchmarks/gpu/run.sh                       # ~5 min: GPU ceiling + decode throughput + sizing
#   ORT_CUDA=1 benchmarks/gpu/run.sh            # also the embedded backend on CUDA (needs onnxruntime-gpu)
#   benchmarks/gpu/run.sh --cpu-smoke           # tiny, CPU only: checks the script anywhere (~30 s)
# Results: benchmarks/gpu/results/<host>-<UTC time>/{gpu_bench.json,summary.md} (OUT=... to change).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-benchmarks/gpu/results/$(hostname)-$(date -u +%Y%m%dT%H%M%SZ)}
EXTRA=()
[ "${ORT_CUDA:-0}" = 1 ] && EXTRA+=(--ort-cuda)
exec timeout "${TIMEOUT_S:-480}" "$PY" benchmarks/gpu/gpu_bench.py --out "$OUT" "${EXTRA[@]}" "$@"
