//! Materialised views of Kafka topics, for the read and bulk APIs and for the checks delivery
//! makes (cancellations, queue and flow-control settings, a message's progress).
//!
//! Kafka remains the only source of truth: a process's views are empty at start and rebuilt by
//! reading the topics (`tail`), so processes stay stateless and symmetric. What can grow with
//! traffic (events, pending messages, the DLQ, cancellations, dedup keys) lives in the on-disk
//! `store`; what is small and read on every delivery (queue and flow-control settings) lives in
//! memory (`queues`, `flow`). API writes go through `writer`, which produces, waits for the ack and
//! applies the same change locally, so a process reads its own writes at once.
//!
//! Adding a state topic: a record type in `model` (its schema), a [`Kind`] here with its
//! [`StateRecord`] impl (its change), and the view that applies that change. The topic catalog,
//! the tailer and the writer pick it up from [`Kind::ALL`].

pub mod flow;
pub mod registry;
pub mod store;
pub mod tail;
pub mod writer;

use std::sync::Arc;

use tokio::sync::watch;

use crate::kafka::record::Record;
use crate::model::cancel::CancelRecord;
use crate::model::dedup::DedupRecord;
use crate::model::dlq::DlqRecord;
use crate::model::envelope::Envelope;
use crate::model::event::Event;
use crate::model::flow::FlowControlRecord;
use crate::model::pending::PendingRecord;
use crate::model::poison::is_poison_key;
use crate::model::queue::QueueRecord;
use crate::model::schedule::{ScheduleFire, ScheduleRecord};
use crate::model::signing_keys::SigningKeysRecord;
use crate::model::url_group::UrlGroupRecord;
use crate::signing::Signer;
use registry::{Registry, Setting};
pub use store::{Store, StoreError};

/// A state-bearing topic: what it holds and which view it feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Events,
    Dlq,
    Cancellations,
    Dedup,
    Queues,
    FlowControl,
    UrlGroups,
    Schedules,
    ScheduleFires,
    Pending,
    SigningKeys,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::Events,
        Kind::Dlq,
        Kind::Cancellations,
        Kind::Dedup,
        Kind::Queues,
        Kind::FlowControl,
        Kind::UrlGroups,
        Kind::Schedules,
        Kind::ScheduleFires,
        Kind::Pending,
        Kind::SigningKeys,
    ];

    /// Whether its view is kept in the on-disk store (which records how far it was read, so a
    /// restart with the same store resumes there); the others are in memory, read from the
    /// beginning at every start.
    pub fn in_store(self) -> bool {
        matches!(
            self,
            Kind::Events | Kind::Dlq | Kind::Cancellations | Kind::Dedup | Kind::Pending
        )
    }

    /// Its table in the configuration: `[topics.<key>]`.
    pub fn config_key(self) -> &'static str {
        match self {
            Kind::Events => "events",
            Kind::Dlq => "dlq",
            Kind::Cancellations => "cancellations",
            Kind::Dedup => "dedup",
            Kind::Queues => "queues",
            Kind::FlowControl => "flow_control",
            Kind::UrlGroups => "url_groups",
            Kind::Schedules => "schedules",
            Kind::ScheduleFires => "schedule_fires",
            Kind::Pending => "pending",
            Kind::SigningKeys => "signing_keys",
        }
    }

    /// Its topic name after the prefix.
    pub fn topic_suffix(self) -> &'static str {
        match self {
            Kind::Events => "events",
            Kind::Dlq => "dlq",
            Kind::Cancellations => "state.cancellations",
            Kind::Dedup => "state.dedup",
            Kind::Queues => "state.queues",
            Kind::FlowControl => "state.flow_control",
            Kind::UrlGroups => "state.url_groups",
            Kind::Schedules => "state.schedules",
            Kind::ScheduleFires => "state.schedule_fires",
            Kind::Pending => "state.pending",
            Kind::SigningKeys => "state.signing_keys",
        }
    }

    /// The change a record of this kind stands for (`None`: it changes nothing).
    pub fn decode(
        self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        partition: i32,
        offset: i64,
    ) -> Result<Option<Change>, String> {
        let at = (key, value, partition, offset);
        match self {
            Kind::Events => decode_as::<Event>(at),
            // Poison records share the dlq topic (`model::poison`); they are not messages.
            Kind::Dlq if is_poison_key(key) => Ok(None),
            Kind::Dlq => decode_as::<DlqRecord>(at),
            Kind::Cancellations => decode_as::<CancelRecord>(at),
            Kind::Dedup => decode_as::<DedupRecord>(at),
            Kind::Queues => decode_as::<QueueRecord>(at),
            Kind::FlowControl => decode_as::<FlowControlRecord>(at),
            Kind::UrlGroups => decode_as::<UrlGroupRecord>(at),
            Kind::Schedules => decode_as::<ScheduleRecord>(at),
            Kind::ScheduleFires => decode_as::<ScheduleFire>(at),
            Kind::Pending => decode_as::<PendingRecord>(at),
            Kind::SigningKeys => decode_as::<SigningKeysRecord>(at),
        }
    }
}

fn decode_as<R: StateRecord>(
    (key, value, partition, offset): (Option<&[u8]>, Option<&[u8]>, i32, i64),
) -> Result<Option<Change>, String> {
    match value {
        Some(bytes) => R::decode(bytes)
            .map(|r| Some(r.change(partition, offset)))
            .map_err(|e| e.to_string()),
        None => {
            let key = key
                .and_then(|k| std::str::from_utf8(k).ok())
                .ok_or_else(|| "tombstone without a UTF-8 key".to_string())?;
            Ok(R::removal(key.to_string()))
        }
    }
}

/// A record type of a state-bearing topic: which topic, and what it changes in the views.
pub trait StateRecord: Record {
    const KIND: Kind;
    /// The change this record stands for, stored at `partition`/`offset`.
    fn change(self, partition: i32, offset: i64) -> Change;
    /// The change a tombstone for `key` stands for; `None` where tombstones mean nothing.
    fn removal(_key: String) -> Option<Change> {
        None
    }
}

impl StateRecord for Event {
    const KIND: Kind = Kind::Events;
    fn change(self, partition: i32, offset: i64) -> Change {
        Change::Event {
            event: Box::new(self),
            partition,
            offset,
        }
    }
}

impl StateRecord for DlqRecord {
    const KIND: Kind = Kind::Dlq;
    fn change(self, _: i32, _: i64) -> Change {
        Change::Dlq {
            dlq_id: self.dlq_id.clone(),
            record: Some(Box::new(self)),
        }
    }
    fn removal(dlq_id: String) -> Option<Change> {
        Some(Change::Dlq {
            dlq_id,
            record: None,
        })
    }
}

impl StateRecord for CancelRecord {
    const KIND: Kind = Kind::Cancellations;
    fn change(self, _: i32, _: i64) -> Change {
        Change::Cancelled {
            message_id: self.message_id,
            at_ms: self.requested_at,
        }
    }
}

impl StateRecord for PendingRecord {
    const KIND: Kind = Kind::Pending;
    fn change(self, _: i32, _: i64) -> Change {
        Change::Pending {
            message_id: self.message_id,
            message: Some(Box::new(self.message)),
        }
    }
    fn removal(message_id: String) -> Option<Change> {
        Some(Change::Pending {
            message_id,
            message: None,
        })
    }
}

impl StateRecord for DedupRecord {
    const KIND: Kind = Kind::Dedup;
    fn change(self, _: i32, _: i64) -> Change {
        Change::Dedup {
            key: self.key.clone(),
            entry: Some(self),
        }
    }
    fn removal(key: String) -> Option<Change> {
        Some(Change::Dedup { key, entry: None })
    }
}

impl StateRecord for SigningKeysRecord {
    const KIND: Kind = Kind::SigningKeys;
    fn change(self, _: i32, _: i64) -> Change {
        Change::SigningKeys(Box::new(self))
    }
}

/// A record of a compacted settings topic: its key and the change it (or its tombstone) is.
macro_rules! setting_record {
    ($ty:ty, $kind:expr, $variant:ident, $name:ident, $updated:ident) => {
        impl StateRecord for $ty {
            const KIND: Kind = $kind;
            fn change(self, _: i32, _: i64) -> Change {
                Change::$variant {
                    name: self.$name.clone(),
                    record: Some(Box::new(self)),
                }
            }
            fn removal(name: String) -> Option<Change> {
                Some(Change::$variant { name, record: None })
            }
        }

        impl Setting for $ty {
            fn name(&self) -> &str {
                &self.$name
            }
            fn updated_at(&self) -> i64 {
                self.$updated
            }
        }
    };
}

setting_record!(QueueRecord, Kind::Queues, Queue, name, updated_at);
setting_record!(
    FlowControlRecord,
    Kind::FlowControl,
    FlowControl,
    key,
    updated_at
);
setting_record!(UrlGroupRecord, Kind::UrlGroups, UrlGroup, name, updated_at);
setting_record!(
    ScheduleRecord,
    Kind::Schedules,
    Schedule,
    schedule_id,
    updated_at
);
setting_record!(
    ScheduleFire,
    Kind::ScheduleFires,
    ScheduleFire,
    schedule_id,
    fired_at
);

/// One change read from (or written to) a state-bearing topic.
#[derive(Debug, Clone)]
pub enum Change {
    Event {
        event: Box<Event>,
        partition: i32,
        offset: i64,
    },
    /// A DLQ record, or a tombstone for `dlq_id`.
    Dlq {
        dlq_id: String,
        record: Option<Box<DlqRecord>>,
    },
    Cancelled {
        message_id: String,
        at_ms: i64,
    },
    /// A message waiting long (its record on `state.pending`), or its removal once finished.
    Pending {
        message_id: String,
        message: Option<Box<Envelope>>,
    },
    /// A dedup key, or a tombstone.
    Dedup {
        key: String,
        entry: Option<DedupRecord>,
    },
    /// A queue's settings, or its deletion.
    Queue {
        name: String,
        record: Option<Box<QueueRecord>>,
    },
    /// A flow-control key's settings, or their removal.
    FlowControl {
        name: String,
        record: Option<Box<FlowControlRecord>>,
    },
    /// A URL group, or its deletion.
    UrlGroup {
        name: String,
        record: Option<Box<UrlGroupRecord>>,
    },
    /// A schedule's settings, or its deletion.
    Schedule {
        name: String,
        record: Option<Box<ScheduleRecord>>,
    },
    /// The signing keys, seeded or rotated.
    SigningKeys(Box<SigningKeysRecord>),
    /// A schedule's last fire.
    ScheduleFire {
        name: String,
        record: Option<Box<ScheduleFire>>,
    },
}

/// Every view of a process.
pub struct Views {
    pub store: Arc<Store>,
    pub queues: Registry<QueueRecord>,
    pub url_groups: Registry<UrlGroupRecord>,
    pub schedules: Registry<ScheduleRecord>,
    pub schedule_fires: Registry<ScheduleFire>,
    pub flow: flow::FlowView,
    /// The signing keys in force (the view of the signing-keys topic).
    pub signer: Signer,
    /// Bumped whenever queue or flow-control settings change, so waiting lanes look again.
    settings: watch::Sender<u64>,
}

impl Views {
    /// Empty views; `signer` holds the configured keys until the signing-keys topic is read.
    pub fn new(store: Arc<Store>, signer: Signer) -> Self {
        Views {
            signer,
            store,
            queues: Registry::default(),
            url_groups: Registry::default(),
            schedules: Registry::default(),
            schedule_fires: Registry::default(),
            flow: flow::FlowView::default(),
            settings: watch::Sender::new(0),
        }
    }

    /// Applies changes: the on-disk ones in one store transaction, the in-memory ones at once.
    /// Every apply is idempotent (a process applies its own writes, then reads them again from
    /// Kafka).
    pub fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        self.apply_read(changes, &[])
    }

    /// [`Views::apply`] for records read from Kafka: the store also records `positions` (the next
    /// offset of each partition of the topics it keeps), in the same transaction.
    pub fn apply_read(
        &self,
        changes: &[Change],
        positions: &[((String, i32), i64)],
    ) -> Result<(), StoreError> {
        let mut settings_changed = false;
        for change in changes {
            match change {
                Change::Queue { name, record } => {
                    self.queues.apply(name, record.as_deref().cloned());
                    settings_changed = true;
                }
                Change::FlowControl { name, record } => {
                    self.flow.apply(name, record.as_deref().cloned());
                    settings_changed = true;
                }
                Change::UrlGroup { name, record } => {
                    self.url_groups.apply(name, record.as_deref().cloned())
                }
                Change::Schedule { name, record } => {
                    self.schedules.apply(name, record.as_deref().cloned())
                }
                Change::ScheduleFire { name, record } => {
                    self.schedule_fires.apply(name, record.as_deref().cloned())
                }
                Change::Event { event, .. } => self.flow.on_event(event),
                Change::SigningKeys(record) => self.signer.apply(record),
                _ => {}
            }
        }
        if settings_changed {
            self.settings.send_modify(|generation| *generation += 1);
        }
        self.store.apply_read(changes, positions)
    }

    /// Notified whenever queue or flow-control settings change.
    pub fn settings_changes(&self) -> watch::Receiver<u64> {
        self.settings.subscribe()
    }
}
