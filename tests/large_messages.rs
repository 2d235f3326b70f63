//! Large messages (issue 8, fault 1): a body near the configured limit is stored, delivered,
//! dead-lettered and reported to its callbacks, and the delivery stage commits past it. kstash
//! sizes the producer's `message.max.bytes` and every topic's `max.message.bytes` from
//! `server.body_limit` (a callback carries the body base64-encoded twice), so nothing it accepts is
//! refused by Kafka later. The 900 KB case runs on both brokers; the 10 MB case on the real broker
//! only (the embedded cluster keeps ~5 MiB per partition).

mod common;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::{eventually, Api, Received, Receiver, Script, TestKafka};
use serde_json::Value;

/// A body of `len` bytes that is not one repeated byte (compression must not hide its size).
fn body_of(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

fn payload(got: &Received) -> Value {
    serde_json::from_slice(&got.body).expect("a callback body is JSON")
}

fn source_body(p: &Value) -> Vec<u8> {
    STANDARD
        .decode(p["sourceBody"].as_str().expect("sourceBody"))
        .expect("sourceBody is base64")
}

/// Publishes a `len`-byte body with a callback and a failure callback to a destination that
/// always fails, with no retries; the destination, both callbacks and the DLQ entry all see the
/// whole body, and every ready partition is committed to its end.
async fn large_message_fails_to_the_dlq_with_its_callbacks(body_limit: usize, len: usize) {
    let kafka = TestKafka::new();
    let mut config = kafka.config();
    config.server.body_limit = len.max(body_limit);
    let ready = format!("{}ready", config.kafka.topic_prefix);
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut failing = Receiver::start().await;
    failing.set(Script::status(500));
    let mut callbacks = Receiver::start().await;
    let body = body_of(len);

    let (status, json) = api
        .publish(
            &failing.url("/large"),
            body.clone(),
            &[
                ("Content-Type", "application/octet-stream"),
                ("Upstash-Retries", "0"),
                ("Upstash-Callback", &callbacks.url("/callback")),
                ("Upstash-Failure-Callback", &callbacks.url("/failure")),
            ],
        )
        .await;
    assert_eq!(status, 200, "a {len}-byte body is accepted: {json}");
    let id = json["messageId"].as_str().unwrap().to_string();

    let attempt = failing.next().await;
    assert_eq!(
        attempt.body.len(),
        len,
        "the destination gets the whole body"
    );
    assert!(attempt.body[..] == body[..]);

    let got = callbacks.take(2).await;
    let by_path = |path: &str| {
        got.iter()
            .find(|r| r.uri.path() == path)
            .unwrap_or_else(|| panic!("no request on {path}"))
    };
    let callback = payload(by_path("/callback"));
    assert_eq!(callback["status"], 500);
    assert_eq!(callback["sourceMessageId"], id.as_str());
    assert!(
        source_body(&callback) == body,
        "the callback carries the source body"
    );
    let failure = payload(by_path("/failure"));
    assert!(source_body(&failure) == body);
    let dlq_id = failure["dlqId"].as_str().expect("dlqId").to_string();

    let entry = eventually("the DLQ entry", || async {
        let (status, entry) = api
            .call(reqwest::Method::GET, &format!("/v2/dlq/{dlq_id}"), None)
            .await;
        (status == 200).then_some(entry)
    })
    .await;
    assert_eq!(entry["messageId"], id.as_str());

    kafka.wait_fully_committed(&ready).await;
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_900_kb_message_with_callbacks_reaches_the_dlq_and_the_offsets_catch_up() {
    // The default body limit is 1 MiB.
    large_message_fails_to_the_dlq_with_its_callbacks(0, 900 * 1024).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_10_mb_message_with_callbacks_reaches_the_dlq_on_the_real_broker() {
    let kafka = TestKafka::new();
    if !kafka.is_real() {
        eprintln!("skipped: the embedded cluster keeps ~5 MiB per partition (real broker only)");
        return;
    }
    drop(kafka);
    const TEN_MB: usize = 10 * 1024 * 1024;
    large_message_fails_to_the_dlq_with_its_callbacks(TEN_MB, TEN_MB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_existing_topic_too_small_for_the_body_limit_is_refused_at_start_up() {
    let kafka = TestKafka::new();
    if !kafka.is_real() {
        eprintln!("skipped: the embedded cluster has no topic configs (real broker only)");
        return;
    }
    let mut config = kafka.config();
    config.server.body_limit = 4 * 1024 * 1024;
    // The events topic exists already, made by someone else with the broker's 1 MB limit.
    let events = format!("{}events", config.kafka.topic_prefix);
    kstash::kafka::topics::ensure(
        &config.kafka,
        vec![kstash::kafka::topics::TopicSpec {
            name: events.clone(),
            partitions: 1,
            config: vec![("max.message.bytes".into(), "1048588".into())],
            min_record_bytes: 0,
        }],
        None,
    )
    .await
    .unwrap();
    let refused = kstash::server::start(config, None).await;
    let err = refused.err().expect("kstash refuses to start").to_string();
    assert!(
        err.contains(&events) && err.contains("max.message.bytes"),
        "names the topic and the setting: {err}"
    );
}
