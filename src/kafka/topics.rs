//! Topic names and the idempotent start-up step that makes sure the topics exist.
//!
//! Against a real cluster the AdminClient creates missing topics with the configured partitions,
//! replication and topic configs ("already exists" is success), then reads metadata back to
//! confirm. On the embedded cluster, CreateTopics is not implemented (the call hangs), so topics
//! are created through the mock API instead; both paths end in the same metadata check.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use super::embedded::EmbeddedCluster;
use super::{create_client, Role, SetupError};
use crate::config::{Config, TopicConfig};

/// How long admin and metadata calls may take at start-up.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The full names of kstash's topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicNames {
    pub ready: String,
    pub events: String,
}

impl TopicNames {
    pub fn new(prefix: &str) -> Self {
        TopicNames {
            ready: format!("{prefix}ready"),
            events: format!("{prefix}events"),
        }
    }
}

/// One topic to make sure of.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub config: Vec<(String, String)>,
}

/// The topics `config` asks for, with full names.
pub fn specs(config: &Config) -> Vec<TopicSpec> {
    let names = TopicNames::new(&config.kafka.topic_prefix);
    let spec = |name: String, t: &TopicConfig| TopicSpec {
        name,
        partitions: t.partitions,
        config: t.config.clone().into_iter().collect(),
    };
    vec![
        spec(names.ready, &config.topics.ready),
        spec(names.events, &config.topics.events),
    ]
}

/// Creates what is missing (if `kafka.create_topics`) and checks that every topic exists.
pub async fn ensure(config: &Config, embedded: Option<&EmbeddedCluster>) -> Result<(), SetupError> {
    let specs = specs(config);
    match embedded {
        Some(cluster) => {
            for s in &specs {
                cluster
                    .create_topic(&s.name, s.partitions)
                    .map_err(|e| SetupError::Topics(e.to_string()))?;
            }
        }
        None if config.kafka.create_topics => create(config, &specs).await?,
        None => {}
    }
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || check_exist(&kafka, &specs))
        .await
        .map_err(|e| SetupError::Topics(e.to_string()))?
}

async fn create(config: &Config, specs: &[TopicSpec]) -> Result<(), SetupError> {
    let admin: AdminClient<DefaultClientContext> = create_client(&config.kafka, Role::Admin)?;
    let replication = config.kafka.replication_factor;
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

fn check_exist(kafka: &crate::config::KafkaConfig, specs: &[TopicSpec]) -> Result<(), SetupError> {
    let client: BaseConsumer = create_client(kafka, Role::Admin)?;
    for s in specs {
        let metadata = client.fetch_metadata(Some(&s.name), ADMIN_TIMEOUT)?;
        let topic = metadata
            .topics()
            .first()
            .ok_or_else(|| SetupError::Topics(format!("{} missing from metadata", s.name)))?;
        if let Some(err) = topic.error() {
            return Err(SetupError::Topics(format!(
                "topic {} is not usable: {:?} (create it, or set kafka.create_topics = true)",
                s.name,
                RDKafkaErrorCode::from(err)
            )));
        }
        let partitions = i32::try_from(topic.partitions().len()).unwrap_or(i32::MAX);
        if partitions < s.partitions {
            tracing::warn!(
                topic = %s.name, partitions, configured = s.partitions,
                "topic has fewer partitions than configured; kstash does not add partitions"
            );
        }
    }
    Ok(())
}
