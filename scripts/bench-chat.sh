#!/usr/bin/env bash
# Chat-shaped load on one node (issue #13): every figure on a fresh server process and a fresh
# database, then one table. Run from the checkout after
#   cargo build --release -p parley -p parley-bench
#
# Usage: scripts/bench-chat.sh [RUN...]
#   RUN is one of dm6k dm13k dm13k-normal dm25k fanout2k fanout5k (default: all of them).
# Environment: DURATION (chat runs, seconds; default 30), BIN (default target/release),
#   OUT (where the raw JSON of each run is kept; default a fresh temporary directory).
#
# dmN: 10,000 JWT clients in 5,000 rooms of 2, no churn, each client sending every
# send-min-s..send-max-s seconds (the issue's command). fanout2k / fanout5k: one room of 2,000
# members at 50 msg/s and of 5,000 at 100 msg/s (BENCHMARKS.md's fan-out runs).
#
# Columns: offered and acked messages/s, latency p50/p99 (send to deliver, every member), lost,
# server CPU (% of a core) and per message (user+system over acked messages; for fan-out per
# delivery), bench CPU (% of a core). The machine is shared: read `load` (the 1-minute load
# average before the run) beside each row.
set -euo pipefail
. "$(dirname "$0")/bench-common.sh"
bench_setup bench-chat
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(dm6k dm13k dm13k-normal dm25k fanout2k fanout5k)

port=3180
run_one() {
  local name=$1
  port=$((port + 1))
  local db="$OUT/$name.db" extra=() kind=chat args=()
  rm -f "$db" "$db"-wal "$db"-shm "$db"-acks
  # PARLEY_ARGS: more server options for every run, e.g. "--set store.settle_ms=50".
  read -r -a more <<<"${PARLEY_ARGS:-}"; extra+=("${more[@]}")
  case $name in
    dm6k) args=(--send-min-s 1 --send-max-s 2) ;;
    dm13k) args=(--send-min-s 0.5 --send-max-s 1.0) ;;
    dm13k-normal) args=(--send-min-s 0.5 --send-max-s 1.0); extra=(--set store.synchronous=normal) ;;
    dm25k) args=(--send-min-s 0.2 --send-max-s 0.6) ;;
    fanout2k) kind=fanout ;;
    fanout5k) kind=fanout ;;
    *) echo "unknown run $name" >&2; return 1 ;;
  esac
  local load
  load=$(cut -d' ' -f1 /proc/loadavg)
  if [ $kind = chat ]; then
    "$BIN/parley" --bind 127.0.0.1:$port --db "$db" --jwt-secret "$SECRET" \
      --set limits.max_connections_per_ip=100000 "${extra[@]}" >"$OUT/$name.log" 2>&1 &
  else
    "$BIN/parley" --bind 127.0.0.1:$port --db "$db" --set limits.send_rate=100000 \
      --set limits.send_burst=100000 >"$OUT/$name.log" 2>&1 &
  fi
  local pid=$!
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
  case $name in
    dm*) "$BIN/parley-bench" chat --url "ws://127.0.0.1:$port/ws" --secret "$SECRET" --server-pid $pid \
      -c 10000 --min-room 2 --max-room 2 -d "$DURATION" "${args[@]}" \
      --churn-fraction 0 --reconnect-fraction 0 --json >"$OUT/$name.json" 2>"$OUT/$name.err" ;;
    fanout2k) "$BIN/parley-bench" fanout --url "ws://127.0.0.1:$port/ws" --source-ips 127.0.0.1-127.0.0.200 \
      -n 2000 -r 50 -s 64 -t 20 -k 1 --server-pid $pid --json >"$OUT/$name.json" 2>"$OUT/$name.err" ;;
    fanout5k) "$BIN/parley-bench" fanout --url "ws://127.0.0.1:$port/ws" --source-ips 127.0.0.1-127.0.0.200 \
      -n 5000 -r 100 -s 64 -t 20 -k 2 --publisher-process --server-pid $pid --json \
      >"$OUT/$name.json" 2>"$OUT/$name.err" ;;
  esac
  kill $pid 2>/dev/null || true
  wait $pid 2>/dev/null || true
  jq -r --arg name "$name" --arg load "$load" '
    def r(x): (x * 10 | round) / 10;
    .delivery as $d
    | ($d.server_cpu.user_s + $d.server_cpu.system_s) as $cpu
    | (if .run == "fanout" then $d.deliveries else $d.acked end) as $per
    | [$name, $load, r($d.sent / $d.duration_s), r($d.acked / $d.duration_s),
       (.latency.p50_ms | tostring), (.latency.p99_ms | tostring), (.loss.lost | tostring),
       r($d.server_cpu.percent_of_core), r($cpu / $per * 1e6),
       r($d.bench_cpu.percent_of_core // 0), r($d.deliveries_per_s)]
    | @tsv' "$OUT/$name.json"
}

{
  printf 'run\tload\toffered/s\tacked/s\tp50 ms\tp99 ms\tlost\tserver %%core\tserver us/msg\tbench %%core\tdeliveries/s\n'
  for r in "${runs[@]}"; do run_one "$r"; done
} | column -t -s $'\t'
echo "raw JSON and server logs: $OUT" >&2
