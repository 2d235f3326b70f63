//! Poison records: a record a pipeline stage cannot read (not a kstash record, or a schema version
//! newer than this build), kept with the reason instead of being committed and forgotten.
//!
//! Design choice: the record goes to the `dlq` topic, where an operator already looks for what
//! failed, as a record type of its own (`poison.v1`, keyed `poison:<topic>:<partition>:<offset>`),
//! carrying the original key, value and headers byte for byte, so it can be inspected, fixed and
//! produced again with any Kafka tool. The key is derived from where the record was read, so
//! quarantining it again after a crash overwrites the same compacted entry. The DLQ view skips
//! these entries: they are not messages, and the DLQ API lists messages.

use serde::{Deserialize, Serialize};

use super::envelope::base64_bytes;

/// Schema version written by this build.
pub const POISON_VERSION: u32 = 1;
/// Prefix of the Kafka key of a poison record on the dlq topic.
pub const POISON_KEY_PREFIX: &str = "poison:";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoisonRecord {
    pub v: u32,
    /// `poison:<topic>:<partition>:<offset>`: the Kafka key.
    pub id: String,
    /// Where the record was read.
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The stage that could not read it (`delivery`, `delay`).
    pub stage: String,
    /// Why it could not be read.
    pub reason: String,
    /// When it was quarantined (unix ms).
    pub quarantined_at: i64,
    /// The original key, value and headers, byte for byte.
    #[serde(
        rename = "keyBase64",
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_base64"
    )]
    pub key: Option<Vec<u8>>,
    #[serde(
        rename = "valueBase64",
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_base64"
    )]
    pub value: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<PoisonHeader>,
}

/// One Kafka header of the original record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoisonHeader {
    pub name: String,
    #[serde(
        rename = "valueBase64",
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_base64"
    )]
    pub value: Option<Vec<u8>>,
}

crate::json_record!(PoisonRecord, "poison", POISON_VERSION, key = id);

impl PoisonRecord {
    /// The Kafka key of the poison record for the record at `topic`/`partition`/`offset`.
    pub fn key_for(topic: &str, partition: i32, offset: i64) -> String {
        format!("{POISON_KEY_PREFIX}{topic}:{partition}:{offset}")
    }
}

/// Whether a key on the dlq topic is a poison record's.
pub fn is_poison_key(key: Option<&[u8]>) -> bool {
    key.is_some_and(|k| k.starts_with(POISON_KEY_PREFIX.as_bytes()))
}

mod optional_base64 {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => super::base64_bytes::serialize(b, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        super::base64_bytes::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::record::Record;

    #[test]
    fn round_trips_and_matches_the_published_schema() {
        let r = PoisonRecord {
            v: POISON_VERSION,
            id: PoisonRecord::key_for("kstash.ready", 3, 42),
            topic: "kstash.ready".into(),
            partition: 3,
            offset: 42,
            stage: "delivery".into(),
            reason: "not a kstash envelope".into(),
            quarantined_at: 7,
            key: Some(b"msg_1".to_vec()),
            value: Some(vec![0xff, 0x00, b'{']),
            headers: vec![
                PoisonHeader {
                    name: "kstash-schema".into(),
                    value: Some(b"envelope.v9".to_vec()),
                },
                PoisonHeader {
                    name: "empty".into(),
                    value: None,
                },
            ],
        };
        crate::model::schema_test::assert_round_trip(&r, "poison.v1.json");
        assert!(is_poison_key(Some(r.key().as_bytes())));
        assert!(!is_poison_key(Some(b"dlq_1")));
        assert!(!is_poison_key(None));
    }
}
