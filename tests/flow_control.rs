//! Flow control end to end: the parallelism and rate a key allows, measured at the receiver, the
//! flow-control API (pause, resume, pin, unpin, reset rate) and the global parallelism.

mod common;

use std::time::Duration;

use common::{Api, Receiver, Script, TestKafka};
use futures::StreamExt;
use reqwest::Method;

/// Publishes `n` messages with flow control `key`/`value`, 8 at a time; returns their ids.
async fn publish_many(
    api: &Api,
    destination: &str,
    n: usize,
    key: &str,
    value: &str,
) -> Vec<String> {
    futures::stream::iter(0..n)
        .map(|i| async move {
            let (status, json) = api
                .publish(
                    destination,
                    format!("{i}"),
                    &[
                        ("Upstash-Flow-Control-Key", key),
                        ("Upstash-Flow-Control-Value", value),
                    ],
                )
                .await;
            assert_eq!(status, 200, "{json}");
            json["messageId"].as_str().unwrap().to_string()
        })
        .buffer_unordered(8)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_never_has_more_than_its_parallelism_in_flight() {
    const MESSAGES: usize = 12;
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    receiver.set(Script::slow(Duration::from_millis(300)));
    publish_many(
        &api,
        &receiver.url("/p"),
        MESSAGES,
        "two-at-a-time",
        "parallelism=2",
    )
    .await;
    receiver.take(MESSAGES).await;
    assert_eq!(receiver.max_concurrent(), 2);
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_starts_at_its_rate_within_ten_percent() {
    // 10 per second: one start every 100 ms, so a stall of the delivery path on a busy machine
    // (up to ~200 ms seen on 2 cores) bunches at most two arrivals.
    const RATE: usize = 10;
    const MESSAGES: usize = 60;
    const PERIOD: Duration = Duration::from_secs(1);
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    publish_many(
        &api,
        &receiver.url("/r"),
        MESSAGES,
        "paced",
        &format!("rate={RATE}, period=1s"),
    )
    .await;
    let got = receiver.take(MESSAGES).await;
    let times: Vec<_> = got.iter().map(|r| r.at).collect();
    let gaps: Vec<u128> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    // Starts per period never above the rate. Measured at the receiver, a window of one period
    // can hold one start more at its edge, and one more where the delivery path (scheduling on a
    // busy machine, connection set-up) made one request late and the next on time: kstash spaces
    // the starts, the network does not keep that spacing exactly.
    const EDGE_AND_JITTER: usize = 2;
    for (i, start) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|t| **t - *start < PERIOD)
            .count();
        assert!(
            in_window <= RATE + EDGE_AND_JITTER,
            "{in_window} deliveries within one period from delivery {i}; gaps (ms): {gaps:?}"
        );
    }
    // With a large backlog the achieved rate is the limit.
    let span = (*times.last().unwrap() - times[0]).as_secs_f64();
    let achieved = (MESSAGES - 1) as f64 / span;
    eprintln!("flow control: {achieved:.2} deliveries/s for a rate of {RATE}/s");
    let rate = RATE as f64;
    assert!(
        (achieved - rate).abs() <= rate * 0.1,
        "achieved {achieved:.2}/s, limit {RATE}/s"
    );
    let (status, info) = api.call(Method::GET, "/v2/flowControl/paced", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        (info["rateMax"].as_u64(), info["ratePeriod"].as_u64()),
        (Some(RATE as u64), Some(1))
    );
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_resume_pin_unpin_and_reset_through_the_api() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    let destination = receiver.url("/f");
    publish_many(
        &api,
        &destination,
        1,
        "k1",
        "parallelism=3, rate=50, period=1m",
    )
    .await;
    receiver.next().await;

    let (status, info) = api.call(Method::GET, "/v2/flowControl/k1", None).await;
    assert_eq!(status, 200, "{info}");
    for key in [
        "flowControlKey",
        "waitListSize",
        "parallelismMax",
        "parallelismCount",
        "rateMax",
        "rateCount",
        "ratePeriod",
        "ratePeriodStart",
        "isPaused",
        "isPinnedParallelism",
        "isPinnedRate",
    ] {
        assert!(info.get(key).is_some(), "{key} in {info}");
    }
    assert_eq!(info["flowControlKey"], "k1");
    assert_eq!(
        (
            info["parallelismMax"].as_u64(),
            info["rateMax"].as_u64(),
            info["ratePeriod"].as_u64()
        ),
        (Some(3), Some(50), Some(60))
    );
    let counted = common::eventually("the start counted in the rate period", || async {
        let (_, info) = api.call(Method::GET, "/v2/flowControl/k1", None).await;
        (info["rateCount"] == 1 && info["parallelismCount"] == 0).then_some(info)
    })
    .await;
    assert!(
        counted["ratePeriodStart"].as_i64().unwrap() > 1_700_000_000,
        "unix seconds"
    );

    // Newer values replace older ones while unpinned.
    publish_many(&api, &destination, 1, "k1", "parallelism=5").await;
    receiver.next().await;
    let (_, info) = api.call(Method::GET, "/v2/flowControl/k1", None).await;
    assert_eq!(
        (info["parallelismMax"].as_u64(), info["rateMax"].as_u64()),
        (Some(5), Some(0))
    );

    // Pinned values win over the messages'.
    let (status, info) = api
        .send(
            Method::POST,
            "/v2/flowControl/k1/pin",
            &[("parallelism", "1"), ("rate", "7"), ("period", "2")],
            &[],
            None,
        )
        .await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(
        (
            &info["isPinnedParallelism"],
            &info["isPinnedRate"],
            &info["rateCount"]
        ),
        (&true.into(), &true.into(), &0.into()),
        "pinning resets the rate state"
    );
    publish_many(&api, &destination, 1, "k1", "parallelism=9, rate=9").await;
    receiver.next().await;
    let (_, info) = api.call(Method::GET, "/v2/flowControl/k1", None).await;
    assert_eq!(
        (
            info["parallelismMax"].as_u64(),
            info["rateMax"].as_u64(),
            info["ratePeriod"].as_u64()
        ),
        (Some(1), Some(7), Some(2))
    );
    let (status, info) = api
        .send(
            Method::POST,
            "/v2/flowControl/k1/unpin",
            &[("parallelism", "true"), ("rate", "false")],
            &[],
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (&info["isPinnedParallelism"], &info["isPinnedRate"]),
        (&false.into(), &true.into())
    );
    assert_eq!(
        info["parallelismMax"], 1,
        "the last pinned value holds until a message brings another"
    );

    // Pause: messages wait (and count in the wait list); resume delivers them.
    let (status, info) = api
        .call(Method::POST, "/v2/flowControl/k1/pause", None)
        .await;
    assert_eq!((status, &info["isPaused"]), (200, &true.into()));
    publish_many(&api, &destination, 3, "k1", "parallelism=4").await;
    common::eventually("three waiting", || async {
        let (_, info) = api.call(Method::GET, "/v2/flowControl/k1", None).await;
        (info["waitListSize"] == 3).then_some(())
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), receiver.next())
            .await
            .is_err(),
        "nothing starts while the key is paused"
    );
    let (status, _) = api
        .call(Method::POST, "/v2/flowControl/k1/resume", None)
        .await;
    assert_eq!(status, 200);
    receiver.take(3).await;

    let (status, info) = api
        .call(Method::POST, "/v2/flowControl/k1/resetRate", None)
        .await;
    assert_eq!((status, &info["rateCount"]), (200, &0.into()));
    let (_, list) = api.call(Method::GET, "/v2/flowControl", None).await;
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["flowControlKey"] == "k1"));
    let (status, json) = api
        .send(
            Method::POST,
            "/v2/flowControl/k1/pin",
            &[("rate", "0")],
            &[],
            None,
        )
        .await;
    assert_eq!(status, 400, "{json}");
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn global_parallelism_reports_the_cap_and_what_is_in_flight() {
    const CAP: usize = 4;
    let kafka = TestKafka::new();
    let mut config = kafka.config();
    config.delivery.max_in_flight = CAP;
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    receiver.set(Script::slow(Duration::from_millis(1500)));
    for i in 0..CAP * 2 {
        api.publish_ok(&receiver.url(&format!("/g{i}")), "g").await;
    }
    receiver.take(CAP).await;
    let (status, info) = api.call(Method::GET, "/v2/globalParallelism", None).await;
    assert_eq!(status, 200);
    assert_eq!(info["parallelismMax"], CAP);
    assert_eq!(
        info["parallelismCount"], CAP,
        "every slot busy with a slow receiver"
    );
    receiver.take(CAP).await;
    assert_eq!(receiver.max_concurrent(), CAP as u64, "the cap holds");
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delayed_message_keeps_its_flow_control_through_the_delay_ladder() {
    const MESSAGES: usize = 4;
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    receiver.set(Script::slow(Duration::from_millis(400)));
    for i in 0..MESSAGES {
        let (status, json) = api
            .publish(
                &receiver.url("/d"),
                format!("{i}"),
                &[
                    ("Upstash-Delay", "1s"),
                    ("Upstash-Flow-Control-Key", "delayed"),
                    ("Upstash-Flow-Control-Value", "parallelism=1"),
                ],
            )
            .await;
        assert_eq!(status, 200, "{json}");
    }
    receiver.take(MESSAGES).await;
    assert_eq!(
        receiver.max_concurrent(),
        1,
        "the limit travels with the message through the delay topics"
    );
    kstash.stop().await;
}
