//! Long delays outlive the event log (issue 8, fault 5): a message published to wait longer than
//! `state.long_delay_after` is kept on the compacted pending topic, so a process started after the
//! events topic dropped its CREATED event still finds it (`GET /v2/messages/{id}`) and cancels it.
//! The events are dropped for real: by DeleteRecords on a real broker, by overflowing the embedded
//! cluster's partition (it keeps ~5 MiB) otherwise.

mod common;

use std::time::Duration;

use common::{eventually, Api, Receiver, TestKafka, TEST_PARTITIONS, WAIT};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use reqwest::Method;

/// Drops every record of `topic` so far.
async fn drop_all_records(kafka: &TestKafka, topic: &str, key: &str) {
    if kafka.is_real() {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .create()
            .unwrap();
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..TEST_PARTITIONS {
            let (_, high) = consumer.fetch_watermarks(topic, p, WAIT).unwrap();
            tpl.add_partition_offset(topic, p, Offset::Offset(high))
                .unwrap();
        }
        admin
            .delete_records(&tpl, &AdminOptions::new())
            .await
            .expect("DeleteRecords");
    } else {
        // The embedded cluster keeps ~5 MiB per partition: records with the message's key land
        // on its CREATED event's partition and push it out.
        let filler = vec![b'-'; 900 * 1024];
        for _ in 0..7 {
            kafka.produce_raw(topic, key, &filler, &[]).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_delayed_message_is_found_and_cancelled_after_its_events_are_gone() {
    let kafka = TestKafka::new();
    let mut config = kafka.config();
    config.state.long_delay_after = Duration::from_secs(60);
    let events = format!("{}events", config.kafka.topic_prefix);
    let receiver = Receiver::start().await;

    let first = kafka.start(config.clone()).await;
    let api = Api::new(first.addr());
    let (status, json) = api
        .publish(
            &receiver.url("/later"),
            "in a month",
            &[("Upstash-Delay", "30d")],
        )
        .await;
    assert_eq!(status, 200, "{json}");
    let id = json["messageId"].as_str().unwrap().to_string();
    first.stop().await;

    drop_all_records(&kafka, &events, &id).await;

    // A new process (fresh local views) after the event log lost the message.
    let second = kafka.start(config).await;
    let api = Api::new(second.addr());
    let logs = api.logs(&[("messageId", id.as_str())]).await;
    assert!(
        logs.iter().all(|l| l["state"] != "CREATED"),
        "the CREATED event is gone: {logs:?}"
    );
    let (status, message) = api
        .call(Method::GET, &format!("/v2/messages/{id}"), None)
        .await;
    assert_eq!(status, 200, "still pending and found: {message}");
    assert_eq!(message["messageId"], id.as_str());
    let (status, cancelled) = api
        .call(Method::DELETE, &format!("/v2/messages/{id}"), None)
        .await;
    assert_eq!((status, cancelled["cancelled"].as_u64()), (202, Some(1)));
    eventually("the cancelled message gone", || async {
        let (status, _) = api
            .call(Method::GET, &format!("/v2/messages/{id}"), None)
            .await;
        (status == 404).then_some(())
    })
    .await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delivered_long_delayed_message_removes_its_pending_record() {
    let kafka = TestKafka::new();
    let mut config = kafka.config();
    config.state.long_delay_after = Duration::from_secs(1);
    let pending = format!("{}state.pending", config.kafka.topic_prefix);
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;

    let (status, json) = api
        .publish(&receiver.url("/soon"), "x", &[("Upstash-Delay", "2s")])
        .await;
    assert_eq!(status, 200, "{json}");
    let got = receiver.next().await;
    assert_eq!(got.message_id(), json["messageId"].as_str().unwrap());
    // The record, then its tombstone (an empty value).
    let records = kafka.read_until(&pending, |r| r.len() >= 2);
    assert!(!records[0].is_empty(), "the pending record");
    assert!(records[1].is_empty(), "then a tombstone");
    kstash.stop().await;
}
