//! The idempotent start-up step that makes sure topics exist (which topics: `crate::topics`).
//!
//! Against a real cluster the AdminClient creates missing topics with the configured partitions,
//! replication and topic configs ("already exists" is success), then reads metadata back to
//! confirm. On the embedded cluster, CreateTopics is not implemented (the call hangs), so topics
//! are created through the mock API instead; both paths end in the same metadata check.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use super::embedded::EmbeddedCluster;
use super::{create_client, Role, SetupError};
use crate::config::{KafkaConfig, TOPIC_MAX_MESSAGE_BYTES};

/// How long admin and metadata calls may take at start-up.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How librdkafka's mock cluster names itself (`rdkafka_mock.c`).
const MOCK_CLUSTER_ID_PREFIX: &str = "mockCluster";
/// How often start-up re-reads metadata while waiting for new topics to appear.
const METADATA_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// One topic to make sure of.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub config: Vec<(String, String)>,
    /// The largest record kstash writes to it: an existing topic whose `max.message.bytes` is
    /// smaller is refused at start-up (a record Kafka refuses is a message that cannot move on).
    pub min_record_bytes: usize,
}

/// What [`ensure`] found.
#[derive(Debug)]
pub struct Ensured {
    /// Each topic's actual number of partitions.
    pub partitions: HashMap<String, i32>,
    /// The cluster's id, if it says.
    pub cluster_id: Option<String>,
}

/// Creates what is missing (if `kafka.create_topics`) and checks that every topic exists.
pub async fn ensure(
    kafka: &KafkaConfig,
    specs: Vec<TopicSpec>,
    embedded: Option<&EmbeddedCluster>,
) -> Result<Ensured, SetupError> {
    match embedded {
        Some(cluster) => {
            for s in &specs {
                cluster
                    .create_topic(&s.name, s.partitions)
                    .map_err(|e| SetupError::Topics(e.to_string()))?;
            }
        }
        None if kafka.create_topics => create(kafka, &specs).await?,
        None => {}
    }
    let partitions = {
        let (kafka, specs) = (kafka.clone(), specs.clone());
        tokio::task::spawn_blocking(move || check_exist(&kafka, &specs))
            .await
            .map_err(|e| SetupError::Topics(e.to_string()))??
    };
    let cluster_id = cluster_id(kafka).await?;
    // The mock cluster does not describe configs (and takes records of any size), also when a
    // child process uses one as a plain broker (its ids start with [`MOCK_CLUSTER_ID_PREFIX`]).
    let mock = cluster_id
        .as_deref()
        .is_some_and(|id| id.starts_with(MOCK_CLUSTER_ID_PREFIX));
    if embedded.is_none() && !mock {
        check_record_limits(kafka, &specs).await?;
    }
    Ok(Ensured {
        partitions,
        cluster_id,
    })
}

/// The cluster's id, if it says.
async fn cluster_id(kafka: &KafkaConfig) -> Result<Option<String>, SetupError> {
    let client: BaseConsumer = create_client(kafka, Role::Admin)?;
    tokio::task::spawn_blocking(move || client.client().fetch_cluster_id(ADMIN_TIMEOUT))
        .await
        .map_err(|e| SetupError::Topics(e.to_string()))
}

/// Refuses topics (e.g. created before, or by someone else) whose `max.message.bytes` is below
/// the largest record kstash writes to them.
async fn check_record_limits(kafka: &KafkaConfig, specs: &[TopicSpec]) -> Result<(), SetupError> {
    let admin: AdminClient<DefaultClientContext> = create_client(kafka, Role::Admin)?;
    let resources: Vec<ResourceSpecifier<'_>> = specs
        .iter()
        .map(|s| ResourceSpecifier::Topic(&s.name))
        .collect();
    let options = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
    let results = admin.describe_configs(&resources, &options).await?;
    for (spec, result) in specs.iter().zip(results) {
        let resource =
            result.map_err(|e| SetupError::Topics(format!("describe {}: {e}", spec.name)))?;
        let limit = resource
            .get(TOPIC_MAX_MESSAGE_BYTES)
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse::<usize>().ok());
        match limit {
            Some(limit) if limit < spec.min_record_bytes => {
                return Err(SetupError::Topics(format!(
                    "topic {} takes records of at most {limit} bytes ({TOPIC_MAX_MESSAGE_BYTES}), but server.body_limit needs {} (a callback carries the body base64-encoded twice): raise it with `kafka-configs.sh --alter --entity-type topics --entity-name {} --add-config {TOPIC_MAX_MESSAGE_BYTES}={}`, or lower server.body_limit",
                    spec.name, spec.min_record_bytes, spec.name, spec.min_record_bytes
                )));
            }
            Some(_) => {}
            None => {
                tracing::warn!(topic = %spec.name, "cannot read the topic's {TOPIC_MAX_MESSAGE_BYTES}; not checked")
            }
        }
    }
    Ok(())
}

async fn create(kafka: &KafkaConfig, specs: &[TopicSpec]) -> Result<(), SetupError> {
    let admin: AdminClient<DefaultClientContext> = create_client(kafka, Role::Admin)?;
    let replication = kafka.replication_factor;
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|s| {
            s.config.iter().fold(
                NewTopic::new(&s.name, s.partitions, TopicReplication::Fixed(replication)),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
    let results = admin.create_topics(&new_topics, &options).await?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created topic"),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic = %name, "topic exists")
            }
            Err((name, code)) => {
                return Err(SetupError::Topics(format!("create {name}: {code}")));
            }
        }
    }
    Ok(())
}

/// Waits (up to [`ADMIN_TIMEOUT`]) until every topic shows up in metadata: a real cluster
/// propagates newly created topics to all brokers with a short lag.
fn check_exist(
    kafka: &KafkaConfig,
    specs: &[TopicSpec],
) -> Result<HashMap<String, i32>, SetupError> {
    let client: BaseConsumer = create_client(kafka, Role::Admin)?;
    let deadline = std::time::Instant::now() + ADMIN_TIMEOUT;
    let mut counts = HashMap::new();
    for s in specs {
        loop {
            match topic_partitions(&client, &s.name) {
                Ok(partitions) => {
                    if partitions < s.partitions {
                        tracing::warn!(
                            topic = %s.name, partitions, configured = s.partitions,
                            "topic has fewer partitions than configured; kstash does not add partitions"
                        );
                    }
                    counts.insert(s.name.clone(), partitions);
                    break;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!(topic = %s.name, error = %e, "waiting for topic metadata");
                    std::thread::sleep(METADATA_POLL_INTERVAL);
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(counts)
}

/// Partitions of `topic`, or why it is not usable.
fn topic_partitions(client: &BaseConsumer, topic: &str) -> Result<i32, SetupError> {
    let metadata = client.fetch_metadata(Some(topic), ADMIN_TIMEOUT)?;
    let t = metadata
        .topics()
        .first()
        .ok_or_else(|| SetupError::Topics(format!("{topic} missing from metadata")))?;
    if let Some(err) = t.error() {
        return Err(SetupError::Topics(format!(
            "topic {topic} is not usable: {:?} (create it, or set kafka.create_topics = true)",
            RDKafkaErrorCode::from(err)
        )));
    }
    // A new topic shows up before its partitions have leaders; it is usable once all do.
    if let Some(p) = t
        .partitions()
        .iter()
        .find(|p| p.leader() < 0 || p.error().is_some())
    {
        return Err(SetupError::Topics(format!(
            "topic {topic} partition {} has no leader yet",
            p.id()
        )));
    }
    Ok(i32::try_from(t.partitions().len()).unwrap_or(i32::MAX))
}
