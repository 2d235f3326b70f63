//! Cancel requests: one record per cancelled message on the compacted cancellations topic (key:
//! the message id; schema `schemas/cancel.v1.json`). Every delivery worker checks its view of them
//! before each attempt.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::kafka::record::JsonRecord;

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

impl JsonRecord for CancelRecord {
    const SCHEMA: &'static str = "cancel";
    const VERSION: u32 = CANCEL_VERSION;
    fn key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.message_id)
    }
    fn version(&self) -> u32 {
        self.v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::record::Record;

    #[test]
    fn round_trips_and_matches_the_published_schema() {
        let r = CancelRecord::new("msg_1", 5);
        assert_eq!(CancelRecord::decode(&r.encode()).unwrap(), r);
        let written: serde_json::Value = serde_json::from_slice(&r.encode()).unwrap();
        crate::model::schema_test::assert_conforms(&written, "cancel.v1.json");
    }
}
