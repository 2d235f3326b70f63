//! FIFO queues end to end: strict order through retries while another queue fails, the
//! parallelism bound as the receiver sees it, pause and resume, and the queue API's shapes.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Api, Receiver, Script, TestKafka};
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queue_keeps_strict_order_while_another_queue_on_its_partition_retries() {
    const ORDERED: usize = 1000;
    const FAILING: usize = 5;
    const FAILURES_EACH: usize = 2;
    let kafka = TestKafka::new();
    let mut config = kafka.config();
    // One partition: both queues share it, so no head-of-line blocking must hold inside it.
    config.topics.get_mut("ready").unwrap().partitions = 1;
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut ordered = Receiver::start().await;
    let mut failing = Receiver::start().await;
    failing.set(Script::fail_first(FAILURES_EACH, 500, &[]));

    let mut failing_ids = Vec::new();
    for i in 0..FAILING {
        failing_ids.push(
            api.enqueue(
                "retrying",
                &failing.url("/b"),
                format!("b{i}"),
                &[("Upstash-Retries", "3"), ("Upstash-Retry-Delay", "300")],
            )
            .await,
        );
    }
    for i in 0..ORDERED {
        api.enqueue("ordered", &ordered.url("/a"), format!("{i}"), &[])
            .await;
    }

    let got = ordered.take(ORDERED).await;
    let bodies: Vec<usize> = got
        .iter()
        .map(|r| std::str::from_utf8(&r.body).unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        bodies,
        (0..ORDERED).collect::<Vec<_>>(),
        "strict enqueue order, each once"
    );

    // The other queue retried in place: each message's attempts in a row, in enqueue order.
    let attempts = failing.take(FAILING * (FAILURES_EACH + 1)).await;
    let sequence: Vec<(String, String)> = attempts
        .iter()
        .map(|r| {
            (
                r.message_id(),
                r.header("upstash-retried").unwrap().to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = failing_ids
        .iter()
        .flat_map(|id| (0..=FAILURES_EACH).map(move |n| (id.clone(), n.to_string())))
        .collect();
    assert_eq!(
        sequence, expected,
        "a retry waits in its place; the next starts after it"
    );
    for pair in attempts.windows(2) {
        if pair[0].message_id() == pair[1].message_id() {
            assert!(
                pair[1].at - pair[0].at >= Duration::from_millis(250),
                "the retry delay is kept"
            );
            // While the retrying queue waited, the other queue on the same partition flowed.
            let during = got
                .iter()
                .filter(|r| r.at > pair[0].at && r.at < pair[1].at)
                .count();
            assert!(
                during > 0,
                "no delivery of the ordered queue while the other queue's head waited to retry"
            );
        }
    }
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_parallelism_is_the_bound_the_receiver_sees() {
    const MESSAGES: usize = 15;
    const PARALLELISM: u64 = 3;
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    receiver.set(Script::slow(Duration::from_millis(300)));
    let (status, json) = api
        .call(
            Method::POST,
            "/v2/queues",
            Some(json!({"queueName": "wide", "parallelism": PARALLELISM})),
        )
        .await;
    assert_eq!(status, 200, "{json}");
    for i in 0..MESSAGES {
        api.enqueue("wide", &receiver.url("/p"), format!("{i}"), &[])
            .await;
    }
    receiver.take(MESSAGES).await;
    assert_eq!(
        receiver.max_concurrent(),
        PARALLELISM,
        "at most (and, with a backlog, exactly) the queue's parallelism at once"
    );
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_queue_accepts_and_holds_and_resumes_with_the_oldest() {
    const MESSAGES: usize = 5;
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    let (status, _) = api
        .call(
            Method::POST,
            "/v2/queues",
            Some(json!({"queueName": "held", "parallelism": 1, "paused": true})),
        )
        .await;
    assert_eq!(status, 200);
    for i in 0..MESSAGES {
        api.enqueue("held", &receiver.url("/h"), format!("{i}"), &[])
            .await;
    }
    let queue = common::eventually("the queue's lag", || async {
        let (_, q) = api.call(Method::GET, "/v2/queues/held", None).await;
        (q["lag"] == MESSAGES).then_some(q)
    })
    .await;
    assert_eq!(queue["paused"], true);
    // Nothing may arrive while paused: a bounded wait for something that must not happen.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), receiver.next())
            .await
            .is_err(),
        "a paused queue delivers nothing"
    );
    let (status, resumed) = api.call(Method::POST, "/v2/queues/held/resume", None).await;
    assert_eq!(status, 200);
    assert_eq!(resumed["paused"], false);
    let got = receiver.take(MESSAGES).await;
    let bodies: Vec<String> = got
        .iter()
        .map(|r| String::from_utf8(r.body.to_vec()).unwrap())
        .collect();
    assert_eq!(bodies, ["0", "1", "2", "3", "4"], "the oldest first");
    common::eventually("lag back to 0", || async {
        let (_, q) = api.call(Method::GET, "/v2/queues/held", None).await;
        (q["lag"] == 0).then_some(())
    })
    .await;
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queue_api_upserts_lists_gets_pauses_and_deletes() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;

    // An enqueue creates its queue with parallelism 1.
    api.enqueue("auto", &receiver.url("/x"), "x", &[]).await;
    receiver.next().await;
    let (status, q) = api.call(Method::GET, "/v2/queues/auto", None).await;
    assert_eq!(status, 200);
    for key in [
        "name",
        "parallelism",
        "createdAt",
        "updatedAt",
        "lag",
        "paused",
    ] {
        assert!(q.get(key).is_some(), "{key} in {q}");
    }
    assert_eq!(
        (q["name"].as_str(), q["parallelism"].as_u64()),
        (Some("auto"), Some(1))
    );

    let (status, _) = api
        .call(
            Method::POST,
            "/v2/queues",
            Some(json!({"queueName": "auto", "parallelism": 4})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, q2) = api.call(Method::GET, "/v2/queues/auto", None).await;
    assert_eq!(q2["parallelism"], 4);
    assert_eq!(
        q2["createdAt"], q["createdAt"],
        "an upsert keeps the creation time"
    );
    assert!(q2["updatedAt"].as_i64() > q["updatedAt"].as_i64());

    let (status, _) = api.call(Method::POST, "/v2/queues/auto/pause", None).await;
    assert_eq!(status, 200);
    let (_, list) = api.call(Method::GET, "/v2/queues", None).await;
    let listed: HashMap<String, bool> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["name"].as_str().unwrap().to_string(),
                q["paused"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed.get("auto"), Some(&true));

    let (status, _) = api.call(Method::DELETE, "/v2/queues/auto", None).await;
    assert_eq!(status, 200);
    let (status, json) = api.call(Method::GET, "/v2/queues/auto", None).await;
    assert_eq!(status, 404, "{json}");
    let (status, _) = api.call(Method::DELETE, "/v2/queues/auto", None).await;
    assert_eq!(status, 404);
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_and_logs_name_their_queue() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    let (_, _) = api
        .call(
            Method::POST,
            "/v2/queues",
            Some(json!({"queueName": "named", "paused": true})),
        )
        .await;
    let id = api.enqueue("named", &receiver.url("/n"), "n", &[]).await;
    let (status, message) = api
        .call(Method::GET, &format!("/v2/messages/{id}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(message["queueName"], "named");
    api.call(Method::POST, "/v2/queues/named/resume", None)
        .await;
    assert_eq!(receiver.next().await.message_id(), id);
    let logs = common::eventually("the DELIVERED log entry", || async {
        let entries = api.logs(&[("queueName", "named")]).await;
        entries
            .iter()
            .any(|e| e["state"] == "DELIVERED")
            .then_some(entries)
    })
    .await;
    assert!(logs.iter().all(|e| e["queueName"] == "named"), "{logs:?}");
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pausing_a_queue_stops_the_retries_of_its_head_until_resumed() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    receiver.set(Script::fail_first(1, 500, &[]));
    let id = api
        .enqueue(
            "stalled",
            &receiver.url("/s"),
            "s",
            &[("Upstash-Retries", "5"), ("Upstash-Retry-Delay", "500")],
        )
        .await;
    assert_eq!(
        receiver.next().await.message_id(),
        id,
        "the first attempt fails"
    );
    let (status, _) = api
        .call(Method::POST, "/v2/queues/stalled/pause", None)
        .await;
    assert_eq!(status, 200);
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), receiver.next())
            .await
            .is_err(),
        "no retry while the queue is paused"
    );
    api.call(Method::POST, "/v2/queues/stalled/resume", None)
        .await;
    let retry = receiver.next().await;
    assert_eq!(
        (retry.message_id(), retry.header("upstash-retried")),
        (id, Some("1"))
    );
    kstash.stop().await;
}
