//! Callbacks and failure callbacks end to end: the callback message after
//! every attempt with the documented payload, the failure callback with `dlqId` after the final
//! failure, forwarded callback headers (`-Forward-` and the Python SDK's lenient form), signing
//! with `sub` = the callback URL, the callback's own id, retries and delay, and refusal of invalid
//! callback headers. Runs on the embedded cluster, or on a real broker with KSTASH_TEST_BROKERS.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::{Api, Received, Receiver, Script, TestKafka, CURRENT_KEY};
use kstash::kafka::record::Record;
use kstash::model::dlq::DlqRecord;
use kstash::model::event::State;
use serde_json::Value;

/// Status, header and body of the test destination that answers with a body.
const REPLY_STATUS: u16 = 201;
const REPLY_HEADER: (&str, &str) = ("x-reply", "from the destination");
const REPLY_BODY: &[u8] = b"created \x00\xff";
/// Lateness allowed for a delayed delivery (see tests/delay.rs).
const MAX_LATENESS: Duration = Duration::from_millis(900);

/// A destination that answers every request with [`REPLY_STATUS`], [`REPLY_HEADER`] and
/// [`REPLY_BODY`] (the harness receiver answers with empty bodies).
async fn replying_destination() -> SocketAddr {
    let app = Router::new().fallback(|| async {
        let mut response =
            (StatusCode::from_u16(REPLY_STATUS).unwrap(), REPLY_BODY).into_response();
        response
            .headers_mut()
            .insert(REPLY_HEADER.0, REPLY_HEADER.1.parse().unwrap());
        response
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// The callback request's JSON body.
fn payload(got: &Received) -> Value {
    serde_json::from_slice(&got.body).unwrap_or_else(|e| {
        panic!(
            "callback body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&got.body)
        )
    })
}

fn base64_field(payload: &Value, field: &str) -> Vec<u8> {
    let text = payload[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string: {payload}"));
    STANDARD
        .decode(text)
        .unwrap_or_else(|e| panic!("{field} is not base64 ({e}): {text:?}"))
}

/// A string of unix ms, as the docs show `notBefore` and `createdAt`.
fn ms_string(payload: &Value, field: &str) -> i64 {
    let text = payload[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string: {payload}"));
    text.parse()
        .unwrap_or_else(|_| panic!("{field} is not a number of ms: {text:?}"))
}

fn publish_id(status: u16, json: &Value) -> String {
    assert_eq!(status, 200, "{json}");
    json["messageId"].as_str().unwrap().to_string()
}

use common::event_states as states;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callback_after_a_successful_delivery_reports_every_field() {
    let kafka = TestKafka::new();
    let config = kafka.config();
    let events = format!("{}events", config.kafka.topic_prefix);
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let destination = format!("http://{}/hook?x=1", replying_destination().await);
    let mut callbacks = Receiver::start().await;
    let source_body: Vec<u8> = vec![0, 1, 2, 255, b'h', b'i'];

    let before = kstash::model::now_ms();
    let (status, json) = api
        .publish(
            &destination,
            source_body.clone(),
            &[
                ("Content-Type", "application/octet-stream"),
                ("Upstash-Forward-X-Source", "s"),
                ("Upstash-Method", "PUT"),
                ("Upstash-Retries", "2"),
                ("Upstash-Label", "billing"),
                ("Upstash-Callback", &callbacks.url("/callback")),
            ],
        )
        .await;
    let id = publish_id(status, &json);

    let got = callbacks.next().await;
    assert_eq!(got.method, "POST", "callbacks are POSTed by default");
    assert_eq!(got.uri.path(), "/callback");
    assert_eq!(got.header("content-type"), Some("application/json"));
    let p = payload(&got);
    assert_eq!(p["status"], REPLY_STATUS);
    assert_eq!(
        p["header"][REPLY_HEADER.0],
        serde_json::json!([REPLY_HEADER.1]),
        "response headers: {p}"
    );
    assert_eq!(base64_field(&p, "body"), REPLY_BODY, "response body");
    assert_eq!(p["retried"], 0);
    assert_eq!(p["maxRetries"], 2);
    assert_eq!(p["sourceMessageId"], id.as_str());
    assert_eq!(p["url"], destination.as_str());
    assert_eq!(p["method"], "PUT");
    assert_eq!(
        p["sourceHeader"]["Content-Type"],
        serde_json::json!(["application/octet-stream"])
    );
    assert_eq!(p["sourceHeader"]["X-Source"], serde_json::json!(["s"]));
    assert_eq!(base64_field(&p, "sourceBody"), source_body);
    let (created_at, not_before) = (ms_string(&p, "createdAt"), ms_string(&p, "notBefore"));
    assert!(
        (before..=got.wall_ms).contains(&created_at),
        "createdAt {created_at} is the publish time"
    );
    assert_eq!(not_before, created_at, "published without a delay");
    assert_eq!(p["callerIP"], "127.0.0.1");
    assert_eq!(p["labels"], serde_json::json!(["billing"]));
    assert!(
        p.get("dlqId").is_none(),
        "only failure callbacks have dlqId"
    );

    // The callback is a message of its own, with its own lifecycle.
    let callback_id = got.message_id();
    let records = kafka.read_until(&events, |r| {
        states(r, &callback_id).contains(&State::Delivered)
            && states(r, &id).contains(&State::Delivered)
    });
    assert_eq!(
        states(&records, &callback_id),
        [State::Created, State::Active, State::Delivered]
    );
    kstash.stop().await;
    let counts = callbacks.counts();
    assert_eq!(counts.len(), 1, "one attempt, one callback: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callback_after_each_failed_attempt_and_one_failure_callback_with_the_dlq_id() {
    let kafka = TestKafka::new();
    let config = kafka.config();
    let dlq = format!("{}dlq", config.kafka.topic_prefix);
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut destination = Receiver::start().await;
    destination.set(Script::status(500));
    let mut callbacks = Receiver::start().await;
    let mut failures = Receiver::start().await;

    let (status, json) = api
        .publish(
            &destination.url("/down"),
            "payload",
            &[
                ("Upstash-Retries", "1"),
                ("Upstash-Retry-Delay", "200"),
                ("Upstash-Callback", &callbacks.url("/each")),
                ("Upstash-Failure-Callback", &failures.url("/failed")),
            ],
        )
        .await;
    let id = publish_id(status, &json);

    let mut attempts: Vec<Value> = Vec::new();
    for _ in 0..2 {
        attempts.push(payload(&callbacks.next().await));
    }
    attempts.sort_by_key(|p| p["retried"].as_u64());
    for (n, p) in attempts.iter().enumerate() {
        assert_eq!(p["retried"], n, "one callback per attempt: {p}");
        assert_eq!(p["maxRetries"], 1);
        assert_eq!(p["status"], 500);
        assert_eq!(p["sourceMessageId"], id.as_str());
        assert_eq!(base64_field(p, "sourceBody"), b"payload");
        assert!(p.get("dlqId").is_none(), "{p}");
    }

    let failed = failures.next().await;
    assert_eq!(failed.header("content-type"), Some("application/json"));
    let f = payload(&failed);
    assert_eq!(f["status"], 500, "the last attempt's status");
    assert_eq!(
        (f["retried"].as_u64(), f["maxRetries"].as_u64()),
        (Some(1), Some(1)),
        "sent after the last attempt"
    );
    assert_eq!(f["sourceMessageId"], id.as_str());
    assert_eq!(f["url"], destination.url("/down").as_str());
    let dlq_id = f["dlqId"].as_str().expect("dlqId").to_string();
    let dead: Vec<DlqRecord> = kafka
        .read_until(&dlq, |r| {
            r.iter()
                .any(|r| DlqRecord::decode(r).unwrap().message.message_id == id)
        })
        .iter()
        .map(|r| DlqRecord::decode(r).unwrap())
        .collect();
    let record = dead.iter().find(|d| d.message.message_id == id).unwrap();
    assert_eq!(record.dlq_id, dlq_id, "dlqId names the DLQ record");

    kstash.stop().await;
    let each = callbacks.counts();
    assert_eq!(each.len(), 2, "exactly one callback per attempt: {each:?}");
    let once = failures.counts();
    assert_eq!(once.len(), 1, "exactly one failure callback: {once:?}");
    assert!(once.values().all(|n| *n == 1), "{once:?}");
    assert_eq!(destination.counts()[&id], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callback_requests_carry_forwarded_headers_their_own_id_and_a_signature() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let destination = Receiver::start().await;
    destination.set(Script::status(500));
    let mut callbacks = Receiver::start().await;
    let callback_url = callbacks.url("/cb?kind=each");
    let failure_url = callbacks.url("/cb?kind=failure");

    let (status, json) = api
        .publish(
            &destination.url("/x"),
            "x",
            &[
                ("Upstash-Retries", "0"),
                ("Upstash-Callback", &callback_url),
                ("Upstash-Callback-Forward-X-Documented", "forward form"),
                // The Python SDK's callback_headers={"X-Python": …}.
                ("Upstash-Callback-X-Python", "lenient form"),
                ("Upstash-Failure-Callback", &failure_url),
                (
                    "Upstash-Failure-Callback-Forward-Upstash-Workflow-Is-Failure",
                    "true",
                ),
                ("Upstash-Failure-Callback-X-Python", "failure lenient"),
            ],
        )
        .await;
    let id = publish_id(status, &json);

    let mut by_kind = std::collections::HashMap::new();
    for _ in 0..2 {
        let got = callbacks.next().await;
        by_kind.insert(got.uri.query().unwrap_or_default().to_string(), got);
    }
    let each = &by_kind["kind=each"];
    assert_eq!(each.header("x-documented"), Some("forward form"));
    assert_eq!(each.header("x-python"), Some("lenient form"));
    assert!(each.header("upstash-workflow-is-failure").is_none());
    let failure = &by_kind["kind=failure"];
    assert_eq!(failure.header("upstash-workflow-is-failure"), Some("true"));
    assert_eq!(failure.header("x-python"), Some("failure lenient"));
    assert!(failure.header("x-documented").is_none());

    for (got, url) in [(each, &callback_url), (failure, &failure_url)] {
        assert!(
            got.headers
                .keys()
                .all(|k| !k.as_str().starts_with("upstash-callback")
                    && !k.as_str().starts_with("upstash-failure-callback")),
            "no control headers leak: {:?}",
            got.headers
        );
        let own_id = got.message_id();
        assert!(own_id.starts_with("msg_"), "{own_id}");
        assert_ne!(own_id, id, "a callback is a message of its own");
        assert_eq!(got.header("upstash-retried"), Some("0"));
        assert_eq!(got.header("user-agent"), Some("Upstash-QStash"));

        let token = got.header("upstash-signature").expect("signed");
        let claims = common::verify_signature(token, CURRENT_KEY, &got.body);
        assert_eq!(&claims.sub, url, "sub is the callback URL");
    }
    assert_ne!(each.message_id(), failure.message_id());
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_callback_endpoint_is_retried_with_its_own_settings() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let destination = Receiver::start().await;
    let mut callbacks = Receiver::start().await;
    callbacks.set(Script::fail_first(1, 503, &[]));

    let (status, json) = api
        .publish(
            &destination.url("/ok"),
            "x",
            &[
                ("Upstash-Retries", "0"),
                ("Upstash-Callback", &callbacks.url("/flaky")),
                ("Upstash-Callback-Retries", "2"),
                ("Upstash-Callback-Retry-Delay", "200"),
            ],
        )
        .await;
    let id = publish_id(status, &json);
    let first = callbacks.next().await;
    let second = callbacks.next().await;
    assert_eq!(
        first.message_id(),
        second.message_id(),
        "the same callback message, retried"
    );
    assert_eq!(first.header("upstash-retried"), Some("0"));
    assert_eq!(second.header("upstash-retried"), Some("1"));
    assert_eq!(first.body, second.body, "same payload on every attempt");
    assert_eq!(payload(&second)["sourceMessageId"], id.as_str());
    let gap = second.at - first.at;
    assert!(
        gap >= Duration::from_millis(200) && gap <= Duration::from_millis(200) + MAX_LATENESS,
        "Upstash-Callback-Retry-Delay sets the gap: {gap:?}"
    );
    kstash.stop().await;
    assert_eq!(
        callbacks.counts()[&first.message_id()],
        2,
        "delivered on the retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callback_retries_default_to_the_message_settings() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let destination = Receiver::start().await;
    let mut callbacks = Receiver::start().await;
    callbacks.set(Script::status(500));

    let (status, json) = api
        .publish(
            &destination.url("/ok"),
            "x",
            &[
                ("Upstash-Retries", "1"),
                ("Upstash-Retry-Delay", "200"),
                ("Upstash-Callback", &callbacks.url("/down")),
            ],
        )
        .await;
    publish_id(status, &json);
    let first = callbacks.next().await;
    let second = callbacks.next().await;
    assert_eq!(first.message_id(), second.message_id());
    assert_eq!(second.header("upstash-retried"), Some("1"));
    let gap = second.at - first.at;
    assert!(
        gap <= Duration::from_millis(200) + MAX_LATENESS,
        "the message's retry delay applies: {gap:?}"
    );
    kstash.stop().await;
    assert_eq!(
        callbacks.counts()[&first.message_id()],
        2,
        "1 + the message's Upstash-Retries attempts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callback_delay_postpones_the_callback() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut destination = Receiver::start().await;
    let mut callbacks = Receiver::start().await;
    let (status, json) = api
        .publish(
            &destination.url("/ok"),
            "x",
            &[
                ("Upstash-Callback", &callbacks.url("/later")),
                ("Upstash-Callback-Delay", "1s"),
                ("Upstash-Callback-Method", "PATCH"),
            ],
        )
        .await;
    publish_id(status, &json);
    let delivered = destination.next().await;
    let got = callbacks.next().await;
    assert_eq!(got.method, "PATCH");
    let gap = got.at - delivered.at;
    assert!(
        gap >= Duration::from_secs(1) && gap <= Duration::from_secs(1) + MAX_LATENESS,
        "Upstash-Callback-Delay: {gap:?}"
    );
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_callback_headers_are_refused_with_400() {
    let kafka = TestKafka::new();
    let config = kafka.config();
    let too_many = (config.delivery.max_retries + 1).to_string();
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let destination = Receiver::start().await;
    for (header, value, needle) in [
        ("Upstash-Callback", "not a url", "Upstash-Callback"),
        (
            "Upstash-Callback",
            "ftp://example.com/cb",
            "Upstash-Callback",
        ),
        (
            "Upstash-Failure-Callback",
            "/relative",
            "Upstash-Failure-Callback",
        ),
        ("Upstash-Callback-Retries", too_many.as_str(), "maximum"),
        (
            "Upstash-Callback-Method",
            "TRACE",
            "Upstash-Callback-Method",
        ),
    ] {
        let (status, json) = api
            .publish(
                &destination.url("/never"),
                "x",
                &[
                    ("Upstash-Callback", "https://example.com/cb"),
                    (header, value),
                ],
            )
            .await;
        assert_eq!(status, 400, "{header}: {value}: {json}");
        let error = json["error"].as_str().expect("JSON error");
        assert!(error.contains(needle), "{header}: {value}: {error}");
    }
    kstash.stop().await;
}
