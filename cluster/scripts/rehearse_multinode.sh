#!/usr/bin/env bash
# A two-node Ray cluster on this host, rehearsing a real submission: start a head and a
# worker node on 127.0.0.1, submit a 2-worker training job (one worker per node:
# placement SPREAD) with `ray job submit`, wait for it, check its checkpoint, stop both
# nodes. Only the processes started here are stopped (`ray stop` would kill every Ray on
# the host).
#
#   cluster/scripts/rehearse_multinode.sh          # from the repo root, after `pip install -e .`
#
# Environment: REHEARSAL_OUT (default out/rehearsal), REHEARSAL_STEPS (default 20),
# REHEARSAL_GCS_PORT (6390), REHEARSAL_DASHBOARD_PORT (8265), REHEARSAL_METRICS_PORT (8081),
# REHEARSAL_AGENT_PORT (8266; the worker node's agent takes the next port).
set -euo pipefail

source "$(dirname "$0")/env.sh"
OUT="${REHEARSAL_OUT:-out/rehearsal}"
STEPS="${REHEARSAL_STEPS:-20}"
GCS_PORT="${REHEARSAL_GCS_PORT:-6390}"
DASHBOARD_PORT="${REHEARSAL_DASHBOARD_PORT:-8265}"
METRICS_PORT="${REHEARSAL_METRICS_PORT:-8081}"
# Every node's dashboard agent listens on 52365 unless told otherwise: two nodes on one host
# (or another Ray on it) collide there, and a head whose agent failed to bind takes no job.
AGENT_PORT="${REHEARSAL_AGENT_PORT:-8266}"
OUT="$(absolute_dir "$OUT")"
# A throwaway cluster on loopback: no token, so `ray job submit` needs none either.
export RAY_AUTH_MODE=disabled
RAY="$BIN/ray"
PIDS=()

stop_nodes() {
  # --block nodes stop their own processes when their `ray start` gets SIGTERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  # what `ray stop` would also clean: `ray start --head` wrote this head's address (with the
  # host's IP, whatever --node-ip-address says) for a bare ray.init() and for the state API of
  # every later local Ray on this host: left behind, each Ray Train run's shutdown waits 12 s
  # on it (Train's placement-group cleaner asks the dead head, times out, then moves on)
  current=$(cat /tmp/ray/ray_current_cluster 2>/dev/null || true)
  if [ "${current##*:}" = "$GCS_PORT" ]; then rm -f /tmp/ray/ray_current_cluster; fi
}
trap stop_nodes EXIT

echo "== data: synthetic scenes -> shards in $OUT"
"$BIN/python" -m train_job.synthetic --out "$OUT/synthetic" --n 64 --size 64 --seed 0 --overwrite > /dev/null
"$BIN/python" -m train_job.prepare --dataset ade20k --root "$OUT/synthetic" --split train --out "$OUT/shards" > /dev/null

echo "== head node 127.0.0.1:$GCS_PORT (dashboard :$DASHBOARD_PORT, metrics :$METRICS_PORT)"
"$RAY" start --head --block --node-ip-address=127.0.0.1 --port="$GCS_PORT" --num-cpus=2 \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --metrics-export-port="$METRICS_PORT" \
  --dashboard-agent-listen-port="$AGENT_PORT" \
  --disable-usage-stats > "$OUT/head.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 60); do
  curl -sf "http://127.0.0.1:$DASHBOARD_PORT/api/version" > /dev/null 2>&1 && break
  kill -0 "${PIDS[0]}" 2>/dev/null || { cat "$OUT/head.log"; exit 1; }
  sleep 1
done

echo "== worker node (2 CPUs, resource node2)"
"$RAY" start --block --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 --num-cpus=2 \
  --dashboard-agent-listen-port="$((AGENT_PORT + 1))" \
  --resources='{"node2": 1}' --disable-usage-stats > "$OUT/worker.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 60); do
  nodes=$("$BIN/python" -c "
import ray
ray.init(address='127.0.0.1:$GCS_PORT', logging_level='ERROR')
print(sum(n['Alive'] for n in ray.nodes()))" 2>/dev/null || echo 0)
  [ "$nodes" = 2 ] && break
  kill -0 "${PIDS[1]}" 2>/dev/null || { cat "$OUT/worker.log"; exit 1; }
  sleep 1
done
[ "$nodes" = 2 ] || { echo "the worker node did not join" >&2; exit 1; }

# The head answers before its job agent has registered ("No available agent"): probe first.
for _ in $(seq 1 60); do
  "$RAY" job submit --address "http://127.0.0.1:$DASHBOARD_PORT" --no-wait -- true > /dev/null 2>&1 && break
  sleep 1
done

echo "== ray job submit: 2 training workers, one per node, $STEPS steps"
rm -rf "$OUT/runs/rehearsal"
"$RAY" job submit --address "http://127.0.0.1:$DASHBOARD_PORT" --working-dir . -- \
  python -m train_job --config cluster/configs/tiny.yaml \
    --set "data.shards=$OUT/shards" --set "data.batch_size=4" --set "storage.path=$OUT/runs" --set storage.name=rehearsal \
    --set scaling.num_workers=2 --set scaling.placement_strategy=SPREAD --set "optim.max_steps=$STEPS" \
    --set "checkpoint.every_steps=$STEPS" --set checkpoint.at_epoch_end=false --set logging.every_steps=1 \
    --set logging.sample_grid_every_steps=0 --set logging.metrics_port=null

echo "== checkpoint, and where the workers ran"
"$BIN/python" - "$OUT/runs/rehearsal" "$STEPS" "$GCS_PORT" <<'EOF'
import json, sys
from pathlib import Path
import ray
from ray.util.state import list_actors
import spade_core
run, steps, port = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
latest = sorted(p for p in run.glob("checkpoint_*") if (p / "config.json").is_file())[-1]
spade_core.load_checkpoint(latest)
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
ray.init(address=f"127.0.0.1:{port}", logging_level="ERROR")
workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True)
nodes = {w.node_id for w in workers}
print(f"ok: {latest} loads; last logged step {records[-1]['step']} of {steps}; "
      f"{len(workers)} train workers on {len(nodes)} nodes")
assert records[-1]["step"] == steps and len(workers) == 2 and len(nodes) == 2, (records[-1], workers)
EOF
echo "== stopping both nodes"
