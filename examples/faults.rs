//! kstash fault-injection suite. Runs several `kstash serve` processes that share one topic
//! prefix and consumer groups on the real broker from `scripts/with-kafka.sh`, a receiver, and a
//! steady publish load; injects a fault mid-load; then checks the receiver's view. Prints a
//! markdown table on stdout (progress lines go to stderr). RELIABILITY.md has the results.
//!
//! ```text
//! cargo build --bin kstash --example faults
//! scripts/with-kafka.sh cargo run --example faults -- all
//! scripts/with-kafka.sh cargo run --example faults -- kill9 --duration 60s --processes 4
//! ```
//!
//! The load: `--rate` publishes/s (`POST /v2/publish`), round-robin over the processes that are
//! up, `--delayed-percent` of them with `Upstash-Delay: --delay`; plus `--queues` FIFO queues,
//! each fed in order by one client (`POST /v2/enqueue`, the next enqueue after the previous
//! answer) at `--fifo-rate`. Every body starts with a unique sequence number. A publish is
//! *accepted* when answered 2xx. A connection refused or not established (a process that is down;
//! the request was not sent) is tried on the next process and is not an outcome; a 503 is counted;
//! a request sent but not answered (its process died under it) is "no answer". Nothing is ever
//! published twice.
//!
//! Scenarios (`all` runs them in this order, each with a fresh topic prefix, processes and
//! receiver):
//! - `kill9`: SIGKILL one process `--fault-at` into the load; restart it `--down` later.
//! - `broker-restart`: SIGTERM the broker (waits for its exit), restart it at once with the same
//!   data directory (`KSTASH_TEST_BROKER_RESTART`); publishes in between get 503.
//! - `rolling`: SIGTERM one process at a time (taken out of the load first, its publishes in
//!   flight answered), wait for its exit, restart it, wait until healthy, then the next.
//!   Must show 0 lost and 0 duplicates.
//! - `sigstop`: SIGSTOP the broker for `--pause`, then SIGCONT.
//!
//! After the fault the load goes on for at least `--tail` (and until `--duration`); then the
//! suite waits at most `--drain` until every accepted message was delivered, `--linger` more for
//! duplicates, takes the figures, and stops the processes with SIGTERM. Figures per scenario: accepted, 503s,
//! delivered (distinct), lost (accepted, never delivered), duplicates (deliveries beyond the
//! first), and the recovery time: from the fault's start to the last arrival of a message that was
//! late by more than `--late` (0 when no message was late). Exit status 1 when an accepted
//! message was lost in any scenario or `rolling` delivered a duplicate, 2 when a scenario could
//! not run. Each scenario's kstash configs and logs, and `messages.csv` (one line per message: what
//! the load saw, what the receiver got), are in a temp directory, kept (and named) when the
//! scenario fails or with `--keep`.
#![deny(unsafe_code)]

mod support;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, ValueEnum};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use support::{progress, send_signal, since, unix_ms, Kstash, Mode, Options, Receiver};

#[derive(Parser)]
#[command(
    name = "faults",
    about = "kstash fault injection: kill -9, broker restart, rolling restart and a paused broker \
             under a steady publish load, checked at the receiver"
)]
struct Cli {
    /// The scenario to run.
    #[arg(value_enum)]
    scenario: Which,
    #[command(flatten)]
    a: FaultArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Which {
    /// SIGKILL one kstash process mid-load, restart it after --down.
    Kill9,
    /// Stop the broker (SIGTERM, wait for its exit) mid-load and start it again.
    BrokerRestart,
    /// SIGTERM, restart and wait for each process in turn: 0 lost, 0 duplicated required.
    Rolling,
    /// SIGSTOP the broker for --pause, then SIGCONT.
    Sigstop,
    /// Every scenario above, one after the other.
    All,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Kill9 => "kill9",
            Which::BrokerRestart => "broker-restart",
            Which::Rolling => "rolling",
            Which::Sigstop => "sigstop",
            Which::All => "all",
        }
    }

    fn needs_broker_control(self) -> bool {
        matches!(self, Which::BrokerRestart | Which::Sigstop)
    }
}

#[derive(Args, Clone)]
struct FaultArgs {
    /// kstash processes sharing the work.
    #[arg(long, default_value_t = 3)]
    processes: usize,
    /// Publishes per second (`/v2/publish`), round-robin over the processes that are up.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Shortest load; it lasts longer when the fault needs it (see --tail).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "25s")]
    duration: Duration,
    /// When the fault starts, after the load started.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "8s")]
    fault_at: Duration,
    /// The load goes on at least this long after the fault's last step.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    tail: Duration,
    /// kill9: how long the killed process stays down.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    down: Duration,
    /// sigstop: how long the broker stays paused.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pause: Duration,
    /// Share of the publishes sent with `Upstash-Delay: --delay` (percent).
    #[arg(long, default_value_t = 20)]
    delayed_percent: u32,
    /// The delay of those.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    delay: Duration,
    /// FIFO queues, each fed in order by one client (0: none).
    #[arg(long, default_value_t = 2)]
    queues: usize,
    /// Enqueues per second per queue (the next one waits for the previous answer, so fewer when
    /// answers are slow).
    #[arg(long, default_value_t = 5.0)]
    fifo_rate: f64,
    /// After the load: how long to wait for the accepted messages to be delivered.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    drain: Duration,
    /// After that: how long to go on listening for duplicates.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    linger: Duration,
    /// A message delivered later than this after its publish was answered (plus its delay) was
    /// held up by the fault; the recovery time ends with the last such arrival.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    late: Duration,
    /// `kafka.produce_timeout` of the processes: how long a publish waits for Kafka before 503
    /// (kstash's default is 30 s, longer than the outages here).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    produce_timeout: Duration,
    /// Kafka bootstrap servers (loopback only).
    #[arg(long, env = "KSTASH_TEST_BROKERS", default_value = "127.0.0.1:19092")]
    brokers: String,
    /// File with the broker's pid (broker-restart, sigstop); set by scripts/with-kafka.sh.
    #[arg(long, env = "KSTASH_TEST_BROKER_PIDFILE")]
    broker_pidfile: Option<PathBuf>,
    /// Script that starts the stopped broker again (broker-restart); set by scripts/with-kafka.sh.
    #[arg(long, env = "KSTASH_TEST_BROKER_RESTART")]
    broker_restart: Option<PathBuf>,
    /// The kstash binary. Default: `kstash` next to this example's directory (the same build
    /// profile: build it with `cargo build --bin kstash --example faults`).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// RUST_LOG of the kstash processes. The default adds per-message lines (deliveries, delay
    /// hops) and the consumers' assignments with their committed offsets: the evidence for a lost
    /// or duplicated message.
    #[arg(
        long,
        default_value = "info,kstash::delivery=debug,kstash::delay=trace,kstash::kafka::consumer=debug"
    )]
    rust_log: String,
    /// Keep every scenario's directory (configs, kstash logs), not only those of failed ones.
    #[arg(long)]
    keep: bool,
}

/// Test HTTP requests to kstash give up after this much more than `--produce-timeout`.
const REQUEST_MARGIN: Duration = Duration::from_secs(30);
/// A connection to kstash not established within this is tried on the next process (a refused
/// one at once). Generous: on a busy machine even loopback connects can take a while.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A publish that finds no process up tries again until this long after its first try.
const NO_PROCESS_LIMIT: Duration = Duration::from_secs(60);
/// Publishes of the main load in flight at most (more would mean the load cannot keep its rate).
const MAX_IN_FLIGHT: usize = 4000;
/// Warm-up messages (immediate, and delayed by 1 s), not counted (unless lost), and how long the
/// warm-up waits for them.
const WARMUP: usize = 24;
const WARMUP_LIMIT: Duration = Duration::from_secs(30);
/// Bounds of the fault steps.
const STOP_LIMIT: Duration = Duration::from_secs(60);
const BROKER_RESTART_LIMIT: Duration = Duration::from_secs(180);
/// See `wait_settled`.
const SETTLE_QUIET: Duration = Duration::from_secs(3);
const SETTLE_LIMIT: Duration = Duration::from_secs(30);
/// Lost or duplicated messages listed in the notes.
const EXAMPLES: usize = 10;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let suite = run_suite(cli.scenario, cli.a);
    // On Ctrl-C or SIGTERM the suite future is dropped: kstash children are killed (kill on
    // drop), a paused broker is continued (see `Paused`).
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            progress(format!("error: {e}"));
            return ExitCode::from(2);
        }
    };
    tokio::select! {
        code = suite => code,
        _ = tokio::signal::ctrl_c() => {
            progress("interrupted; kstash processes stopped".into());
            ExitCode::from(130)
        }
        _ = term.recv() => {
            progress("terminated; kstash processes stopped".into());
            ExitCode::from(143)
        }
    }
}

async fn run_suite(which: Which, mut a: FaultArgs) -> ExitCode {
    let scenarios = match which {
        Which::All => vec![
            Which::Kill9,
            Which::BrokerRestart,
            Which::Rolling,
            Which::Sigstop,
        ],
        one => vec![one],
    };
    if let Err(e) = check_args(&mut a, &scenarios) {
        progress(format!("error: {e:#}"));
        return ExitCode::from(2);
    }
    let started = Instant::now();
    let root = std::env::temp_dir().join(format!(
        "kstash-faults-{}-{}",
        std::process::id(),
        unix_ms()
    ));
    let mut reports = Vec::new();
    let mut error = None;
    for s in scenarios {
        progress(format!("=== {} ===", s.name()));
        match run_scenario(s, &a, &root).await {
            Ok(r) => {
                eprint!("{}", r.notes());
                reports.push(r);
            }
            Err(e) => {
                progress(format!(
                    "{}: could not run: {e:#}; kstash configs and logs are in {}",
                    s.name(),
                    root.join(s.name()).display()
                ));
                error = Some((s, e));
                break;
            }
        }
    }
    let mut out = environment(&a, started.elapsed());
    out += &table(&reports);
    for r in &reports {
        out += &r.notes();
    }
    if let Some((s, e)) = &error {
        let _ = writeln!(out, "\n**{}: could not run**: {e:#}", s.name());
    }
    println!("{out}");
    if reports.iter().all(|r| !r.keep_dir) && error.is_none() && !a.keep {
        let _ = std::fs::remove_dir_all(&root);
    }
    let failed = reports.iter().any(|r| r.failed());
    progress(format!(
        "done in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        if error.is_some() {
            "a scenario could not run"
        } else if failed {
            "FAILED"
        } else {
            "passed"
        }
    ));
    if error.is_some() {
        ExitCode::from(2)
    } else if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn check_args(a: &mut FaultArgs, scenarios: &[Which]) -> Result<()> {
    if a.processes == 0 || a.rate <= 0.0 || a.delayed_percent > 100 {
        bail!("need --processes ≥ 1, --rate > 0 and --delayed-percent ≤ 100");
    }
    if a.queues > 0 && a.fifo_rate <= 0.0 {
        bail!("--fifo-rate must be positive");
    }
    if a.bin.is_none() {
        // target/<profile>/examples/faults → target/<profile>/kstash
        let me = std::env::current_exe()?;
        let profile_dir = me
            .parent()
            .and_then(Path::parent)
            .context("cannot place this executable")?;
        a.bin = Some(profile_dir.join("kstash"));
    }
    if scenarios.iter().any(|s| s.needs_broker_control()) {
        if a.broker_pidfile.is_none() {
            bail!(
                "broker-restart and sigstop need the broker's pid: run under scripts/with-kafka.sh \
                 (KSTASH_TEST_BROKER_PIDFILE) or pass --broker-pidfile"
            );
        }
        if scenarios.contains(&Which::BrokerRestart) && a.broker_restart.is_none() {
            bail!(
                "broker-restart needs KSTASH_TEST_BROKER_RESTART (scripts/with-kafka.sh sets it) \
                 or --broker-restart"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One scenario
// ---------------------------------------------------------------------------------------------

/// What happened at which time (ms since the scenario's clock).
type Timeline = Mutex<Vec<(f64, String)>>;

/// The fault's window: from its first step to its last (ms since the scenario's clock), and the
/// outage when there is one (the broker gone or paused).
#[derive(Default)]
struct FaultWindow {
    start_ms: f64,
    end_ms: f64,
    outage_ms: Option<f64>,
    description: String,
}

async fn run_scenario(which: Which, a: &FaultArgs, root: &Path) -> Result<Report> {
    let dir = root.join(which.name());
    std::fs::create_dir_all(&dir)?;
    let name = format!(
        "faults-{}-{}-{}",
        std::process::id(),
        unix_ms(),
        which.name()
    );
    let clock = Instant::now();
    let load_max = a.duration + a.fault_at + a.tail + Duration::from_secs(600);
    let per_second = a.rate + a.queues as f64 * a.fifo_rate;
    let capacity = WARMUP + (per_second * load_max.as_secs_f64()).ceil() as usize;
    let receiver = Arc::new(Receiver::start(clock, capacity).await?);
    progress(format!(
        "{}: {} processes, topic prefix {name}., logs under {}",
        which.name(),
        a.processes,
        dir.display()
    ));
    let options: Vec<Options> = (0..a.processes)
        .map(|i| Options {
            bin: a.bin.clone().expect("set by check_args"),
            mode: Mode::Serve,
            brokers: a.brokers.clone(),
            partitions: None,
            rust_log: a.rust_log.clone(),
            keep: true,
            name: Some(name.clone()),
            dir: Some(dir.join(format!("p{i}"))),
            extra: vec![
                (
                    "kafka",
                    format!("produce_timeout = \"{}ms\"", a.produce_timeout.as_millis()),
                ),
                (
                    "kafka",
                    format!("scheduler_group_id = \"{name}-scheduler\""),
                ),
            ],
        })
        .collect();
    let mut procs = futures::future::try_join_all(options.iter().map(Kstash::spawn)).await?;
    let load = Arc::new(Load::new(a, &procs, &receiver, clock, capacity)?);
    let timeline: Arc<Timeline> = Arc::default();

    warm_up(&load, &receiver).await?;
    wait_settled(&procs).await;

    // The load, its progress lines, and the fault.
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let load_start = Instant::now();
    let load_start_ms = since(clock, load_start);
    tracker.spawn(main_load(load.clone(), stop.clone(), tracker.clone()));
    for q in 0..a.queues {
        tracker.spawn(fifo_load(load.clone(), q, stop.clone()));
    }
    let reporter = tokio::spawn(report_progress(
        which,
        load.clone(),
        receiver.clone(),
        load_start,
    ));
    tokio::time::sleep_until((load_start + a.fault_at).into()).await;
    let fault = inject(which, a, &mut procs, &load, &timeline).await;
    let fault = match fault {
        Ok(f) => f,
        Err(e) => {
            stop.cancel();
            reporter.abort();
            keep_note(&dir);
            return Err(e);
        }
    };
    let load_end = (load_start + a.duration).max(clock + ms_duration(fault.end_ms) + a.tail);
    tokio::time::sleep_until(load_end.into()).await;
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(a.produce_timeout + REQUEST_MARGIN, tracker.wait())
        .await
        .is_err()
    {
        progress("publishes still unanswered after their timeout; not waiting".into());
    }
    let load_ms = since(clock, Instant::now()) - load_start_ms;
    note(&timeline, clock, "load stopped".into());

    // Drain, then listen for duplicates, then stop the processes.
    let drained = drain(which, a, &load, &receiver).await;
    note(
        &timeline,
        clock,
        match drained {
            Some(t) => format!(
                "every accepted message delivered ({:.1} s after the load)",
                t.as_secs_f64()
            ),
            None => format!("drain bound ({} s) reached", a.drain.as_secs()),
        },
    );
    tokio::time::sleep(a.linger).await;
    reporter.abort();
    // The figures are taken before the processes stop: what their shutdown does is not measured.
    let mut report = Report::build(which, a, &load, &receiver, fault, load_ms, &dir);
    if let Err(e) = write_csv(&dir.join("messages.csv"), &load, &receiver) {
        progress(format!("could not write messages.csv: {e:#}"));
    }
    report.timeline = std::mem::take(&mut *timeline.lock().unwrap());
    for p in &procs {
        let _ = p.signal("TERM");
    }
    for (i, p) in procs.iter_mut().enumerate() {
        match p.wait_exit(STOP_LIMIT).await? {
            Some(status) if status.success() => {}
            Some(status) => report.problems.push(format!(
                "p{i} exited with {status} after SIGTERM at the end"
            )),
            None => report.problems.push(format!(
                "p{i} still running {} s after SIGTERM at the end (killed)",
                STOP_LIMIT.as_secs()
            )),
        }
    }
    for (i, p) in procs.iter().enumerate() {
        report
            .logs
            .push(format!("p{i}: {}", p.log_summary().trim_end()));
    }
    drop(procs);
    if report.failed() || a.keep {
        report.keep_dir = true;
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(report)
}

fn keep_note(dir: &Path) {
    progress(format!("kstash configs and logs kept in {}", dir.display()));
}

fn ms_duration(ms: f64) -> Duration {
    Duration::from_secs_f64(ms.max(0.0) / 1e3)
}

fn note(timeline: &Timeline, clock: Instant, what: String) {
    let at = since(clock, Instant::now());
    progress(what.clone());
    timeline.lock().unwrap().push((at, what));
}

/// Warm-up messages through every process, immediate and delayed, not counted: when they are all
/// delivered, the delivery and delay consumer groups have their partitions.
async fn warm_up(load: &Arc<Load>, receiver: &Receiver) -> Result<()> {
    let start = Instant::now();
    let mut ids = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..WARMUP {
        let kind = if i % 2 == 0 {
            Kind::Warmup
        } else {
            Kind::WarmupDelayed
        };
        let id = load.allocate(kind).context("no ids left")?;
        ids.push(id);
        let load = load.clone();
        tasks.push(tokio::spawn(async move { load.publish(id, kind).await }));
    }
    for t in tasks {
        t.await?;
    }
    let accepted: Vec<usize> = ids
        .iter()
        .copied()
        .filter(|&id| load.ledger.lock().unwrap()[id].outcome == Outcome::Accepted)
        .collect();
    if accepted.len() < ids.len() {
        bail!(
            "warm-up: {} of {} publishes not accepted (first error: {})",
            ids.len() - accepted.len(),
            ids.len(),
            load.first_error.lock().unwrap().clone().unwrap_or_default()
        );
    }
    loop {
        let missing = not_arrived(receiver, &accepted);
        if missing == 0 {
            break;
        }
        if start.elapsed() > WARMUP_LIMIT {
            // Accepted and not delivered: counted as lost unless they arrive later.
            progress(format!(
                "warm-up: {missing} messages not delivered within {} s; going on",
                WARMUP_LIMIT.as_secs()
            ));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress(format!(
        "warm-up: {} messages delivered in {:.1} s",
        ids.len(),
        start.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Waits until the consumer groups are stable: every process logged its assignments (delivery and
/// delay groups) and no process logged an assignment or revocation for SETTLE_QUIET; at most
/// SETTLE_LIMIT. So the load starts on a steady cluster and the fault is its only disturbance.
async fn wait_settled(procs: &[Kstash]) {
    let start = Instant::now();
    let mut last = (usize::MAX, Instant::now());
    loop {
        let mut total = 0;
        let mut all_assigned = true;
        for p in procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let assigned = text.matches("partitions assigned").count();
            total += assigned + text.matches("partitions revoked").count();
            all_assigned &= assigned >= 2;
        }
        if total != last.0 {
            last = (total, Instant::now());
        }
        if all_assigned && last.1.elapsed() >= SETTLE_QUIET {
            progress(format!(
                "consumer groups settled after {:.1} s",
                start.elapsed().as_secs_f64()
            ));
            return;
        }
        if start.elapsed() > SETTLE_LIMIT {
            progress(format!(
                "consumer groups not settled after {} s (no quiet period in the kstash logs);                  starting the load anyway",
                SETTLE_LIMIT.as_secs()
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Injects the scenario's fault. Returns its window.
async fn inject(
    which: Which,
    a: &FaultArgs,
    procs: &mut [Kstash],
    load: &Load,
    timeline: &Timeline,
) -> Result<FaultWindow> {
    let clock = load.clock;
    let now = || since(clock, Instant::now());
    let mut w = FaultWindow {
        start_ms: now(),
        ..FaultWindow::default()
    };
    match which {
        Which::Kill9 => {
            let v = 0;
            load.cluster.set_live(v, false);
            procs[v].signal("KILL")?;
            note(
                timeline,
                clock,
                format!("p{v} (pid {}) SIGKILLed", procs[v].pid),
            );
            match procs[v].wait_exit(Duration::from_secs(10)).await? {
                Some(status) => progress(format!("p{v} exited: {status}")),
                None => bail!("p{v} still running 10 s after SIGKILL"),
            }
            tokio::time::sleep(a.down).await;
            note(timeline, clock, format!("p{v} restarting"));
            procs[v].restart().await?;
            load.cluster.set_live(v, true);
            note(
                timeline,
                clock,
                format!("p{v} healthy again (pid {})", procs[v].pid),
            );
            w.description = format!("SIGKILL p{v}, restarted after {} s", a.down.as_secs_f64());
        }
        Which::BrokerRestart => {
            let broker = Broker::new(a)?;
            let pid = broker.pid()?;
            send_signal(pid, "TERM")?;
            note(timeline, clock, format!("broker (pid {pid}) sent SIGTERM"));
            let took = wait_gone(pid, STOP_LIMIT).await?;
            note(
                timeline,
                clock,
                format!(
                    "broker exited ({:.1} s after SIGTERM); restarting it",
                    took.as_secs_f64()
                ),
            );
            broker.restart().await?;
            note(
                timeline,
                clock,
                format!("broker ready again (pid {})", broker.pid()?),
            );
            w.outage_ms = Some(now() - w.start_ms);
            w.description = "broker SIGTERM, restarted at once (same data dir)".into();
        }
        Which::Sigstop => {
            let broker = Broker::new(a)?;
            let pid = broker.pid()?;
            let paused = Paused::new(pid)?;
            note(timeline, clock, format!("broker (pid {pid}) SIGSTOPped"));
            tokio::time::sleep(a.pause).await;
            paused.resume()?;
            note(timeline, clock, format!("broker (pid {pid}) SIGCONTinued"));
            w.outage_ms = Some(now() - w.start_ms);
            w.description = format!("broker SIGSTOP for {} s", a.pause.as_secs_f64());
        }
        Which::Rolling => {
            let n = procs.len();
            for (v, p) in procs.iter_mut().enumerate() {
                load.cluster.set_live(v, false);
                let drained = load
                    .cluster
                    .wait_idle(v, a.produce_timeout + REQUEST_MARGIN)
                    .await;
                if !drained {
                    progress(format!(
                        "p{v}: publishes still in flight; stopping it anyway"
                    ));
                }
                p.signal("TERM")?;
                note(
                    timeline,
                    clock,
                    format!("p{v} (pid {}) sent SIGTERM", p.pid),
                );
                match p.wait_exit(STOP_LIMIT).await? {
                    Some(status) => note(timeline, clock, format!("p{v} exited: {status}")),
                    None => {
                        p.signal("KILL")?;
                        let _ = p.wait_exit(Duration::from_secs(10)).await?;
                        note(
                            timeline,
                            clock,
                            format!(
                                "p{v} still running {} s after SIGTERM: SIGKILLed",
                                STOP_LIMIT.as_secs()
                            ),
                        );
                    }
                }
                p.restart().await?;
                load.cluster.set_live(v, true);
                note(
                    timeline,
                    clock,
                    format!("p{v} healthy again (pid {})", p.pid),
                );
            }
            w.description = format!("SIGTERM + restart of each of the {} processes in turn", n);
        }
        Which::All => unreachable!("run one scenario at a time"),
    }
    w.end_ms = now();
    Ok(w)
}

/// Waits after the load until every accepted message was delivered, at most `--drain`. Returns
/// the time it took, None if the bound passed.
async fn drain(which: Which, a: &FaultArgs, load: &Load, receiver: &Receiver) -> Option<Duration> {
    let start = Instant::now();
    let accepted: Vec<usize> = load
        .ledger
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, s)| s.kind != Kind::Unused && s.outcome == Outcome::Accepted)
        .map(|(id, _)| id)
        .collect();
    let mut next_note = start + support::PROGRESS_EVERY;
    loop {
        let missing = not_arrived(receiver, &accepted);
        if missing == 0 {
            return Some(start.elapsed());
        }
        if start.elapsed() > a.drain {
            progress(format!(
                "{}: {missing} accepted messages still not delivered after {} s",
                which.name(),
                a.drain.as_secs()
            ));
            return None;
        }
        if Instant::now() >= next_note {
            progress(format!(
                "{}: draining, {missing} accepted messages not delivered yet",
                which.name()
            ));
            next_note += support::PROGRESS_EVERY;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn report_progress(which: Which, load: Arc<Load>, receiver: Arc<Receiver>, start: Instant) {
    let mut tick = tokio::time::interval_at(
        (start + support::PROGRESS_EVERY).into(),
        support::PROGRESS_EVERY,
    );
    loop {
        tick.tick().await;
        let c = load.counts();
        let live: String = (0..load.cluster.endpoints.len())
            .map(|i| {
                if load.cluster.endpoints[i].live.load(Ordering::SeqCst) {
                    format!("p{i}")
                } else {
                    "--".into()
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        let (delivered, duplicates) = (receiver.delivered(), receiver.duplicates());
        progress(format!(
            "{} t={:.0}s: sent {}, accepted {}, 503 {}, other {}, pending {}; received {} \
             (duplicates {}); up: {live}",
            which.name(),
            start.elapsed().as_secs_f64(),
            c.sent,
            c.accepted,
            c.unavailable,
            c.other,
            c.pending,
            delivered,
            duplicates,
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Broker control (scripts/with-kafka.sh)
// ---------------------------------------------------------------------------------------------

struct Broker {
    pidfile: PathBuf,
    restart: Option<PathBuf>,
}

impl Broker {
    fn new(a: &FaultArgs) -> Result<Broker> {
        Ok(Broker {
            pidfile: a
                .broker_pidfile
                .clone()
                .context("no broker pid file (KSTASH_TEST_BROKER_PIDFILE)")?,
            restart: a.broker_restart.clone(),
        })
    }

    fn pid(&self) -> Result<u32> {
        let text = std::fs::read_to_string(&self.pidfile)
            .with_context(|| format!("reading {}", self.pidfile.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{} holds no pid", self.pidfile.display()))
    }

    /// Runs the restart script (its progress lines go to stderr) and waits for it, bounded.
    async fn restart(&self) -> Result<()> {
        let script = self
            .restart
            .as_ref()
            .context("no broker restart script (KSTASH_TEST_BROKER_RESTART)")?;
        let mut child = tokio::process::Command::new(script)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", script.display()))?;
        match tokio::time::timeout(BROKER_RESTART_LIMIT, child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("{} failed: {status}", script.display());
                }
                Ok(())
            }
            Err(_) => bail!(
                "{} did not finish within {} s",
                script.display(),
                BROKER_RESTART_LIMIT.as_secs()
            ),
        }
    }
}

/// Whether `pid` runs (a zombie counts as gone).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

/// Waits until `pid` (not our child: polled) is gone, at most `limit`; returns the time taken.
async fn wait_gone(pid: u32, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    while process_alive(pid) {
        if start.elapsed() > limit {
            bail!(
                "pid {pid} still running {} s after SIGTERM",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(start.elapsed())
}

/// A SIGSTOPped process, continued on `resume` or, whatever happens, on drop.
struct Paused {
    pid: u32,
    resumed: AtomicBool,
}

impl Paused {
    fn new(pid: u32) -> Result<Paused> {
        send_signal(pid, "STOP")?;
        Ok(Paused {
            pid,
            resumed: AtomicBool::new(false),
        })
    }

    fn resume(&self) -> Result<()> {
        self.resumed.store(true, Ordering::SeqCst);
        send_signal(self.pid, "CONT")
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if !self.resumed.load(Ordering::SeqCst) {
            let _ = send_signal(self.pid, "CONT");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The load
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
enum Kind {
    #[default]
    Unused,
    Warmup,
    WarmupDelayed,
    Immediate,
    Delayed,
    Fifo(u16),
}

impl Kind {
    /// Counted in the figures (not warm-up).
    fn counted(self) -> bool {
        matches!(self, Kind::Immediate | Kind::Delayed | Kind::Fifo(_))
    }

    fn tag(self) -> String {
        match self {
            Kind::Unused => "unused".into(),
            Kind::Warmup => "warmup".into(),
            Kind::WarmupDelayed => "warmup-delayed".into(),
            Kind::Immediate => "immediate".into(),
            Kind::Delayed => "delayed".into(),
            Kind::Fifo(q) => format!("fifo-q{q}"),
        }
    }
}

#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
enum Outcome {
    /// Not answered yet (or never sent).
    #[default]
    Pending,
    /// 2xx.
    Accepted,
    /// 503: not stored, safe to retry.
    Unavailable,
    /// Another status.
    Status(u16),
    /// Sent, but no answer came (the connection broke, or the request timed out).
    NoAnswer,
    /// No process took the connection within NO_PROCESS_LIMIT.
    NoProcess,
}

#[derive(Clone, Copy, Default)]
struct Sent {
    kind: Kind,
    outcome: Outcome,
    /// When the first try was sent and the answer came (ms since the scenario's clock).
    sent_ms: f64,
    done_ms: f64,
    /// The process that answered (or was last tried).
    via: u8,
    /// Connections refused before one was taken.
    refused: u8,
}

struct Endpoint {
    base: String,
    live: AtomicBool,
    /// Publishes sent to this process and not answered yet.
    in_flight: AtomicUsize,
    idle: Notify,
}

/// The processes the load is spread over.
struct Cluster {
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    changed: Notify,
}

impl Cluster {
    /// The next process that is up, round-robin.
    fn pick(&self) -> Option<usize> {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| self.endpoints[i].live.load(Ordering::SeqCst))
    }

    fn set_live(&self, i: usize, live: bool) {
        self.endpoints[i].live.store(live, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Waits until no publish is in flight to process `i`, at most `limit`.
    async fn wait_idle(&self, i: usize, limit: Duration) -> bool {
        let e = &self.endpoints[i];
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let idle = e.idle.notified();
            if e.in_flight.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return e.in_flight.load(Ordering::SeqCst) == 0;
            }
        }
    }
}

/// Counts one publish in flight to an endpoint until dropped.
struct InFlight<'a>(&'a Endpoint);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

struct Load {
    http: reqwest::Client,
    cluster: Cluster,
    token: &'static str,
    destination: String,
    clock: Instant,
    rate: f64,
    fifo_rate: f64,
    delayed_percent: u32,
    delay: Duration,
    ledger: Mutex<Vec<Sent>>,
    /// Message ids kstash answered, by sequence number (accepted publishes only).
    message_ids: Mutex<HashMap<usize, String>>,
    next_id: AtomicUsize,
    first_error: Mutex<Option<String>>,
    /// The first connection that was refused or not established (the request was not sent).
    first_connect_error: Mutex<Option<String>>,
    /// Ran out of sequence numbers (the load stopped early).
    exhausted: AtomicBool,
    /// Main-load ticks that found MAX_IN_FLIGHT publishes in flight and waited.
    behind: AtomicUsize,
}

#[derive(Default)]
struct Counts {
    sent: usize,
    accepted: usize,
    unavailable: usize,
    other: usize,
    pending: usize,
}

impl Load {
    fn new(
        a: &FaultArgs,
        procs: &[Kstash],
        receiver: &Receiver,
        clock: Instant,
        capacity: usize,
    ) -> Result<Load> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(a.produce_timeout + REQUEST_MARGIN)
            .build()?;
        Ok(Load {
            http,
            cluster: Cluster {
                endpoints: procs
                    .iter()
                    .map(|p| Endpoint {
                        base: p.base(),
                        live: AtomicBool::new(true),
                        in_flight: AtomicUsize::new(0),
                        idle: Notify::new(),
                    })
                    .collect(),
                next: AtomicUsize::new(0),
                changed: Notify::new(),
            },
            token: procs[0].token,
            destination: format!("http://{}/hook", receiver.addr),
            clock,
            rate: a.rate,
            fifo_rate: a.fifo_rate,
            delayed_percent: a.delayed_percent,
            delay: a.delay,
            ledger: Mutex::new(vec![Sent::default(); capacity]),
            message_ids: Mutex::default(),
            next_id: AtomicUsize::new(0),
            first_error: Mutex::default(),
            first_connect_error: Mutex::default(),
            exhausted: AtomicBool::new(false),
            behind: AtomicUsize::new(0),
        })
    }

    /// The next sequence number, for a message of `kind`; None when they ran out.
    fn allocate(&self, kind: Kind) -> Option<usize> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let mut ledger = self.ledger.lock().unwrap();
        match ledger.get_mut(id) {
            Some(slot) => {
                slot.kind = kind;
                Some(id)
            }
            None => {
                self.exhausted.store(true, Ordering::SeqCst);
                None
            }
        }
    }

    fn counts(&self) -> Counts {
        let ledger = self.ledger.lock().unwrap();
        let mut c = Counts::default();
        for s in ledger.iter().filter(|s| s.kind.counted()) {
            c.sent += 1;
            match s.outcome {
                Outcome::Pending => c.pending += 1,
                Outcome::Accepted => c.accepted += 1,
                Outcome::Unavailable => c.unavailable += 1,
                _ => c.other += 1,
            }
        }
        c
    }

    /// Publishes message `id` once (a refused connection is tried on the next process) and
    /// records the outcome.
    async fn publish(&self, id: usize, kind: Kind) {
        let body = format!("{id} {}", kind.tag());
        let path = match kind {
            Kind::Fifo(q) => format!("/v2/enqueue/faults-q{q}/{}", self.destination),
            _ => format!("/v2/publish/{}", self.destination),
        };
        let delay = match kind {
            Kind::Delayed => Some(self.delay),
            Kind::WarmupDelayed => Some(Duration::from_secs(1)),
            _ => None,
        };
        let first = Instant::now();
        let sent_ms = since(self.clock, first);
        let mut refused = 0u8;
        let (outcome, via, message_id) = loop {
            let Some(p) = self.cluster.pick() else {
                if first.elapsed() > NO_PROCESS_LIMIT {
                    break (Outcome::NoProcess, 0, None);
                }
                let changed = self.cluster.changed.notified();
                if self.cluster.pick().is_none() {
                    let _ = tokio::time::timeout(Duration::from_millis(500), changed).await;
                }
                continue;
            };
            let endpoint = &self.cluster.endpoints[p];
            endpoint.in_flight.fetch_add(1, Ordering::SeqCst);
            let guard = InFlight(endpoint);
            let mut request = self
                .http
                .post(format!("{}{path}", endpoint.base))
                .bearer_auth(self.token)
                .header("Content-Type", "text/plain")
                .body(body.clone());
            if let Some(d) = delay {
                request = request.header("Upstash-Delay", format!("{}ms", d.as_millis()));
            }
            let result = request.send().await;
            let outcome = match result {
                Ok(r) if r.status().is_success() => {
                    let id = r
                        .json::<serde_json::Value>()
                        .await
                        .ok()
                        .and_then(|v| v["messageId"].as_str().map(str::to_owned));
                    (Outcome::Accepted, p as u8, id)
                }
                Ok(r) if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                    (Outcome::Unavailable, p as u8, None)
                }
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    self.note_error(format!("p{p}: HTTP {status}: {text}"));
                    (Outcome::Status(status.as_u16()), p as u8, None)
                }
                Err(e) if e.is_connect() => {
                    // Not sent (refused, or not established within CONNECT_TIMEOUT): safe to send
                    // to another process.
                    drop(guard);
                    refused = refused.saturating_add(1);
                    self.first_connect_error
                        .lock()
                        .unwrap()
                        .get_or_insert_with(|| format!("p{p}: {}", chain(&e)));
                    if first.elapsed() > NO_PROCESS_LIMIT {
                        self.note_error(format!("p{p}: {}", chain(&e)));
                        break (Outcome::NoProcess, p as u8, None);
                    }
                    if refused as usize % self.cluster.endpoints.len() == 0 {
                        // Every process refused once in a row: give them a moment.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
                Err(e) => {
                    self.note_error(format!("p{p}: {}", chain(&e)));
                    (Outcome::NoAnswer, p as u8, None)
                }
            };
            drop(guard);
            break outcome;
        };
        let done_ms = since(self.clock, Instant::now());
        if let Some(m) = message_id {
            self.message_ids.lock().unwrap().insert(id, m);
        }
        let mut ledger = self.ledger.lock().unwrap();
        let slot = &mut ledger[id];
        slot.outcome = outcome;
        slot.sent_ms = sent_ms;
        slot.done_ms = done_ms;
        slot.via = via;
        slot.refused = refused;
    }

    fn note_error(&self, e: String) {
        self.first_error.lock().unwrap().get_or_insert(e);
    }
}

/// `--rate` publishes/s until `stop`, each in a task of its own (at most MAX_IN_FLIGHT at once).
async fn main_load(load: Arc<Load>, stop: CancellationToken, tracker: TaskTracker) {
    let start = tokio::time::Instant::now();
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    for i in 0u64.. {
        let at = start + Duration::from_secs_f64(i as f64 / load.rate);
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {}
            _ = stop.cancelled() => return,
        }
        // Spread the delayed ones evenly: message i is delayed when ⌊i·p/100⌋ moves.
        let p = u64::from(load.delayed_percent);
        let kind = if (i + 1) * p / 100 > i * p / 100 {
            Kind::Delayed
        } else {
            Kind::Immediate
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                load.behind.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    p = permits.clone().acquire_owned() => p.expect("never closed"),
                    _ = stop.cancelled() => return,
                }
            }
        };
        let Some(id) = load.allocate(kind) else {
            progress("out of sequence numbers; the load stops".into());
            return;
        };
        let load = load.clone();
        tracker.spawn(async move {
            load.publish(id, kind).await;
            drop(permit);
        });
    }
}

/// One client enqueueing to queue `q` in order, at most `--fifo-rate` per second, until `stop`
/// (the enqueue in flight then finishes).
async fn fifo_load(load: Arc<Load>, q: usize, stop: CancellationToken) {
    let step = Duration::from_secs_f64(1.0 / load.fifo_rate);
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.cancelled() => return,
        }
        let kind = Kind::Fifo(q as u16);
        let Some(id) = load.allocate(kind) else {
            return;
        };
        load.publish(id, kind).await;
        next = (next + step).max(tokio::time::Instant::now());
    }
}

// ---------------------------------------------------------------------------------------------
// The figures
// ---------------------------------------------------------------------------------------------

struct Report {
    which: Which,
    fault: FaultWindow,
    load_s: f64,
    rate: f64,
    sent: usize,
    accepted: usize,
    unavailable: usize,
    other_status: usize,
    no_answer: usize,
    no_process: usize,
    refused_retried: usize,
    delivered: usize,
    lost: Vec<usize>,
    /// Lost messages by kind and by when they were accepted.
    lost_breakdown: String,
    /// (sequence number, extra deliveries) of the duplicated messages.
    duplicated: Vec<(usize, usize)>,
    duplicates: usize,
    /// Not accepted (503, other status, no answer) yet delivered.
    stored_anyway: HashMap<&'static str, usize>,
    fifo_violations: Vec<String>,
    early: usize,
    max_lateness_ms: f64,
    recovery_ms: Option<f64>,
    late: usize,
    foreign: usize,
    behind: usize,
    exhausted: bool,
    first_error: Option<String>,
    first_connect_error: Option<String>,
    /// Accepted publishes: request → answer (ms) p50, p99, max; immediate messages accepted
    /// before the fault: answer → arrival p50, p99.
    publish_ms: [f64; 3],
    delivery_ms: [f64; 2],
    timeline: Vec<(f64, String)>,
    problems: Vec<String>,
    logs: Vec<String>,
    examples: Vec<String>,
    dir: PathBuf,
    keep_dir: bool,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    fn build(
        which: Which,
        a: &FaultArgs,
        load: &Load,
        receiver: &Receiver,
        fault: FaultWindow,
        load_ms: f64,
        dir: &Path,
    ) -> Report {
        let ledger = load.ledger.lock().unwrap().clone();
        let arrivals = receiver.arrivals();
        let mut r = Report {
            which,
            fault,
            load_s: load_ms / 1e3,
            rate: a.rate,
            sent: 0,
            accepted: 0,
            unavailable: 0,
            other_status: 0,
            no_answer: 0,
            no_process: 0,
            refused_retried: 0,
            delivered: 0,
            lost: Vec::new(),
            lost_breakdown: String::new(),
            duplicated: Vec::new(),
            duplicates: 0,
            stored_anyway: HashMap::new(),
            fifo_violations: Vec::new(),
            early: 0,
            max_lateness_ms: 0.0,
            recovery_ms: Some(0.0),
            late: 0,
            foreign: receiver.foreign(),
            behind: load.behind.load(Ordering::Relaxed),
            exhausted: load.exhausted.load(Ordering::SeqCst),
            first_error: load.first_error.lock().unwrap().clone(),
            first_connect_error: load.first_connect_error.lock().unwrap().clone(),
            publish_ms: [f64::NAN; 3],
            delivery_ms: [f64::NAN; 2],
            timeline: Vec::new(),
            problems: Vec::new(),
            logs: Vec::new(),
            examples: Vec::new(),
            dir: dir.to_path_buf(),
            keep_dir: false,
        };
        let late_ms = a.late.as_secs_f64() * 1e3;
        let mut last_late: Option<f64> = None;
        for (id, s) in ledger.iter().enumerate() {
            if !s.kind.counted() {
                // A warm-up message is not in the figures, but it must not be lost either.
                if s.kind != Kind::Unused
                    && s.outcome == Outcome::Accepted
                    && arrivals[id].is_none()
                {
                    r.lost.push(id);
                }
                continue;
            }
            r.sent += 1;
            r.refused_retried += s.refused as usize;
            let arrival = arrivals[id];
            let what = match s.outcome {
                Outcome::Accepted => {
                    r.accepted += 1;
                    None
                }
                Outcome::Unavailable => {
                    r.unavailable += 1;
                    Some("503")
                }
                Outcome::Status(_) => {
                    r.other_status += 1;
                    Some("other status")
                }
                Outcome::NoAnswer => {
                    r.no_answer += 1;
                    Some("no answer")
                }
                Outcome::NoProcess => {
                    r.no_process += 1;
                    Some("no process")
                }
                Outcome::Pending => {
                    r.no_answer += 1;
                    Some("unanswered at the end")
                }
            };
            if let Some(what) = what {
                if arrival.is_some() {
                    *r.stored_anyway.entry(what).or_default() += 1;
                }
                continue;
            }
            let Some(at) = arrival else {
                r.lost.push(id);
                continue;
            };
            r.delivered += 1;
            let delay_ms = if s.kind == Kind::Delayed {
                a.delay.as_secs_f64() * 1e3
            } else {
                0.0
            };
            if s.kind == Kind::Delayed && at < s.sent_ms + delay_ms {
                r.early += 1;
            }
            let lateness = at - (s.done_ms + delay_ms);
            r.max_lateness_ms = r.max_lateness_ms.max(lateness);
            if lateness > late_ms {
                r.late += 1;
                if at > r.fault.start_ms {
                    last_late = Some(last_late.map_or(at, |l: f64| l.max(at)));
                }
            }
        }
        let mut publish = Vec::new();
        let mut delivery = Vec::new();
        for (id, s) in ledger.iter().enumerate() {
            if s.kind.counted() && s.outcome == Outcome::Accepted {
                publish.push(s.done_ms - s.sent_ms);
                if let (Kind::Immediate, Some(at)) = (s.kind, arrivals[id]) {
                    if s.done_ms < r.fault.start_ms {
                        delivery.push(at - s.done_ms);
                    }
                }
            }
        }
        r.publish_ms = [
            percentile(&mut publish, 50.0),
            percentile(&mut publish, 99.0),
            percentile(&mut publish, 100.0),
        ];
        r.delivery_ms = [
            percentile(&mut delivery, 50.0),
            percentile(&mut delivery, 99.0),
        ];
        if !r.lost.is_empty() {
            let mut by_kind: HashMap<String, usize> = HashMap::new();
            let (mut before, mut during, mut after) = (0, 0, 0);
            for &id in &r.lost {
                let s = &ledger[id];
                let kind = match s.kind {
                    Kind::Fifo(_) => "fifo".to_string(),
                    k => k.tag(),
                };
                *by_kind.entry(kind).or_default() += 1;
                if s.done_ms < r.fault.start_ms {
                    before += 1;
                } else if s.done_ms <= r.fault.end_ms {
                    during += 1;
                } else {
                    after += 1;
                }
            }
            let mut kinds: Vec<_> = by_kind.into_iter().collect();
            kinds.sort();
            r.lost_breakdown = format!(
                "{}; accepted before the fault {before}, during it {during}, after it {after}",
                kinds
                    .iter()
                    .map(|(k, n)| format!("{n} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            r.recovery_ms = None;
        } else if let Some(l) = last_late {
            r.recovery_ms = Some(l - r.fault.start_ms);
        }

        // Duplicates, and FIFO order: first deliveries of accepted messages of a queue must come
        // in sequence order (the load enqueues each queue's messages one after the other).
        let mut seen: HashMap<usize, usize> = HashMap::new();
        let mut highest: HashMap<u16, usize> = HashMap::new();
        for (id, at) in receiver.log() {
            let Some(s) = ledger.get(id) else { continue };
            if !s.kind.counted() {
                continue;
            }
            let count = seen.entry(id).or_default();
            *count += 1;
            if *count > 1 {
                r.duplicates += 1;
                continue;
            }
            if let (Kind::Fifo(q), Outcome::Accepted) = (s.kind, s.outcome) {
                match highest.get(&q) {
                    Some(&h) if id < h => r.fifo_violations.push(format!(
                        "queue faults-q{q}: #{id} first delivered at {:.3} s, after #{h}",
                        at / 1e3
                    )),
                    _ => {
                        highest.insert(q, id);
                    }
                }
            }
        }
        r.duplicated = seen
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(id, n)| (id, n - 1))
            .collect();
        r.duplicated.sort_unstable();

        // Evidence for lost and duplicated messages: what the load saw, when, and what the
        // kstash logs say about the message id.
        let ids = load.message_ids.lock().unwrap();
        let logs = read_logs(dir);
        let arrivals_of = |id: usize| -> Vec<String> {
            receiver
                .log()
                .iter()
                .filter(|(i, _)| *i == id)
                .map(|(_, at)| format!("{:.3}", at / 1e3))
                .collect()
        };
        for &id in r.lost.iter().take(EXAMPLES) {
            let s = &ledger[id];
            r.examples.push(format!(
                "LOST #{id} ({}): sent {:.3} s to p{}, accepted {:.3} s, messageId {}",
                s.kind.tag(),
                s.sent_ms / 1e3,
                s.via,
                s.done_ms / 1e3,
                ids.get(&id).map_or("?", String::as_str)
            ));
            if let Some(m) = ids.get(&id) {
                r.examples.extend(grep_logs(&logs, m));
            }
        }
        for &(id, extra) in r.duplicated.iter().take(EXAMPLES) {
            let s = &ledger[id];
            r.examples.push(format!(
                "DUPLICATE #{id} ({}): {extra} extra; accepted {:.3} s by p{}, arrivals at {} s, \
                 messageId {}",
                s.kind.tag(),
                s.done_ms / 1e3,
                s.via,
                arrivals_of(id).join(", "),
                ids.get(&id).map_or("?", String::as_str)
            ));
            if let Some(m) = ids.get(&id) {
                r.examples.extend(grep_logs(&logs, m));
            }
        }
        r
    }

    fn failed(&self) -> bool {
        !self.lost.is_empty() || (self.which == Which::Rolling && self.duplicates > 0)
    }

    fn verdict(&self) -> String {
        let mut v = Vec::new();
        if !self.lost.is_empty() {
            v.push(format!("**FAIL: {} lost**", self.lost.len()));
        }
        if self.which == Which::Rolling && self.duplicates > 0 {
            v.push(format!("**FAIL: {} duplicates**", self.duplicates));
        }
        if v.is_empty() {
            "pass".into()
        } else {
            v.join(", ")
        }
    }

    fn row(&self) -> String {
        let s = |ms: Option<f64>| ms.map_or("–".to_string(), |m| format!("{:.1}", m / 1e3));
        format!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} |\n",
            self.which.name(),
            self.fault.description,
            self.load_s,
            self.sent,
            self.accepted,
            self.unavailable,
            self.other_status + self.no_answer + self.no_process,
            self.delivered,
            self.lost.len(),
            self.duplicates,
            self.stored_anyway.values().sum::<usize>(),
            self.max_lateness_ms / 1e3,
            s(self.recovery_ms),
            s(self.fault.outage_ms),
            self.verdict(),
        )
    }

    fn notes(&self) -> String {
        let mut n = format!("\n### {}\n\n", self.which.name());
        let _ = writeln!(
            n,
            "Load {:.0} s at {:.0} publishes/s plus the FIFO clients; fault from {:.1} s to {:.1} s \
             (scenario clock). Publishes: {} sent, {} accepted, {} answered 503, {} other \
             statuses, {} unanswered (connection broken or timed out), {} found no process; {} \
             connections refused or not established (request not sent) were tried on the next \
             process. Delivered {} of the accepted, \
             lost {}, duplicates {} (of {} messages); {} late by more than the threshold; delayed \
             messages delivered early: {}; deliveries with an unknown body: {}.",
            self.load_s,
            self.rate,
            self.fault.start_ms / 1e3,
            self.fault.end_ms / 1e3,
            self.sent,
            self.accepted,
            self.unavailable,
            self.other_status,
            self.no_answer,
            self.no_process,
            self.refused_retried,
            self.delivered,
            self.lost.len(),
            self.duplicates,
            self.duplicated.len(),
            self.late,
            self.early,
            self.foreign,
        );
        if !self.lost.is_empty() {
            let _ = writeln!(n, "LOST: {} ({}).", self.lost.len(), self.lost_breakdown);
        }
        if !self.stored_anyway.is_empty() {
            let mut v: Vec<_> = self.stored_anyway.iter().collect();
            v.sort();
            let _ = writeln!(
                n,
                "Not accepted yet delivered (stored although the answer said otherwise or never \
                 came): {}.",
                v.iter()
                    .map(|(k, c)| format!("{c} × {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if !self.fifo_violations.is_empty() {
            let _ = writeln!(
                n,
                "FIFO ORDER VIOLATIONS: {} (first: {})",
                self.fifo_violations.len(),
                self.fifo_violations[0]
            );
        }
        if self.behind > 0 || self.exhausted {
            let _ = writeln!(
                n,
                "The load fell behind its rate {} times (publishes in flight at the bound){}.",
                self.behind,
                if self.exhausted {
                    "; it ran out of sequence numbers"
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(
            n,
            "Publish latency (accepted, request → answer): p50 {:.0} ms, p99 {:.0} ms, max {:.0} \
             ms. Before the fault, answer → arrival of immediate messages: p50 {:.0} ms, p99 {:.0} \
             ms.",
            self.publish_ms[0],
            self.publish_ms[1],
            self.publish_ms[2],
            self.delivery_ms[0],
            self.delivery_ms[1],
        );
        if let Some(e) = &self.first_error {
            let _ = writeln!(n, "First publish error: {e}");
        }
        if let Some(e) = &self.first_connect_error {
            let _ = writeln!(n, "First connection not established: {e}");
        }
        n += "\nTimeline (s):\n";
        for (at, what) in &self.timeline {
            let _ = writeln!(n, "- {:.1}: {what}", at / 1e3);
        }
        for p in &self.problems {
            let _ = writeln!(n, "PROBLEM: {p}");
        }
        for l in &self.logs {
            let _ = writeln!(n, "{l}");
        }
        for e in &self.examples {
            let _ = writeln!(n, "    {e}");
        }
        if self.keep_dir {
            let _ = writeln!(n, "kstash configs and logs kept in {}", self.dir.display());
        }
        n
    }
}

fn table(reports: &[Report]) -> String {
    let mut t = String::from(
        "| scenario | fault | load (s) | publishes | accepted | 503 | other failed | delivered | \
         lost | duplicates | not accepted, delivered | max lateness (s) | recovery (s) | outage \
         (s) | result |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in reports {
        t += &r.row();
    }
    t
}

/// An error with its sources: `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s += ": ";
        s += &cause.to_string();
        source = cause.source();
    }
    s
}

/// Nearest-rank percentile; NaN for an empty sample.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = (p / 100.0 * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// One line per message: what the load saw and what the receiver got (kept with the logs).
fn write_csv(path: &Path, load: &Load, receiver: &Receiver) -> Result<()> {
    let ledger = load.ledger.lock().unwrap().clone();
    let ids = load.message_ids.lock().unwrap().clone();
    let mut deliveries: HashMap<usize, Vec<f64>> = HashMap::new();
    for (id, at) in receiver.log() {
        deliveries.entry(id).or_default().push(at);
    }
    let mut out = String::from(
        "seq,kind,outcome,process,refused,sent_s,answered_s,message_id,deliveries,arrivals_s\n",
    );
    for (id, s) in ledger.iter().enumerate() {
        if s.kind == Kind::Unused {
            break;
        }
        let arrivals = deliveries.get(&id).map_or(&[][..], Vec::as_slice);
        let _ = writeln!(
            out,
            "{id},{},{:?},p{},{},{:.3},{:.3},{},{},{}",
            s.kind.tag(),
            s.outcome,
            s.via,
            s.refused,
            s.sent_ms / 1e3,
            s.done_ms / 1e3,
            ids.get(&id).map_or("", String::as_str),
            arrivals.len(),
            arrivals
                .iter()
                .map(|a| format!("{:.3}", a / 1e3))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// Every kstash log of a scenario directory (`p<i>/kstash.log`): (process, text).
fn read_logs(dir: &Path) -> Vec<(String, String)> {
    let mut logs = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let log = e.path().join("kstash.log");
            if let Ok(text) = std::fs::read_to_string(&log) {
                logs.push((e.file_name().to_string_lossy().into_owned(), text));
            }
        }
    }
    logs.sort();
    logs
}

/// The first few log lines mentioning `needle`, prefixed with their process.
fn grep_logs(logs: &[(String, String)], needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (p, text) in logs {
        for line in text.lines().filter(|l| l.contains(needle)) {
            found.push(format!("  {p}: {line}"));
        }
    }
    if found.len() > 8 {
        let more = found.len() - 8;
        found.truncate(8);
        found.push(format!("  … {more} more lines"));
    }
    if found.is_empty() {
        found.push("  (no kstash log line names it)".into());
    }
    found
}

/// One line on where the figures come from.
fn environment(a: &FaultArgs, took: Duration) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or("unknown".into(), |o| {
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        });
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let bin = a.bin.as_deref().unwrap_or(Path::new("?"));
    format!(
        "Environment: {} UTC, commit {commit}, {} ({}), {cores} cores, load average {} at the \
         end; broker {}; {} processes, {:.0} publishes/s ({}% delayed {} ms) + {} FIFO queues at \
         {}/s, produce_timeout {} ms, session_timeout 6 s; the run took {:.0} s\n\n",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        bin.display(),
        if bin.components().any(|c| c.as_os_str() == "release") {
            "release build"
        } else {
            "debug build"
        },
        load.join(" "),
        a.brokers,
        a.processes,
        a.rate,
        a.delayed_percent,
        a.delay.as_millis(),
        a.queues,
        a.fifo_rate,
        a.produce_timeout.as_millis(),
        took.as_secs_f64(),
    )
}

/// How many of `accepted` have not arrived at `receiver` yet.
fn not_arrived(receiver: &Receiver, accepted: &[usize]) -> usize {
    let arrivals = receiver.arrivals();
    accepted
        .iter()
        .filter(|&&id| arrivals[id].is_none())
        .count()
}
