//! Poison records (issue 8, fault 8): a record a stage cannot read is moved to the dlq topic with
//! the reason and the original bytes, and the partition moves on (its offset is committed); a
//! delay record without its due-time header is scheduled by its envelope, never delivered early.
//! Runs on the embedded cluster, or on a real broker with KSTASH_TEST_BROKERS.

mod common;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::{Api, Receiver, TestKafka};
use kstash::kafka::record::Record;
use kstash::model::now_ms;
use kstash::model::poison::PoisonRecord;

/// A whole envelope as a foreign writer would produce it, with schema version `v`.
fn envelope_json(v: u32, id: &str, url: &str, not_before: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "v": v,
        "messageId": id,
        "url": url,
        "method": "POST",
        "header": {},
        "bodyBase64": STANDARD.encode(id),
        "createdAt": now_ms(),
        "notBefore": not_before,
        "maxRetries": 0,
        "retried": 0,
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreadable_records_are_moved_to_the_dlq_topic_with_a_reason_and_the_partition_moves_on() {
    let kafka = TestKafka::new();
    let config = kafka.config();
    let prefix = config.kafka.topic_prefix.clone();
    let (ready, dlq) = (format!("{prefix}ready"), format!("{prefix}dlq"));
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;

    // Not JSON at all, and an envelope of a schema version this build does not know.
    kafka
        .produce_raw(
            &ready,
            "garbage",
            b"\xffnot an envelope",
            &[("x-origin", "test")],
        )
        .await;
    let newer = envelope_json(2, "msg_Newer1", &receiver.url("/newer"), now_ms());
    kafka.produce_raw(&ready, "msg_Newer1", &newer, &[]).await;
    // Readable messages around them are delivered as usual.
    for _ in 0..8 {
        api.publish_ok(&receiver.url("/fine"), "fine").await;
    }
    let delivered = receiver.take(8).await;
    assert!(delivered.iter().all(|r| r.uri.path() == "/fine"));

    let records = kafka.read_until(&dlq, |records| records.len() >= 2);
    let poison: Vec<PoisonRecord> = records
        .iter()
        .map(|r| PoisonRecord::decode(r).expect("a poison record"))
        .collect();
    let garbage = poison
        .iter()
        .find(|p| p.key.as_deref() == Some(&b"garbage"[..]))
        .expect("the garbage record is kept");
    assert_eq!(garbage.topic, ready);
    assert_eq!(garbage.stage, "delivery");
    assert_eq!(garbage.value.as_deref(), Some(&b"\xffnot an envelope"[..]));
    assert!(
        garbage.reason.contains("not valid JSON"),
        "{}",
        garbage.reason
    );
    assert_eq!(garbage.headers.len(), 1, "its headers are kept");
    assert_eq!(
        garbage.id,
        PoisonRecord::key_for(&ready, garbage.partition, garbage.offset)
    );
    let newer_poison = poison
        .iter()
        .find(|p| p.key.as_deref() == Some(&b"msg_Newer1"[..]))
        .expect("the newer-version record is kept");
    assert!(
        newer_poison.reason.contains("newer than this build"),
        "{}",
        newer_poison.reason
    );
    assert_eq!(newer_poison.value.as_deref(), Some(newer.as_slice()));

    // Kept, so the partitions move on: everything is committed.
    kafka.wait_fully_committed(&ready).await;
    // Poison records are not DLQ messages.
    let (status, listed) = api.call(reqwest::Method::GET, "/v2/dlq", None).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(
        listed["messages"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delay_record_without_its_due_time_header_is_not_delivered_early() {
    let kafka = TestKafka::new();
    let config = kafka.config();
    let step = format!("{}delay.1s", config.kafka.topic_prefix);
    let kstash = kafka.start(config).await;
    let mut receiver = Receiver::start().await;

    let due = now_ms() + 3_000;
    let value = envelope_json(1, "msg_NoHeader1", &receiver.url("/late"), due);
    // No kstash-not-before / kstash-hop-due headers: written by something other than kstash.
    kafka.produce_raw(&step, "msg_NoHeader1", &value, &[]).await;

    let got = receiver.next().await;
    assert_eq!(got.uri.path(), "/late");
    assert!(
        got.wall_ms >= due,
        "delivered {} ms before its notBefore",
        due - got.wall_ms
    );
    kstash.stop().await;
}
