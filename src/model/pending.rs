//! Pending records: a message that waits longer than the event log may keep its CREATED event
//! (`state.long_delay_after`, below the events topic's retention) is also written to the compacted
//! `state.pending` topic, keyed by its id, and removed (a tombstone) when it is delivered, fails or
//! is cancelled. So `GET /v2/messages/{id}` and cancel find it for as long as it waits, however long
//! ago it was published; the events topic only needs to keep recent history.
//!
//! Design choice: only long waits pay the extra write, so the hot path (publish → deliver within
//! the retention) is unchanged; the envelope carries `longDelay` so the delivery stage knows which
//! finished messages have a record to remove.

use serde::{Deserialize, Serialize};

use super::envelope::Envelope;

/// Schema version written by this build.
pub const PENDING_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingRecord {
    pub v: u32,
    /// The Kafka key.
    pub message_id: String,
    /// The message as published.
    pub message: Envelope,
}

crate::json_record!(PendingRecord, "pending", PENDING_VERSION, key = message_id);

impl PendingRecord {
    pub fn new(message: &Envelope) -> Self {
        PendingRecord {
            v: PENDING_VERSION,
            message_id: message.message_id.clone(),
            message: message.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_matches_the_published_schema() {
        let r = PendingRecord::new(&crate::model::envelope::sample());
        crate::model::schema_test::assert_round_trip(&r, "pending.v1.json");
    }
}
