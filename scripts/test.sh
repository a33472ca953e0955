#!/usr/bin/env bash
# The test command: format and lint checks, then every test against real
# servers (a throwaway Postgres cluster here; each test starts its own
# nats-server and creates its own database).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_tools

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "building binaries"
cargo build --workspace --bins --locked
log "deploy/ manifests (rendered offline, Kubernetes schemas, flags against --help)"
"$VENV/bin/python" deploy/check.py --bin "${CARGO_TARGET_DIR:-$ROOT/target}/debug" --nats-server "$NATS_SERVER"

PG_DIR="$(pg_dir_for "$(mktemp -d /tmp/sluice-test-XXXXXX)")"
PG_PORT="$(free_port)"
cleanup() { pg_stop "$PG_DIR"; rm -rf "$PG_DIR"; }
trap cleanup EXIT
# fsync off: this cluster lives for one test run.
SLUICE_PG_FSYNC=off pg_start "$PG_DIR" "$PG_PORT"

export SLUICE_TEST_PG="postgres://sluice@127.0.0.1:$PG_PORT/postgres"
export SLUICE_NATS_SERVER="$NATS_SERVER"
export SLUICE_TEST_PYTHON="$VENV/bin/python"

# CI keeps only the head and tail of this output: a failing test's
# backtrace would push its own message out of the tail
# (SLUICE_TEST_BACKTRACE=1 ./scripts/test.sh brings backtraces back).
export RUST_BACKTRACE="${SLUICE_TEST_BACKTRACE:-0}"

log "cargo test"
cargo test --workspace --locked "$@"
