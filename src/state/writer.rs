//! Every write the API makes: produce → wait for Kafka's acknowledgement → apply the same change
//! to this process's views.
//!
//! Design choice: one service owns that sequence, so API handlers only parse and render, and the
//! rules hold everywhere: nothing is answered as stored before Kafka acknowledged it (`acks=all`),
//! and once Kafka has, the write *is* stored: a local view that cannot take the change right now is
//! logged, not reported to the client (the tailer applies the record when it reads it back), so
//! a client is never told to retry something that was stored.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;

use super::{Change, StateRecord, Views};
use crate::delay::Router;
use crate::kafka::producer::Ack;
use crate::kafka::transaction::{Outgoing, TxError, TxProducer};
use crate::kafka::Producer;
use crate::model::envelope::Envelope;
use crate::model::event::{Event, State};
use crate::model::now_ms;
use crate::model::pending::PendingRecord;
use crate::topics::TopicNames;

/// Produces API writes and applies them locally.
#[derive(Clone)]
pub struct Writer {
    producer: Producer,
    router: Router,
    names: TopicNames,
    views: Arc<Views>,
    /// For writes of several messages that must be all or nothing (a URL-group publish).
    transactions: Arc<TxProducer>,
    /// A message due later than this after its creation also gets a pending record.
    long_delay_after: Duration,
}

/// The CREATED event of a new message: it carries the whole message, for the message and log
/// APIs.
pub fn created_event(envelope: &Envelope) -> Event {
    let mut created = Event::new(envelope, State::Created, envelope.created_at);
    created.message = Some(Box::new(envelope.clone()));
    created
}

impl Writer {
    pub fn new(
        producer: Producer,
        router: Router,
        names: TopicNames,
        views: Arc<Views>,
        transactions: TxProducer,
        long_delay_after: Duration,
    ) -> Self {
        Writer {
            producer,
            router,
            names,
            views,
            transactions: Arc::new(transactions),
            long_delay_after,
        }
    }

    /// `envelope`, marked `long_delay` when it waits longer than the event log may keep its
    /// CREATED event (it then also gets a pending record, `model::pending`).
    fn marked<'a>(&self, envelope: &'a Envelope) -> Cow<'a, Envelope> {
        let wait = envelope.not_before.saturating_sub(envelope.created_at);
        let long = i64::try_from(self.long_delay_after.as_millis()).unwrap_or(i64::MAX);
        if wait > long {
            let mut marked = envelope.clone();
            marked.long_delay = true;
            Cow::Owned(marked)
        } else {
            Cow::Borrowed(envelope)
        }
    }

    /// The record storing `record` on its state topic, for a transaction.
    pub fn outgoing<R: StateRecord>(&self, record: &R) -> Outgoing {
        Outgoing::record(self.names.state(R::KIND), None, record)
    }

    pub fn views(&self) -> &Arc<Views> {
        &self.views
    }

    /// Stores `record` on its state topic, then applies it to the local views.
    pub async fn put<R: StateRecord>(&self, record: R) -> Result<Ack, KafkaError> {
        let ack = self
            .producer
            .send(self.names.state(R::KIND), &record, &[])
            .await?;
        self.apply(vec![record.change(ack.partition, ack.offset)])
            .await;
        Ok(ack)
    }

    /// Removes `key` from `R`'s compacted topic (a tombstone), then from the local views.
    pub async fn remove<R: StateRecord>(&self, key: &str) -> Result<Ack, KafkaError> {
        let ack = self
            .producer
            .tombstone(self.names.state(R::KIND), key)
            .await?;
        if let Some(change) = R::removal(key.to_string()) {
            self.apply(vec![change]).await;
        }
        Ok(ack)
    }

    /// Stores a new message: the envelope where it belongs now (the ready topic, or the delay
    /// ladder when it is due later) and its CREATED event, produced together, and for a long wait
    /// its pending record. Fails only when the envelope was not stored (then a pending record
    /// written with it is removed again); a lost CREATED event costs a log line, not a message,
    /// and a lost pending record costs findability only after the event log dropped the CREATED.
    pub async fn accept(&self, envelope: &Envelope) -> Result<Ack, KafkaError> {
        let envelope = self.marked(envelope);
        let created = created_event(&envelope);
        let pending = async {
            if envelope.long_delay {
                Some(self.put(PendingRecord::new(&envelope)).await)
            } else {
                None
            }
        };
        let (stored, event, pending) =
            tokio::join!(self.router.send(&envelope), self.put(created), pending);
        if let Err(e) = event {
            tracing::warn!(message_id = %envelope.message_id, error = %e, "CREATED event not recorded");
        }
        match (&stored, pending) {
            (Err(_), Some(Ok(_))) => {
                if let Err(e) = self.remove::<PendingRecord>(&envelope.message_id).await {
                    tracing::warn!(message_id = %envelope.message_id, error = %e, "pending record of a message not stored could not be removed");
                }
            }
            (Ok(_), Some(Err(e))) => {
                tracing::warn!(message_id = %envelope.message_id, error = %e, "pending record not stored: after its CREATED event expires the message cannot be looked up or cancelled");
            }
            _ => {}
        }
        stored
    }

    /// Stores several new messages all or nothing: the envelopes, their CREATED events and the
    /// pending records of long waits in one Kafka transaction (a URL-group publish: no crash
    /// leaves half a group published).
    pub async fn accept_all(&self, envelopes: &[Envelope]) -> Result<(), TxError> {
        let now = now_ms();
        let envelopes: Vec<Cow<'_, Envelope>> = envelopes.iter().map(|e| self.marked(e)).collect();
        let events: Vec<Event> = envelopes.iter().map(|e| created_event(e)).collect();
        let mut records: Vec<Outgoing> = envelopes
            .iter()
            .map(|e| self.router.outgoing(e, now))
            .collect();
        records.extend(events.iter().map(|e| self.outgoing(e)));
        let pending: Vec<PendingRecord> = envelopes
            .iter()
            .filter(|e| e.long_delay)
            .map(|e| PendingRecord::new(e))
            .collect();
        records.extend(pending.iter().map(|p| self.outgoing(p)));
        let acks = self.transactions.write(&records).await?;
        let changes = events
            .into_iter()
            .zip(&acks[envelopes.len()..])
            .map(|(event, ack)| event.change(ack.partition, ack.offset))
            .collect();
        self.apply(changes).await;
        Ok(())
    }

    /// Applies changes whose records Kafka acknowledged; a failure is logged (module doc).
    async fn apply(&self, changes: Vec<Change>) {
        let views = self.views.clone();
        match tokio::task::spawn_blocking(move || views.apply(&changes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "local view not updated yet; the tailer will apply the stored record")
            }
            Err(e) => tracing::warn!(error = %e, "local view update did not run"),
        }
    }
}
