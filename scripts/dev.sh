#!/usr/bin/env bash
# The run command: installs what is missing (nats-server into .venv,
# Postgres 15 from Debian), starts NATS with JetStream and Postgres with their
# data under .sluice/, applies the migrations, creates the `dev` tenant and
# prints its API key, then runs the mock provider, a worker and the ingress
# until Ctrl-C, which stops everything.
#
# Environment:
#   OPENAI_API_KEY          use OpenAI as the upstream of the gpt-* pools
#   SLUICE_CONFIG           use this config file instead of config/dev*.toml
#   SLUICE_DEV_RELEASE=1    build and run release binaries
#   SLUICE_NATS_SYNC=always JetStream syncs every write to disk before acknowledging it
#                           (and Sluice batches its writes: nats.group_commit, unless
#                           SLUICE__NATS__GROUP_COMMIT says otherwise)
#   SLUICE_DEV_NATS_USERS=0 run NATS without users (every client may do anything,
#                           e.g. the `nats` CLI); by default each component connects
#                           as its own user of deploy/base/nats/users.conf with a
#                           password made for this run
#   SLUICE_DEV_NATS_PORT    default 4222
#   SLUICE_DEV_PG_PORT      default 54329
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

NATS_PORT="${SLUICE_DEV_NATS_PORT:-4222}"
PG_PORT="${SLUICE_DEV_PG_PORT:-54329}"
STATE="$ROOT/.sluice"
LOGS="$STATE/logs"
mkdir -p "$LOGS"

if [ -n "${SLUICE_CONFIG:-}" ]; then
  CONFIG="$SLUICE_CONFIG"
elif [ -n "${OPENAI_API_KEY:-}" ]; then
  CONFIG="$ROOT/config/dev-openai.toml"
else
  CONFIG="$ROOT/config/dev.toml"
fi

ensure_tools

PROFILE=debug
BUILD_FLAGS=()
if [ "${SLUICE_DEV_RELEASE:-0}" = 1 ]; then PROFILE=release; BUILD_FLAGS=(--release); fi
log "building ($PROFILE)"
cargo build --workspace --bins "${BUILD_FLAGS[@]}"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE"

PIDS=()
PG_DIR="$(pg_dir_for "$STATE/pg")"
stop_all() {
  # A second signal (a supervisor repeating it, Ctrl-C pressed twice) must
  # not cut the stop short and leave Postgres or NATS running.
  trap '' INT TERM
  trap - EXIT
  log "stopping"
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ -n "${NATS_PID:-}" ] && { kill -TERM "$NATS_PID" 2>/dev/null; wait "$NATS_PID" 2>/dev/null || true; }
  pg_stop "$PG_DIR"
  log "stopped"
}
on_signal() { stop_all; exit 0; }
trap on_signal INT TERM
trap stop_all EXIT

log "starting nats-server on 127.0.0.1:$NATS_PORT (JetStream data in .sluice/nats)"
NATS_CONF="$STATE/nats.conf"
if [ "${SLUICE_NATS_SYNC:-default}" = always ]; then
  # Every JetStream write on disk before it is acknowledged (docs/reliability.md).
  printf 'jetstream { store_dir: "%s", sync_interval: always }\n' "$STATE/nats" >"$NATS_CONF"
  # One sync per batch of concurrent writes instead of per write.
  export SLUICE__NATS__GROUP_COMMIT="${SLUICE__NATS__GROUP_COMMIT:-true}"
else
  printf 'jetstream { store_dir: "%s" }\n' "$STATE/nats" >"$NATS_CONF"
fi
# The components' NATS users, as deployed: each may use only its own subjects.
NATS_ENV=()
if [ "${SLUICE_DEV_NATS_USERS:-1}" != 0 ]; then
  cp "$ROOT/deploy/base/nats/users.conf" "$STATE/nats-users.conf"
  printf 'include "nats-users.conf"\n' >>"$NATS_CONF"
  for role in ingress worker; do
    # 32 hex digits, fresh for each run; only this script's processes see them.
    password="$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
    printf -v "NATS_PASSWORD_${role^^}" '%s' "$password"
    NATS_ENV+=("SLUICE_NATS_${role^^}_PASSWORD=$password")
  done
  # The scaler is not run here; its user gets a password nobody knows.
  NATS_ENV+=("SLUICE_NATS_SCALER_PASSWORD=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')")
fi
env "${NATS_ENV[@]}" "$NATS_SERVER" -c "$NATS_CONF" -a 127.0.0.1 -p "$NATS_PORT" >"$LOGS/nats.log" 2>&1 &
NATS_PID=$!
for _ in $(seq 1 120); do grep -q "Server is ready" "$LOGS/nats.log" && break; sleep 0.25; done
grep -q "Server is ready" "$LOGS/nats.log" || { tail "$LOGS/nats.log" >&2; die "nats-server did not start"; }

log "starting Postgres on 127.0.0.1:$PG_PORT (data in $PG_DIR)"
pg_start "$PG_DIR" "$PG_PORT"
as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U sluice sluice 2>/dev/null || true

export SLUICE_CONFIG="$CONFIG"
export SLUICE__NATS__URL="nats://127.0.0.1:$NATS_PORT"
export SLUICE__DATABASE__URL="postgres://sluice@127.0.0.1:$PG_PORT/sluice"
# The keyring that seals webhook secrets in the database, beside it (a
# deployment mounts it from a Secret: deploy/README.md).
WEBHOOK_KEYS="$PG_DIR/webhook-keys"
if [ ! -s "$WEBHOOK_KEYS" ]; then
  (umask 077 && "$BIN/sluice-admin" webhooks new-key --id dev >"$WEBHOOK_KEYS")
fi
export SLUICE__WEBHOOKS__SECRET_KEYS_FILE="$WEBHOOK_KEYS"

"$BIN/sluice-admin" migrate

# The dev key lives beside the database it belongs to, and goes with it.
KEY_FILE="$PG_DIR/dev-api-key"
if [ ! -s "$KEY_FILE" ]; then
  "$BIN/sluice-admin" keys create --tenant dev | awk '/^api key:/ {print $3}' >"$KEY_FILE"
  chmod 600 "$KEY_FILE"
fi
API_KEY="$(cat "$KEY_FILE")"

# Runs a component as its NATS user (when NATS has users).
as_nats_user() {
  local role="$1" var="NATS_PASSWORD_${1^^}"
  shift
  if [ -n "${!var:-}" ]; then
    SLUICE__NATS__USER="sluice-$role" SLUICE__NATS__PASSWORD="${!var}" "$@"
  else
    "$@"
  fi
}

log "starting mock provider, worker and ingress (config: ${CONFIG#"$ROOT"/}, logs in .sluice/logs)"
"$BIN/sluice-mock-provider" --listen 127.0.0.1:8090 >"$LOGS/mock-provider.log" 2>&1 &
PIDS+=($!)
as_nats_user worker "$BIN/sluice-worker" >"$LOGS/worker.log" 2>&1 &
PIDS+=($!)
as_nats_user ingress "$BIN/sluice-ingress" serve >"$LOGS/ingress.log" 2>&1 &
PIDS+=($!)

wait_http "http://127.0.0.1:8080/readyz" 60 || { tail -20 "$LOGS/ingress.log" "$LOGS/worker.log" >&2; die "ingress did not become ready"; }
wait_http "http://127.0.0.1:9091/readyz" 60 || { tail -20 "$LOGS/worker.log" >&2; die "worker did not become ready"; }

cat <<BANNER

  Sluice is running.
    ingress       http://127.0.0.1:8080   (health: /healthz, /readyz)
    ingress ops   http://127.0.0.1:9090/metrics
    worker ops    http://127.0.0.1:9091/metrics
    mock provider http://127.0.0.1:8090
    tenant        dev
    api key       $API_KEY

  Try it:
    curl -s http://127.0.0.1:8080/v1/chat/completions \\
      -H "Authorization: Bearer $API_KEY" -H "Content-Type: application/json" \\
      -d '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}'

  Ctrl-C stops everything.

BANNER

# Run until Ctrl-C, or until one of the components exits on its own.
wait -n "${PIDS[@]}" || true
log "a component exited; see .sluice/logs"
exit 1
