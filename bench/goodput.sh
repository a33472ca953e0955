#!/usr/bin/env bash
# Goodput against a provider rate limit (release build): three worker
# processes share one deployment whose provider (the mock, 50 ms per call)
# admits 1,200 requests in any 60 seconds and answers 429 past that. 3,000
# jobs are submitted at once. Sluice's workers pace themselves with the
# deployment's budget shared in NATS (`rpm = 1200`, less the configured
# headroom), so the jobs wait in the queue instead of meeting 429s.
#
# Prints the calls completed per 10-second slice, the achieved rate after
# the first 10 seconds as a fraction of the limit, the share of upstream
# calls that got a 429, and the client-visible failures. The last line is
# the headline. Targets: ≥ 95 % of the limit, ≤ 1 % 429s, 0 failures.
#
#   bench/goodput.sh [--jobs 3000] [--rpm 1200] [--workers 3]
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

JOBS=3000; RPM=1200; WORKERS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) JOBS="$2"; shift 2 ;;
    --rpm) RPM="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    *) die "unknown option $1" ;;
  esac
done
MOCK_ARGS="--latency-ms 50 --rpm $RPM"
POOL_EXTRA="rpm = $RPM"
WORKER_SLOTS=64
source "$ROOT/bench/stack.sh"
for _ in $(seq 2 "$WORKERS"); do extra_worker; done
GW="http://127.0.0.1:$INGRESS_PORT"
log "$(nproc) cores; $WORKERS workers; mock limited to $RPM requests per minute, 50 ms per call; $JOBS jobs"

sql() { "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U sluice -d sluice -Atq -F ' ' -c "$1"; }
SUBMIT_OUT="$("$BIN/sluice-loadgen" submit --gateway "$GW" --key "$KEY" --model bench --label goodput \
  --count "$JOBS" --concurrency 32 2>&1)" || die "submit failed: $SUBMIT_OUT"
echo "$SUBMIT_OUT" | tail -1
ACCEPTED="$(echo "$SUBMIT_OUT" | sed -n 's/.*accepted=\([0-9]*\).*/\1/p' | tail -1)"
[ -n "$ACCEPTED" ] || die "cannot read the accepted count from: $SUBMIT_OUT"

# Expected time: JOBS / (RPM / 60) seconds; give it twice that plus a minute.
LIMIT_S=$(( JOBS * 60 * 2 / RPM + 60 ))
for _ in $(seq 1 $(( LIMIT_S * 4 ))); do
  [ "$(sql "SELECT count(*) FROM jobs WHERE status IN ('completed','failed','expired')")" -ge "$ACCEPTED" ] && break
  sleep 0.25
done

sql "WITH t AS (SELECT min(submitted_at) AS t0 FROM jobs)
     SELECT floor(extract(epoch FROM finished_at - t0) / 10)::int * 10, count(*)
     FROM jobs, t WHERE status = 'completed' GROUP BY 1 ORDER BY 1" |
  while read -r from n; do
    echo "slice t=${from}-$((from + 10))s completed=$n calls/s=$(awk -v n="$n" 'BEGIN { printf "%.1f", n / 10 }')"
  done
# The rate after the first 10 s: jobs finished from t0 + 10 s to the last one.
read -r AFTER SPAN <<<"$(sql "WITH t AS (SELECT min(submitted_at) + interval '10 seconds' AS a FROM jobs)
  SELECT count(*), extract(epoch FROM max(finished_at) - min(t.a)) FROM jobs, t
  WHERE status = 'completed' AND finished_at >= t.a")"
RATE="$(awk -v n="$AFTER" -v s="$SPAN" 'BEGIN { if (s > 0) printf "%.2f", n / s * 60; else print 0 }')"
FRACTION="$(awk -v r="$RATE" -v l="$RPM" 'BEGIN { printf "%.3f", r / l }')"
STATS="$(curl -fs "http://127.0.0.1:$MOCK_PORT/_mock/stats")"
CALLS="$(echo "$STATS" | sed -n 's/.*"requests":\([0-9]*\).*/\1/p')"
LIMITED="$(echo "$STATS" | sed -n 's/.*"rate_limited":\([0-9]*\).*/\1/p')"
SHARE429="$(awk -v l="$LIMITED" -v c="$CALLS" 'BEGIN { if (c > 0) printf "%.4f", l / c; else print 0 }')"
COMPLETED="$(sql "SELECT count(*) FROM jobs WHERE status = 'completed'")"
FAILED=$(( JOBS - COMPLETED ))
echo "upstream calls=$CALLS rate_limited=$LIMITED share_429=$SHARE429 (target ≤ 0.01)"
echo "jobs submitted=$JOBS accepted=$ACCEPTED completed=$COMPLETED client_visible_failures=$FAILED (target 0)"
echo "rate after 10 s: ${RATE}/min over ${SPAN%.*} s = $FRACTION of the limit (target ≥ 0.95)"
echo "summary: goodput=$FRACTION of $RPM rpm | upstream_429_share=$SHARE429 | client_failures=$FAILED | workers=$WORKERS jobs=$JOBS"
