//! `kstash dev` never loses what it accepted (issue 8, fault 9): the embedded cluster keeps ~5 MiB
//! per partition and drops older records silently, so kstash refuses a publish (503, saying why and
//! pointing to `kstash serve`) before a partition would have to drop records a stage still needs,
//! and every message it accepted is delivered. Embedded cluster only (a real broker has no such
//! limit).

mod common;

use std::time::Duration;

use common::{Api, Receiver, TestKafka, WAIT};

/// Bodies big enough that a few fill a partition of the embedded cluster.
const BODY_BYTES: usize = 700 * 1024;
/// More publishes than the embedded cluster could hold at once.
const PUBLISHES: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dev_refuses_what_the_embedded_cluster_has_no_room_for_and_delivers_all_it_accepted() {
    let kafka = TestKafka::new();
    if kafka.is_real() {
        eprintln!("skipped: only the embedded cluster drops records");
        return;
    }
    let mut config = kafka.config();
    config.dev.watchdog_interval = Duration::from_millis(500);
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    let body: Vec<u8> = (0..BODY_BYTES).map(|i| (i * 31 % 251) as u8).collect();

    let mut accepted = Vec::new();
    let mut refused = None;
    for _ in 0..PUBLISHES {
        let (status, json) = api
            .publish(
                &receiver.url("/big"),
                body.clone(),
                &[("Upstash-Delay", "6s")],
            )
            .await;
        match status {
            200 => accepted.push(json["messageId"].as_str().unwrap().to_string()),
            503 => {
                refused = Some(json);
                break;
            }
            other => panic!("publish answered {other}: {json}"),
        }
    }
    let refused = refused.expect("a publish is refused before the cluster drops records");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("embedded Kafka cluster is full") && error.contains("kstash serve"),
        "{error}"
    );
    assert!(
        !accepted.is_empty(),
        "publishes were accepted while there was room"
    );
    eprintln!("{} accepted before the first refusal", accepted.len());

    let seen = receiver
        .collect_until(WAIT, |seen| accepted.iter().all(|id| seen.contains_key(id)))
        .await;
    assert!(accepted.iter().all(|id| seen.contains_key(id)));
    kstash.stop().await;
}
