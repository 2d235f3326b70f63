//! The per-destination bound and circuit breaker (issue 8, fault 2): a destination that never
//! answers holds at most `delivery.max_in_flight_per_host` delivery slots, so other destinations
//! keep flowing; a destination that keeps failing opens its breaker, and no attempt starts until
//! the open period has passed and a trial succeeded. Runs on the embedded cluster, or on a real
//! broker with KSTASH_TEST_BROKERS.

mod common;

use std::time::Duration;

use common::{Api, Receiver, Script, TestKafka, WAIT};

/// Longer than any test: the hanging destination never answers while the test runs.
const HANG: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_destination_takes_only_its_bound_and_others_keep_flowing() {
    const GLOBAL: usize = 16;
    const PER_HOST: usize = 4;
    let kafka = TestKafka::new();
    let mut config = kafka.config();
    config.delivery.max_in_flight = GLOBAL;
    config.delivery.max_in_flight_per_host = PER_HOST;
    // The hanging attempts are abandoned at the end, not waited for.
    config.server.shutdown_grace = Duration::from_secs(1);
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut hanging = Receiver::start().await;
    hanging.set(Script::slow(HANG));
    let mut healthy = Receiver::start().await;

    // More hanging messages than the process has slots.
    for _ in 0..3 * GLOBAL {
        api.publish_ok(&hanging.url("/hang"), "h").await;
    }
    hanging.take(PER_HOST).await;
    for _ in 0..20 {
        api.publish_ok(&healthy.url("/ok"), "ok").await;
    }
    let got = healthy.take(20).await;
    assert!(got.iter().all(|r| r.uri.path() == "/ok"));
    assert_eq!(
        hanging.counts().values().sum::<usize>(),
        PER_HOST,
        "the hanging destination got no more than its bound"
    );
    assert_eq!(hanging.max_concurrent(), PER_HOST as u64);
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_destination_opens_its_breaker_until_a_trial_succeeds() {
    const FAILURES: u32 = 3;
    const OPEN: Duration = Duration::from_secs(2);
    let kafka = TestKafka::new();
    let mut config = kafka.config();
    // One attempt at a time, so each failure is counted before the next attempt may start.
    config.delivery.max_in_flight_per_host = 1;
    config.delivery.breaker_failures = FAILURES;
    config.delivery.breaker_open = OPEN;
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    receiver.set(Script::status(500));

    let mut ids = Vec::new();
    for _ in 0..10 {
        let (status, json) = api
            .publish(&receiver.url("/flaky"), "x", &[("Upstash-Retries", "0")])
            .await;
        assert_eq!(status, 200, "{json}");
        ids.push(json["messageId"].as_str().unwrap().to_string());
    }
    let failed = receiver.take(FAILURES as usize).await;
    // The destination recovers; the breaker is open, so nothing is tried before `OPEN` passed.
    receiver.set(Script::ok());
    let trial = receiver.next().await;
    let gap = trial.at - failed.last().unwrap().at;
    assert!(
        gap >= OPEN,
        "an attempt started {gap:?} after the breaker opened (open for {OPEN:?})"
    );
    // The trial succeeded: the breaker closed and the rest is delivered.
    let rest = ids.len() - FAILURES as usize - 1;
    let all = receiver
        .collect_until(WAIT, |seen| seen.len() == ids.len())
        .await;
    assert_eq!(all.len(), ids.len(), "every message was attempted");
    assert!(rest > 0);
    kstash.stop().await;
}
