//! What `/health/live` and `/health/ready` report: whether this process's views have caught up
//! with Kafka (with progress while they catch up), and whether Kafka answers.
//!
//! Design choice: readiness is two facts kept by the parts that know them, read by the API without
//! any I/O: the state tailer reports its catch-up progress here, and a probe task asks the cluster
//! for metadata every [`PROBE_INTERVAL`] (the cheapest request that needs a live broker) and
//! records when it last succeeded. A process is ready when its views have caught up and Kafka
//! answered within [`PROBE_STALE`]. The API's `/v2` routes answer 503 only while the views catch
//! up (their answers would be wrong before); an unreachable Kafka makes writes answer 503 on their
//! own, and reads from the views stay correct.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::kafka::{create_client, Role, SetupError};
use crate::model::now_ms;

/// How often the probe asks Kafka for metadata.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Kafka counts as reachable when a probe succeeded this recently.
pub const PROBE_STALE: Duration = Duration::from_secs(15);

#[derive(Default)]
struct Inner {
    caught_up: AtomicBool,
    records_applied: AtomicU64,
    partitions_left: AtomicUsize,
    /// Unix ms of the last successful probe; 0 before the first.
    kafka_ok_at: AtomicI64,
    kafka_error: Mutex<Option<String>>,
    /// How far the views have read each partition of the state topics: the next offset.
    view_positions: Mutex<HashMap<(String, i32), i64>>,
}

/// The process's health, shared by the tailer, the probe and the API.
#[derive(Clone, Default)]
pub struct Health(Arc<Inner>);

/// A snapshot for the health endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub caught_up: bool,
    pub records_applied: u64,
    pub partitions_left: usize,
    pub kafka_reachable: bool,
    /// Unix ms of the last successful contact with Kafka, if any.
    pub kafka_ok_at: Option<i64>,
    pub kafka_error: Option<String>,
}

impl Report {
    pub fn ready(&self) -> bool {
        self.caught_up && self.kafka_reachable
    }
}

impl Health {
    /// The views are catching up: `records` applied so far, `partitions_left` to go.
    pub fn catching_up(&self, records: u64, partitions_left: usize) {
        self.0.records_applied.store(records, Ordering::Relaxed);
        self.0
            .partitions_left
            .store(partitions_left, Ordering::Relaxed);
    }

    /// The views have caught up.
    pub fn caught_up(&self, records: u64) {
        self.catching_up(records, 0);
        self.0.caught_up.store(true, Ordering::SeqCst);
    }

    pub fn is_caught_up(&self) -> bool {
        self.0.caught_up.load(Ordering::SeqCst)
    }

    /// A probe's result at `now` (unix ms).
    pub fn kafka_probed(&self, result: Result<(), String>, now: i64) {
        let mut error = self.0.kafka_error.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => {
                self.0.kafka_ok_at.store(now, Ordering::SeqCst);
                *error = None;
            }
            Err(e) => *error = Some(e),
        }
    }

    /// The views have applied `topic`/`partition` up to `next_offset` (exclusive).
    pub fn viewed(&self, topic: &str, partition: i32, next_offset: i64) {
        let mut positions = self
            .0
            .view_positions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let position = positions
            .entry((topic.to_string(), partition))
            .or_insert(next_offset);
        *position = (*position).max(next_offset);
    }

    /// How far the views have read `topic`/`partition` (the next offset), if they read any of it.
    pub fn view_position(&self, topic: &str, partition: i32) -> Option<i64> {
        self.0
            .view_positions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(topic.to_string(), partition))
            .copied()
    }

    pub fn report(&self, now: i64) -> Report {
        let ok_at = self.0.kafka_ok_at.load(Ordering::SeqCst);
        let stale_ms = i64::try_from(PROBE_STALE.as_millis()).unwrap_or(i64::MAX);
        Report {
            caught_up: self.is_caught_up(),
            records_applied: self.0.records_applied.load(Ordering::Relaxed),
            partitions_left: self.0.partitions_left.load(Ordering::Relaxed),
            kafka_reachable: ok_at > 0 && now - ok_at <= stale_ms,
            kafka_ok_at: (ok_at > 0).then_some(ok_at),
            kafka_error: self
                .0
                .kafka_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// Probes Kafka every [`PROBE_INTERVAL`] until `shutdown`, recording the results in `health`.
pub fn start_probe(
    kafka: &KafkaConfig,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), SetupError> {
    let client: Arc<BaseConsumer> = Arc::new(create_client(kafka, Role::Admin)?);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(PROBE_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_reachable = true;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            let probe = client.clone();
            let result = tokio::task::spawn_blocking(move || {
                probe
                    .fetch_metadata(None, PROBE_TIMEOUT)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            let reachable = result.is_ok();
            if reachable != was_reachable {
                match &result {
                    Ok(()) => tracing::info!("kafka reachable again"),
                    Err(e) => tracing::warn!(error = %e, "kafka unreachable; not ready"),
                }
                was_reachable = reachable;
            }
            health.kafka_probed(result, now_ms());
        }
        // The client is dropped (closed) off the runtime threads: it has no group to leave, but a
        // close can still wait on its broker threads.
        let _ = tokio::task::spawn_blocking(move || drop(client)).await;
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_caught_up_views_and_a_recent_kafka_contact() {
        let h = Health::default();
        assert!(!h.report(1_000).ready(), "nothing known yet");
        h.catching_up(10, 3);
        h.kafka_probed(Ok(()), 1_000);
        let r = h.report(1_000);
        assert!(!r.ready());
        assert_eq!((r.records_applied, r.partitions_left), (10, 3));
        h.caught_up(42);
        assert!(h.report(1_000).ready());
        let stale = 1_000 + PROBE_STALE.as_millis() as i64 + 1;
        h.kafka_probed(Err("all brokers down".into()), stale);
        let r = h.report(stale);
        assert!(!r.ready() && !r.kafka_reachable);
        assert_eq!(r.kafka_error.as_deref(), Some("all brokers down"));
        assert_eq!(r.kafka_ok_at, Some(1_000));
        h.kafka_probed(Ok(()), stale + 1);
        assert!(h.report(stale + 1).ready());
    }
}
