//! Deduplication records (`qstash-api.md` §8.2): one per dedup key on the compacted dedup topic
//! (schema `schemas/dedup.v1.json`). The key is `id:<Upstash-Deduplication-Id>` or
//! `content:<hash>`; the value names the message the key first stood for and when it expires.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::kafka::record::JsonRecord;

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

impl JsonRecord for DedupRecord {
    const SCHEMA: &'static str = "dedup";
    const VERSION: u32 = DEDUP_VERSION;
    fn key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.key)
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
        let r = DedupRecord {
            v: DEDUP_VERSION,
            key: "id:a".into(),
            message_id: "msg_1".into(),
            url: "https://x".into(),
            expires_at: 9,
        };
        assert_eq!(DedupRecord::decode(&r.encode()).unwrap(), r);
        let written: serde_json::Value = serde_json::from_slice(&r.encode()).unwrap();
        crate::model::schema_test::assert_conforms(&written, "dedup.v1.json");
    }
}
