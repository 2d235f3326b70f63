//! The delivery stage: consume the `ready` topic and deliver each message over HTTP, in order per
//! queue and within flow-control limits.
//!
//! Split by concern: `http` (prepare → call), `outcome` (decide what follows an attempt and make
//! it durable), `guard` (which addresses may be called), `flow` (flow-control limiters). This file
//! is the handler the parallel consumer (`kafka::consumer`) runs for the ready topic: it names a
//! record's lane from its key (`q:<queue>` → the queue's lane, `f:<key>` → the flow-control key's
//! lane, anything else → none), gives each lane its policy (a queue's parallelism and pause; a
//! key's pause), gates each start on the message's flow-control limits, and delivers.
//!
//! Before an attempt it asks the views how far the message has come: a cancelled message is not
//! delivered; one the events say was delivered or failed already (a record read again after a
//! crash or a rebalance) is not delivered again; a queued message continues the retry count its
//! previous owner recorded; a stale copy of a retried message is dropped (the newer copy exists).
//! A record that is not a message this build can read is moved to the dlq topic with the reason
//! (`crate::poison`), never committed and forgotten.

pub mod copies;
pub mod destinations;
pub mod flow;
pub mod guard;
pub mod http;
pub mod outcome;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{BorrowedMessage, Headers, Message, OwnedMessage};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::kafka::consumer::{Done, Gate, RecordHandler};
use crate::kafka::lanes::LanePolicy;
use crate::kafka::record::Record;
use crate::model::envelope::{
    Envelope, DESTINATION_HEADER, FLOW_CONTROL_KEY_HEADER, FLOW_CONTROL_KEY_PREFIX,
    FLOW_CONTROL_VALUE_HEADER, MESSAGE_ID_HEADER, QUEUE_KEY_PREFIX,
};
use crate::model::event::{Event, State};
use crate::model::flow::{FlowControl, FlowLimits};
use crate::model::now_ms;
use crate::model::queue::DEFAULT_PARALLELISM;
use crate::poison::Quarantine;
use crate::state::store::Progress;
use crate::state::Views;
use copies::Copies;
use destinations::{DestinationLimits, Destinations, DESTINATION_LANE_PREFIX};
use flow::FlowLimiters;
use http::{HttpDelivery, Outcome};
use outcome::{After, Sink};

/// How often idle flow-control limiters and destinations, and remembered finished messages, are
/// dropped.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Delivers one envelope per record.
pub struct Deliverer {
    http: HttpDelivery,
    sink: Sink,
    views: Arc<Views>,
    limiters: FlowLimiters,
    /// The per-destination bound and circuit breakers.
    destinations: Destinations,
    /// Attempts in flight and messages finished recently: copies read twice are not attempted.
    copies: Copies,
    /// Bounds for flow-control values read back from records (never above what the API took).
    flow_limits: FlowLimits,
    /// Where records that are not messages this build can read go.
    quarantine: Quarantine,
    shutdown: CancellationToken,
}

impl Deliverer {
    pub fn new(
        http: HttpDelivery,
        sink: Sink,
        views: Arc<Views>,
        flow_limits: FlowLimits,
        destination_limits: DestinationLimits,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let quarantine = Quarantine::new(
            sink.producer.clone(),
            sink.dlq.clone(),
            "delivery",
            shutdown.clone(),
        );
        let deliverer = Arc::new(Deliverer {
            http,
            sink,
            quarantine,
            views,
            limiters: FlowLimiters::default(),
            destinations: Destinations::new(destination_limits),
            copies: Copies::default(),
            flow_limits,
            shutdown: shutdown.clone(),
        });
        let sweeper = Arc::downgrade(&deliverer);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                let Some(d) = sweeper.upgrade() else { return };
                let dropped = d.limiters.sweep();
                if dropped > 0 {
                    tracing::debug!(
                        dropped,
                        kept = d.limiters.len(),
                        "idle flow-control limiters dropped"
                    );
                }
                d.copies.sweep(now_ms());
                let dropped = d.destinations.sweep();
                if dropped > 0 {
                    tracing::debug!(dropped, "idle destinations dropped");
                }
            }
        });
        deliverer
    }

    /// The flow-control values a record carries in its headers.
    fn flow_control(&self, record: &OwnedMessage) -> Option<FlowControl> {
        let key = header(record, FLOW_CONTROL_KEY_HEADER)?;
        let value = header(record, FLOW_CONTROL_VALUE_HEADER)?;
        match FlowControl::parse(key, value, &self.flow_limits) {
            Ok(fc) => Some(fc),
            Err(e) => {
                tracing::warn!(key, error = %e, "unreadable flow-control headers; delivering without flow control");
                None
            }
        }
    }

    /// Delivers `envelope` (read from `record`) once, or says why not.
    async fn deliver(&self, mut envelope: Envelope, record: OwnedMessage) -> Done {
        let id = envelope.message_id.clone();
        let Some(_attempt) = self.copies.start(&id, envelope.retried) else {
            tracing::debug!(
                "a copy of an attempt in flight, or of a message just finished; not attempted"
            );
            return Done::Finished;
        };
        let progress = match self.views.store.progress(&id) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "progress check failed; delivering");
                Progress::Unknown
            }
        };
        match progress {
            Progress::Cancelled => {
                tracing::debug!("cancelled; not delivered");
                let event = Event::new(&envelope, State::Canceled, now_ms());
                if let Err(e) = self.sink.event(&event).await {
                    tracing::error!(error = %e, "could not record the CANCELED event");
                }
                self.sink.finished(&self.shutdown, &envelope).await;
                return Done::Finished;
            }
            Progress::Finished => {
                tracing::debug!("delivered or failed already; not delivered again");
                return Done::Finished;
            }
            Progress::Pending {
                retried,
                not_before,
            } if retried > envelope.retried => {
                if envelope.queue_name.is_none() {
                    tracing::debug!(retried, "a newer copy of this message exists; skipping");
                    return Done::Finished;
                }
                // A queue taken over mid-retry: continue where the previous owner was.
                envelope.retried = retried;
                envelope.not_before = not_before;
                if not_before > now_ms() {
                    return Done::Again {
                        at_ms: not_before,
                        record: record.set_payload(Some(envelope.encode())),
                    };
                }
            }
            Progress::Pending { .. } | Progress::Unknown => {}
        }
        let outcome = match self.http.prepare(&envelope) {
            Ok(request) => {
                self.sink
                    .enqueue_event(&Event::new(&envelope, State::Active, now_ms()));
                let outcome = self.http.call(request).await;
                if let Some(destination) = header(&record, DESTINATION_HEADER) {
                    self.destinations.record(destination, &outcome);
                }
                outcome
            }
            Err(reason) => Outcome::Error(reason),
        };
        match outcome::handle(&self.sink, &self.shutdown, &envelope, outcome).await {
            After::Finished { ended } => {
                if ended {
                    self.copies.finished(&id, now_ms());
                }
                Done::Finished
            }
            After::HandedBack => Done::HandedBack,
            After::RetryInPlace { at_ms, next } => Done::Again {
                at_ms,
                record: record.set_payload(Some(next.encode())),
            },
        }
    }
}

/// The value of Kafka header `name` of `record`, as text.
fn header<'a, M: Message>(record: &'a M, name: &str) -> Option<&'a str> {
    record
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| std::str::from_utf8(h.value?).ok())
}

impl RecordHandler for Deliverer {
    fn lane(&self, record: &BorrowedMessage<'_>) -> Option<String> {
        let key = std::str::from_utf8(record.key()?).ok()?;
        (key.starts_with(QUEUE_KEY_PREFIX) || key.starts_with(FLOW_CONTROL_KEY_PREFIX))
            .then(|| key.to_string())
    }

    fn policy(&self, lane: &str) -> LanePolicy {
        if let Some(queue) = lane.strip_prefix(QUEUE_KEY_PREFIX) {
            // A queue without settings (deleted, or not seen yet) runs as a new one would.
            let (parallelism, paused) = self
                .views
                .queues
                .get(queue)
                .map_or((DEFAULT_PARALLELISM, false), |q| (q.parallelism, q.paused));
            LanePolicy {
                parallelism: usize::try_from(parallelism).unwrap_or(usize::MAX),
                paused,
            }
        } else if let Some(destination) = lane.strip_prefix(DESTINATION_LANE_PREFIX) {
            // The destination's bound is its gate; an open breaker pauses its lanes.
            LanePolicy {
                paused: self.destinations.is_open(destination),
                ..LanePolicy::UNLIMITED
            }
        } else if let Some(key) = lane.strip_prefix(FLOW_CONTROL_KEY_PREFIX) {
            // The key's parallelism and rate are enforced by its gate.
            LanePolicy {
                paused: self.views.flow.get(key).is_some_and(|s| s.paused),
                ..LanePolicy::UNLIMITED
            }
        } else {
            LanePolicy::UNLIMITED
        }
    }

    fn spill_lane(&self, record: &BorrowedMessage<'_>) -> Option<String> {
        header(record, DESTINATION_HEADER).map(|d| format!("{DESTINATION_LANE_PREFIX}{d}"))
    }

    fn try_gate(&self, record: &BorrowedMessage<'_>) -> Option<Gate> {
        let destination = header(record, DESTINATION_HEADER)?;
        self.destinations.try_acquire(destination).map(Gate::hold)
    }

    async fn gate(&self, record: &OwnedMessage) -> Gate {
        // A cancelled message takes no start from its flow-control key: it is only marked
        // CANCELED (a destination slot it holds only for that moment).
        let cancelled = || {
            header(record, MESSAGE_ID_HEADER)
                .is_some_and(|id| matches!(self.views.store.progress(id), Ok(Progress::Cancelled)))
        };
        let flow = match self.flow_control(record) {
            Some(values) if !cancelled() => {
                let views = self.views.clone();
                let key = values.key.clone();
                let permit = self
                    .limiters
                    .acquire(
                        &values,
                        move || views.flow.get(&key),
                        self.views.settings_changes(),
                    )
                    .await;
                Some(permit)
            }
            _ => None,
        };
        let destination = match header(record, DESTINATION_HEADER) {
            Some(destination) => Some(self.destinations.acquire(destination).await),
            None => None,
        };
        if flow.is_none() && destination.is_none() {
            return Gate::none();
        }
        Gate::hold((flow, destination))
    }

    fn policy_changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.views.settings_changes())
    }

    async fn handle(&self, record: OwnedMessage) -> Done {
        let (partition, offset) = (record.partition(), record.offset());
        let envelope = match record.payload().map(Envelope::decode) {
            Some(Ok(e)) => e,
            Some(Err(e)) => {
                let reason = format!("not a message this build can read: {e}");
                return self.quarantine.put(&record, &reason).await;
            }
            None => {
                return self
                    .quarantine
                    .put(&record, "a message record without a value")
                    .await;
            }
        };
        let span = tracing::info_span!(
            "deliver",
            message_id = %envelope.message_id,
            queue = envelope.queue_name.as_deref(),
            partition,
            offset,
            retried = envelope.retried
        );
        self.deliver(envelope, record).instrument(span).await
    }
}
