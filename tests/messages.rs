//! `/v2/messages`: reading a pending message, cancelling one or many, and the guarantee that a
//! cancelled message is never delivered — also when the cancel was accepted by a process that is
//! gone by the time the message is due.
//!
//! Absence of a delivery is shown positively: the worker that reaches a cancelled message writes a
//! CANCELED event *instead of* making the attempt, so once that event is seen, no attempt was made
//! and none will be.

mod common;

use common::{Api, Receiver, TestKafka};
use kstash::model::event::State;
use serde_json::{json, Value};

async fn call(method: reqwest::Method, api: &Api, path: &str, body: Option<Value>) -> (u16, Value) {
    api.call(method, path, body).await
}

async fn publish_delayed(api: &Api, url: &str, delay: &str, label: &str) -> String {
    let (status, json) = api
        .publish(
            url,
            "later",
            &[
                ("Upstash-Delay", delay),
                ("Upstash-Label", label),
                ("Upstash-Forward-X-Kind", "test"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{json}");
    json["messageId"].as_str().unwrap().to_string()
}

use common::event_states as states;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pending_message_can_be_read_until_it_is_delivered() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    let id = publish_delayed(&api, &receiver.url("/read"), "2s", "l1").await;

    let (status, m) = call(
        reqwest::Method::GET,
        &api,
        &format!("/v2/messages/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["messageId"], id.as_str());
    assert_eq!(m["url"], receiver.url("/read"));
    assert_eq!(m["method"], "POST");
    assert_eq!(m["body"], "later");
    assert_eq!(
        m["header"]["X-Kind"],
        json!(["test"]),
        "forward prefix removed"
    );
    assert_eq!(m["maxRetries"], 3);
    assert_eq!(m["labels"], json!(["l1"]));
    let created = m["createdAt"].as_i64().unwrap();
    let not_before = m["notBefore"].as_i64().unwrap();
    assert!((1900..=2100).contains(&(not_before - created)), "{m}");

    receiver.next().await;
    // Once delivered, the message is no longer pending (the view follows the DELIVERED event).
    common::eventually("the delivered message to stop being pending", || async {
        let path = format!("/v2/messages/{id}");
        (call(reqwest::Method::GET, &api, &path, None).await.0 == 404).then_some(())
    })
    .await;
    let (status, json) = call(reqwest::Method::GET, &api, "/v2/messages/msg_unknown", None).await;
    assert_eq!((status, json["error"].is_string()), (404, true));
    let (status, _) = call(reqwest::Method::DELETE, &api, "/v2/messages/", None).await;
    assert_eq!(status, 400, "an empty id never means 'all'");
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_message_is_never_delivered_even_after_a_restart() {
    let kafka = TestKafka::new();
    let config = kafka.config();
    let events = format!("{}events", config.kafka.topic_prefix);
    let first = kafka.start(config.clone()).await;
    let api = Api::new(first.addr());
    let mut receiver = Receiver::start().await;
    let cancelled_here = publish_delayed(&api, &receiver.url("/c"), "2s", "x").await;
    let cancelled_then_restarted = publish_delayed(&api, &receiver.url("/c"), "4s", "x").await;
    let kept = publish_delayed(&api, &receiver.url("/kept"), "4s", "x").await;

    for id in [&cancelled_here, &cancelled_then_restarted] {
        let (status, json) = call(
            reqwest::Method::DELETE,
            &api,
            &format!("/v2/messages/{id}"),
            None,
        )
        .await;
        assert_eq!(
            (status, json.clone()),
            (202, json!({"cancelled": 1})),
            "{id}"
        );
        let (status, _) = call(
            reqwest::Method::GET,
            &api,
            &format!("/v2/messages/{id}"),
            None,
        )
        .await;
        assert_eq!(status, 404, "a cancelled message is not pending");
    }
    let (status, _) = call(
        reqwest::Method::DELETE,
        &api,
        &format!("/v2/messages/{cancelled_here}"),
        None,
    )
    .await;
    assert_eq!(status, 404, "cancelling twice: already gone");

    // The process that accepted the cancels goes away; a new one must still honour them.
    first.stop().await;
    let second = kafka.start(config).await;
    let records = kafka.read_until(&events, |r| {
        states(r, &cancelled_here).contains(&State::Canceled)
            && states(r, &cancelled_then_restarted).contains(&State::Canceled)
            && states(r, &kept).contains(&State::Delivered)
    });
    for id in [&cancelled_here, &cancelled_then_restarted] {
        assert_eq!(
            states(&records, id),
            [State::Created, State::CancelRequested, State::Canceled],
            "no ACTIVE: no attempt was made"
        );
    }
    second.stop().await;
    let counts = receiver.counts();
    assert_eq!(counts.get(&kept), Some(&1));
    assert!(!counts.contains_key(&cancelled_here));
    assert!(!counts.contains_key(&cancelled_then_restarted));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulk_cancel_by_ids_body_filter_and_all() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let receiver = Receiver::start().await;
    let url = receiver.url("/bulk");
    let mut ids = Vec::new();
    for label in ["a", "a", "b", "b", "c", "c", "d"] {
        ids.push(publish_delayed(&api, &url, "1h", label).await);
    }
    let del = |path: String, body: Option<Value>| {
        let api = &api;
        async move { call(reqwest::Method::DELETE, api, &path, body).await }
    };
    // An explicitly empty list cancels nothing (Python sends it for cancel_many([])).
    assert_eq!(
        del("/v2/messages".into(), Some(json!({"messageIds": []}))).await,
        (202, json!({"cancelled": 0}))
    );
    // By ids in the query (TS) — an unknown id is simply not counted.
    assert_eq!(
        del(
            format!("/v2/messages?messageIds={}&messageIds=msg_nope", ids[0]),
            None
        )
        .await,
        (202, json!({"cancelled": 1}))
    );
    // By ids in a JSON body (Python).
    assert_eq!(
        del(
            "/v2/messages".into(),
            Some(json!({"messageIds": [ids[1], ids[2]]}))
        )
        .await,
        (202, json!({"cancelled": 2}))
    );
    // By filter: label b (one of the two b's is already cancelled), or c.
    assert_eq!(
        del("/v2/messages?label=b,c&count=100".into(), None).await,
        (202, json!({"cancelled": 3}))
    );
    // Everything that is left.
    assert_eq!(
        del("/v2/messages".into(), None).await,
        (202, json!({"cancelled": 1}))
    );
    assert_eq!(
        del("/v2/messages".into(), None).await,
        (202, json!({"cancelled": 0}))
    );
    kstash.stop().await;
}
