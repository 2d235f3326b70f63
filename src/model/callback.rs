//! Callbacks and failure callbacks: what a message asks for, and the message
//! kstash sends when it is due.
//!
//! A message published with `Upstash-Callback` carries a [`Callback`] in its envelope; after every
//! delivery attempt, success or failure, the delivery stage turns the attempt into a
//! [`CallbackPayload`] and [`Callback::message`] wraps it into a brand-new envelope, which then
//! flows through the ordinary pipeline (delay ladder, signing with `sub` = the callback URL,
//! retries, DLQ, events) like any published message. `Upstash-Failure-Callback` works the same,
//! once, after the final failed attempt, with the DLQ record's id in `dlqId`.
//!
//! Design choices:
//! - A callback message has no callbacks of its own, so callbacks can never chain or loop. It has
//!   no labels and no caller IP either; the payload reports the source message's. It is in no
//!   queue and under no flow control: it is a notification to the publisher's own endpoint, not
//!   part of the source's ordered stream.
//! - Its headers are the forwarded callback headers plus `Content-Type: application/json`
//!   (the payload is JSON), unless the publisher forwarded a `Content-Type` of their own.
//! - Settings the publisher left out are resolved at publish time (see `model::headers`), so the
//!   stored [`Callback`] is complete: retries and the retry-delay expression default to the
//!   source message's, the method to `POST`, the timeout to the server's delivery timeout.
//! - `status` is `0` when the attempt got no HTTP response at all (timeout, connection error,
//!   refused address): there is no status to report, and `0` is what an HTTP client reports for
//!   "no response". `header` is then `{}` and `body` is `""`.
//! - `notBefore` and `createdAt` are strings of unix milliseconds, as in the QStash docs.

use serde::{Deserialize, Serialize};

use super::envelope::{base64_bytes, Envelope, HeaderMap, ENVELOPE_VERSION};
use super::ids;
use super::redact::Redact;

/// Content type of callback payloads.
pub const PAYLOAD_CONTENT_TYPE: &str = "application/json";
/// Status reported in a payload when the attempt got no HTTP response.
pub const NO_RESPONSE_STATUS: u16 = 0;
/// Header name under which the payload's content type is sent.
const CONTENT_TYPE: &str = "Content-Type";

/// A callback (or failure callback) as stored in the envelope, every setting resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Callback {
    /// Absolute http(s) URL the callback message is delivered to.
    pub url: String,
    /// HTTP method of the callback message (`Upstash-Callback-Method`, default POST).
    pub method: String,
    /// Headers forwarded to the callback URL (`Upstash-Callback-Forward-X` → `X`).
    #[serde(default)]
    pub header: HeaderMap,
    /// Per-attempt timeout (ms) of the callback message; absent = the server default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Retries of the callback message after its first attempt.
    pub retries: u32,
    /// `Upstash-Retry-Delay` expression of the callback message (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_delay_expression: Option<String>,
    /// Delay (ms) between the attempt and the callback's first delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
}

impl Callback {
    /// The callback message carrying `payload`, created at `now_ms`: a new envelope with a new
    /// id, no callbacks of its own, due after the callback delay; its body is shown redacted
    /// when its source redacts anything (`source_redact`).
    pub fn message(
        &self,
        payload: &CallbackPayload,
        source_redact: Option<&Redact>,
        now_ms: i64,
    ) -> Envelope {
        let mut header = self.header.clone();
        if !header
            .keys()
            .any(|name| name.eq_ignore_ascii_case(CONTENT_TYPE))
        {
            header.insert(
                CONTENT_TYPE.to_string(),
                vec![PAYLOAD_CONTENT_TYPE.to_string()],
            );
        }
        let delay_ms = self
            .delay_ms
            .map_or(0, |d| i64::try_from(d).unwrap_or(i64::MAX));
        Envelope {
            v: ENVELOPE_VERSION,
            message_id: ids::message_id(),
            url: self.url.clone(),
            method: self.method.clone(),
            header,
            body: payload.encode(),
            created_at: now_ms,
            not_before: now_ms.saturating_add(delay_ms),
            max_retries: self.retries,
            retried: 0,
            retry_delay_expression: self.retry_delay_expression.clone(),
            timeout_ms: self.timeout_ms,
            labels: Vec::new(),
            caller_ip: None,
            callback: None,
            failure_callback: None,
            queue_name: None,
            flow_control: None,
            topic_name: None,
            endpoint_name: None,
            schedule_id: None,
            long_delay: false,
            // The payload carries the source's body and headers: shown redacted as a whole when
            // the source redacts anything.
            redact: source_redact.map(|_| Redact {
                body: true,
                ..Redact::default()
            }),
        }
    }
}

/// What one attempt got back, as a callback reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptResponse<'a> {
    pub status: u16,
    pub header: &'a HeaderMap,
    pub body: &'a [u8],
}

/// The JSON body of a callback or failure-callback message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallbackPayload {
    /// HTTP status of the attempt; [`NO_RESPONSE_STATUS`] when there was no response.
    pub status: u16,
    /// Response headers of the attempt.
    pub header: HeaderMap,
    /// Response body of the attempt (as kept by the delivery stage), base64.
    #[serde(with = "base64_bytes")]
    pub body: Vec<u8>,
    /// Retries done before this attempt (the source envelope's `retried`).
    pub retried: u32,
    pub max_retries: u32,
    pub source_message_id: String,
    /// Destination of the source message.
    pub url: String,
    /// Method of the source message.
    pub method: String,
    /// Headers the source message was delivered with.
    pub source_header: HeaderMap,
    /// Body of the source message, base64.
    #[serde(with = "base64_bytes")]
    pub source_body: Vec<u8>,
    /// Due time of the attempt (unix ms, as a string).
    pub not_before: String,
    /// When the source message was accepted (unix ms, as a string).
    pub created_at: String,
    #[serde(rename = "callerIP", default, skip_serializing_if = "Option::is_none")]
    pub caller_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Failure callbacks only: the DLQ record of the failed message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dlq_id: Option<String>,
}

impl CallbackPayload {
    /// The payload reporting one attempt of `source`; `response` is `None` when the attempt got
    /// no HTTP response, `dlq_id` is set for failure callbacks.
    pub fn new(
        source: &Envelope,
        response: Option<AttemptResponse<'_>>,
        dlq_id: Option<&str>,
    ) -> Self {
        let (status, header, body) = match response {
            Some(r) => (r.status, r.header.clone(), r.body.to_vec()),
            None => (NO_RESPONSE_STATUS, HeaderMap::new(), Vec::new()),
        };
        CallbackPayload {
            status,
            header,
            body,
            retried: source.retried,
            max_retries: source.max_retries,
            source_message_id: source.message_id.clone(),
            url: source.url.clone(),
            method: source.method.clone(),
            source_header: source.header.clone(),
            source_body: source.body.clone(),
            not_before: source.not_before.to_string(),
            created_at: source.created_at.to_string(),
            caller_ip: source.caller_ip.clone(),
            labels: source.labels.clone(),
            dlq_id: dlq_id.map(String::from),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a callback payload always serialises")
    }
}

#[cfg(test)]
pub(crate) fn sample() -> Callback {
    Callback {
        url: "https://example.com/callback".into(),
        method: "PUT".into(),
        header: HeaderMap::from([("X-Cb".to_string(), vec!["1".to_string()])]),
        timeout_ms: Some(2000),
        retries: 2,
        retry_delay_expression: Some("100 * retried".into()),
        delay_ms: Some(3000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde_json::Value;

    fn source() -> Envelope {
        let mut e = crate::model::envelope::sample();
        e.message_id = "msg_source".into();
        e.retried = 1;
        e.max_retries = 3;
        e.created_at = 1_700_000_000_000;
        e.not_before = 1_700_000_012_345;
        e
    }

    fn json(payload: &CallbackPayload) -> Value {
        serde_json::from_slice(&payload.encode()).unwrap()
    }

    #[test]
    fn payload_reports_the_attempt_and_the_source_in_the_documented_shape() {
        let e = source();
        let header = HeaderMap::from([("x-r".to_string(), vec!["a".to_string()])]);
        let p = CallbackPayload::new(
            &e,
            Some(AttemptResponse {
                status: 503,
                header: &header,
                body: b"down",
            }),
            None,
        );
        let j = json(&p);
        assert_eq!(j["status"], 503);
        assert_eq!(j["header"]["x-r"][0], "a");
        assert_eq!(
            STANDARD.decode(j["body"].as_str().unwrap()).unwrap(),
            b"down"
        );
        assert_eq!(j["retried"], 1, "the source's retried for this attempt");
        assert_eq!(j["maxRetries"], 3);
        assert_eq!(j["sourceMessageId"], "msg_source");
        assert_eq!(j["url"], "https://example.com/a?b=c");
        assert_eq!(j["method"], "PUT");
        assert_eq!(j["sourceHeader"]["Content-Type"][0], "text/plain");
        assert_eq!(
            STANDARD.decode(j["sourceBody"].as_str().unwrap()).unwrap(),
            e.body
        );
        assert_eq!(j["notBefore"], "1700000012345", "a string of ms");
        assert_eq!(j["createdAt"], "1700000000000", "a string of ms");
        assert_eq!(j["callerIP"], "127.0.0.1");
        assert_eq!(j["labels"][0], "a");
        assert!(j.get("dlqId").is_none(), "only on failure callbacks");
        assert_eq!(
            serde_json::from_value::<CallbackPayload>(j).unwrap(),
            p,
            "round trip"
        );
    }

    #[test]
    fn no_response_is_status_zero_and_failure_callbacks_carry_the_dlq_id() {
        let p = CallbackPayload::new(&source(), None, Some("dlq_1"));
        let j = json(&p);
        assert_eq!(j["status"], NO_RESPONSE_STATUS);
        assert_eq!(j["header"], serde_json::json!({}));
        assert_eq!(j["body"], "");
        assert_eq!(j["dlqId"], "dlq_1");
    }

    #[test]
    fn callback_message_is_a_new_json_message_without_callbacks() {
        let mut e = source();
        e.callback = Some(sample());
        e.failure_callback = Some(sample());
        let payload = CallbackPayload::new(&e, None, None);
        let settings = sample();
        let m = settings.message(&payload, None, 5_000);
        assert!(m.message_id.starts_with(ids::MESSAGE_ID_PREFIX));
        assert_ne!(m.message_id, e.message_id);
        assert_eq!(m.url, "https://example.com/callback");
        assert_eq!(m.method, "PUT");
        assert_eq!(m.header["X-Cb"], vec!["1"]);
        assert_eq!(m.header["Content-Type"], vec![PAYLOAD_CONTENT_TYPE]);
        assert_eq!(
            serde_json::from_slice::<CallbackPayload>(&m.body).unwrap(),
            payload
        );
        assert_eq!(
            (m.created_at, m.not_before),
            (5_000, 8_000),
            "delay applies"
        );
        assert_eq!((m.retried, m.max_retries), (0, 2));
        assert_eq!(m.retry_delay_expression.as_deref(), Some("100 * retried"));
        assert_eq!(m.timeout_ms, Some(2000));
        assert_eq!((m.callback, m.failure_callback), (None, None), "no chains");

        let mut own_type = sample();
        own_type.delay_ms = None;
        own_type
            .header
            .insert("content-type".into(), vec!["text/plain".into()]);
        let m = own_type.message(&payload, None, 5_000);
        assert_eq!(m.not_before, 5_000, "no delay: due at once");
        assert!(
            !m.header.contains_key("Content-Type"),
            "a forwarded Content-Type wins"
        );
        assert_eq!(m.header["content-type"], vec!["text/plain"]);
    }
}
