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
# `bench/run.sh ttft [--requests 500]` measures the time to first token of
# streamed completions, straight to the mock and through Sluice, one at a time.
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

source "$ROOT/bench/stack.sh"

log "$("$NATS_SERVER" --version), $(nproc) cores, JetStream R1 file storage with the default sync interval"
if [ "${1:-}" = ttft ]; then
  shift
  "$BIN/sluice-loadgen" ttft --direct "http://127.0.0.1:$MOCK_PORT/v1/chat/completions" \
    --gateway "http://127.0.0.1:$INGRESS_PORT/v1/chat/completions" --key "$KEY" --model bench "$@"
  exit $?
fi
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
