//! JSON shapes the SDKs parse: Message, log entry and DlqMessage.
//!
//! Keys the Python SDK reads with `response["key"]` are always present. Where the SDKs and the
//! docs disagree on a name, both are emitted (`callerIP`/`callerIp`, `responseHeader`/
//! `responseHeaders`, `retryDelayExpr`/`retryDelayExpression`). Bodies are `body` when valid
//! UTF-8, else `bodyBase64` — except in log entries, where `body`/`responseBody` are base64.
//! Every message body and header goes through `model::redact` first (`Upstash-Redact-Fields`).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Map, Value};

use crate::model::callback::Callback;
use crate::model::dlq::DlqRecord;
use crate::model::envelope::Envelope;
use crate::model::event::Event;
use crate::model::flow::FlowControl;
use crate::model::redact::Redact;
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
pub fn message(m: &Envelope) -> Map<String, Value> {
    let m = &*Redact::envelope(m);
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

const MILLIS_PER_SECOND: u64 = 1000;

/// A schedule as the SDKs read it (Python requires scheduleId, destination, cron, createdAt,
/// method, retries), as of `now` with its last fire `fire`; without `lastScheduleStates`, which
/// needs the log.
pub fn schedule(s: &ScheduleRecord, fire: Option<&ScheduleFire>, now: i64) -> Map<String, Value> {
    let m = &*Redact::spec(&s.message);
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
pub fn event(e: &Event) -> Value {
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
    if let Some(m) = e.message.as_deref().map(Redact::envelope) {
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

/// Status reported for a DLQ entry whose last attempt got no response (Python requires the key).
pub const NO_RESPONSE_STATUS: u16 = 0;

/// A DLQ entry (`GET /v2/dlq…`).
pub fn dlq(r: &DlqRecord) -> Value {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::envelope::sample;
    use crate::model::event::State;

    #[test]
    fn message_has_the_keys_python_requires() {
        let m = message(&sample());
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
        let v = event(&e);
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
        let v = schedule(&s, None, now);
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
        let v = schedule(&s, Some(&fired), now + 30_010);
        assert_eq!(v["lastScheduleTime"], now + 30_000);
        assert_eq!(v["error"], "no such URL group");
        assert_eq!(v["nextScheduleTime"], now + 90_000);
    }
}
