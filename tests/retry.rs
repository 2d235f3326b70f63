//! Retries and the dead-letter queue, against a scripted receiver: exact attempt counts and gaps,
//! `Upstash-Retry-Delay`, `Retry-After`, 489 non-retryable, per-attempt timeouts, and the DLQ
//! record and events after the last attempt.

mod common;

use std::time::Duration;

use common::{Api, Receiver, Script, TestKafka};
use kstash::kafka::record::Record;
use kstash::model::dlq::DlqRecord;
use kstash::model::event::State;

/// Lateness allowed for a retry after its computed time (see tests/delay.rs).
const MAX_LATENESS: Duration = Duration::from_millis(900);

use common::event_states as states;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fails_twice_then_delivers_with_exact_attempts_and_gaps() {
    let kafka = TestKafka::new();
    let config = kafka.config();
    let events = format!("{}events", config.kafka.topic_prefix);
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    receiver.set(Script::fail_first(2, 503, &[]));

    let (status, json) = api
        .publish(
            &receiver.url("/flaky"),
            "x",
            &[
                ("Upstash-Retries", "3"),
                ("Upstash-Retry-Delay", "1000 * (1 + retried)"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{json}");
    let id = json["messageId"].as_str().unwrap().to_string();
    let mut arrivals = Vec::new();
    for _ in 0..3 {
        arrivals.push(receiver.next().await);
    }
    for (n, got) in arrivals.iter().enumerate() {
        assert_eq!(got.message_id(), id, "same message id on every attempt");
        assert_eq!(got.header("upstash-retried"), Some(n.to_string().as_str()));
    }
    // retried = 0 before the first retry: 1000 ms, then 2000 ms.
    for (n, expected) in [(1, 1000u64), (2, 2000)] {
        let gap = arrivals[n].at - arrivals[n - 1].at;
        assert!(
            gap >= Duration::from_millis(expected),
            "retry {n} early: {gap:?}"
        );
        assert!(
            gap <= Duration::from_millis(expected) + MAX_LATENESS,
            "retry {n} late: {gap:?}"
        );
    }
    let records = kafka.read_until(&events, |r| states(r, &id).contains(&State::Delivered));
    assert_eq!(
        states(&records, &id),
        [
            State::Created,
            State::Active,
            State::Error,
            State::Retry,
            State::Active,
            State::Error,
            State::Retry,
            State::Active,
            State::Delivered
        ]
    );
    kstash.stop().await;
    assert_eq!(receiver.counts()[&id], 3, "no attempt after delivery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_from_the_destination_sets_the_gap() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    receiver.set(Script::fail_first(1, 429, &[("Retry-After", "2")]));
    let (status, _) = api
        .publish(
            &receiver.url("/limited"),
            "x",
            &[("Upstash-Retry-Delay", "100")],
        )
        .await;
    assert_eq!(status, 200);
    let first = receiver.next().await;
    let second = receiver.next().await;
    let gap = second.at - first.at;
    assert!(
        gap >= Duration::from_secs(2),
        "Retry-After wins over the expression: {gap:?}"
    );
    assert!(gap <= Duration::from_secs(2) + MAX_LATENESS, "{gap:?}");
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exhausted_and_non_retryable_messages_land_in_the_dlq() {
    let kafka = TestKafka::new();
    let config = kafka.config();
    let (events, dlq) = (
        format!("{}events", config.kafka.topic_prefix),
        format!("{}dlq", config.kafka.topic_prefix),
    );
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut always_500 = Receiver::start().await;
    always_500.set(Script::status(500));
    let mut final_489 = Receiver::start().await;
    final_489.set(Script::fail_first(
        usize::MAX,
        489,
        &[("Upstash-NonRetryable-Error", "true")],
    ));
    let slow = Receiver::start().await;
    slow.set(Script::slow(Duration::from_secs(5)));

    let publish = |url: String, headers: Vec<(&'static str, &'static str)>| {
        let api = &api;
        async move {
            let (status, json) = api.publish(&url, "payload", &headers).await;
            assert_eq!(status, 200, "{json}");
            json["messageId"].as_str().unwrap().to_string()
        }
    };
    let exhausted = publish(
        always_500.url("/500"),
        vec![("Upstash-Retries", "1"), ("Upstash-Retry-Delay", "200")],
    )
    .await;
    let refused = publish(final_489.url("/489"), vec![("Upstash-Retries", "5")]).await;
    let timed_out = publish(
        slow.url("/slow"),
        vec![("Upstash-Retries", "0"), ("Upstash-Timeout", "1s")],
    )
    .await;

    let dead: Vec<DlqRecord> = kafka
        .read_until(&dlq, |r| r.len() >= 3)
        .iter()
        .map(|r| DlqRecord::decode(r).unwrap())
        .collect();
    let find = |id: &str| dead.iter().find(|d| d.message.message_id == id).unwrap();
    let e = find(&exhausted);
    assert_eq!(e.response_status, Some(500));
    assert_eq!(e.message.retried, 1, "the last attempt was the first retry");
    assert_eq!(e.message.body, b"payload");
    let r = find(&refused);
    assert_eq!(
        (r.response_status, r.message.retried),
        (Some(489), 0),
        "no retry after 489"
    );
    let t = find(&timed_out);
    assert_eq!(t.response_status, None);
    assert!(t.error.contains("timed out"), "{}", t.error);

    let records = kafka.read_until(&events, |r| {
        [&exhausted, &refused, &timed_out]
            .iter()
            .all(|id| states(r, id).contains(&State::Failed))
    });
    assert_eq!(
        states(&records, &exhausted),
        [
            State::Created,
            State::Active,
            State::Error,
            State::Retry,
            State::Active,
            State::Error,
            State::Failed
        ]
    );
    assert_eq!(
        states(&records, &refused),
        [State::Created, State::Active, State::Error, State::Failed]
    );
    kstash.stop().await;
    assert_eq!(
        always_500.counts()[&exhausted],
        2,
        "1 + Upstash-Retries attempts"
    );
    assert_eq!(final_489.counts()[&refused], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_endpoint_does_not_hold_up_others() {
    const IN_FLIGHT: usize = 2;
    let kafka = TestKafka::new();
    let mut config = kafka.config();
    // Few delivery slots: if retries waited in them, the healthy messages could not get through.
    config.delivery.max_in_flight = IN_FLIGHT;
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut failing = Receiver::start().await;
    failing.set(Script::status(503));
    let mut healthy = Receiver::start().await;

    let mut failing_ids = Vec::new();
    for _ in 0..IN_FLIGHT * 2 {
        // Default retries and backoff: the first retry is ~12 s away.
        let (status, json) = api.publish(&failing.url("/down"), "f", &[]).await;
        assert_eq!(status, 200, "{json}");
        failing_ids.push(json["messageId"].as_str().unwrap().to_string());
    }
    failing
        .collect_until(common::WAIT, |c| {
            failing_ids.iter().all(|id| c.contains_key(id))
        })
        .await;
    let sent = std::time::Instant::now();
    let (status, json) = api.publish(&healthy.url("/up"), "h", &[]).await;
    assert_eq!(status, 200, "{json}");
    let got = healthy.next().await;
    assert!(
        got.at.duration_since(sent) < Duration::from_secs(5),
        "a healthy message waited {:?} behind failing ones",
        got.at.duration_since(sent)
    );
    kstash.stop().await;
}
