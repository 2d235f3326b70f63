//! The last step of an attempt: record what happened.
//!
//! A 2xx becomes a DELIVERED event; anything else an ERROR event with the status, response or
//! error text. The event is awaited: a record counts as finished (and its offset committable) only
//! once its outcome is durable in Kafka. Retries, the DLQ and callbacks hang off this step in later
//! versions; today a failed attempt is final (messages carry `maxRetries` 0).

use super::http::{Outcome, Response};
use crate::kafka::Producer;
use crate::model::envelope::Envelope;
use crate::model::event::{Event, State};
use crate::model::now_ms;

/// The event that records `outcome`.
pub fn event_for(envelope: &Envelope, outcome: &Outcome, time: i64) -> Event {
    let with_response = |state: State, r: &Response| {
        let mut event = Event::new(envelope, state, time);
        event.response_status = Some(r.status);
        event.response_header = Some(r.header.clone());
        event.response_body = Some(r.body.clone());
        event
    };
    match outcome {
        Outcome::Delivered(r) => with_response(State::Delivered, r),
        Outcome::Failed(r) => {
            let mut event = with_response(State::Error, r);
            event.error = Some(format!("destination answered {}", r.status));
            event
        }
        Outcome::Error(reason) => {
            let mut event = Event::new(envelope, State::Error, time);
            event.error = Some(reason.clone());
            event
        }
    }
}

/// Records the outcome of an attempt durably.
pub async fn handle(producer: &Producer, envelope: &Envelope, outcome: Outcome) {
    match &outcome {
        Outcome::Delivered(r) => tracing::info!(status = r.status, "delivered"),
        Outcome::Failed(r) => tracing::warn!(status = r.status, "delivery failed"),
        Outcome::Error(reason) => tracing::warn!(error = %reason, "delivery failed"),
    }
    let event = event_for(envelope, &outcome, now_ms());
    if let Err(e) = producer.send_event(&event).await {
        tracing::error!(error = %e, state = ?event.state, "could not record the outcome event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::envelope::sample;

    #[test]
    fn outcomes_map_to_states() {
        let e = sample();
        let ok = Response {
            status: 204,
            header: Default::default(),
            body: vec![],
        };
        let bad = Response {
            status: 503,
            header: Default::default(),
            body: b"down".to_vec(),
        };
        assert_eq!(
            event_for(&e, &Outcome::Delivered(ok), 1).state,
            State::Delivered
        );
        let failed = event_for(&e, &Outcome::Failed(bad), 1);
        assert_eq!(
            (failed.state, failed.response_status),
            (State::Error, Some(503))
        );
        assert_eq!(failed.response_body.as_deref(), Some(&b"down"[..]));
        let err = event_for(&e, &Outcome::Error("timed out".into()), 1);
        assert_eq!(
            (err.state, err.error.as_deref()),
            (State::Error, Some("timed out"))
        );
    }
}
