//! JSON shapes the SDKs parse: Message, log entry, schedule and DlqMessage, as typed structs (so
//! the OpenAPI document, `api::openapi`, describes exactly what is sent), and [`Reply`], the JSON
//! answer every handler sends.
//!
//! Keys the Python SDK reads with `response["key"]` are always present; optional keys are left
//! out when empty (`skip_serializing_if`), never sent as `null`. Where the SDKs and the docs
//! disagree on a name, both are emitted (`callerIP`/`callerIp`, `responseHeader`/
//! `responseHeaders`, `retryDelayExpr`/`retryDelayExpression`). Bodies are `body` when valid
//! UTF-8, else `bodyBase64` — except in log entries, where `body`/`responseBody` are base64.
//! Every message body and header goes through `model::redact` first (`Upstash-Redact-Fields`).
//!
//! Design choice: [`Reply`] encodes through `serde_json::Value`, whose objects keep their keys
//! sorted, so the bytes on the wire do not depend on the order fields are declared in (the
//! answers were built as sorted JSON maps before they had types, and stay byte-for-byte the same).

use std::collections::BTreeMap;

use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use crate::model::callback::Callback;
use crate::model::dlq::DlqRecord;
use crate::model::envelope::{Envelope, HeaderMap};
use crate::model::event::{Event, State};
use crate::model::flow::FlowControl;
use crate::model::redact::Redact;
use crate::model::schedule::{CronSpec, ScheduleFire, ScheduleRecord};

/// A JSON answer: `T` encoded with its object keys sorted (see the module doc).
#[derive(Debug, Clone)]
pub struct Reply<T>(pub T);

impl<T: Serialize> IntoResponse for Reply<T> {
    fn into_response(self) -> Response {
        match serde_json::to_value(&self.0) {
            Ok(value) => Json(value).into_response(),
            // Only a map with non-string keys fails to encode; no answer type has one.
            Err(e) => {
                ApiError::Unavailable(format!("answer could not be encoded: {e}")).into_response()
            }
        }
    }
}

/// `{"deleted": n}`: how many were deleted.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Deleted {
    pub deleted: usize,
}

/// A body as text when it is UTF-8 (first), else base64 (second).
fn text_or_base64(body: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(body) {
        Ok(text) => (Some(text.to_string()), None),
        Err(_) => (None, Some(STANDARD.encode(body))),
    }
}

/// `label` (the first) and `labels`, both absent without labels.
fn labels(labels: &[String]) -> (Option<String>, Option<Vec<String>>) {
    match labels.first() {
        Some(first) => (Some(first.clone()), Some(labels.to_vec())),
        None => (None, None),
    }
}

/// A callback's URL and headers.
fn callback(cb: &Option<Callback>) -> (Option<String>, Option<HeaderMap>) {
    match cb {
        Some(cb) => (Some(cb.url.clone()), Some(cb.header.clone())),
        None => (None, None),
    }
}

/// Flow control of a message: `flowControlKey`, `parallelism`, `rate`, `period` (seconds, as the
/// TS tests read it).
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub flow_control_key: Option<String>,
    /// Deliveries in flight at most.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub parallelism: Option<u32>,
    /// Delivery starts per period at most.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub rate: Option<u32>,
    /// Length of the rate period (seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub period: Option<u64>,
}

impl FlowFields {
    fn of(fc: Option<&FlowControl>) -> Self {
        fc.map_or_else(FlowFields::default, |fc| FlowFields {
            flow_control_key: Some(fc.key.clone()),
            parallelism: fc.parallelism,
            rate: fc.rate,
            period: Some(fc.period_ms / MILLIS_PER_SECOND),
        })
    }
}

const MILLIS_PER_SECOND: u64 = 1000;

/// A pending message (`GET /v2/messages/{messageId}`).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageView {
    pub message_id: String,
    /// The destination URL.
    pub url: String,
    /// HTTP method of the delivery.
    pub method: String,
    /// Headers sent to the destination.
    #[schema(inline)]
    pub header: HeaderMap,
    /// The body, when it is UTF-8 text.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub body: Option<String>,
    /// The body (standard base64), when it is not UTF-8 text.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub body_base64: Option<String>,
    pub max_retries: u32,
    /// Attempts made so far.
    pub retried: u32,
    /// Not to be delivered before (unix ms).
    pub not_before: i64,
    /// Accepted at (unix ms).
    pub created_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub retry_delay_expression: Option<String>,
    /// Per-attempt timeout (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub callback: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, inline)]
    pub callback_header: Option<HeaderMap>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub failure_callback: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, inline)]
    pub failure_callback_header: Option<HeaderMap>,
    /// The first label.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub labels: Option<Vec<String>>,
    #[serde(rename = "callerIP", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub caller_ip_upper: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub caller_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub queue_name: Option<String>,
    /// The URL group ("topic") it was published to.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub topic_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub endpoint_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub schedule_id: Option<String>,
    #[serde(flatten)]
    pub flow_control: FlowFields,
}

/// A message (`GET /v2/messages/{id}`).
pub fn message(m: &Envelope) -> MessageView {
    let m = &*Redact::envelope(m);
    let (body, body_base64) = text_or_base64(&m.body);
    let (callback_url, callback_header) = callback(&m.callback);
    let (failure_callback, failure_callback_header) = callback(&m.failure_callback);
    let (label, labels) = labels(&m.labels);
    MessageView {
        message_id: m.message_id.clone(),
        url: m.url.clone(),
        method: m.method.clone(),
        header: m.header.clone(),
        body,
        body_base64,
        max_retries: m.max_retries,
        retried: m.retried,
        not_before: m.not_before,
        created_at: m.created_at,
        retry_delay_expression: m.retry_delay_expression.clone(),
        timeout: m.timeout_ms,
        callback: callback_url,
        callback_header,
        failure_callback,
        failure_callback_header,
        label,
        labels,
        caller_ip_upper: m.caller_ip.clone(),
        caller_ip: m.caller_ip.clone(),
        queue_name: m.queue_name.clone(),
        topic_name: m.topic_name.clone(),
        endpoint_name: m.endpoint_name.clone(),
        schedule_id: m.schedule_id.clone(),
        flow_control: FlowFields::of(m.flow_control.as_ref()),
    }
}

/// What the last fire's messages became (`lastScheduleStates`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FireState {
    InProgress,
    Success,
    Fail,
}

/// A schedule as the SDKs read it (Python requires scheduleId, destination, cron, createdAt,
/// method, retries).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleView {
    pub schedule_id: String,
    /// Five cron fields, UTC unless prefixed with `CRON_TZ=<zone> `.
    pub cron: String,
    /// A URL or the name of a URL group.
    pub destination: String,
    pub method: String,
    #[schema(inline)]
    pub header: HeaderMap,
    /// The body, when it is UTF-8 text.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub body: Option<String>,
    /// The body (standard base64), when it is not UTF-8 text.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub body_base64: Option<String>,
    pub retries: u32,
    pub created_at: i64,
    pub is_paused: bool,
    /// Delay of each fired message (seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub delay: Option<u64>,
    /// Per-attempt timeout (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub retry_delay_expression: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub callback: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, inline)]
    pub callback_header: Option<HeaderMap>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub failure_callback: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, inline)]
    pub failure_callback_header: Option<HeaderMap>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub queue_name: Option<String>,
    #[serde(rename = "callerIP", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub caller_ip_upper: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub caller_ip: Option<String>,
    #[serde(flatten)]
    pub flow_control: FlowFields,
    /// The first label.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub labels: Option<Vec<String>>,
    /// When it last fired (unix ms); absent before the first fire.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub last_schedule_time: Option<i64>,
    /// Why the last fire published nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error: Option<String>,
    /// When it fires next (unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub next_schedule_time: Option<i64>,
    /// Message id → what became of it, for the messages of the last fire.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub last_schedule_states: Option<BTreeMap<String, FireState>>,
}

/// A schedule as of `now` with its last fire `fire`; without `lastScheduleStates`, which needs
/// the log.
pub fn schedule(s: &ScheduleRecord, fire: Option<&ScheduleFire>, now: i64) -> ScheduleView {
    let m = &*Redact::spec(&s.message);
    let (body, body_base64) = text_or_base64(&m.body);
    let (callback_url, callback_header) = callback(&m.callback);
    let (failure_callback, failure_callback_header) = callback(&m.failure_callback);
    let (label, labels) = labels(&m.labels);
    let next_schedule_time = CronSpec::parse(&s.cron).ok().and_then(|cron| {
        s.next_fire(&cron, fire.map(|f| f.scheduled_at))
            .map(|next| next.max(now))
    });
    ScheduleView {
        schedule_id: s.schedule_id.clone(),
        cron: s.cron.clone(),
        destination: s.destination.clone(),
        method: m.method.clone(),
        header: m.header.clone(),
        body,
        body_base64,
        retries: m.max_retries,
        created_at: s.created_at,
        is_paused: s.paused,
        delay: m.delay_ms.map(|d| d / MILLIS_PER_SECOND),
        timeout: m.timeout_ms,
        retry_delay_expression: m.retry_delay_expression.clone(),
        callback: callback_url,
        callback_header,
        failure_callback,
        failure_callback_header,
        queue_name: s.queue_name.clone(),
        caller_ip_upper: m.caller_ip.clone(),
        caller_ip: m.caller_ip.clone(),
        flow_control: FlowFields::of(m.flow_control.as_ref()),
        label,
        labels,
        last_schedule_time: fire.map(|f| f.scheduled_at),
        error: fire.and_then(|f| f.error.clone()),
        next_schedule_time,
        last_schedule_states: None,
    }
}

/// A log entry (`GET /v2/events`, `/v2/logs`). The fields from `header` to
/// `failureCallbackHeaders` are present when the entry carries its message.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventView {
    /// When it happened (unix ms).
    pub time: i64,
    pub message_id: String,
    pub state: State,
    pub url: String,
    pub method: String,
    pub max_retries: u32,
    pub retried: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error: Option<String>,
    /// When the next attempt is due (unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub next_delivery_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub response_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, inline)]
    pub response_header: Option<HeaderMap>,
    /// Same as `responseHeader`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, inline)]
    pub response_headers: Option<HeaderMap>,
    /// The response body, standard base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub response_body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, inline)]
    pub header: Option<HeaderMap>,
    /// The message body, standard base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub not_before: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub created_at: Option<i64>,
    /// Per-attempt timeout (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub retry_delay_expr: Option<String>,
    /// Same as `retryDelayExpr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub retry_delay_expression: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub callback: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, inline)]
    pub callback_headers: Option<HeaderMap>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub failure_callback: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, inline)]
    pub failure_callback_headers: Option<HeaderMap>,
    /// The first label.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub labels: Option<Vec<String>>,
    #[serde(rename = "callerIP", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub caller_ip_upper: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub caller_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub queue_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub topic_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub endpoint_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub schedule_id: Option<String>,
    #[serde(flatten)]
    pub flow_control: FlowFields,
}

/// A log entry (`GET /v2/events`, `/v2/logs`).
pub fn event(e: &Event) -> EventView {
    let shown = e.message.as_deref().map(Redact::envelope);
    let m = shown.as_deref();
    let (callback_url, callback_headers) = callback(m.map_or(&None, |m| &m.callback));
    let (failure_callback, failure_callback_headers) =
        callback(m.map_or(&None, |m| &m.failure_callback));
    let (label, labels) = labels(&e.labels);
    let flow_control = match m.and_then(|m| m.flow_control.as_ref()) {
        Some(fc) => FlowFields::of(Some(fc)),
        None => FlowFields {
            flow_control_key: e.flow_control_key.clone(),
            ..FlowFields::default()
        },
    };
    EventView {
        time: e.time,
        message_id: e.message_id.clone(),
        state: e.state,
        url: e.url.clone(),
        method: e.method.clone(),
        max_retries: e.max_retries,
        retried: e.retried,
        error: e.error.clone(),
        next_delivery_time: e.next_delivery_time,
        response_status: e.response_status,
        response_header: e.response_header.clone(),
        response_headers: e.response_header.clone(),
        response_body: e.response_body.as_ref().map(|b| STANDARD.encode(b)),
        header: m.map(|m| m.header.clone()),
        body: m.map(|m| STANDARD.encode(&m.body)),
        not_before: m.map(|m| m.not_before),
        created_at: m.map(|m| m.created_at),
        timeout: m.and_then(|m| m.timeout_ms),
        retry_delay_expr: m.and_then(|m| m.retry_delay_expression.clone()),
        retry_delay_expression: m.and_then(|m| m.retry_delay_expression.clone()),
        callback: callback_url,
        callback_headers,
        failure_callback,
        failure_callback_headers,
        label,
        labels,
        caller_ip_upper: e.caller_ip.clone(),
        caller_ip: e.caller_ip.clone(),
        queue_name: e.queue_name.clone(),
        topic_name: e.topic_name.clone(),
        endpoint_name: e.endpoint_name.clone(),
        schedule_id: e.schedule_id.clone(),
        flow_control,
    }
}

/// Status reported for a DLQ entry whose last attempt got no response (Python requires the key).
pub const NO_RESPONSE_STATUS: u16 = 0;

/// A DLQ entry (`GET /v2/dlq…`): the message as on its last attempt, and how that attempt ended.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DlqView {
    #[serde(flatten)]
    pub message: MessageView,
    pub dlq_id: String,
    /// Status of the last attempt; 0 when it got no response.
    pub response_status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, inline)]
    pub response_header: Option<HeaderMap>,
    /// The last response's body, when it is UTF-8 text.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub response_body: Option<String>,
    /// The last response's body (standard base64), when it is not UTF-8 text.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub response_body_base64: Option<String>,
    /// Why the last attempt failed.
    pub error: String,
    /// When the message failed for good (unix ms).
    pub failed_at: i64,
}

/// A DLQ entry (`GET /v2/dlq…`).
pub fn dlq(r: &DlqRecord) -> DlqView {
    let (response_body, response_body_base64) = if r.response_body.is_empty() {
        (None, None)
    } else {
        text_or_base64(&r.response_body)
    };
    DlqView {
        message: message(&r.message),
        dlq_id: r.dlq_id.clone(),
        response_status: r.response_status.unwrap_or(NO_RESPONSE_STATUS),
        response_header: r.response_header.clone(),
        response_body,
        response_body_base64,
        error: r.error.clone(),
        failed_at: r.failed_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::envelope::sample;
    use crate::model::event::State;
    use serde_json::{json, Map, Value};

    /// The maps the answers were built as before they had types (the previous `render`), kept
    /// to prove the typed answers encode to the same bytes.
    mod legacy {
        use base64::engine::general_purpose::STANDARD;
        use base64::Engine;
        use serde_json::{json, Map, Value};

        use crate::model::callback::Callback;
        use crate::model::dlq::DlqRecord;
        use crate::model::envelope::Envelope;
        use crate::model::event::Event;
        use crate::model::flow::FlowControl;
        use crate::model::schedule::{CronSpec, ScheduleFire, ScheduleRecord};

        /// Inserts `key: value` when `value` is `Some`.
        fn put<T: serde::Serialize>(o: &mut Map<String, Value>, key: &str, value: Option<T>) {
            if let Some(v) = value {
                o.insert(key.to_string(), json!(v));
            }
        }

        /// `body` as text when it is UTF-8, else `bodyBase64`.
        fn put_body(o: &mut Map<String, Value>, text_key: &str, base64_key: &str, body: &[u8]) {
            match std::str::from_utf8(body) {
                Ok(text) => o.insert(text_key.to_string(), json!(text)),
                Err(_) => o.insert(base64_key.to_string(), json!(STANDARD.encode(body))),
            };
        }

        fn put_labels(o: &mut Map<String, Value>, labels: &[String]) {
            if let Some(first) = labels.first() {
                o.insert("label".into(), json!(first));
                o.insert("labels".into(), json!(labels));
            }
        }

        fn put_caller_ip(o: &mut Map<String, Value>, ip: Option<&String>) {
            put(o, "callerIP", ip);
            put(o, "callerIp", ip);
        }

        /// `callback` and `failureCallback` with their headers under `<key><header_suffix>` (the
        /// message shape says `callbackHeader`, the log entry `callbackHeaders`).
        fn put_callbacks(
            o: &mut Map<String, Value>,
            callback: &Option<Callback>,
            failure_callback: &Option<Callback>,
            header_suffix: &str,
        ) {
            for (key, cb) in [
                ("callback", callback),
                ("failureCallback", failure_callback),
            ] {
                if let Some(cb) = cb {
                    o.insert(key.into(), json!(cb.url));
                    o.insert(format!("{key}{header_suffix}"), json!(cb.header));
                }
            }
        }

        /// A message (`GET /v2/messages/{id}`).
        pub(super) fn message(m: &Envelope) -> Map<String, Value> {
            let mut o = Map::new();
            o.insert("messageId".into(), json!(m.message_id));
            o.insert("url".into(), json!(m.url));
            o.insert("method".into(), json!(m.method));
            o.insert("header".into(), json!(m.header));
            put_body(&mut o, "body", "bodyBase64", &m.body);
            o.insert("maxRetries".into(), json!(m.max_retries));
            o.insert("retried".into(), json!(m.retried));
            o.insert("notBefore".into(), json!(m.not_before));
            o.insert("createdAt".into(), json!(m.created_at));
            put(
                &mut o,
                "retryDelayExpression",
                m.retry_delay_expression.as_ref(),
            );
            put(&mut o, "timeout", m.timeout_ms);
            put_callbacks(&mut o, &m.callback, &m.failure_callback, "Header");
            put_labels(&mut o, &m.labels);
            put_caller_ip(&mut o, m.caller_ip.as_ref());
            put(&mut o, "queueName", m.queue_name.as_ref());
            put(&mut o, "topicName", m.topic_name.as_ref());
            put(&mut o, "endpointName", m.endpoint_name.as_ref());
            put(&mut o, "scheduleId", m.schedule_id.as_ref());
            put_flow_control(&mut o, m.flow_control.as_ref());
            o
        }

        /// `flowControlKey`, `parallelism`, `rate`, `period` (seconds, as the TS tests read it).
        fn put_flow_control(o: &mut Map<String, Value>, fc: Option<&FlowControl>) {
            if let Some(fc) = fc {
                o.insert("flowControlKey".into(), json!(fc.key));
                put(o, "parallelism", fc.parallelism);
                put(o, "rate", fc.rate);
                o.insert("period".into(), json!(fc.period_ms / MILLIS_PER_SECOND));
            }
        }

        use super::super::MILLIS_PER_SECOND;

        /// A schedule as the SDKs read it (Python requires scheduleId, destination, cron, createdAt,
        /// method, retries), as of `now` with its last fire `fire`; without `lastScheduleStates`, which
        /// needs the log.
        pub(super) fn schedule(
            s: &ScheduleRecord,
            fire: Option<&ScheduleFire>,
            now: i64,
        ) -> Map<String, Value> {
            let m = &s.message;
            let mut o = Map::new();
            o.insert("scheduleId".into(), json!(s.schedule_id));
            o.insert("cron".into(), json!(s.cron));
            o.insert("destination".into(), json!(s.destination));
            o.insert("method".into(), json!(m.method));
            o.insert("header".into(), json!(m.header));
            put_body(&mut o, "body", "bodyBase64", &m.body);
            o.insert("retries".into(), json!(m.max_retries));
            o.insert("createdAt".into(), json!(s.created_at));
            o.insert("isPaused".into(), json!(s.paused));
            put(&mut o, "delay", m.delay_ms.map(|d| d / MILLIS_PER_SECOND));
            put(&mut o, "timeout", m.timeout_ms);
            put(
                &mut o,
                "retryDelayExpression",
                m.retry_delay_expression.as_ref(),
            );
            put_callbacks(&mut o, &m.callback, &m.failure_callback, "Header");
            put(&mut o, "queueName", s.queue_name.as_ref());
            put_caller_ip(&mut o, m.caller_ip.as_ref());
            put_flow_control(&mut o, m.flow_control.as_ref());
            put_labels(&mut o, &m.labels);
            if let Some(f) = fire {
                o.insert("lastScheduleTime".into(), json!(f.scheduled_at));
                put(&mut o, "error", f.error.as_ref());
            }
            if let Ok(cron) = CronSpec::parse(&s.cron) {
                if let Some(next) = s.next_fire(&cron, fire.map(|f| f.scheduled_at)) {
                    o.insert("nextScheduleTime".into(), json!(next.max(now)));
                }
            }
            o
        }

        /// A log entry (`GET /v2/events`, `/v2/logs`).
        pub(super) fn event(e: &Event) -> Value {
            let mut o = Map::new();
            o.insert("time".into(), json!(e.time));
            o.insert("messageId".into(), json!(e.message_id));
            o.insert("state".into(), json!(e.state));
            o.insert("url".into(), json!(e.url));
            o.insert("method".into(), json!(e.method));
            o.insert("maxRetries".into(), json!(e.max_retries));
            o.insert("retried".into(), json!(e.retried));
            put(&mut o, "error", e.error.as_ref());
            put(&mut o, "nextDeliveryTime", e.next_delivery_time);
            put(&mut o, "responseStatus", e.response_status);
            put(&mut o, "responseHeader", e.response_header.as_ref());
            put(&mut o, "responseHeaders", e.response_header.as_ref());
            put(
                &mut o,
                "responseBody",
                e.response_body.as_ref().map(|b| STANDARD.encode(b)),
            );
            if let Some(m) = &e.message {
                o.insert("header".into(), json!(m.header));
                o.insert("body".into(), json!(STANDARD.encode(&m.body)));
                o.insert("notBefore".into(), json!(m.not_before));
                o.insert("createdAt".into(), json!(m.created_at));
                put(&mut o, "timeout", m.timeout_ms);
                put(&mut o, "retryDelayExpr", m.retry_delay_expression.as_ref());
                put(
                    &mut o,
                    "retryDelayExpression",
                    m.retry_delay_expression.as_ref(),
                );
                put_callbacks(&mut o, &m.callback, &m.failure_callback, "Headers");
            }
            put_labels(&mut o, &e.labels);
            put_caller_ip(&mut o, e.caller_ip.as_ref());
            put(&mut o, "queueName", e.queue_name.as_ref());
            put(&mut o, "topicName", e.topic_name.as_ref());
            put(&mut o, "endpointName", e.endpoint_name.as_ref());
            put(&mut o, "scheduleId", e.schedule_id.as_ref());
            match e.message.as_deref().and_then(|m| m.flow_control.as_ref()) {
                Some(fc) => put_flow_control(&mut o, Some(fc)),
                None => put(&mut o, "flowControlKey", e.flow_control_key.as_ref()),
            }
            Value::Object(o)
        }

        use super::super::NO_RESPONSE_STATUS;

        /// A DLQ entry (`GET /v2/dlq…`).
        pub(super) fn dlq(r: &DlqRecord) -> Value {
            let mut o = message(&r.message);
            o.insert("dlqId".into(), json!(r.dlq_id));
            o.insert(
                "responseStatus".into(),
                json!(r.response_status.unwrap_or(NO_RESPONSE_STATUS)),
            );
            put(&mut o, "responseHeader", r.response_header.as_ref());
            if !r.response_body.is_empty() {
                put_body(
                    &mut o,
                    "responseBody",
                    "responseBodyBase64",
                    &r.response_body,
                );
            }
            o.insert("error".into(), json!(r.error));
            o.insert("failedAt".into(), json!(r.failed_at));
            Value::Object(o)
        }
    }

    /// An answer as the JSON object it is sent as.
    fn map(answer: impl serde::Serialize) -> Map<String, Value> {
        match serde_json::to_value(answer).unwrap() {
            Value::Object(o) => o,
            other => panic!("not an object: {other}"),
        }
    }

    /// The bytes [`Reply`] sends for `answer`.
    fn wire(answer: impl serde::Serialize) -> String {
        serde_json::to_string(&serde_json::to_value(answer).unwrap()).unwrap()
    }

    #[test]
    fn typed_answers_are_byte_for_byte_the_maps_they_replace() {
        let text = crate::model::envelope::Envelope {
            body: b"hello".to_vec(),
            labels: vec![],
            caller_ip: None,
            flow_control: None,
            callback: None,
            queue_name: None,
            ..sample()
        };
        for m in [sample(), text] {
            assert_eq!(
                wire(message(&m)),
                serde_json::to_string(&legacy::message(&m)).unwrap()
            );
            for state in [State::Created, State::Delivered] {
                let mut e = Event::new(&m, state, 7);
                assert_eq!(wire(event(&e)), legacy::event(&e).to_string());
                e.message = None;
                e.response_header = Some(Default::default());
                e.response_body = Some(b"no".to_vec());
                e.response_status = Some(500);
                e.error = Some("boom".into());
                assert_eq!(wire(event(&e)), legacy::event(&e).to_string());
            }
            for (status, body) in [
                (None, vec![]),
                (Some(500), b"oops".to_vec()),
                (Some(502), vec![0xff]),
            ] {
                let r = DlqRecord {
                    v: 1,
                    dlq_id: "dlq_1".into(),
                    failed_at: 9,
                    message: m.clone(),
                    response_status: status,
                    response_header: status.map(|_| Default::default()),
                    response_body: body,
                    error: "failed".into(),
                };
                assert_eq!(wire(dlq(&r)), legacy::dlq(&r).to_string());
            }
        }
        let s = crate::model::schedule::sample();
        let now = crate::model::schedule::SAMPLE_CREATED_AT;
        let fired = ScheduleFire {
            v: 1,
            schedule_id: s.schedule_id.clone(),
            scheduled_at: now + 30_000,
            fired_at: now + 30_010,
            message_ids: vec![],
            error: Some("no such URL group".into()),
        };
        for fire in [None, Some(&fired)] {
            assert_eq!(
                wire(schedule(&s, fire, now)),
                serde_json::to_string(&legacy::schedule(&s, fire, now)).unwrap()
            );
        }
    }

    #[test]
    fn message_has_the_keys_python_requires() {
        let m = map(message(&sample()));
        for key in [
            "messageId",
            "url",
            "method",
            "maxRetries",
            "notBefore",
            "createdAt",
        ] {
            assert!(m.contains_key(key), "{key}");
        }
        // sample body is not UTF-8
        assert!(m.contains_key("bodyBase64") && !m.contains_key("body"));
        assert_eq!(m["callerIP"], m["callerIp"]);
        assert_eq!(m["label"], "a");
        assert_eq!(m["queueName"], "orders");
        assert_eq!(m["flowControlKey"], "tenant-1");
        assert_eq!(
            (&m["parallelism"], &m["rate"], &m["period"]),
            (&json!(2), &json!(10), &json!(60)),
            "period in seconds"
        );
    }

    #[test]
    fn log_entries_spell_states_and_fields_as_the_sdks_read_them() {
        let mut e = Event::new(&sample(), State::Canceled, 7);
        e.response_header = Some(Default::default());
        let v = serde_json::to_value(event(&e)).unwrap();
        assert_eq!(v["state"], "CANCELED");
        for key in [
            "time",
            "messageId",
            "state",
            "url",
            "responseHeader",
            "responseHeaders",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
    }

    #[test]
    fn schedule_has_the_keys_python_requires_and_the_sdk_spellings() {
        let s = crate::model::schedule::sample();
        let now = crate::model::schedule::SAMPLE_CREATED_AT;
        let v = map(schedule(&s, None, now));
        for key in [
            "scheduleId",
            "destination",
            "cron",
            "createdAt",
            "method",
            "retries",
        ] {
            assert!(v.contains_key(key), "{key}");
        }
        assert_eq!(v["body"], "tick");
        assert_eq!(v["delay"], 1, "delay in seconds");
        assert_eq!(v["callback"], "https://example.com/callback");
        assert!(v.contains_key("callbackHeader") && !v.contains_key("callbackHeaders"));
        assert_eq!(v["queueName"], "q");
        assert_eq!(v["flowControlKey"], "k");
        assert_eq!(v["isPaused"], false);
        assert!(!v.contains_key("lastScheduleTime"), "never fired");
        // The next full minute after 10:00:30.
        assert_eq!(v["nextScheduleTime"], now + 30_000);

        let fired = ScheduleFire {
            v: 1,
            schedule_id: s.schedule_id.clone(),
            scheduled_at: now + 30_000,
            fired_at: now + 30_010,
            message_ids: vec![],
            error: Some("no such URL group".into()),
        };
        let v = map(schedule(&s, Some(&fired), now + 30_010));
        assert_eq!(v["lastScheduleTime"], now + 30_000);
        assert_eq!(v["error"], "no such URL group");
        assert_eq!(v["nextScheduleTime"], now + 90_000);
    }
}
