//! `kstash dev` never loses what it accepted: the embedded cluster keeps at most
//! [`MOCK_PARTITION_BYTES`] (and [`MOCK_PARTITION_BATCHES`] batches) per partition and silently
//! drops the oldest beyond that, so kstash keeps count of what each partition still holds that a
//! stage needs, refuses publishes before a partition would have to drop such records, and watches
//! every partition a stage reads for records dropped all the same.
//!
//! Design choice: exact accounting is impossible from outside the mock, so it is conservative and
//! cheap. The producer reports every acknowledged record (partition, offset, an upper bound of its
//! size in the log); a watch task learns, every `dev.watchdog_interval`, from which offset each
//! partition is still needed: a consumer group's committed offset (everything from there is
//! unfinished: held by the delay stage, queued, retrying), and for the topics the views read, how
//! far the views have read. [`Room::admit`] refuses a publish when any partition's needed records
//! plus the publish would pass [`ADMIT_NUM`]/[`ADMIT_DEN`] of the limit, leaving the rest for the
//! copies the stages write on their own (ladder hops, retries, callbacks, events) — those cannot be
//! refused. The watch task also compares each partition's low watermark with what is needed and
//! says loudly when records were dropped anyway (writes outside this accounting: transactions).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;

/// What librdkafka's mock keeps per partition before it drops the oldest batches
/// (`rdkafka_mock.c`: `max_size`, `max_cnt`).
pub const MOCK_PARTITION_BYTES: u64 = 5 * 1024 * 1024;
pub const MOCK_PARTITION_BATCHES: u64 = 100_000;
/// Publishes are admitted while every partition's needed records stay below this fraction of the
/// limits; the rest is room for what the stages write on their own.
pub const ADMIT_NUM: u64 = 1;
pub const ADMIT_DEN: u64 = 2;
/// A record's size in the log beyond its key, value and headers (batch and record framing), at
/// most; counting each record as its own batch keeps the estimate an upper bound.
pub const RECORD_FRAMING_BYTES: u64 = 128;
/// Timeout of the watch task's look-ups.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

type Tp = (String, i32);

#[derive(Debug, Default)]
struct Log {
    /// Acknowledged records at or above `needed_from`: offset and size.
    entries: VecDeque<(i64, u64)>,
    needed_from: i64,
    needed_bytes: u64,
}

/// What each partition of the embedded cluster holds that is still needed.
#[derive(Debug, Default)]
pub struct Room {
    logs: Mutex<HashMap<Tp, Log>>,
}

/// Why a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "kstash dev: the embedded Kafka cluster is full: partition {partition} of {topic} holds {needed_bytes} bytes in {needed_records} records not yet delivered, and it keeps at most {} bytes per partition (older records would be dropped); retry once deliveries catch up, or run `kstash serve` with a real Kafka for this volume",
    MOCK_PARTITION_BYTES
)]
pub struct Full {
    pub topic: String,
    pub partition: i32,
    pub needed_bytes: u64,
    pub needed_records: usize,
}

impl Room {
    fn logs(&self) -> std::sync::MutexGuard<'_, HashMap<Tp, Log>> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Kafka acknowledged a record of `bytes` (key, value and headers) at `offset`.
    pub fn record(&self, topic: &str, partition: i32, offset: i64, bytes: u64) {
        let mut logs = self.logs();
        let log = logs.entry((topic.to_string(), partition)).or_default();
        if offset >= log.needed_from {
            let size = bytes + RECORD_FRAMING_BYTES;
            log.entries.push_back((offset, size));
            log.needed_bytes += size;
        }
    }

    /// Records of `topic`/`partition` below `offset` are no longer needed.
    pub fn needed_from(&self, topic: &str, partition: i32, offset: i64) {
        let mut logs = self.logs();
        let log = logs.entry((topic.to_string(), partition)).or_default();
        log.needed_from = log.needed_from.max(offset);
        // Acks arrive nearly in offset order; anything out of order below is dropped on a later
        // pass, which only overstates what is needed.
        while let Some(&(o, size)) = log.entries.front() {
            if o >= log.needed_from {
                break;
            }
            log.entries.pop_front();
            log.needed_bytes -= size;
        }
    }

    /// Whether a publish writing `incoming` bytes (per partition it lands on, which is not known
    /// before it is written) leaves every partition within the admitted share of its limits.
    ///
    /// Only bytes are checked: every record counts at least [`RECORD_FRAMING_BYTES`], so the
    /// admitted bytes are reached long before the mock's batch count (see the test).
    pub fn admit(&self, incoming: u64) -> Result<(), Full> {
        let bytes_limit = MOCK_PARTITION_BYTES * ADMIT_NUM / ADMIT_DEN;
        let logs = self.logs();
        let full = logs
            .iter()
            .find(|(_, log)| log.needed_bytes + incoming + RECORD_FRAMING_BYTES > bytes_limit);
        match full {
            Some(((topic, partition), log)) => Err(Full {
                topic: topic.clone(),
                partition: *partition,
                needed_bytes: log.needed_bytes,
                needed_records: log.entries.len(),
            }),
            None => Ok(()),
        }
    }
}

/// How far the views have read a partition (the next offset), if they read any of it.
pub type ViewPosition = Arc<dyn Fn(&str, i32) -> Option<i64> + Send + Sync>;

/// Where the watch task learns from which offset each partition is still needed.
#[derive(Clone)]
pub struct Needs {
    /// Consumer groups and the topics they consume (each with its partition count): a partition is
    /// needed from the group's committed offset (from 0 while it has none).
    pub groups: Vec<(String, Vec<(String, i32)>)>,
    /// Topics the views read (with partition counts), and how far they have read.
    pub views: Vec<(String, i32)>,
    pub view_position: ViewPosition,
}

/// A consumer group's client (to read its committed offsets) and the topics it consumes.
type GroupClient = (Arc<BaseConsumer>, Vec<(String, i32)>);

/// Every `interval` until `shutdown`: tells `room` what is still needed, and reports records the
/// embedded cluster dropped although they were needed (each loss once, loudly).
pub async fn watch(
    kafka: KafkaConfig,
    room: Arc<Room>,
    needs: Needs,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut groups: Vec<GroupClient> = Vec::new();
    for (group, topics) in &needs.groups {
        let mut config = kafka.clone();
        config.group_id.clone_from(group);
        match super::create_client(&config, super::Role::Consumer) {
            Ok(c) => groups.push((Arc::new(c), topics.clone())),
            Err(e) => {
                tracing::error!(error = %e, "the embedded cluster's watch task could not start");
                return;
            }
        }
    }
    let groups = Arc::new(groups);
    let mut reported: HashMap<Tp, i64> = HashMap::new();
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        let (g, n) = (groups.clone(), needs.clone());
        let checked = tokio::task::spawn_blocking(move || needed_and_low(&g, &n))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        let rows = match checked {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!(error = %e, "embedded cluster watch query failed");
                continue;
            }
        };
        for ((topic, partition), needed, low) in rows {
            room.needed_from(&topic, partition, needed);
            if low > needed && reported.get(&(topic.clone(), partition)) < Some(&low) {
                reported.insert((topic.clone(), partition), low);
                tracing::error!(
                    topic = %topic, partition, needed_from = needed, low_watermark = low,
                    lost = low - needed,
                    "EMBEDDED KAFKA DROPPED RECORDS: the dev cluster keeps only ~5 MiB per partition and discarded records still needed; use `kstash serve` with a real Kafka for this volume"
                );
            }
        }
    }
    let _ = tokio::task::spawn_blocking(move || drop(groups)).await;
}

/// For every watched partition: from which offset it is needed, and its low watermark.
fn needed_and_low(groups: &[GroupClient], needs: &Needs) -> Result<Vec<(Tp, i64, i64)>, String> {
    let Some((any, _)) = groups.first() else {
        return Ok(Vec::new());
    };
    let mut needed: Vec<(Tp, i64)> = Vec::new();
    for (consumer, topics) in groups {
        let mut tpl = TopicPartitionList::new();
        for (topic, partitions) in topics {
            for p in 0..*partitions {
                tpl.add_partition(topic, p);
            }
        }
        let committed = consumer
            .committed_offsets(tpl, QUERY_TIMEOUT)
            .map_err(|e| e.to_string())?;
        for elem in committed.elements() {
            let from = match elem.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            };
            needed.push(((elem.topic().to_string(), elem.partition()), from));
        }
    }
    for (topic, partitions) in &needs.views {
        for p in 0..*partitions {
            let from = (needs.view_position)(topic, p).unwrap_or(0);
            needed.push(((topic.clone(), p), from));
        }
    }
    needed
        .into_iter()
        .map(|((topic, p), from)| {
            let (low, _) = any
                .fetch_watermarks(&topic, p, QUERY_TIMEOUT)
                .map_err(|e| e.to_string())?;
            Ok(((topic, p), from, low))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn publishes_are_refused_before_needed_records_would_be_dropped() {
        let room = Room::default();
        room.admit(MIB).unwrap();
        room.record("delay.5s", 0, 0, MIB);
        room.record("delay.5s", 0, 1, MIB);
        room.admit(100).unwrap();
        let full = room.admit(MIB).unwrap_err();
        assert_eq!((full.topic.as_str(), full.partition), ("delay.5s", 0));
        assert!(full.to_string().contains("kstash serve"), "{full}");
        // The stage finished offset 0: its record no longer counts.
        room.needed_from("delay.5s", 0, 1);
        room.admit(MIB).unwrap();
        // A record acknowledged below what is needed never counts.
        room.record("delay.5s", 0, 0, 4 * MIB);
        room.admit(MIB).unwrap();
    }

    #[test]
    fn small_records_reach_the_byte_bound_before_the_batch_count() {
        let admitted_records = MOCK_PARTITION_BYTES * ADMIT_NUM / ADMIT_DEN / RECORD_FRAMING_BYTES;
        assert!(admitted_records < MOCK_PARTITION_BATCHES * ADMIT_NUM / ADMIT_DEN);
        let room = Room::default();
        for o in 0..i64::try_from(admitted_records).unwrap() {
            room.record("ready", 3, o, 0);
        }
        assert!(room.admit(0).is_err(), "tiny records still take room");
        room.needed_from("ready", 3, 10);
        room.admit(0).unwrap();
    }
}
