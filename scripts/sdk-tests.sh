#!/usr/bin/env bash
# sdk-tests.sh -- prove that the OFFICIAL QStash SDKs work against kstash unchanged.
#
#   scripts/sdk-tests.sh
#
# Starts `kstash dev` (embedded Kafka, QStash dev token and keys) on a free loopback
# port and runs three compatibility suites against it, one after another, by base URL alone:
#   sdk-tests/ts/compat.mjs        -- @upstash/qstash (TypeScript SDK, pinned in package.json
#                                     + package-lock.json), plain Node >= 20 ESM
#   sdk-tests/py/compat.py         -- qstash (Python SDK, pinned in requirements.txt), the
#                                     synchronous QStash client
#   sdk-tests/py/compat_async.py   -- the same Python SDK's asyncio AsyncQStash client
# Each suite prints `ok - …` / `not ok - …: reason` lines and `N passed, M failed`; this
# script ends with the combined `total: N passed, M failed` line and exits non-zero if
# any suite failed (or kstash could not be started).
#
# kstash is started with KSTASH_LLM_BASE_URL=http://127.0.0.1:$SDK_LLM_STUB_PORT and
# KSTASH_LLM_TOKEN=stub-token (a free port picked here and exported): the suites start
# their own OpenAI-compatible stub on that port, one suite at a time, for the `api/llm`
# destination.
#
# Environment:
#   KSTASH_BIN      kstash binary (default target/debug/kstash; built with `cargo build`
#                   when the default is missing)
#   PYTHON          interpreter used to create the venv (default python3)
#   KSTASH_START_TIMEOUT  seconds to wait for /health (default 30)
#
# Installs (skipped when already installed from the same lock files):
#   sdk-tests/ts/node_modules  via `npm ci --prefix sdk-tests/ts`
#   .sdk-venv                  venv + `pip install -r sdk-tests/py/requirements.txt`
# Both are git-ignored. kstash's log goes to a temp file; its tail is printed on
# failure. kstash is always stopped on exit (SIGTERM, bounded wait, then SIGKILL).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

KSTASH_BIN="${KSTASH_BIN:-target/debug/kstash}"
PYTHON="${PYTHON:-python3}"
START_TIMEOUT="${KSTASH_START_TIMEOUT:-30}"
STOP_TIMEOUT=10
TS_DIR="sdk-tests/ts"
PY_DIR="sdk-tests/py"
VENV=".sdk-venv"
STARTED_AT=$(date +%s)

log() { printf '[sdk-tests] %s\n' "$*"; }
die() { printf '[sdk-tests] error: %s\n' "$*" >&2; exit 1; }

# sha256 of the given files plus extra strings, for the "already installed" stamps.
fingerprint() {
  local extra="$1"; shift
  { printf '%s\n' "$extra"; cat "$@"; } | sha256sum | cut -d' ' -f1
}

# --- kstash binary ------------------------------------------------------------------
if [[ ! -x "$KSTASH_BIN" ]]; then
  if [[ "$KSTASH_BIN" == "target/debug/kstash" ]]; then
    log "building kstash (cargo build) ..."
    cargo build --bin kstash
  fi
  [[ -x "$KSTASH_BIN" ]] || die "kstash binary not found or not executable: $KSTASH_BIN"
fi

# --- TypeScript SDK -----------------------------------------------------------------
command -v node >/dev/null || die "node is required (>= 20)"
command -v npm >/dev/null || die "npm is required"
node_major=$(node -p 'process.versions.node.split(".")[0]')
(( node_major >= 20 )) || die "node >= 20 is required, found $(node --version)"
ts_stamp="$TS_DIR/node_modules/.sdk-tests.stamp"
ts_want=$(fingerprint "node $(node --version)" "$TS_DIR/package.json" "$TS_DIR/package-lock.json")
if [[ -f "$ts_stamp" && "$(cat "$ts_stamp")" == "$ts_want" ]]; then
  log "TypeScript SDK already installed ($TS_DIR/node_modules)"
else
  log "installing TypeScript SDK: npm ci --prefix $TS_DIR ..."
  npm ci --prefix "$TS_DIR" --no-audit --no-fund --loglevel=error
  printf '%s\n' "$ts_want" >"$ts_stamp"
fi

# --- Python SDK ---------------------------------------------------------------------
command -v "$PYTHON" >/dev/null || die "$PYTHON is required"
py_stamp="$VENV/.sdk-tests.stamp"
py_want=$(fingerprint "$("$PYTHON" -c 'import sys; print(sys.version)')" "$PY_DIR/requirements.txt")
if [[ -f "$py_stamp" && "$(cat "$py_stamp")" == "$py_want" && -x "$VENV/bin/python" ]] \
    && "$VENV/bin/python" -c 'import qstash' 2>/dev/null; then
  log "Python SDK already installed ($VENV)"
else
  log "installing Python SDK: venv $VENV + pip install -r $PY_DIR/requirements.txt ..."
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$PY_DIR/requirements.txt"
  printf '%s\n' "$py_want" >"$py_stamp"
fi

# --- start kstash -------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kstash-sdk-tests.XXXXXX")
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
  printf '[sdk-tests] ---- last 50 lines of the kstash log (%s) ----\n' "$KSTASH_LOG"
  tail -n 50 "$KSTASH_LOG"
  printf '[sdk-tests] ---- end of kstash log ----\n'
}
cleanup() {
  local rc=$?
  stop_kstash
  if (( rc != 0 )) && [[ -z "${LOG_SHOWN:-}" ]]; then show_kstash_log; fi
  if (( rc == 0 )); then rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# The port of the suites' LLM stub (kstash maps the `api/llm` destination to it).
SDK_LLM_STUB_PORT=$(free_port)
export SDK_LLM_STUB_PORT

# A port picked this way can in theory be taken before kstash binds it: retry then.
PORT=""
for attempt in 1 2 3; do
  port=$(free_port)
  log "starting kstash dev on 127.0.0.1:$port (log: $KSTASH_LOG) ..."
  KSTASH_LLM_BASE_URL="http://127.0.0.1:$SDK_LLM_STUB_PORT" KSTASH_LLM_TOKEN="stub-token" \
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
log "kstash is up on 127.0.0.1:$PORT (LLM stub port $SDK_LLM_STUB_PORT; $(( $(date +%s) - STARTED_AT ))s so far)"

export KSTASH_URL="http://127.0.0.1:$PORT"
export PYTHONDONTWRITEBYTECODE=1  # compat_async.py imports compat.py: no __pycache__ in the tree
export KSTASH_TOKEN="eyJVc2VySUQiOiJkZWZhdWx0VXNlciIsIlBhc3N3b3JkIjoiZGVmYXVsdFBhc3N3b3JkIn0="

# --- run the suites -----------------------------------------------------------------
total_passed=0
total_failed=0
failed_suites=()

# run_suite NAME COMMAND...: streams the suite's output, adds its summary to the totals.
run_suite() {
  local name="$1"; shift
  local out="$WORK/$name.out" rc=0
  log "running $name suite: $* ..."
  "$@" 2>&1 | tee "$out" || rc=$?
  local summary
  summary=$(tail -n 1 "$out")
  if [[ "$summary" =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
    total_passed=$(( total_passed + BASH_REMATCH[1] ))
    total_failed=$(( total_failed + BASH_REMATCH[2] ))
    if (( rc != 0 && BASH_REMATCH[2] == 0 )); then total_failed=$(( total_failed + 1 )); fi
  else
    log "$name suite did not end with a summary line (exit code $rc)"
    total_failed=$(( total_failed + 1 ))
    (( rc != 0 )) || rc=1
  fi
  if (( rc != 0 )); then failed_suites+=("$name"); fi
  log "$name suite: exit code $rc"
}

run_suite ts node "$TS_DIR/compat.mjs"
run_suite py "$VENV/bin/python" "$PY_DIR/compat.py"
run_suite py-async "$VENV/bin/python" "$PY_DIR/compat_async.py"

stop_kstash
if (( ${#failed_suites[@]} > 0 )); then
  show_kstash_log
  LOG_SHOWN=1
  log "FAILED suites: ${failed_suites[*]} ($(( $(date +%s) - STARTED_AT ))s)"
  echo "total: $total_passed passed, $total_failed failed"
  exit 1
fi
log "all SDK suites passed ($(( $(date +%s) - STARTED_AT ))s)"
echo "total: $total_passed passed, $total_failed failed"
