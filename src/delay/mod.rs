//! The delay stage: moves records down the delay ladder and onto the ready topic when due.
//!
//! It runs on the same [`ParallelConsumer`](crate::kafka::consumer::ParallelConsumer) as
//! delivery, in its own consumer group over the delay topics. A record is *admitted* at its wake
//! time (`ladder.rs`); until then its partition is paused, so memory does not grow with the number
//! of delayed messages. Once admitted, a record in its last stretch is held in memory (a sleeping
//! task, at most the smallest bucket) and then produced to `ready`; any other record is produced
//! to the delay step its remaining wait calls for. The value is forwarded byte for byte; the
//! record is finished (committable) only once Kafka acknowledged the forwarded copy.

pub mod ladder;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{BorrowedMessage, Headers, Message, OwnedMessage};
use tokio_util::sync::CancellationToken;

use crate::kafka::consumer::{Admission, Done, RecordHandler};
use crate::kafka::producer::{until_acked, HOP_DUE_HEADER, NOT_BEFORE_HEADER};
use crate::kafka::Producer;
use crate::model::now_ms;
use ladder::Ladder;

/// Forwards delay-topic records.
pub struct Delayer {
    producer: Producer,
    ladder: Ladder,
    shutdown: CancellationToken,
}

impl Delayer {
    pub fn new(producer: Producer, shutdown: CancellationToken) -> Arc<Self> {
        let ladder = producer.ladder().clone();
        Arc::new(Delayer {
            producer,
            ladder,
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
                let wake = self.ladder.wake_ms(not_before, hop_due);
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
        let Some(not_before) = header_ms(&record, NOT_BEFORE_HEADER) else {
            tracing::error!(
                topic = record.topic(),
                partition,
                offset,
                "delay record without a not-before header; forwarding it as due"
            );
            return self.forward(&key, &record, now_ms()).await;
        };
        let now = now_ms();
        if self.ladder.in_last_stretch(not_before, now) {
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
    /// Produces the record's value to where `not_before` puts it now, retrying until Kafka takes
    /// it or the process shuts down.
    async fn forward(&self, key: &str, record: &OwnedMessage, not_before: i64) -> Done {
        let value = record.payload().unwrap_or_default();
        let send = || self.producer.send_routed(key, value, not_before, now_ms());
        if until_acked(&self.shutdown, "delayed message", send).await {
            Done::Finished
        } else {
            Done::HandedBack
        }
    }
}
