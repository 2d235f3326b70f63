//! The local store failing (issue 8, fault 4): a write Kafka acknowledged is answered as stored
//! even when this process's view cannot take it yet (a 503 would make the client publish a
//! duplicate), and the state tailer applies a batch the store refused again instead of dropping it
//! (a dropped batch could miss a cancel). Failures are injected with `Store::fail_next_writes`.
//! Runs on the embedded cluster, or on a real broker with KSTASH_TEST_BROKERS.

mod common;

use common::{eventually, Api, Receiver, TestKafka};
use reqwest::Method;

/// Store writes that fail: the API's own apply, then the tailer's first attempts.
const STORE_FAILURES: u32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_kafka_took_is_answered_as_stored_and_the_view_gets_it_when_the_store_recovers() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let receiver = Receiver::start().await;

    kstash.views().store.fail_next_writes(STORE_FAILURES);
    let (status, json) = api
        .publish(&receiver.url("/later"), "x", &[("Upstash-Delay", "1h")])
        .await;
    assert_eq!(
        status, 200,
        "stored in Kafka, so answered as stored: {json}"
    );
    let id = json["messageId"].as_str().unwrap().to_string();

    let message = eventually("the message in the view", || async {
        let (status, message) = api
            .call(Method::GET, &format!("/v2/messages/{id}"), None)
            .await;
        (status == 200).then_some(message)
    })
    .await;
    assert_eq!(message["messageId"], id.as_str());
    kstash.stop().await;
}
