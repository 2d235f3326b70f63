//! End-to-end delivery through Kafka: publish over HTTP, consume from the ready topic, deliver to
//! a local receiver. Runs on the embedded cluster, or on a real broker with KSTASH_TEST_BROKERS.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine;
use common::{Api, Receiver, Script, TestKafka, CURRENT_KEY, WAIT};
use futures::StreamExt;
use kstash::kafka::record::Record;
use kstash::model::event::{Event, State};
use sha2::Digest;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delivers_body_headers_and_a_verifiable_signature() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;

    let body: Vec<u8> = vec![0, 1, 2, 255, b'h', b'i'];
    let destination = receiver.url("/hook/a%2Fb//c?x=1&y=two");
    let (status, json) = api
        .publish(
            &destination,
            body.clone(),
            &[
                ("Content-Type", "application/octet-stream"),
                ("Upstash-Method", "PUT"),
                ("Upstash-Forward-X-Custom", "custom value"),
                (
                    "upstash-forward-authorization",
                    "Bearer for-the-destination",
                ),
                ("Upstash-Telemetry-Sdk", "upstash-qstash-js@2.12.0"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{json}");
    let id = json["messageId"].as_str().unwrap();
    assert!(id.starts_with("msg_"));
    assert_eq!(json["url"], destination.as_str());

    let got = receiver.next().await;
    assert_eq!(got.method, "PUT");
    assert_eq!(
        got.uri.to_string(),
        "/hook/a%2Fb//c?x=1&y=two",
        "path and query untouched"
    );
    assert_eq!(got.body.as_ref(), body.as_slice(), "body bytes untouched");
    assert_eq!(got.header("content-type"), Some("application/octet-stream"));
    assert_eq!(got.header("x-custom"), Some("custom value"));
    assert_eq!(
        got.header("authorization"),
        Some("Bearer for-the-destination"),
        "forwarded, and not kstash's own token"
    );
    assert_eq!(got.header("upstash-message-id"), Some(id));
    assert_eq!(got.header("upstash-retried"), Some("0"));
    assert_eq!(got.header("user-agent"), Some("Upstash-QStash"));
    assert!(got.header("upstash-telemetry-sdk").is_none());
    assert!(got
        .headers
        .keys()
        .all(|k| !k.as_str().starts_with("upstash-forward-")));

    let token = got.header("upstash-signature").expect("signed");
    let claims = common::verify_signature(token, CURRENT_KEY, &body);
    assert_eq!(claims.sub, destination);
    // Independently of kstash's own helper: base64url of SHA-256, padded.
    let hash = base64::engine::general_purpose::URL_SAFE.encode(sha2::Sha256::digest(&body));
    assert_eq!(claims.body, hash);
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_publishes_are_each_delivered_exactly_once() {
    const MESSAGES: usize = 1000;
    const CONCURRENT_PUBLISHES: usize = 32;
    let kafka = TestKafka::new();
    let config = kafka.config();
    let ready_topic = format!("{}ready", config.kafka.topic_prefix);
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    let url = receiver.url("/bulk");

    let ids: HashSet<String> = futures::stream::iter(0..MESSAGES)
        .map(|i| {
            let (api, url) = (&api, &url);
            async move {
                let (status, json) = api.publish(url, format!("m{i}"), &[]).await;
                assert_eq!(status, 200, "{json}");
                json["messageId"].as_str().unwrap().to_string()
            }
        })
        .buffer_unordered(CONCURRENT_PUBLISHES)
        .collect()
        .await;
    assert_eq!(ids.len(), MESSAGES, "ids are unique");

    receiver
        .collect_until(WAIT, |c| ids.iter().all(|id| c.contains_key(id)))
        .await;
    // Graceful stop drains and commits: after it, nothing can be in flight or arrive again.
    kstash.stop().await;
    let counts = receiver.counts();
    assert_eq!(counts.len(), MESSAGES);
    assert!(
        counts.values().all(|n| *n == 1),
        "each message delivered exactly once"
    );
    for (committed, high) in kafka.committed_and_high(&ready_topic) {
        assert_eq!(
            committed, high,
            "every delivered record is committed, so a restart redelivers nothing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle_events_are_written_to_the_events_topic() {
    let kafka = TestKafka::new();
    let config = kafka.config();
    let events_topic = format!("{}events", config.kafka.topic_prefix);
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut ok = Receiver::start().await;
    let mut failing = Receiver::start().await;
    failing.set(Script::status(500));

    let delivered = api.publish_ok(&ok.url("/ok"), "fine").await;
    let (status, json) = api
        .publish(&failing.url("/fail"), "boom", &[("Upstash-Retries", "0")])
        .await;
    assert_eq!(status, 200, "{json}");
    let errored = json["messageId"].as_str().unwrap().to_string();
    ok.next().await;
    failing.next().await;

    let states_of = common::event_states;
    let records = kafka.read_until(&events_topic, |r| {
        states_of(r, &delivered).len() == 3 && states_of(r, &errored).len() == 4
    });
    assert_eq!(
        states_of(&records, &delivered),
        vec![State::Created, State::Active, State::Delivered]
    );
    assert_eq!(
        states_of(&records, &errored),
        vec![State::Created, State::Active, State::Error, State::Failed]
    );
    let error_event = records
        .iter()
        .map(|r| Event::decode(r).unwrap())
        .find(|e| e.message_id == errored && e.state == State::Error)
        .unwrap();
    assert_eq!(error_event.response_status, Some(500));
    assert!(error_event.error.unwrap().contains("500"));
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_destinations_do_not_block_others_and_in_flight_is_bounded() {
    const IN_FLIGHT: usize = 3;
    let kafka = TestKafka::new();
    let mut config = kafka.config();
    config.delivery.max_in_flight = IN_FLIGHT;
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut slow = Receiver::start().await;
    slow.set(Script::slow(Duration::from_secs(3)));
    // More slow messages than the bound: at most IN_FLIGHT may be in the receiver at once, and
    // the consumer has to pause (each call outlasts its pause threshold) and resume.
    let mut ids = HashSet::new();
    for _ in 0..IN_FLIGHT + 2 {
        ids.insert(api.publish_ok(&slow.url("/slow"), "s").await);
    }
    let mut arrivals = Vec::new();
    for _ in 0..IN_FLIGHT {
        arrivals.push(slow.next().await.at);
    }
    // The bound is full of slow calls; the next slow one must wait until one of them ends.
    let fourth = slow.next().await.at;
    let earliest = *arrivals.iter().min().unwrap();
    assert!(
        fourth.duration_since(earliest) >= Duration::from_millis(2500),
        "a 4th delivery started while {IN_FLIGHT} were in flight"
    );
    // Records held back while paused are not lost or doubled.
    slow.collect_until(WAIT, |c| ids.iter().all(|id| c.contains_key(id)))
        .await;
    kstash.stop().await;
    let counts = slow.counts();
    assert_eq!(counts.len(), ids.len());
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_destinations_fail_without_a_request() {
    let kafka = TestKafka::new();
    let mut config = kafka.config();
    config.delivery.allowed_networks = vec![]; // loopback is now refused
    let events_topic = format!("{}events", config.kafka.topic_prefix);
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    let by_ip = api.publish_ok(&receiver.url("/x"), "a").await;
    let by_name = api
        .publish_ok(&format!("http://localhost:{}/x", receiver.addr.port()), "b")
        .await;
    let error_of = |records: &[Vec<u8>], id: &str| {
        records
            .iter()
            .map(|r| Event::decode(r).unwrap())
            .find(|e| e.message_id == id && e.state == State::Error)
            .and_then(|e| e.error)
    };
    let records = kafka.read_until(&events_topic, |r| {
        error_of(r, &by_ip).is_some() && error_of(r, &by_name).is_some()
    });
    assert!(error_of(&records, &by_ip).unwrap().contains("not allowed"));
    assert!(error_of(&records, &by_name)
        .unwrap()
        .contains("does not deliver to"));
    kstash.stop().await;
    assert!(receiver.counts().is_empty(), "nothing reached the receiver");
}
