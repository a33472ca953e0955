# Starts the benchmark stack on loopback, sourced by bench/run.sh and
# bench/fairness.sh: nats-server (JetStream, R1 file storage), Postgres, the
# mock provider with MOCK_ARGS, one worker with WORKER_SLOTS slots, and one
# ingress; creates tenant `bench` and sets KEY. POOL_EXTRA is appended to the
# `bench` pool's settings (e.g. `rpm = 1200`); `extra_worker` starts another
# worker process; NO_WORKER=1 starts none (the autoscale replay starts its
# own); NATS_SYNC=always runs JetStream with `sync_interval: always`;
# GROUP_COMMIT=true sets `nats.group_commit`; EXTRA_TOML is appended to the
# config (more `[[pools]]`, with MOCK_BASE standing for the mock's URL).
# Everything stops on exit.
# Builds the release binaries first, or runs prebuilt ones from
# SLUICE_BENCH_BIN=DIR (to compare builds). Expects scripts/lib.sh loaded.

ensure_tools
# SLUICE_BENCH_BIN=DIR runs prebuilt binaries from DIR (to compare builds).
if [ -n "${SLUICE_BENCH_BIN:-}" ]; then
  BIN="$SLUICE_BENCH_BIN"
else
  log "building release binaries"
  cargo build --release --workspace --bins --locked
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
fi

# new_key TENANT prints a new key's output; migrate applies the schema.
# Builds from before sluice-admin (compared through SLUICE_BENCH_BIN) have
# the same commands on sluice-ingress.
if [ -x "$BIN/sluice-admin" ]; then
  new_key() { "$BIN/sluice-admin" keys create --tenant "$1"; }
  migrate() { "$BIN/sluice-admin" migrate; }
else
  new_key() { "$BIN/sluice-ingress" create-key --tenant "$1"; }
  migrate() { "$BIN/sluice-ingress" migrate; }
fi

MOCK_ARGS="${MOCK_ARGS:-}"
POOL_EXTRA="${POOL_EXTRA:-}"
WORKER_SLOTS="${WORKER_SLOTS:-256}"

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
SCALER_PORT="$(free_port)"; SCALER_OPS_PORT="$(free_port)"
# NATS_SYNC=always: every JetStream write on disk before it is acknowledged
# (the production overlay's mode); otherwise the server's default.
if [ "${NATS_SYNC:-default}" = always ]; then
  printf 'jetstream { store_dir: "%s", sync_interval: always }\n' "$WORK/nats" >"$WORK/nats.conf"
  "$NATS_SERVER" -c "$WORK/nats.conf" -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats.log" 2>&1 &
else
  "$NATS_SERVER" -js -sd "$WORK/nats" -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats.log" 2>&1 &
fi
PIDS+=($!)
pg_start "$PG_DIR" "$PG_PORT"
as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U sluice sluice

# The keyring sealing webhook secrets (binaries from before sealing have no
# `webhooks new-key` and take no keyring: SLUICE_BENCH_BIN may be older).
WEBHOOK_KEYS_LINE=""
if "$BIN/sluice-admin" webhooks new-key --id bench >"$WORK/webhook-keys" 2>/dev/null; then
  WEBHOOK_KEYS_LINE="secret_keys_file = \"$WORK/webhook-keys\""
fi
cat >"$WORK/bench.toml" <<TOML
[nats]
url = "nats://127.0.0.1:$NATS_PORT"
${GROUP_COMMIT:+group_commit = $GROUP_COMMIT}
[database]
url = "postgres://sluice@127.0.0.1:$PG_PORT/sluice"
[ingress]
listen = "127.0.0.1:$INGRESS_PORT"
[worker]
ops_listen = "127.0.0.1:$OPS_PORT"
max_in_flight = $WORKER_SLOTS
[scaler]
listen = "127.0.0.1:$SCALER_PORT"
ops_listen = "127.0.0.1:$SCALER_OPS_PORT"
[webhooks]
allow_loopback_targets = true
$WEBHOOK_KEYS_LINE
[log]
filter = "warn"
[[pools]]
name = "bench"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
$POOL_EXTRA
${EXTRA_TOML:-}
TOML
sed -i "s|MOCK_BASE|http://127.0.0.1:$MOCK_PORT|g" "$WORK/bench.toml"
export SLUICE_CONFIG="$WORK/bench.toml"
for _ in $(seq 1 120); do grep -q "Server is ready" "$WORK/nats.log" && break; sleep 0.25; done

migrate >/dev/null
KEY="$(new_key bench | awk '/^api key:/ {print $3}')"
"$BIN/sluice-mock-provider" --listen "127.0.0.1:$MOCK_PORT" $MOCK_ARGS >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
if [ "${NO_WORKER:-0}" != 1 ]; then
  "$BIN/sluice-worker" >"$WORK/worker.log" 2>&1 &
  WORKER_PID=$!; PIDS+=($WORKER_PID)
fi
"$BIN/sluice-ingress" serve >"$WORK/ingress.log" 2>&1 &
INGRESS_PID=$!; PIDS+=($INGRESS_PID)
wait_http "http://127.0.0.1:$INGRESS_PORT/readyz" 60 || die "ingress did not become ready"
if [ "${NO_WORKER:-0}" != 1 ]; then
  wait_http "http://127.0.0.1:$OPS_PORT/readyz" 60 || die "worker did not become ready"
fi


# Starts one more worker process (its own ops port) and waits until it is ready.
extra_worker() {
  local port; port="$(free_port)"
  SLUICE__WORKER__OPS_LISTEN="127.0.0.1:$port" "$BIN/sluice-worker" >>"$WORK/worker-$port.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$port/readyz" 60 || die "extra worker did not become ready"
}
