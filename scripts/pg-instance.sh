#!/usr/bin/env bash
# A private Postgres instance for tests that stop and restart it (the chaos
# suite), without touching the cluster other tests share.
#
#   scripts/pg-instance.sh start DIR PORT   (initdb on first use; prints nothing)
#   scripts/pg-instance.sh stop DIR
#   scripts/pg-instance.sh restart DIR PORT
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cmd="${1:-}"; dir="${2:-}"
[ -n "$cmd" ] && [ -n "$dir" ] || die "usage: pg-instance.sh start|stop|restart DIR [PORT]"
dir="$(pg_dir_for "$dir")"
case "$cmd" in
  start) SLUICE_PG_FSYNC=off pg_start "$dir" "$3"; echo "$dir" ;;
  stop) pg_stop "$dir" ;;
  restart) pg_stop "$dir"; SLUICE_PG_FSYNC=off pg_start "$dir" "$3"; echo "$dir" ;;
  *) die "unknown command $cmd" ;;
esac
