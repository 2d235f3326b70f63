//! Shared integration-test harness.
//!
//! Every test gets its own Kafka namespace: by default a fresh embedded cluster (librdkafka's mock,
//! the same code path as `kstash dev`); with `KSTASH_TEST_BROKERS=host:port` the real broker, with
//! a unique topic prefix and consumer group per test. A scripted local HTTP receiver records what
//! kstash delivers. Every wait is bounded and event-driven (channels, polling a condition with a
//! deadline), never a bare sleep.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod serve;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::Router;
use kstash::config::{Config, Mode};
use kstash::kafka::embedded::EmbeddedCluster;
use kstash::server::{self, Running};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;

/// Env var that switches the tests to a real broker.
pub const BROKERS_ENV: &str = "KSTASH_TEST_BROKERS";
pub const TOKEN: &str = "test-token";
pub const CURRENT_KEY: &str = "sig_test_current_0123456789abcdefghijkl";
pub const NEXT_KEY: &str = "sig_test_next_0123456789abcdefghijklmnop";
/// Partitions of the test topics: several, so parallel partitions are exercised.
pub const TEST_PARTITIONS: i32 = 4;
/// Default bound of every wait in the tests.
pub const WAIT: Duration = Duration::from_secs(60);

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The Kafka a test runs against.
pub struct TestKafka {
    pub embedded: Option<Arc<EmbeddedCluster>>,
    pub brokers: String,
    pub prefix: String,
    pub group: String,
}

impl TestKafka {
    pub fn new() -> Self {
        // kstash's logs in test output (shown for failing tests); RUST_LOG filters them.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .try_init();
        let unique = format!(
            "{}-{}-{}",
            std::process::id(),
            kstash::model::now_ms(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let prefix = format!("t{unique}.");
        let group = format!("g{unique}");
        match std::env::var(BROKERS_ENV) {
            Ok(brokers) if !brokers.is_empty() => TestKafka {
                embedded: None,
                brokers,
                prefix,
                group,
            },
            _ => {
                let cluster = EmbeddedCluster::start().expect("embedded cluster");
                TestKafka {
                    brokers: cluster.bootstrap_servers().to_string(),
                    embedded: Some(Arc::new(cluster)),
                    prefix,
                    group,
                }
            }
        }
    }

    pub fn is_real(&self) -> bool {
        self.embedded.is_none()
    }

    /// A kstash configuration for this namespace: test credentials, loopback allowed, fast
    /// commits, API on a free port.
    pub fn config(&self) -> Config {
        let mut c = Config::defaults(Mode::Serve);
        c.server.listen = "127.0.0.1:0".parse().unwrap();
        c.server.shutdown_grace = Duration::from_secs(20);
        c.auth.tokens = vec![TOKEN.to_string()];
        c.signing.current_key = CURRENT_KEY.to_string();
        c.signing.next_key = NEXT_KEY.to_string();
        c.kafka.brokers = self.brokers.clone();
        c.kafka.topic_prefix = self.prefix.clone();
        c.kafka.group_id = self.group.clone();
        c.kafka.delay_group_id = format!("{}-delay", self.group);
        c.kafka.replication_factor = 1;
        // The real broker refuses session timeouts below its group.min.session.timeout.ms (6 s).
        c.kafka.session_timeout = if self.is_real() {
            Duration::from_secs(6)
        } else {
            Duration::from_secs(2)
        };
        c.set_partitions(TEST_PARTITIONS);
        c.dev.partitions = TEST_PARTITIONS;
        c.delivery.commit_interval = Duration::from_millis(100);
        c.delivery.allowed_networks = vec!["127.0.0.0/8".parse().unwrap()];
        c.validate(Mode::Serve).expect("test config is valid");
        c
    }

    /// Starts kstash in this process.
    pub async fn start(&self, config: Config) -> Running {
        server::start(config, self.embedded.clone())
            .await
            .expect("kstash starts")
    }

    /// Creates the topics ahead of a kstash that will not (a child process on the embedded
    /// cluster, where only the mock API can create topics).
    pub fn create_topics(&self, config: &Config) {
        if let Some(cluster) = &self.embedded {
            for spec in kstash::topics::specs(config) {
                cluster.create_topic(&spec.name, spec.partitions).unwrap();
            }
        }
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("group.id", format!("{}-reader", self.group))
            .set("enable.auto.commit", "false");
        c
    }

    /// Reads every record of `topic` from the beginning until `done(records)` holds.
    pub fn read_until(
        &self,
        topic: &str,
        mut done: impl FnMut(&[Vec<u8>]) -> bool,
    ) -> Vec<Vec<u8>> {
        let consumer: BaseConsumer = self.client_config().create().unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..TEST_PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + WAIT;
        let mut records = Vec::new();
        while !done(&records) {
            assert!(Instant::now() < deadline, "timed out reading {topic}");
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                records.push(m.payload().unwrap_or_default().to_vec());
            }
        }
        records
    }

    /// Committed offset and metadata of consumer group `group` for partition `partition` of
    /// `topic` (`None` when nothing is committed).
    pub fn committed_with_metadata(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
    ) -> Option<(i64, String)> {
        let mut c = self.client_config();
        c.set("group.id", group);
        let consumer: BaseConsumer = c.create().unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .ok()?;
        let elem = committed.find_partition(topic, partition)?;
        match elem.offset() {
            Offset::Offset(o) => Some((o, elem.metadata().to_string())),
            _ => None,
        }
    }

    /// Produces a raw record (as a foreign or a broken writer would) and waits for the ack.
    pub async fn produce_raw(
        &self,
        topic: &str,
        key: &str,
        value: &[u8],
        headers: &[(&str, &str)],
    ) {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .unwrap();
        let headers = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(*v),
            })
        });
        producer
            .send(
                FutureRecord::to(topic)
                    .key(key)
                    .payload(value)
                    .headers(headers),
                WAIT,
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    }

    /// Waits until the delivery group has committed every partition of `topic` to its end.
    pub async fn wait_fully_committed(&self, topic: &str) {
        eventually(&format!("{topic} fully committed"), || async {
            self.committed_and_high(topic)
                .iter()
                .all(|(committed, high)| committed == high)
                .then_some(())
        })
        .await;
    }

    /// Committed offset of the delivery group per partition of `topic`, and the high watermarks.
    pub fn committed_and_high(&self, topic: &str) -> Vec<(i64, i64)> {
        let mut c = self.client_config();
        c.set("group.id", &self.group);
        let consumer: BaseConsumer = c.create().unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..TEST_PARTITIONS {
            tpl.add_partition(topic, p);
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .unwrap();
        (0..TEST_PARTITIONS)
            .map(|p| {
                let c = match committed.find_partition(topic, p).unwrap().offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                };
                let (_, high) = consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .unwrap();
                (c, high)
            })
            .collect()
    }
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
    /// Arrival, unix ms.
    pub wall_ms: i64,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn message_id(&self) -> String {
        self.header("upstash-message-id")
            .unwrap_or_default()
            .to_string()
    }
}

/// How the receiver answers.
#[derive(Clone, Default)]
pub struct Script {
    /// Status once the first `fail_first` attempts of a message have failed (0 means 200).
    pub status: u16,
    pub delay: Duration,
    /// Attempts per message id answered with `fail_status` and `fail_headers` first.
    pub fail_first: usize,
    pub fail_status: u16,
    pub fail_headers: Vec<(&'static str, &'static str)>,
}

impl Script {
    pub fn ok() -> Self {
        Script::default()
    }

    pub fn status(status: u16) -> Self {
        Script {
            status,
            ..Script::default()
        }
    }

    pub fn slow(delay: Duration) -> Self {
        Script {
            delay,
            ..Script::default()
        }
    }

    /// Fails the first `k` attempts of each message with `status` (and `headers`), then 200.
    pub fn fail_first(k: usize, status: u16, headers: &[(&'static str, &'static str)]) -> Self {
        Script {
            fail_first: k,
            fail_status: status,
            fail_headers: headers.to_vec(),
            ..Script::default()
        }
    }
}

struct ReceiverState {
    tx: mpsc::UnboundedSender<Received>,
    script: Arc<Mutex<Script>>,
    attempts: Mutex<HashMap<String, usize>>,
    /// Requests being answered now, and the most at once so far.
    active: Arc<(AtomicU64, AtomicU64)>,
}

/// A local HTTP endpoint that records every request and answers as scripted.
pub struct Receiver {
    pub addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<Received>,
    script: Arc<Mutex<Script>>,
    active: Arc<(AtomicU64, AtomicU64)>,
    /// Deliveries per message id, over the receiver's whole life.
    seen: HashMap<String, usize>,
}

impl Receiver {
    pub async fn start() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let script = Arc::new(Mutex::new(Script::ok()));
        let active = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let state = Arc::new(ReceiverState {
            tx,
            script: script.clone(),
            attempts: Mutex::new(HashMap::new()),
            active: active.clone(),
        });
        // Any body size: large-message tests send bodies of many MiB.
        let app = Router::new()
            .fallback(record)
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver {
            addr,
            rx,
            script,
            active,
            seen: HashMap::new(),
        }
    }

    /// The most requests this receiver was answering at the same time.
    pub fn max_concurrent(&self) -> u64 {
        self.active.1.load(Ordering::SeqCst)
    }

    pub fn set(&self, script: Script) {
        *self.script.lock().unwrap() = script;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn count(&mut self, r: &Received) {
        *self.seen.entry(r.message_id()).or_insert(0) += 1;
    }

    /// The next request, or panic after `WAIT`.
    pub async fn next(&mut self) -> Received {
        let r = tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("timed out waiting for a delivery")
            .expect("receiver closed");
        self.count(&r);
        r
    }

    /// The next request, or panic after `within`.
    pub async fn next_within(&mut self, within: Duration) -> Received {
        let r = tokio::time::timeout(within, self.rx.recv())
            .await
            .expect("timed out waiting for a delivery")
            .expect("receiver closed");
        self.count(&r);
        r
    }

    /// The next `n` requests, in arrival order (each within `WAIT`).
    pub async fn take(&mut self, n: usize) -> Vec<Received> {
        let mut all = Vec::with_capacity(n);
        for _ in 0..n {
            all.push(self.next().await);
        }
        all
    }

    /// Receives until `done` holds for the deliveries per message id seen so far (since the
    /// receiver started), or panics after `within`. Returns those counts.
    pub async fn collect_until(
        &mut self,
        within: Duration,
        mut done: impl FnMut(&HashMap<String, usize>) -> bool,
    ) -> HashMap<String, usize> {
        let deadline = tokio::time::Instant::now() + within;
        while !done(&self.seen) {
            let r = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("timed out with {} distinct deliveries", self.seen.len())
                })
                .expect("receiver closed");
            self.count(&r);
        }
        self.seen.clone()
    }

    /// Takes in what already arrived without waiting; returns all counts so far.
    pub fn counts(&mut self) -> HashMap<String, usize> {
        while let Ok(r) = self.rx.try_recv() {
            self.count(&r);
        }
        self.seen.clone()
    }
}

async fn record(
    State(state): State<Arc<ReceiverState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let script = state.script.lock().unwrap().clone();
    let id = headers
        .get("upstash-message-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let attempt = {
        let mut attempts = state.attempts.lock().unwrap();
        let n = attempts.entry(id).or_insert(0);
        *n += 1;
        *n
    };
    let now_active = state.active.0.fetch_add(1, Ordering::SeqCst) + 1;
    state.active.1.fetch_max(now_active, Ordering::SeqCst);
    let _ = state.tx.send(Received {
        method,
        uri,
        headers,
        body,
        at: Instant::now(),
        wall_ms: kstash::model::now_ms(),
    });
    if !script.delay.is_zero() {
        tokio::time::sleep(script.delay).await;
    }
    state.active.0.fetch_sub(1, Ordering::SeqCst);
    if attempt <= script.fail_first {
        let mut response = StatusCode::from_u16(script.fail_status)
            .unwrap()
            .into_response();
        for (k, v) in &script.fail_headers {
            response.headers_mut().insert(*k, v.parse().unwrap());
        }
        return response;
    }
    let status = if script.status == 0 {
        200
    } else {
        script.status
    };
    StatusCode::from_u16(status).unwrap().into_response()
}

/// A client for kstash's API.
pub struct Api {
    pub base: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(addr: SocketAddr) -> Self {
        Api {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    /// The address this client talks to.
    pub fn addr(&self) -> SocketAddr {
        self.base
            .trim_start_matches("http://")
            .parse()
            .expect("an address")
    }

    /// Publishes `body` to `destination` with extra headers; returns status and JSON body.
    pub async fn publish(
        &self,
        destination: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> (u16, serde_json::Value) {
        self.publish_path(&format!("/v2/publish/{destination}"), body, headers)
            .await
    }

    /// POSTs `body` to `path` (a publish or enqueue path with its raw destination) with extra
    /// headers; returns status and JSON body.
    pub async fn publish_path(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> (u16, serde_json::Value) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("publish request");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap_or_default();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    /// An authenticated call with a JSON body; returns status and JSON answer.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        self.send(method, path, &[], &[], body.as_ref()).await
    }

    /// Any authenticated call; returns status and JSON answer. An answer that is not JSON fails
    /// the test (the SDKs parse every answer).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .query(query);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(body); // also sets Content-Type: application/json
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("{method} {path} {query:?} answered {status} with non-JSON {text:?}: {e}")
        });
        (status, json)
    }

    /// The `/v2/logs` entries matching `query` (first page).
    pub async fn logs(&self, query: &[(&str, &str)]) -> Vec<serde_json::Value> {
        let (status, logs) = self
            .send(reqwest::Method::GET, "/v2/logs", query, &[], None)
            .await;
        assert_eq!(status, 200, "{logs}");
        logs["logs"].as_array().cloned().unwrap_or_default()
    }

    /// Enqueues `body` to `queue` for `destination` with extra headers; insists on success;
    /// returns the message id.
    pub async fn enqueue(
        &self,
        queue: &str,
        destination: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> String {
        let (status, json) = self
            .publish_path(&format!("/v2/enqueue/{queue}/{destination}"), body, headers)
            .await;
        assert_eq!(status, 200, "{json}");
        json["messageId"].as_str().unwrap().to_string()
    }

    /// Publishes and insists on success; returns the message id.
    pub async fn publish_ok(&self, destination: &str, body: &'static str) -> String {
        let (status, json) = self.publish(destination, body, &[]).await;
        assert_eq!(status, 200, "{json}");
        json["messageId"].as_str().unwrap().to_string()
    }
}

/// States of `id`'s events among `records` (values of the events topic), in order.
pub fn event_states(records: &[Vec<u8>], id: &str) -> Vec<kstash::model::event::State> {
    records
        .iter()
        .map(|r| <kstash::model::event::Event as kstash::kafka::record::Record>::decode(r).unwrap())
        .filter(|e| e.message_id == id)
        .map(|e| e.state)
        .collect()
}

/// Verifies an `Upstash-Signature` the way the SDK receivers do (HS256, issuer `Upstash`, the
/// registered claims present) with `key`, and checks the `body` claim against `body`.
pub fn verify_signature(token: &str, key: &str, body: &[u8]) -> kstash::signing::Claims {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_issuer(&["Upstash"]);
    validation.set_required_spec_claims(&["iss", "sub", "exp", "nbf"]);
    let claims = jsonwebtoken::decode::<kstash::signing::Claims>(
        token,
        &DecodingKey::from_secret(key.as_bytes()),
        &validation,
    )
    .expect("the signature verifies with the key")
    .claims;
    assert_eq!(
        claims.body,
        kstash::signing::body_hash(body),
        "body claim is the hash of the body"
    );
    claims
}

/// How often [`eventually`] asks again.
const POLL: Duration = Duration::from_millis(50);

/// Polls `attempt` every [`POLL`] until it gives a value; panics naming `what` after [`WAIT`].
/// For views that follow Kafka within milliseconds (messages, logs, DLQ).
pub async fn eventually<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}
