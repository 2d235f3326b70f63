//! A consumer-group member that works on many records of a partition at once and still commits
//! correctly: the committed offset of a partition is its lowest unfinished offset
//! ([`OffsetTracker`]). Both pipeline stages run on it: delivery (the ready topic) and the delay
//! ladder.
//!
//! Flow control: a semaphore permit is taken *before* the next record is taken from librdkafka, so
//! in-flight work is bounded. When no permit frees up for a while, the consumer pauses its
//! assignment and keeps polling (so the group does not evict it for missing
//! `max.poll.interval.ms`) instead of buffering records. (librdkafka's own prefetch queue is
//! bounded separately by `queued.max.messages.kbytes`, settable through `kafka.librdkafka`.)
//!
//! Admission: a handler may say a record is not to be worked on before some time (the delay
//! ladder's head of partition is not due). The consumer then pauses just that partition, seeks it
//! back to the record, and resumes it at that time: nothing is buffered while waiting. A record
//! that arrives for a paused partition (fetched before the pause took effect) is handed back the
//! same way; a partition is only ever sought back to a *lower* offset, so no record is skipped.
//!
//! Rebalances: on revoke, what finished is committed synchronously while the partition is still
//! ours; records still in flight for it are finished by their tasks but no longer committed here
//! (the next owner re-reads them: at-least-once). Shutdown stops taking records, waits up to the
//! grace period for in-flight work, commits, and leaves the group.
//!
//! The consumer knows nothing about HTTP or delays: it hands records to a [`RecordHandler`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Message, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::offsets::OffsetTracker;
use crate::model::now_ms;

/// How long to wait for a free in-flight permit before pausing the assignment.
const PAUSE_AFTER: Duration = Duration::from_secs(1);
/// Timeout of the seek that hands back a record.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a record may be worked on now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Now,
    /// Not before this unix time (ms): pause the partition until then.
    NotBefore(i64),
}

/// How a handler left a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// Delivered, or durably handed on: its offset may be committed.
    Finished,
    /// Not finished (shutting down, Kafka unavailable): leave it uncommitted so it is read again.
    HandedBack,
}

/// Works on records.
pub trait RecordHandler: Send + Sync + 'static {
    /// Whether `record` may be worked on now (called before it is taken).
    fn admit(&self, _record: &BorrowedMessage<'_>) -> Admission {
        Admission::Now
    }

    /// Works on one record; completes when the record is finished or handed back.
    fn handle(&self, record: OwnedMessage) -> impl Future<Output = Done> + Send;
}

/// Settings of a [`ParallelConsumer`].
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub topics: Vec<String>,
    pub max_in_flight: usize,
    pub commit_interval: Duration,
    pub shutdown_grace: Duration,
}

type Tp = (String, i32);

/// Which partitions are paused and why.
#[derive(Debug, Default)]
struct Pauses {
    /// The whole assignment is paused for lack of in-flight permits.
    all: bool,
    /// Partitions paused until a unix time (ms) because their head is not due.
    held: HashMap<Tp, i64>,
    /// Lowest offset each paused partition was sought back to.
    rewound: HashMap<Tp, i64>,
}

impl Pauses {
    fn forget(&mut self, tp: &Tp) {
        self.held.remove(tp);
        self.rewound.remove(tp);
    }

    fn next_wake(&self) -> Option<i64> {
        self.held.values().min().copied()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks would be a bug in plain bookkeeping; the data is
    // still the best record of what happened, so keep using it rather than poisoning every
    // later commit.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Consumer context: keeps the offset tracker and pause state in step with assignments.
pub struct TrackingContext {
    tracker: Arc<Mutex<OffsetTracker>>,
    pauses: Arc<Mutex<Pauses>>,
}

impl ClientContext for TrackingContext {}

impl ConsumerContext for TrackingContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let mut commit = TopicPartitionList::new();
                {
                    let mut tracker = lock(&self.tracker);
                    let mut pauses = lock(&self.pauses);
                    for elem in tpl.elements() {
                        pauses.forget(&(elem.topic().to_string(), elem.partition()));
                        if let Some(position) = tracker.revoke(elem.topic(), elem.partition()) {
                            let _ = commit.add_partition_offset(
                                elem.topic(),
                                elem.partition(),
                                Offset::Offset(position),
                            );
                        }
                    }
                }
                tracing::info!(partitions = tpl.count(), "partitions revoked");
                if commit.count() > 0 {
                    if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
                        tracing::warn!(error = %e, "commit on revoke failed; records since the last commit will be processed again");
                    }
                }
            }
            Rebalance::Assign(tpl) => {
                let mut tracker = lock(&self.tracker);
                let mut pauses = lock(&self.pauses);
                for elem in tpl.elements() {
                    pauses.forget(&(elem.topic().to_string(), elem.partition()));
                    tracker.assign(elem.topic(), elem.partition());
                }
                tracing::info!(partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

type Inner = StreamConsumer<TrackingContext>;

/// A group member consuming some topics with bounded parallelism and correct commits.
pub struct ParallelConsumer {
    consumer: Arc<Inner>,
    tracker: Arc<Mutex<OffsetTracker>>,
    pauses: Arc<Mutex<Pauses>>,
    settings: ConsumerSettings,
}

impl ParallelConsumer {
    /// Creates the consumer from a client config (group id and commit settings already set) and
    /// subscribes to the topics.
    pub fn new(
        config: &rdkafka::ClientConfig,
        settings: ConsumerSettings,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
        let pauses = Arc::new(Mutex::new(Pauses::default()));
        let consumer: Inner = config.create_with_context(TrackingContext {
            tracker: tracker.clone(),
            pauses: pauses.clone(),
        })?;
        let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(ParallelConsumer {
            consumer: Arc::new(consumer),
            tracker,
            pauses,
            settings,
        })
    }

    /// Consumes until `shutdown`, then drains and commits.
    pub async fn run<H: RecordHandler>(self, handler: Arc<H>, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(self.settings.max_in_flight));
        let tasks = TaskTracker::new();
        let committer = tokio::spawn(commit_loop(
            self.consumer.clone(),
            self.tracker.clone(),
            self.settings.commit_interval,
            shutdown.clone(),
        ));

        'records: loop {
            let Some(permit) = self.next_permit(&permits, &shutdown).await else {
                break;
            };
            let record = loop {
                let wake = lock(&self.pauses).next_wake();
                let until_wake = wake.map(|w| {
                    Duration::from_millis(u64::try_from(w - now_ms()).unwrap_or_default())
                });
                tokio::select! {
                    received = self.consumer.recv() => match received {
                        Ok(m) => {
                            let tp = (m.topic().to_string(), m.partition());
                            if lock(&self.pauses).held.contains_key(&tp) {
                                self.hand_back(&m);
                                continue;
                            }
                            match handler.admit(&m) {
                                Admission::Now => break m.detach(),
                                Admission::NotBefore(at) => {
                                    self.hand_back(&m);
                                    lock(&self.pauses).held.insert(tp, at);
                                    tracing::trace!(topic = m.topic(), partition = m.partition(), offset = m.offset(), wake = at, "partition held until its head is due");
                                }
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "consumer error"),
                    },
                    _ = tokio::time::sleep(until_wake.unwrap_or_default()), if until_wake.is_some() => {
                        self.resume_due();
                    }
                    _ = shutdown.cancelled() => break 'records,
                }
            };
            let ticket =
                lock(&self.tracker).start(record.topic(), record.partition(), record.offset());
            let (handler, tracker) = (handler.clone(), self.tracker.clone());
            tasks.spawn(async move {
                if handler.handle(record).await == Done::Finished {
                    lock(&tracker).finish(&ticket);
                }
                drop(permit);
            });
        }

        tasks.close();
        let in_flight = tasks.len();
        tracing::info!(in_flight, "consumer stopping; draining in-flight work");
        if tokio::time::timeout(self.settings.shutdown_grace, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                unfinished = lock(&self.tracker).in_flight(),
                "shutdown grace elapsed; unfinished records are handed back uncommitted"
            );
        }
        let _ = committer.await;
        let consumer = self.consumer.clone();
        let tracker = self.tracker.clone();
        let _ = tokio::task::spawn_blocking(move || commit_due(&consumer, &tracker)).await;
        self.consumer.unsubscribe();
        tracing::info!("consumer stopped");
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
                        self.hand_back(&m);
                    }
                }
                _ = shutdown.cancelled() => break None,
            }
        };
        self.pause_all(false);
        // This loop is the only place permits are taken, so after giving the freed ones back,
        // one is certainly available.
        drop(freed?);
        permits.clone().try_acquire_owned().ok()
    }

    /// Pauses the record's partition and seeks it back to the record, unless it was already
    /// sought back to an earlier offset.
    fn hand_back(&self, m: &BorrowedMessage<'_>) {
        let tp = (m.topic().to_string(), m.partition());
        let mut pauses = lock(&self.pauses);
        if pauses.rewound.get(&tp).is_some_and(|o| *o <= m.offset()) {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(m.topic(), m.partition());
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::warn!(error = %e, partition = m.partition(), "pause failed");
        }
        match self.consumer.seek(
            m.topic(),
            m.partition(),
            Offset::Offset(m.offset()),
            SEEK_TIMEOUT,
        ) {
            Ok(()) => {
                pauses.rewound.insert(tp, m.offset());
            }
            Err(e) => {
                // Without the seek the record would be skipped: fail loudly. It stays
                // uncommitted (never started), so it is read again after a restart.
                tracing::error!(error = %e, topic = m.topic(), partition = m.partition(), offset = m.offset(), "seek back failed");
            }
        }
    }

    /// Resumes held partitions whose time has come (unless everything is paused).
    fn resume_due(&self) {
        let now = now_ms();
        let mut pauses = lock(&self.pauses);
        let due: Vec<Tp> = pauses
            .held
            .iter()
            .filter(|(_, wake)| **wake <= now)
            .map(|(tp, _)| tp.clone())
            .collect();
        let mut tpl = TopicPartitionList::new();
        for tp in &due {
            pauses.held.remove(tp);
            if !pauses.all {
                pauses.rewound.remove(tp);
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
        let mut pauses = lock(&self.pauses);
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

/// Commits finished positions every `interval` until `shutdown`.
async fn commit_loop(
    consumer: Arc<Inner>,
    tracker: Arc<Mutex<OffsetTracker>>,
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
        let (c, t) = (consumer.clone(), tracker.clone());
        let _ = tokio::task::spawn_blocking(move || commit_due(&c, &t)).await;
    }
}

/// Synchronously commits every position that moved; blocking, so run it off the async threads.
fn commit_due(consumer: &Inner, tracker: &Mutex<OffsetTracker>) {
    let due = lock(tracker).due_commits();
    if due.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, position) in &due {
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*position));
    }
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => {
            let mut t = lock(tracker);
            for (topic, partition, position) in &due {
                t.committed(topic, *partition, *position);
                tracing::trace!(topic = %topic, partition, offset = position, "committed");
            }
        }
        Err(e) => tracing::warn!(error = %e, "offset commit failed; will retry"),
    }
}
