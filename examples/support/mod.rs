//! What the example tools (`bench`, `faults`) share: the kstash child process, the receiver that
//! counts deliveries, and small helpers. Each example includes it with `mod support;` (a
//! directory module, so cargo does not take it for an example of its own).
//!
//! Progress lines are prefixed with the example's crate name (`[bench …]`, `[faults …]`).

// Each example uses only part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Router;
use clap::ValueEnum;
use tokio::process::{Child, Command};

/// The well-known QStash dev token that `kstash dev` accepts.
pub const DEV_TOKEN: &str =
    "eyJVc2VySUQiOiJkZWZhdWx0VXNlciIsIlBhc3N3b3JkIjoiZGVmYXVsdFBhc3N3b3JkIn0=";
/// Credentials written into the `kstash serve` config (keys must be ≥ 32 characters).
pub const SERVE_TOKEN: &str = "bench-token-0123456789abcdefghijklmnopqrstuvwxyz";
pub const SERVE_CURRENT_KEY: &str = "sig_bench_current_0123456789abcdefghijkl";
pub const SERVE_NEXT_KEY: &str = "sig_bench_next_0123456789abcdefghijklmnop";
/// How often progress lines are printed.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// The example this module is compiled into: names scratch directories, Kafka names, progress.
const TOOL: &str = env!("CARGO_CRATE_NAME");

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
pub enum Mode {
    /// `kstash dev`: the embedded (librdkafka mock) cluster, inside the kstash process.
    Dev,
    /// `kstash serve` against the broker(s) in --brokers.
    Serve,
}

/// How to start a kstash child.
#[derive(Clone)]
pub struct Options {
    /// The kstash binary.
    pub bin: PathBuf,
    pub mode: Mode,
    /// Kafka bootstrap servers for `Mode::Serve` (loopback only).
    pub brokers: String,
    /// Partitions of the message-bearing topics (see bench's `--partitions`); None: kstash's.
    pub partitions: Option<u32>,
    /// RUST_LOG of the child (its stderr goes to the log file in the scratch directory).
    pub rust_log: String,
    /// Keep a scratch directory made here instead of removing it on drop.
    pub keep: bool,
    /// `Mode::Serve`: topic prefix `<name>.` and consumer groups `<name>`, `<name>-delay`.
    /// Processes given the same name share their topics and their work. None: a name of its own.
    pub name: Option<String>,
    /// The scratch directory (config, log, state). None: a fresh one under the temp dir (removed
    /// on drop unless `keep`); Some: the caller's, created if missing and never removed here.
    pub dir: Option<PathBuf>,
    /// Extra lines `key = value` for sections of the generated config: `("kafka",
    /// "produce_timeout = \"5s\"")`. The section must be one the config has (server, state, and
    /// for `Mode::Serve` auth, signing, kafka, delivery).
    pub extra: Vec<(&'static str, String)>,
}

// ---------------------------------------------------------------------------------------------
// The kstash child process
// ---------------------------------------------------------------------------------------------

pub struct Kstash {
    child: Child,
    pub pid: u32,
    pub port: u16,
    pub token: &'static str,
    pub mode: Mode,
    /// The scratch directory: config, log, state store.
    pub dir: PathBuf,
    pub log: PathBuf,
    state_dir: PathBuf,
    /// Whether `dir` was made here (then removed on drop unless `keep`).
    made_dir: bool,
    keep: bool,
    /// How the child is started (again, by `restart`).
    bin: PathBuf,
    args: Vec<std::ffi::OsString>,
    rust_log: String,
}

#[derive(Clone, Copy)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// RssAnon (heap, stacks) and RssFile (mapped files, the binary).
    pub anon_kib: u64,
    pub file_kib: u64,
}

impl Kstash {
    /// Writes the config, starts the child and waits until `/health` answers (at most 120 s).
    pub async fn spawn(o: &Options) -> Result<Kstash> {
        if !o.bin.is_file() {
            let release = o.bin.components().any(|p| p.as_os_str() == "release");
            bail!(
                "{} not found: build it first with `cargo build{}` (or pass --bin)",
                o.bin.display(),
                if release {
                    " --release"
                } else {
                    " --bin kstash"
                }
            );
        }
        if o.mode == Mode::Serve {
            for broker in o.brokers.split(',') {
                let host = broker.trim().rsplit_once(':').map_or(broker, |(h, _)| h);
                if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
                    bail!("--brokers must be on loopback (got {broker})");
                }
            }
        }
        let unique = format!("{}-{}", std::process::id(), unix_ms());
        let (dir, made_dir) = match &o.dir {
            Some(d) => (d.clone(), false),
            None => (
                std::env::temp_dir().join(format!("kstash-{TOOL}-{unique}")),
                true,
            ),
        };
        let name = o.name.clone().unwrap_or_else(|| format!("{TOOL}-{unique}"));
        let state_dir = dir.join("state");
        std::fs::create_dir_all(&state_dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut used = vec![false; o.extra.len()];
        let mut extra = |section: &str| -> String {
            let mut lines = String::new();
            for (i, (s, line)) in o.extra.iter().enumerate() {
                if *s == section {
                    used[i] = true;
                    lines += line;
                    lines.push('\n');
                }
            }
            lines
        };
        let mut toml = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"5s\"\n{}\
             [state]\ndir = \"{}\"\n{}",
            extra("server"),
            state_dir.display(),
            extra("state"),
        );
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        let token = match o.mode {
            Mode::Dev => {
                if let Some(p) = o.partitions {
                    toml += &format!("[dev]\npartitions = {p}\n");
                }
                args.extend(["dev".into(), "--port".into(), port.to_string().into()]);
                DEV_TOKEN
            }
            Mode::Serve => {
                toml += &format!(
                    "[auth]\ntokens = [\"{SERVE_TOKEN}\"]\n{}\
                     [signing]\ncurrent_key = \"{SERVE_CURRENT_KEY}\"\nnext_key = \"{SERVE_NEXT_KEY}\"\n{}\
                     [kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{name}.\"\n\
                     group_id = \"{name}\"\ndelay_group_id = \"{name}-delay\"\n\
                     replication_factor = 1\nsession_timeout = \"6s\"\n{}\
                     [delivery]\nallowed_networks = [\"127.0.0.0/8\"]\n{}",
                    extra("auth"),
                    extra("signing"),
                    o.brokers,
                    extra("kafka"),
                    extra("delivery"),
                );
                if let Some(p) = o.partitions {
                    for topic in [
                        "ready",
                        "events",
                        "delay",
                        "dlq",
                        "cancellations",
                        "dedup",
                        "queues",
                        "flow_control",
                    ] {
                        toml += &format!("[topics.{topic}]\npartitions = {p}\n");
                    }
                }
                args.push("serve".into());
                SERVE_TOKEN
            }
        };
        if let Some(i) = used.iter().position(|u| !u) {
            bail!(
                "no [{}] section in the generated config for `{}`",
                o.extra[i].0,
                o.extra[i].1
            );
        }
        let config = dir.join("kstash.toml");
        std::fs::write(&config, &toml)?;
        let log = dir.join("kstash.log");
        args.extend(["--config".into(), config.into_os_string()]);
        let child = start_child(&o.bin, &args, &o.rust_log, &log, false)?;
        let pid = child.id().context("kstash exited at once")?;
        let mut kstash = Kstash {
            child,
            pid,
            port,
            token,
            mode: o.mode,
            dir,
            log,
            state_dir,
            made_dir,
            keep: o.keep,
            bin: o.bin.clone(),
            args,
            rust_log: o.rust_log.clone(),
        };
        progress(format!(
            "started kstash {:?} (pid {pid}) on 127.0.0.1:{port}; log {}",
            o.mode,
            kstash.log.display()
        ));
        kstash.wait_healthy().await?;
        Ok(kstash)
    }

    /// Starts the child again after it exited (same config, port and scratch directory; its log
    /// is appended to) and waits until it is healthy.
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            bail!("kstash (pid {}) is still running", self.pid);
        }
        {
            use std::io::Write;
            let mut log = std::fs::OpenOptions::new().append(true).open(&self.log)?;
            writeln!(
                log,
                "---- {TOOL}: restarted at {} ----",
                humantime::format_rfc3339_millis(SystemTime::now())
            )?;
        }
        self.child = start_child(&self.bin, &self.args, &self.rust_log, &self.log, true)?;
        self.pid = self.child.id().context("kstash exited at once")?;
        progress(format!(
            "restarted kstash (pid {}) on 127.0.0.1:{}",
            self.pid, self.port
        ));
        self.wait_healthy().await
    }

    pub async fn wait_healthy(&mut self) -> Result<()> {
        let url = format!("{}/health", self.base());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("kstash exited with {status}:\n{}", self.log_tail(30));
            }
            if let Ok(r) = reqwest::get(&url).await {
                if r.status().is_success() {
                    progress(format!(
                        "kstash healthy after {:.1} s",
                        start.elapsed().as_secs_f64()
                    ));
                    return Ok(());
                }
            }
            if start.elapsed() > Duration::from_secs(120) {
                bail!("kstash not healthy after 120 s:\n{}", self.log_tail(30));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sends `signal` (a name `kill` knows: TERM, KILL, STOP, …) to the child.
    pub fn signal(&self, signal: &str) -> Result<()> {
        send_signal(self.pid, signal)
    }

    /// Waits at most `limit` for the child to exit; None if it is still running.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<Option<std::process::ExitStatus>> {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => Ok(Some(status?)),
            Err(_) => Ok(None),
        }
    }

    pub fn memory(&self) -> Result<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .context("kstash is gone")?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("no {name} in /proc/{}/status", self.pid))
        };
        Ok(Memory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
            anon_kib: field("RssAnon:")?,
            file_kib: field("RssFile:")?,
        })
    }

    /// User + system CPU seconds of the process so far.
    pub fn cpu_seconds(&self) -> Result<f64> {
        process_cpu_seconds(&self.pid.to_string())
    }

    /// Bytes of the local state store file (redb) on disk.
    pub fn state_bytes(&self) -> u64 {
        std::fs::metadata(self.state_dir.join("state.redb")).map_or(0, |m| m.len())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Counts of WARN and ERROR lines in the kstash log, with the first few of them.
    pub fn log_summary(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        let errors = bad.iter().filter(|l| l.contains(" ERROR ")).count();
        let mut s = format!(
            "kstash log: {} WARN and {errors} ERROR lines\n",
            bad.len() - errors
        );
        for l in bad.iter().take(5) {
            s += &format!("    {l}\n");
        }
        s
    }

    /// SIGTERM, then up to `limit` for a clean exit, then SIGKILL. Returns whether it exited by
    /// itself.
    pub async fn terminate(&mut self, limit: Duration) -> Result<bool> {
        let _ = self.signal("TERM");
        match self.wait_exit(limit).await? {
            Some(status) => {
                progress(format!("kstash exited: {status}"));
                Ok(true)
            }
            None => {
                progress(format!(
                    "kstash still running {} s after SIGTERM; killing it",
                    limit.as_secs()
                ));
                self.child.kill().await?;
                Ok(false)
            }
        }
    }

    /// SIGTERM, then up to 30 s for a clean exit, then SIGKILL.
    pub async fn stop(mut self) -> Result<()> {
        self.terminate(Duration::from_secs(30)).await.map(|_| ())
    }
}

impl Drop for Kstash {
    fn drop(&mut self) {
        // SIGKILL if still running, and reap it (briefly) so no zombie outlives this tool.
        let _ = self.child.start_kill();
        for _ in 0..200 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !self.made_dir {
            // The caller's directory.
        } else if self.keep {
            progress(format!("kept {}", self.dir.display()));
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Starts `bin args` with its stderr to `log` (appended to or created), no stdin or stdout, and
/// no KSTASH_* variable from this environment; killed when dropped.
fn start_child(
    bin: &std::path::Path,
    args: &[std::ffi::OsString],
    rust_log: &str,
    log: &std::path::Path,
    append: bool,
) -> Result<Child> {
    let mut command = Command::new(bin);
    command.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("KSTASH_") {
            command.env_remove(key);
        }
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(log)?;
    command
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// `kill -<signal> <pid>`.
pub fn send_signal(pid: u32, signal: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed ({status})");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The receiver: records the first arrival time of each message id
// ---------------------------------------------------------------------------------------------

pub struct Receiver {
    pub addr: SocketAddr,
    pub state: Arc<ReceiverState>,
}

pub struct ReceiverState {
    pub clock: Instant,
    seen: Mutex<Seen>,
    delivered: AtomicUsize,
    duplicates: AtomicUsize,
    foreign: AtomicUsize,
    /// How long each request is held before it is answered.
    hold: Duration,
    /// Requests being handled now, and the most at once.
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

#[derive(Default)]
struct Seen {
    /// First arrival (ms since the clock's start) per id.
    arrivals: Vec<Option<f64>>,
    /// Every request with a known id, duplicates included, in the order they arrived.
    log: Vec<(usize, f64)>,
}

/// Counts a request as open until it is answered (or dropped by the caller).
struct Open(Arc<ReceiverState>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn receive(State(s): State<Arc<ReceiverState>>, body: Bytes) -> StatusCode {
    let at = since(s.clock, Instant::now());
    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _open = Open(s.clone());
    let id = std::str::from_utf8(&body)
        .ok()
        .and_then(|b| b.split(' ').next())
        .and_then(|i| i.parse::<usize>().ok());
    {
        let mut seen = s.seen.lock().unwrap();
        match id.and_then(|i| seen.arrivals.get(i).copied().map(|slot| (i, slot))) {
            Some((i, None)) => {
                seen.arrivals[i] = Some(at);
                seen.log.push((i, at));
                s.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Some((i, Some(_))) => {
                seen.log.push((i, at));
                s.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                s.foreign.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    if !s.hold.is_zero() {
        tokio::time::sleep(s.hold).await;
    }
    StatusCode::OK
}

impl Receiver {
    pub async fn start(clock: Instant, capacity: usize) -> Result<Receiver> {
        Receiver::start_holding(clock, capacity, Duration::ZERO).await
    }

    /// A receiver that answers each request only after `hold`.
    pub async fn start_holding(
        clock: Instant,
        capacity: usize,
        hold: Duration,
    ) -> Result<Receiver> {
        let state = Arc::new(ReceiverState {
            clock,
            seen: Mutex::new(Seen {
                arrivals: vec![None; capacity],
                log: Vec::with_capacity(capacity),
            }),
            delivered: AtomicUsize::new(0),
            duplicates: AtomicUsize::new(0),
            foreign: AtomicUsize::new(0),
            hold,
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new().fallback(receive).with_state(state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                progress(format!("receiver stopped: {e}"));
            }
        });
        Ok(Receiver { addr, state })
    }

    /// Every request with a known id, duplicates included, in arrival order: (id, arrival ms).
    pub fn log(&self) -> Vec<(usize, f64)> {
        self.state.seen.lock().unwrap().log.clone()
    }

    /// The most requests this receiver had open (arrived, not yet answered) at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn delivered(&self) -> usize {
        self.state.delivered.load(Ordering::Relaxed)
    }

    pub fn duplicates(&self) -> usize {
        self.state.duplicates.load(Ordering::Relaxed)
    }

    /// Requests whose body did not start with a known id.
    pub fn foreign(&self) -> usize {
        self.state.foreign.load(Ordering::Relaxed)
    }

    pub fn arrivals(&self) -> Vec<Option<f64>> {
        self.state.seen.lock().unwrap().arrivals.clone()
    }

    /// Waits until `expected` distinct messages arrived, at most `limit`. Returns the time waited.
    pub async fn wait_for(&self, expected: usize, limit: Duration, label: &str) -> Duration {
        let start = Instant::now();
        let mut next_note = start + PROGRESS_EVERY;
        while self.delivered() < expected {
            if start.elapsed() > limit {
                progress(format!(
                    "{label}: gave up waiting after {:.0} s: {}/{expected} delivered",
                    limit.as_secs_f64(),
                    self.delivered()
                ));
                break;
            }
            if Instant::now() >= next_note {
                progress(format!(
                    "{label}: delivered {}/{expected}",
                    self.delivered()
                ));
                next_note += PROGRESS_EVERY;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.state.foreign.load(Ordering::Relaxed) > 0 {
            progress(format!(
                "{label}: {} deliveries with an unknown id",
                self.state.foreign.load(Ordering::Relaxed)
            ));
        }
        start.elapsed()
    }
}
// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// User + system CPU seconds of the process `pid` ("self" for this one), assuming 100 clock
/// ticks per second (the Linux default).
pub fn process_cpu_seconds(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("bad /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

/// Milliseconds from `clock` to `t`.
pub fn since(clock: Instant, t: Instant) -> f64 {
    t.duration_since(clock).as_secs_f64() * 1e3
}

pub fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

/// A progress line on stderr: `[<tool> <time>] <line>`.
pub fn progress(line: String) {
    eprintln!(
        "[{TOOL} {}] {line}",
        humantime::format_rfc3339_seconds(SystemTime::now())
    );
}
