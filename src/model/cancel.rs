//! Cancel requests: one record per cancelled message on the compacted cancellations topic (key:
//! the message id; schema `schemas/cancel.v1.json`). Every delivery worker checks its view of them
//! before each attempt.

use serde::{Deserialize, Serialize};

/// Schema version of [`CancelRecord`].
pub const CANCEL_VERSION: u32 = 1;

/// A request to cancel a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelRecord {
    #[serde(default = "version")]
    pub v: u32,
    pub message_id: String,
    /// When the cancel was requested (unix ms).
    pub requested_at: i64,
}

fn version() -> u32 {
    CANCEL_VERSION
}

impl CancelRecord {
    pub fn new(message_id: &str, requested_at: i64) -> Self {
        CancelRecord {
            v: CANCEL_VERSION,
            message_id: message_id.to_string(),
            requested_at,
        }
    }
}

crate::json_record!(CancelRecord, "cancel", CANCEL_VERSION, key = message_id);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_matches_the_published_schema() {
        let r = CancelRecord::new("msg_1", 5);
        crate::model::schema_test::assert_round_trip(&r, "cancel.v1.json");
    }
}
