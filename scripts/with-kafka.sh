#!/usr/bin/env bash
# with-kafka.sh -- run a command against a real, throw-away Apache Kafka broker.
#
#   scripts/with-kafka.sh <command> [args...]
#
# Starts a single-node Kafka 4.x broker (KRaft, combined broker+controller) on
# loopback, exports KSTASH_TEST_BROKERS=127.0.0.1:<port>, runs the command, stops
# the broker, and exits with the command's exit status. kstash's integration
# tests use it locally and in CI, e.g. `scripts/with-kafka.sh cargo test`.
#
# Design choices:
# - No Docker and no Kafka tarball: this machine (and CI) reaches Maven Central
#   only, so the broker is the kafka_2.13 artifact plus its runtime deps, resolved
#   by ci/kafka/pom.xml and run as `java -cp '.kafka/libs/*' kafka.Kafka`.
#   Needs java (17+) always and mvn only when the jars are not cached yet.
# - Jar cache: .kafka/libs at the repo root, valid while its stamp file holds the
#   sha256 of ci/kafka/pom.xml (edit the pom -> refetch). Jars are fetched into a
#   staging dir and renamed into place, under flock when available, so an
#   interrupted or concurrent fetch never leaves a half-filled cache behind.
# - Everything else is per run, in a fresh temp dir: random cluster id (16 random
#   bytes, base64url, as Kafka's Uuid does; saves a JVM start over
#   `StorageTool random-uuid`), `StorageTool format --standalone` (the 4.x way to
#   bootstrap a one-voter dynamic quorum), server.properties, logs, data.
# - Loopback only: PLAINTEXT on 127.0.0.1:$KAFKA_PORT (default 19092), CONTROLLER
#   on 127.0.0.1:$KAFKA_CONTROLLER_PORT (default KAFKA_PORT+1); without KAFKA_PORT the next
#   free pair above 19092 is used. Explicitly given ports must be
#   free beforehand; we fail instead of silently testing against someone else's
#   broker. Single-node settings (replication factor 1 everywhere, no rebalance
#   delay, no topic auto-creation, internal topics with 1 partition so the first
#   consumer group / transaction does not wait for 50 partitions to be created).
# - Readiness (bounded by $KAFKA_START_TIMEOUT, default 120 s) needs all of:
#   the port accepts connections, the broker logged "Kafka Server started", and a
#   real metadata round trip with the official Java Admin client (describeCluster
#   + listTopics; the cluster id must be ours). That probe is a tiny Java class
#   embedded below, compiled once into .kafka/probe/<hash>, and started right
#   after the broker so its JVM start overlaps the broker's. Without javac (JRE
#   only) the probe is skipped and the first two checks decide.
# - Logging: ci/kafka/log4j2.xml writes WARN+ (and the broker's startup lines) to
#   <tmp>/logs/broker.log; the JVM's own stdout/stderr go to <tmp>/logs/console.log.
#   If the broker dies or is not ready in time, the tails of both are printed.
# - Teardown always runs (trap on EXIT; INT/TERM/HUP/PIPE exit through it):
#   SIGTERM to the broker, wait up to $KAFKA_STOP_TIMEOUT (default 30 s), then
#   SIGKILL; the temp dir is removed. A small watchdog process does the same if
#   this script itself is SIGKILLed, so no java process outlives it.
# - Broker control for fault injection (examples/faults.rs): the command also gets
#   KSTASH_TEST_BROKER_PIDFILE, a file holding the broker's current pid, and
#   KSTASH_TEST_BROKER_RESTART, a generated script that starts the broker again
#   with the same config, cluster id and data directory once it has exited (stop
#   it with SIGTERM and wait for its exit first), waits until it is ready (same
#   checks and bound as the first start), updates the pid file and exits 0 (1 if
#   the broker did not come back). The restarted broker appends to the same logs.
#   Teardown and the watchdog stop whichever pid the file holds (with a SIGCONT,
#   in case it was paused with SIGSTOP); a restart racing with teardown is
#   refused, so no broker is started behind teardown's back.
# - The command runs in the foreground (keeps its stdin and Ctrl-C). A SIGTERM
#   sent to this script alone is therefore acted on once the command returns.
# - Progress lines go to stderr, prefixed "with-kafka:", so the command's stdout
#   stays clean.
set -euo pipefail

log() { printf 'with-kafka: %s\n' "$*" >&2 || true; }
die() {
  log "error: $*"
  exit 1
}

usage() {
  cat >&2 <<'EOF'
usage: scripts/with-kafka.sh <command> [args...]

Runs <command> with a fresh single-node Kafka broker on 127.0.0.1 and
KSTASH_TEST_BROKERS=127.0.0.1:<port> exported; exits with the command's status.
Also exported: KSTASH_TEST_BROKER_PIDFILE (file with the broker's current pid)
and KSTASH_TEST_BROKER_RESTART (script: start the stopped broker again, same
data directory, and wait until it is ready).

environment:
  KAFKA_PORT             PLAINTEXT port (default 19092)
  KAFKA_CONTROLLER_PORT  KRaft controller port (default KAFKA_PORT+1)
  KAFKA_START_TIMEOUT    seconds to wait for the broker (default 120)
  KAFKA_STOP_TIMEOUT     seconds to wait after SIGTERM before SIGKILL (default 30)
  JAVA                   java binary (default: java on PATH)
EOF
  exit 2
}

[[ $# -ge 1 ]] || usage
case $1 in -h | --help) usage ;; esac

repo_root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
pom=$repo_root/ci/kafka/pom.xml
log4j_conf=$repo_root/ci/kafka/log4j2.xml
cache=$repo_root/.kafka
libs=$cache/libs
stamp=$libs/.complete

port=${KAFKA_PORT:-19092}
# Port pairs tried above the default when KAFKA_PORT is not set.
PORT_SEARCH_TRIES=20
controller_port=${KAFKA_CONTROLLER_PORT:-$((port + 1))}
start_timeout=${KAFKA_START_TIMEOUT:-120}
stop_timeout=${KAFKA_STOP_TIMEOUT:-30}
java=${JAVA:-java}
bootstrap=127.0.0.1:$port

for v in port controller_port start_timeout stop_timeout; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a number, got '${!v}'"
done
[[ $port != "$controller_port" ]] || die "KAFKA_PORT and KAFKA_CONTROLLER_PORT are both $port"
[[ -f $pom && -f $log4j_conf ]] || die "missing $pom or $log4j_conf"
command -v "$java" >/dev/null || die "java not found (need a JDK/JRE 17+ on PATH, or JAVA=...)"
command -v sha256sum >/dev/null || die "sha256sum not found"

# JVM flags for the short-lived helper JVMs (format, probe): start fast, stay small.
tool_jvm=(-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xmx256m)

# --- state for teardown ------------------------------------------------------
work=""
broker_pid=""
probe_pid=""
watchdog_pid=""
staging=""
pidfile=""

# True while process $1 runs; a zombie (exited, not yet reaped) counts as gone.
alive() {
  local stat
  kill -0 "$1" 2>/dev/null || return 1
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0 # no /proc: trust kill -0
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}

# The broker's current pid: the pid file's (a restart updates it), else the first start's.
current_broker() {
  local pid=""
  [[ -z $pidfile || ! -s $pidfile ]] || pid=$(<"$pidfile")
  printf '%s\n' "${pid:-$broker_pid}"
}

# shellcheck disable=SC2317 # only reached from the EXIT trap
stop_pid() { # pid timeout-seconds name
  local pid=$1 limit=$2 name=$3 waited=0
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  kill -CONT "$pid" 2>/dev/null || true # a SIGSTOPped process acts on SIGTERM only once continued
  while alive "$pid"; do
    if ((waited >= limit * 10)); then
      log "$name (pid $pid) still running ${limit}s after SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  wait "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317 # invoked by the trap below
cleanup() {
  local rc=$?
  set +e # best effort from here on: never skip stopping the broker
  trap '' INT TERM HUP PIPE
  if [[ -n $watchdog_pid ]]; then
    kill -TERM "$watchdog_pid" 2>/dev/null || true
    wait "$watchdog_pid" 2>/dev/null || true
  fi
  [[ -z $probe_pid ]] || stop_pid "$probe_pid" 5 "metadata probe"
  refuse_restarts
  broker_pid=$(current_broker)
  if [[ -n $broker_pid ]] && alive "$broker_pid"; then
    log "stopping broker"
    stop_pid "$broker_pid" "$stop_timeout" "broker"
  fi
  [[ -z $staging ]] || rm -rf -- "$staging"
  [[ -z $work ]] || rm -rf -- "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
trap 'exit 141' PIPE

# --- helpers -----------------------------------------------------------------
# Teardown: no restart may start a broker from now on. A restart checks this marker before it
# starts a broker and again after it wrote the pid file (and stops its broker itself if the
# marker appeared in between), so a pid file read after this names the last broker there is.
refuse_restarts() {
  [[ -z $work || ! -d $work ]] || : >"$work/stopping"
}

port_open() { # true if something accepts TCP connections on 127.0.0.1:$1
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

show_logs() {
  local f
  for f in "$work/logs/broker.log" "$work/logs/console.log" "$work/probe.out"; do
    [[ -s $f ]] || continue
    log "---- last 40 lines of ${f##*/} ----"
    tail -n 40 -- "$f" >&2
  done
  log "----"
}

broker_failed() {
  log "error: $*"
  show_logs
  exit 1
}

random_cluster_id() { # Kafka Uuid format: 16 random bytes, base64url, no padding
  local id
  while :; do
    id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
    # Kafka's Uuid.randomUuid never returns an id starting with '-' (CLI-hostile).
    [[ ${#id} -eq 22 && $id != -* ]] && break
  done
  printf '%s\n' "$id"
}

# The readiness probe: one metadata round trip with the official Admin client.
# args: <bootstrap> <expected cluster id> <timeout seconds>; exit 0 ready,
# 1 not ready before the timeout, 2 the port is served by a different cluster.
probe_source() {
  cat <<'JAVA'
import java.util.Collection;
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.DescribeClusterResult;
import org.apache.kafka.common.Node;

public class KafkaReady {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0];
        String expectedClusterId = args[1];
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[2]));
        Properties props = new Properties();
        props.put("bootstrap.servers", bootstrap);
        props.put("client.id", "with-kafka-probe");
        props.put("request.timeout.ms", "5000");
        props.put("default.api.timeout.ms", "10000");
        props.put("reconnect.backoff.max.ms", "500");
        String last = "no attempt";
        try (Admin admin = Admin.create(props)) {
            while (System.nanoTime() < deadline) {
                try {
                    DescribeClusterResult cluster = admin.describeCluster();
                    String clusterId = cluster.clusterId().get(10, TimeUnit.SECONDS);
                    Collection<Node> nodes = cluster.nodes().get(10, TimeUnit.SECONDS);
                    if (!expectedClusterId.equals(clusterId)) {
                        System.out.println("cluster id is " + clusterId + ", expected " + expectedClusterId
                                + ": another Kafka is serving " + bootstrap);
                        System.exit(2);
                    }
                    if (!nodes.isEmpty()) {
                        admin.listTopics().names().get(10, TimeUnit.SECONDS);
                        System.out.println("metadata ok: cluster " + clusterId + ", brokers " + nodes);
                        System.exit(0);
                    }
                    last = "metadata lists no brokers yet";
                } catch (Exception e) {
                    last = e.toString();
                }
                Thread.sleep(250);
            }
        }
        System.out.println("metadata probe gave up: " + last);
        System.exit(1);
    }
}
JAVA
}

# --- 1. jars (cached) and probe class (cached) -------------------------------
mkdir -p -- "$cache"
pom_sum=$(sha256sum -- "$pom" | cut -d' ' -f1)
probe_sum=$({ probe_source; printf '%s\n' "$pom_sum"; } | sha256sum | cut -c1-16)
probe_dir=$cache/probe/$probe_sum
have_javac=0
command -v javac >/dev/null && have_javac=1

cache_ok() {
  [[ -f $stamp && $(<"$stamp") == "$pom_sum" ]] || return 1
  ((have_javac == 0)) || [[ -f $probe_dir/KafkaReady.class ]]
}

if ! cache_ok; then
  lock_fd=""
  if command -v flock >/dev/null; then
    exec {lock_fd}>"$cache/.lock"
    if ! flock -n "$lock_fd"; then
      log "waiting for another with-kafka run to finish fetching…"
      flock "$lock_fd"
    fi
  fi
  if ! [[ -f $stamp && $(<"$stamp") == "$pom_sum" ]]; then
    command -v mvn >/dev/null || die "jars not cached in $libs and mvn not found"
    log "fetching jars… (mvn, ci/kafka/pom.xml -> .kafka/libs)"
    t0=$SECONDS
    staging=$(mktemp -d "$cache/libs.tmp.XXXXXX")
    if ! mvn -B -Dstyle.color=never -f "$pom" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$staging" >"$cache/mvn.log" 2>&1; then
      tail -n 40 -- "$cache/mvn.log" >&2
      die "mvn failed to fetch the Kafka jars (full output: .kafka/mvn.log)"
    fi
    compgen -G "$staging/kafka_2.13-*.jar" >/dev/null || die "mvn copied no kafka_2.13 jar into $staging"
    printf '%s\n' "$pom_sum" >"$staging/.complete"
    rm -rf -- "$libs"
    mv -- "$staging" "$libs"
    staging=""
    log "fetched $(find "$libs" -name '*.jar' | wc -l) jars in $((SECONDS - t0))s"
  fi
  if ((have_javac)) && ! [[ -f $probe_dir/KafkaReady.class ]]; then
    staging=$(mktemp -d "$cache/probe.tmp.XXXXXX")
    probe_source >"$staging/KafkaReady.java"
    javac -nowarn -cp "$libs/*" -d "$staging" "$staging/KafkaReady.java" >&2 ||
      die "could not compile the readiness probe"
    mkdir -p -- "$cache/probe"
    rm -rf -- "$probe_dir"
    mv -- "$staging" "$probe_dir"
    staging=""
  fi
  if [[ -n $lock_fd ]]; then exec {lock_fd}>&-; fi
fi
((have_javac)) || log "javac not found: skipping the metadata probe (port + log line decide readiness)"

# --- 2. ports, temp dir, config, format ---------------------------------------
# Explicit ports must be free. Without KAFKA_PORT, step to the next pair until both are free, so
# a broker someone else left running on the default port never fails (or joins) this run.
ports_busy() { port_open "$port" || port_open "$controller_port"; }
if [[ -z ${KAFKA_PORT:-} && -z ${KAFKA_CONTROLLER_PORT:-} ]]; then
  for _ in $(seq 1 "$PORT_SEARCH_TRIES"); do
    ports_busy || break
    log "127.0.0.1:$port or :$controller_port is in use; trying the next pair"
    port=$((port + 2))
    controller_port=$((port + 1))
  done
  bootstrap=127.0.0.1:$port
fi
for p in "$port" "$controller_port"; do
  if port_open "$p"; then
    die "127.0.0.1:$p is already in use (another broker?); free it or set KAFKA_PORT / KAFKA_CONTROLLER_PORT"
  fi
done

work=$(mktemp -d "${TMPDIR:-/tmp}/with-kafka.XXXXXX")
mkdir -p -- "$work/logs" "$work/data"
cluster_id=$(random_cluster_id)

cat >"$work/server.properties" <<EOF
# generated by scripts/with-kafka.sh
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$work/data

num.partitions=1
auto.create.topics.enable=false
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1
EOF

log_opts=(-Dlog4j2.configurationFile="$log4j_conf" -Dkafka.logs.dir="$work/logs")

log "formatting KRaft storage (cluster id $cluster_id)"
if ! "$java" "${tool_jvm[@]}" "${log_opts[@]}" -cp "$libs/*" kafka.tools.StorageTool \
  format --standalone --cluster-id "$cluster_id" --config "$work/server.properties" \
  >"$work/logs/format.log" 2>&1; then
  log "error: kafka.tools.StorageTool format failed:"
  tail -n 40 -- "$work/logs/format.log" >&2
  exit 1
fi

# --- 3. start the broker, and the probe next to it ----------------------------
pidfile=$work/broker.pid
restart_script=$work/restart-broker.sh

# Starts the broker (appending to its logs), records its pid in $pidfile, and with javac starts
# the readiness probe next to it, so its JVM start overlaps the broker's.
start_broker() {
  log_mark=0 # lines of broker.log before this start (the format step, an earlier run)
  [[ ! -f $work/logs/broker.log ]] || log_mark=$(wc -l <"$work/logs/broker.log")
  t_start=$SECONDS
  "$java" -Xmx512m -Xms256m -Djava.awt.headless=true "${log_opts[@]}" \
    -cp "$libs/*" kafka.Kafka "$work/server.properties" \
    </dev/null >>"$work/logs/console.log" 2>&1 &
  broker_pid=$!
  printf '%s\n' "$broker_pid" >"$pidfile"
  if ((have_javac)); then
    mkdir -p -- "$work/probe-logs"
    "$java" "${tool_jvm[@]}" -Dlog4j2.configurationFile="$log4j_conf" -Dkafka.logs.dir="$work/probe-logs" \
      -cp "$probe_dir:$libs/*" KafkaReady "$bootstrap" "$cluster_id" "$start_timeout" \
      </dev/null >"$work/probe.out" 2>&1 &
    probe_pid=$!
  fi
}

# Waits (at most $start_timeout from the start) until the broker just started is ready: the port
# accepts connections, it logged "Kafka Server started" (since this start), and the probe passed.
wait_ready() {
  local deadline=$((t_start + start_timeout)) next_note=$((t_start + 15)) status
  local up_port=0 up_log=0 up_probe=$((1 - have_javac))
  while :; do
    if ! alive "$broker_pid"; then
      status=0
      wait "$broker_pid" || status=$?
      broker_pid=""
      broker_failed "broker exited (status $status) before it was ready"
    fi
    ((up_port)) || { port_open "$port" && up_port=1; } || true
    ((up_log)) || { awk -v after="$log_mark" 'NR > after && /Kafka Server started/ { found = 1 }
      END { exit !found }' "$work/logs/broker.log" 2>/dev/null && up_log=1; } || true
    if ((!up_probe)) && ! alive "$probe_pid"; then
      status=0
      wait "$probe_pid" || status=$?
      probe_pid=""
      ((status == 0)) || broker_failed "metadata probe failed (status $status): $(tail -n 1 "$work/probe.out")"
      up_probe=1
    fi
    if ((up_port && up_log && up_probe)); then break; fi
    if ((SECONDS >= deadline)); then
      broker_failed "broker not ready after ${start_timeout}s (port open: $up_port, started line logged: $up_log, metadata ok: $up_probe)"
    fi
    if ((SECONDS >= next_note)); then
      log "still waiting after $((SECONDS - t_start))s (port open: $up_port, started line logged: $up_log, metadata ok: $up_probe)"
      next_note=$((next_note + 15))
    fi
    sleep 0.25
  done
}

log "starting broker on $bootstrap (controller 127.0.0.1:$controller_port)"
start_broker

# Watchdog: if this script dies without running its trap (SIGKILL), stop the
# broker (the current one, after any restart) and the probe, and remove the temp
# dir. cleanup() kills it first.
(
  trap '' INT
  while kill -0 "$$" 2>/dev/null; do sleep 1; done
  [[ -z $probe_pid ]] || kill -TERM "$probe_pid" 2>/dev/null || true
  refuse_restarts
  stop_pid "$(current_broker)" "$stop_timeout" "broker"
  rm -rf -- "$work"
) </dev/null >/dev/null 2>&1 &
watchdog_pid=$!

# --- 4. wait until ready, write the restart script ------------------------------
wait_ready
log "broker up on $bootstrap after $((SECONDS - t_start))s"

# The restart script: these variables and functions, then its own steps. It refuses to start a
# second broker, and to start one at all once teardown began (refuse_restarts).
{
  printf '#!/usr/bin/env bash\n'
  printf '# Generated by scripts/with-kafka.sh (pid %s): starts its broker again, same config and\n' "$$"
  printf '# data directory, once the previous one exited; waits until it is ready. Exit 0: ready.\n'
  printf 'set -euo pipefail\n'
  declare -p java libs log4j_conf work port bootstrap cluster_id start_timeout have_javac \
    probe_dir pidfile tool_jvm log_opts
  printf 'broker_pid="" probe_pid=""\n'
  declare -f log alive port_open show_logs broker_failed start_broker wait_ready
  cat <<'EOF'
trap '[[ -z $probe_pid ]] || kill -TERM "$probe_pid" 2>/dev/null || true' EXIT
previous=$(<"$pidfile")
if alive "$previous"; then
  log "error: the broker (pid $previous) is still running; stop it and wait for its exit first"
  exit 1
fi
if [[ ! -d $work || -e $work/stopping ]]; then
  log "error: with-kafka.sh is stopping; not restarting the broker"
  exit 1
fi
log "restarting broker on $bootstrap (same config and data directory)"
start_broker
if [[ -e $work/stopping ]]; then
  log "error: with-kafka.sh began stopping during the restart; stopping the new broker"
  kill -TERM "$broker_pid" 2>/dev/null || true
  exit 1
fi
wait_ready
log "broker up again on $bootstrap after $((SECONDS - t_start))s (pid $broker_pid)"
EOF
} >"$restart_script"
chmod +x -- "$restart_script"

# --- 5. run the command ---------------------------------------------------------
export KSTASH_TEST_BROKERS=$bootstrap
export KSTASH_TEST_BROKER_PIDFILE=$pidfile KSTASH_TEST_BROKER_RESTART=$restart_script
log "running: $*"
status=0
"$@" || status=$?
if ((status != 0)); then
  log "command exited with status $status"
fi
if ! alive "$(current_broker)"; then
  log "warning: the broker died while the command ran"
  show_logs
fi
exit "$status"
