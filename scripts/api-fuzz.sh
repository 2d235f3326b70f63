#!/usr/bin/env bash
# api-fuzz.sh -- property-based fuzzing of the HTTP API, driven by the committed OpenAPI
# document (openapi.json), with schemathesis against `kstash dev`.
#
#   scripts/api-fuzz.sh
#
# Starts `kstash dev` (embedded Kafka, QStash dev token) on a free loopback port, creates the
# resources the document's examples name, and lets schemathesis (pinned with its dependencies
# in scripts/api-fuzz/requirements.txt) send every documented
# operation generated requests, valid and invalid, with the dev token. Fails on:
#   - any 5xx (check not_a_server_error),
#   - any error answer (status >= 400) that is not JSON with a string `error` field
#     (check error_is_json_with_error_field, scripts/api-fuzz/hooks.py),
#   - kstash not alive (GET /health/live) at the end, e.g. after a crash.
# Bounded: a few examples per operation and an overall timeout, so the whole script takes
# well under 3 minutes on 2 cores (once the venv and the binary exist). Deliveries of the
# fuzzed messages go to made-up hosts and just fail.
#
# Environment:
#   KSTASH_BIN             kstash binary (default target/debug/kstash; built with
#                          `cargo build --bin kstash` when the default is missing)
#   PYTHON                 interpreter used to create the venv (default python3)
#   KSTASH_START_TIMEOUT   seconds to wait for /health (default 30)
#   API_FUZZ_MAX_EXAMPLES  test cases per operation and phase (default 25)
#   API_FUZZ_TIMEOUT       seconds schemathesis may run at most (default 120)
#   API_FUZZ_SEED          schemathesis seed (default: random; printed by schemathesis)
#
# Installs (skipped when already installed from the same requirements): .fuzz-venv (git-ignored).
# kstash's log goes to a temp file; its tail is printed on failure. kstash is always stopped
# on exit (SIGTERM, bounded wait, then SIGKILL).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

KSTASH_BIN="${KSTASH_BIN:-target/debug/kstash}"
PYTHON="${PYTHON:-python3}"
START_TIMEOUT="${KSTASH_START_TIMEOUT:-30}"
MAX_EXAMPLES="${API_FUZZ_MAX_EXAMPLES:-25}"
FUZZ_TIMEOUT="${API_FUZZ_TIMEOUT:-120}"
# filter_too_much: hypothesis' health check that a generator drops too many of its draws (path
# parameters that cannot be sent, e.g. `..`) sometimes fires on the one-segment names; it says
# nothing about kstash, and every request that is sent is still checked.
# One worker: with several threads, hypothesis' lambda descriptions (ast.parse) can fail inside
# CPython 3.11 ("AST constructor recursion depth mismatch"), an error of the tool, not of kstash.
# Seconds a single request may take (a publish waits for Kafka's acknowledgement).
REQUEST_TIMEOUT=10
STOP_TIMEOUT=10
LOG_TAIL_LINES=50
DIR="scripts/api-fuzz"
VENV=".fuzz-venv"
SCHEMA="openapi.json"
DEV_TOKEN="eyJVc2VySUQiOiJkZWZhdWx0VXNlciIsIlBhc3N3b3JkIjoiZGVmYXVsdFBhc3N3b3JkIn0="
STARTED_AT=$(date +%s)

log() { printf '[api-fuzz] %s\n' "$*"; }
die() { printf '[api-fuzz] error: %s\n' "$*" >&2; exit 1; }

[[ -f "$SCHEMA" ]] || die "$SCHEMA not found (KSTASH_WRITE_OPENAPI=1 cargo test --test openapi writes it)"

# --- kstash binary ------------------------------------------------------------------
if [[ ! -x "$KSTASH_BIN" ]]; then
  if [[ "$KSTASH_BIN" == "target/debug/kstash" ]]; then
    log "building kstash (cargo build --bin kstash) ..."
    cargo build --bin kstash
  fi
  [[ -x "$KSTASH_BIN" ]] || die "kstash binary not found or not executable: $KSTASH_BIN"
fi

# --- schemathesis -------------------------------------------------------------------
command -v "$PYTHON" >/dev/null || die "$PYTHON is required"
stamp="$VENV/.api-fuzz.stamp"
want=$({ "$PYTHON" -c 'import sys; print(sys.version)'; cat "$DIR/requirements.txt"; } | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$VENV/bin/schemathesis" ]]; then
  log "schemathesis already installed ($VENV)"
else
  log "installing schemathesis: venv $VENV + pip install -r $DIR/requirements.txt ..."
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$DIR/requirements.txt"
  printf '%s\n' "$want" >"$stamp"
fi

# --- start kstash -------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kstash-api-fuzz.XXXXXX")
KSTASH_LOG="$WORK/kstash.log"
KSTASH_PID=""

stop_kstash() {
  [[ -n "$KSTASH_PID" ]] || return 0
  local pid="$KSTASH_PID"
  KSTASH_PID=""
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping kstash (pid $pid) ..."
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$(( $(date +%s) + STOP_TIMEOUT ))
    while kill -0 "$pid" 2>/dev/null && (( $(date +%s) < deadline )); do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "kstash did not exit within ${STOP_TIMEOUT}s of SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
}
show_kstash_log() {
  [[ -s "$KSTASH_LOG" ]] || return 0
  printf '[api-fuzz] ---- last %s lines of the kstash log (%s) ----\n' "$LOG_TAIL_LINES" "$KSTASH_LOG"
  tail -n "$LOG_TAIL_LINES" "$KSTASH_LOG"
  printf '[api-fuzz] ---- end of kstash log ----\n'
}
cleanup() {
  local rc=$?
  stop_kstash
  if (( rc != 0 )); then show_kstash_log; fi
  if (( rc == 0 )); then rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# A port picked this way can in theory be taken before kstash binds it: retry then.
PORT=""
for attempt in 1 2 3; do
  port=$(free_port)
  log "starting kstash dev on 127.0.0.1:$port (log: $KSTASH_LOG) ..."
  "$KSTASH_BIN" dev --port "$port" >"$KSTASH_LOG" 2>&1 &
  KSTASH_PID=$!
  deadline=$(( $(date +%s) + START_TIMEOUT ))
  while (( $(date +%s) < deadline )); do
    kill -0 "$KSTASH_PID" 2>/dev/null || break
    if curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$port/health" 2>/dev/null; then
      PORT="$port"
      break
    fi
    sleep 0.2
  done
  [[ -n "$PORT" ]] && break
  if kill -0 "$KSTASH_PID" 2>/dev/null; then
    die "kstash did not answer GET /health within ${START_TIMEOUT}s"
  fi
  wait "$KSTASH_PID" 2>/dev/null && code=0 || code=$?
  KSTASH_PID=""
  if (( attempt < 3 )) && grep -qi 'in use' "$KSTASH_LOG"; then
    log "port $port was taken meanwhile; retrying with another port"
    continue
  fi
  die "kstash exited during startup (exit code $code)"
done
[[ -n "$PORT" ]] || die "could not start kstash"
BASE="http://127.0.0.1:$PORT"
log "kstash is up on $BASE ($(( $(date +%s) - STARTED_AT ))s so far)"

# --- fixtures -----------------------------------------------------------------------
# The resources the document's path parameter examples name (queue `orders`, URL group
# `subscribers`, schedule `nightly-report`, flow-control key `tenant-1`), so the operations on
# one resource are exercised on an existing one, not only answered 404. Their deliveries go to
# the discard port of loopback and fail.
SINK="http://127.0.0.1:9"
api() { # api METHOD PATH [curl args...]
  local method=$1 path=$2; shift 2
  curl -fsS -o /dev/null --max-time "$REQUEST_TIMEOUT" -X "$method" \
    -H "Authorization: Bearer $DEV_TOKEN" "$@" "$BASE$path" \
    || die "fixture $method $path was refused"
}
log "creating the fixtures the examples name ..."
api POST /v2/queues -H 'Content-Type: application/json' -d '{"queueName":"orders"}'
api POST /v2/topics/subscribers/endpoints -H 'Content-Type: application/json' \
  -d "{\"endpoints\":[{\"url\":\"$SINK/hook\"}]}"
api POST "/v2/schedules/$SINK/report" -H 'Upstash-Cron: 0 0 * * *' \
  -H 'Upstash-Schedule-Id: nightly-report'
api POST "/v2/publish/$SINK/hook" -H 'Upstash-Flow-Control-Key: tenant-1' \
  -H 'Upstash-Flow-Control-Value: parallelism=1' -d 'fixture'

# --- fuzz ---------------------------------------------------------------------------
seed=()
[[ -z "${API_FUZZ_SEED:-}" ]] || seed=(--seed "$API_FUZZ_SEED")
log "schemathesis: $MAX_EXAMPLES examples per operation, at most ${FUZZ_TIMEOUT}s ..."
fuzz_rc=0
PYTHONPATH="$ROOT/$DIR${PYTHONPATH:+:$PYTHONPATH}" SCHEMATHESIS_HOOKS=hooks \
  timeout --kill-after=10 "$FUZZ_TIMEOUT" \
  "$VENV/bin/schemathesis" run "$SCHEMA" \
    --url "$BASE" \
    --header "Authorization: Bearer $DEV_TOKEN" \
    --checks not_a_server_error,error_is_json_with_error_field \
    --phases examples,coverage,fuzzing \
    --max-examples "$MAX_EXAMPLES" \
    --request-timeout "$REQUEST_TIMEOUT" \
    --workers 1 \
    --suppress-health-check filter_too_much \
    --generation-database none \
    --no-color \
    "${seed[@]}" \
  || fuzz_rc=$?
if (( fuzz_rc == 124 || fuzz_rc == 137 )); then
  log "schemathesis did not finish within ${FUZZ_TIMEOUT}s"
fi

# --- kstash must have survived ------------------------------------------------------
alive=1
if ! kill -0 "$KSTASH_PID" 2>/dev/null; then
  log "kstash is no longer running (crashed?)"
  alive=0
elif ! curl -fsS -o /dev/null --max-time 5 "$BASE/health/live"; then
  log "kstash does not answer GET /health/live"
  alive=0
fi

elapsed=$(( $(date +%s) - STARTED_AT ))
if (( fuzz_rc != 0 || alive == 0 )); then
  log "FAILED (schemathesis exit code $fuzz_rc, kstash alive: $alive; ${elapsed}s)"
  exit 1
fi
stop_kstash
log "passed: no 5xx, every error answer JSON with an error field, kstash alive (${elapsed}s)"
