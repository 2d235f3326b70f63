//! The embedded Kafka cluster behind `kstash dev` and `cargo test`: librdkafka's mock cluster.
//!
//! It speaks the real Kafka protocol on loopback ports, so every other part of kstash talks to it
//! exactly as to a real broker (same clients, same code path). Its limits shape this
//! file: topics are created through the mock API (CreateTopics hangs), group joins are
//! sped up through one FFI call, and each partition silently keeps only ~5 MiB, which
//! `dev_room.rs` accounts for: publishes are refused before needed records would be dropped.

use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

/// Brokers in the embedded cluster. One: tests stop it with `broker_down(1)`.
pub const EMBEDDED_BROKERS: i32 = 1;
/// Id of the embedded cluster's only broker, for fault injection.
pub const EMBEDDED_BROKER_ID: i32 = 1;
/// The mock waits this long before the first group assignment (its default is 3 s).
const INITIAL_REBALANCE_DELAY_MS: i32 = 50;
/// Replication factor on the embedded cluster (a single broker).
const EMBEDDED_REPLICATION: i32 = 1;

/// An in-process Kafka cluster; lives as long as this value.
pub struct EmbeddedCluster {
    /// The client that owns the mock cluster (created through `test.mock.num.brokers`).
    anchor: BaseProducer,
    bootstrap: String,
}

#[derive(Debug, thiserror::Error)]
#[error("embedded kafka: {0}")]
pub struct EmbeddedError(String);

impl EmbeddedCluster {
    pub fn start() -> Result<Self, EmbeddedError> {
        let anchor: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", EMBEDDED_BROKERS.to_string())
            .create()
            .map_err(|e| EmbeddedError(e.to_string()))?;
        let bootstrap = anchor
            .client()
            .mock_cluster()
            .ok_or_else(|| EmbeddedError("librdkafka did not create a mock cluster".into()))?
            .bootstrap_servers();
        let cluster = EmbeddedCluster { anchor, bootstrap };
        cluster.shorten_initial_rebalance_delay();
        Ok(cluster)
    }

    /// `host:port` list to use as `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// The mock API, for topic creation and fault injection.
    pub fn mock(&self) -> MockCluster<'_, DefaultProducerContext> {
        self.anchor
            .client()
            .mock_cluster()
            .expect("the anchor client owns a mock cluster")
    }

    /// Creates a topic; one that exists already is fine (idempotent, as on a real cluster).
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), EmbeddedError> {
        match self
            .mock()
            .create_topic(name, partitions, EMBEDDED_REPLICATION)
        {
            Ok(()) | Err(KafkaError::MockCluster(RDKafkaErrorCode::TopicAlreadyExists)) => Ok(()),
            Err(e) => Err(EmbeddedError(format!("create topic {name}: {e}"))),
        }
    }

    /// rust-rdkafka's `MockCluster` does not wrap `rd_kafka_mock_group_initial_rebalance_delay_ms`,
    /// and without it every consumer group waits 3 s before its first assignment.
    #[allow(unsafe_code)]
    fn shorten_initial_rebalance_delay(&self) {
        // SAFETY: `native_ptr` is the live rd_kafka_t owned by `self.anchor`, which outlives
        // this call; `rd_kafka_handle_mock_cluster` returns the mock cluster that handle owns
        // (null if none, checked), and the setter only stores an integer in it.
        unsafe {
            let handle = self.anchor.client().native_ptr();
            let mock = rdkafka::bindings::rd_kafka_handle_mock_cluster(handle);
            if !mock.is_null() {
                rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(
                    mock,
                    INITIAL_REBALANCE_DELAY_MS,
                );
            }
        }
    }
}
