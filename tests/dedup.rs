//! Deduplication: `Upstash-Deduplication-Id` and content-based, answered 202 with the original id
//! and not delivered again; across two kstash processes sharing the cluster; and the window.

mod common;

use std::time::Duration;

use common::{Api, Receiver, TestKafka};

async fn publish(
    api: &Api,
    url: &str,
    body: &'static str,
    headers: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    api.publish(url, body, headers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_get_the_original_id_and_are_not_delivered_again() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    let url = receiver.url("/dedup");

    let by_id = [("Upstash-Deduplication-Id", "order-42")];
    let (s1, first) = publish(&api, &url, "a", &by_id).await;
    let (s2, second) = publish(&api, &url, "a different body", &by_id).await;
    assert_eq!(s1, 200, "{first}");
    assert_eq!(s2, 202, "{second}");
    assert_eq!(second["messageId"], first["messageId"]);
    assert_eq!(second["deduplicated"], true);

    let by_content = [
        ("Upstash-Content-Based-Deduplication", "True"),
        ("Upstash-Forward-X", "1"),
    ];
    let (c1, content) = publish(&api, &url, "same", &by_content).await;
    let (c2, content_again) = publish(&api, &url, "same", &by_content).await;
    let (c3, other_body) = publish(&api, &url, "other", &by_content).await;
    let (c4, other_header) = publish(
        &api,
        &url,
        "same",
        &[
            ("Upstash-Content-Based-Deduplication", "true"),
            ("Upstash-Forward-X", "2"),
        ],
    )
    .await;
    assert_eq!((c1, c2, c3, c4), (200, 202, 200, 200));
    assert_eq!(content_again["messageId"], content["messageId"]);
    assert_ne!(other_body["messageId"], content["messageId"]);
    assert_ne!(other_header["messageId"], content["messageId"]);

    let expected: Vec<String> = [&first, &content, &other_body, &other_header]
        .iter()
        .map(|j| j["messageId"].as_str().unwrap().to_string())
        .collect();
    receiver
        .collect_until(common::WAIT, |c| {
            expected.iter().all(|id| c.contains_key(id))
        })
        .await;
    kstash.stop().await;
    let counts = receiver.counts();
    assert_eq!(counts.len(), 4, "{counts:?}");
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_process_sees_the_dedup_id_and_the_window_ends() {
    let kafka = TestKafka::new();
    let mut config = kafka.config();
    config.state.dedup_window = Duration::from_secs(2);
    let a = kafka.start(config.clone()).await;
    let receiver = Receiver::start().await;
    let url = receiver.url("/two");
    let headers = [("Upstash-Deduplication-Id", "shared")];
    let (status, original) = publish(&Api::new(a.addr()), &url, "x", &headers).await;
    assert_eq!(status, 200, "{original}");

    // A second process reads the dedup topic to its end before it serves.
    let b = kafka.start(config).await;
    let (status, again) = publish(&Api::new(b.addr()), &url, "x", &headers).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["messageId"], original["messageId"]);

    // The window is a span of time; waiting it out is the point of this step.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, fresh) = publish(&Api::new(b.addr()), &url, "x", &headers).await;
    assert_eq!(status, 200, "{fresh}");
    assert_ne!(fresh["messageId"], original["messageId"]);
    a.stop().await;
    b.stop().await;
}
