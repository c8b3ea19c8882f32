#!/usr/bin/env bash
# The whole job on embedded defaults, on this machine: synthetic ADE20K-layout scenes ->
# Parquet shards -> a tiny SPADE trained on local Ray (2 CPU workers) -> the Serve app on
# 127.0.0.1 -> one synthesis over HTTP from a sample label map, written to a file.
#
#   cluster/scripts/quickstart.sh            # from the repo root, after `pip install -e .`
#
# Environment: QUICKSTART_OUT (default out/quickstart), QUICKSTART_STEPS (training steps,
# default 300), QUICKSTART_SCENES (synthetic training scenes, default 400), QUICKSTART_PORT
# (HTTP, default 8000), QUICKSTART_METRICS_PORT (default 8080); QUICKSTART_KEEP=1 keeps the
# server running until Ctrl-C (default: stop after the demo, unless stdin is a terminal).
set -euo pipefail

source "$(dirname "$0")/env.sh"
OUT="${QUICKSTART_OUT:-out/quickstart}"
STEPS="${QUICKSTART_STEPS:-300}"
SCENES="${QUICKSTART_SCENES:-400}"
PORT="${QUICKSTART_PORT:-8000}"
METRICS_PORT="${QUICKSTART_METRICS_PORT:-8080}"
LABELS=samples/ade20k/ADEChallengeData2016/annotations/training/ADE_train_00000001.png
OUT="$(absolute_dir "$OUT")"

echo "== 1/4 synthetic ADE20K-layout dataset -> $OUT/synthetic"
"$BIN/python" -m train_job.synthetic --out "$OUT/synthetic" --n "$SCENES" --size 64 --seed 0

echo "== 2/4 Parquet shards -> $OUT/shards"
"$BIN/python" -m train_job.prepare --dataset ade20k --root "$OUT/synthetic" --split train --out "$OUT/shards"

echo "== 3/4 training the tiny preset for $STEPS steps on local Ray (2 CPU workers)"
rm -rf "$OUT/runs/quickstart"
# time_budget-free and short: stop after STEPS steps (one checkpoint at the end)
"$BIN/spade-train" --config cluster/configs/tiny.yaml \
  --set "data.shards=$OUT/shards" --set "storage.path=$OUT/runs" --set storage.name=quickstart \
  --set "optim.niter=1000" --set "optim.niter_decay=0" --set "checkpoint.every_steps=$STEPS" \
  --set checkpoint.at_epoch_end=false --set "optim.max_steps=$STEPS" --set logging.every_steps=50 \
  --set logging.sample_grid_every_steps=0 --set logging.metrics_port=null

echo "== 4/4 serving $OUT/runs/quickstart on http://127.0.0.1:$PORT"
"$BIN/spade-serve" --checkpoint "$OUT/runs/quickstart" --port "$PORT" --metrics-port "$METRICS_PORT" \
  > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if curl -sf "http://127.0.0.1:$PORT/readyz" > /dev/null 2>&1; then break; fi
  if ! kill -0 $SERVER 2>/dev/null; then cat "$OUT/serve.log"; echo "spade-serve exited" >&2; exit 1; fi
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/readyz" > /dev/null || { cat "$OUT/serve.log"; echo "server not ready" >&2; exit 1; }
curl -sf -F "labels=@$LABELS" -F size=original -F format=png \
  "http://127.0.0.1:$PORT/v1/synthesize" -o "$OUT/synthesized.png"
"$BIN/python" -c "from PIL import Image; im = Image.open('$OUT/synthesized.png'); print('synthesized', im.size, im.mode)"

echo
echo "image:            $OUT/synthesized.png   (from $LABELS)"
echo "checkpoint:       $OUT/runs/quickstart (newest checkpoint_*)"
echo "training metrics: $OUT/runs/quickstart/metrics.jsonl"
echo "serving metrics:  http://127.0.0.1:$METRICS_PORT/metrics   (ray_spade_serve_*, ray_serve_*)"
echo "API:              http://127.0.0.1:$PORT/v1/synthesize   docs: http://127.0.0.1:$PORT/docs"
if [ "${QUICKSTART_KEEP:-}" = 1 ] || { [ -z "${QUICKSTART_KEEP:-}" ] && [ -t 0 ]; }; then
  echo "serving until Ctrl-C ..."
  wait $SERVER
fi
