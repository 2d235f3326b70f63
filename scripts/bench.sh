#!/usr/bin/env bash
# bench.sh -- run every benchmark of BENCHMARKS.md, on the embedded cluster and on a real broker.
#
#   scripts/bench.sh [output-dir]        (default: target/bench-results/<UTC timestamp>)
#
# Builds kstash and the bench example in release mode, then runs examples/bench.rs once per
# benchmark: `kstash dev` first, then `kstash serve` against a fresh Apache Kafka broker per run
# (scripts/with-kafka.sh; needs Java 17+, and Maven the first time). Each run's markdown goes to
# <output-dir>/<name>.md, its progress lines to <name>.log, the environment to ENV. Takes about
# 12 minutes in all; each run stops by itself within ~4 minutes. The `order` runs need a build with
# FIFO queues and flow control (commit 4960844 or later).
set -euo pipefail

cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.."
out=${1:-target/bench-results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p -- "$out"

cargo build --release --bin kstash --example bench

{ # what the numbers were measured on
  printf 'date: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  printf 'tree: %s, %s uncommitted paths\n' "$(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
    "$(git status --porcelain 2>/dev/null | wc -l)"
  printf 'cpu: %s x %s\n' "$(nproc)" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  printf 'memory: %s\n' "$(grep MemTotal /proc/meminfo | tr -s ' ')"
  printf 'rustc: %s\n' "$(rustc --version)"
  printf 'kafka: %s\n' "$(find .kafka/libs -name 'kafka_2.13-*.jar' -printf '%f\n' 2>/dev/null | head -n1)"
  printf 'java: %s\n' "$(java -version 2>&1 | head -n1)"
} >"$out/ENV"

# The binaries built above, so that every run measures the same build even if the tree changes.
bench=(target/release/examples/bench)

run() { # name command...
  local name=$1
  shift
  printf 'bench.sh: %s: %s\n' "$name" "$*" >&2
  "$@" >"$out/$name.md" 2> >(tee "$out/$name.log" >&2)
}

run delay-dev "${bench[@]}" delay
run memory-dev "${bench[@]}" memory --counts 5000,10000,20000
run memory-dev-control "${bench[@]}" memory --counts 5000,10000,20000 --delay 0s
# Throughput varies most from run to run: three runs each ($0 is the bench binary).
# shellcheck disable=SC2016
run throughput-dev bash -c 'for i in 1 2 3; do "$0" throughput; done' "${bench[@]}"
run order-dev "${bench[@]}" order

run delay-serve scripts/with-kafka.sh "${bench[@]}" delay --mode serve
run memory-serve scripts/with-kafka.sh "${bench[@]}" memory --mode serve
run memory-serve-control scripts/with-kafka.sh "${bench[@]}" memory --mode serve --counts 10000,20000 --delay 0s
# shellcheck disable=SC2016
run throughput-serve scripts/with-kafka.sh \
  bash -c 'for i in 1 2 3; do "$0" throughput --mode serve; done' "${bench[@]}"
run order-serve scripts/with-kafka.sh "${bench[@]}" order --mode serve

printf 'bench.sh: results in %s\n' "$out" >&2
