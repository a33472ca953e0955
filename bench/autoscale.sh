#!/usr/bin/env bash
# Autoscaling, replayed on this machine with time compressed (release build).
#
# The real ingress takes a traffic profile: BASE jobs/s for 20 s, a spike of
# ten times that for 20 s, the base again for 60 s. The mock provider
# answers in 250 ms and each worker has 8 slots (about 32 jobs/s). The real
# scaler measures the backlog; `sluice-loadgen autoscale` plays KEDA and the
# HPA (polls GetMetrics every second, replicas = ceil(backlog / target), the
# HPA behaviour with its periods divided by 10) and starts and stops real
# worker processes. Writes bench/results/autoscale.csv, the queue waits
# per second from the ledger, and bench/results/autoscale.png; prints the
# peak backlog, the time to drain after the spike and the scale events.
#
#   bench/autoscale.sh [--base 10] [--target 16] [--compress 10]
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

BASE=10; TARGET=16; COMPRESS=10
while [ $# -gt 0 ]; do
  case "$1" in
    --base) BASE="$2"; shift 2 ;;
    --target) TARGET="$2"; shift 2 ;;
    --compress) COMPRESS="$2"; shift 2 ;;
    *) die "unknown option $1" ;;
  esac
done
OUT="$ROOT/bench/results"
mkdir -p "$OUT"
MOCK_ARGS="--latency-ms 250"
WORKER_SLOTS=8
NO_WORKER=1
source "$ROOT/bench/stack.sh"
"$BIN/sluice-scaler" >"$WORK/scaler.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$SCALER_OPS_PORT/readyz" 60 || die "scaler did not become ready"
if ! "$VENV/bin/python" -c "import matplotlib" 2>/dev/null; then
  log "installing matplotlib into .venv (bench/requirements.txt)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/bench/requirements.txt" || die "pip install failed"
fi
log "$(nproc) cores; base $BASE jobs/s, spike $((BASE * 10)) jobs/s; 8 slots per worker, 250 ms per call; target $TARGET jobs per replica; HPA periods ÷ $COMPRESS"

"$BIN/sluice-loadgen" autoscale --gateway "http://127.0.0.1:$INGRESS_PORT" --key "$KEY" --model bench \
  --scaler "127.0.0.1:$SCALER_PORT" --worker-bin "$BIN/sluice-worker" --base-rps "$BASE" --spike-x 10 \
  --base-s 20 --spike-s 20 --tail-s 60 --target "$TARGET" --compress "$COMPRESS" --min 1 --max 12 \
  --out "$OUT/autoscale.csv" | tee "$WORK/summary.txt"

# Queue wait of the jobs submitted in each second: p50 and p99, seconds.
"$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U sluice -d sluice -Atq -F ' ' -c "
  SELECT floor(extract(epoch FROM submitted_at)) * 1000,
         percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - submitted_at)),
         percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - submitted_at))
  FROM jobs WHERE started_at IS NOT NULL GROUP BY 1 ORDER BY 1" >"$OUT/autoscale-waits.txt"
"$VENV/bin/python" "$ROOT/bench/plot_autoscale.py" "$OUT/autoscale.csv" "$OUT/autoscale-waits.txt" "$OUT/autoscale.png"
read -r WAIT_MAX_P99 <<<"$(awk '{ if ($3 > m) m = $3 } END { printf "%.1f", m }' "$OUT/autoscale-waits.txt")"
FAILED="$("$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U sluice -d sluice -Atq -c "SELECT count(*) FROM jobs WHERE status <> 'completed'")"
echo "queue wait worst per-second p99=${WAIT_MAX_P99}s; jobs not completed=$FAILED"
PEAK="$(sed -n 's/^peak backlog=\([0-9]*\).*/\1/p' "$WORK/summary.txt")"
DRAIN="$(sed -n 's/^drained to ≤ one replica.s target \([0-9.]*\) s.*/\1/p' "$WORK/summary.txt")"
EVENTS="$(sed -n 's/^scale events=\([0-9]*\).*/\1/p' "$WORK/summary.txt")"
echo "summary: peak_backlog=$PEAK drain_after_spike_s=${DRAIN:-never} scale_events=$EVENTS worst_wait_p99_s=$WAIT_MAX_P99"
