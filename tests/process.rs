//! The `kstash` binary as a real process: `kstash dev` from its banner to a delivery, SIGKILL in
//! the middle of a stream (nothing accepted may be lost), SIGTERM (in-flight work drains, nothing is
//! delivered twice), and a broker outage seen by the API.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Api, Receiver, Script, TestKafka, WAIT};
use kstash::config::{DEV_CURRENT_SIGNING_KEY, DEV_TOKEN};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_kstash");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kstash-test-{}-{}",
        std::process::id(),
        kstash::model::ids::message_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A `kstash serve` child process on the test's Kafka namespace.
struct ServeProcess {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl ServeProcess {
    async fn spawn(
        kafka: &TestKafka,
        dir: &std::path::Path,
        name: &str,
        max_in_flight: usize,
    ) -> Self {
        let port = free_port();
        let config = kafka.config();
        let toml = format!(
            r#"[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "20s"
[auth]
tokens = ["{token}"]
[signing]
current_key = "{current}"
next_key = "{next}"
[kafka]
brokers = "{brokers}"
topic_prefix = "{prefix}"
group_id = "{group}"
delay_group_id = "{group}-delay"
create_topics = {create}
replication_factor = 1
session_timeout = "{session}ms"
[topics.ready]
partitions = {partitions}
[topics.events]
partitions = {partitions}
[topics.delay]
partitions = {partitions}
[topics.dlq]
partitions = {partitions}
[topics.cancellations]
partitions = {partitions}
[topics.dedup]
partitions = {partitions}
[delivery]
max_in_flight = {max_in_flight}
commit_interval = "100ms"
allowed_networks = ["127.0.0.0/8"]
"#,
            token = common::TOKEN,
            current = common::CURRENT_KEY,
            next = common::NEXT_KEY,
            brokers = kafka.brokers,
            prefix = kafka.prefix,
            group = kafka.group,
            create = kafka.is_real(),
            session = config.kafka.session_timeout.as_millis(),
            partitions = common::TEST_PARTITIONS,
        );
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, toml).unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .env_remove("KSTASH_CONFIG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut process = ServeProcess { child, port, log };
        process.wait_healthy().await;
        process
    }

    fn api(&self) -> Api {
        Api::new(([127, 0, 0, 1], self.port).into())
    }

    async fn wait_healthy(&mut self) {
        let url = format!("http://127.0.0.1:{}/health", self.port);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("kstash exited with {status}: {}", self.log_text());
            }
            if let Ok(r) = reqwest::get(&url).await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "kstash never became healthy: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await; // polling interval, not a sync point
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} {pid}");
    }

    /// Waits for the process to exit; returns whether it exited successfully.
    async fn exited(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("process did not exit in time")
            .unwrap()
            .success()
    }
}

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
    assert!(
        json["error"].as_str().unwrap().contains("safe to retry"),
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
