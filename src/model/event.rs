//! Lifecycle events, written to the `events` topic (key: message id, so one message's events stay
//! in order on one partition). They feed the logs API and any Kafka-native consumer.
//!
//! The JSON shape follows the QStash log entry so the logs API can serve
//! records nearly as stored; schema `schemas/event.v1.json`.

use serde::{Deserialize, Serialize};

use super::envelope::{base64_bytes, Envelope, HeaderMap};

/// Schema version written by this build.
pub const EVENT_VERSION: u32 = 1;

/// Message states as the SDKs spell them (`CANCELED`, one L).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    Created,
    Active,
    Error,
    Retry,
    Delivered,
    Failed,
    CancelRequested,
    Canceled,
}

impl State {
    /// Whether nothing follows this state for the message.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            State::Delivered | State::Failed | State::CancelRequested | State::Canceled
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub v: u32,
    /// When it happened (unix ms).
    pub time: i64,
    pub message_id: String,
    pub state: State,
    pub url: String,
    pub method: String,
    /// Retries done so far when the event happened.
    pub retried: u32,
    pub max_retries: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header: Option<HeaderMap>,
    #[serde(
        rename = "responseBodyBase64",
        with = "option_base64",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub response_body: Option<Vec<u8>>,
    /// The whole message, on CREATED events only: the log and `GET /v2/messages` read it from
    /// here, so any process can answer for any message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Box<Envelope>>,
    /// When the next attempt is due (unix ms), on ERROR and RETRY events of a retried message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_delivery_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// IP address of the publisher.
    #[serde(rename = "callerIP", default, skip_serializing_if = "Option::is_none")]
    pub caller_ip: Option<String>,
    /// The message's FIFO queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_name: Option<String>,
    /// The message's flow-control key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_control_key: Option<String>,
    /// The URL group the message was published to, and its endpoint's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_name: Option<String>,
    /// The schedule that published the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_id: Option<String>,
}

crate::json_record!(Event, "event", EVENT_VERSION, key = message_id);

impl Event {
    /// An event about `envelope` with nothing but its identity filled in.
    pub fn new(envelope: &Envelope, state: State, time: i64) -> Self {
        Event {
            v: EVENT_VERSION,
            time,
            message_id: envelope.message_id.clone(),
            state,
            url: envelope.url.clone(),
            method: envelope.method.clone(),
            retried: envelope.retried,
            max_retries: envelope.max_retries,
            error: None,
            response_status: None,
            response_header: None,
            response_body: None,
            message: None,
            next_delivery_time: None,
            labels: envelope.labels.clone(),
            caller_ip: envelope.caller_ip.clone(),
            queue_name: envelope.queue_name.clone(),
            flow_control_key: envelope.flow_control.as_ref().map(|fc| fc.key.clone()),
            topic_name: envelope.topic_name.clone(),
            endpoint_name: envelope.endpoint_name.clone(),
            schedule_id: envelope.schedule_id.clone(),
        }
    }
}

mod option_base64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => super::base64_bytes::serialize(b, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::base64_bytes")] Vec<u8>);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::record::Record;
    use serde_json::Value;

    #[test]
    fn states_are_spelled_as_the_sdks_expect() {
        assert_eq!(
            serde_json::to_string(&State::Canceled).unwrap(),
            "\"CANCELED\""
        );
        assert_eq!(
            serde_json::to_string(&State::CancelRequested).unwrap(),
            "\"CANCEL_REQUESTED\""
        );
    }

    #[test]
    fn round_trips_and_matches_the_published_schema() {
        let mut e = Event::new(&crate::model::envelope::sample(), State::Error, 5);
        e.response_status = Some(500);
        e.response_body = Some(vec![1, 2, 3]);
        e.response_header = Some(HeaderMap::from([("A".into(), vec!["b".into()])]));
        e.error = Some("boom".into());
        e.next_delivery_time = Some(9);
        e.message = Some(Box::new(crate::model::envelope::sample()));
        assert_eq!(Event::decode(&e.encode()).unwrap(), e);

        let written: Value = serde_json::from_slice(&e.encode()).unwrap();
        crate::model::schema_test::assert_conforms(&written, "event.v1.json");
    }
}
