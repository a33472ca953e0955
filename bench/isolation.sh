#!/usr/bin/env bash
# The isolation benchmark (release build): what large and hostile traffic
# costs the gateway's memory, and whether other clients are served meanwhile.
# Prints, for each case, what the clients got and the peak RSS (VmHWM) of the
# ingress and the worker after it:
#
# 1. a 20 MiB chat answer, synchronously and as a job (stored apart, streamed
#    to the client);
# 2. a 200 MiB answer: 502 `upstream_response_too_large` once the worker has
#    read `upstream.max_response_bytes` (128 MiB);
# 3. 64 concurrent embeddings requests of 1 MiB each (`[0,0,…]` token arrays);
# 4. 200 streaming clients that never read (5 MB streams in 8 KiB chunks,
#    `ingress.stream_buffer_chunks` 16, `ingress.write_timeout_ms` 5 s): the
#    write timeouts counted, and a request from another client meanwhile.
#
# The last line is the headline: the ingress's peak RSS over all cases.
#
#   bench/isolation.sh
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

EXTRA_TOML='
[[pools]]
name = "big-20"
base_url = "MOCK_BASE/v1"
model = "mock@bytes=20971520"
[[pools]]
name = "big-200"
base_url = "MOCK_BASE/v1"
model = "mock@bytes=209715200"
[[pools]]
name = "long-stream"
base_url = "MOCK_BASE/v1"
model = "mock@tokens=600,token_bytes=8192,tps=300"
'
INGRESS_OPS_PORT="$(free_port)"
export SLUICE__INGRESS__OPS_LISTEN="127.0.0.1:$INGRESS_OPS_PORT"
export SLUICE__INGRESS__STREAM_BUFFER_CHUNKS=16
export SLUICE__INGRESS__WRITE_TIMEOUT_MS=5000
export SLUICE__INGRESS__SYNC_TIMEOUT_MS=60000
source "$ROOT/bench/stack.sh"
log "$("$NATS_SERVER" --version), $(nproc) cores"
"$VENV/bin/python" "$ROOT/bench/isolation.py" --gateway "http://127.0.0.1:$INGRESS_PORT" \
  --ops "http://127.0.0.1:$INGRESS_OPS_PORT" --key "$KEY" --ingress-pid "$INGRESS_PID" --worker-pid "$WORKER_PID"
