#!/usr/bin/env bash
# Issue #3's benchmark matrix: LeNet-5 at concurrency 1 and 32, without and with 10-crop,
# on both backends (embedded ONNX Runtime, and Triton via `imgserve triton-local`).
# Writes one JSON + one PNG per (backend, 10-crop) cell and a summary table into $OUT, by default a
# fresh runs/bench-lenet5-<time>/ (git-ignored): a run never overwrites the committed results unless
# told to with OUT=benchmarks/results.
#
#   benchmarks/run_lenet.sh                       # the full matrix, 20 s per step
#   DURATION=5 BACKENDS=embedded benchmarks/run_lenet.sh
#   OUT=benchmarks/results benchmarks/run_lenet.sh   # refresh the committed results
#
# Settings (environment variables):
#   REPO         model repository holding lenet5 (default model_repository; built with
#                `imgserve build-repo --only lenet5` into a scratch repository when it has no lenet5)
#   OUT          results directory (default runs/bench-lenet5-YYYYmmdd-HHMMSS)
#   BACKENDS     "embedded triton" (default) or either one
#   CONCURRENCY  default 1,32      DURATION  seconds per step, default 20      WARMUP  default 3
#   PROTOCOL     grpc (default) or http
#   GATEWAY_ARGS extra flags for `imgserve serve` (e.g. "--max-queue-delay-ms 1")
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
IMGSERVE=${IMGSERVE:-.venv/bin/imgserve}
REPO=${REPO:-model_repository}
OUT=${OUT:-runs/bench-lenet5-$(date +%Y%m%d-%H%M%S)}
BACKENDS=${BACKENDS:-embedded triton}
CONCURRENCY=${CONCURRENCY:-1,32}
DURATION=${DURATION:-20}
WARMUP=${WARMUP:-3}
PROTOCOL=${PROTOCOL:-grpc}
GATEWAY_ARGS=${GATEWAY_ARGS:-}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/imgserve-bench.XXXXXX")
PIDS=()
cleanup() {
  # Stop only what this script started, newest first (the gateway before the Triton it uses).
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    if kill -0 "${PIDS[i]}" 2>/dev/null; then
      kill -TERM "${PIDS[i]}" 2>/dev/null || true
      wait "${PIDS[i]}" 2>/dev/null || true
    fi
  done
  PIDS=()
}
trap 'cleanup; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

log() { printf '\n== %s\n' "$*" >&2; }
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_ready() {  # URL SECONDS PID LOGFILE: poll until URL answers 200, fail if the process dies
  "$PY" - "$1" "$2" <<'EOF' || { echo "not ready: $1; log $4:" >&2; tail -n 40 "$4" >&2; return 1; }
import sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(1)
EOF
  kill -0 "$3" 2>/dev/null || { echo "process $3 exited; log $4:" >&2; tail -n 40 "$4" >&2; return 1; }
}

# ---- a repository with only lenet5 (so Triton loads nothing else)
mkdir -p "$WORK/repo" "$OUT"
if [[ -f "$REPO/lenet5/config.pbtxt" ]]; then
  cp -r "$REPO/lenet5" "$WORK/repo/"
else
  log "no lenet5 in $REPO: training it (a few CPU minutes)"
  "$IMGSERVE" build-repo --model-repository "$WORK/repo" --only lenet5 --runs-dir "$WORK/runs"
fi

# ---- real MNIST digits (the held-out split) as the request images
log "writing 256 held-out MNIST digits"
"$PY" - "$WORK/digits" <<'EOF'
import sys
from pathlib import Path
from PIL import Image
from export.data.mnist import mnist_split
out = Path(sys.argv[1]); out.mkdir(parents=True)
test = mnist_split().test
for i in range(256):
    Image.fromarray(test.images[i]).save(out / f"{i:03d}_{test.labels[i]}.png")
EOF

start_gateway() {  # BACKEND-ARGS...: sets GW_TARGET
  local grpc_port http_port
  grpc_port=$(free_port); http_port=$(free_port)
  "$IMGSERVE" serve --model-repository "$WORK/repo" --host 127.0.0.1 --grpc-port "$grpc_port" \
    --http-port "$http_port" "$@" $GATEWAY_ARGS >"$WORK/gateway.log" 2>&1 &
  PIDS+=($!)
  wait_ready "http://127.0.0.1:$http_port/readyz" 120 "$!" "$WORK/gateway.log"
  if [[ $PROTOCOL == http ]]; then GW_TARGET="http://127.0.0.1:$http_port"; else GW_TARGET="127.0.0.1:$grpc_port"; fi
}

run_cells() {  # LABEL: the two 10-crop settings against the running gateway
  local label=$1 crop flag name
  for crop in off on; do
    flag=--no-ten-crop; [[ $crop == on ]] && flag=--ten-crop
    name="lenet5_${label}_${PROTOCOL}_tencrop-${crop}"
    log "$label, 10-crop $crop -> $OUT/$name.{json,png}"
    "$IMGSERVE" bench --server "$GW_TARGET" --model lenet5 --images "$WORK/digits" \
      --concurrency "$CONCURRENCY" --duration "$DURATION" --warmup "$WARMUP" "$flag" \
      --label "$label" --json "$OUT/$name.json" --plot "$OUT/$name.png"
  done
}

for backend in $BACKENDS; do
  case $backend in
    embedded)
      log "embedded backend (onnxruntime in the gateway)"
      start_gateway --backend onnxruntime
      run_cells embedded
      cleanup
      ;;
    triton)
      log "Triton backend (imgserve triton-local)"
      tg=$(free_port); th=$(free_port); tm=$(free_port)
      "$IMGSERVE" triton-local --model-repository "$WORK/repo" --grpc-port "$tg" --http-port "$th" \
        --metrics-port "$tm" --work-dir "$WORK/triton" >"$WORK/triton.log" 2>&1 &
      PIDS+=($!)
      wait_ready "http://127.0.0.1:$th/v2/health/ready" 300 "$!" "$WORK/triton.log"
      start_gateway --backend triton --triton-url "127.0.0.1:$tg"
      run_cells triton
      cleanup
      ;;
    *) echo "unknown backend '$backend' (use embedded and/or triton)" >&2; exit 2 ;;
  esac
done

# ---- one table over every result file of this run
"$PY" - "$OUT" $BACKENDS <<'EOF'
import json, sys
from pathlib import Path
out, backends = Path(sys.argv[1]), sys.argv[2:]
rows = ["| backend | protocol | 10-crop | concurrency | req/s | p50 ms | p90 ms | p99 ms | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|"]
for path in sorted(out.glob("lenet5_*.json")):
    doc = json.loads(path.read_text())
    s = doc["settings"]
    if s["label"] not in backends:
        continue
    for step in doc["steps"]:
        lat = step["latency"] or {}
        cells = [f"{lat[k]:.2f}" if k in lat else "-" for k in ("p50_ms", "p90_ms", "p99_ms")]
        rows.append(f"| {s['label']} | {s['protocol']} | {'on' if s['ten_crop'] else 'off'} | {step['concurrency']} | "
                    f"{step['requests_per_s']:.1f} | {' | '.join(cells)} | {step['error_count']} |")
env = doc["environment"] if rows[2:] else {}
note = f"\nHost: {env.get('cpu_count')} CPUs, Python {env.get('python')}, {env.get('platform')}.\n" if env else ""
(out / "summary.md").write_text("\n".join(rows) + "\n" + note)
print("\n".join(rows) + note)
EOF
log "done: $OUT"
