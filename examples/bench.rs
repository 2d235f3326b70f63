//! kstash benchmark tool. Starts `kstash dev` (embedded cluster) or `kstash serve` (a real broker)
//! as a child process on 127.0.0.1, drives it over HTTP with a local receiver, and prints a
//! markdown table on stdout (progress lines go to stderr).
//!
//! ```text
//! cargo build --release
//! cargo run --release --example bench -- delay      [--mode dev|serve] ...
//! cargo run --release --example bench -- memory     [--mode dev|serve] ...
//! cargo run --release --example bench -- throughput [--mode dev|serve] ...
//! cargo run --release --example bench -- order      [--mode dev|serve] ...
//! scripts/with-kafka.sh cargo run --release --example bench -- throughput --mode serve
//! ```
//!
//! - `delay`: lateness of delayed deliveries. Lateness = arrival at the receiver − (time the
//!   publish request was sent + delay): an upper bound of the true lateness, because kstash starts
//!   the delay when it receives the request, a little after it was sent. A negative value is an
//!   early delivery (kstash's due time is never before send time + delay).
//! - `memory`: RSS of the kstash process (/proc/<pid>/status) idle, after a warm-up, and after N
//!   messages delayed by an hour (cumulative steps), each after a bounded settle. `--delay 0s` is
//!   the control: the same publishes, delivered at once.
//! - `throughput`: N publishes with C concurrent clients to an immediate destination: publishes/s,
//!   publish latency, publish→delivery latency.
//! - `order`: FIFO queues and flow control (needs a build with queues, commit 4960844 or later).
//!   FIFO: Q queues of parallelism 1, N messages each, enqueued (`POST /v2/enqueue/<queue>/…`) in
//!   order by one client per queue, all queues at once; the body carries (queue, sequence). It
//!   reports enqueues/s, deliveries/s, publish→delivery latency, duplicates and **order
//!   violations**: first deliveries whose sequence is below one already delivered for their queue
//!   (must be 0). Then the same with queues of parallelism P > 1 (order not promised: "n/a"),
//!   and a backlog: queues of parallelism 1 filled while paused, then resumed (drain rate, order
//!   through lane parking and rewinds). Flow control: M messages published at once with one
//!   `Upstash-Flow-Control-Key` and `rate=R, period=<p>`: the achieved starts/s at the receiver against the limit, and the most
//!   arrivals in any window of one period (kstash promises at most R plus a burst of 10 ms worth
//!   of starts, at least 1). Then a key with `parallelism=K` and a receiver that holds every
//!   request for a while: the most requests the receiver had open at once (must be ≤ K).
//!   `--parts` picks the parts to run (default: all).
//!
//! `scripts/bench.sh` runs all of them on both brokers; BENCHMARKS.md has the results.
//!
//! The kstash child is stopped with SIGTERM at the end (SIGKILL on drop if anything goes wrong),
//! and its scratch directory (config, log, state store) is removed unless `--keep` is given.
#![deny(unsafe_code)]

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use support::{
    process_cpu_seconds, progress, since, Kstash, Memory, Mode, Options, Receiver, PROGRESS_EVERY,
};

#[derive(Parser)]
#[command(
    name = "bench",
    about = "kstash benchmarks: delay lateness, memory vs delayed backlog, publish throughput, \
             FIFO order and flow control"
)]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Delayed messages: early count (must be 0) and lateness percentiles per delay.
    Delay(DelayArgs),
    /// RSS of the kstash process vs the number of messages waiting in the delay ladder.
    Memory(MemoryArgs),
    /// Publish throughput, publish latency and publish→delivery latency at a concurrency.
    Throughput(ThroughputArgs),
    /// FIFO queues (order violations, duplicates, rates) and flow-control limits (rate, parallelism).
    Order(OrderArgs),
    /// What a destination that never answers, with a backlog, costs a healthy one: its delivery
    /// rate alone and then beside the hanging backlog.
    Isolation(IsolationArgs),
}

#[derive(Args, Clone)]
struct Common {
    /// Which kstash to start.
    #[arg(long, value_enum, default_value_t = Mode::Dev)]
    mode: Mode,
    /// Kafka bootstrap servers for --mode serve (loopback only).
    #[arg(long, env = "KSTASH_TEST_BROKERS", default_value = "127.0.0.1:19092")]
    brokers: String,
    /// The kstash binary (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/kstash")]
    bin: PathBuf,
    /// Partitions of the topics (serve: topics.<name>.partitions of ready, events, delay, dlq,
    /// cancellations, dedup, queues and flow_control; dev: dev.partitions). Default: kstash's own
    /// defaults. With --mode serve, builds before 4960844 refuse this config (they have no queues
    /// and flow_control topics); topics added later keep their default partitions.
    #[arg(long)]
    partitions: Option<u32>,
    /// RUST_LOG of the kstash process (its log goes to a file in the scratch directory).
    #[arg(long, default_value = "info")]
    rust_log: String,
    /// Keep the scratch directory (config, kstash log, state store) instead of removing it.
    #[arg(long)]
    keep: bool,
}

impl Common {
    fn options(&self) -> Options {
        Options {
            bin: self.bin.clone(),
            mode: self.mode,
            brokers: self.brokers.clone(),
            partitions: self.partitions,
            rust_log: self.rust_log.clone(),
            keep: self.keep,
            name: None,
            dir: None,
            extra: Vec::new(),
        }
    }
}

#[derive(Args)]
struct DelayArgs {
    #[command(flatten)]
    common: Common,
    /// Delays to publish with (comma-separated), interleaved in publish order.
    #[arg(long, value_delimiter = ',', value_parser = humantime::parse_duration,
          default_value = "300ms,1500ms,3s,7s,12s")]
    delays: Vec<Duration>,
    /// Messages per delay.
    #[arg(long, default_value_t = 200)]
    per_delay: usize,
    /// Publish rate (messages/s, all delays together); 0 = as fast as the clients go.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Concurrent publishing clients.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long to wait, after the last due time, for missing deliveries.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    grace: Duration,
    /// Messages (delayed by the smallest delay) published and delivered before the measured run,
    /// not counted.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// Extra wait after the last delivery, to catch duplicates.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    linger: Duration,
}

#[derive(Args)]
struct MemoryArgs {
    #[command(flatten)]
    common: Common,
    /// Cumulative numbers of delayed messages at which RSS is measured (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10000,50000,100000")]
    counts: Vec<usize>,
    /// Delay of those messages (long enough that none is due during the run). `0s` is the
    /// control: immediate messages, delivered before RSS settles.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    delay: Duration,
    /// Body size of each message (bytes).
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
    /// Concurrent publishing clients.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Immediate messages published and delivered before the baseline is taken.
    #[arg(long, default_value_t = 1000)]
    warmup: usize,
    /// Quiet time before the idle and warm-up samples.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    idle: Duration,
    /// Settled = RSS moved by at most --settle-tolerance-kib over this window (1 sample/s)...
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    settle_window: Duration,
    /// ...(the tolerance, KiB)...
    #[arg(long, default_value_t = 1024)]
    settle_tolerance_kib: u64,
    /// ...or this much time passed since the last publish.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    settle_max: Duration,
}

#[derive(Args)]
struct ThroughputArgs {
    #[command(flatten)]
    common: Common,
    /// Messages to publish.
    #[arg(long, default_value_t = 5000)]
    count: usize,
    /// Concurrent publishing clients.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Body size of each message (bytes).
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
    /// Immediate messages published and delivered before the measured run (not counted).
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// How long to wait, after the last publish, for missing deliveries.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    grace: Duration,
}

#[derive(Args, Clone)]
struct IsolationArgs {
    #[command(flatten)]
    common: Common,
    /// Messages to the healthy destination in each run.
    #[arg(long, default_value_t = 4000)]
    count: usize,
    /// Messages to the destination that never answers (second run), published first.
    #[arg(long, default_value_t = 1000)]
    hanging: usize,
    /// Concurrent publishing clients.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// How long to wait, after the last publish, for missing deliveries.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    grace: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum OrderPart {
    Fifo,
    FifoParallel,
    Backlog,
    FcRate,
    FcParallelism,
}

#[derive(Args)]
struct OrderArgs {
    #[command(flatten)]
    common: Common,
    /// FIFO part: number of queues (parallelism 1), all enqueued to at the same time.
    #[arg(long, default_value_t = 8)]
    queues: usize,
    /// Messages per queue, enqueued in order by one client per queue (each waits for its response).
    #[arg(long, default_value_t = 500)]
    per_queue: usize,
    /// Parallelism of the queues in the `fifo-parallel` part (order is not promised there; no
    /// violation count).
    #[arg(long, default_value_t = 4)]
    queue_parallelism: u32,
    /// The parts to run, in this order (comma-separated). `fifo`: queues of parallelism 1,
    /// delivered while they are enqueued. `fifo-parallel`: the same with --queue-parallelism.
    /// `backlog`: queues of parallelism 1 created paused, all messages enqueued, then every queue
    /// resumed (deliveries/s from the first resume request to the last arrival; each queue's
    /// backlog exceeds kstash's lane buffer, 64 by default, so its lane is parked and rewound).
    /// `fc-rate`, `fc-parallelism`: the flow-control checks.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fifo,fifo-parallel,backlog,fc-rate,fc-parallelism"
    )]
    parts: Vec<OrderPart>,
    /// Flow-control part: attempt starts allowed per --fc-period for one key...
    #[arg(long, default_value_t = 50)]
    fc_rate: u32,
    /// ...(the period)...
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    fc_period: Duration,
    /// ...and the messages published at once with that limit.
    #[arg(long, default_value_t = 500)]
    fc_messages: usize,
    /// Parallelism check: the parallelism of a second key...
    #[arg(long, default_value_t = 4)]
    fc_parallelism: u32,
    /// ...how long the receiver holds each of its requests before answering...
    #[arg(long, value_parser = humantime::parse_duration, default_value = "200ms")]
    fc_hold: Duration,
    /// ...and the messages published at once with that limit.
    #[arg(long, default_value_t = 100)]
    fc_parallelism_messages: usize,
    /// Concurrent publishing clients of the warm-up and the flow-control part.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Body size of each message (bytes; the id, queue and sequence take the first few).
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
    /// Immediate messages (no queue, no flow control) published and delivered first, not counted.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// How long to wait for missing deliveries, after the last publish (plus, for the flow-control
    /// part, the time its limit needs).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    grace: Duration,
    /// Extra wait after each part's last delivery, to catch duplicates.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    linger: Duration,
}

#[tokio::main]
async fn main() -> Result<()> {
    let bench = async {
        match Cli::parse().command {
            Bench::Delay(a) => delay_bench(a).await,
            Bench::Memory(a) => memory_bench(a).await,
            Bench::Throughput(a) => throughput_bench(a).await,
            Bench::Order(a) => order_bench(a).await,
            Bench::Isolation(a) => isolation_bench(a).await,
        }
    };
    // On Ctrl-C or SIGTERM the benchmark future is dropped, which kills kstash (see `Drop`).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = bench => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; kstash stopped"),
        _ = term.recv() => bail!("terminated; kstash stopped"),
    }
}

// ---------------------------------------------------------------------------------------------
// The benchmarks
// ---------------------------------------------------------------------------------------------

async fn delay_bench(a: DelayArgs) -> Result<()> {
    if a.delays.is_empty() || a.per_delay == 0 {
        bail!("need at least one delay and --per-delay > 0");
    }
    let total = a.delays.len() * a.per_delay;
    let clock = Instant::now();
    let receiver = Receiver::start(clock, total + a.warmup).await?;
    let kstash = Kstash::spawn(&a.common.options()).await?;
    let publisher = Publisher::new(&kstash, &receiver, a.concurrency)?;
    let smallest = a.delays.iter().min().copied().unwrap_or_default();
    if a.warmup > 0 {
        // Ids after the measured ones; not counted. Makes sure the delay stage has its partitions.
        let run = publisher
            .publish(PublishJob {
                label: "delay warm-up",
                first_id: total,
                count: a.warmup,
                delay: Arc::new(move |_| Some(smallest)),
                body_bytes: 16,
                concurrency: a.concurrency,
                rate: None,
                route: None,
                streams: None,
            })
            .await?;
        receiver
            .wait_for(run.ok_count(), smallest + a.grace, "delay warm-up")
            .await;
    }
    let warm_delivered = receiver.delivered();
    let delays = a.delays.clone();
    let rate = (a.rate > 0.0).then_some(a.rate);
    progress(format!(
        "delay: publishing {total} messages ({} per delay, delays {}) at {} with {} clients",
        a.per_delay,
        list_durations(&a.delays),
        rate.map_or("full speed".to_string(), |r| format!("{r}/s")),
        a.concurrency
    ));
    let cpu = CpuMeter::start(&kstash)?;
    let run = publisher
        .publish(PublishJob {
            label: "delay",
            first_id: 0,
            count: total,
            delay: Arc::new(move |i| Some(delays[i % delays.len()])),
            body_bytes: 16,
            concurrency: a.concurrency,
            rate,
            route: None,
            streams: None,
        })
        .await?;
    let max_delay = a.delays.iter().max().copied().unwrap_or_default();
    let expected = warm_delivered + run.ok_count();
    let waited = receiver
        .wait_for(expected, max_delay + a.grace, "delay")
        .await;
    let cpu = cpu.report(&kstash)?;
    tokio::time::sleep(a.linger).await;
    let arrivals = receiver.arrivals();

    // Per delay and overall: lateness upper bound (vs send time) and lower bound (vs response).
    let mut rows = Vec::new();
    let mut all = Lateness::default();
    for (k, d) in a.delays.iter().enumerate() {
        let mut l = Lateness::default();
        for i in (k..total).step_by(a.delays.len()) {
            l.add(&run.results[i], arrivals[i], *d);
            all.add(&run.results[i], arrivals[i], *d);
        }
        rows.push((fmt_delay(*d), l));
    }
    rows.push(("all".to_string(), all));
    let first_sent = run
        .results
        .iter()
        .map(|s| s.sent_ms)
        .fold(f64::MAX, f64::min);
    let mut worst: Vec<(f64, usize)> = (0..total)
        .filter(|&i| run.results[i].ok)
        .filter_map(|i| {
            let d = a.delays[i % a.delays.len()].as_secs_f64() * 1e3;
            arrivals[i].map(|at| (at - run.results[i].sent_ms - d, i))
        })
        .collect();
    worst.sort_by(|x, y| y.0.total_cmp(&x.0));

    let mut out = String::new();
    out += &format!("{}\n\n", environment(&a.common, &kstash));
    out += &format!(
        "delay: {total} messages, {} clients, rate {}, {} warm-up messages first (not counted), \
         published in {:.1} s, publish errors {}, duplicates {}, waited {:.1} s after the last \
         publish\n\n",
        a.concurrency,
        rate.map_or("unlimited".to_string(), |r| format!("{r}/s")),
        a.warmup,
        run.wall.as_secs_f64(),
        run.errors,
        receiver.duplicates(),
        waited.as_secs_f64()
    );
    out += "| delay | published | delivered | missing | early | lateness min | p50 | p90 | p99 | max | lower bound p50 | lower bound p99 |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for (name, l) in &rows {
        let upper = Summary::of(l.upper.clone());
        let lower = Summary::of(l.lower.clone());
        out += &format!(
            "| {name} | {} | {} | {} | **{}** | {} | {} | {} | {} | {} | {} | {} |\n",
            l.published,
            l.upper.len(),
            l.missing,
            l.early,
            ms(upper.min),
            ms(upper.p50),
            ms(upper.p90),
            ms(upper.p99),
            ms(upper.max),
            ms(lower.p50),
            ms(lower.p99)
        );
    }
    out += "\nLateness in ms = arrival − (publish request sent + delay) (upper bound). \
            Lower bound = arrival − (publish response received + delay). \
            Early = arrival before sent + delay.\n";
    let publish_latency = Summary::of(run.latencies());
    out += &format!(
        "Publish latency (request sent → response) p50 {} ms, p99 {} ms, max {} ms.\n",
        ms(publish_latency.p50),
        ms(publish_latency.p99),
        ms(publish_latency.max)
    );
    out += &format!("{cpu}\n");
    out +=
        "Latest 5 (id: delay, sent at s after the first publish, publish latency ms, lateness ms):";
    for (late, i) in worst.iter().take(5) {
        let s = &run.results[*i];
        out += &format!(
            " {i}: {}, {:.2} s, {:.1}, {:.1};",
            fmt_delay(a.delays[i % a.delays.len()]),
            (s.sent_ms - first_sent) / 1e3,
            s.done_ms - s.sent_ms,
            late
        );
    }
    out += "\n";
    for (name, l) in &rows {
        if !l.early_examples.is_empty() {
            out += &format!(
                "EARLY deliveries for delay {name} (id, ms early): {:?}\n",
                l.early_examples
            );
        }
    }
    out += &kstash.log_summary();
    kstash.stop().await?;
    println!("{out}");
    Ok(())
}

#[derive(Default)]
struct Lateness {
    published: usize,
    missing: usize,
    early: usize,
    upper: Vec<f64>,
    lower: Vec<f64>,
    early_examples: Vec<(usize, f64)>,
}

impl Lateness {
    fn add(&mut self, sent: &Sent, arrival: Option<f64>, delay: Duration) {
        if !sent.ok {
            return;
        }
        self.published += 1;
        let Some(at) = arrival else {
            self.missing += 1;
            return;
        };
        let d = delay.as_secs_f64() * 1e3;
        let upper = at - (sent.sent_ms + d);
        if upper < 0.0 {
            self.early += 1;
            if self.early_examples.len() < 10 {
                self.early_examples.push((sent.id, -upper));
            }
        }
        self.upper.push(upper);
        self.lower.push(at - (sent.done_ms + d));
    }
}

async fn memory_bench(a: MemoryArgs) -> Result<()> {
    let mut counts = a.counts.clone();
    counts.sort_unstable();
    counts.dedup();
    let max = counts.last().copied().unwrap_or_default();
    // --delay 0s is the control: the same number of messages, delivered at once instead of waiting.
    let immediate = a.delay.is_zero();
    let what = if immediate {
        "immediate messages published and delivered".to_string()
    } else {
        format!("messages waiting (delay {})", fmt_delay(a.delay))
    };
    let clock = Instant::now();
    let receiver = Receiver::start(clock, a.warmup + max).await?;
    let kstash = Kstash::spawn(&a.common.options()).await?;
    let publisher = Publisher::new(&kstash, &receiver, a.concurrency)?;
    let mut rows: Vec<String> = Vec::new();
    let row = |label: String,
               rate: Option<f64>,
               after: Option<Memory>,
               m: Memory,
               took: Option<Duration>,
               growth: Option<(Memory, usize)>| {
        let dash = || "–".to_string();
        format!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            rate.map_or_else(dash, |r| format!("{r:.0}")),
            after.map_or_else(dash, |m| mib(m.rss_kib)),
            mib(m.rss_kib),
            mib(m.anon_kib),
            mib(m.file_kib),
            took.map_or_else(dash, |t| format!("{:.0}", t.as_secs_f64())),
            mib(m.hwm_kib),
            bytes_mib(kstash.state_bytes()),
            growth.map_or_else(
                || "– | –".to_string(),
                |(b, n)| {
                    let kib = m.rss_kib as f64 - b.rss_kib as f64;
                    format!("{:+.1} | {:+.1}", kib / 1024.0, kib / n as f64)
                }
            ),
        )
    };

    tokio::time::sleep(a.idle).await;
    let idle = kstash.memory()?;
    progress(format!("memory: idle RSS {} MiB", mib(idle.rss_kib)));
    rows.push(row(
        "idle, after start".into(),
        None,
        None,
        idle,
        None,
        None,
    ));

    if a.warmup > 0 {
        let run = publisher
            .publish(PublishJob {
                label: "memory warm-up",
                first_id: 0,
                count: a.warmup,
                delay: Arc::new(|_| None),
                body_bytes: a.body_bytes,
                concurrency: a.concurrency,
                rate: None,
                route: None,
                streams: None,
            })
            .await?;
        receiver
            .wait_for(run.ok_count(), Duration::from_secs(60), "memory warm-up")
            .await;
        tokio::time::sleep(a.idle).await;
    }
    let base = kstash.memory()?;
    progress(format!(
        "memory: baseline RSS {} MiB after {} immediate deliveries",
        mib(base.rss_kib),
        receiver.delivered()
    ));
    rows.push(row(
        format!("0 (baseline, after {} immediate deliveries)", a.warmup),
        None,
        None,
        base,
        None,
        None,
    ));
    let delivered_before = receiver.delivered();

    let mut published = 0;
    let mut errors = 0;
    let mut ok_total = 0;
    for &n in &counts {
        let delay = a.delay;
        let run = publisher
            .publish(PublishJob {
                label: "memory",
                first_id: a.warmup + published,
                count: n - published,
                delay: Arc::new(move |_| (!delay.is_zero()).then_some(delay)),
                body_bytes: a.body_bytes,
                concurrency: a.concurrency,
                rate: None,
                route: None,
                streams: None,
            })
            .await?;
        errors += run.errors;
        ok_total += run.ok_count();
        let rate = run.ok_count() as f64 / run.wall.as_secs_f64();
        published = n;
        let after = kstash.memory()?;
        progress(format!(
            "memory: {n} published ({rate:.0}/s); RSS {} MiB right after; settling…",
            mib(after.rss_kib)
        ));
        if immediate {
            receiver
                .wait_for(delivered_before + ok_total, a.settle_max, "memory")
                .await;
        }
        let (settled, took) = settle(&kstash, &a).await?;
        progress(format!(
            "memory: {n} published: RSS {} MiB after {:.0} s",
            mib(settled.rss_kib),
            took.as_secs_f64()
        ));
        rows.push(row(
            n.to_string(),
            Some(rate),
            Some(after),
            settled,
            Some(took),
            Some((base, n)),
        ));
    }
    let delivered = receiver.delivered() - delivered_before;

    let mut out = String::new();
    out += &format!("{}\n\n", environment(&a.common, &kstash));
    out += &format!(
        "memory: {what}, {}-byte bodies, {} clients; settled = RSS within {} KiB over {} s, or {} s \
         after the last publish; publish errors {errors}; of these messages delivered during the \
         run: {delivered} (expected {})\n\n",
        a.body_bytes,
        a.concurrency,
        a.settle_tolerance_kib,
        a.settle_window.as_secs(),
        a.settle_max.as_secs(),
        if immediate { ok_total } else { 0 },
    );
    out += &format!("| {what} | publish/s | RSS right after publishing (MiB) | RSS settled (MiB) | of which anon (MiB) | of which file (MiB) | settle (s) | peak RSS (VmHWM, MiB) | state.redb on disk (MiB) | settled − baseline (MiB) | per message (KiB) |\n");
    out += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in &rows {
        out += r;
    }
    out += &kstash.log_summary();
    kstash.stop().await?;
    println!("{out}");
    Ok(())
}

/// Samples RSS once a second until it stays within the tolerance over the window, or until
/// `settle_max`. Returns the last sample and the time taken.
async fn settle(kstash: &Kstash, a: &MemoryArgs) -> Result<(Memory, Duration)> {
    let start = Instant::now();
    let window = (a.settle_window.as_secs().max(1) + 1) as usize;
    let mut samples: Vec<u64> = Vec::new();
    loop {
        let m = kstash.memory()?;
        samples.push(m.rss_kib);
        let recent = &samples[samples.len().saturating_sub(window)..];
        let spread = recent.iter().max().unwrap_or(&0) - recent.iter().min().unwrap_or(&0);
        if (recent.len() == window && spread <= a.settle_tolerance_kib)
            || start.elapsed() >= a.settle_max
        {
            return Ok((m, start.elapsed()));
        }
        if samples.len() % 5 == 0 {
            progress(format!(
                "memory: settling, RSS {} (moved {} KiB over the last {} s)",
                mib(m.rss_kib),
                spread,
                recent.len() - 1
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Body size of the isolation bench's messages (bytes).
const ISOLATION_BODY_BYTES: usize = 64;
/// The hanging destination holds every request this long (longer than any run).
const HANG: Duration = Duration::from_secs(3600);
/// How long the isolation bench lets the hanging destination fill its slots before measuring.
const HANG_SETTLE: Duration = Duration::from_secs(10);

/// Deliveries per second of `run` at `receiver`: delivered messages over first send → last
/// arrival.
fn delivery_rate(run: &PublishRun, receiver: &Receiver) -> (usize, f64) {
    let arrivals = receiver.arrivals();
    let (mut first, mut last, mut delivered) = (f64::MAX, f64::MIN, 0);
    for s in run.results.iter().filter(|s| s.ok) {
        first = first.min(s.sent_ms);
        if let Some(at) = arrivals[s.id] {
            delivered += 1;
            last = last.max(at);
        }
    }
    if delivered == 0 {
        return (0, 0.0);
    }
    (delivered, delivered as f64 / ((last - first) / 1e3))
}

async fn isolation_bench(a: IsolationArgs) -> Result<()> {
    let job = |label, count| PublishJob {
        label,
        first_id: 0,
        count,
        delay: Arc::new(|_| None),
        body_bytes: ISOLATION_BODY_BYTES,
        concurrency: a.concurrency,
        rate: None,
        route: None,
        streams: None,
    };
    let mut rows = Vec::new();
    let mut env = String::new();
    for with_hanging in [false, true] {
        let clock = Instant::now();
        let healthy = Receiver::start(clock, a.count).await?;
        let hanging = Receiver::start_holding(clock, a.hanging, HANG).await?;
        let kstash = Kstash::spawn(&a.common.options()).await?;
        env = environment(&a.common, &kstash);
        let mut held = 0;
        if with_hanging {
            let to_hanging = Publisher::new(&kstash, &hanging, a.concurrency)?;
            to_hanging
                .publish(job("hanging backlog", a.hanging))
                .await?;
            tokio::time::sleep(HANG_SETTLE).await;
            held = hanging.max_in_flight();
            progress(format!(
                "isolation: the hanging destination holds {held} requests"
            ));
        }
        let to_healthy = Publisher::new(&kstash, &healthy, a.concurrency)?;
        let run = to_healthy.publish(job("healthy", a.count)).await?;
        healthy
            .wait_for(run.ok_count(), a.grace, "healthy deliveries")
            .await;
        let (delivered, rate) = delivery_rate(&run, &healthy);
        rows.push((with_hanging, delivered, rate, held));
        kstash.stop().await?;
    }
    let baseline = rows[0].2;
    let mut out = format!(
        "{env}

"
    );
    out += &format!(
        "isolation: {} messages to a healthy destination with {} clients, alone and after {} messages to a destination that never answers

",
        a.count, a.concurrency, a.hanging
    );
    out += "| run | healthy delivered | healthy deliveries/s | vs alone | requests held by the hanging destination |\n|---|---:|---:|---:|---:|\n";
    for (with_hanging, delivered, rate, held) in rows {
        out += &format!(
            "| {} | {delivered} | {rate:.0} | {:.2} | {held} |\n",
            if with_hanging {
                "beside a hanging backlog"
            } else {
                "alone"
            },
            rate / baseline
        );
    }
    println!("{out}");
    Ok(())
}

async fn throughput_bench(a: ThroughputArgs) -> Result<()> {
    let clock = Instant::now();
    let receiver = Receiver::start(clock, a.warmup + a.count).await?;
    let kstash = Kstash::spawn(&a.common.options()).await?;
    let publisher = Publisher::new(&kstash, &receiver, a.concurrency)?;
    let immediate: Arc<DelayFn> = Arc::new(|_| None);
    if a.warmup > 0 {
        let run = publisher
            .publish(PublishJob {
                label: "throughput warm-up",
                first_id: 0,
                count: a.warmup,
                delay: immediate.clone(),
                body_bytes: a.body_bytes,
                concurrency: a.concurrency,
                rate: None,
                route: None,
                streams: None,
            })
            .await?;
        receiver
            .wait_for(run.ok_count(), Duration::from_secs(60), "warm-up")
            .await;
    }
    let warm_delivered = receiver.delivered();
    let cpu = CpuMeter::start(&kstash)?;
    progress(format!(
        "throughput: {} publishes with {} clients",
        a.count, a.concurrency
    ));
    let run = publisher
        .publish(PublishJob {
            label: "throughput",
            first_id: a.warmup,
            count: a.count,
            delay: immediate,
            body_bytes: a.body_bytes,
            concurrency: a.concurrency,
            rate: None,
            route: None,
            streams: None,
        })
        .await?;
    let waited = receiver
        .wait_for(warm_delivered + run.ok_count(), a.grace, "throughput")
        .await;
    let kstash_cpu = kstash.cpu_seconds()? - cpu.kstash;
    let cpu = cpu.report(&kstash)?;
    let memory = kstash.memory()?;
    let arrivals = receiver.arrivals();

    let ok = run.ok_count();
    let publish = Summary::of(run.latencies());
    let mut e2e = Vec::new();
    let mut last_arrival = f64::MIN;
    for s in run.results.iter().filter(|s| s.ok) {
        if let Some(at) = arrivals[s.id] {
            e2e.push(at - s.sent_ms);
            last_arrival = last_arrival.max(at);
        }
    }
    let delivered = e2e.len();
    let e2e = Summary::of(e2e);
    let first_sent = run
        .results
        .iter()
        .map(|s| s.sent_ms)
        .fold(f64::MAX, f64::min);
    let all_delivered_s = (last_arrival - first_sent) / 1e3;

    let mut out = String::new();
    out += &format!("{}\n\n", environment(&a.common, &kstash));
    out += &format!(
        "throughput: {}-byte bodies, {} warm-up messages first (not counted); publish errors {}, \
         duplicates {}, waited {:.1} s after the last publish; kstash RSS at the end {} MiB\n\n",
        a.body_bytes,
        a.warmup,
        run.errors,
        receiver.duplicates(),
        waited.as_secs_f64(),
        mib(memory.rss_kib)
    );
    out += "| messages | clients | publishes/s | publish p50 (ms) | publish p99 (ms) | publish max (ms) | delivered | publish→delivery p50 (ms) | p99 (ms) | max (ms) | deliveries/s (first send → last arrival) | kstash CPU (s) |\n";
    out += "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    out += &format!(
        "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.1} |\n",
        a.count,
        a.concurrency,
        ok as f64 / run.wall.as_secs_f64(),
        ms(publish.p50),
        ms(publish.p99),
        ms(publish.max),
        delivered,
        ms(e2e.p50),
        ms(e2e.p99),
        ms(e2e.max),
        delivered as f64 / all_delivered_s,
        kstash_cpu
    );
    out += &format!("{cpu}\n");
    out += &kstash.log_summary();
    kstash.stop().await?;
    println!("{out}");
    Ok(())
}

async fn order_bench(a: OrderArgs) -> Result<()> {
    if a.queues == 0 || a.per_queue == 0 || a.fc_rate == 0 || a.fc_parallelism == 0 {
        bail!("--queues, --per-queue, --fc-rate and --fc-parallelism must be at least 1");
    }
    if a.fc_period.is_zero() {
        bail!("--fc-period must be positive");
    }
    let clock = Instant::now();
    let kstash = Kstash::spawn(&a.common.options()).await?;
    if a.warmup > 0 {
        let receiver = Receiver::start(clock, a.warmup).await?;
        let publisher = Publisher::new(&kstash, &receiver, a.concurrency)?;
        let run = publisher
            .publish(PublishJob {
                label: "order warm-up",
                first_id: 0,
                count: a.warmup,
                delay: Arc::new(|_| None),
                body_bytes: a.body_bytes,
                concurrency: a.concurrency,
                rate: None,
                route: None,
                streams: None,
            })
            .await?;
        receiver
            .wait_for(run.ok_count(), a.grace, "order warm-up")
            .await;
    }

    let (mut fifo, mut flow) = (Vec::new(), Vec::new());
    for part in &a.parts {
        match part {
            OrderPart::Fifo => fifo.push(fifo_run(&a, &kstash, clock, "fifo", 1, false).await?),
            OrderPart::FifoParallel => fifo
                .push(fifo_run(&a, &kstash, clock, "fifo-par", a.queue_parallelism, false).await?),
            OrderPart::Backlog => {
                fifo.push(fifo_run(&a, &kstash, clock, "fifo-backlog", 1, true).await?)
            }
            OrderPart::FcRate => flow.push(fc_rate_run(&a, &kstash, clock).await?),
            OrderPart::FcParallelism => flow.push(fc_parallelism_run(&a, &kstash, clock).await?),
        }
    }

    let mut out = String::new();
    out += &format!("{}\n\n", environment(&a.common, &kstash));
    out += &format!(
        "order: {} warm-up messages first (no queue, not counted); {}-byte bodies; each part \
         waits for its deliveries (at most {} s more than it needs), then {} s for duplicates\n\n",
        a.warmup,
        a.body_bytes,
        a.grace.as_secs(),
        a.linger.as_secs_f64()
    );
    if !fifo.is_empty() {
        out += "FIFO queues: `POST /v2/enqueue/<queue>/…`, one client per queue publishing its \
            messages in order (each waits for the previous response), all queues at once. Order \
            violations = first deliveries whose sequence is below one already delivered for their \
            queue (must be 0 at parallelism 1; not promised above it: n/a). live = delivered \
            while being enqueued; backlog = enqueued to paused queues, then all queues resumed \
            (deliveries/s from the first resume request to the last arrival; no publish→delivery \
            latency).\n\n";
        out += "| run | queues | parallelism | messages | enqueue errors | enqueues/s | enqueue p50 (ms) | enqueue p99 (ms) | delivered | deliveries/s | publish→delivery p50 (ms) | p99 (ms) | max (ms) | duplicates | order violations | kstash CPU (s) |\n";
        out += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
        for f in &fifo {
            out += &f.row;
        }
        for f in &fifo {
            out += &f.notes;
        }
    }
    for f in &flow {
        out += "\n";
        out += f;
    }
    out += &kstash.log_summary();
    kstash.stop().await?;
    println!("{out}");
    Ok(())
}

/// One FIFO run: its table row and the notes under the table.
struct FifoReport {
    row: String,
    notes: String,
}

/// Queues `<label>-0..` with `parallelism`, `--per-queue` messages each, enqueued in order;
/// `backlog`: to paused queues, resumed once all are enqueued.
async fn fifo_run(
    a: &OrderArgs,
    kstash: &Kstash,
    clock: Instant,
    label: &'static str,
    parallelism: u32,
    backlog: bool,
) -> Result<FifoReport> {
    let (queues, per) = (a.queues, a.per_queue);
    let total = queues * per;
    let receiver = Receiver::start(clock, total).await?;
    let publisher = Publisher::new(kstash, &receiver, queues)?;
    let prefix = format!("bench-{label}");
    for q in 0..queues {
        publisher
            .post_json(
                "/v2/queues",
                serde_json::json!({
                    "queueName": format!("{prefix}-{q}"),
                    "parallelism": parallelism,
                    "paused": backlog,
                }),
            )
            .await?;
    }
    progress(format!(
        "{label}: {queues} {}queues of parallelism {parallelism}, {per} messages each, one client \
         per queue",
        if backlog { "paused " } else { "" }
    ));
    let cpu = CpuMeter::start(kstash)?;
    let route_prefix = prefix.clone();
    let run = publisher
        .publish(PublishJob {
            label,
            first_id: 0,
            count: total,
            delay: Arc::new(|_| None),
            body_bytes: a.body_bytes,
            concurrency: queues,
            rate: None,
            route: Some(Arc::new(move |i| Route {
                api: format!("/v2/enqueue/{route_prefix}-{}", i / per),
                headers: Vec::new(),
                tag: format!("q={} seq={}", i / per, i % per),
            })),
            streams: Some(queues),
        })
        .await?;
    // Backlog: let the records reach the (paused) lanes, then resume every queue.
    let mut resumed_ms = None;
    let mut early = 0;
    let mut cpu_at_resume = 0.0;
    if backlog {
        tokio::time::sleep(a.linger).await;
        early = receiver.delivered();
        cpu_at_resume = kstash.cpu_seconds()?;
        resumed_ms = Some(since(clock, Instant::now()));
        for q in 0..queues {
            publisher
                .post_json(
                    &format!("/v2/queues/{prefix}-{q}/resume"),
                    serde_json::json!({}),
                )
                .await?;
        }
        progress(format!(
            "{label}: {} delivered while paused; all {queues} queues resumed",
            early
        ));
    }
    let waited = receiver.wait_for(run.ok_count(), a.grace, label).await;
    let kstash_cpu = kstash.cpu_seconds()? - cpu.kstash;
    let drain_cpu = kstash.cpu_seconds()? - cpu_at_resume;
    let cpu = cpu.report(kstash)?;
    tokio::time::sleep(a.linger).await;

    // Order: walk the deliveries in arrival order; a first delivery below its queue's highest
    // delivered sequence so far is a violation.
    let mut highest: Vec<Option<usize>> = vec![None; queues];
    let mut first = vec![false; total];
    let mut violations = Vec::new();
    for (id, at) in receiver.log() {
        if std::mem::replace(&mut first[id], true) {
            continue; // a duplicate, counted by the receiver
        }
        let (q, seq) = (id / per, id % per);
        match highest[q] {
            Some(h) if seq < h => violations.push((q, seq, h, at)),
            _ => highest[q] = Some(seq),
        }
    }
    let arrivals = receiver.arrivals();
    let mut e2e = Vec::new();
    let mut last_arrival = f64::MIN;
    for s in run.results.iter().filter(|s| s.ok) {
        if let Some(at) = arrivals[s.id] {
            e2e.push(at - s.sent_ms);
            last_arrival = last_arrival.max(at);
        }
    }
    let delivered = e2e.len();
    let first_sent = run
        .results
        .iter()
        .map(|s| s.sent_ms)
        .fold(f64::MAX, f64::min);
    let e2e = Summary::of(if backlog { Vec::new() } else { e2e });
    let publish = Summary::of(run.latencies());
    let strict = parallelism == 1;
    let rate = delivered as f64 / ((last_arrival - resumed_ms.unwrap_or(first_sent)) / 1e3);
    let row = format!(
        "| {} | {queues} | {parallelism} | {total} | {} | {:.0} | {} | {} | {delivered} | {rate:.0} | {} | {} | {} | {} | {} | {kstash_cpu:.1} |\n",
        if backlog { "backlog" } else { "live" },
        run.errors,
        run.ok_count() as f64 / run.wall.as_secs_f64(),
        ms(publish.p50),
        ms(publish.p99),
        ms(e2e.p50),
        ms(e2e.p99),
        ms(e2e.max),
        receiver.duplicates(),
        if strict {
            format!("**{}**", violations.len())
        } else {
            "n/a".to_string()
        },
    );
    let mut notes =
        match resumed_ms {
            None => format!(
            "\nLive, parallelism {parallelism}: enqueued in {:.1} s, waited {:.1} s after the last \
             enqueue; {cpu}\n",
            run.wall.as_secs_f64(),
            waited.as_secs_f64()
        ),
            Some(resumed) => format!(
            "\nBacklog, parallelism {parallelism}: enqueued in {:.1} s to paused queues, resumed \
             {:.1} s after the last enqueue response, all delivered {:.1} s after the first resume \
             request (kstash CPU from the first resume to the last arrival {drain_cpu:.1} s); \
             {cpu}\n",
            run.wall.as_secs_f64(),
            (resumed - run.results.iter().map(|s| s.done_ms).fold(f64::MIN, f64::max)) / 1e3,
            (last_arrival - resumed) / 1e3,
        ),
        };
    if early > 0 {
        notes += &format!("DELIVERED WHILE PAUSED: {early}\n");
    }
    if strict {
        for (q, seq, h, at) in violations.iter().take(10) {
            notes += &format!(
                "ORDER VIOLATION: queue {q}: sequence {seq} delivered at {:.3} s, after {h}\n",
                at / 1e3
            );
        }
    } else {
        notes += &format!(
            "(Out of order at parallelism {parallelism}, allowed: {} first deliveries came after \
             a higher sequence of their queue.)\n",
            violations.len()
        );
    }
    if run.ok_count() > delivered {
        notes += &format!(
            "MISSING: {} enqueued messages not delivered\n",
            run.ok_count() - delivered
        );
    }
    Ok(FifoReport { row, notes })
}

/// `fc_messages` published at once with one key's rate limit: achieved rate at the receiver.
async fn fc_rate_run(a: &OrderArgs, kstash: &Kstash, clock: Instant) -> Result<String> {
    let n = a.fc_messages;
    let receiver = Receiver::start(clock, n).await?;
    let publisher = Publisher::new(kstash, &receiver, a.concurrency)?;
    let value = format!(
        "rate={}, period={}",
        a.fc_rate,
        header_duration(a.fc_period)
    );
    progress(format!(
        "flow-control rate: {n} messages at once, key bench-rate, {value}"
    ));
    let cpu = CpuMeter::start(kstash)?;
    let run = publisher
        .publish(flow_controlled_job(
            "flow-control rate",
            n,
            a,
            "bench-rate",
            &value,
        ))
        .await?;
    let period_s = a.fc_period.as_secs_f64();
    let limit_per_s = f64::from(a.fc_rate) / period_s;
    let needs = Duration::from_secs_f64(run.ok_count() as f64 / limit_per_s);
    let waited = receiver
        .wait_for(run.ok_count(), needs + a.grace, "flow-control rate")
        .await;
    let cpu = cpu.report(kstash)?;
    tokio::time::sleep(a.linger).await;

    // Attempt starts as the receiver saw them (duplicates included: each is an attempt).
    let mut times: Vec<f64> = receiver.log().iter().map(|(_, at)| *at).collect();
    times.sort_by(f64::total_cmp);
    let delivered = receiver.delivered();
    let period_ms = period_s * 1e3;
    let (achieved, span) = match (times.first(), times.last()) {
        (Some(f), Some(l)) if times.len() > 1 && l > f => {
            ((times.len() - 1) as f64 / ((l - f) / 1e3), (l - f) / 1e3)
        }
        _ => (f64::NAN, 0.0),
    };
    let (mut most, mut lo) = (0, 0);
    for hi in 0..times.len() {
        while times[hi] - times[lo] >= period_ms {
            lo += 1;
        }
        most = most.max(hi - lo + 1);
    }
    let burst = (10.0 * f64::from(a.fc_rate) / period_ms).floor().max(1.0) as usize;
    let bound = a.fc_rate as usize + burst;
    let first_sent = run
        .results
        .iter()
        .map(|s| s.sent_ms)
        .fold(f64::MAX, f64::min);
    let mut out = format!(
        "Flow-control rate: {n} messages published at once by {} clients (in {:.1} s, {} errors) \
         with `Upstash-Flow-Control-Key: bench-rate` and `Upstash-Flow-Control-Value: {value}`; \
         waited {:.1} s after the last publish. Achieved = (arrivals − 1) ÷ (first → last \
         arrival). Window = the most arrivals in any window of one period [t, t + {}); kstash \
         allows {} + a burst of {burst}.\n\n",
        a.concurrency,
        run.wall.as_secs_f64(),
        run.errors,
        waited.as_secs_f64(),
        header_duration(a.fc_period),
        a.fc_rate,
    );
    out += "| messages | limit (starts/s) | delivered | duplicates | first → last arrival (s) | achieved (starts/s) | achieved ÷ limit | first send → first arrival (ms) | most arrivals in one period | allowed |\n";
    out += "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    out += &format!(
        "| {n} | {limit_per_s:.1} | {delivered} | {} | {span:.2} | {achieved:.2} | {:.3} | {} | **{most}** | {bound} |\n",
        receiver.duplicates(),
        achieved / limit_per_s,
        times.first().map_or("–".into(), |f| ms(f - first_sent)),
    );
    out += &format!("{cpu}\n");
    if most > bound {
        out += &format!("RATE ABOVE THE LIMIT: {most} arrivals in one period (allowed {bound})\n");
    }
    if run.ok_count() > delivered {
        out += &format!(
            "MISSING: {} published messages not delivered\n",
            run.ok_count() - delivered
        );
    }
    Ok(out)
}

/// `fc_parallelism_messages` published at once with one key's parallelism, to a receiver that
/// holds each request for `fc_hold`: the most requests open at the receiver at once.
async fn fc_parallelism_run(a: &OrderArgs, kstash: &Kstash, clock: Instant) -> Result<String> {
    let n = a.fc_parallelism_messages;
    let receiver = Receiver::start_holding(clock, n, a.fc_hold).await?;
    let publisher = Publisher::new(kstash, &receiver, a.concurrency)?;
    let value = format!("parallelism={}", a.fc_parallelism);
    progress(format!(
        "flow-control parallelism: {n} messages at once, key bench-parallel, {value}, receiver \
         holds each request {} ms",
        a.fc_hold.as_millis()
    ));
    let cpu = CpuMeter::start(kstash)?;
    let run = publisher
        .publish(flow_controlled_job(
            "flow-control parallelism",
            n,
            a,
            "bench-parallel",
            &value,
        ))
        .await?;
    let ceiling = f64::from(a.fc_parallelism) / a.fc_hold.as_secs_f64().max(1e-3);
    let needs = Duration::from_secs_f64(run.ok_count() as f64 / ceiling);
    let waited = receiver
        .wait_for(run.ok_count(), needs + a.grace, "flow-control parallelism")
        .await;
    let cpu = cpu.report(kstash)?;
    tokio::time::sleep(a.linger + a.fc_hold).await;
    let mut times: Vec<f64> = receiver.log().iter().map(|(_, at)| *at).collect();
    times.sort_by(f64::total_cmp);
    let delivered = receiver.delivered();
    let achieved = match (times.first(), times.last()) {
        // The last request ends `hold` after it arrives.
        (Some(f), Some(l)) => times.len() as f64 / ((l - f) / 1e3 + a.fc_hold.as_secs_f64()),
        _ => f64::NAN,
    };
    let most = receiver.max_in_flight();
    let mut out = format!(
        "Flow-control parallelism: {n} messages published at once by {} clients (in {:.1} s, {} \
         errors) with `Upstash-Flow-Control-Key: bench-parallel` and \
         `Upstash-Flow-Control-Value: {value}`; the receiver answers each request after {} ms; \
         waited {:.1} s after the last publish. Ceiling = parallelism ÷ hold; achieved = arrivals \
         ÷ (first arrival → last arrival + hold).\n\n",
        a.concurrency,
        run.wall.as_secs_f64(),
        run.errors,
        a.fc_hold.as_millis(),
        waited.as_secs_f64(),
    );
    out += "| messages | parallelism | hold (ms) | delivered | duplicates | most requests open at the receiver | ceiling (deliveries/s) | achieved (deliveries/s) | achieved ÷ ceiling |\n";
    out += "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    out += &format!(
        "| {n} | {} | {} | {delivered} | {} | **{most}** | {ceiling:.1} | {achieved:.1} | {:.3} |\n",
        a.fc_parallelism,
        a.fc_hold.as_millis(),
        receiver.duplicates(),
        achieved / ceiling,
    );
    out += &format!("{cpu}\n");
    if most > a.fc_parallelism as usize {
        out += &format!(
            "PARALLELISM ABOVE THE LIMIT: {most} requests open at once (allowed {})\n",
            a.fc_parallelism
        );
    }
    if run.ok_count() > delivered {
        out += &format!(
            "MISSING: {} published messages not delivered\n",
            run.ok_count() - delivered
        );
    }
    Ok(out)
}

/// A duration as kstash's headers read it: `1s`, `1500ms`.
fn header_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

// ---------------------------------------------------------------------------------------------
// The publisher
// ---------------------------------------------------------------------------------------------

type DelayFn = dyn Fn(usize) -> Option<Duration> + Send + Sync;
type RouteFn = dyn Fn(usize) -> Route + Send + Sync;

/// How one message is sent, besides its delay: `POST <kstash><api>/<receiver>/hook` with these
/// extra headers, and `tag` in the body after the id.
struct Route {
    api: String,
    headers: Vec<(&'static str, String)>,
    tag: String,
}

struct Publisher {
    http: reqwest::Client,
    /// kstash's base URL and the destination (the receiver).
    base: String,
    destination: String,
    token: &'static str,
    clock: Instant,
}

/// `n` messages published at once to `/v2/publish` with flow-control key `key` and value `value`.
fn flow_controlled_job(
    label: &'static str,
    n: usize,
    a: &OrderArgs,
    key: &'static str,
    value: &str,
) -> PublishJob {
    let value = value.to_string();
    PublishJob {
        label,
        first_id: 0,
        count: n,
        delay: Arc::new(|_| None),
        body_bytes: a.body_bytes,
        concurrency: a.concurrency,
        rate: None,
        route: Some(Arc::new(move |_| Route {
            api: "/v2/publish".into(),
            headers: vec![
                ("Upstash-Flow-Control-Key", key.into()),
                ("Upstash-Flow-Control-Value", value.clone()),
            ],
            tag: String::new(),
        })),
        streams: None,
    }
}

struct PublishJob {
    label: &'static str,
    /// Ids `first_id..first_id + count` (the receiver's slots).
    first_id: usize,
    count: usize,
    /// Delay of message `i` (0-based within the job).
    delay: Arc<DelayFn>,
    body_bytes: usize,
    concurrency: usize,
    /// Messages per second; `None` = as fast as the clients go.
    rate: Option<f64>,
    /// Where message `i` goes; `None` = `/v2/publish`, no extra headers.
    route: Option<Arc<RouteFn>>,
    /// `Some(n)`: `n` clients (instead of `concurrency`), client `k` publishing messages
    /// `k·count/n .. (k+1)·count/n` one after the other, in order (count a multiple of n).
    /// `None`: each client takes the next message.
    streams: Option<usize>,
}

#[derive(Clone, Copy, Default)]
struct Sent {
    id: usize,
    /// When the request was sent and its response received (ms since the clock's start).
    sent_ms: f64,
    done_ms: f64,
    ok: bool,
}

struct PublishRun {
    /// One per message of the job, in job order.
    results: Vec<Sent>,
    /// First send to last response.
    wall: Duration,
    errors: usize,
}

impl PublishRun {
    fn ok_count(&self) -> usize {
        self.results.iter().filter(|s| s.ok).count()
    }

    fn latencies(&self) -> Vec<f64> {
        self.results
            .iter()
            .filter(|s| s.ok)
            .map(|s| s.done_ms - s.sent_ms)
            .collect()
    }
}

impl Publisher {
    fn new(kstash: &Kstash, receiver: &Receiver, concurrency: usize) -> Result<Arc<Publisher>> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(concurrency + 4)
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(Arc::new(Publisher {
            http,
            base: kstash.base(),
            destination: format!("http://{}/hook", receiver.addr),
            token: kstash.token,
            clock: receiver.state.clock,
        }))
    }

    /// `POST <kstash><path>` with a JSON body; an error unless the answer is a success.
    async fn post_json(&self, path: &str, body: serde_json::Value) -> Result<()> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(self.token)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        if !r.status().is_success() {
            let status = r.status();
            bail!(
                "POST {path}: HTTP {status}: {}",
                r.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    async fn publish(self: &Arc<Self>, job: PublishJob) -> Result<PublishRun> {
        if let Some(n) = job.streams {
            if n == 0 || job.count % n != 0 {
                bail!(
                    "{}: {} messages do not split into {n} streams",
                    job.label,
                    job.count
                );
            }
        }
        let job = Arc::new(job);
        let next = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(AtomicUsize::new(0));
        let first_error: Arc<Mutex<Option<String>>> = Arc::default();
        let finished = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let padding = "x".repeat(job.body_bytes);

        let reporter = {
            let (done, errors, finished, job) =
                (done.clone(), errors.clone(), finished.clone(), job.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(PROGRESS_EVERY).await;
                    if finished.load(Ordering::Relaxed) {
                        break;
                    }
                    let n = done.load(Ordering::Relaxed);
                    progress(format!(
                        "{}: published {n}/{} ({:.0}/s), errors {}",
                        job.label,
                        job.count,
                        n as f64 / start.elapsed().as_secs_f64(),
                        errors.load(Ordering::Relaxed)
                    ));
                }
            })
        };

        let mut workers = Vec::new();
        let clients = job.streams.unwrap_or(job.concurrency).max(1);
        for worker in 0..clients {
            let (me, job, next, done, errors, first_error, padding) = (
                self.clone(),
                job.clone(),
                next.clone(),
                done.clone(),
                errors.clone(),
                first_error.clone(),
                padding.clone(),
            );
            workers.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                let mut taken = 0;
                loop {
                    let i = match job.streams {
                        Some(n) => {
                            let per = job.count / n;
                            if taken == per {
                                break;
                            }
                            taken += 1;
                            worker * per + taken - 1
                        }
                        None => next.fetch_add(1, Ordering::Relaxed),
                    };
                    if i >= job.count {
                        break;
                    }
                    if let Some(rate) = job.rate {
                        let at = start + Duration::from_secs_f64(i as f64 / rate);
                        tokio::time::sleep_until(at.into()).await;
                    }
                    let id = job.first_id + i;
                    let route = job.route.as_ref().map(|r| r(i));
                    let mut body = id.to_string();
                    body.push(' ');
                    if let Some(r) = route.as_ref().filter(|r| !r.tag.is_empty()) {
                        body.push_str(&r.tag);
                        body.push(' ');
                    }
                    body.push_str(&padding[..job.body_bytes.saturating_sub(body.len())]);
                    let api = route.as_ref().map_or("/v2/publish", |r| r.api.as_str());
                    let url = format!("{}{api}/{}", me.base, me.destination);
                    let mut request = me
                        .http
                        .post(url)
                        .bearer_auth(me.token)
                        .header("Content-Type", "text/plain")
                        .body(body);
                    for (name, value) in route.iter().flat_map(|r| r.headers.iter()) {
                        request = request.header(*name, value);
                    }
                    if let Some(d) = (job.delay)(i) {
                        request = request.header("Upstash-Delay", format!("{}ms", d.as_millis()));
                    }
                    let sent_ms = since(me.clock, Instant::now());
                    let result = request.send().await;
                    let done_ms = since(me.clock, Instant::now());
                    let ok = match result {
                        Ok(r) if r.status().is_success() => true,
                        Ok(r) => {
                            let status = r.status();
                            let text = r.text().await.unwrap_or_default();
                            note_error(&first_error, format!("HTTP {status}: {text}"))
                        }
                        Err(e) => note_error(&first_error, format!("{e:#}")),
                    };
                    if !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    mine.push((
                        i,
                        Sent {
                            id,
                            sent_ms,
                            done_ms,
                            ok,
                        },
                    ));
                }
                mine
            }));
        }
        let mut results = vec![Sent::default(); job.count];
        for w in workers {
            for (i, s) in w.await? {
                results[i] = s;
            }
        }
        let wall = start.elapsed();
        finished.store(true, Ordering::Relaxed);
        reporter.abort();
        let errors = errors.load(Ordering::Relaxed);
        progress(format!(
            "{}: published {}/{} in {:.1} s ({:.0}/s), errors {errors}",
            job.label,
            job.count - errors,
            job.count,
            wall.as_secs_f64(),
            (job.count - errors) as f64 / wall.as_secs_f64()
        ));
        if let Some(e) = first_error.lock().unwrap().take() {
            progress(format!("{}: first publish error: {e}", job.label));
        }
        Ok(PublishRun {
            results,
            wall,
            errors,
        })
    }
}

/// Remembers the first error; always false (the publish failed).
fn note_error(first: &Mutex<Option<String>>, e: String) -> bool {
    first.lock().unwrap().get_or_insert(e);
    false
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

struct Summary {
    min: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Summary {
    /// Nearest-rank percentiles; NaN for an empty sample.
    fn of(mut v: Vec<f64>) -> Summary {
        v.sort_by(f64::total_cmp);
        let pct = |p: f64| -> f64 {
            if v.is_empty() {
                return f64::NAN;
            }
            let rank = (p / 100.0 * v.len() as f64).ceil() as usize;
            v[rank.clamp(1, v.len()) - 1]
        };
        Summary {
            min: pct(0.0),
            p50: pct(50.0),
            p90: pct(90.0),
            p99: pct(99.0),
            max: pct(100.0),
        }
    }
}

/// (busy, steal, total) jiffies of the whole machine, from the first line of /proc/stat. Busy
/// includes steal (time the hypervisor gave to other guests).
fn machine_jiffies() -> Result<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let field = |i: usize| v.get(i).copied().unwrap_or(0);
    let total: u64 = (0..8).map(field).sum();
    Ok((total - field(3) - field(4), field(7), total))
}

/// CPU seconds of all processes named `java` (the Kafka broker in --mode serve).
fn java_cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "java")
        })
        .filter_map(|pid| process_cpu_seconds(&pid).ok())
        .sum()
}

/// CPU use over a measured phase: kstash, this tool, Java (the broker), everything else.
struct CpuMeter {
    kstash: f64,
    me: f64,
    java: f64,
    machine: (u64, u64, u64),
    start: Instant,
}

impl CpuMeter {
    fn start(kstash: &Kstash) -> Result<CpuMeter> {
        Ok(CpuMeter {
            kstash: kstash.cpu_seconds()?,
            me: process_cpu_seconds("self")?,
            java: java_cpu_seconds(),
            machine: machine_jiffies()?,
            start: Instant::now(),
        })
    }

    /// CPU seconds per party, and how busy the whole machine was.
    fn report(&self, kstash: &Kstash) -> Result<String> {
        let (busy, steal, total) = machine_jiffies()?;
        let busy_s = (busy - self.machine.0) as f64 / 100.0;
        let steal_s = (steal - self.machine.1) as f64 / 100.0;
        let busy_pct =
            100.0 * (busy - self.machine.0) as f64 / (total - self.machine.2).max(1) as f64;
        let kstash_s = kstash.cpu_seconds()? - self.kstash;
        let me = process_cpu_seconds("self")? - self.me;
        let java = java_cpu_seconds() - self.java;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(format!(
            "CPU over {:.1} s ({cores} cores = {:.1} core-s): kstash {kstash_s:.1} s, bench tool \
             {me:.1} s, java (broker) {java:.1} s, hypervisor steal {steal_s:.1} s, everything else \
             {:.1} s; machine {busy_pct:.0}% busy",
            self.start.elapsed().as_secs_f64(),
            self.start.elapsed().as_secs_f64() * cores as f64,
            (busy_s - kstash_s - me - java - steal_s).max(0.0),
        ))
    }
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.1}")
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn bytes_mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1024.0 * 1024.0))
}

/// `300ms`, `1500ms`, `3s`, `1h`.
fn fmt_delay(d: Duration) -> String {
    if d.subsec_millis() != 0 {
        format!("{}ms", d.as_millis())
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

fn list_durations(ds: &[Duration]) -> String {
    ds.iter()
        .map(|d| fmt_delay(*d))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line describing where the numbers come from.
fn environment(c: &Common, kstash: &Kstash) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let broker = match kstash.mode {
        Mode::Dev => "embedded librdkafka mock cluster (inside the kstash process)".to_string(),
        Mode::Serve => format!("Kafka broker at {}", c.brokers),
    };
    let profile = if c.bin.components().any(|p| p.as_os_str() == "release") {
        "release"
    } else {
        "see --bin"
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "Environment: {} UTC, load average {} at the end, {cores} cores (benchmark, kstash{} share them), `kstash {}` ({}, {profile} build), broker: {broker}, RUST_LOG={}, partitions: {}",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        load.join(" "),
        if kstash.mode == Mode::Serve { " and the broker" } else { "" },
        match kstash.mode {
            Mode::Dev => "dev",
            Mode::Serve => "serve",
        },
        c.bin.display(),
        c.rust_log,
        c.partitions
            .map_or("kstash defaults".to_string(), |p| p.to_string())
    )
}
