//! Deduplication records: one per dedup key on the compacted dedup topic
//! (schema `schemas/dedup.v1.json`). The key is `id:<Upstash-Deduplication-Id>` or
//! `content:<hash>`; the value names the message the key first stood for and when it expires.

use serde::{Deserialize, Serialize};

/// Schema version of [`DedupRecord`].
pub const DEDUP_VERSION: u32 = 1;

/// What a dedup key points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DedupRecord {
    #[serde(default = "version")]
    pub v: u32,
    pub key: String,
    pub message_id: String,
    pub url: String,
    /// Unix ms after which the key no longer deduplicates.
    pub expires_at: i64,
}

fn version() -> u32 {
    DEDUP_VERSION
}

crate::json_record!(DedupRecord, "dedup", DEDUP_VERSION, key = key);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_matches_the_published_schema() {
        let r = DedupRecord {
            v: DEDUP_VERSION,
            key: "id:a".into(),
            message_id: "msg_1".into(),
            url: "https://x".into(),
            expires_at: 9,
        };
        crate::model::schema_test::assert_round_trip(&r, "dedup.v1.json");
    }
}
