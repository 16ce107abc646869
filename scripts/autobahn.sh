#!/usr/bin/env bash
# WebSocket conformance: runs the Autobahn test suite (`wstest -m fuzzingclient`) against
# parley's exact-echo socket, `GET /echo?raw=1`, which is upgraded with the chat socket's
# WebSocket settings.
#
#   scripts/autobahn.sh            every case (about 517)
#   scripts/autobahn.sh --quick    the core cases 1.* to 7.* (framing, pings, reserved bits,
#                                  opcodes, fragmentation, UTF-8, closing)
#   scripts/autobahn.sh --cases '5.*,6.2.*'   any comma-separated selection
#
# Exits non-zero when any case's behavior (or close behavior) is FAILED. OK, NON-STRICT,
# INFORMATIONAL and UNIMPLEMENTED pass. Nothing is excluded:
#   - 9.* (limits and performance) sends messages of up to 16 MiB, so the server runs with
#     limits.max_frame_bytes raised to 16 MiB for the run (the default, 64 KiB, would close
#     those sockets with 1009, which Autobahn counts as FAILED);
#   - 12.* and 13.* (permessage-deflate) report UNIMPLEMENTED: parley does not negotiate
#     compression.
# The HTML and JSON report is left in target/autobahn/reports (index.html, index.json).
#
# The suite is Python 2.7 code. A virtualenv with its pinned dependencies is made once in
# target/autobahn-venv (from PyPI; about 30 s, wsaccel and ujson are compiled) and reused
# while the pins below are unchanged. Python 2.7 is taken from $PYTHON2, else pyenv's 2.7.x,
# else python2.7 on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
started=$SECONDS

cases='"*"'
mode=full
while (($#)); do
  case "$1" in
    --quick)
      mode=quick
      cases='"1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*"'
      ;;
    --cases)
      [[ $# -ge 2 ]] || { echo "--cases needs a value" >&2; exit 2; }
      mode="cases $2"
      cases=$(sed 's/[^,][^,]*/"&"/g; s/,/, /g' <<<"${2// /}")
      shift
      ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "unknown argument: $1 (try --help)" >&2
      exit 2
      ;;
  esac
  shift
done

target_dir=${CARGO_TARGET_DIR:-$root/target}
venv=$root/target/autobahn-venv
out=$root/target/autobahn
# Big enough for Autobahn's largest message (9.1.6 / 9.2.6: 16 MiB).
frame_limit=$((16 * 1024 * 1024))

# The suite with its own pins (autobahntestsuite's requires.txt) and every transitive
# dependency pinned to what pip resolves for Python 2.7.
requirements='autobahntestsuite==25.10.1
autobahn[accelerate,twisted]==0.10.9
setuptools==44.0.0
txaio==2.1.0
incremental==16.10.1
pyOpenSSL==19.1.0
cryptography==3.3.2
Twisted==19.10.0
zope.interface==4.6.0
Jinja2==2.11.3
MarkupSafe==1.1.1
Werkzeug==1.0.1
klein==17.10.0
service-identity==18.1.0
unittest2==1.1.0
six==1.16.0
attrs==21.4.0
Automat==22.10.0
cffi==1.15.1
constantly==15.1.0
enum34==1.1.10
hyperlink==21.0.0
idna==2.10
ipaddress==1.0.23
linecache2==1.0.0
pyasn1==0.5.1
pyasn1-modules==0.3.0
pycparser==2.21
PyHamcrest==1.10.1
traceback2==1.4.0
typing==3.10.0.0
ujson==2.0.3
wsaccel==0.6.6'

find_python2() {
  if [[ -n ${PYTHON2:-} ]]; then
    echo "$PYTHON2"
    return
  fi
  local candidate
  for candidate in "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/2.7*/bin/python \
    "$(command -v python2.7 || true)"; do
    if [[ -x $candidate ]] && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))'; then
      echo "$candidate"
      return
    fi
  done
  return 1
}

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_PYTHON_VERSION_WARNING=1

setup_venv() {
  if [[ -x $venv/bin/wstest && -f $venv/parley-requirements.txt ]] &&
    [[ $(cat "$venv/parley-requirements.txt") == "$requirements" ]] &&
    "$venv/bin/wstest" --autobahnversion >/dev/null 2>&1; then
    echo "==> reusing $venv ($("$venv/bin/wstest" --autobahnversion 2>&1 | tr '\n' ' '))"
    return
  fi
  local python2
  if ! python2=$(find_python2); then
    # Debian no longer packages Python 2.7, which the Autobahn test suite needs: a fresh
    # machine skips this step (with this message) rather than fail the whole check.
    echo "autobahn: SKIPPED: no Python 2.7 found (set PYTHON2, or install 2.7 with pyenv);" \
      "the WebSocket conformance suite did not run" >&2
    exit 0
  fi
  echo "==> creating $venv with $python2"
  rm -rf "$venv"
  local bootstrap
  bootstrap=$(mktemp -d)
  # virtualenv 16.7 is one module with no dependencies; it seeds pip 20.3.4 (the last for
  # Python 2) from its own wheels.
  "$python2" -m pip install -q --target "$bootstrap" virtualenv==16.7.12
  PYTHONPATH=$bootstrap "$python2" -m virtualenv -q --no-download "$venv"
  rm -rf "$bootstrap"
  printf '%s\n' "$requirements" >"$venv/requirements.txt"
  "$venv/bin/pip" install -q -r "$venv/requirements.txt" 2>&1 | grep -v DEPRECATION || true
  "$venv/bin/wstest" --autobahnversion
  cp "$venv/requirements.txt" "$venv/parley-requirements.txt"
}

setup_venv
setup_done=$SECONDS

echo "==> cargo build --release -p parley"
cargo build --release -p parley --bin parley
bin=$target_dir/release/parley
build_done=$SECONDS

tmp=$(mktemp -d)
server_pid=
cleanup() {
  if [[ -n $server_pid ]]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Start parley on a free port; retry if another process takes the port meanwhile.
for _ in 1 2 3; do
  port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  rm -f "$tmp/parley.db"
  "$bin" --bind "127.0.0.1:$port" --db "$tmp/parley.db" \
    --set "limits.max_frame_bytes=$frame_limit" >"$tmp/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do
    if curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then
      break 2
    fi
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=
done
if [[ -z $server_pid ]]; then
  echo "autobahn: parley did not start; its log:" >&2
  cat "$tmp/server.log" >&2
  exit 1
fi
echo "==> parley listening on 127.0.0.1:$port (pid $server_pid, max_frame_bytes=$frame_limit)"

rm -rf "$out/reports"
mkdir -p "$out"
cat >"$out/fuzzingclient.json" <<EOF
{
  "outdir": "$out/reports",
  "servers": [{"agent": "parley", "url": "ws://127.0.0.1:$port/echo?raw=1"}],
  "cases": [$cases],
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
EOF

echo "==> wstest -m fuzzingclient ($mode)"
run_started=$SECONDS
(cd "$tmp" && timeout 900 "$venv/bin/wstest" -m fuzzingclient -s "$out/fuzzingclient.json") \
  >"$out/wstest.log" 2>&1 || {
  echo "autobahn: wstest failed; tail of $out/wstest.log:" >&2
  tail -20 "$out/wstest.log" >&2
  exit 1
}
run_done=$SECONDS

if ! kill -0 "$server_pid" 2>/dev/null; then
  echo "autobahn: parley exited during the run; its log:" >&2
  tail -50 "$tmp/server.log" >&2
  exit 1
fi

status=0
"$venv/bin/python" - "$out/reports/index.json" <<'EOF' || status=$?
import json
import sys
from collections import Counter

def key(case):
    return [int(part) for part in case.split(".")]

with open(sys.argv[1]) as f:
    report = json.load(f)
results = report["parley"]
counts = Counter(r["behavior"] for r in results.values())
failed = sorted(
    (c for c, r in results.items() if "FAILED" in (r["behavior"], r["behaviorClose"])),
    key=key,
)
print("%d cases: %s" % (len(results), ", ".join(
    "%s %d" % (b, n) for b, n in sorted(counts.items()))))
close_counts = Counter(r["behaviorClose"] for r in results.values())
print("close behavior: %s" % ", ".join("%s %d" % (b, n) for b, n in sorted(close_counts.items())))
if not results:
    print("no case ran")
    sys.exit(1)
for case in failed:
    r = results[case]
    print("FAILED %s: behavior %s, close %s, remote close code %s (%s)" % (
        case, r["behavior"], r["behaviorClose"], r.get("remoteCloseCode"), r["reportfile"]))
sys.exit(1 if failed else 0)
EOF

total=$((SECONDS - started))
echo "==> time: setup $((setup_done - started)) s, build $((build_done - setup_done)) s," \
  "cases $((run_done - run_started)) s, total $total s"
echo "==> report: $out/reports/index.html"
if ((status)); then
  echo "==> autobahn ($mode): FAILED"
else
  echo "==> autobahn ($mode): passed"
fi
exit "$status"
