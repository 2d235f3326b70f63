//! The parallel consumer's lanes and commits on their own (no HTTP, no views): a record that
//! never finishes does not make a restarted consumer redo what finished behind it (the commit
//! metadata), and a lane whose records do not fit in memory parks them in Kafka and still takes
//! every one, in order.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestKafka, WAIT};
use kstash::kafka::consumer::{ConsumerSettings, Done, ParallelConsumer, RecordHandler};
use kstash::kafka::lanes::LanePolicy;
use kstash::kafka::topics::TopicSpec;
use kstash::kafka::{self, Producer, Role};
use rdkafka::message::{BorrowedMessage, Message, OwnedMessage};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Key of the lane whose records never finish.
const BLOCKED: &str = "q:blocked";
/// How far in the future a blocked record asks to be tried again.
const NEVER: Duration = Duration::from_secs(3600);

/// Records lanes by their `q:` key, never finishes the `BLOCKED` one, takes `work` for each
/// record (`slow_work` for keys starting with `q:slow`), and reports every handled offset.
struct Handler {
    handled: mpsc::UnboundedSender<(String, i64)>,
    work: Duration,
    slow_work: Duration,
}

impl RecordHandler for Handler {
    fn lane(&self, record: &BorrowedMessage<'_>) -> Option<String> {
        let key = std::str::from_utf8(record.key()?).ok()?;
        key.starts_with("q:").then(|| key.to_string())
    }

    fn policy(&self, _lane: &str) -> LanePolicy {
        LanePolicy {
            parallelism: 1,
            paused: false,
        }
    }

    async fn handle(&self, record: OwnedMessage) -> Done {
        let key = String::from_utf8_lossy(record.key().unwrap_or_default()).into_owned();
        let _ = self.handled.send((key.clone(), record.offset()));
        let work = if key.starts_with("q:slow") {
            self.slow_work
        } else {
            self.work
        };
        tokio::time::sleep(work).await;
        if key == BLOCKED {
            Done::Again {
                at_ms: kstash::model::now_ms() + NEVER.as_millis() as i64,
                record,
            }
        } else {
            Done::Finished
        }
    }
}

struct Setup {
    kafka: TestKafka,
    topic: String,
    producer: Producer,
}

impl Setup {
    async fn new() -> Self {
        let kafka = TestKafka::new();
        let config = kafka.config();
        let topic = format!("{}lanes", kafka.prefix);
        kafka::topics::ensure(
            &config.kafka,
            vec![TopicSpec {
                name: topic.clone(),
                partitions: 1,
                config: vec![],
                min_record_bytes: 0,
            }],
            kafka.embedded.as_deref(),
        )
        .await
        .unwrap();
        let producer = Producer::new(&config.kafka).unwrap();
        Setup {
            kafka,
            topic,
            producer,
        }
    }

    async fn produce(&self, key: &str, value: &str) {
        self.producer
            .send_raw(&self.topic, key, Some(value.as_bytes()), &[])
            .await
            .unwrap();
    }

    fn consumer(&self, lane_buffer: usize) -> ParallelConsumer {
        let config = self.kafka.config();
        ParallelConsumer::new(
            &kafka::client_config(&config.kafka, Role::Consumer).unwrap(),
            ConsumerSettings {
                topics: vec![self.topic.clone()],
                max_in_flight: 16,
                commit_interval: Duration::from_millis(100),
                shutdown_grace: Duration::from_secs(1),
                lane_buffer,
                max_buffered: 1000,
                commit_metadata_max_bytes: config.kafka.commit_metadata_max_bytes,
            },
        )
        .unwrap()
    }
}

/// Receives handled offsets until `done` holds for the counts per offset.
async fn handled_until(
    rx: &mut mpsc::UnboundedReceiver<(String, i64)>,
    seen: &mut Vec<(String, i64)>,
    done: impl Fn(&[(String, i64)]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(seen) {
        let next = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out with {} records handled", seen.len()))
            .expect("handler alive");
        seen.push(next);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_skips_what_finished_behind_a_blocked_head() {
    const BEHIND: i64 = 1000;
    let setup = Setup::new().await;
    setup.produce(BLOCKED, "head").await;
    for i in 0..BEHIND {
        setup.produce(&format!("free-{i}"), "x").await;
    }

    // The first consumer: the head blocks (it keeps asking to be tried again in an hour), the
    // 1000 behind it finish.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let first_stop = CancellationToken::new();
    let first = setup.consumer(64);
    let handler = Arc::new(Handler {
        handled: tx,
        work: Duration::ZERO,
        slow_work: Duration::ZERO,
    });
    let running = tokio::spawn(first.run(handler, first_stop.clone()));
    let mut seen = Vec::new();
    handled_until(&mut rx, &mut seen, |s| s.len() as i64 > BEHIND).await;

    // Wait until a commit says so: offset 0 (the head) with the 1000 behind it as finished.
    let group = setup.kafka.group.clone();
    let committed = common::eventually("a commit with the finished offsets", || async {
        let (offset, metadata) = setup
            .kafka
            .committed_with_metadata(&group, &setup.topic, 0)?;
        let decoded = kstash::kafka::commit_metadata::decode(offset, &metadata)?;
        let finished: i64 = decoded.done.iter().map(|(a, b)| b - a).sum();
        (offset == 0 && finished == BEHIND).then_some(metadata)
    })
    .await;
    assert!(committed.len() < 40, "compact: {committed:?}");

    // Stop it. (Its periodic commit above already holds what a kill would leave behind; the
    // kill -9 of a whole process is tests/process.rs.)
    first_stop.cancel();
    running.await.unwrap();

    // A restarted consumer in the same group, with one more record to show it has read past the
    // 1000: it handles the head again (it never finished) and the new record, nothing else.
    setup.produce("free-sentinel", "y").await;
    let (tx2, mut rx2) = mpsc::unbounded_channel();
    let second = setup.consumer(64);
    let handler = Arc::new(Handler {
        handled: tx2,
        work: Duration::ZERO,
        slow_work: Duration::ZERO,
    });
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(second.run(handler, shutdown.clone()));
    let mut after = Vec::new();
    handled_until(&mut rx2, &mut after, |s| {
        s.iter().any(|(k, _)| k == BLOCKED) && s.iter().any(|(k, _)| k == "free-sentinel")
    })
    .await;
    let redone: Vec<_> = after
        .iter()
        .filter(|(k, _)| k != BLOCKED && k != "free-sentinel")
        .collect();
    assert!(
        redone.is_empty(),
        "{} finished records handled again, e.g. {:?}",
        redone.len(),
        &redone[..redone.len().min(5)]
    );
    shutdown.cancel();
    let _ = running.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lane_larger_than_its_buffer_is_parked_and_taken_back_in_order() {
    const PER_LANE: usize = 40;
    const LANES: [&str; 2] = ["q:slow-a", "q:slow-b"];
    let setup = Setup::new().await;
    for i in 0..PER_LANE {
        for lane in LANES {
            setup.produce(lane, &i.to_string()).await;
        }
        setup.produce(&format!("free-{i}"), "x").await;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    // A buffer of 4 for 40 records a lane: each lane parks and is rewound several times.
    let consumer = setup.consumer(4);
    let handler = Arc::new(Handler {
        handled: tx,
        work: Duration::from_millis(5),
        slow_work: Duration::from_millis(5),
    });
    let running = tokio::spawn(consumer.run(handler, shutdown.clone()));
    let mut seen = Vec::new();
    let total = PER_LANE * (LANES.len() + 1);
    handled_until(&mut rx, &mut seen, |s| s.len() >= total).await;
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for (key, offset) in &seen {
        per_key.entry(key.clone()).or_default().push(*offset);
    }
    for lane in LANES {
        let offsets = &per_key[lane];
        assert_eq!(offsets.len(), PER_LANE, "{lane}: every record once");
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "{lane}: in offset order: {offsets:?}"
        );
    }
    assert_eq!(
        per_key.len(),
        LANES.len() + PER_LANE,
        "every free record once"
    );
    // Nothing more arrives: everything was handled exactly once.
    let extra = Arc::new(Mutex::new(Vec::new()));
    if let Ok(Some(more)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        extra.lock().unwrap().push(more);
    }
    assert!(
        extra.lock().unwrap().is_empty(),
        "{:?}",
        extra.lock().unwrap()
    );
    shutdown.cancel();
    let _ = running.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_and_fast_lanes_with_tiny_buffers_each_take_every_record_once_in_order() {
    const PER_LANE: usize = 60;
    const LANES: [&str; 4] = ["q:slow-1", "q:slow-2", "q:fast-1", "q:fast-2"];
    let setup = Setup::new().await;
    for i in 0..PER_LANE {
        for lane in LANES {
            setup.produce(lane, &i.to_string()).await;
        }
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    // A buffer of 3: the slow lanes park and rewind over and over while the fast ones keep going,
    // so rewinds, skips ahead and the waits of other lanes for a pass all interleave.
    let consumer = setup.consumer(3);
    let handler = Arc::new(Handler {
        handled: tx,
        work: Duration::from_millis(1),
        slow_work: Duration::from_millis(15),
    });
    let running = tokio::spawn(consumer.run(handler, shutdown.clone()));
    let mut seen = Vec::new();
    handled_until(&mut rx, &mut seen, |s| s.len() >= PER_LANE * LANES.len()).await;
    for lane in LANES {
        let offsets: Vec<i64> = seen
            .iter()
            .filter(|(k, _)| k == lane)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(offsets.len(), PER_LANE, "{lane}: every record once");
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "{lane}: in offset order: {offsets:?}"
        );
    }
    let extra = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
    assert!(extra.is_err(), "handled again: {extra:?}");
    shutdown.cancel();
    let _ = running.await;
}
