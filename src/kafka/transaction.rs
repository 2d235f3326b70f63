//! Writes that must be all or nothing: several records, on several topics, in one Kafka
//! transaction. Used where a half-done write would be visible: the per-endpoint messages of one
//! URL-group publish, and a schedule's fired messages together with its "last fired" record.
//!
//! Design choice: one transactional producer per *writer identity*, with writes through it
//! serialised (a producer has one transaction open at a time). The identity is the
//! `transactional.id`: a process-unique one for the API's fan-out, a stable one per schedule
//! partition for the scheduler, so that a process taking a partition over fences the previous
//! owner (its commits fail from then on) and aborts whatever it left open. Readers use
//! `read_committed` (librdkafka's default), so they never see records of an aborted transaction.
//! The librdkafka transaction calls block, so they run on blocking threads.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use tokio::sync::Mutex;

use super::producer::Ack;
use super::record::{Record, SCHEMA_HEADER};
use super::{client_config, ConflictError, Role, SetupError};
use crate::config::KafkaConfig;

/// librdkafka key naming the producer's transactional identity.
pub const TRANSACTIONAL_ID_KEY: &str = "transactional.id";
/// librdkafka key bounding how long an open transaction may stay open before the broker aborts it.
pub const TRANSACTION_TIMEOUT_KEY: &str = "transaction.timeout.ms";
/// librdkafka key bounding how long a record may wait for its acknowledgement.
const MESSAGE_TIMEOUT_KEY: &str = "message.timeout.ms";

/// One record of a transaction.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    /// `None`: the partitioner picks it from the key.
    pub partition: Option<i32>,
    pub key: String,
    /// `None`: a tombstone.
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(&'static str, String)>,
}

impl Outgoing {
    /// `record` (with its schema header) for `topic`, on `partition` or where its key puts it.
    pub fn record<R: Record>(topic: &str, partition: Option<i32>, record: &R) -> Self {
        Outgoing {
            topic: topic.to_string(),
            partition,
            key: record.key().into_owned(),
            value: Some(record.encode()),
            headers: vec![(SCHEMA_HEADER, R::schema_header())],
        }
    }
}

/// A producer that writes batches of records atomically.
pub struct TxProducer {
    kafka: KafkaConfig,
    transactional_id: String,
    timeout: Duration,
    /// The producer, created and initialised lazily, and again after a fatal error.
    inner: Mutex<Option<Arc<FutureProducer>>>,
}

/// Why a transactional write failed.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("kafka transaction: {0}")]
    Kafka(#[from] KafkaError),
    #[error("kafka transaction: {0}")]
    Join(String),
}

impl From<ConflictError> for TxError {
    fn from(e: ConflictError) -> Self {
        TxError::Setup(e.into())
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, TxError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TxError::Join(e.to_string()))?
        .map_err(TxError::from)
}

impl TxProducer {
    /// A producer with identity `transactional_id`; a transaction left open longer than `timeout`
    /// (its writer died) is aborted by the broker.
    pub fn new(kafka: &KafkaConfig, transactional_id: String, timeout: Duration) -> Self {
        TxProducer {
            kafka: kafka.clone(),
            transactional_id,
            timeout,
            inner: Mutex::new(None),
        }
    }

    /// The producer, initialised (which fences any earlier producer of the same identity and
    /// aborts its open transaction).
    async fn producer(
        &self,
        slot: &mut Option<Arc<FutureProducer>>,
    ) -> Result<Arc<FutureProducer>, TxError> {
        if let Some(p) = slot {
            return Ok(p.clone());
        }
        let mut config = client_config(&self.kafka, Role::Producer)?;
        let timeout_ms = self.timeout.as_millis().to_string();
        config
            .set(TRANSACTIONAL_ID_KEY, &self.transactional_id)
            .set(TRANSACTION_TIMEOUT_KEY, &timeout_ms);
        // librdkafka requires a record's delivery timeout to fit in its transaction's.
        let message_timeout = self.kafka.produce_timeout.min(self.timeout);
        config.set(
            MESSAGE_TIMEOUT_KEY,
            message_timeout.as_millis().max(1).to_string(),
        );
        let producer: FutureProducer = config.create().map_err(SetupError::from)?;
        let producer = Arc::new(producer);
        let (p, timeout) = (producer.clone(), self.timeout);
        blocking(move || p.init_transactions(timeout)).await?;
        tracing::debug!(id = %self.transactional_id, "transactional producer ready");
        *slot = Some(producer.clone());
        Ok(producer)
    }

    /// Makes sure the producer exists and is initialised (fencing a previous owner).
    pub async fn init(&self) -> Result<(), TxError> {
        let mut slot = self.inner.lock().await;
        self.producer(&mut slot).await.map(|_| ())
    }

    /// Writes `records` in one transaction: all of them are committed, or none is.
    pub async fn write(&self, records: &[Outgoing]) -> Result<Vec<Ack>, TxError> {
        let mut slot = self.inner.lock().await;
        let producer = self.producer(&mut slot).await?;
        let result = self.write_with(&producer, records).await;
        if let Err(e) = &result {
            let p = producer.clone();
            let timeout = self.timeout;
            let aborted = blocking(move || p.abort_transaction(timeout)).await;
            let fatal = matches!(e, TxError::Kafka(KafkaError::Transaction(t)) if t.is_fatal())
                || aborted.is_err();
            if fatal {
                // Fenced, or in a state only a new producer gets out of.
                tracing::warn!(id = %self.transactional_id, error = %e, "transactional producer reset");
                *slot = None;
            }
        }
        result
    }

    async fn write_with(
        &self,
        producer: &Arc<FutureProducer>,
        records: &[Outgoing],
    ) -> Result<Vec<Ack>, TxError> {
        let p = producer.clone();
        blocking(move || p.begin_transaction()).await?;
        let mut acks = Vec::with_capacity(records.len());
        let mut pending = Vec::with_capacity(records.len());
        for r in records {
            let headers = r.headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_str()),
                })
            });
            let mut record = FutureRecord::<str, [u8]>::to(&r.topic)
                .key(&r.key)
                .headers(headers);
            if let Some(value) = &r.value {
                record = record.payload(value);
            }
            if let Some(partition) = r.partition {
                record = record.partition(partition);
            }
            let delivery = producer.send_result(record).map_err(|(e, _)| e)?;
            pending.push(delivery);
        }
        for delivery in pending {
            match delivery.await {
                Ok(Ok(d)) => acks.push(Ack {
                    partition: d.partition,
                    offset: d.offset,
                }),
                Ok(Err((e, _))) => return Err(e.into()),
                Err(_) => return Err(TxError::Join("record dropped by the producer".into())),
            }
        }
        let (p, timeout) = (producer.clone(), self.timeout);
        blocking(move || p.commit_transaction(timeout)).await?;
        Ok(acks)
    }
}
