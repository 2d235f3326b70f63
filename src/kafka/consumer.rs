//! A consumer-group member that works on many records of a partition at once, keeps per-key order
//! where asked, and still commits correctly. Both pipeline stages run on it: delivery (the ready
//! topic) and the delay ladder. It knows nothing about HTTP, queues or delays: it hands records to
//! a [`RecordHandler`], which says which lane a record belongs to and how that lane may run.
//!
//! **Commits** (`offsets.rs`, `commit_metadata.rs`): the committed offset of a partition is its
//! lowest unfinished offset, and the offsets finished above it travel in the commit's metadata,
//! so after a restart or a rebalance the next owner skips them instead of delivering them again.
//! On assignment the committed offset and metadata are read back before the first record.
//!
//! **Lanes** (`lanes.rs`): a record with a lane waits in it; each lane has a dispatcher task that
//! starts its records in offset order under the lane's policy (parallelism, paused) and after the
//! handler's [gate](RecordHandler::gate) (shared limits such as a flow-control rate). A blocked lane
//! parks its records (they stay in Kafka and are re-read after a seek back), never the partition.
//! A record may finish with [`Done::Again`]: it is tried again later *in its place* (a FIFO queue
//! head retrying), its lane slot kept, no delivery slot held while it waits.
//!
//! **Bounds**: deliveries in flight are bounded by a semaphore (`max_in_flight`, reported as the
//! global parallelism). A record without a lane takes a slot before the next record is read; when
//! no slot frees up for a while, the consumer pauses its assignment and keeps polling (so the group
//! does not evict it for missing `max.poll.interval.ms`) instead of buffering records, and resumes
//! at half the bound. Lane records wait in bounded lane buffers.
//!
//! **Admission**: a handler may say a record is not to be worked on before some time (the delay
//! ladder's head of partition is not due). The consumer then pauses just that partition, seeks it
//! back to the record, and resumes it at that time: nothing is buffered while waiting. A record
//! that arrives for a paused partition (fetched before the pause took effect) is handed back the
//! same way; a partition is only ever sought back to a *lower* offset, so no record is skipped.
//!
//! **Rebalances**: on revoke, what finished is committed synchronously while the partition is still
//! ours; its lanes are dropped, and records still running for it finish without being committed
//! here (a lane record retrying in place stops: the next owner has it). Shutdown stops taking
//! records, waits up to the grace period for in-flight work, commits, and leaves the group.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Message, OwnedMessage};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::group::OffRuntime;
use super::lanes::{LaneId, LanePolicy, Lanes, Next, Pushed, Rewind};
use super::offsets::{Commit, OffsetState, OffsetTracker, Ticket};
use crate::model::now_ms;

/// How long to wait for a free in-flight permit before pausing the assignment.
const PAUSE_AFTER: Duration = Duration::from_secs(1);
/// Timeout of the seek that hands back a record or rewinds a partition.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a revocation waits for the attempts running on the revoked partitions to finish, so
/// their records are committed rather than worked on again (a duplicate) by the next owner. The
/// delay stage's last stretch (at most the smallest bucket, 1 s by default) fits in it.
const REVOKE_DRAIN: Duration = Duration::from_secs(3);
/// How often that wait looks.
const REVOKE_DRAIN_POLL: Duration = Duration::from_millis(5);
/// How soon a failed seek back is tried again (ms); the partition stays paused meanwhile.
const RESEEK_RETRY_MS: i64 = 1000;
/// Timeout of reading the committed offsets (and metadata) of newly assigned partitions.
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(10);
/// A waiting lane looks at its policy again at least this often (a missed change notification
/// costs at most this much delay).
const POLICY_RECHECK: Duration = Duration::from_secs(1);

/// Whether a record may be worked on now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Now,
    /// Not before this unix time (ms): pause the partition until then.
    NotBefore(i64),
}

/// How a handler left a record.
#[derive(Debug)]
pub enum Done {
    /// Delivered, or durably handed on: its offset may be committed.
    Finished,
    /// Not finished (shutting down): leave it uncommitted so it is read again.
    HandedBack,
    /// Try this record (its payload possibly changed) again at `at_ms`, keeping its place in its
    /// lane; it stays unfinished meanwhile.
    Again { at_ms: i64, record: OwnedMessage },
}

/// What a [`RecordHandler::gate`] hands out: held while the record runs (e.g. a flow-control
/// permit), released when its attempt ends.
pub struct Gate(#[allow(dead_code)] Option<Box<dyn Send + Sync>>);

impl Gate {
    /// No limit was taken.
    pub fn none() -> Self {
        Gate(None)
    }

    /// Holds `guard` for the length of the attempt.
    pub fn hold(guard: impl Send + Sync + 'static) -> Self {
        Gate(Some(Box::new(guard)))
    }
}

/// Works on records.
pub trait RecordHandler: Send + Sync + 'static {
    /// Whether `record` may be worked on now (called before it is taken).
    fn admit(&self, _record: &BorrowedMessage<'_>) -> Admission {
        Admission::Now
    }

    /// The lane `record` waits in (read off its key; no decoding): `None` starts it at once.
    fn lane(&self, _record: &BorrowedMessage<'_>) -> Option<String> {
        None
    }

    /// For a record without a lane of its own: the lane it waits in when the limits it shares
    /// (a destination's bound) have no room for it now; `None` when it has no such limits.
    fn spill_lane(&self, _record: &BorrowedMessage<'_>) -> Option<String> {
        None
    }

    /// For a record with a [spill lane](RecordHandler::spill_lane): those limits, taken at once
    /// (`None`: no room now, the record waits in its spill lane, whose
    /// [gate](RecordHandler::gate) waits for them). Not asked while the spill lane holds records
    /// (waiting, running or parked): they go first.
    fn try_gate(&self, _record: &BorrowedMessage<'_>) -> Option<Gate> {
        Some(Gate::none())
    }

    /// How lane `lane` may run now.
    fn policy(&self, _lane: &str) -> LanePolicy {
        LanePolicy::UNLIMITED
    }

    /// Waits until `record` may start (limits shared across lanes); the gate is held until the
    /// attempt ends. Awaited in lane order.
    fn gate(&self, _record: &OwnedMessage) -> impl Future<Output = Gate> + Send {
        std::future::ready(Gate::none())
    }

    /// Changes whenever lane policies may have changed.
    fn policy_changes(&self) -> Option<watch::Receiver<u64>> {
        None
    }

    /// Works on one record; completes when the record is finished, handed back, or to be tried
    /// again.
    fn handle(&self, record: OwnedMessage) -> impl Future<Output = Done> + Send;
}

/// Settings of a [`ParallelConsumer`].
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub topics: Vec<String>,
    /// Records worked on at once (the global parallelism of the process).
    pub max_in_flight: usize,
    pub commit_interval: Duration,
    pub shutdown_grace: Duration,
    /// Records one lane keeps in memory.
    pub lane_buffer: usize,
    /// Records all lanes keep in memory together.
    pub max_buffered: usize,
    /// Bytes of commit metadata for the offsets finished above the committed one.
    pub commit_metadata_max_bytes: usize,
}

type Tp = (String, i32);

/// Which partitions are paused and why, and where reading stands.
#[derive(Debug, Default)]
struct Pauses {
    /// The whole assignment is paused for lack of in-flight permits.
    all: bool,
    /// Partitions paused until a unix time (ms) because their head is not due.
    held: HashMap<Tp, i64>,
    /// Lowest offset each paused partition was sought back to.
    rewound: HashMap<Tp, i64>,
    /// The offset each partition reads next (one past the last record received, or where it was
    /// sought to): a lane rewind only seeks backwards from here.
    read_next: HashMap<Tp, i64>,
    /// One past the highest offset each partition has read (a rewind reads below it again).
    read_high: HashMap<Tp, i64>,
    /// Partitions whose seek back to a record failed, with that record's offset: they stay paused
    /// (held) until a seek there succeeds, since reading on would skip the record.
    reseek: HashMap<Tp, i64>,
}

impl Pauses {
    fn forget(&mut self, tp: &Tp) {
        self.held.remove(tp);
        self.rewound.remove(tp);
        self.read_next.remove(tp);
        self.read_high.remove(tp);
        self.reseek.remove(tp);
    }

    fn next_wake(&self) -> Option<i64> {
        self.held.values().min().copied()
    }

    /// The seek of paused partition `tp` back to `offset` failed: keep it paused and try again at
    /// `retry_at`.
    fn seek_failed(&mut self, tp: Tp, offset: i64, retry_at: i64) {
        let pending = self.reseek.entry(tp.clone()).or_insert(offset);
        *pending = (*pending).min(offset);
        let wake = self.held.entry(tp).or_insert(retry_at);
        *wake = (*wake).min(retry_at);
    }

    /// A seek of `tp` to `offset` succeeded: reading goes on from there.
    fn sought(&mut self, tp: Tp, offset: i64) {
        if self.reseek.get(&tp).is_some_and(|o| *o >= offset) {
            self.reseek.remove(&tp);
        }
        let rewound = self.rewound.entry(tp.clone()).or_insert(offset);
        *rewound = (*rewound).min(offset);
        self.read_next.insert(tp, offset);
    }

    /// Held partitions whose time has come at `now`, each with the offset it must first be
    /// sought back to (a seek that failed before), taken out of `held`.
    fn take_due(&mut self, now: i64) -> Vec<(Tp, Option<i64>)> {
        let due: Vec<Tp> = self
            .held
            .iter()
            .filter(|(_, wake)| **wake <= now)
            .map(|(tp, _)| tp.clone())
            .collect();
        due.into_iter()
            .map(|tp| {
                self.held.remove(&tp);
                let reseek = self.reseek.get(&tp).copied();
                (tp, reseek)
            })
            .collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks would be a bug in plain bookkeeping; the data is
    // still the best record of what happened, so keep using it rather than poisoning every
    // later commit.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A record in memory with its ticket.
#[derive(Debug)]
struct Held {
    record: OwnedMessage,
    ticket: Ticket,
}

/// The bookkeeping shared by the poll loop, the lane dispatchers, the record tasks and the
/// rebalance callbacks.
struct Books {
    tracker: Mutex<OffsetTracker>,
    pauses: Mutex<Pauses>,
    lanes: Mutex<Lanes<Held>>,
    /// Set once the consumer stops: the revocation that its close triggers then commits
    /// asynchronously (a synchronous commit from inside the close can wait for ever; what
    /// finished was committed just before, or is processed again by the next owner).
    closing: AtomicBool,
}

/// Marks the books closing when dropped: however `run` ends (returned, or its task dropped), the
/// flag is set before the consumer is closed.
struct ClosingOnDrop(Arc<Books>);

impl Drop for ClosingOnDrop {
    fn drop(&mut self) {
        self.0.closing.store(true, Ordering::SeqCst);
    }
}

/// Adds a commit (offset and, when there is any, metadata) to `tpl`.
fn add_commit(tpl: &mut TopicPartitionList, c: &Commit) {
    let _ = tpl.add_partition_offset(&c.topic, c.partition, Offset::Offset(c.offset));
    if !c.metadata.is_empty() {
        if let Some(mut elem) = tpl.find_partition(&c.topic, c.partition) {
            elem.set_metadata(&c.metadata);
        }
    }
}

/// Consumer context: keeps the offset tracker, pauses and lanes in step with assignments.
pub struct TrackingContext {
    books: Arc<Books>,
}

impl ClientContext for TrackingContext {}

impl ConsumerContext for TrackingContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        super::group::rebalance(self, consumer, err, tpl);
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let tps: Vec<Tp> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                {
                    // Nothing new starts on these partitions; what waited in their lanes goes
                    // (read again by the next owner).
                    let mut tracker = lock(&self.books.tracker);
                    let mut pauses = lock(&self.books.pauses);
                    let mut lanes = lock(&self.books.lanes);
                    for (topic, partition) in &tps {
                        tracker.revoking(topic, *partition);
                        pauses.forget(&(topic.clone(), *partition));
                        for held in lanes.revoke(topic, *partition) {
                            tracker.release(&held.ticket);
                        }
                    }
                }
                // Attempts running on them may finish first (bounded), so their records are
                // committed here instead of being worked on again by the next owner.
                if !self.books.closing.load(Ordering::SeqCst) {
                    drain_attempts(&self.books, &tps);
                }
                let mut commit = TopicPartitionList::new();
                {
                    let mut tracker = lock(&self.books.tracker);
                    for (topic, partition) in &tps {
                        if let Some(c) = tracker.revoke(topic, *partition) {
                            add_commit(&mut commit, &c);
                        }
                    }
                }
                tracing::info!(partitions = tpl.count(), "partitions revoked");
                if commit.count() > 0 {
                    let mode = if self.books.closing.load(Ordering::SeqCst) {
                        CommitMode::Async
                    } else {
                        CommitMode::Sync
                    };
                    if let Err(e) = consumer.commit(&commit, mode) {
                        tracing::warn!(error = %e, "commit on revoke failed; records since the last commit will be processed again");
                    }
                }
            }
            Rebalance::Assign(tpl) => {
                // Where the previous owner left off, and what it finished above that.
                let committed = match consumer.committed_offsets((*tpl).clone(), COMMITTED_TIMEOUT)
                {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read committed offsets; records finished above them may be processed again");
                        None
                    }
                };
                let mut tracker = lock(&self.books.tracker);
                let mut pauses = lock(&self.books.pauses);
                for elem in tpl.elements() {
                    let (topic, partition) = (elem.topic(), elem.partition());
                    pauses.forget(&(topic.to_string(), partition));
                    let found = committed
                        .as_ref()
                        .and_then(|c| c.find_partition(topic, partition))
                        .and_then(|e| match e.offset() {
                            Offset::Offset(o) => Some((o, e.metadata().to_string())),
                            _ => None,
                        });
                    tracing::debug!(topic, partition, committed = ?found, "assigned");
                    tracker.assign(
                        topic,
                        partition,
                        found.as_ref().map(|(o, m)| (*o, m.as_str())),
                    );
                }
                tracing::info!(partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // librdkafka keeps a partition's application pause across an unassign and a later assign
        // (only its own pause is reset), while the books forgot why it was paused: a partition
        // held until its head was due, revoked and assigned back, would never be resumed. So every
        // assigned partition starts resumed (or paused, while the whole assignment is).
        if let Rebalance::Assign(tpl) = rebalance {
            let all = lock(&self.books.pauses).all;
            let result = if all {
                consumer.pause(tpl)
            } else {
                consumer.resume(tpl)
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, paused = all, "could not reset the pause of assigned partitions");
            }
        }
    }
}

/// Waits up to [`REVOKE_DRAIN`] until no attempt runs on the partitions `tps`. Called from the
/// revoke callback, inside the poll of a runtime task: on a multi-thread runtime the wait
/// moves the worker's other tasks elsewhere (`block_in_place`), so the attempts it waits for go
/// on; on a single-thread runtime it cannot wait without stopping them, and does not.
fn drain_attempts(books: &Books, tps: &[Tp]) {
    let wait = || {
        let deadline = std::time::Instant::now() + REVOKE_DRAIN;
        loop {
            let running = lock(&books.tracker).running(tps);
            if running == 0 {
                return;
            }
            if std::time::Instant::now() >= deadline {
                tracing::debug!(
                    running,
                    "revoke: attempts still running are finished by the next owner too"
                );
                return;
            }
            std::thread::sleep(REVOKE_DRAIN_POLL);
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        Ok(_) => {}
        Err(_) => wait(),
    }
}

/// The consumer, closed off the runtime whenever it is dropped (see `group.rs`).
type Inner = OffRuntime<StreamConsumer<TrackingContext>>;

/// A group member consuming some topics with bounded parallelism, lanes and correct commits.
pub struct ParallelConsumer {
    consumer: Arc<Inner>,
    books: Arc<Books>,
    settings: ConsumerSettings,
    in_flight: Arc<AtomicUsize>,
}

/// What the record tasks and lane dispatchers of a running consumer share.
struct Runtime<H> {
    handler: Arc<H>,
    books: Arc<Books>,
    permits: Arc<Semaphore>,
    in_flight: Arc<AtomicUsize>,
    rewinds: mpsc::UnboundedSender<Rewind>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl ParallelConsumer {
    /// Creates the consumer from a client config (group id and commit settings already set) and
    /// subscribes to the topics.
    pub fn new(
        config: &rdkafka::ClientConfig,
        settings: ConsumerSettings,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let books = Arc::new(Books {
            tracker: Mutex::new(OffsetTracker::new(settings.commit_metadata_max_bytes)),
            pauses: Mutex::new(Pauses::default()),
            lanes: Mutex::new(Lanes::new(settings.lane_buffer, settings.max_buffered)),
            closing: AtomicBool::new(false),
        });
        let consumer: StreamConsumer<TrackingContext> =
            config.create_with_context(TrackingContext {
                books: books.clone(),
            })?;
        let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(ParallelConsumer {
            consumer: Arc::new(OffRuntime::new(consumer)),
            books,
            settings,
            in_flight: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Records being worked on right now (a gauge for the global-parallelism API).
    pub fn in_flight_gauge(&self) -> Arc<AtomicUsize> {
        self.in_flight.clone()
    }

    /// Keeps the in-flight count in `gauge` (one made before the consumer, e.g. for an API
    /// that starts first).
    pub fn with_in_flight_gauge(mut self, gauge: Arc<AtomicUsize>) -> Self {
        self.in_flight = gauge;
        self
    }

    /// Consumes until `shutdown`, then drains and commits.
    pub async fn run<H: RecordHandler>(self, handler: Arc<H>, shutdown: CancellationToken) {
        let closing = ClosingOnDrop(self.books.clone());
        let (rewind_tx, mut rewind_rx) = mpsc::unbounded_channel();
        let rt = Arc::new(Runtime {
            handler: handler.clone(),
            books: self.books.clone(),
            permits: Arc::new(Semaphore::new(self.settings.max_in_flight)),
            in_flight: self.in_flight.clone(),
            rewinds: rewind_tx,
            tasks: TaskTracker::new(),
            shutdown: shutdown.clone(),
        });
        let committer = tokio::spawn(commit_loop(
            self.consumer.clone(),
            self.books.clone(),
            self.settings.commit_interval,
            shutdown.clone(),
        ));
        if let Some(changes) = handler.policy_changes() {
            tokio::spawn(wake_lanes_on_change(
                self.books.clone(),
                changes,
                shutdown.clone(),
            ));
        }

        loop {
            let wake = lock(&self.books.pauses).next_wake();
            let until_wake = wake
                .map(|w| Duration::from_millis(u64::try_from(w - now_ms()).unwrap_or_default()));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(rewind) = rewind_rx.recv() => self.rewind(&rewind),
                _ = tokio::time::sleep(until_wake.unwrap_or_default()), if until_wake.is_some() => {
                    self.resume_due();
                }
                received = self.consumer.recv() => match received {
                    Ok(m) => {
                        if !self.take(&m, &rt).await {
                            break;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "kafka consumer error"),
                },
            }
        }

        rt.tasks.close();
        let in_flight = rt.tasks.len();
        tracing::info!(in_flight, "consumer stopping; draining in-flight work");
        if tokio::time::timeout(self.settings.shutdown_grace, rt.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                unfinished = lock(&self.books.tracker).held_count(),
                "shutdown grace elapsed; unfinished records are handed back uncommitted"
            );
        }
        let _ = committer.await;
        let consumer = self.consumer.clone();
        let books = self.books.clone();
        let _ = tokio::task::spawn_blocking(move || commit_due(&consumer, &books)).await;
        drop(closing);
        super::group::leave(self.consumer).await;
        tracing::info!("consumer stopped");
    }

    /// Takes one record read from Kafka: skip, hand back, start, or put in its lane. False on
    /// shutdown.
    async fn take<H: RecordHandler>(&self, m: &BorrowedMessage<'_>, rt: &Arc<Runtime<H>>) -> bool {
        let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
        let tp = (topic.to_string(), partition);
        {
            let mut pauses = lock(&self.books.pauses);
            if pauses.held.contains_key(&tp) {
                drop(pauses);
                self.hand_back(topic, partition, offset);
                return true;
            }
            pauses.read_next.insert(tp.clone(), offset + 1);
            let high = pauses.read_high.entry(tp.clone()).or_insert(offset + 1);
            *high = (*high).max(offset + 1);
        }
        match lock(&self.books.tracker).state(topic, partition, offset) {
            OffsetState::Pending => {}
            state => {
                tracing::trace!(
                    topic,
                    partition,
                    offset,
                    ?state,
                    "skipping a record already finished or in memory"
                );
                return true;
            }
        }
        if let Admission::NotBefore(wake) = rt.handler.admit(m) {
            lock(&self.books.pauses).held.insert(tp, wake);
            self.hand_back(topic, partition, offset);
            return true;
        }
        let lane = match rt.handler.lane(m) {
            Some(key) => Err(key),
            None => match rt.handler.spill_lane(m) {
                None => Ok(Gate::none()),
                Some(key) => {
                    let id = LaneId {
                        topic: topic.to_string(),
                        partition,
                        key,
                    };
                    // A spill lane that holds records keeps taking them (its parked records must
                    // come back through it); otherwise the record starts at once if it can.
                    let gate = if lock(&self.books.lanes).contains(&id) {
                        None
                    } else {
                        rt.handler.try_gate(m)
                    };
                    gate.ok_or(id.key)
                }
            },
        };
        match lane {
            Ok(gate) => {
                let Some(permit) = self.next_permit(&rt.permits, &rt.shutdown).await else {
                    // Not held: read again by whoever consumes the partition next.
                    return false;
                };
                let ticket = lock(&self.books.tracker).hold(topic, partition, offset);
                let task = run_record(
                    rt.clone(),
                    Held {
                        record: m.detach(),
                        ticket,
                    },
                    gate,
                    Some(permit),
                    None,
                );
                rt.tasks.spawn(task);
            }
            Err(key) => {
                let ticket = lock(&self.books.tracker).hold(topic, partition, offset);
                let id = LaneId {
                    topic: topic.to_string(),
                    partition,
                    key,
                };
                let held = Held {
                    record: m.detach(),
                    ticket,
                };
                let read_high = lock(&self.books.pauses)
                    .read_high
                    .get(&id_tp(&id))
                    .copied()
                    .unwrap_or(offset + 1);
                let pushed = lock(&self.books.lanes).push(&id, offset, held, read_high);
                match pushed {
                    Pushed::Queued {
                        start_dispatcher: Some(generation),
                        ..
                    } => {
                        rt.tasks.spawn(dispatch(rt.clone(), id, generation));
                    }
                    Pushed::Queued { notify, .. } => notify.notify_one(),
                    Pushed::Parked(held) => {
                        tracing::trace!(topic, partition, offset, lane = %id.key, "lane full; record parked in Kafka");
                        lock(&self.books.tracker).release(&held.ticket);
                        self.fast_forward(&id, offset);
                    }
                }
            }
        }
        true
    }

    /// A permit for the next record; `None` on shutdown.
    ///
    /// A short wait for a permit is normal under load and happens without pausing (pausing makes
    /// librdkafka discard what it prefetched). Only when no permit frees up within
    /// [`PAUSE_AFTER`] is the assignment paused, and it is resumed once half the permits are
    /// free again, so a saturated consumer does not flap between paused and fetching.
    async fn next_permit(
        &self,
        permits: &Arc<Semaphore>,
        shutdown: &CancellationToken,
    ) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = permits.clone().try_acquire_owned() {
            return Some(p);
        }
        tokio::select! {
            p = tokio::time::timeout(PAUSE_AFTER, permits.clone().acquire_owned()) => {
                if let Ok(Ok(p)) = p {
                    return Some(p);
                }
            }
            _ = shutdown.cancelled() => return None,
        }
        self.pause_all(true);
        let resume_at = u32::try_from((self.settings.max_in_flight / 2).max(1)).unwrap_or(u32::MAX);
        let freed = loop {
            tokio::select! {
                p = permits.clone().acquire_many_owned(resume_at) => break p.ok(),
                r = self.consumer.recv() => {
                    if let Ok(m) = r {
                        // Fetched before the pause took effect: read it again later.
                        self.hand_back(m.topic(), m.partition(), m.offset());
                    }
                }
                _ = shutdown.cancelled() => break None,
            }
        };
        self.pause_all(false);
        let freed = freed?;
        // Keep one of the freed permits; give the others back.
        let mut freed = freed;
        let one = freed.split(1);
        drop(freed);
        one
    }

    /// Pauses the record's partition and seeks it back to the record, unless it was already
    /// sought back to an earlier offset.
    fn hand_back(&self, topic: &str, partition: i32, offset: i64) {
        let tp = (topic.to_string(), partition);
        let mut pauses = lock(&self.books.pauses);
        if pauses.rewound.get(&tp).is_some_and(|o| *o <= offset) {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::warn!(error = %e, partition, "pause failed");
        }
        match self
            .consumer
            .seek(topic, partition, Offset::Offset(offset), SEEK_TIMEOUT)
        {
            Ok(()) => {
                pauses.rewound.insert(tp.clone(), offset);
                pauses.read_next.insert(tp, offset);
            }
            Err(e) => {
                // Reading on would skip the record: the partition stays paused until a seek
                // back to it succeeds (`resume_due` tries again).
                tracing::warn!(error = %e, topic, partition, offset, "seek back failed; the partition stays paused and the seek is retried");
                pauses.seek_failed(tp, offset, now_ms() + RESEEK_RETRY_MS);
            }
        }
    }

    /// After `lane` parked again at `offset` while re-reading, jumps the partition forward past
    /// what this pass would only read and drop again (see `lanes.rs`). Only an active partition:
    /// a paused one may have handed records back below the jump.
    fn fast_forward(&self, lane: &LaneId, offset: i64) {
        let tp = (lane.topic.clone(), lane.partition);
        let mut pauses = lock(&self.books.pauses);
        if pauses.all || pauses.held.contains_key(&tp) || pauses.rewound.contains_key(&tp) {
            return;
        }
        let Some(high) = pauses.read_high.get(&tp).copied() else {
            return;
        };
        let Some(target) = lock(&self.books.lanes).fast_forward_target(lane, offset, high) else {
            return;
        };
        match self.consumer.seek(
            &lane.topic,
            lane.partition,
            Offset::Offset(target),
            SEEK_TIMEOUT,
        ) {
            Ok(()) => {
                tracing::debug!(topic = %lane.topic, partition = lane.partition, from = offset, to = target, "parked lane: skipped ahead");
                pauses.read_next.insert(tp, target);
            }
            Err(e) => tracing::debug!(error = %e, "skip ahead failed; reading on"),
        }
    }

    /// Seeks a partition back so a parked lane takes its records again; only backwards from where
    /// reading stands (records not read yet will come anyway).
    fn rewind(&self, rewind: &Rewind) {
        let tp = (rewind.topic.clone(), rewind.partition);
        let mut pauses = lock(&self.books.pauses);
        let Some(read_next) = pauses.read_next.get(&tp).copied() else {
            return; // not ours any more, or nothing read yet
        };
        if rewind.offset >= read_next {
            return;
        }
        match self.consumer.seek(
            &rewind.topic,
            rewind.partition,
            Offset::Offset(rewind.offset),
            SEEK_TIMEOUT,
        ) {
            Ok(()) => {
                tracing::debug!(topic = %rewind.topic, partition = rewind.partition, offset = rewind.offset, "rewound for a parked lane");
                pauses.read_next.insert(tp.clone(), rewind.offset);
                if let Some(r) = pauses.rewound.get_mut(&tp) {
                    *r = (*r).min(rewind.offset);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, topic = %rewind.topic, partition = rewind.partition, "rewind failed; will ask again");
                drop(pauses);
                lock(&self.books.lanes).rewind_failed(&rewind.topic, rewind.partition);
            }
        }
    }

    /// Resumes held partitions whose time has come (unless everything is paused); one whose
    /// seek back failed is first sought again, and stays paused if that fails too.
    fn resume_due(&self) {
        let now = now_ms();
        let mut pauses = lock(&self.books.pauses);
        let mut tpl = TopicPartitionList::new();
        for (tp, reseek) in pauses.take_due(now) {
            if let Some(offset) = reseek {
                match self
                    .consumer
                    .seek(&tp.0, tp.1, Offset::Offset(offset), SEEK_TIMEOUT)
                {
                    Ok(()) => {
                        tracing::info!(topic = %tp.0, partition = tp.1, offset, "seek back succeeded on a retry");
                        pauses.sought(tp.clone(), offset);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, topic = %tp.0, partition = tp.1, offset, "seek back failed again; retrying");
                        pauses.seek_failed(tp, offset, now + RESEEK_RETRY_MS);
                        continue;
                    }
                }
            }
            if !pauses.all {
                pauses.rewound.remove(&tp);
                tpl.add_partition(&tp.0, tp.1);
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.resume(&tpl) {
                tracing::debug!(error = %e, "resume failed (partition revoked?)");
            }
        }
    }

    /// Pauses or resumes the whole assignment; resuming leaves held partitions paused.
    fn pause_all(&self, paused: bool) {
        let assignment = match self.consumer.assignment() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read assignment");
                return;
            }
        };
        let mut pauses = lock(&self.books.pauses);
        pauses.all = paused;
        let result = if paused {
            self.consumer.pause(&assignment)
        } else {
            let mut tpl = TopicPartitionList::new();
            for elem in assignment.elements() {
                let tp = (elem.topic().to_string(), elem.partition());
                if !pauses.held.contains_key(&tp) {
                    pauses.rewound.remove(&tp);
                    tpl.add_partition(elem.topic(), elem.partition());
                }
            }
            self.consumer.resume(&tpl)
        };
        match result {
            Ok(()) => tracing::debug!(paused, partitions = assignment.count(), "in-flight bound"),
            Err(e) => tracing::warn!(error = %e, paused, "pause/resume failed"),
        }
    }
}

fn id_tp(id: &LaneId) -> Tp {
    (id.topic.clone(), id.partition)
}

/// The dispatcher of one lane: starts its records in order under its policy and gate, until the
/// lane is empty (or gone).
async fn dispatch<H: RecordHandler>(rt: Arc<Runtime<H>>, id: LaneId, generation: u64) {
    loop {
        let policy = rt.handler.policy(&id.key);
        let (next, shed, rewind) = lock(&rt.books.lanes).next(&id, generation, policy);
        if !shed.is_empty() {
            let mut tracker = lock(&rt.books.tracker);
            for held in &shed {
                tracker.release(&held.ticket);
            }
            tracing::debug!(lane = %id.key, records = shed.len(), "lane paused; its records wait in Kafka");
        }
        if let Some(rewind) = rewind {
            let _ = rt.rewinds.send(rewind);
        }
        match next {
            Next::Exit => return,
            Next::Wait(notify) => {
                tokio::select! {
                    _ = notify.notified() => {}
                    _ = tokio::time::sleep(POLICY_RECHECK) => {}
                    _ = rt.shutdown.cancelled() => return,
                }
            }
            Next::Start { offset, item } => {
                let gate = tokio::select! {
                    gate = rt.handler.gate(&item.record) => gate,
                    _ = rt.shutdown.cancelled() => {
                        lock(&rt.books.lanes).unstart(&id, generation, offset, item);
                        return;
                    }
                };
                let task = run_record(rt.clone(), item, gate, None, Some((id.clone(), generation)));
                rt.tasks.spawn(task);
            }
        }
    }
}

/// Works on one record until it is finished or handed back; a lane record asking to be tried
/// again waits (holding its lane slot, not a delivery slot) and is tried again in place.
async fn run_record<H: RecordHandler>(
    rt: Arc<Runtime<H>>,
    held: Held,
    mut gate: Gate,
    mut permit: Option<OwnedSemaphorePermit>,
    lane: Option<(LaneId, u64)>,
) {
    let Held { mut record, ticket } = held;
    loop {
        if lane.is_some() && !lock(&rt.books.tracker).is_current(&ticket) {
            // The partition was revoked while this record waited (at its gate, for a slot, or
            // to be tried again): its next owner has it, and starting it here could put it after
            // a later record of its lane.
            break;
        }
        let slot = match permit.take() {
            Some(p) => p,
            None => tokio::select! {
                p = rt.permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = rt.shutdown.cancelled() => break,
            },
        };
        if !lock(&rt.books.tracker).attempt_starts(&ticket) {
            // Its partition is being (or was) revoked: the next owner has the record.
            break;
        }
        rt.in_flight.fetch_add(1, Ordering::Relaxed);
        let done = rt.handler.handle(record).await;
        rt.in_flight.fetch_sub(1, Ordering::Relaxed);
        drop(slot);
        {
            let mut tracker = lock(&rt.books.tracker);
            tracker.attempt_ended(&ticket);
            if matches!(done, Done::Finished) {
                tracker.finish(&ticket);
            }
        }
        match done {
            Done::Finished | Done::HandedBack => break,
            Done::Again {
                at_ms,
                record: again,
            } => {
                drop(std::mem::replace(&mut gate, Gate::none()));
                let wait = Duration::from_millis(u64::try_from(at_ms - now_ms()).unwrap_or(0));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = rt.shutdown.cancelled() => break,
                }
                // A lane paused meanwhile (a paused queue) makes no further attempts either.
                if let Some((id, _)) = &lane {
                    while rt.handler.policy(&id.key).paused {
                        tokio::select! {
                            _ = tokio::time::sleep(POLICY_RECHECK) => {}
                            _ = rt.shutdown.cancelled() => break,
                        }
                    }
                    if rt.shutdown.is_cancelled() {
                        break;
                    }
                }
                gate = tokio::select! {
                    g = rt.handler.gate(&again) => g,
                    _ = rt.shutdown.cancelled() => break,
                };
                record = again;
            }
        }
    }
    drop(gate);
    if let Some((id, generation)) = lane {
        let rewind = lock(&rt.books.lanes).finished(&id, generation);
        if let Some(rewind) = rewind {
            let _ = rt.rewinds.send(rewind);
        }
    }
    // Room freed in the lanes may let parked lanes elsewhere come back.
    let due = lock(&rt.books.lanes).rewinds_due();
    for rewind in due {
        let _ = rt.rewinds.send(rewind);
    }
}

/// Wakes every lane dispatcher when lane policies change (a queue paused or resumed, a
/// parallelism changed), so a change takes effect at once.
async fn wake_lanes_on_change(
    books: Arc<Books>,
    mut changes: watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                lock(&books.lanes).wake_all();
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Commits finished positions every `interval` until `shutdown`.
async fn commit_loop(
    consumer: Arc<Inner>,
    books: Arc<Books>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let (c, b) = (consumer.clone(), books.clone());
        let _ = tokio::task::spawn_blocking(move || commit_due(&c, &b)).await;
    }
}

/// Synchronously commits every position (and metadata) that moved; blocking, so run it off the
/// async threads.
fn commit_due(consumer: &Inner, books: &Books) {
    let due = lock(&books.tracker).due_commits();
    if due.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for c in &due {
        add_commit(&mut tpl, c);
    }
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => {
            let mut t = lock(&books.tracker);
            for c in &due {
                t.committed(&c.topic, c.partition, c.offset, &c.metadata);
                tracing::trace!(topic = %c.topic, partition = c.partition, offset = c.offset, metadata = %c.metadata, "committed");
            }
        }
        Err(e) => tracing::warn!(error = %e, "offset commit failed; will retry"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> Tp {
        ("t".to_string(), p)
    }

    #[test]
    fn a_partition_whose_seek_back_failed_is_not_resumed_before_a_seek_succeeds() {
        let mut pauses = Pauses::default();
        // Held for its head (not due until 5000); the seek back to offset 7 failed at 1000.
        pauses.held.insert(tp(0), 5_000);
        pauses.seek_failed(tp(0), 7, 2_000);
        assert_eq!(pauses.next_wake(), Some(2_000), "woken for the retry");
        assert!(pauses.take_due(1_999).is_empty());
        // Due for the retry: it must be sought back to 7 before it may read again.
        assert_eq!(pauses.take_due(2_000), vec![(tp(0), Some(7))]);
        // The retry fails too: still paused, still owed the seek.
        pauses.seek_failed(tp(0), 7, 3_000);
        assert_eq!(pauses.take_due(3_000), vec![(tp(0), Some(7))]);
        // It succeeds: reading goes on from 7, nothing is owed any more.
        pauses.sought(tp(0), 7);
        assert_eq!(pauses.read_next.get(&tp(0)), Some(&7));
        pauses.held.insert(tp(0), 4_000);
        assert_eq!(pauses.take_due(4_000), vec![(tp(0), None)]);
    }

    #[test]
    fn a_failed_seek_keeps_the_lowest_offset_owed() {
        let mut pauses = Pauses::default();
        pauses.seek_failed(tp(1), 9, 100);
        pauses.seek_failed(tp(1), 4, 300);
        assert_eq!(pauses.held.get(&tp(1)), Some(&100), "the earliest retry");
        assert_eq!(pauses.take_due(100), vec![(tp(1), Some(4))]);
        // A seek to a higher offset than owed does not settle the debt.
        pauses.sought(tp(1), 9);
        assert_eq!(pauses.reseek.get(&tp(1)), Some(&4));
        pauses.forget(&tp(1));
        assert!(pauses.reseek.is_empty() && pauses.held.is_empty());
    }
}
