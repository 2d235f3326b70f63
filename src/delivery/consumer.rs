//! A consumer-group member that works on many records of a partition at once and still commits
//! correctly: the committed offset of a partition is its lowest unfinished offset
//! ([`OffsetTracker`]).
//!
//! Flow control: a semaphore permit is taken *before* the next record is taken from librdkafka, so
//! in-flight work is bounded. When no permit frees up for a while, the consumer pauses its
//! assignment and keeps polling (so the group does not evict it for missing
//! `max.poll.interval.ms`) instead of buffering records; a record that still arrives while paused
//! is sought back and re-read later. (librdkafka's own prefetch queue is bounded separately by
//! `queued.max.messages.kbytes`, settable through `kafka.librdkafka`.)
//!
//! Rebalances: on revoke, what finished is committed synchronously while the partition is still
//! ours; records still in flight for it are finished by their tasks but no longer committed here
//! (the next owner re-reads them: at-least-once). Shutdown stops taking records, waits up to the
//! grace period for in-flight work, commits, and leaves the group.
//!
//! The consumer knows nothing about HTTP: it hands each record to a [`RecordHandler`], which
//! returns only when the record is finished.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::offsets::OffsetTracker;

/// How long to wait for a free in-flight permit before pausing the assignment.
const PAUSE_AFTER: Duration = Duration::from_secs(1);
/// Timeout of the seek that hands back a record received while paused.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// Works on one record; the returned future completes when the record is finished.
pub trait RecordHandler: Send + Sync + 'static {
    fn handle(&self, record: OwnedMessage) -> impl Future<Output = ()> + Send;
}

/// Settings of a [`ParallelConsumer`].
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub topic: String,
    pub max_in_flight: usize,
    pub commit_interval: Duration,
    pub shutdown_grace: Duration,
}

fn lock(tracker: &Mutex<OffsetTracker>) -> MutexGuard<'_, OffsetTracker> {
    // A panic while holding this lock would be a bug in the tracker; its data is still the best
    // record of what finished, so keep using it rather than poisoning every later commit.
    tracker.lock().unwrap_or_else(|p| p.into_inner())
}

/// Consumer context: keeps the offset tracker in step with assignments.
pub struct TrackingContext {
    tracker: Arc<Mutex<OffsetTracker>>,
}

impl ClientContext for TrackingContext {}

impl ConsumerContext for TrackingContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let mut commit = TopicPartitionList::new();
                {
                    let mut tracker = lock(&self.tracker);
                    for elem in tpl.elements() {
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
                        tracing::warn!(error = %e, "commit on revoke failed; records since the last commit will be delivered again");
                    }
                }
            }
            Rebalance::Assign(tpl) => {
                let mut tracker = lock(&self.tracker);
                for elem in tpl.elements() {
                    tracker.assign(elem.topic(), elem.partition());
                }
                tracing::info!(partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

type Inner = StreamConsumer<TrackingContext>;

/// A group member consuming one topic with bounded parallelism and correct commits.
pub struct ParallelConsumer {
    consumer: Arc<Inner>,
    tracker: Arc<Mutex<OffsetTracker>>,
    settings: ConsumerSettings,
}

impl ParallelConsumer {
    /// Creates the consumer from a client config (group id and commit settings already set) and
    /// subscribes to the topic.
    pub fn new(
        config: &rdkafka::ClientConfig,
        settings: ConsumerSettings,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
        let consumer: Inner = config.create_with_context(TrackingContext {
            tracker: tracker.clone(),
        })?;
        consumer.subscribe(&[&settings.topic])?;
        Ok(ParallelConsumer {
            consumer: Arc::new(consumer),
            tracker,
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

        loop {
            let Some(permit) = self.next_permit(&permits, &shutdown).await else {
                break;
            };
            let received = tokio::select! {
                r = self.consumer.recv() => r,
                _ = shutdown.cancelled() => break,
            };
            let record = match received {
                Ok(m) => m.detach(),
                Err(e) => {
                    tracing::warn!(error = %e, topic = %self.settings.topic, "consumer error");
                    continue;
                }
            };
            let ticket =
                lock(&self.tracker).start(record.topic(), record.partition(), record.offset());
            let (handler, tracker) = (handler.clone(), self.tracker.clone());
            tasks.spawn(async move {
                handler.handle(record).await;
                lock(&tracker).finish(&ticket);
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
        self.set_paused(true);
        let resume_at = u32::try_from((self.settings.max_in_flight / 2).max(1)).unwrap_or(u32::MAX);
        let freed = loop {
            tokio::select! {
                p = permits.clone().acquire_many_owned(resume_at) => break p.ok(),
                r = self.consumer.recv() => {
                    if let Ok(m) = r {
                        // Fetched before the pause took effect: put it back, read it again later.
                        if let Err(e) = self.consumer.seek(m.topic(), m.partition(), Offset::Offset(m.offset()), SEEK_TIMEOUT) {
                            tracing::warn!(error = %e, partition = m.partition(), offset = m.offset(), "seek back while paused failed");
                        }
                    }
                }
                _ = shutdown.cancelled() => break None,
            }
        };
        self.set_paused(false);
        // This loop is the only place permits are taken, so after giving the freed ones back,
        // one is certainly available.
        drop(freed?);
        permits.clone().try_acquire_owned().ok()
    }

    fn set_paused(&self, paused: bool) {
        let assignment = match self.consumer.assignment() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read assignment");
                return;
            }
        };
        let result = if paused {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
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
