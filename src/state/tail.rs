//! Tails the state-bearing topics (every [`Kind`]) into the process's [`Views`].
//!
//! One plain consumer per process, assigned every partition of those topics from the beginning
//! (no consumer group: every process needs everything). Records are applied in batches, one store
//! transaction each; a batch the store could not take is applied again (after a pause) rather
//! than dropped, so a view never silently misses a cancel. At start-up the tailer notes each
//! partition's end offset; it is *caught up* once it has applied everything before those offsets
//! (its read position has reached them), and the API serves only after that. It runs on a blocking thread until shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Kind, Views};
use crate::config::KafkaConfig;
use crate::health::Health;
use crate::kafka::{create_client, Role, SetupError};

/// How long one poll waits for records.
const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// Records applied per store transaction at most.
const BATCH_MAX: usize = 1000;
/// Timeout of metadata and watermark look-ups at start-up.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Wait between retries of a failed start-up query.
const RETRY_INTERVAL: Duration = Duration::from_millis(100);
/// Progress is logged this often while catching up.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Wait before a batch the store refused is applied again.
const STORE_RETRY: Duration = Duration::from_millis(500);

/// Starts tailing `topics` into `views`; the returned channel turns `true` once caught up.
pub fn start(
    kafka: &KafkaConfig,
    topics: Vec<(String, Kind)>,
    views: Arc<Views>,
    health: Health,
    shutdown: CancellationToken,
) -> Result<watch::Receiver<bool>, SetupError> {
    let mut config = kafka.clone();
    // Never used to commit; librdkafka wants a group id for a consumer all the same.
    config.group_id = format!("{}-state-tail", kafka.group_id);
    let consumer: BaseConsumer = create_client(&config, Role::Consumer)?;
    let mut assignment = TopicPartitionList::new();
    let mut remaining: HashMap<(String, i32), i64> = HashMap::new();
    let kinds: HashMap<String, Kind> = topics.iter().cloned().collect();
    // Views kept on disk resume where an earlier run with the same store left them.
    let stored = views
        .store
        .positions()
        .map_err(|e| SetupError::Topics(format!("state store: {e}")))?;
    let mut resumed = 0usize;
    for (topic, kind) in &topics {
        let metadata = retrying(|| consumer.fetch_metadata(Some(topic), QUERY_TIMEOUT))?;
        let partitions = metadata
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or_default();
        for p in 0..i32::try_from(partitions).unwrap_or_default() {
            let from = kind
                .in_store()
                .then(|| stored.get(&(topic.clone(), p)).copied())
                .flatten();
            let (low, high) = retrying(|| consumer.fetch_watermarks(topic, p, QUERY_TIMEOUT))?;
            match from {
                // Records below the low watermark are gone; reading resumes at what is left.
                Some(next) => {
                    resumed += 1;
                    assignment.add_partition_offset(topic, p, Offset::Offset(next.max(low)))?;
                    if high > next.max(low) {
                        remaining.insert((topic.clone(), p), high);
                    }
                }
                None => {
                    assignment.add_partition_offset(topic, p, Offset::Beginning)?;
                    if high > low {
                        remaining.insert((topic.clone(), p), high);
                    }
                }
            }
        }
    }
    consumer.assign(&assignment)?;
    if resumed > 0 {
        tracing::info!(
            partitions = resumed,
            "state views resume from the store's positions"
        );
    }
    let (tx, rx) = watch::channel(remaining.is_empty());
    if remaining.is_empty() {
        health.caught_up(0);
    } else {
        health.catching_up(0, remaining.len());
    }
    tokio::task::spawn_blocking(move || {
        run(consumer, kinds, remaining, views, tx, health, shutdown)
    });
    Ok(rx)
}

/// Retries a start-up query on transient errors (a leader election right after topic creation)
/// until it succeeds or [`QUERY_TIMEOUT`] has passed.
fn retrying<T>(
    mut query: impl FnMut() -> Result<T, rdkafka::error::KafkaError>,
) -> Result<T, rdkafka::error::KafkaError> {
    let deadline = std::time::Instant::now() + QUERY_TIMEOUT;
    loop {
        match query() {
            Ok(v) => return Ok(v),
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "state start-up query failed; retrying");
                std::thread::sleep(RETRY_INTERVAL);
            }
            Err(e) => return Err(e),
        }
    }
}

fn run(
    consumer: BaseConsumer,
    kinds: HashMap<String, Kind>,
    mut remaining: HashMap<(String, i32), i64>,
    views: Arc<Views>,
    caught_up: watch::Sender<bool>,
    health: Health,
    shutdown: CancellationToken,
) {
    let started = std::time::Instant::now();
    let mut last_progress = started;
    let mut applied: u64 = 0;
    while !shutdown.is_cancelled() {
        let mut batch = Vec::new();
        // The next offset of each partition read in this batch, for `Health::viewed`.
        let mut read: HashMap<(String, i32), i64> = HashMap::new();
        while batch.len() < BATCH_MAX {
            let timeout = if batch.is_empty() {
                POLL_TIMEOUT
            } else {
                Duration::ZERO
            };
            match consumer.poll(timeout) {
                Some(Ok(m)) => {
                    let tp = (m.topic().to_string(), m.partition());
                    read.insert(tp.clone(), m.offset() + 1);
                    if remaining
                        .get(&tp)
                        .is_some_and(|high| m.offset() + 1 >= *high)
                    {
                        remaining.remove(&tp);
                    }
                    let Some(kind) = kinds.get(m.topic()) else {
                        continue;
                    };
                    match kind.decode(m.key(), m.payload(), m.partition(), m.offset()) {
                        Ok(Some(change)) => batch.push(change),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), error = %e, "skipping an unreadable state record")
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "state tail error");
                    break;
                }
                None => break,
            }
        }
        // How far the views kept on disk have read, stored with the batch.
        let positions: Vec<((String, i32), i64)> = read
            .iter()
            .filter(|((topic, _), _)| kinds.get(topic).is_some_and(|k| k.in_store()))
            .map(|(tp, next)| (tp.clone(), *next))
            .collect();
        if !batch.is_empty() || !positions.is_empty() {
            applied += batch.len() as u64;
            while let Err(e) = views.apply_read(&batch, &positions) {
                tracing::error!(error = %e, "state store write failed; applying the batch again");
                if shutdown.is_cancelled() {
                    return;
                }
                std::thread::sleep(STORE_RETRY);
            }
        }
        for ((topic, partition), next) in read {
            health.viewed(&topic, partition, next);
        }
        if !*caught_up.borrow() {
            drop_reached(&consumer, &mut remaining);
            if remaining.is_empty() {
                tracing::info!(
                    records = applied,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "state caught up"
                );
                health.caught_up(applied);
                let _ = caught_up.send(true);
            } else {
                health.catching_up(applied, remaining.len());
            }
            if !remaining.is_empty() && last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = std::time::Instant::now();
                tracing::info!(
                    records = applied,
                    partitions_left = remaining.len(),
                    "catching up on state"
                );
            }
        }
    }
}

/// Drops from `remaining` the partitions whose read position has reached the end offset noted at
/// start-up. A record's offset alone cannot tell: when a partition ends with a transaction marker
/// (URL-group publishes and schedule fires are transactions) no record carries the last offset,
/// but the position moves past the marker.
fn drop_reached(consumer: &BaseConsumer, remaining: &mut HashMap<(String, i32), i64>) {
    if remaining.is_empty() {
        return;
    }
    match consumer.position() {
        Ok(positions) => {
            for e in positions.elements() {
                if let Offset::Offset(position) = e.offset() {
                    let tp = (e.topic().to_string(), e.partition());
                    if remaining.get(&tp).is_some_and(|high| position >= *high) {
                        remaining.remove(&tp);
                    }
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "read positions unavailable; waiting for records"),
    }
}
