#!/usr/bin/env bash
# Chat-shaped load on two cluster nodes over one Redis (issue #13): every figure on a fresh
# redis-server (AOF on, `appendfsync everysec`, its own directory) and two fresh nodes, on free
# ports, then one table. Run from the checkout after
#   cargo build --release -p parley -p parley-bench
#
# Usage: scripts/bench-cluster.sh [RUN...]
#   RUN is one of dm6k dm10k dm13k dm18k dm20k dm25k dm33k (default: dm13k dm25k).
# Environment: DURATION (seconds of sending; default 30), BIN (default target/release),
#   OUT (where the raw JSON, Redis's CPU and the logs are kept; default a fresh temporary
#   directory). On a shared machine wrap it: flock /tmp/bench.lock scripts/bench-cluster.sh
#
# dmN: 10,000 JWT clients in 5,000 rooms of 2, no churn, spread over both nodes (`--url`
# twice), each client sending every send-min-s..send-max-s seconds: dm6k 1..2 (6,700 msg/s),
# dm10k 0.7..1.3 (10,000 msg/s),
# dm13k 0.5..1.0 (13,300
# msg/s), dm18k 0.4..0.7, dm20k 0.3..0.7, dm25k 0.2..0.6 (the issue's 25,000), dm33k 0.1..0.5.
#
# Columns: offered and acked messages/s, latency p50/p99 (send to deliver, every member), lost,
# the nodes' CPU (both together, % of a core, and per acked message), Redis's CPU (utime+stime
# of redis-server from /proc/PID/stat, all its threads, from just before the bench starts to
# just after it ends, over acked messages; and over the events Redis stored, `parley:events`,
# joins included, which differs from acked when acks were lost to timeouts), bench CPU. `load` is the 1-minute load average
# just before the run: the machine may be shared, so read CPU per message before latency.
set -euo pipefail
. "$(dirname "$0")/bench-common.sh"
bench_setup bench-cluster
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(dm13k dm25k)
TICK=$(getconf CLK_TCK)

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
wait_http() {
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$1/healthz" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "node on port $1 did not start" >&2
  return 1
}

run_one() {
  local name=$1 args=()
  case $name in
    dm6k) args=(--send-min-s 1 --send-max-s 2) ;;
    dm10k) args=(--send-min-s 0.7 --send-max-s 1.3) ;;
    dm13k) args=(--send-min-s 0.5 --send-max-s 1.0) ;;
    dm18k) args=(--send-min-s 0.4 --send-max-s 0.7) ;;
    dm20k) args=(--send-min-s 0.3 --send-max-s 0.7) ;;
    dm25k) args=(--send-min-s 0.2 --send-max-s 0.6) ;;
    dm33k) args=(--send-min-s 0.1 --send-max-s 0.5) ;;
    *) echo "unknown run $name" >&2; return 1 ;;
  esac
  local dir="$OUT/$name"
  rm -rf "$dir"
  mkdir -p "$dir/redis"
  local rport aport bport
  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --dir "$dir/redis" --save "" \
    --appendonly yes --appendfsync everysec --daemonize no >"$dir/redis.log" 2>&1 &
  local rpid=$!
  for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
  local url="redis://127.0.0.1:$rport"
  aport=$(free_port)
  bport=$(free_port)
  "$BIN/parley" --bind 127.0.0.1:"$aport" --redis "$url" --jwt-secret "$SECRET" \
    --set limits.max_connections_per_ip=100000 >"$dir/node-a.log" 2>&1 &
  local apid=$!
  "$BIN/parley" --bind 127.0.0.1:"$bport" --redis "$url" --jwt-secret "$SECRET" \
    --set limits.max_connections_per_ip=100000 >"$dir/node-b.log" 2>&1 &
  local bpid=$!
  wait_http "$aport"
  wait_http "$bport"
  local load redis_before redis_after
  load=$(cut -d' ' -f1 /proc/loadavg)
  redis_before=$(cpu_ticks "$rpid")
  "$BIN/parley-bench" chat --url "ws://127.0.0.1:$aport/ws" --url "ws://127.0.0.1:$bport/ws" \
    --secret "$SECRET" --server-pid "$apid" --server-pid "$bpid" \
    -c 10000 --min-room 2 --max-room 2 -d "$DURATION" "${args[@]}" \
    --churn-fraction 0 --reconnect-fraction 0 --json >"$dir/bench.json" 2>"$dir/bench.err" || true
  redis_after=$(cpu_ticks "$rpid")
  local events
  events=$(redis-cli -p "$rport" GET parley:events)
  redis-cli -p "$rport" INFO commandstats >"$dir/redis-commandstats.txt"
  kill "$apid" "$bpid" 2>/dev/null || true
  wait "$apid" "$bpid" 2>/dev/null || true
  kill "$rpid" 2>/dev/null || true
  wait "$rpid" 2>/dev/null || true
  local redis_s
  redis_s=$(awk -v a="$redis_before" -v b="$redis_after" -v t="$TICK" 'BEGIN{printf "%.2f", (b - a) / t}')
  echo "{\"load\":$load,\"redis_cpu_s\":$redis_s,\"events_stored\":${events:-0}}" >"$dir/redis-cpu.json"
  jq -r --arg name "$name" --arg load "$load" --argjson redis "$redis_s" --argjson events "${events:-0}" '
    def r(x): (x * 10 | round) / 10;
    .delivery as $d
    | ($d.server_cpu.user_s + $d.server_cpu.system_s) as $cpu
    | [$name, $load, r($d.sent / $d.duration_s), r($d.acked / $d.duration_s),
       (.latency.p50_ms | tostring), (.latency.p99_ms | tostring), (.loss.lost | tostring),
       r($d.server_cpu.percent_of_core), r($cpu / $d.acked * 1e6),
       r($redis), r($redis / $d.acked * 1e6), r($redis / $events * 1e6),
       r($d.bench_cpu.percent_of_core // 0)]
    | @tsv' "$dir/bench.json"
}

{
  printf 'run\tload\toffered/s\tacked/s\tp50 ms\tp99 ms\tlost\tnodes %%core\tnodes us/msg\tredis cpu s\tredis us/msg\tredis us/event\tbench %%core\n'
  for r in "${runs[@]}"; do run_one "$r"; done
} | column -t -s $'\t'
echo "raw JSON, Redis CPU and logs: $OUT" >&2
