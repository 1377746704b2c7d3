#!/usr/bin/env bash
# Issue #11 comparison: raw ONNX Runtime vs the gateway vs Triton direct vs gateway -> Triton, interleaved.
#   benchmarks/compare/run.sh                    # ~20 min on 2 cores: lenet5 (28 px PNG) and resnet18 (224 px PNG)
#   ROUNDS=1 DURATION=2 benchmarks/compare/run.sh  # a quick look
# Models are exported with random weights into $REPO (speed does not depend on the weights).
# Results: $OUT/{lenet5,resnet18}.{json,png,txt}; the exact command is in each JSON ("command").
set -euo pipefail
cd "$(dirname "$0")/../.."
IMGSERVE=${IMGSERVE:-$( [ -x .venv/bin/imgserve ] && echo .venv/bin/imgserve || echo imgserve )}
REPO=${REPO:-runs/bench_repo}
OUT=${OUT:-runs/compare-$(date -u +%Y%m%dT%H%M%SZ)}
ROUNDS=${ROUNDS:-3}; DURATION=${DURATION:-5}; WARMUP=${WARMUP:-1}; CONC=${CONC:-1,8,32}
mkdir -p "$OUT"
for m in lenet5 resnet18; do
  [ -f "$REPO/$m/config.pbtxt" ] || "$IMGSERVE" export "$m" --model-repository "$REPO" >/dev/null
done
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$OUT/load.txt"
run() {  # model image-size paths
  "$IMGSERVE" bench --compare --model-repository "$REPO" -m "$1" --image-size "$2" -c "$CONC" \
    --rounds "$ROUNDS" --duration "$DURATION" --warmup "$WARMUP" --paths "$3" \
    --json "$OUT/$1.json" --plot "$OUT/$1.png" | tee "$OUT/$1.txt"
}
run lenet5 native ort,gateway,triton,gateway-triton
run resnet18 224 ort,gateway,triton,gateway-triton,gateway-10crop
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
