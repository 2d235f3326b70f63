//! Delayed delivery through the delay ladder: never early, late by at most a stated bound, across
//! several hops, and across a restart. Uses a short ladder (1s 2s 4s) so multi-hop paths run in
//! seconds; the arithmetic is the same for the default ladder (unit- and property-tested).

mod common;

use std::time::{Duration, Instant};

use common::{Api, Receiver, TestKafka};
use kstash::config::Config;

/// Lateness allowed in these tests. Measured lateness is far lower (see BENCHMARKS.md); this
/// bound leaves room for a loaded CI machine without letting a broken ladder (a missed hop costs
/// a whole bucket, ≥ 1 s) pass.
const MAX_LATENESS: Duration = Duration::from_millis(900);

fn short_ladder(kafka: &TestKafka) -> Config {
    let mut c = kafka.config();
    c.delay.buckets = [1, 2, 4].map(Duration::from_secs).to_vec();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delays_are_never_early_and_late_by_less_than_the_bound() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(short_ladder(&kafka)).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;

    // 300ms: step 0 and held in memory; 1500ms: 1s bucket then held; 3s: 2s bucket, then 1s;
    // 6500ms: 4s bucket, 2s bucket, held.
    let delays = ["300ms", "1500ms", "3s", "6500ms", "0s"];
    let mut expected = Vec::new();
    for d in delays {
        let sent = Instant::now();
        let (status, json) = api
            .publish(&receiver.url("/delayed"), d, &[("Upstash-Delay", d)])
            .await;
        let answered = Instant::now();
        assert_eq!(status, 200, "{json}");
        let delay = humantime::parse_duration(d).unwrap();
        expected.push((
            json["messageId"].as_str().unwrap().to_string(),
            sent + delay,
            answered + delay,
        ));
    }
    for _ in 0..delays.len() {
        let got = receiver.next().await;
        let (_, earliest, latest) = expected
            .iter()
            .find(|(id, ..)| *id == got.message_id())
            .expect("a published message");
        assert!(
            got.at >= *earliest,
            "{}: delivered {:?} early",
            String::from_utf8_lossy(&got.body),
            *earliest - got.at
        );
        let late = got.at.saturating_duration_since(*latest);
        assert!(
            late <= MAX_LATENESS,
            "{}: {late:?} late",
            String::from_utf8_lossy(&got.body)
        );
    }
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn not_before_wins_over_delay() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(short_ladder(&kafka)).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    let not_before_secs = kstash::model::now_ms() / 1000 + 2;
    let (status, json) = api
        .publish(
            &receiver.url("/nb"),
            "nb",
            &[
                ("Upstash-Not-Before", &not_before_secs.to_string()),
                ("Upstash-Delay", "1h"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{json}");
    let got = receiver.next().await;
    assert!(got.wall_ms >= not_before_secs * 1000, "early");
    assert!(got.wall_ms - not_before_secs * 1000 <= MAX_LATENESS.as_millis() as i64);
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delayed_messages_survive_a_restart_and_arrive_once() {
    let kafka = TestKafka::new();
    let config = short_ladder(&kafka);
    let first = kafka.start(config.clone()).await;
    let api = Api::new(first.addr());
    let mut receiver = Receiver::start().await;
    let mut sent = Vec::new();
    // Spread over the ladder: some are held in memory when the first process stops.
    for d in ["800ms", "2500ms", "5s"] {
        let before = Instant::now();
        let (status, json) = api
            .publish(&receiver.url("/restart"), d, &[("Upstash-Delay", d)])
            .await;
        assert_eq!(status, 200, "{json}");
        let id = json["messageId"].as_str().unwrap().to_string();
        sent.push((id, before + humantime::parse_duration(d).unwrap()));
    }
    first.stop().await;
    let second = kafka.start(config).await;
    for _ in 0..sent.len() {
        let got = receiver.next().await;
        let (_, earliest) = sent
            .iter()
            .find(|(id, _)| *id == got.message_id())
            .expect("a published message");
        assert!(got.at >= *earliest, "delivered early after the restart");
    }
    let ids: Vec<&String> = sent.iter().map(|(id, _)| id).collect();
    second.stop().await;
    let counts = receiver.counts();
    assert_eq!(counts.len(), ids.len());
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
}
