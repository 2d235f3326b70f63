//! The last step of an attempt: decide what follows it, make that durable, record events.
//!
//! [`decide`] is pure: a 2xx is delivered; 489 with `Upstash-NonRetryable-Error: true`, or an
//! attempt with no retries left, fails for good; anything else is retried after the delay the
//! destination asked for (`Retry-After` & co.), else the message's `Upstash-Retry-Delay`
//! expression, else the default backoff. [`handle`] then acts: a retry is a new copy of the
//! envelope (`retried` + 1, `notBefore` = the retry time) produced through the delay ladder, so a
//! failing endpoint never blocks others; a failure is a record on the DLQ topic. The record counts
//! as finished only once that copy is acknowledged by Kafka. Events: DELIVERED, or ERROR followed
//! by RETRY or FAILED.
//!
//! A queued message is the exception: its retry waits *in its place* in the queue (FIFO holds
//! through retries), so [`handle`] records the RETRY event (which carries the new attempt count
//! and due time, so a process that takes the queue over continues the count) and answers
//! [`After::RetryInPlace`] instead of producing a copy.
//!
//! Callbacks (`model::callback`): after every attempt of a message with `Upstash-Callback`, and
//! once after its final failure with `Upstash-Failure-Callback`, [`handle`] produces a new
//! callback message (payload from [`callback_payload`]) through the delay ladder, which then
//! flows through the pipeline like any message (with a CREATED event of its own, queued just
//! before the message). Like the retry
//! copy and the DLQ record, it must be acknowledged before the record counts as finished.
//! Order, chosen so that a hand-back at shutdown (the attempt is then made again) duplicates as
//! little as possible: the attempt's callback first (a duplicate is one extra notification,
//! whereas a duplicated retry copy would double the rest of the message's retry chain), then the
//! retry copy or DLQ record, then the failure callback (its `dlqId` must name a durable record).

use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;

use super::http::{Outcome, Response};
use crate::delay::Router;
use crate::kafka::producer::{until_acked, Ack, Handed};
use crate::kafka::Producer;
use crate::model::callback::{AttemptResponse, Callback, CallbackPayload};
use crate::model::dlq::{DlqRecord, DLQ_VERSION};
use crate::model::envelope::Envelope;
use crate::model::event::{Event, State};
use crate::model::retry::{default_backoff, retry_after, RetryDelayExpr};
use crate::model::{ids, now_ms};

/// Where the delivery stage writes what follows an attempt: messages (retry copies, callbacks)
/// through the delay router, events, dead letters.
#[derive(Clone)]
pub struct Sink {
    pub producer: Producer,
    pub router: Router,
    /// The events topic.
    pub events: String,
    /// The DLQ topic.
    pub dlq: String,
    /// The pending topic (records of messages that wait long, `model::pending`).
    pub pending: String,
}

impl Sink {
    /// Stores a message where it belongs now (ready or the delay ladder).
    pub async fn message(&self, envelope: &Envelope) -> Result<Ack, KafkaError> {
        self.router.send(envelope).await
    }

    /// Records an event; resolves once acknowledged.
    pub async fn event(&self, event: &Event) -> Result<Ack, KafkaError> {
        self.producer.send(&self.events, event, &[]).await
    }

    /// Queues an event without waiting (see `Producer::enqueue`).
    pub fn enqueue_event(&self, event: &Event) {
        self.producer.enqueue(&self.events, event);
    }

    /// Removes the pending record of a finished message that waited long (`model::pending`); a
    /// failure leaves the record, which the views then ignore while the message's events say it
    /// finished.
    pub async fn finished(&self, shutdown: &CancellationToken, envelope: &Envelope) {
        if !envelope.long_delay {
            return;
        }
        let id = envelope.message_id.as_str();
        let removed = until_acked(shutdown, "pending record removal", || {
            self.producer.tombstone(&self.pending, id)
        })
        .await;
        if !matches!(removed, Handed::Acked(_)) {
            tracing::warn!(
                message_id = id,
                "pending record of a finished message not removed"
            );
        }
    }

    /// Stores a dead-letter record.
    pub async fn dead_letter(&self, record: &DlqRecord) -> Result<Ack, KafkaError> {
        self.producer.send(&self.dlq, record, &[]).await
    }
}

/// How the record of an attempt is left.
#[derive(Debug)]
pub enum After {
    /// Done: delivered or failed for good (`ended`: no attempt of the message follows), or its
    /// retry copy stored.
    Finished { ended: bool },
    /// Kafka did not take a follow-up before shutdown: the attempt is made again by whoever reads
    /// the record next.
    HandedBack,
    /// A queued message: try `next` again at `at_ms` in its place.
    RetryInPlace { at_ms: i64, next: Box<Envelope> },
}

/// Status with which a destination refuses retries (with [`NON_RETRYABLE_HEADER`]).
pub const NON_RETRYABLE_STATUS: u16 = 489;
/// Response header that makes a 489 final.
pub const NON_RETRYABLE_HEADER: &str = "upstash-nonretryable-error";

/// What follows an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Delivered,
    /// Try again at this unix time (ms).
    Retry {
        at_ms: i64,
    },
    /// No more attempts.
    Fail,
}

/// Decides what follows `outcome` for `envelope` at `now_ms`.
pub fn decide(envelope: &Envelope, outcome: &Outcome, now_ms: i64) -> Decision {
    let response = match outcome {
        Outcome::Delivered(_) => return Decision::Delivered,
        Outcome::Failed(r) => Some(r),
        Outcome::Error(_) => None,
    };
    if response.is_some_and(is_non_retryable) || envelope.retried >= envelope.max_retries {
        return Decision::Fail;
    }
    let delay = response
        .and_then(|r| retry_after(&r.header, now_ms))
        .or_else(|| {
            let source = envelope.retry_delay_expression.as_deref()?;
            match RetryDelayExpr::parse(source).and_then(|e| e.eval(envelope.retried)) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::warn!(error = %e, "Upstash-Retry-Delay failed; using the default backoff");
                    None
                }
            }
        })
        .unwrap_or_else(|| default_backoff(envelope.retried + 1));
    let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    Decision::Retry {
        at_ms: now_ms.saturating_add(delay_ms),
    }
}

fn is_non_retryable(r: &Response) -> bool {
    r.status == NON_RETRYABLE_STATUS
        && r.header.iter().any(|(name, values)| {
            name.eq_ignore_ascii_case(NON_RETRYABLE_HEADER)
                && values.iter().any(|v| v.trim().eq_ignore_ascii_case("true"))
        })
}

/// The event that records the attempt itself.
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
            event.error = Some(failure_text(outcome));
            event
        }
        Outcome::Error(_) => {
            let mut event = Event::new(envelope, State::Error, time);
            event.error = Some(failure_text(outcome));
            event
        }
    }
}

fn failure_text(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Delivered(r) | Outcome::Failed(r) => format!("destination answered {}", r.status),
        Outcome::Error(reason) => reason.clone(),
    }
}

/// The callback payload reporting `outcome` of the current attempt of `envelope`; `dlq_id` only
/// for the failure callback. No response (timeout, connection error) is status 0.
pub fn callback_payload(
    envelope: &Envelope,
    outcome: &Outcome,
    dlq_id: Option<&str>,
) -> CallbackPayload {
    let response = match outcome {
        Outcome::Delivered(r) | Outcome::Failed(r) => Some(AttemptResponse {
            status: r.status,
            header: &r.header,
            body: &r.body,
        }),
        Outcome::Error(_) => None,
    };
    CallbackPayload::new(envelope, response, dlq_id)
}

/// Produces the callback message carrying `payload` until Kafka acknowledges it (true), or
/// false when shutdown came first. Its CREATED event is queued just before the message itself,
/// like ACTIVE before an attempt: the producer keeps the order of queued records, so the event
/// precedes the callback's own ACTIVE (queued only once the message was consumed), and a lost
/// event costs a log line, not a callback. A callback message Kafka refuses for good (too large)
/// is recorded FAILED with the reason, and the source message goes on.
async fn produce_callback(
    sink: &Sink,
    shutdown: &CancellationToken,
    what: &str,
    settings: &Callback,
    payload: &CallbackPayload,
    source: &Envelope,
    now: i64,
) -> bool {
    let message = settings.message(payload, source.redact.as_ref(), now);
    let mut created = Event::new(&message, State::Created, now);
    // As on publish: CREATED carries the whole message, for the message and log APIs.
    created.message = Some(Box::new(message.clone()));
    sink.enqueue_event(&created);
    match until_acked(shutdown, what, || sink.message(&message)).await {
        Handed::Acked(_) => {
            tracing::debug!(
                callback_message_id = %message.message_id,
                not_before = message.not_before,
                what,
                "callback message produced"
            );
        }
        Handed::Shutdown => return false,
        Handed::Refused(e) => {
            let mut failed = Event::new(&message, State::Failed, now_ms());
            failed.error = Some(format!("Kafka refused the {what} message: {e}"));
            tracing::error!(callback_message_id = %message.message_id, error = %e, what, "callback message refused by Kafka; recorded as failed");
            if let Err(e) = sink.event(&failed).await {
                tracing::error!(error = %e, "could not record the FAILED event of a callback");
            }
        }
    }
    true
}

/// Acts on the outcome of an attempt; `HandedBack` when Kafka could not take a follow-up (retry
/// copy, DLQ record, callback message) before shutdown (the attempt is then made again by
/// whoever reads the record next). A follow-up Kafka refuses for good never holds the record: a
/// refused retry copy fails the message to the DLQ, a refused DLQ record is recorded in the FAILED
/// event.
pub async fn handle(
    sink: &Sink,
    shutdown: &CancellationToken,
    envelope: &Envelope,
    outcome: Outcome,
) -> After {
    let now = now_ms();
    let mut decision = decide(envelope, &outcome, now);
    let mut attempt_event = event_for(envelope, &outcome, now);
    let mut follow_up = None;
    if let Some(settings) = &envelope.callback {
        let payload = callback_payload(envelope, &outcome, None);
        if !produce_callback(
            sink, shutdown, "callback", settings, &payload, envelope, now,
        )
        .await
        {
            return After::HandedBack;
        }
    }
    let mut after = After::Finished { ended: false };
    let mut refused_retry = None;
    if let Decision::Retry { at_ms } = decision {
        let mut next = envelope.clone();
        next.retried += 1;
        next.not_before = at_ms;
        let stored = if next.queue_name.is_some() {
            after = After::RetryInPlace {
                at_ms,
                next: Box::new(next.clone()),
            };
            true
        } else {
            match until_acked(shutdown, "retry", || sink.message(&next)).await {
                Handed::Acked(_) => true,
                Handed::Shutdown => return After::HandedBack,
                Handed::Refused(e) => {
                    tracing::error!(error = %e, "retry copy refused by Kafka; the message fails");
                    refused_retry = Some(format!("; its retry was refused by Kafka: {e}"));
                    decision = Decision::Fail;
                    false
                }
            }
        };
        if stored {
            tracing::debug!(
                error = attempt_event.error.as_deref(),
                next_delivery_time = at_ms,
                "attempt failed; retry scheduled"
            );
            attempt_event.next_delivery_time = Some(at_ms);
            let mut retry = Event::new(&next, State::Retry, now);
            retry.next_delivery_time = Some(at_ms);
            follow_up = Some(retry);
        }
    }
    match &decision {
        Decision::Delivered => {
            tracing::debug!(status = attempt_event.response_status, "delivered");
        }
        Decision::Retry { .. } => {}
        Decision::Fail => {
            let (status, header, body) = match &outcome {
                Outcome::Failed(r) | Outcome::Delivered(r) => {
                    (Some(r.status), Some(r.header.clone()), r.body.clone())
                }
                Outcome::Error(_) => (None, None, Vec::new()),
            };
            let record = DlqRecord {
                v: DLQ_VERSION,
                dlq_id: ids::dlq_id(),
                failed_at: now,
                message: envelope.clone(),
                response_status: status,
                response_header: header,
                response_body: body,
                error: failure_text(&outcome) + refused_retry.as_deref().unwrap_or_default(),
            };
            let mut error = record.error.clone();
            let mut dlq_id = Some(record.dlq_id.as_str());
            match until_acked(shutdown, "dead letter", || sink.dead_letter(&record)).await {
                Handed::Acked(_) => {
                    tracing::warn!(error = %record.error, dlq_id = %record.dlq_id, "message failed; moved to the DLQ");
                }
                Handed::Shutdown => return After::HandedBack,
                Handed::Refused(e) => {
                    tracing::error!(error = %e, "DLQ record refused by Kafka; the message fails without a DLQ entry");
                    error = format!("{error}; its DLQ record was refused by Kafka: {e}");
                    dlq_id = None;
                }
            }
            let mut failed = Event::new(envelope, State::Failed, now);
            failed.error = Some(error);
            follow_up = Some(failed);
            if let Some(settings) = &envelope.failure_callback {
                let payload = callback_payload(envelope, &outcome, dlq_id);
                let what = "failure callback";
                if !produce_callback(sink, shutdown, what, settings, &payload, envelope, now).await
                {
                    return After::HandedBack;
                }
            }
        }
    }
    for event in std::iter::once(attempt_event).chain(follow_up) {
        if let Err(e) = sink.event(&event).await {
            tracing::error!(error = %e, state = ?event.state, "could not record an event");
        }
    }
    if matches!(decision, Decision::Delivered | Decision::Fail) {
        sink.finished(shutdown, envelope).await;
        return After::Finished { ended: true };
    }
    after
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::envelope::{sample, HeaderMap};

    fn response(status: u16, headers: &[(&str, &str)]) -> Response {
        Response {
            status,
            header: headers
                .iter()
                .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                .collect::<HeaderMap>(),
            body: vec![],
        }
    }

    fn envelope(retried: u32, max_retries: u32, expr: Option<&str>) -> Envelope {
        let mut e = sample();
        e.retried = retried;
        e.max_retries = max_retries;
        e.retry_delay_expression = expr.map(String::from);
        e
    }

    const NOW: i64 = 1_000_000;

    #[test]
    fn outcomes_map_to_decisions() {
        let e = envelope(0, 3, None);
        let ok = Outcome::Delivered(response(204, &[]));
        assert_eq!(decide(&e, &ok, NOW), Decision::Delivered);
        // default backoff: e^2.5 ≈ 12.18 s before the first retry
        match decide(&e, &Outcome::Failed(response(500, &[])), NOW) {
            Decision::Retry { at_ms } => {
                assert!((12_000..12_300).contains(&(at_ms - NOW)), "{at_ms}")
            }
            d => panic!("{d:?}"),
        }
        let last = envelope(3, 3, None);
        assert_eq!(
            decide(&last, &Outcome::Error("timed out".into()), NOW),
            Decision::Fail
        );
    }

    #[test]
    fn non_retryable_needs_both_status_and_header() {
        let e = envelope(0, 3, None);
        let final_489 = response(489, &[("Upstash-NonRetryable-Error", "true")]);
        assert_eq!(decide(&e, &Outcome::Failed(final_489), NOW), Decision::Fail);
        let plain_489 = response(489, &[]);
        assert!(matches!(
            decide(&e, &Outcome::Failed(plain_489), NOW),
            Decision::Retry { .. }
        ));
        let header_only = response(500, &[("upstash-nonretryable-error", "true")]);
        assert!(matches!(
            decide(&e, &Outcome::Failed(header_only), NOW),
            Decision::Retry { .. }
        ));
    }

    #[test]
    fn retry_after_beats_the_expression_which_beats_the_default() {
        let e = envelope(2, 5, Some("1000 * (1 + retried)"));
        let plain = Outcome::Failed(response(503, &[]));
        assert_eq!(
            decide(&e, &plain, NOW),
            Decision::Retry { at_ms: NOW + 3000 }
        );
        let asked = Outcome::Failed(response(429, &[("retry-after", "7")]));
        assert_eq!(
            decide(&e, &asked, NOW),
            Decision::Retry { at_ms: NOW + 7000 }
        );
        let broken = envelope(0, 5, Some("1 / 0"));
        match decide(&broken, &plain, NOW) {
            Decision::Retry { at_ms } => assert!(at_ms - NOW > 12_000, "falls back to the default"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn attempt_events() {
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

    #[test]
    fn callback_payloads_report_each_kind_of_outcome() {
        let e = envelope(2, 4, None);
        let ok = Outcome::Delivered(Response {
            status: 201,
            header: HeaderMap::from([("x-a".into(), vec!["1".into()])]),
            body: b"created".to_vec(),
        });
        let p = callback_payload(&e, &ok, None);
        assert_eq!((p.status, p.body.as_slice()), (201, &b"created"[..]));
        assert_eq!(p.header["x-a"], vec!["1"]);
        assert_eq!(
            (p.retried, p.max_retries),
            (2, 4),
            "the source's counters for this attempt"
        );
        assert_eq!(p.source_message_id, e.message_id);
        assert_eq!(
            (p.url.as_str(), p.method.as_str()),
            ("https://example.com/a?b=c", "PUT")
        );
        assert_eq!(p.source_body, e.body);
        assert_eq!(p.source_header, e.header);
        assert_eq!(p.dlq_id, None);

        let failed = Outcome::Failed(response(500, &[("retry-after", "3")]));
        let p = callback_payload(&e, &failed, Some("dlq_x"));
        assert_eq!(p.status, 500);
        assert_eq!(p.header["retry-after"], vec!["3"]);
        assert_eq!(p.dlq_id.as_deref(), Some("dlq_x"));

        let p = callback_payload(&e, &Outcome::Error("timed out".into()), None);
        assert_eq!(p.status, 0, "no response");
        assert!(p.header.is_empty() && p.body.is_empty());
        assert_eq!(p.retried, 2);
    }
}
