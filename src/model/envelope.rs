//! The envelope: one Kafka record per message, on the `ready` topic (and the delay and DLQ
//! topics). Callback messages are envelopes too. It carries the body and every piece of metadata a stage needs, so no stage has
//! to look anything up to deliver a message.
//!
//! Design choice: the record value is JSON (schema `schemas/envelope.v1.json`) with the body in
//! base64. JSON keeps the Kafka-native contract readable by any consumer without a schema
//! registry; the 33 % size cost on bodies is accepted for now. `v` is the schema version: fields
//! are only ever added as optional within a version; a reader refuses versions it does not know.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::callback::Callback;

/// Schema version written by this build.
pub const ENVELOPE_VERSION: u32 = 1;

/// Header map in the QStash JSON shape: name → values, names in the case the publisher sent.
pub type HeaderMap = BTreeMap<String, Vec<String>>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Schema version, see [`ENVELOPE_VERSION`].
    pub v: u32,
    pub message_id: String,
    /// Destination URL exactly as published (raw path remainder plus raw query).
    pub url: String,
    /// HTTP method of the delivery.
    pub method: String,
    /// Headers sent to the destination: `Content-Type` and every `Upstash-Forward-X` as `X`.
    #[serde(default)]
    pub header: HeaderMap,
    /// Raw body bytes, base64 (standard alphabet, padded) in JSON.
    #[serde(rename = "bodyBase64", with = "base64_bytes", default)]
    pub body: Vec<u8>,
    /// Accepted at (unix ms).
    pub created_at: i64,
    /// Not to be delivered before (unix ms).
    pub not_before: i64,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Attempts made so far (0 before the first).
    pub retried: u32,
    /// `Upstash-Retry-Delay` expression (ms), evaluated after each failed attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_delay_expression: Option<String>,
    /// Per-attempt timeout (ms) set by `Upstash-Timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// IP address of the publisher.
    #[serde(rename = "callerIP", default, skip_serializing_if = "Option::is_none")]
    pub caller_ip: Option<String>,
    /// `Upstash-Callback*`: called after every attempt (see `model::callback`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<Callback>,
    /// `Upstash-Failure-Callback*`: called once, after the final failed attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_callback: Option<Callback>,
}

/// Reading a record that is not an envelope this build understands.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("envelope is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("envelope version {0} is newer than this build understands ({ENVELOPE_VERSION})")]
    Version(u32),
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serialises")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let envelope: Envelope = serde_json::from_slice(bytes)?;
        if envelope.v > ENVELOPE_VERSION {
            return Err(DecodeError::Version(envelope.v));
        }
        Ok(envelope)
    }
}

/// Serde adapter: bytes as standard padded base64.
pub mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
pub(crate) fn sample() -> Envelope {
    Envelope {
        v: ENVELOPE_VERSION,
        message_id: "msg_1".into(),
        url: "https://example.com/a?b=c".into(),
        method: "PUT".into(),
        header: BTreeMap::from([("Content-Type".to_string(), vec!["text/plain".to_string()])]),
        body: vec![0, 159, 146, 150, b'x'],
        created_at: 1,
        not_before: 2,
        max_retries: 0,
        retried: 0,
        retry_delay_expression: Some("1000 * (1 + retried)".into()),
        timeout_ms: Some(1000),
        labels: vec!["a".into()],
        caller_ip: Some("127.0.0.1".into()),
        callback: Some(super::callback::sample()),
        failure_callback: Some(super::callback::Callback {
            url: "https://example.com/failed".into(),
            method: "POST".into(),
            header: HeaderMap::new(),
            timeout_ms: None,
            retries: 0,
            retry_delay_expression: None,
            delay_ms: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn round_trips_binary_bodies() {
        let e = sample();
        assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
    }

    #[test]
    fn refuses_newer_versions() {
        let mut e = sample();
        e.v = ENVELOPE_VERSION + 1;
        assert!(matches!(
            Envelope::decode(&e.encode()),
            Err(DecodeError::Version(_))
        ));
    }

    /// The schema under `schemas/` is the published contract: every field we write must be in
    /// it, and every field it requires must be written, down into nested objects (`$ref` to
    /// `$defs`). `sample()` fills every optional field, so all of them are checked.
    #[test]
    fn matches_the_published_json_schema() {
        let schema = crate::model::schema_test::schema("envelope.v1.json");
        let written: Value = serde_json::from_slice(&sample().encode()).unwrap();
        crate::model::schema_test::assert_conforms(&written, "envelope.v1.json");
        assert_eq!(
            schema["properties"]["v"]["const"].as_u64(),
            Some(u64::from(ENVELOPE_VERSION))
        );
        for nested in ["callback", "failureCallback"] {
            assert!(written.get(nested).is_some(), "sample() writes {nested}");
        }
    }
}
