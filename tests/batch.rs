//! `POST /v2/batch` end to end: answers in request order (an object per URL item, a nested array
//! per URL-group item, an error in a bad item's slot), queue items in order, a malformed body.

mod common;

use common::{Api, Receiver, TestKafka};
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_answers_each_item_in_its_slot() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    let (status, _) = api
        .call(
            Method::POST,
            "/v2/topics/bg/endpoints",
            Some(
                json!({"endpoints": [{"url": receiver.url("/g1")}, {"url": receiver.url("/g2")}]}),
            ),
        )
        .await;
    assert_eq!(status, 200);
    let mut items = vec![
        json!({"destination": receiver.url("/plain"), "headers": {"content-type": "text/plain", "upstash-forward-x": "1"}, "body": "plain"}),
        json!({"destination": "bg", "headers": {}, "body": "group"}),
        json!({"destination": receiver.url("/bad"), "headers": {"upstash-delay": "soon"}, "body": "x"}),
        json!({"destination": receiver.url("/nobody"), "headers": {}, "body": null, "queue": null}),
    ];
    for i in 0..5 {
        items.push(json!({"destination": receiver.url("/q"), "headers": {}, "body": format!("{i}"), "queue": "bq"}));
    }
    let (status, reply) = api
        .call(Method::POST, "/v2/batch", Some(json!(items)))
        .await;
    assert_eq!(status, 200, "{reply}");
    let slots = reply.as_array().unwrap();
    assert_eq!(slots.len(), items.len(), "one slot per item, in order");
    assert_eq!(slots[0]["url"], receiver.url("/plain"));
    assert!(slots[0]["messageId"].as_str().unwrap().starts_with("msg_"));
    let group = slots[1]
        .as_array()
        .unwrap_or_else(|| panic!("a nested array for a URL group: {}", slots[1]));
    assert_eq!(group.len(), 2);
    assert!(
        slots[2]["error"]
            .as_str()
            .unwrap()
            .contains("Upstash-Delay"),
        "the bad item's own reason: {}",
        slots[2]
    );
    assert!(
        slots[3]["messageId"].is_string(),
        "a null body and queue are fine"
    );

    // 2 + 2 + 1 + 5 deliveries; the queue's in request order.
    let got = receiver.take(9).await;
    let plain = got.iter().find(|r| r.uri.path() == "/plain").unwrap();
    assert_eq!(plain.body.as_ref(), b"plain");
    assert_eq!(plain.header("x"), Some("1"));
    let queued: Vec<String> = got
        .iter()
        .filter(|r| r.uri.path() == "/q")
        .map(|r| String::from_utf8(r.body.to_vec()).unwrap())
        .collect();
    assert_eq!(queued, ["0", "1", "2", "3", "4"]);
    assert_eq!(
        got.iter()
            .filter(|r| r.uri.path().starts_with("/g"))
            .count(),
        2
    );

    for (body, needle) in [
        (json!({"destination": "x"}), "JSON array"),
        (json!([{"headers": {}}]), "destination"),
    ] {
        let (status, json) = api.call(Method::POST, "/v2/batch", Some(body)).await;
        assert_eq!(status, 400, "{json}");
        assert!(json["error"].as_str().unwrap().contains(needle), "{json}");
    }
    kstash.stop().await;
}
