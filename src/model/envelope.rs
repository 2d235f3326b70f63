//! The envelope: one Kafka record per message, on the `ready` topic (and the delay and DLQ
//! topics). Callback messages are envelopes too. It carries the body and every piece of metadata
//! a stage needs, so no stage has to look anything up to deliver a message.
//!
//! Design choice: the record value is JSON (schema `schemas/envelope.v1.json`) with the body in
//! base64. JSON keeps the Kafka-native contract readable by any consumer without a schema
//! registry; the 33 % size cost on bodies is accepted for now. `v` is the schema version: fields
//! are only ever added as optional within a version; a reader refuses versions it does not know.
//!
//! The Kafka key is the message's *ordering key* ([`Envelope::ordering_key`]): `q:<queue>` for a
//! queued message, else `f:<flow-control key>`, else the message id. One key lives on one
//! partition, so one consumer owns a queue or a flow-control key, and the delivery stage reads the
//! lane a record belongs to off its key alone. The message id and its flow-control settings also
//! travel as Kafka headers ([`MESSAGE_ID_HEADER`], [`FLOW_CONTROL_KEY_HEADER`],
//! [`FLOW_CONTROL_VALUE_HEADER`]), and so does its destination host ([`DESTINATION_HEADER`]), so
//! the delivery stage can apply them before it decodes the value.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::callback::Callback;
use super::flow::FlowControl;
use crate::kafka::record::JsonRecord;

/// Prefix of the ordering key of a queued message.
pub const QUEUE_KEY_PREFIX: &str = "q:";
/// Prefix of the ordering key of a message with flow control (and no queue).
pub const FLOW_CONTROL_KEY_PREFIX: &str = "f:";
/// Kafka header carrying the message id (the key is the ordering key, not always the id).
pub const MESSAGE_ID_HEADER: &str = "kstash-message-id";
/// Kafka header carrying the message's flow-control key.
pub const FLOW_CONTROL_KEY_HEADER: &str = "kstash-flow-control-key";
/// Kafka header carrying the message's flow-control values (canonical `FlowControl::value`).
pub const FLOW_CONTROL_VALUE_HEADER: &str = "kstash-flow-control-value";
/// Kafka header carrying the message's destination (`host[:port]`, lower case), for the
/// per-destination bound and circuit breaker.
pub const DESTINATION_HEADER: &str = "kstash-destination";

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
    /// The FIFO queue the message was enqueued to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_name: Option<String>,
    /// `Upstash-Flow-Control-Key` and `-Value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_control: Option<FlowControl>,
    /// The URL group the message was published to (one message per endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_name: Option<String>,
    /// The name of that group's endpoint, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_name: Option<String>,
    /// The schedule that published the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_id: Option<String>,
    /// It waits longer than the event log may keep its CREATED event, so it also has a record on
    /// `state.pending` until it finishes (`model::pending`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub long_delay: bool,
    /// `Upstash-Redact-Fields`: what the API shows redacted (the delivery sends the real values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redact: Option<super::redact::Redact>,
}

impl Envelope {
    /// The Kafka key: the queue, else the flow-control key, else the message id (module doc).
    pub fn ordering_key(&self) -> Cow<'_, str> {
        match (&self.queue_name, &self.flow_control) {
            (Some(queue), _) => Cow::Owned(format!("{QUEUE_KEY_PREFIX}{queue}")),
            (None, Some(fc)) => Cow::Owned(format!("{FLOW_CONTROL_KEY_PREFIX}{}", fc.key)),
            (None, None) => Cow::Borrowed(&self.message_id),
        }
    }

    /// Kafka headers beside the value: the message id, its destination, and the flow-control
    /// settings if any.
    pub fn kafka_headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![(MESSAGE_ID_HEADER, self.message_id.clone())];
        if let Some(destination) = destination_of(&self.url) {
            headers.push((DESTINATION_HEADER, destination));
        }
        if let Some(fc) = &self.flow_control {
            headers.push((FLOW_CONTROL_KEY_HEADER, fc.key.clone()));
            headers.push((FLOW_CONTROL_VALUE_HEADER, fc.value()));
        }
        headers
    }
}

/// The destination a URL names for the per-destination bound: `host[:port]` in lower case
/// (the port only when it is not the scheme's default); `None` for a URL without a host.
pub fn destination_of(url: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    let host = url.host_str()?.to_ascii_lowercase();
    Some(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    })
}

impl JsonRecord for Envelope {
    const SCHEMA: &'static str = "envelope";
    const VERSION: u32 = ENVELOPE_VERSION;
    fn key(&self) -> Cow<'_, str> {
        self.ordering_key()
    }
    fn version(&self) -> u32 {
        self.v
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
        queue_name: Some("orders".into()),
        flow_control: Some(FlowControl {
            key: "tenant-1".into(),
            parallelism: Some(2),
            rate: Some(10),
            period_ms: 60_000,
        }),
        topic_name: Some("group".into()),
        endpoint_name: Some("first".into()),
        schedule_id: Some("scd_1".into()),
        long_delay: true,
        redact: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::record::{DecodeError, Record};
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
            Err(DecodeError::Version { .. })
        ));
    }

    #[test]
    fn the_kafka_key_is_the_queue_then_the_flow_control_key_then_the_id() {
        let mut e = sample();
        assert_eq!(e.ordering_key(), "q:orders");
        e.queue_name = None;
        assert_eq!(e.ordering_key(), "f:tenant-1");
        assert_eq!(
            e.kafka_headers()[2],
            (FLOW_CONTROL_KEY_HEADER, "tenant-1".into())
        );
        e.flow_control = None;
        assert_eq!(e.ordering_key(), "msg_1");
        assert_eq!(
            e.kafka_headers(),
            vec![
                (MESSAGE_ID_HEADER, "msg_1".to_string()),
                (DESTINATION_HEADER, "example.com".to_string())
            ]
        );
    }

    #[test]
    fn the_destination_is_the_host_and_a_non_default_port() {
        assert_eq!(
            destination_of("https://API.example.com/a?b").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(
            destination_of("http://127.0.0.1:8080/x").as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(
            destination_of("http://example.com:80/").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            destination_of("http://[::1]:9/").as_deref(),
            Some("[::1]:9")
        );
        assert_eq!(destination_of("not a url"), None);
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
        for nested in ["callback", "failureCallback", "flowControl"] {
            assert!(written.get(nested).is_some(), "sample() writes {nested}");
        }
    }
}
