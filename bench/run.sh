#!/usr/bin/env bash
# The gateway benchmark: builds release binaries, starts nats-server,
# Postgres, the mock provider (no added latency), one worker and one ingress,
# then measures the same chat completion (a) straight to the mock provider and
# (b) through Sluice, at 1, 32 and 128 connections, and prints requests/s,
# p50/p99 latency, the RSS of ingress and worker, and the added latency and
# throughput ratio. The last line is the headline.
#
#   bench/run.sh [--seconds N] [--repeats N] [--connections 1,32,128]
#
# `bench/run.sh jobs [--connections 64] [--seconds 10]` measures asynchronous
# jobs instead: jobs accepted per second (each durably acknowledged before its
# 202) and the time from submit to its webhook arriving, under that load.
#
# Everything runs on this machine's loopback; the load generator, the mock and
# the gateway share its cores, so compare the two columns of one run rather
# than figures across machines.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

ensure_tools
# SLUICE_BENCH_BIN=DIR runs prebuilt binaries from DIR (to compare builds).
if [ -n "${SLUICE_BENCH_BIN:-}" ]; then
  BIN="$SLUICE_BENCH_BIN"
else
  log "building release binaries"
  cargo build --release --workspace --bins --locked
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
fi

WORK="$(mktemp -d /tmp/sluice-bench-XXXXXX)"
PG_DIR="$(pg_dir_for "$WORK/pg")"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  pg_stop "$PG_DIR"
  rm -rf "$WORK" "$PG_DIR"
}
trap cleanup EXIT

NATS_PORT="$(free_port)"; PG_PORT="$(free_port)"; MOCK_PORT="$(free_port)"; INGRESS_PORT="$(free_port)"; OPS_PORT="$(free_port)"
"$NATS_SERVER" -js -sd "$WORK/nats" -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats.log" 2>&1 &
PIDS+=($!)
pg_start "$PG_DIR" "$PG_PORT"
as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U sluice sluice

cat >"$WORK/bench.toml" <<TOML
[nats]
url = "nats://127.0.0.1:$NATS_PORT"
[database]
url = "postgres://sluice@127.0.0.1:$PG_PORT/sluice"
[ingress]
listen = "127.0.0.1:$INGRESS_PORT"
[worker]
ops_listen = "127.0.0.1:$OPS_PORT"
max_in_flight = 256
[webhooks]
allow_loopback_targets = true
[log]
filter = "warn"
[[pools]]
name = "bench"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
TOML
export SLUICE_CONFIG="$WORK/bench.toml"
for _ in $(seq 1 120); do grep -q "Server is ready" "$WORK/nats.log" && break; sleep 0.25; done

"$BIN/sluice-ingress" migrate >/dev/null
KEY="$("$BIN/sluice-ingress" create-key --tenant bench | awk '/^api key:/ {print $3}')"
"$BIN/sluice-mock-provider" --listen "127.0.0.1:$MOCK_PORT" >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
"$BIN/sluice-worker" >"$WORK/worker.log" 2>&1 &
WORKER_PID=$!; PIDS+=($WORKER_PID)
"$BIN/sluice-ingress" serve >"$WORK/ingress.log" 2>&1 &
INGRESS_PID=$!; PIDS+=($INGRESS_PID)
wait_http "http://127.0.0.1:$INGRESS_PORT/readyz" 60 || die "ingress did not become ready"
wait_http "http://127.0.0.1:$OPS_PORT/readyz" 60 || die "worker did not become ready"

log "$("$NATS_SERVER" --version), $(nproc) cores, JetStream R1 file storage with the default sync interval"
if [ "${1:-}" = jobs ]; then
  shift
  "$BIN/sluice-loadgen" jobs --gateway "http://127.0.0.1:$INGRESS_PORT" --key "$KEY" --model bench "$@"
  exit $?
fi
"$BIN/sluice-loadgen" \
  --direct "http://127.0.0.1:$MOCK_PORT/v1/chat/completions" \
  --gateway "http://127.0.0.1:$INGRESS_PORT/v1/chat/completions" \
  --key "$KEY" --model bench \
  --pid "ingress=$INGRESS_PID" --pid "worker=$WORKER_PID" \
  "$@"
