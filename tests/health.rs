//! Liveness and readiness (issue 8, fault 6): `/health/live` answers while the process serves;
//! `/health/ready` (and `/health`) is 200 only once the views have caught up with Kafka and Kafka
//! answers, with a JSON body saying which part is missing. Runs on the embedded cluster, or on a
//! real broker with KSTASH_TEST_BROKERS (where the broker is not taken down).

mod common;

use common::{eventually, TestKafka};
use serde_json::Value;

async fn get(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.expect("health request");
    let status = response.status().as_u16();
    let body = response.json().await.expect("a JSON body");
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ready_reflects_caught_up_views_and_kafka_reachability() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let base = format!("http://{}", kstash.addr());

    let (status, live) = get(&format!("{base}/health/live")).await;
    assert_eq!((status, live["status"].as_str()), (200, Some("live")));
    let ready = eventually("ready", || async {
        let (status, body) = get(&format!("{base}/health/ready")).await;
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["state"]["caughtUp"], true);
    assert_eq!(ready["state"]["partitionsLeft"], 0);
    assert_eq!(ready["kafka"]["reachable"], true);
    assert!(ready["kafka"]["lastContact"].as_i64().is_some());
    let (status, _) = get(&format!("{base}/health")).await;
    assert_eq!(status, 200, "/health is readiness");

    let Some(cluster) = kafka.embedded.clone() else {
        kstash.stop().await;
        return;
    };
    // The embedded cluster's broker goes down: not ready (but live), saying why.
    let broker = kstash::kafka::embedded::EMBEDDED_BROKER_ID;
    cluster.mock().broker_down(broker).unwrap();
    let down = eventually("not ready while Kafka is down", || async {
        let (status, body) = get(&format!("{base}/health/ready")).await;
        (status == 503).then_some(body)
    })
    .await;
    assert_eq!(down["status"], "not ready");
    assert_eq!(down["kafka"]["reachable"], false);
    assert!(down["kafka"]["error"].is_string(), "{down}");
    assert_eq!(down["state"]["caughtUp"], true);
    let (status, _) = get(&format!("{base}/health/live")).await;
    assert_eq!(status, 200, "still live");

    cluster.mock().broker_up(broker).unwrap();
    eventually("ready again", || async {
        let (status, _) = get(&format!("{base}/health/ready")).await;
        (status == 200).then_some(())
    })
    .await;
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_with_its_state_dir_reads_only_what_is_new() {
    let kafka = TestKafka::new();
    let dir = std::env::temp_dir().join(format!("{}state", kafka.prefix));
    let mut config = kafka.config();
    config.state.dir = dir.to_string_lossy().into_owned();
    let mut receiver = common::Receiver::start().await;

    let first = kafka.start(config.clone()).await;
    let api = common::Api::new(first.addr());
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(api.publish_ok(&receiver.url("/r"), "x").await);
    }
    receiver.take(20).await;
    // Every DELIVERED event in the views before stopping.
    eventually("the first run's views complete", || async {
        let logs = api.logs(&[("state", "DELIVERED")]).await;
        (logs.len() == ids.len()).then_some(())
    })
    .await;
    first.stop().await;

    let second = kafka.start(config).await;
    let base = format!("http://{}", second.addr());
    let (_, ready) = get(&format!("{base}/health/ready")).await;
    let applied = ready["state"]["recordsApplied"].as_u64().unwrap();
    assert!(
        applied < ids.len() as u64,
        "resumed from the store: {applied} records read at start-up, not the {} events again",
        3 * ids.len()
    );
    // And the views still hold what the first run read.
    let api = common::Api::new(second.addr());
    let delivered = api.logs(&[("state", "DELIVERED")]).await;
    assert_eq!(delivered.len(), ids.len());
    second.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
