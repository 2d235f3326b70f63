//! URL groups end to end: the group API, a publish that fans out to every endpoint (each message
//! with its own id, retries and DLQ entry), per-endpoint deduplication, and the `topicName`
//! filters.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Api, Receiver, Script, TestKafka};
use reqwest::Method;
use serde_json::json;

async fn add_endpoints(api: &Api, group: &str, endpoints: serde_json::Value) {
    let (status, json) = api
        .call(
            Method::POST,
            &format!("/v2/topics/{group}/endpoints"),
            Some(json!({ "endpoints": endpoints })),
        )
        .await;
    assert_eq!(status, 200, "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publish_fans_out_and_each_endpoint_has_its_own_retries_and_dlq_entry() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut ok = Receiver::start().await;
    let mut failing = Receiver::start().await;
    failing.set(Script::status(500));
    add_endpoints(
        &api,
        "fan",
        json!([
            {"name": "one", "url": ok.url("/one")},
            {"url": ok.url("/two")},
            {"name": "bad", "url": failing.url("/bad")},
        ]),
    )
    .await;

    let (status, reply) = api
        .publish(
            "fan",
            "to all",
            &[("Upstash-Retries", "1"), ("Upstash-Retry-Delay", "100")],
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let replies = reply
        .as_array()
        .expect("a top-level array, as the SDKs parse it");
    assert_eq!(replies.len(), 3);
    let by_url: HashMap<String, String> = replies
        .iter()
        .map(|r| {
            (
                r["url"].as_str().unwrap().to_string(),
                r["messageId"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(by_url.len(), 3, "one message (own id) per endpoint");

    let mut got = ok.take(2).await;
    got.sort_by_key(|r| r.uri.path().to_string());
    for r in &got {
        assert_eq!(r.body.as_ref(), b"to all");
        assert_eq!(r.header("upstash-topic-name"), Some("fan"));
        let url = ok.url(r.uri.path());
        assert_eq!(r.message_id(), by_url[&url]);
        let claims = common::verify_signature(
            r.header("upstash-signature").unwrap(),
            common::CURRENT_KEY,
            b"to all",
        );
        assert_eq!(claims.sub, url, "the signature's sub is the endpoint");
    }
    // The failing endpoint retries on its own (2 attempts), then its message is dead-lettered.
    let attempts = failing.take(2).await;
    let bad_id = &by_url[&failing.url("/bad")];
    assert!(attempts.iter().all(|r| &r.message_id() == bad_id));
    let entry = common::eventually("the failing endpoint's DLQ entry", || async {
        let (_, dlq) = api
            .send(Method::GET, "/v2/dlq", &[("topicName", "fan")], &[], None)
            .await;
        dlq["messages"]
            .as_array()
            .and_then(|m| m.iter().find(|e| &e["messageId"] == bad_id).cloned())
    })
    .await;
    assert_eq!(entry["topicName"], "fan");
    assert_eq!(entry["responseStatus"], 500);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), ok.next())
            .await
            .is_err(),
        "the healthy endpoints got exactly one delivery each"
    );

    // Logs filter by the group.
    let logs = common::eventually("the group's DELIVERED entries", || async {
        let entries = api
            .logs(&[("topicName", "fan"), ("state", "DELIVERED")])
            .await;
        (entries.len() == 2).then_some(entries)
    })
    .await;
    assert!(logs.iter().all(|e| e["topicName"] == "fan"));
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deduplication_applies_per_endpoint() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    add_endpoints(&api, "dd", json!([{"url": receiver.url("/a")}])).await;
    let first = api
        .publish("dd", "x", &[("Upstash-Deduplication-Id", "once")])
        .await
        .1;
    add_endpoints(&api, "dd", json!([{"url": receiver.url("/b")}])).await;
    let (status, second) = api
        .publish("dd", "x", &[("Upstash-Deduplication-Id", "once")])
        .await;
    assert_eq!(status, 200);
    let second = second.as_array().unwrap().clone();
    let a = second
        .iter()
        .find(|r| r["url"] == receiver.url("/a"))
        .unwrap();
    assert_eq!(a["deduplicated"], true);
    assert_eq!(
        a["messageId"], first[0]["messageId"],
        "the original message"
    );
    let b = second
        .iter()
        .find(|r| r["url"] == receiver.url("/b"))
        .unwrap();
    assert!(
        b.get("deduplicated").is_none(),
        "a new endpoint is not a duplicate"
    );
    let arrivals = receiver.take(2).await;
    let mut paths: Vec<_> = arrivals.iter().map(|r| r.uri.path().to_string()).collect();
    paths.sort();
    assert_eq!(paths, ["/a", "/b"]);
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_group_api_adds_removes_lists_gets_and_deletes() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    add_endpoints(
        &api,
        "g1",
        json!([{"name": "a", "url": "https://a.example.com"}, {"url": "https://b.example.com"}]),
    )
    .await;
    let (status, g) = api.call(Method::GET, "/v2/topics/g1", None).await;
    assert_eq!(status, 200);
    for key in ["name", "createdAt", "updatedAt", "endpoints"] {
        assert!(g.get(key).is_some(), "{key} in {g}");
    }
    assert_eq!(g["endpoints"].as_array().unwrap().len(), 2);

    let (status, _) = api
        .call(
            Method::DELETE,
            "/v2/topics/g1/endpoints",
            Some(json!({"endpoints": [{"name": "a"}]})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, list) = api.call(Method::GET, "/v2/topics", None).await;
    let g1 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "g1")
        .cloned()
        .unwrap();
    assert_eq!(g1["endpoints"], json!([{"url": "https://b.example.com"}]));

    // Removing the last endpoint deletes the group.
    api.call(
        Method::DELETE,
        "/v2/topics/g1/endpoints",
        Some(json!({"endpoints": [{"url": "https://b.example.com"}]})),
    )
    .await;
    let (status, _) = api.call(Method::GET, "/v2/topics/g1", None).await;
    assert_eq!(status, 404);

    add_endpoints(&api, "g2", json!([{"url": "https://c.example.com"}])).await;
    let (status, _) = api.call(Method::DELETE, "/v2/topics/g2", None).await;
    assert_eq!(status, 200);
    let (status, json) = api.publish("g2", "x", &[]).await;
    assert_eq!(status, 404, "publishing to a deleted group: {json}");
    for (body, needle) in [
        (json!({"endpoints": [{"url": "not a url"}]}), "not a url"),
        (json!({"endpoints": []}), "must not be empty"),
        (json!({"nope": 1}), "endpoints"),
    ] {
        let (status, json) = api
            .call(Method::POST, "/v2/topics/g3/endpoints", Some(body))
            .await;
        assert_eq!(status, 400, "{json}");
        assert!(json["error"].as_str().unwrap().contains(needle), "{json}");
    }
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulk_cancel_by_topic_name_cancels_the_group_messages_only() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    add_endpoints(
        &api,
        "later",
        json!([{"url": "https://a.example.com/x"}, {"url": "https://b.example.com/y"}]),
    )
    .await;
    let (status, fanned) = api.publish("later", "x", &[("Upstash-Delay", "1h")]).await;
    assert_eq!(status, 200, "{fanned}");
    let (status, single) = api
        .publish("https://c.example.com/z", "y", &[("Upstash-Delay", "1h")])
        .await;
    assert_eq!(status, 200, "{single}");

    let (status, answer) = api
        .send(
            Method::DELETE,
            "/v2/messages",
            &[("topicName", "later")],
            &[],
            None,
        )
        .await;
    assert_eq!((status, &answer), (202, &json!({"cancelled": 2})));
    // The message outside the group is still pending.
    let path = format!("/v2/messages/{}", single["messageId"].as_str().unwrap());
    let (status, message) = api.call(Method::GET, &path, None).await;
    assert_eq!(status, 200, "{message}");
    let cancelled = common::eventually("CANCEL_REQUESTED entries of the group", || async {
        let entries = api
            .logs(&[("topicName", "later"), ("state", "CANCEL_REQUESTED")])
            .await;
        (entries.len() == 2).then_some(entries)
    })
    .await;
    let mut ids: Vec<_> = cancelled.iter().map(|e| e["messageId"].clone()).collect();
    let mut expected: Vec<_> = fanned
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["messageId"].clone())
        .collect();
    ids.sort_by_key(|v| v.to_string());
    expected.sort_by_key(|v| v.to_string());
    assert_eq!(ids, expected);
    kstash.stop().await;
}

/// A group publish is a transaction, so the events partitions end with a transaction marker that
/// no record carries: a process started afterwards must still see its state as caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_started_after_a_group_publish_catches_up_and_serves() {
    let kafka = TestKafka::new();
    let config = kafka.config();
    let first = kafka.start(config.clone()).await;
    let api = Api::new(first.addr());
    add_endpoints(&api, "tx", json!([{"url": "https://a.example.com/x"}])).await;
    let (status, fanned) = api.publish("tx", "x", &[("Upstash-Delay", "1h")]).await;
    assert_eq!(status, 200, "{fanned}");
    first.stop().await;

    let second = tokio::time::timeout(common::WAIT, kafka.start(config))
        .await
        .expect("a process started after a transaction catches up");
    let api = Api::new(second.addr());
    let id = fanned[0]["messageId"].as_str().unwrap();
    let (status, message) = api
        .call(Method::GET, &format!("/v2/messages/{id}"), None)
        .await;
    assert_eq!(status, 200, "{message}");
    assert_eq!(message["topicName"], "tx");
    second.stop().await;
}
