#!/usr/bin/env bash
# Durability modes, measured (release build): the same workload with
# nats-server's JetStream in its default mode (writes acknowledged once
# replicated to memory, synced to disk every two minutes) and with
# `sync_interval: always` (every write on disk before it is acknowledged).
# For each mode: asynchronous submits accepted per second (64 connections,
# `sluice-loadgen jobs`) and synchronous chat completions per second
# (32 connections against the mock answering at once). One node (R1) on
# this machine's disk; a cluster syncs on every replica in parallel. Each
# mode runs with and without `nats.group_commit` (concurrent writes on a
# job's path stored in shared atomic batches).
#
#   bench/durability.sh [--seconds 10]
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"
SECONDS_EACH=10
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_EACH="$2"; shift 2 ;;
    *) die "unknown option $1" ;;
  esac
done

if ! "$VENV/bin/python" -c "import nats" 2>/dev/null; then
  log "installing nats-py into .venv (bench/requirements.txt)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/bench/requirements.txt" || die "pip install failed"
fi
declare -A JOBS SYNC
for mode in default default+group_commit always always+group_commit; do
  sync="${mode%%+*}"
  gc=false; [ "$mode" != "$sync" ] && gc=true
  # Each mode in its own stack (a subshell), torn down at its end.
  OUT="$(NATS_SYNC="$sync" GROUP_COMMIT="$gc" bash -c '
    set -euo pipefail
    source scripts/lib.sh
    source bench/stack.sh >&2
    GW="http://127.0.0.1:$INGRESS_PORT"
    "$BIN/sluice-loadgen" jobs --gateway "$GW" --key "$KEY" --model bench --connections 64 --seconds '"$SECONDS_EACH"' >&2 > "$WORK/jobs.txt"
    "$BIN/sluice-loadgen" --direct "http://127.0.0.1:$MOCK_PORT/v1/chat/completions" --gateway "$GW/v1/chat/completions" \
      --key "$KEY" --model bench --connections 32 --seconds '"$SECONDS_EACH"' --warmup 2 --repeats 1 > "$WORK/sync.txt"
    jobs_rate="$(sed -n "s/^jobs conns=.* accepted\/s=\([0-9]*\).*/\1/p" "$WORK/jobs.txt" | tail -1)"
    sync_rate="$(sed -n "s/^median sluice conns=32 req\/s=\([0-9]*\).*/\1/p" "$WORK/sync.txt" | tail -1)"
    if [ "$GROUP_COMMIT" = false ]; then
      "$VENV/bin/python" bench/batch_probe.py "nats://127.0.0.1:$NATS_PORT" --seconds 5 --concurrency 64 --batch 64 \
        | sed "s/^probe /probe mode=$NATS_SYNC /" >&2
    fi
    echo "$jobs_rate $sync_rate"
  ')"
  read -r JOBS[$mode] SYNC[$mode] <<<"$OUT"
  echo "durability mode=$mode async_submits_per_s=${JOBS[$mode]} sync_requests_per_s=${SYNC[$mode]}"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "nan" }'; }
echo "group_commit mode=default async_submits_ratio=$(ratio "${JOBS[default+group_commit]}" "${JOBS[default]}") sync_requests_ratio=$(ratio "${SYNC[default+group_commit]}" "${SYNC[default]}")"
echo "group_commit mode=always async_submits_ratio=$(ratio "${JOBS[always+group_commit]}" "${JOBS[always]}") sync_requests_ratio=$(ratio "${SYNC[always+group_commit]}" "${SYNC[always]}")"
echo "summary: sync_interval=always keeps $(ratio "${JOBS[always]}" "${JOBS[default]}") of async submit throughput without nats.group_commit and $(ratio "${JOBS[always+group_commit]}" "${JOBS[default]}") with it; sync requests $(ratio "${SYNC[always]}" "${SYNC[default]}") and $(ratio "${SYNC[always+group_commit]}" "${SYNC[default]}") (R1, this machine's disk)"
