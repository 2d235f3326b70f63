//! The one producer of a process, shared by the API and the workers.
//!
//! Design choice: `send` resolves only when the broker has acknowledged the record (`acks=all`,
//! idempotent), so callers can answer a client or commit an offset on its strength. librdkafka's
//! own retries (bounded by `kafka.produce_timeout`) handle transient broker trouble; a send that
//! still fails is an error for the caller to surface, never a silent drop. The producer knows no
//! record types: it sends any [`Record`] (or raw bytes) to the topic it is told.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use super::dev_room::Room;
use super::record::{Record, SCHEMA_HEADER};
use super::{create_client, Role, SetupError};
use crate::config::KafkaConfig;

/// Wait between attempts of [`until_acked`].
const RESEND_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);

/// How [`until_acked`] ended.
#[derive(Debug)]
pub enum Handed {
    /// Kafka acknowledged the record.
    Acked(Ack),
    /// Kafka refused the record for a reason that retrying cannot change (see [`is_permanent`]).
    Refused(KafkaError),
    /// Shutdown was requested first.
    Shutdown,
}

/// Calls `send` until Kafka acknowledges the record, refuses it for good, or `shutdown` is
/// requested. For records a stage must hand on before it may count its input as finished: a
/// transient error (a broker away, a timeout) is retried for as long as it lasts, a permanent one
/// is returned at once, so the caller can finish its input some other way instead of holding its
/// slot and its partition's commit for ever.
pub async fn until_acked<F, Fut>(shutdown: &CancellationToken, what: &str, mut send: F) -> Handed
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Ack, KafkaError>>,
{
    loop {
        match send().await {
            Ok(ack) => return Handed::Acked(ack),
            Err(e) if is_permanent(&e) => return Handed::Refused(e),
            Err(e) => {
                tracing::warn!(error = %e, what, "kafka did not take a record; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(RESEND_BACKOFF) => {}
                    _ = shutdown.cancelled() => return Handed::Shutdown,
                }
            }
        }
    }
}

/// Whether the record timed out (`kafka.produce_timeout`): it may or may not have been written.
pub fn is_timeout(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageTimedOut | RDKafkaErrorCode::RequestTimedOut)
    )
}

/// Whether Kafka (or the client, before sending) refused a record for being too large.
pub fn is_too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
        )
    )
}

/// Whether Kafka (or the client, before sending) refused a record for a reason that sending it
/// again cannot change: it is too large for the producer's or the topic's limit, or the broker
/// judged it invalid. Everything else (brokers away, timeouts, leader changes, authorisation that
/// an operator may yet grant) is transient.
pub fn is_permanent(e: &KafkaError) -> bool {
    is_too_large(e)
        || matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::InvalidRecord
                    | RDKafkaErrorCode::PolicyViolation
                    | RDKafkaErrorCode::InvalidArgument
            )
        )
}

/// Where a record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub partition: i32,
    pub offset: i64,
}

/// Kafka headers of a record: `(name, value)`.
pub type Headers<'a> = [(&'a str, String)];

#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
    /// On the embedded cluster: told of every acknowledged record (`dev_room.rs`).
    room: Option<Arc<Room>>,
}

impl Producer {
    pub fn new(kafka: &KafkaConfig) -> Result<Self, SetupError> {
        Ok(Producer {
            inner: create_client(kafka, Role::Producer)?,
            room: None,
        })
    }

    /// Reports every acknowledged record to `room` (the embedded cluster's accounting).
    pub fn with_room(mut self, room: Arc<Room>) -> Self {
        self.room = Some(room);
        self
    }

    fn acked(&self, topic: &str, partition: i32, offset: i64, bytes: usize) {
        if let Some(room) = &self.room {
            room.record(topic, partition, offset, bytes as u64);
        }
    }

    fn owned_headers(headers: &Headers<'_>) -> OwnedHeaders {
        headers.iter().fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value.as_str()),
            })
        })
    }

    /// Sends raw bytes (`None`: a tombstone) with `key` and `headers` to `topic`; resolves once
    /// acknowledged.
    pub async fn send_raw(
        &self,
        topic: &str,
        key: &str,
        value: Option<&[u8]>,
        headers: &Headers<'_>,
    ) -> Result<Ack, KafkaError> {
        let mut record = FutureRecord::<str, [u8]>::to(topic)
            .key(key)
            .headers(Self::owned_headers(headers));
        if let Some(value) = value {
            record = record.payload(value);
        }
        let bytes = key.len()
            + value.map_or(0, <[u8]>::len)
            + headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        // The wait is bounded by message.timeout.ms (kafka.produce_timeout).
        match self.inner.send(record, Timeout::Never).await {
            Ok(delivery) => {
                self.acked(topic, delivery.partition, delivery.offset, bytes);
                Ok(Ack {
                    partition: delivery.partition,
                    offset: delivery.offset,
                })
            }
            Err((e, _)) => Err(e),
        }
    }

    /// The schema header of records of type `R`.
    fn schema_header<R: Record>() -> (&'static str, String) {
        (SCHEMA_HEADER, R::schema_header())
    }

    /// Sends `record` (with its schema header and `extra` headers) to `topic`; resolves once
    /// acknowledged.
    pub async fn send<R: Record>(
        &self,
        topic: &str,
        record: &R,
        extra: &Headers<'_>,
    ) -> Result<Ack, KafkaError> {
        let mut headers: Vec<(&str, String)> = vec![Self::schema_header::<R>()];
        headers.extend(extra.iter().cloned());
        self.send_raw(topic, &record.key(), Some(&record.encode()), &headers)
            .await
    }

    /// A tombstone for `key` on the compacted `topic`.
    pub async fn tombstone(&self, topic: &str, key: &str) -> Result<Ack, KafkaError> {
        self.send_raw(topic, key, None, &[]).await
    }

    /// Queues `record` without waiting for its acknowledgement (a failure is logged). For records
    /// that are informational, where the caller must not wait (e.g. the ACTIVE event before a
    /// delivery); queued records keep their order, so it still precedes later records of the
    /// same key.
    pub fn enqueue<R: Record>(&self, topic: &str, record: &R) {
        let value = record.encode();
        let key = record.key();
        let headers = Self::owned_headers(&[Self::schema_header::<R>()]);
        let future_record = FutureRecord::to(topic)
            .key(key.as_ref())
            .payload(value.as_slice())
            .headers(headers);
        let bytes = key.len() + value.len() + SCHEMA_HEADER.len() + R::schema_header().len();
        match self.inner.send_result(future_record) {
            Ok(ack) => {
                let key = key.into_owned();
                let (room, topic) = (self.room.clone(), topic.to_string());
                tokio::spawn(async move {
                    match ack.await {
                        Ok(Ok(delivery)) => {
                            if let Some(room) = room {
                                room.record(
                                    &topic,
                                    delivery.partition,
                                    delivery.offset,
                                    bytes as u64,
                                );
                            }
                        }
                        Ok(Err((e, _))) => tracing::warn!(key, error = %e, "record not stored"),
                        Err(_) => tracing::warn!(key, "record dropped by the producer"),
                    }
                });
            }
            Err((e, _)) => tracing::warn!(key = %key, error = %e, "record not queued"),
        }
    }

    /// Waits up to `timeout` for queued records to be acknowledged (shutdown).
    pub fn flush(&self, timeout: std::time::Duration) {
        if let Err(e) = self.inner.flush(timeout) {
            tracing::warn!(error = %e, "producer flush at shutdown did not finish");
        }
    }
}
