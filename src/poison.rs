//! What a pipeline stage does with a record it cannot work on: it is moved to the dlq topic as a
//! [`PoisonRecord`] with the reason, then committed. Never committed and forgotten: an operator
//! finds it on the dlq topic, byte for byte, and can produce it again once it is fixed.
//!
//! Design choice: one small service shared by the delivery and the delay stage, so both treat a
//! record that is not a kstash envelope, or is of a newer schema version than this build knows,
//! the same way. A value too large to be kept whole (more than [`POISON_VALUE_MAX`]) is kept by
//! size only; the original stays on its source topic until retention.

use rdkafka::message::{Headers, Message, OwnedMessage};
use tokio_util::sync::CancellationToken;

use crate::kafka::consumer::Done;
use crate::kafka::producer::{until_acked, Handed};
use crate::kafka::Producer;
use crate::model::now_ms;
use crate::model::poison::{PoisonHeader, PoisonRecord, POISON_VERSION};

/// Largest original value a poison record keeps (bytes): base64 of it must stay well within the
/// dlq topic's record limit whatever the body limit is.
pub const POISON_VALUE_MAX: usize = 256 * 1024;

/// Moves records a stage cannot read to the dlq topic.
#[derive(Clone)]
pub struct Quarantine {
    producer: Producer,
    /// The dlq topic.
    dlq: String,
    /// The stage this quarantine serves (`delivery`, `delay`).
    stage: &'static str,
    shutdown: CancellationToken,
}

impl Quarantine {
    pub fn new(
        producer: Producer,
        dlq: String,
        stage: &'static str,
        shutdown: CancellationToken,
    ) -> Self {
        Quarantine {
            producer,
            dlq,
            stage,
            shutdown,
        }
    }

    /// Stores `record` on the dlq topic with `reason`; the record is finished once Kafka has it
    /// (handed back on shutdown).
    pub async fn put(&self, record: &OwnedMessage, reason: &str) -> Done {
        let poison = self.poison_of(record, reason);
        tracing::error!(
            topic = record.topic(),
            partition = record.partition(),
            offset = record.offset(),
            stage = self.stage,
            reason,
            poison_key = %poison.id,
            "a record this stage cannot read was moved to the dlq topic"
        );
        match until_acked(&self.shutdown, "poison record", || {
            self.producer.send(&self.dlq, &poison, &[])
        })
        .await
        {
            Handed::Acked(_) => Done::Finished,
            Handed::Shutdown => Done::HandedBack,
            Handed::Refused(e) => {
                // Cannot happen with a bounded value, but a stage must never stick on it.
                tracing::error!(error = %e, poison_key = %poison.id, "the dlq topic refused the poison record; the record is skipped (it stays on its source topic until retention)");
                Done::Finished
            }
        }
    }

    fn poison_of(&self, record: &OwnedMessage, reason: &str) -> PoisonRecord {
        let (topic, partition, offset) = (record.topic(), record.partition(), record.offset());
        let (value, reason) = match record.payload() {
            Some(v) if v.len() > POISON_VALUE_MAX => (
                None,
                format!(
                    "{reason} (value of {} bytes not kept here: read it at the source offset)",
                    v.len()
                ),
            ),
            v => (v.map(<[u8]>::to_vec), reason.to_string()),
        };
        PoisonRecord {
            v: POISON_VERSION,
            id: PoisonRecord::key_for(topic, partition, offset),
            topic: topic.to_string(),
            partition,
            offset,
            stage: self.stage.to_string(),
            reason,
            quarantined_at: now_ms(),
            key: record.key().map(<[u8]>::to_vec),
            value,
            headers: record
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| PoisonHeader {
                            name: h.key.to_string(),
                            value: h.value.map(<[u8]>::to_vec),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}
