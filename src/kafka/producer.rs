//! The one producer of a process, shared by the API and the workers.
//!
//! Design choice: `send` resolves only when the broker has acknowledged the record (`acks=all`,
//! idempotent), so callers can answer a client or commit an offset on its strength. librdkafka's
//! own retries (bounded by `kafka.produce_timeout`) handle transient broker trouble; a send that
//! still fails is an error for the caller to surface, never a silent drop.

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;

use super::{create_client, Role, SetupError, TopicNames};
use crate::config::KafkaConfig;
use crate::model::envelope::Envelope;
use crate::model::event::Event;

/// Kafka header naming the schema of the record value, for Kafka-native consumers.
pub const SCHEMA_HEADER: &str = "kstash-schema";
/// Schema header value of envelope records.
pub const ENVELOPE_SCHEMA: &str = "envelope.v1";
/// Schema header value of event records.
pub const EVENT_SCHEMA: &str = "event.v1";

/// Where a record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub partition: i32,
    pub offset: i64,
}

#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
    topics: TopicNames,
}

impl Producer {
    pub fn new(kafka: &KafkaConfig) -> Result<Self, SetupError> {
        Ok(Producer {
            inner: create_client(kafka, Role::Producer)?,
            topics: TopicNames::new(&kafka.topic_prefix),
        })
    }

    pub fn topics(&self) -> &TopicNames {
        &self.topics
    }

    /// Sends `value` with `key` to `topic`; resolves once acknowledged.
    pub async fn send(
        &self,
        topic: &str,
        key: &str,
        value: &[u8],
        schema: &str,
    ) -> Result<Ack, rdkafka::error::KafkaError> {
        let headers = OwnedHeaders::new().insert(Header {
            key: SCHEMA_HEADER,
            value: Some(schema),
        });
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(value)
            .headers(headers);
        // The wait is bounded by message.timeout.ms (kafka.produce_timeout).
        match self.inner.send(record, Timeout::Never).await {
            Ok(delivery) => Ok(Ack {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Err((e, _)) => Err(e),
        }
    }

    /// Stores a message on the ready topic, keyed by its id.
    pub async fn send_ready(&self, envelope: &Envelope) -> Result<Ack, rdkafka::error::KafkaError> {
        self.send(
            &self.topics.ready,
            &envelope.message_id,
            &envelope.encode(),
            ENVELOPE_SCHEMA,
        )
        .await
    }

    /// Records a lifecycle event, keyed by message id.
    pub async fn send_event(&self, event: &Event) -> Result<Ack, rdkafka::error::KafkaError> {
        self.send(
            &self.topics.events,
            &event.message_id,
            &event.encode(),
            EVENT_SCHEMA,
        )
        .await
    }

    /// Queues an event without waiting for its acknowledgement (a failure is logged). Used where
    /// the event is informational and the caller must not wait, e.g. ACTIVE before a delivery;
    /// queued records keep their order, so it still precedes the attempt's outcome event.
    pub fn enqueue_event(&self, event: &Event) {
        let value = event.encode();
        let headers = OwnedHeaders::new().insert(Header {
            key: SCHEMA_HEADER,
            value: Some(EVENT_SCHEMA),
        });
        let record = FutureRecord::to(&self.topics.events)
            .key(&event.message_id)
            .payload(&value)
            .headers(headers);
        match self.inner.send_result(record) {
            Ok(ack) => {
                let message_id = event.message_id.clone();
                tokio::spawn(async move {
                    match ack.await {
                        Ok(Ok(_)) => {}
                        Ok(Err((e, _))) => {
                            tracing::warn!(message_id, error = %e, "event not recorded")
                        }
                        Err(_) => tracing::warn!(message_id, "event dropped by the producer"),
                    }
                });
            }
            Err((e, _)) => {
                tracing::warn!(message_id = %event.message_id, error = %e, "event not queued")
            }
        }
    }

    /// Waits up to `timeout` for queued records to be acknowledged (shutdown).
    pub fn flush(&self, timeout: std::time::Duration) {
        if let Err(e) = self.inner.flush(timeout) {
            tracing::warn!(error = %e, "producer flush at shutdown did not finish");
        }
    }
}
