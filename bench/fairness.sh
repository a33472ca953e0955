#!/usr/bin/env bash
# The fairness benchmark (release build, one worker with a fixed number of
# slots, mock provider answering in 20 ms, equal weights):
#
# 1. Flood: tenant A submits 20,000 jobs at once while tenants B and C submit
#    one job every 50 ms. Prints B's and C's queue wait p50/p99 under the
#    flood against a baseline run of B and C alone, and A's throughput.
# 2. Three tenants submit 5,000 jobs each at once: Jain's fairness index over
#    the jobs each got started while all three had backlog.
# 3. Two tenants backlogged, one with prompts ten times longer: each one's
#    share of the tokens served while both had backlog, and Jain's index
#    over tokens.
#
# Queue wait is the ledger's started_at − submitted_at. The last line is the
# headline.
#
#   bench/fairness.sh [--slots 32] [--flood 20000] [--each 5000]
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

SLOTS=32; FLOOD=20000; EACH=5000
while [ $# -gt 0 ]; do
  case "$1" in
    --slots) SLOTS="$2"; shift 2 ;;
    --flood) FLOOD="$2"; shift 2 ;;
    --each) EACH="$2"; shift 2 ;;
    *) die "unknown option $1" ;;
  esac
done
MOCK_ARGS="--latency-ms 20 --completion-tokens 16"
WORKER_SLOTS="$SLOTS"
source "$ROOT/bench/stack.sh"
GW="http://127.0.0.1:$INGRESS_PORT"
log "$("$NATS_SERVER" --version), $(nproc) cores; one worker with $SLOTS slots; mock latency 20 ms"

sql() { "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U sluice -d sluice -Atq -F ' ' -c "$1"; }
key_of() { new_key "$1" | awk '/^api key:/ {print $3}'; }
submit() { # LABEL KEY [loadgen submit options]
  local label="$1" key="$2"; shift 2
  "$BIN/sluice-loadgen" submit --gateway "$GW" --key "$key" --model bench --label "$label" "$@"
}
wait_done() { # COUNT: wait until the ledger holds COUNT finished jobs (10 minutes at most)
  for _ in $(seq 1 2400); do
    [ "$(sql "SELECT count(*) FROM jobs WHERE status IN ('completed','failed','expired')")" -ge "$1" ] && return 0
    sleep 0.25
  done
  die "jobs did not finish in time"
}
# Queue wait percentiles (ms) of a tenant's jobs: "p50 p99 count".
waits() {
  sql "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY w))::int, round(percentile_cont(0.99) WITHIN GROUP (ORDER BY w))::int, count(*)
       FROM (SELECT extract(epoch FROM started_at - submitted_at) * 1000 AS w
             FROM jobs j JOIN tenants t ON t.id = j.tenant_id WHERE t.name = '$1') s"
}
# Jobs and tokens each tenant got started while all of them had backlog:
# from the first start to the earliest of their last starts.
shares() { # TENANT...
  local names; names="$(printf "'%s'," "$@")"; names="${names%,}"
  sql "WITH j AS (SELECT t.name, started_at, total_tokens FROM jobs j JOIN tenants t ON t.id = j.tenant_id WHERE t.name IN ($names)),
            w AS (SELECT min(started_at) AS a FROM j), e AS (SELECT min(last) AS b FROM (SELECT max(started_at) AS last FROM j GROUP BY name) l)
       SELECT name, count(*), sum(total_tokens) FROM j, w, e WHERE started_at >= w.a AND started_at < e.b GROUP BY name ORDER BY name"
}
jain() { awk '{ s += $1; q += $1 * $1; n += 1 } END { if (q > 0) printf "%.4f", s * s / (n * q); else print "nan" }'; }

declare -A KEYS
for t in B0 C0 A1 B1 C1 X2 Y2 Z2 S3 L3; do KEYS[$t]="$(key_of "$t")"; done
# The ingress picks new keys up within ingress.auth_refresh_ms.
for _ in $(seq 1 200); do
  curl -fs -o /dev/null -H "authorization: Bearer ${KEYS[L3]}" "$GW/v1/models" && break
  sleep 0.1
done
DONE=0

log "phase 1a: B and C alone, one job every 50 ms each for 10 s"
submit B0 "${KEYS[B0]}" --every-ms 50 --count 200 & P1=$!
submit C0 "${KEYS[C0]}" --every-ms 50 --count 200 & P2=$!
wait $P1 $P2; DONE=$((DONE + 400)); wait_done $DONE

log "phase 1b: A floods $FLOOD jobs while B and C go on"
submit A1 "${KEYS[A1]}" --count "$FLOOD" --concurrency 64 & P0=$!
submit B1 "${KEYS[B1]}" --every-ms 50 --count 200 & P1=$!
submit C1 "${KEYS[C1]}" --every-ms 50 --count 200 & P2=$!
wait $P0 $P1 $P2; DONE=$((DONE + FLOOD + 400)); wait_done $DONE
read -r B0_50 B0_99 _ <<<"$(waits B0)"; read -r C0_50 C0_99 _ <<<"$(waits C0)"
read -r B1_50 B1_99 _ <<<"$(waits B1)"; read -r C1_50 C1_99 _ <<<"$(waits C1)"
read -r A_RATE A_SPAN <<<"$(sql "SELECT round(count(*) / extract(epoch FROM max(finished_at) - min(started_at)))::int, round(extract(epoch FROM max(finished_at) - min(started_at))::numeric, 1)
  FROM jobs j JOIN tenants t ON t.id = j.tenant_id WHERE t.name = 'A1'")"
echo "flood baseline B wait_p50_ms=$B0_50 wait_p99_ms=$B0_99 | C wait_p50_ms=$C0_50 wait_p99_ms=$C0_99"
echo "flood with_A   B wait_p50_ms=$B1_50 wait_p99_ms=$B1_99 | C wait_p50_ms=$C1_50 wait_p99_ms=$C1_99"
echo "flood A jobs=$FLOOD served_in_s=$A_SPAN throughput_jobs/s=$A_RATE"
RATIO_B="$(awk -v a="$B1_99" -v b="$B0_99" 'BEGIN { printf "%.2f", a / (2 * b + 20) }')"
RATIO_C="$(awk -v a="$C1_99" -v b="$C0_99" 'BEGIN { printf "%.2f", a / (2 * b + 20) }')"
echo "flood p99_with_A / (2 × p99_alone + 20 ms service): B=$RATIO_B C=$RATIO_C (target ≤ 1)"

log "phase 2: three tenants submit $EACH jobs each at once"
SUBMITTERS=()
for t in X2 Y2 Z2; do submit "$t" "${KEYS[$t]}" --count "$EACH" --concurrency 16 & SUBMITTERS+=($!); done
wait "${SUBMITTERS[@]}"; DONE=$((DONE + 3 * EACH)); wait_done $DONE
SHARES2="$(shares X2 Y2 Z2)"
echo "$SHARES2" | while read -r name jobs tokens; do echo "requests tenant=$name jobs_started_while_all_backlogged=$jobs"; done
JAIN_REQ="$(echo "$SHARES2" | awk '{print $2}' | jain)"
echo "requests jain_index=$JAIN_REQ (target ≥ 0.99)"

log "phase 3: two tenants backlogged, L's prompts ten times longer than S's"
submit S3 "${KEYS[S3]}" --count "$EACH" --concurrency 16 --prompt-chars 400 & P1=$!
submit L3 "${KEYS[L3]}" --count "$EACH" --concurrency 16 --prompt-chars 4000 & P2=$!
wait $P1 $P2; DONE=$((DONE + 2 * EACH)); wait_done $DONE
SHARES3="$(shares L3 S3)"
TOTAL3="$(echo "$SHARES3" | awk '{ s += $3 } END { print s }')"
echo "$SHARES3" | while read -r name jobs tokens; do
  echo "tokens tenant=$name jobs=$jobs tokens=$tokens share=$(awk -v t="$tokens" -v s="$TOTAL3" 'BEGIN { printf "%.3f", t / s }')"
done
JAIN_TOK="$(echo "$SHARES3" | awk '{print $3}' | jain)"
echo "tokens jain_index=$JAIN_TOK (target ≥ 0.95)"

echo "summary: flood B_p99_ms=$B1_99 (alone $B0_99) C_p99_ms=$C1_99 (alone $C0_99) A_jobs/s=$A_RATE | jain_requests=$JAIN_REQ | jain_tokens=$JAIN_TOK"
