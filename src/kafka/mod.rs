//! Kafka client setup: one place that turns [`KafkaConfig`] into librdkafka client configs.
//!
//! Design choice (after Vector's Kafka sink): typed options for what kstash's correctness depends
//! on, plus a raw `kafka.librdkafka` pass-through for everything else (security, tuning). A raw key
//! that kstash sets itself is refused at start-up instead of silently winning or losing, so a
//! config can never turn off `acks=all` or turn on auto-commit by accident.

pub mod commit_metadata;
pub mod consumer;
pub mod dev_room;
pub mod embedded;
pub mod group;
pub mod lanes;
pub mod offsets;
pub mod producer;
pub mod record;
pub mod topics;
pub mod transaction;

use std::time::Duration;

use rdkafka::ClientConfig;

use crate::config::KafkaConfig;

pub use producer::Producer;

/// The kind of client being configured; each sets its own owned keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Producer,
    Consumer,
    Admin,
}

/// librdkafka keys kstash sets from typed options or for correctness, with the typed key (or
/// reason) to name in the error.
const OWNED_KEYS: [(&str, &str); 18] = [
    ("bootstrap.servers", "kafka.brokers"),
    ("metadata.broker.list", "kafka.brokers"),
    ("client.id", "kafka.client_id"),
    ("group.id", "kafka.group_id"),
    ("session.timeout.ms", "kafka.session_timeout"),
    ("heartbeat.interval.ms", "kafka.session_timeout"),
    ("linger.ms", "kafka.linger"),
    ("queue.buffering.max.ms", "kafka.linger"),
    ("message.timeout.ms", "kafka.produce_timeout"),
    ("request.timeout.ms", "kafka.produce_timeout"),
    (
        "message.max.bytes",
        "server.body_limit (records are sized to fit it)",
    ),
    ("acks", "kstash needs acks=all: accepted means durable"),
    ("enable.idempotence", "kstash needs the idempotent producer"),
    ("enable.auto.commit", "kstash commits only finished offsets"),
    (
        "enable.auto.offset.store",
        "kstash commits only finished offsets",
    ),
    (
        "transactional.id",
        "kstash gives each transactional writer its own identity",
    ),
    ("transaction.timeout.ms", "kafka.transaction_timeout"),
    (
        "partition.assignment.strategy",
        "kstash's consumers rely on eager assignment",
    ),
];

/// Heartbeats per session timeout; librdkafka wants the interval well below the timeout.
const HEARTBEATS_PER_SESSION: u32 = 6;
/// Upper bound of the consumer fetch wait: keeps delivery latency low on idle partitions.
const FETCH_WAIT_MAX_MS: &str = "100";
/// librdkafka's default producer `request.timeout.ms`, kept when `kafka.produce_timeout` is longer.
const MAX_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// librdkafka's default `fetch.max.bytes`: records up to this size need no consumer setting.
const FETCH_MAX_BYTES_DEFAULT: usize = 52_428_800;
/// `receive.message.max.bytes` must exceed `fetch.max.bytes` by the protocol overhead (512 B).
const RECEIVE_MAX_BYTES_MARGIN: usize = 1024 * 1024;

/// A raw librdkafka option that collides with one kstash sets.
#[derive(Debug, thiserror::Error)]
#[error("kafka.librdkafka.\"{key}\" is not allowed: it is set by kstash ({owner})")]
pub struct ConflictError {
    pub key: String,
    pub owner: &'static str,
}

/// Setting up a Kafka client or the topics failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Conflict(#[from] ConflictError),
    #[error("kafka client: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    #[error("kafka topics: {0}")]
    Topics(String),
}

/// Creates a client of type `T` for `role`.
pub fn create_client<T: rdkafka::config::FromClientConfig>(
    kafka: &KafkaConfig,
    role: Role,
) -> Result<T, SetupError> {
    Ok(client_config(kafka, role)?.create()?)
}

/// Refuses raw options that kstash owns. Called once at start-up for a clear error.
pub fn check_passthrough(kafka: &KafkaConfig) -> Result<(), ConflictError> {
    for key in kafka.librdkafka.keys() {
        if let Some((_, owner)) = OWNED_KEYS.iter().find(|(k, _)| k == key) {
            return Err(ConflictError {
                key: key.clone(),
                owner,
            });
        }
    }
    Ok(())
}

/// The client config for `role`: typed options first, then the raw pass-through.
pub fn client_config(kafka: &KafkaConfig, role: Role) -> Result<ClientConfig, ConflictError> {
    check_passthrough(kafka)?;
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers)
        .set("client.id", &kafka.client_id);
    match role {
        Role::Producer => {
            c.set("acks", "all")
                .set("enable.idempotence", "true")
                .set("linger.ms", millis(kafka.linger))
                .set("message.timeout.ms", millis(kafka.produce_timeout))
                // A request in flight to a broker that stopped answering is bounded by this, not
                // by message.timeout.ms: without it a publish could wait well past its timeout.
                .set(
                    "request.timeout.ms",
                    millis(kafka.produce_timeout.min(MAX_REQUEST_TIMEOUT)),
                );
            if kafka.max_record_bytes > 0 {
                c.set("message.max.bytes", kafka.max_record_bytes.to_string());
            }
        }
        Role::Consumer => {
            let heartbeat = kafka.session_timeout / HEARTBEATS_PER_SESSION;
            c.set("group.id", &kafka.group_id)
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("auto.offset.reset", "earliest")
                .set("session.timeout.ms", millis(kafka.session_timeout))
                .set("heartbeat.interval.ms", millis(heartbeat))
                .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS);
            // librdkafka fetches a record larger than its per-partition limit anyway, but not one
            // larger than a whole fetch response may be.
            if kafka.max_record_bytes > FETCH_MAX_BYTES_DEFAULT {
                c.set("fetch.max.bytes", kafka.max_record_bytes.to_string())
                    .set(
                        "receive.message.max.bytes",
                        (kafka.max_record_bytes + RECEIVE_MAX_BYTES_MARGIN).to_string(),
                    );
            }
        }
        Role::Admin => {}
    }
    for (k, v) in &kafka.librdkafka {
        c.set(k, v);
    }
    Ok(c)
}

fn millis(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Mode};

    #[test]
    fn typed_options_and_passthrough_are_applied() {
        let mut k = Config::defaults(Mode::Serve).kafka;
        k.librdkafka
            .insert("socket.keepalive.enable".into(), "true".into());
        let c = client_config(&k, Role::Producer).unwrap();
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("socket.keepalive.enable"), Some("true"));
        let c = client_config(&k, Role::Consumer).unwrap();
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("group.id"), Some(k.group_id.as_str()));
        assert_eq!(c.get("session.timeout.ms"), Some("10000"));
    }

    #[test]
    fn passthrough_conflicts_are_refused() {
        for key in [
            "acks",
            "enable.auto.commit",
            "bootstrap.servers",
            "group.id",
            // A cooperative assignor would break the eager rebalance handling (kafka/group.rs).
            "partition.assignment.strategy",
        ] {
            let mut k = Config::defaults(Mode::Serve).kafka;
            k.librdkafka.insert(key.into(), "x".into());
            let err = client_config(&k, Role::Admin).expect_err(key);
            assert_eq!(err.key, key);
            assert!(err.to_string().contains(key));
        }
    }
}
