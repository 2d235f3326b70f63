//! The delay stage: moves records down the delay ladder and onto the ready topic when due.
//!
//! [`Router`] is the entry: every message record (a publish, a retry copy, a callback message, a
//! record moving down the ladder) goes where its not-before time puts it now, the ready topic or a
//! delay step. The [`Delayer`] runs on the same
//! [`ParallelConsumer`](crate::kafka::consumer::ParallelConsumer) as delivery, in its own consumer
//! group over the delay topics. A record is *admitted* at its wake time (`ladder.rs`); until then
//! its partition is paused, so memory does not grow with the number of delayed messages. Once
//! admitted, a record in its last stretch is held in memory (a sleeping task, at most the smallest
//! bucket) and then produced to `ready`; any other record is produced to the delay step its
//! remaining wait calls for. Key, value and headers are forwarded unchanged (only the ladder's own
//! headers are replaced); the record is finished (committable) only once Kafka acknowledged the
//! forwarded copy. A record without the ladder's due-time header is scheduled by its envelope's
//! `notBefore` (never delivered early); one whose due time cannot be found at all, or that Kafka
//! refuses for good, is moved to the dlq topic with the reason (`crate::poison`).

pub mod ladder;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message, OwnedMessage};
use tokio_util::sync::CancellationToken;

use crate::kafka::consumer::{Admission, Done, RecordHandler};
use crate::kafka::producer::{until_acked, Ack, Handed};
use crate::kafka::record::{Record, SCHEMA_HEADER};
use crate::kafka::transaction::Outgoing;
use crate::kafka::Producer;
use crate::model::envelope::Envelope;
use crate::model::now_ms;
use crate::poison::Quarantine;
use ladder::{Hop, Ladder};

/// Header on delay-topic records: the message's not-before time (unix ms), so the delay stage
/// can schedule a record without decoding it.
pub const NOT_BEFORE_HEADER: &str = "kstash-not-before";
/// Header on delay-topic records: when this hop of the ladder is due (unix ms).
pub const HOP_DUE_HEADER: &str = "kstash-hop-due";

/// Sends message records to the ready topic or the delay step their wait calls for.
#[derive(Clone)]
pub struct Router {
    producer: Producer,
    ladder: Ladder,
    ready: String,
    steps: Vec<String>,
}

impl Router {
    /// `steps`: the delay topics, one per ladder step in step order.
    pub fn new(producer: Producer, ladder: Ladder, ready: String, steps: Vec<String>) -> Self {
        Router {
            producer,
            ladder,
            ready,
            steps,
        }
    }

    pub fn ladder(&self) -> &Ladder {
        &self.ladder
    }

    /// Stores a message where it belongs now; resolves once acknowledged.
    pub async fn send(&self, envelope: &Envelope) -> Result<Ack, KafkaError> {
        let (topic, headers) =
            self.route(Self::headers_of(envelope), envelope.not_before, now_ms());
        self.producer
            .send_raw(
                topic,
                &envelope.ordering_key(),
                Some(&envelope.encode()),
                &headers,
            )
            .await
    }

    /// The record storing a message where it belongs at `now_ms`, for a transaction.
    pub fn outgoing(&self, envelope: &Envelope, now_ms: i64) -> Outgoing {
        let (topic, headers) = self.route(Self::headers_of(envelope), envelope.not_before, now_ms);
        Outgoing {
            topic: topic.to_string(),
            partition: None,
            key: envelope.ordering_key().into_owned(),
            value: Some(envelope.encode()),
            headers,
        }
    }

    fn headers_of(envelope: &Envelope) -> Vec<(&'static str, String)> {
        let mut headers = vec![(SCHEMA_HEADER, Envelope::schema_header())];
        headers.extend(envelope.kafka_headers());
        headers
    }

    /// Sends an encoded message record (with its other `headers`) to the ready topic or to the
    /// delay step its remaining wait calls for.
    pub async fn send_raw(
        &self,
        key: &str,
        value: &[u8],
        headers: Vec<(&str, String)>,
        not_before_ms: i64,
        now_ms: i64,
    ) -> Result<Ack, KafkaError> {
        let (topic, headers) = self.route(headers, not_before_ms, now_ms);
        self.producer
            .send_raw(topic, key, Some(value), &headers)
            .await
    }

    /// The topic a record due at `not_before_ms` goes to at `now_ms`, with the ladder's headers
    /// added to `headers` for a delay step.
    fn route<'h>(
        &self,
        mut headers: Vec<(&'h str, String)>,
        not_before_ms: i64,
        now_ms: i64,
    ) -> (&str, Vec<(&'h str, String)>) {
        match self.ladder.route(not_before_ms, now_ms) {
            Hop::Ready => (&self.ready, headers),
            Hop::Delay { step, hop_due_ms } => {
                headers.push((NOT_BEFORE_HEADER, not_before_ms.to_string()));
                headers.push((HOP_DUE_HEADER, hop_due_ms.to_string()));
                (&self.steps[step], headers)
            }
        }
    }
}

/// Forwards delay-topic records.
pub struct Delayer {
    router: Router,
    /// Where records go that cannot be scheduled (no due time to be found).
    quarantine: Quarantine,
    shutdown: CancellationToken,
}

impl Delayer {
    pub fn new(router: Router, quarantine: Quarantine, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Delayer {
            router,
            quarantine,
            shutdown,
        })
    }
}

/// The unix-ms value of Kafka header `name`.
fn header_ms<M: Message>(record: &M, name: &str) -> Option<i64> {
    record
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| std::str::from_utf8(h.value?).ok())
        .and_then(|v| v.parse().ok())
}

impl RecordHandler for Delayer {
    fn admit(&self, record: &BorrowedMessage<'_>) -> Admission {
        match (
            header_ms(record, NOT_BEFORE_HEADER),
            header_ms(record, HOP_DUE_HEADER),
        ) {
            (Some(not_before), Some(hop_due)) => {
                let wake = self.router.ladder.wake_ms(not_before, hop_due);
                if wake > now_ms() {
                    Admission::NotBefore(wake)
                } else {
                    Admission::Now
                }
            }
            // Handled (and reported) in `handle`.
            _ => Admission::Now,
        }
    }

    async fn handle(&self, record: OwnedMessage) -> Done {
        let (partition, offset) = (record.partition(), record.offset());
        let key = record
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .unwrap_or_default()
            .to_string();
        let not_before = match header_ms(&record, NOT_BEFORE_HEADER) {
            Some(not_before) => not_before,
            // Written by something other than kstash's router: the envelope knows its due time.
            None => match record.payload().map(Envelope::decode) {
                Some(Ok(envelope)) => {
                    tracing::warn!(
                        topic = record.topic(),
                        partition,
                        offset,
                        not_before = envelope.not_before,
                        "delay record without a not-before header; its envelope's due time is used"
                    );
                    envelope.not_before
                }
                Some(Err(e)) => {
                    let reason = format!("delay record without a not-before header, and {e}");
                    return self.quarantine.put(&record, &reason).await;
                }
                None => {
                    let reason = "delay record without a not-before header or a value";
                    return self.quarantine.put(&record, reason).await;
                }
            },
        };
        let now = now_ms();
        if self.router.ladder.in_last_stretch(not_before, now) {
            let wait = Duration::from_millis(u64::try_from(not_before - now).unwrap_or_default());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.cancelled() => return Done::HandedBack,
            }
        }
        tracing::trace!(message_id = %key, partition, offset, not_before, "forwarding");
        self.forward(&key, &record, not_before).await
    }
}

impl Delayer {
    /// Produces the record (value and headers, without the ladder's) to where `not_before` puts
    /// it now, retrying until Kafka takes it or the process shuts down.
    async fn forward(&self, key: &str, record: &OwnedMessage, not_before: i64) -> Done {
        let value = record.payload().unwrap_or_default();
        let kept: Vec<(String, String)> = record
            .headers()
            .map(|h| {
                h.iter()
                    .filter(|h| h.key != NOT_BEFORE_HEADER && h.key != HOP_DUE_HEADER)
                    .filter_map(|h| {
                        let value = std::str::from_utf8(h.value?).ok()?;
                        Some((h.key.to_string(), value.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let send = || {
            let headers = kept.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            self.router
                .send_raw(key, value, headers, not_before, now_ms())
        };
        match until_acked(&self.shutdown, "delayed message", send).await {
            Handed::Acked(_) => Done::Finished,
            Handed::Shutdown => Done::HandedBack,
            Handed::Refused(e) => {
                let reason = format!("Kafka refused the forwarded record: {e}");
                self.quarantine.put(record, &reason).await
            }
        }
    }
}
