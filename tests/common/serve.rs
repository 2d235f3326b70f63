//! `kstash serve` as a child process on a test's Kafka namespace, for the tests that kill,
//! restart or run several processes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::{Api, TestKafka, WAIT};

const BIN: &str = env!("CARGO_BIN_EXE_kstash");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh scratch directory for configs and logs.
pub fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kstash-test-{}-{}",
        std::process::id(),
        kstash::model::ids::message_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Merges `over` into `base`, tables key by key.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// A `kstash serve` child process.
pub struct ServeProcess {
    pub child: Child,
    pub port: u16,
    log: PathBuf,
}

impl ServeProcess {
    /// Starts a process with at most `max_in_flight` deliveries in flight.
    pub async fn spawn(kafka: &TestKafka, dir: &Path, name: &str, max_in_flight: usize) -> Self {
        Self::spawn_with(
            kafka,
            dir,
            name,
            &format!("[delivery]\nmax_in_flight = {max_in_flight}\n"),
        )
        .await
    }

    /// Starts a process whose configuration is the test's plus `extra` (TOML: sections that
    /// repeat the test's are merged over them, key by key).
    pub async fn spawn_with(kafka: &TestKafka, dir: &Path, name: &str, extra: &str) -> Self {
        let port = free_port();
        let config = kafka.config();
        let base = format!(
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
[delivery]
commit_interval = "100ms"
allowed_networks = ["127.0.0.0/8"]
"#,
            token = super::TOKEN,
            current = super::CURRENT_KEY,
            next = super::NEXT_KEY,
            brokers = kafka.brokers,
            prefix = kafka.prefix,
            group = kafka.group,
            create = kafka.is_real(),
            session = config.kafka.session_timeout.as_millis(),
        );
        let topics: String = config
            .topics
            .iter()
            .map(|(key, t)| format!("[topics.{key}]\npartitions = {}\n", t.partitions))
            .collect();
        // The test's settings, its topics, then `extra` over them.
        let merged = [base, topics, extra.to_string()]
            .iter()
            .map(|layer| layer.parse::<toml::Table>().expect("valid TOML"))
            .reduce(|mut acc, layer| {
                merge(&mut acc, layer);
                acc
            })
            .unwrap();
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, toml::to_string(&merged).unwrap()).unwrap();
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

    pub fn api(&self) -> Api {
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

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} {pid}");
    }

    /// Waits for the process to exit; returns whether it exited successfully.
    pub async fn exited(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("process did not exit in time")
            .unwrap()
            .success()
    }
}
