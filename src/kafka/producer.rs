//! The one producer of a process, shared by the API and the workers.
//!
//! Design choice: `send` resolves only when the broker has acknowledged the record (`acks=all`,
//! idempotent), so callers can answer a client or commit an offset on its strength. librdkafka's
//! own retries (bounded by `kafka.produce_timeout`) handle transient broker trouble; a send that
//! still fails is an error for the caller to surface, never a silent drop.

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use super::{create_client, Role, SetupError, TopicNames};
use crate::config::KafkaConfig;
use crate::delay::ladder::{Hop, Ladder};
use crate::model::dlq::DlqRecord;
use crate::model::envelope::Envelope;
use crate::model::event::Event;
use crate::model::now_ms;
use crate::state::tail::CancelRecord;
use crate::state::DedupEntry;

/// Kafka header naming the schema of the record value, for Kafka-native consumers.
pub const SCHEMA_HEADER: &str = "kstash-schema";
/// Schema header value of envelope records.
pub const ENVELOPE_SCHEMA: &str = "envelope.v1";
/// Schema header value of event records.
pub const EVENT_SCHEMA: &str = "event.v1";
/// Schema header value of dead-letter records.
pub const DLQ_SCHEMA: &str = "dlq.v1";
/// Schema header value of cancellation records.
pub const CANCEL_SCHEMA: &str = "cancel.v1";
/// Schema header value of dedup records.
pub const DEDUP_SCHEMA: &str = "dedup.v1";
/// Wait between attempts of [`until_acked`].
const RESEND_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);

/// Calls `send` until Kafka acknowledges the record (true) or `shutdown` is requested (false).
/// For records a stage must hand on before it may count its input as finished.
pub async fn until_acked<F, Fut>(shutdown: &CancellationToken, what: &str, mut send: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Ack, rdkafka::error::KafkaError>>,
{
    loop {
        match send().await {
            Ok(_) => return true,
            Err(e) => {
                tracing::warn!(error = %e, what, "kafka did not take a record; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(RESEND_BACKOFF) => {}
                    _ = shutdown.cancelled() => return false,
                }
            }
        }
    }
}

/// Header on delay-topic records: the message's not-before time (unix ms), so the delay stage
/// can schedule a record without decoding it.
pub const NOT_BEFORE_HEADER: &str = "kstash-not-before";
/// Header on delay-topic records: when this hop of the ladder is due (unix ms).
pub const HOP_DUE_HEADER: &str = "kstash-hop-due";

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
    ladder: Ladder,
}

impl Producer {
    pub fn new(kafka: &KafkaConfig, ladder: Ladder) -> Result<Self, SetupError> {
        Ok(Producer {
            inner: create_client(kafka, Role::Producer)?,
            topics: TopicNames::new(&kafka.topic_prefix, &ladder),
            ladder,
        })
    }

    pub fn ladder(&self) -> &Ladder {
        &self.ladder
    }

    pub fn topics(&self) -> &TopicNames {
        &self.topics
    }

    /// A record with the schema header and any `extra` headers.
    fn record<'a>(
        topic: &'a str,
        key: &'a str,
        value: &'a [u8],
        schema: &str,
        extra: &[(&str, String)],
    ) -> FutureRecord<'a, str, [u8]> {
        let headers = extra.iter().fold(
            OwnedHeaders::new().insert(Header {
                key: SCHEMA_HEADER,
                value: Some(schema),
            }),
            |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value.as_str()),
                })
            },
        );
        FutureRecord::to(topic)
            .key(key)
            .payload(value)
            .headers(headers)
    }

    /// Sends `value` with `key` to `topic`; resolves once acknowledged.
    pub async fn send(
        &self,
        topic: &str,
        key: &str,
        value: &[u8],
        schema: &str,
        extra: &[(&str, String)],
    ) -> Result<Ack, rdkafka::error::KafkaError> {
        let record = Self::record(topic, key, value, schema, extra);
        // The wait is bounded by message.timeout.ms (kafka.produce_timeout).
        match self.inner.send(record, Timeout::Never).await {
            Ok(delivery) => Ok(Ack {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Err((e, _)) => Err(e),
        }
    }

    /// Stores a message where it belongs now: the ready topic when due, otherwise the delay
    /// ladder. Keyed by its id.
    pub async fn send_envelope(
        &self,
        envelope: &Envelope,
    ) -> Result<Ack, rdkafka::error::KafkaError> {
        self.send_routed(
            &envelope.message_id,
            &envelope.encode(),
            envelope.not_before,
            now_ms(),
        )
        .await
    }

    /// Sends an encoded envelope to the ready topic or to the delay step its remaining wait
    /// calls for (used by the delay stage to move records on unchanged).
    pub async fn send_routed(
        &self,
        key: &str,
        value: &[u8],
        not_before_ms: i64,
        now_ms: i64,
    ) -> Result<Ack, rdkafka::error::KafkaError> {
        match self.ladder.route(not_before_ms, now_ms) {
            Hop::Ready => {
                self.send(&self.topics.ready, key, value, ENVELOPE_SCHEMA, &[])
                    .await
            }
            Hop::Delay { step, hop_due_ms } => {
                let headers = [
                    (NOT_BEFORE_HEADER, not_before_ms.to_string()),
                    (HOP_DUE_HEADER, hop_due_ms.to_string()),
                ];
                self.send(
                    &self.topics.delay[step],
                    key,
                    value,
                    ENVELOPE_SCHEMA,
                    &headers,
                )
                .await
            }
        }
    }

    /// Stores a dead-letter record, keyed by its dlq id.
    pub async fn send_dlq(&self, record: &DlqRecord) -> Result<Ack, rdkafka::error::KafkaError> {
        self.send(
            &self.topics.dlq,
            &record.dlq_id,
            &record.encode(),
            DLQ_SCHEMA,
            &[],
        )
        .await
    }

    /// Deletes a DLQ entry: a tombstone for its key on the compacted topic.
    pub async fn send_dlq_tombstone(
        &self,
        dlq_id: &str,
    ) -> Result<Ack, rdkafka::error::KafkaError> {
        let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.topics.dlq).key(dlq_id);
        match self.inner.send(record, Timeout::Never).await {
            Ok(d) => Ok(Ack {
                partition: d.partition,
                offset: d.offset,
            }),
            Err((e, _)) => Err(e),
        }
    }

    /// Records a cancel request, keyed by message id.
    pub async fn send_cancel(
        &self,
        cancel: &CancelRecord,
    ) -> Result<Ack, rdkafka::error::KafkaError> {
        let value = serde_json::to_vec(cancel).expect("a cancel record serialises");
        self.send(
            &self.topics.cancellations,
            &cancel.message_id,
            &value,
            CANCEL_SCHEMA,
            &[],
        )
        .await
    }

    /// Records a dedup key.
    pub async fn send_dedup(
        &self,
        key: &str,
        entry: &DedupEntry,
    ) -> Result<Ack, rdkafka::error::KafkaError> {
        let value = serde_json::to_vec(entry).expect("a dedup entry serialises");
        self.send(&self.topics.dedup, key, &value, DEDUP_SCHEMA, &[])
            .await
    }

    /// Records a lifecycle event, keyed by message id.
    pub async fn send_event(&self, event: &Event) -> Result<Ack, rdkafka::error::KafkaError> {
        self.send(
            &self.topics.events,
            &event.message_id,
            &event.encode(),
            EVENT_SCHEMA,
            &[],
        )
        .await
    }

    /// Queues an event without waiting for its acknowledgement (a failure is logged). Used where
    /// the event is informational and the caller must not wait, e.g. ACTIVE before a delivery;
    /// queued records keep their order, so it still precedes the attempt's outcome event.
    pub fn enqueue_event(&self, event: &Event) {
        let value = event.encode();
        let record = Self::record(
            &self.topics.events,
            &event.message_id,
            &value,
            EVENT_SCHEMA,
            &[],
        );
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
