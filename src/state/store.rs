//! The local store behind the read APIs: an embedded redb database on disk, rebuilt from Kafka.
//!
//! Design choice: Kafka stays the only source of truth; this store is a per-process cache of
//! what the compacted and log topics say, created empty at start-up and filled by the tailer
//! (`tail.rs`) before the API serves. Being on disk, it keeps memory flat however large the event
//! log, the DLQ or the set of pending messages grows; being rebuildable, it is written without
//! fsync. Every apply is idempotent, so the API can write through its own changes at once
//! (read-your-writes in one process) and the tailer re-applies them harmlessly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use redb::{
    Database, Durability, MultimapTableDefinition, ReadableMultimapTable, ReadableTable,
    ReadableTableMetadata, TableDefinition,
};

use super::Change;
use crate::kafka::record::Record;
use crate::model::dedup::DedupRecord;
use crate::model::dlq::DlqRecord;
use crate::model::envelope::Envelope;
use crate::model::event::{Event, State};

/// Event log: [`event_key`] → event JSON.
const EVENTS: TableDefinition<u128, &[u8]> = TableDefinition::new("events");
/// Message id → its event keys.
const EVENTS_BY_MESSAGE: MultimapTableDefinition<&str, u128> =
    MultimapTableDefinition::new("events_by_message");
/// Pending messages (created, not yet delivered, failed or cancelled): id → envelope JSON.
const MESSAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("messages");
/// DLQ entries: dlq id → record JSON.
const DLQ: TableDefinition<&str, &[u8]> = TableDefinition::new("dlq");
/// DLQ order: (failed at, dlq id) → ().
const DLQ_BY_TIME: TableDefinition<(u64, &str), ()> = TableDefinition::new("dlq_by_time");
/// Cancelled message ids → when the cancel was requested (unix ms).
const CANCELLED: TableDefinition<&str, i64> = TableDefinition::new("cancelled");
/// Dedup keys → dedup record JSON.
const DEDUP: TableDefinition<&str, &[u8]> = TableDefinition::new("dedup");
/// Pending messages by queue: (queue name, message id) → (); a queue's lag.
const PENDING_BY_QUEUE: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("pending_by_queue");
/// Pending messages by flow-control key: (key, message id) → (); a key's wait list.
const PENDING_BY_FLOW: TableDefinition<(&str, &str), ()> = TableDefinition::new("pending_by_flow");
/// How far the tailer has applied each partition of the topics kept here: (topic, partition) →
/// next offset, written in the same transaction as the records, so a restart resumes from it.
const POSITIONS: TableDefinition<(&str, i32), i64> = TableDefinition::new("positions");
/// What the file holds: [`STORE_FORMAT`] and the identity of the Kafka data it was built from.
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const META_IDENTITY: &str = "identity";
/// Bumped when the tables change incompatibly: an older file is rebuilt.
const STORE_FORMAT: &str = "kstash-store-1";

/// Bits of the event key below the time: 16 for the partition, 48 for the offset.
const PARTITION_SHIFT: u32 = 48;
const TIME_SHIFT: u32 = 64;
const OFFSET_MASK: u128 = (1 << PARTITION_SHIFT) - 1;

/// The key of an event: time-ordered, and the same in every process (it is built from the
/// event's Kafka coordinates), so a cursor made by one process works on another.
pub fn event_key(time_ms: i64, partition: i32, offset: i64) -> u128 {
    let time = u128::from(u64::try_from(time_ms).unwrap_or_default());
    let partition = u128::from(u16::try_from(partition).unwrap_or(u16::MAX));
    let offset = u128::from(u64::try_from(offset).unwrap_or_default()) & OFFSET_MASK;
    (time << TIME_SHIFT) | (partition << PARTITION_SHIFT) | offset
}

/// The time part of an event key.
pub fn key_time(key: u128) -> i64 {
    i64::try_from(key >> TIME_SHIFT).unwrap_or(i64::MAX)
}

#[derive(Debug, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(String);

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError(e.to_string())
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// How far a message has come, as the events say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// No event of it seen (or only ones that say nothing about progress).
    Unknown,
    /// Created and not finished: attempts made so far and when the next is due (unix ms).
    Pending { retried: u32, not_before: i64 },
    /// Delivered or failed for good.
    Finished,
    /// A cancel was requested.
    Cancelled,
}

/// Every this many commits one is `Durability::Eventual` instead of `None`: redb reuses freed
/// pages only after a durable commit, so purely non-durable commits would grow the file without
/// bound (redb's own warning), while durable commits every time would cost an fsync each.
const DURABLE_EVERY: u64 = 64;

/// The per-process store.
pub struct Store {
    db: Database,
    commits: std::sync::atomic::AtomicU64,
    /// Writes still to fail on purpose ([`Store::fail_next_writes`]).
    failing: std::sync::atomic::AtomicU32,
    dir: PathBuf,
    remove_dir: bool,
}

impl Drop for Store {
    fn drop(&mut self) {
        if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else if let Ok(mut tx) = self.db.begin_write() {
            // Make the last (non-durable) commits durable, so a kept store resumes where this
            // run stopped rather than at its last durable commit.
            tx.set_durability(Durability::Immediate);
            let _ = tx.commit();
        }
    }
}

impl Store {
    /// Creates an empty store in `dir` (a fresh temporary directory when `None`, removed on drop)
    /// whose in-memory page cache holds at most `cache_bytes`.
    pub fn create(dir: Option<&Path>, cache_bytes: usize) -> Result<Self, StoreError> {
        Self::open(dir, cache_bytes, None)
    }

    /// Opens the store in `dir`. With an `identity` (the Kafka cluster and topic prefix it is
    /// built from), a file left by an earlier run with the same identity is kept, and the tailer
    /// resumes from its [positions](Store::positions): start-up reads only what is new. Without
    /// one, or when the file was built from other data, it starts empty.
    pub fn open(
        dir: Option<&Path>,
        cache_bytes: usize,
        identity: Option<&str>,
    ) -> Result<Self, StoreError> {
        let (dir, remove_dir) = match dir {
            Some(d) => (d.to_path_buf(), false),
            None => (
                std::env::temp_dir().join(format!(
                    "kstash-state-{}-{}",
                    std::process::id(),
                    crate::model::ids::message_id()
                )),
                true,
            ),
        };
        std::fs::create_dir_all(&dir).map_err(|e| StoreError(format!("{}: {e}", dir.display())))?;
        let path = dir.join("state.redb");
        let stamp = identity.map(|i| format!("{STORE_FORMAT}|{i}"));
        let reusable = match &stamp {
            Some(stamp) if path.exists() => {
                Self::stamp_of(&path, cache_bytes).as_ref() == Some(stamp)
            }
            _ => false,
        };
        if !reusable {
            let _ = std::fs::remove_file(&path);
        }
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(&path)?;
        let store = Store {
            db,
            commits: std::sync::atomic::AtomicU64::new(0),
            failing: std::sync::atomic::AtomicU32::new(0),
            dir,
            remove_dir,
        };
        store.write(|tx| {
            if let Some(stamp) = &stamp {
                tx.open_table(META)?.insert(META_IDENTITY, stamp.as_str())?;
            }
            Ok(())
        })?; // also creates the tables
        if reusable {
            tracing::info!(path = %path.display(), "state store kept from the last run; reading only what is new");
        }
        Ok(store)
    }

    /// The stamp of an existing store file, if it is one this build can read.
    fn stamp_of(path: &Path, cache_bytes: usize) -> Option<String> {
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .open(path)
            .ok()?;
        let tx = db.begin_read().ok()?;
        let meta = tx.open_table(META).ok()?;
        let stamp = meta.get(META_IDENTITY).ok()??.value().to_string();
        Some(stamp)
    }

    /// Where the tailer left each partition (the next offset to read).
    pub fn positions(&self) -> Result<HashMap<(String, i32), i64>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(POSITIONS)?;
        let mut out = HashMap::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            let (topic, partition) = k.value();
            out.insert((topic.to_string(), partition), v.value());
        }
        Ok(out)
    }

    /// Applies changes read from Kafka and records how far each partition was read, in one
    /// transaction.
    pub fn apply_read(
        &self,
        changes: &[Change],
        positions: &[((String, i32), i64)],
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            for change in changes {
                apply_one(tx, change)?;
            }
            if !positions.is_empty() {
                let mut t = tx.open_table(POSITIONS)?;
                for ((topic, partition), next) in positions {
                    t.insert((topic.as_str(), *partition), *next)?;
                }
            }
            Ok(())
        })
    }

    /// Applies changes in one transaction.
    pub fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        self.apply_read(changes, &[])
    }

    /// Fault injection: the next `n` writes fail (as a full disk would make them), so tests can
    /// show that an acknowledged write is still answered as stored and that the tailer applies a
    /// batch again rather than dropping it.
    pub fn fail_next_writes(&self, n: u32) {
        self.failing.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        if self
            .failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError("injected write failure".into()));
        }
        let mut tx = self.db.begin_write()?;
        let n = self
            .commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tx.set_durability(if n % DURABLE_EVERY == 0 {
            Durability::Eventual
        } else {
            Durability::None
        });
        {
            // Open every table so reads never meet a missing one.
            tx.open_table(EVENTS)?;
            tx.open_multimap_table(EVENTS_BY_MESSAGE)?;
            tx.open_table(MESSAGES)?;
            tx.open_table(DLQ)?;
            tx.open_table(DLQ_BY_TIME)?;
            tx.open_table(CANCELLED)?;
            tx.open_table(DEDUP)?;
            tx.open_table(PENDING_BY_QUEUE)?;
            tx.open_table(PENDING_BY_FLOW)?;
            tx.open_table(POSITIONS)?;
            tx.open_table(META)?;
        }
        f(&tx)?;
        tx.commit()?;
        Ok(())
    }

    /// A pending message.
    pub fn message(&self, id: &str) -> Result<Option<Envelope>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(MESSAGES)?;
        Ok(t.get(id)?.and_then(|v| Envelope::decode(v.value()).ok()))
    }

    /// Every pending message for which `keep` holds.
    pub fn messages_where(
        &self,
        mut keep: impl FnMut(&Envelope) -> bool,
    ) -> Result<Vec<Envelope>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(MESSAGES)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (_, v) = entry?;
            if let Ok(e) = Envelope::decode(v.value()) {
                if keep(&e) {
                    out.push(e);
                }
            }
        }
        Ok(out)
    }

    /// Whether a cancel was requested for `id`.
    pub fn is_cancelled(&self, id: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(CANCELLED)?.get(id)?.is_some())
    }

    /// How far message `id` has come (one read transaction; checked before every attempt).
    pub fn progress(&self, id: &str) -> Result<Progress, StoreError> {
        let tx = self.db.begin_read()?;
        if tx.open_table(CANCELLED)?.get(id)?.is_some() {
            return Ok(Progress::Cancelled);
        }
        if let Some(v) = tx.open_table(MESSAGES)?.get(id)? {
            if let Ok(m) = Envelope::decode(v.value()) {
                return Ok(Progress::Pending {
                    retried: m.retried,
                    not_before: m.not_before,
                });
            }
        }
        let by_message = tx.open_multimap_table(EVENTS_BY_MESSAGE)?;
        let events = tx.open_table(EVENTS)?;
        for key in by_message.get(id)? {
            if let Some(v) = events.get(key?.value())? {
                if Event::decode(v.value()).is_ok_and(|e| e.state.is_terminal()) {
                    return Ok(Progress::Finished);
                }
            }
        }
        Ok(Progress::Unknown)
    }

    /// The state a message ended in (DELIVERED, FAILED, CANCELED…), or `None` while it has not.
    pub fn final_state(&self, id: &str) -> Result<Option<State>, StoreError> {
        let tx = self.db.begin_read()?;
        let by_message = tx.open_multimap_table(EVENTS_BY_MESSAGE)?;
        let events = tx.open_table(EVENTS)?;
        for key in by_message.get(id)? {
            if let Some(v) = events.get(key?.value())? {
                if let Ok(e) = Event::decode(v.value()) {
                    if e.state.is_terminal() {
                        return Ok(Some(e.state));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Pending messages of queue `name` (its lag).
    pub fn queue_lag(&self, name: &str) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(PENDING_BY_QUEUE)?;
        Ok(t.range((name, "")..)?
            .map_while(Result::ok)
            .take_while(|(k, _)| k.value().0 == name)
            .count() as u64)
    }

    /// Pending messages of flow-control key `key`.
    pub fn flow_pending(&self, key: &str) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(PENDING_BY_FLOW)?;
        Ok(t.range((key, "")..)?
            .map_while(Result::ok)
            .take_while(|(k, _)| k.value().0 == key)
            .count() as u64)
    }

    /// Events, newest first, with keys below `before` (all when `None`), for which `keep` holds,
    /// at most `count`. Returns them with their keys.
    pub fn events(
        &self,
        before: Option<u128>,
        count: usize,
        mut keep: impl FnMut(&Event) -> bool,
    ) -> Result<Vec<(u128, Event)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(EVENTS)?;
        let range = match before {
            Some(b) => t.range(..b)?,
            None => t.range::<u128>(..)?,
        };
        let mut out = Vec::new();
        for entry in range.rev() {
            let (k, v) = entry?;
            if let Ok(e) = Event::decode(v.value()) {
                if keep(&e) {
                    out.push((k.value(), e));
                    if out.len() >= count {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Events of one message, newest first.
    pub fn events_of(&self, message_id: &str) -> Result<Vec<(u128, Event)>, StoreError> {
        let tx = self.db.begin_read()?;
        let by_message = tx.open_multimap_table(EVENTS_BY_MESSAGE)?;
        let events = tx.open_table(EVENTS)?;
        let mut out = Vec::new();
        for key in by_message.get(message_id)? {
            let key = key?.value();
            if let Some(v) = events.get(key)? {
                if let Ok(e) = Event::decode(v.value()) {
                    out.push((key, e));
                }
            }
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.0));
        Ok(out)
    }

    /// A DLQ entry.
    pub fn dlq(&self, dlq_id: &str) -> Result<Option<DlqRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(DLQ)?;
        Ok(t.get(dlq_id)?
            .and_then(|v| DlqRecord::decode(v.value()).ok()))
    }

    /// DLQ entries, newest first, after `cursor` (a `(failed_at, dlq_id)` position), for which
    /// `keep` holds, at most `count`.
    pub fn dlq_entries(
        &self,
        cursor: Option<(u64, String)>,
        count: usize,
        mut keep: impl FnMut(&DlqRecord) -> bool,
    ) -> Result<Vec<DlqRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let order = tx.open_table(DLQ_BY_TIME)?;
        let entries = tx.open_table(DLQ)?;
        let mut out = Vec::new();
        let iter = match &cursor {
            Some((t, id)) => order.range(..(*t, id.as_str()))?,
            None => order.range::<(u64, &str)>(..)?,
        };
        for entry in iter.rev() {
            let (k, _) = entry?;
            let (_, id) = k.value();
            if let Some(v) = entries.get(id)? {
                if let Ok(r) = DlqRecord::decode(v.value()) {
                    if keep(&r) {
                        out.push(r);
                        if out.len() >= count {
                            break;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// The live dedup entry for `key` at `now_ms`.
    pub fn dedup(&self, key: &str, now_ms: i64) -> Result<Option<DedupRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(DEDUP)?;
        Ok(t.get(key)?
            .and_then(|v| DedupRecord::decode(v.value()).ok())
            .filter(|e| e.expires_at > now_ms))
    }

    /// Drops events older than `cutoff_ms`, DLQ entries that failed before `dlq_cutoff_ms` (Kafka's
    /// retention removes those from the topic without a tombstone) and expired dedup keys;
    /// returns how many events went.
    pub fn prune(
        &self,
        cutoff_ms: i64,
        dlq_cutoff_ms: i64,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        let mut pruned = 0;
        self.write(|tx| {
            let mut events = tx.open_table(EVENTS)?;
            let mut by_message = tx.open_multimap_table(EVENTS_BY_MESSAGE)?;
            let old: Vec<(u128, String)> = events
                .range(..event_key(cutoff_ms, 0, 0))?
                .filter_map(Result::ok)
                .filter_map(|(k, v)| {
                    Event::decode(v.value())
                        .ok()
                        .map(|e| (k.value(), e.message_id))
                })
                .collect();
            for (key, id) in &old {
                events.remove(key)?;
                by_message.remove(id.as_str(), key)?;
            }
            pruned = old.len();
            let mut order = tx.open_table(DLQ_BY_TIME)?;
            let mut dlq = tx.open_table(DLQ)?;
            let expired_dlq: Vec<(u64, String)> = order
                .range(..(failed_at_key(dlq_cutoff_ms), ""))?
                .filter_map(Result::ok)
                .map(|(k, _)| {
                    let (t, id) = k.value();
                    (t, id.to_string())
                })
                .collect();
            for (t, id) in &expired_dlq {
                order.remove((*t, id.as_str()))?;
                dlq.remove(id.as_str())?;
            }
            let mut dedup = tx.open_table(DEDUP)?;
            let expired: Vec<String> = dedup
                .iter()?
                .filter_map(Result::ok)
                .filter(|(_, v)| {
                    DedupRecord::decode(v.value())
                        .map(|e| e.expires_at <= now_ms)
                        .unwrap_or(true)
                })
                .map(|(k, _)| k.value().to_string())
                .collect();
            for key in expired {
                dedup.remove(key.as_str())?;
            }
            Ok(())
        })?;
        Ok(pruned)
    }

    /// Number of stored events (for logs and tests).
    pub fn event_count(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(EVENTS)?.len()?)
    }
}

fn apply_one(tx: &redb::WriteTransaction, change: &Change) -> Result<(), StoreError> {
    match change {
        Change::Event {
            event,
            partition,
            offset,
        } => {
            let key = event_key(event.time, *partition, *offset);
            tx.open_table(EVENTS)?
                .insert(key, event.encode().as_slice())?;
            tx.open_multimap_table(EVENTS_BY_MESSAGE)?
                .insert(event.message_id.as_str(), key)?;
            // Changes can arrive out of order (an API writes its own through at once, the tailer
            // re-applies them later): never bring back a message that is already finished.
            if matches!(event.state, State::Created | State::Retry)
                && is_finished(tx, &event.message_id)?
            {
                return Ok(());
            }
            match event.state {
                State::Created => {
                    if let Some(message) = &event.message {
                        put_pending(tx, message)?;
                    }
                }
                State::Retry => {
                    let updated = tx
                        .open_table(MESSAGES)?
                        .get(event.message_id.as_str())?
                        .and_then(|v| Envelope::decode(v.value()).ok())
                        .map(|mut m| {
                            m.retried = event.retried;
                            m.not_before = event.next_delivery_time.unwrap_or(m.not_before);
                            m
                        });
                    if let Some(m) = updated {
                        put_pending(tx, &m)?;
                    }
                }
                State::Delivered | State::Failed | State::CancelRequested | State::Canceled => {
                    remove_pending(tx, &event.message_id)?;
                }
                State::Active | State::Error => {}
            }
        }
        Change::Dlq { dlq_id, record } => {
            let mut dlq = tx.open_table(DLQ)?;
            let mut order = tx.open_table(DLQ_BY_TIME)?;
            let previous = dlq
                .remove(dlq_id.as_str())?
                .and_then(|v| DlqRecord::decode(v.value()).ok());
            if let Some(p) = previous {
                order.remove((failed_at_key(p.failed_at), dlq_id.as_str()))?;
            }
            if let Some(r) = record {
                dlq.insert(dlq_id.as_str(), r.encode().as_slice())?;
                order.insert((failed_at_key(r.failed_at), dlq_id.as_str()), ())?;
            }
        }
        Change::Cancelled { message_id, at_ms } => {
            tx.open_table(CANCELLED)?
                .insert(message_id.as_str(), *at_ms)?;
            remove_pending(tx, message_id)?;
        }
        Change::Pending {
            message_id,
            message,
        } => match message {
            // The events may say more (retries) or that it finished: they win.
            Some(m) => {
                let known = tx.open_table(MESSAGES)?.get(message_id.as_str())?.is_some();
                if !known && !is_finished(tx, message_id)? {
                    put_pending(tx, m)?;
                }
            }
            None => remove_pending(tx, message_id)?,
        },
        Change::Dedup { key, entry } => {
            let mut dedup = tx.open_table(DEDUP)?;
            match entry {
                Some(e) => {
                    dedup.insert(key.as_str(), e.encode().as_slice())?;
                }
                None => {
                    dedup.remove(key.as_str())?;
                }
            }
        }
        // In-memory views (`Views::apply`).
        Change::Queue { .. }
        | Change::FlowControl { .. }
        | Change::UrlGroup { .. }
        | Change::Schedule { .. }
        | Change::ScheduleFire { .. }
        | Change::SigningKeys(_) => {}
    }
    Ok(())
}

/// Stores `m` as pending, with its queue and flow-control index entries.
fn put_pending(tx: &redb::WriteTransaction, m: &Envelope) -> Result<(), StoreError> {
    let id = m.message_id.as_str();
    tx.open_table(MESSAGES)?.insert(id, m.encode().as_slice())?;
    if let Some(queue) = &m.queue_name {
        tx.open_table(PENDING_BY_QUEUE)?
            .insert((queue.as_str(), id), ())?;
    }
    if let Some(fc) = &m.flow_control {
        tx.open_table(PENDING_BY_FLOW)?
            .insert((fc.key.as_str(), id), ())?;
    }
    Ok(())
}

/// Removes a pending message and its index entries.
fn remove_pending(tx: &redb::WriteTransaction, id: &str) -> Result<(), StoreError> {
    let removed = tx
        .open_table(MESSAGES)?
        .remove(id)?
        .and_then(|v| Envelope::decode(v.value()).ok());
    if let Some(m) = removed {
        if let Some(queue) = &m.queue_name {
            tx.open_table(PENDING_BY_QUEUE)?
                .remove((queue.as_str(), id))?;
        }
        if let Some(fc) = &m.flow_control {
            tx.open_table(PENDING_BY_FLOW)?
                .remove((fc.key.as_str(), id))?;
        }
    }
    Ok(())
}

/// Whether `id` was cancelled or has a terminal event in the store.
fn is_finished(tx: &redb::WriteTransaction, id: &str) -> Result<bool, StoreError> {
    if tx.open_table(CANCELLED)?.get(id)?.is_some() {
        return Ok(true);
    }
    let by_message = tx.open_multimap_table(EVENTS_BY_MESSAGE)?;
    let events = tx.open_table(EVENTS)?;
    for key in by_message.get(id)? {
        if let Some(v) = events.get(key?.value())? {
            if Event::decode(v.value()).is_ok_and(|e| e.state.is_terminal()) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn failed_at_key(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dlq::DLQ_VERSION;
    use crate::model::envelope::sample;

    const TEST_CACHE_BYTES: usize = 1 << 20;

    #[test]
    fn the_file_does_not_grow_with_rewrites_of_the_same_data() {
        let s = Store::create(None, TEST_CACHE_BYTES).unwrap();
        let put = |i: u32| Change::Dedup {
            key: "k".into(),
            entry: Some(DedupRecord {
                v: 1,
                key: "k".into(),
                message_id: format!("m{i}"),
                url: "u".into(),
                expires_at: 1,
            }),
        };
        for i in 0..200 {
            s.apply(&[put(i)]).unwrap();
        }
        let size = || std::fs::metadata(s.dir.join("state.redb")).unwrap().len();
        let after_200 = size();
        for i in 0..2000 {
            s.apply(&[put(i)]).unwrap();
        }
        assert!(
            size() <= after_200 * 2,
            "file grew from {after_200} to {} bytes rewriting one key",
            size()
        );
    }

    fn event(id: &str, state: State, time: i64) -> Event {
        let mut m = sample();
        m.message_id = id.into();
        let mut e = Event::new(&m, state, time);
        if state == State::Created {
            e.message = Some(Box::new(m));
        }
        e
    }

    fn ev(e: Event, offset: i64) -> Change {
        Change::Event {
            event: Box::new(e),
            partition: 0,
            offset,
        }
    }

    #[test]
    fn event_keys_order_by_time_and_are_deterministic() {
        assert!(event_key(2, 0, 0) > event_key(1, 9, 999));
        assert!(event_key(1, 1, 0) > event_key(1, 0, 5));
        assert_eq!(key_time(event_key(1234, 3, 7)), 1234);
    }

    #[test]
    fn pending_messages_follow_their_events() {
        let s = Store::create(None, TEST_CACHE_BYTES).unwrap();
        s.apply(&[
            ev(event("a", State::Created, 1), 0),
            ev(event("b", State::Created, 2), 1),
        ])
        .unwrap();
        assert!(s.message("a").unwrap().is_some());
        let mut retry = event("a", State::Retry, 3);
        retry.retried = 1;
        retry.next_delivery_time = Some(99);
        s.apply(&[ev(retry, 2), ev(event("b", State::Delivered, 4), 3)])
            .unwrap();
        let a = s.message("a").unwrap().unwrap();
        assert_eq!((a.retried, a.not_before), (1, 99));
        assert!(
            s.message("b").unwrap().is_none(),
            "delivered messages are not pending"
        );
        // Re-applying an older CREATED (the tailer catching up) does not bring it back.
        s.apply(&[ev(event("b", State::Created, 2), 1)]).unwrap();
        assert!(
            s.message("b").unwrap().is_none(),
            "finished messages stay finished"
        );
        // Applying the same change twice changes nothing.
        s.apply(&[ev(event("b", State::Delivered, 4), 3)]).unwrap();
        assert_eq!(s.event_count().unwrap(), 4);
        assert_eq!(s.events_of("a").unwrap().len(), 2);
        let newest: Vec<_> = s.events(None, 10, |_| true).unwrap();
        assert_eq!(newest[0].1.state, State::Delivered);
        let older = s.events(Some(newest[1].0), 10, |_| true).unwrap();
        assert_eq!(older.len(), 2, "cursor continues below the last key");
        assert_eq!(s.prune(3, 0, 0).unwrap(), 2);
        assert_eq!(s.event_count().unwrap(), 2);
    }

    #[test]
    fn dlq_entries_and_tombstones() {
        let s = Store::create(None, TEST_CACHE_BYTES).unwrap();
        let rec = |id: &str, at: i64| DlqRecord {
            v: DLQ_VERSION,
            dlq_id: id.into(),
            failed_at: at,
            message: sample(),
            response_status: Some(500),
            response_header: None,
            response_body: vec![],
            error: "x".into(),
        };
        let put = |r: DlqRecord| Change::Dlq {
            dlq_id: r.dlq_id.clone(),
            record: Some(Box::new(r)),
        };
        s.apply(&[put(rec("d1", 1)), put(rec("d2", 2)), put(rec("d3", 3))])
            .unwrap();
        let page = s.dlq_entries(None, 2, |_| true).unwrap();
        assert_eq!(
            page.iter().map(|r| r.dlq_id.as_str()).collect::<Vec<_>>(),
            ["d3", "d2"]
        );
        let rest = s.dlq_entries(Some((2, "d2".into())), 2, |_| true).unwrap();
        assert_eq!(rest.len(), 1);
        s.apply(&[Change::Dlq {
            dlq_id: "d2".into(),
            record: None,
        }])
        .unwrap();
        assert!(s.dlq("d2").unwrap().is_none());
        assert_eq!(s.dlq_entries(None, 10, |_| true).unwrap().len(), 2);
    }

    #[test]
    fn cancellations_and_dedup() {
        let s = Store::create(None, TEST_CACHE_BYTES).unwrap();
        s.apply(&[ev(event("a", State::Created, 1), 0)]).unwrap();
        s.apply(&[Change::Cancelled {
            message_id: "a".into(),
            at_ms: 5,
        }])
        .unwrap();
        assert!(s.is_cancelled("a").unwrap());
        assert!(s.message("a").unwrap().is_none());
        let entry = DedupRecord {
            v: 1,
            key: "k".into(),
            message_id: "a".into(),
            url: "u".into(),
            expires_at: 10,
        };
        s.apply(&[Change::Dedup {
            key: "k".into(),
            entry: Some(entry.clone()),
        }])
        .unwrap();
        assert_eq!(s.dedup("k", 9).unwrap(), Some(entry));
        assert_eq!(s.dedup("k", 10).unwrap(), None, "expired");
    }

    #[test]
    fn progress_queue_lag_and_flow_wait_list() {
        let s = Store::create(None, TEST_CACHE_BYTES).unwrap();
        // sample() is in queue "orders" with flow-control key "tenant-1".
        s.apply(&[
            ev(event("a", State::Created, 1), 0),
            ev(event("b", State::Created, 2), 1),
        ])
        .unwrap();
        assert_eq!(s.queue_lag("orders").unwrap(), 2);
        assert_eq!(s.queue_lag("order").unwrap(), 0, "no prefix matches");
        assert_eq!(s.flow_pending("tenant-1").unwrap(), 2);
        assert_eq!(
            s.progress("a").unwrap(),
            Progress::Pending {
                retried: 0,
                not_before: 2
            }
        );
        let mut retry = event("a", State::Retry, 3);
        retry.retried = 2;
        retry.next_delivery_time = Some(50);
        s.apply(&[ev(retry, 2), ev(event("b", State::Delivered, 4), 3)])
            .unwrap();
        assert_eq!(
            s.progress("a").unwrap(),
            Progress::Pending {
                retried: 2,
                not_before: 50
            }
        );
        assert_eq!(s.progress("b").unwrap(), Progress::Finished);
        assert_eq!(s.final_state("b").unwrap(), Some(State::Delivered));
        assert_eq!(s.final_state("a").unwrap(), None);
        assert_eq!(s.progress("zz").unwrap(), Progress::Unknown);
        assert_eq!(s.queue_lag("orders").unwrap(), 1);
        s.apply(&[Change::Cancelled {
            message_id: "a".into(),
            at_ms: 5,
        }])
        .unwrap();
        assert_eq!(s.progress("a").unwrap(), Progress::Cancelled);
        assert_eq!(s.queue_lag("orders").unwrap(), 0);
        assert_eq!(s.flow_pending("tenant-1").unwrap(), 0);
    }
}
