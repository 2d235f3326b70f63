//! Dead-letter records: a message whose last attempt failed, with that attempt's result.
//!
//! Stored on the compacted `dlq` topic keyed by dlq id, so deleting an entry (or retrying it) is a
//! tombstone and the topic converges to the live entries; schema `schemas/dlq.v1.json`.

use serde::{Deserialize, Serialize};

use super::envelope::{base64_bytes, Envelope, HeaderMap};

/// Schema version written by this build.
pub const DLQ_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DlqRecord {
    pub v: u32,
    pub dlq_id: String,
    /// When the message failed for good (unix ms).
    pub failed_at: i64,
    /// The message as it was on its last attempt.
    pub message: Envelope,
    /// Status of the last attempt; absent when it got no response (timeout, connection error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header: Option<HeaderMap>,
    #[serde(
        rename = "responseBodyBase64",
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "base64_bytes"
    )]
    pub response_body: Vec<u8>,
    /// Why the last attempt failed.
    pub error: String,
}

crate::json_record!(DlqRecord, "dlq", DLQ_VERSION, key = dlq_id);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_matches_the_published_schema() {
        let r = DlqRecord {
            v: DLQ_VERSION,
            dlq_id: "dlq_1".into(),
            failed_at: 3,
            message: crate::model::envelope::sample(),
            response_status: Some(500),
            response_header: Some(HeaderMap::from([("a".into(), vec!["b".into()])])),
            response_body: b"down".to_vec(),
            error: "destination answered 500".into(),
        };
        crate::model::schema_test::assert_round_trip(&r, "dlq.v1.json");
    }
}
