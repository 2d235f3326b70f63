//! The `kstash` binary as a real process: `kstash dev` from its banner to a delivery, SIGKILL in
//! the middle of a stream (nothing accepted may be lost), SIGTERM (in-flight work drains, nothing is
//! delivered twice), and a broker outage seen by the API.

mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::serve::{scratch_dir, ServeProcess};
use common::{Api, Received, Receiver, Script, TestKafka, WAIT};
use futures::StreamExt;
use kstash::config::{DEV_CURRENT_SIGNING_KEY, DEV_TOKEN};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_kstash");

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dev_binary_prints_its_banner_and_delivers_signed_messages() {
    let mut child = Command::new(BIN)
        .args(["dev", "--port", "0"])
        .env("RUST_LOG", "warn")
        .env_remove("KSTASH_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = Vec::new();
    let url = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            banner.push(line.clone());
            if let Some(url) = line.trim().strip_prefix("QSTASH_URL=") {
                return url.to_string();
            }
        }
        panic!("no QSTASH_URL in banner: {banner:?}");
    })
    .await
    .expect("banner in time");
    let rest: Vec<String> = {
        let mut rest = Vec::new();
        for _ in 0..3 {
            rest.push(lines.next_line().await.unwrap().unwrap());
        }
        rest
    };
    assert!(rest.iter().any(|l| l.contains(DEV_TOKEN)), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains(DEV_CURRENT_SIGNING_KEY)),
        "{rest:?}"
    );

    let mut receiver = Receiver::start().await;
    let http = reqwest::Client::new();
    let response = http
        .post(format!("{url}/v2/publish/{}", receiver.url("/dev")))
        .bearer_auth(DEV_TOKEN)
        .body("from dev")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "loopback allowed in dev mode");
    let keys: serde_json::Value = http
        .get(format!("{url}/v2/keys"))
        .bearer_auth(DEV_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        keys,
        serde_json::json!({"current":"sig_7kYjw48mhY7kAjqNGcy6cr29RJ6r","next":"sig_5ZB6DVzB1wjE8S6rZ7eenA8Pdnhs"}),
        "exactly what the TS SDK's dev-mode check expects"
    );
    let got = receiver.next().await;
    assert_eq!(got.body.as_ref(), b"from dev");
    let token = got.header("upstash-signature").unwrap();
    common::verify_signature(token, DEV_CURRENT_SIGNING_KEY, b"from dev");

    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "SIGTERM is a clean exit: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_process_loses_nothing_it_accepted() {
    const TARGET_ACCEPTED: usize = 300;
    const DELIVERED_BEFORE_KILL: usize = 40;
    let kafka = TestKafka::new();
    kafka.create_topics(&kafka.config());
    let dir = scratch_dir();
    let mut receiver = Receiver::start().await;
    // Slow enough that deliveries are in flight when the process dies.
    receiver.set(Script::slow(Duration::from_millis(100)));
    let destination = receiver.url("/crash");

    let mut first = ServeProcess::spawn(&kafka, &dir, "first", 8).await;
    let target = Arc::new(Mutex::new(first.api().base));
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let publisher = {
        let (target, accepted, destination) =
            (target.clone(), accepted.clone(), destination.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut refused = 0usize;
            let mut i = 0usize;
            while accepted.lock().unwrap().len() < TARGET_ACCEPTED {
                i += 1;
                let base = target.lock().unwrap().clone();
                let sent = http
                    .post(format!("{base}/v2/publish/{destination}"))
                    .bearer_auth(common::TOKEN)
                    .body(format!("n{i}"))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 200 => {
                        let json: serde_json::Value = r.json().await.unwrap();
                        accepted
                            .lock()
                            .unwrap()
                            .push(json["messageId"].as_str().unwrap().to_string());
                    }
                    _ => {
                        refused += 1;
                        // The process is down: back off a little before the next try.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            refused
        })
    };

    // Mid-stream: some delivered, more accepted and in flight or waiting in Kafka.
    receiver
        .collect_until(WAIT, |c| c.len() >= DELIVERED_BEFORE_KILL)
        .await;
    first.signal("-KILL");
    assert!(!first.exited(WAIT).await, "SIGKILL is not a clean exit");
    let second = ServeProcess::spawn(&kafka, &dir, "second", 8).await;
    *target.lock().unwrap() = second.api().base;

    let refused = tokio::time::timeout(WAIT, publisher)
        .await
        .unwrap()
        .unwrap();
    let accepted: HashSet<String> = accepted.lock().unwrap().iter().cloned().collect();
    assert_eq!(accepted.len(), TARGET_ACCEPTED);
    let counts = receiver
        .collect_until(WAIT, |c| accepted.iter().all(|id| c.contains_key(id)))
        .await;
    let redelivered = counts.values().filter(|n| **n > 1).count();
    eprintln!(
        "kill test: {} accepted, {refused} publishes refused while down, {redelivered} redelivered after the crash",
        accepted.len()
    );
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_work_and_nothing_is_delivered_twice() {
    const MESSAGES: usize = 12;
    let kafka = TestKafka::new();
    kafka.create_topics(&kafka.config());
    let dir = scratch_dir();
    let mut receiver = Receiver::start().await;
    receiver.set(Script::slow(Duration::from_millis(1500)));
    let destination = receiver.url("/drain");

    let mut first = ServeProcess::spawn(&kafka, &dir, "first", 4).await;
    let api = first.api();
    let mut ids = HashSet::new();
    for _ in 0..MESSAGES {
        ids.insert(api.publish_ok(&destination, "d").await);
    }
    // Deliveries are in flight (each takes 1.5 s) when SIGTERM arrives.
    receiver.next().await;
    first.signal("-TERM");
    assert!(
        first.exited(WAIT).await,
        "graceful exit: {}",
        first.log_text()
    );
    let log = first.log_text();
    assert!(log.contains("draining in-flight work"), "{log}");

    receiver.set(Script::ok());
    let mut second = ServeProcess::spawn(&kafka, &dir, "second", 4).await;
    receiver
        .collect_until(WAIT, |c| ids.iter().all(|id| c.contains_key(id)))
        .await;
    second.signal("-TERM");
    assert!(second.exited(WAIT).await);
    let counts = receiver.counts();
    assert_eq!(counts.len(), MESSAGES);
    assert!(
        counts.values().all(|n| *n == 1),
        "the first process finished and committed what it started, so nothing came twice: {counts:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_is_a_503_and_publishing_recovers() {
    let kafka = TestKafka::new();
    let Some(cluster) = kafka.embedded.clone() else {
        eprintln!("skipped on a real broker: fault injection needs the embedded cluster");
        return;
    };
    let mut config = kafka.config();
    config.kafka.produce_timeout = Duration::from_secs(3);
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;

    cluster
        .mock()
        .broker_down(kstash::kafka::embedded::EMBEDDED_BROKER_ID)
        .unwrap();
    let (status, json) = api.publish(&receiver.url("/outage"), "lost?", &[]).await;
    assert_eq!(status, 503, "{json}");
    // A produce that timed out may still have been written: the answer says so, and does not
    // call a retry safe.
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("may or may not be stored"),
        "{json}"
    );

    cluster
        .mock()
        .broker_up(kstash::kafka::embedded::EMBEDDED_BROKER_ID)
        .unwrap();
    let id = api.publish_ok(&receiver.url("/outage"), "after").await;
    // The refused message may still arrive (the broker may have stored it before the timeout);
    // the accepted one must.
    let counts = receiver.collect_until(WAIT, |c| c.contains_key(&id)).await;
    assert_eq!(counts[&id], 1);
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_behind_a_blocked_queue_head_brings_nothing_finished_back() {
    const BEHIND: usize = 1000;
    let kafka = TestKafka::new();
    let mut config = kafka.config();
    // One partition: the head pins the commit of everything published after it.
    config.topics.get_mut("ready").unwrap().partitions = 1;
    kafka.create_topics(&config);
    let dir = scratch_dir();
    let one_partition = "[topics.ready]\npartitions = 1\n";
    let mut head_receiver = Receiver::start().await;
    head_receiver.set(Script::status(500));
    let mut bulk = Receiver::start().await;

    let mut first = ServeProcess::spawn_with(&kafka, &dir, "first", one_partition).await;
    let api = first.api();
    let head = api
        .enqueue(
            "blocked",
            &head_receiver.url("/head"),
            "head",
            &[("Upstash-Retries", "20"), ("Upstash-Retry-Delay", "500")],
        )
        .await;
    let ids: HashSet<String> = futures::stream::iter(0..BEHIND)
        .map(|i| {
            let (api, url) = (&api, bulk.url("/bulk"));
            async move {
                let (status, json) = api.publish(&url, format!("{i}"), &[]).await;
                assert_eq!(status, 200, "{json}");
                json["messageId"].as_str().unwrap().to_string()
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    bulk.collect_until(WAIT, |c| ids.iter().all(|id| c.contains_key(id)))
        .await;
    assert_eq!(
        head_receiver.next().await.message_id(),
        head,
        "the head is being retried"
    );

    // Wait for a commit that says: the head unfinished, the 1000 behind it finished.
    let topic = format!("{}ready", kafka.prefix);
    common::eventually(
        "a commit with the finished offsets above the head",
        || async {
            let (offset, metadata) = kafka.committed_with_metadata(&kafka.group, &topic, 0)?;
            let decoded = kstash::kafka::commit_metadata::decode(offset, &metadata)?;
            let finished: i64 = decoded.done.iter().map(|(a, b)| b - a).sum();
            (finished >= BEHIND as i64).then_some(())
        },
    )
    .await;
    first.signal("-KILL");
    assert!(!first.exited(WAIT).await, "SIGKILL is not a clean exit");

    head_receiver.set(Script::ok());
    head_receiver.counts(); // what the first process sent before it died
    let second = ServeProcess::spawn_with(&kafka, &dir, "second", one_partition).await;
    // The head is delivered by the new process, continuing its retry count...
    let delivered = head_receiver.next().await;
    assert_eq!(delivered.message_id(), head);
    assert_ne!(
        delivered.header("upstash-retried"),
        Some("0"),
        "the count continues"
    );
    // ...which then reads past the 1000 (a message published after them arrives) without
    // delivering any of them again.
    let sentinel = second.api().publish_ok(&bulk.url("/sentinel"), "s").await;
    let counts = bulk
        .collect_until(WAIT, |c| c.contains_key(&sentinel))
        .await;
    let again: Vec<_> = ids.iter().filter(|id| counts[*id] > 1).collect();
    assert!(
        again.is_empty(),
        "{} of {BEHIND} delivered again",
        again.len()
    );
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_keep_every_queue_in_order_when_one_is_killed() {
    const QUEUES: usize = 6;
    const PER_QUEUE: usize = 60;
    const BEFORE_KILL: usize = 80;
    let kafka = TestKafka::new();
    kafka.create_topics(&kafka.config());
    let dir = scratch_dir();
    let mut receiver = Receiver::start().await;
    // Slow enough that heads are in flight when a process dies.
    receiver.set(Script::slow(Duration::from_millis(20)));
    let mut first = ServeProcess::spawn(&kafka, &dir, "first", 32).await;
    let second = ServeProcess::spawn(&kafka, &dir, "second", 32).await;
    let (api1, api2) = (first.api(), second.api());

    // Queue settings written through one process are seen by the other within a second.
    let written = std::time::Instant::now();
    let (status, _) = api1
        .call(
            reqwest::Method::POST,
            "/v2/queues",
            Some(serde_json::json!({"queueName": "seen", "parallelism": 3, "paused": true})),
        )
        .await;
    assert_eq!(status, 200);
    common::eventually("the other process's view of the queue", || async {
        let (status, q) = api2
            .call(reqwest::Method::GET, "/v2/queues/seen", None)
            .await;
        (status == 200 && q["paused"] == true && q["parallelism"] == 3).then_some(())
    })
    .await;
    let seen_after = written.elapsed();
    assert!(
        seen_after < Duration::from_secs(1),
        "seen after {seen_after:?}"
    );

    // Each queue's messages are enqueued in order (alternating between the processes).
    let publishers: Vec<_> = (0..QUEUES)
        .map(|q| {
            let (a, b) = (Api::new(api1.addr()), Api::new(api2.addr()));
            let url = receiver.url(&format!("/q{q}"));
            tokio::spawn(async move {
                for i in 0..PER_QUEUE {
                    let api = if i % 2 == 0 { &a } else { &b };
                    api.enqueue(&format!("q{q}"), &url, format!("{i}"), &[])
                        .await;
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    let mut arrivals: Vec<Received> = Vec::new();
    while arrivals.len() < BEFORE_KILL {
        arrivals.push(receiver.next().await);
    }
    first.signal("-KILL");
    assert!(!first.exited(WAIT).await);
    let distinct = |a: &[Received]| {
        a.iter()
            .map(|r| r.message_id())
            .collect::<HashSet<_>>()
            .len()
    };
    while distinct(&arrivals) < QUEUES * PER_QUEUE {
        arrivals.push(receiver.next().await);
    }
    for q in 0..QUEUES {
        let path = format!("/q{q}");
        let mut sequence: Vec<usize> = arrivals
            .iter()
            .filter(|r| r.uri.path() == path)
            .map(|r| std::str::from_utf8(&r.body).unwrap().parse().unwrap())
            .collect();
        // A duplicate of the head in flight at the kill is allowed; any other reordering is not.
        sequence.dedup();
        assert_eq!(
            sequence,
            (0..PER_QUEUE).collect::<Vec<_>>(),
            "queue q{q} in enqueue order"
        );
    }
    let duplicates = arrivals.len() - QUEUES * PER_QUEUE;
    eprintln!(
        "two-process kill: {} deliveries, {duplicates} duplicates",
        arrivals.len()
    );
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schedule_fires_each_time_once_through_the_takeover_of_a_killed_owner() {
    const NEXT_MINUTE: Duration = Duration::from_secs(75);
    const MINUTE_MS: i64 = 60_000;
    let kafka = TestKafka::new();
    kafka.create_topics(&kafka.config());
    let dir = scratch_dir();
    let mut receiver = Receiver::start().await;
    let mut owner = ServeProcess::spawn(&kafka, &dir, "owner", 8).await;
    let (status, created) = owner
        .api()
        .publish_path(
            &format!("/v2/schedules/{}", receiver.url("/tick")),
            "tick",
            &[
                ("Upstash-Cron", "* * * * *"),
                ("Upstash-Schedule-Id", "takeover"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{created}");

    // The owner fires a minute, then dies (its delivery of that fire may be in flight, and then
    // is made again by the successor: a duplicate delivery of the same message is allowed, a
    // second message for the same time is not); a new process takes the schedule over.
    let first = receiver.next_within(NEXT_MINUTE).await;
    owner.signal("-KILL");
    assert!(!owner.exited(WAIT).await);
    let successor = ServeProcess::spawn(&kafka, &dir, "successor", 8).await;
    let mut fires: Vec<common::Received> = vec![first];
    let deadline = tokio::time::Instant::now() + NEXT_MINUTE + WAIT;
    while fires
        .iter()
        .map(|r| r.message_id())
        .collect::<HashSet<_>>()
        .len()
        < 2
    {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        fires.push(receiver.next_within(left).await);
    }
    // Anything arriving now would be a further fire or a repeat.
    while let Ok(r) = tokio::time::timeout(Duration::from_secs(5), receiver.next()).await {
        fires.push(r);
    }
    let minute = |r: &common::Received| r.wall_ms / MINUTE_MS * MINUTE_MS;
    let mut first_minute_of: Vec<(String, i64)> = Vec::new();
    for r in &fires {
        assert_eq!(r.header("upstash-schedule-id"), Some("takeover"));
        if !first_minute_of.iter().any(|(id, _)| *id == r.message_id()) {
            first_minute_of.push((r.message_id(), minute(r)));
        }
    }
    assert_eq!(
        first_minute_of.len(),
        2,
        "one message per fire time: {first_minute_of:?}"
    );
    assert_eq!(
        first_minute_of[1].1 - first_minute_of[0].1,
        MINUTE_MS,
        "the successor fired the next minute once and did not fire the owner's again"
    );
    eprintln!(
        "schedule takeover: {} deliveries for 2 fire times ({} repeated after the kill)",
        fires.len(),
        fires.len() - 2
    );
    let log = successor.log_text();
    assert!(log.contains("schedules partition taken over"), "{log}");
    drop(successor);
    let _ = std::fs::remove_dir_all(&dir);
}
