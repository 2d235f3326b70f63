//! The delivery stage: consume the `ready` topic and deliver each message over HTTP.
//!
//! Split by concern: `http` (prepare → call), `outcome` (decide what follows an attempt and
//! make it durable), `guard` (which addresses may be called). This file is the handler the
//! parallel consumer (`kafka::consumer`) runs for each record of the ready topic.

pub mod guard;
pub mod http;
pub mod outcome;

use std::sync::Arc;

use rdkafka::message::{Message, OwnedMessage};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::kafka::consumer::{Done, RecordHandler};
use crate::kafka::Producer;
use crate::model::envelope::Envelope;
use crate::model::event::{Event, State};
use crate::model::now_ms;
use crate::state::Store;
use http::{HttpDelivery, Outcome};

/// Delivers one envelope per record.
pub struct Deliverer {
    http: HttpDelivery,
    producer: Producer,
    store: Arc<Store>,
    shutdown: CancellationToken,
}

impl Deliverer {
    pub fn new(
        http: HttpDelivery,
        producer: Producer,
        store: Arc<Store>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Deliverer {
            http,
            producer,
            store,
            shutdown,
        })
    }

    async fn deliver(&self, envelope: Envelope) -> Done {
        // A cancel request seen by this process before the attempt wins.
        match self.store.is_cancelled(&envelope.message_id) {
            Ok(true) => {
                tracing::info!("cancelled; not delivered");
                let event = Event::new(&envelope, State::Canceled, now_ms());
                if let Err(e) = self.producer.send_event(&event).await {
                    tracing::error!(error = %e, "could not record the CANCELED event");
                }
                return Done::Finished;
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "cancellation check failed; delivering"),
        }
        let outcome = match self.http.prepare(&envelope) {
            Ok(request) => {
                self.producer
                    .enqueue_event(&Event::new(&envelope, State::Active, now_ms()));
                self.http.call(request).await
            }
            Err(reason) => Outcome::Error(reason),
        };
        outcome::handle(&self.producer, &self.shutdown, &envelope, outcome).await
    }
}

impl RecordHandler for Deliverer {
    async fn handle(&self, record: OwnedMessage) -> Done {
        let (partition, offset) = (record.partition(), record.offset());
        let envelope = match record.payload().map(Envelope::decode) {
            Some(Ok(e)) => e,
            Some(Err(e)) => {
                tracing::error!(partition, offset, error = %e, "skipping a record that is not a kstash envelope");
                return Done::Finished;
            }
            None => {
                tracing::error!(partition, offset, "skipping a record without a value");
                return Done::Finished;
            }
        };
        let span = tracing::info_span!(
            "deliver",
            message_id = %envelope.message_id,
            partition,
            offset,
            retried = envelope.retried
        );
        self.deliver(envelope).instrument(span).await
    }
}
