# Sourced by the benchmark scripts (bench-chat.sh, bench-cluster.sh): the settings they share.
# `bench_setup NAME` reads BIN (default target/release), DURATION (default 30) and OUT (default
# a fresh /tmp/NAME.XXXXXX), sets SECRET (the JWT secret of every run), raises the open-file
# limit and checks that the binaries are built.
bench_setup() {
  BIN=${BIN:-target/release}
  DURATION=${DURATION:-30}
  OUT=${OUT:-$(mktemp -d "/tmp/$1.XXXXXX")}
  SECRET=bench-secret-0123456789abcdef0123456789ab
  mkdir -p "$OUT"
  ulimit -n 20000
  [ -x "$BIN/parley" ] && [ -x "$BIN/parley-bench" ] || {
    echo "build first: cargo build --release -p parley -p parley-bench" >&2
    exit 1
  }
}
