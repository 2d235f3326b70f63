//! `POST /v2/publish/{destination}` and `POST /v2/enqueue/{queue}/{destination}`: accept a
//! message and store it in Kafka.
//!
//! The destination is read from the raw request target (see `model::destination`); the answer
//! `{"messageId","url"}` is sent only after Kafka acknowledged the envelope on the ready topic, or
//! on the delay ladder when it is due later (`acks=all`), so an accepted message survives any
//! crash from then on. Enqueue is the same with the message keyed by its queue (so the delivery
//! stage runs it in order); the queue is created with parallelism 1 when missing, and
//! `Upstash-Delay` / `Upstash-Not-Before` are refused with a 400 as the hosted service does (a
//! delayed message cannot hold its place in a FIFO queue). A publish with flow control also keeps
//! the key's settings record up to date (the newest message's values, unless pinned).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::messages::query_store;
use super::AppState;
use crate::model::dedup::{DedupRecord, DEDUP_VERSION};
use crate::model::envelope::{Envelope, ENVELOPE_VERSION};
use crate::model::flow::{FlowControl, FlowControlRecord};
use crate::model::headers::{Dedup, PublishOptions};
use crate::model::queue::{validate_name, QueueRecord, DEFAULT_PARALLELISM};
use crate::model::{destination, headers, ids, now_ms};

/// Path prefix in front of the raw destination of a publish.
pub const PUBLISH_PREFIX: &str = "/v2/publish/";
/// Path prefix in front of `{queue}/{destination}` of an enqueue.
pub const ENQUEUE_PREFIX: &str = "/v2/enqueue/";
/// Headers that make no sense for a message that must keep its place in a queue.
const NOT_ON_ENQUEUE: [&str; 2] = ["upstash-delay", "upstash-not-before"];

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/publish/{*destination}", post(publish))
        .route("/v2/publish/", post(publish))
        .route("/v2/publish", post(publish))
        .route("/v2/enqueue/{*rest}", post(enqueue))
        .route("/v2/enqueue/", post(enqueue))
        .route("/v2/enqueue", post(enqueue))
}

async fn publish(
    State(state): State<AppState>,
    request: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller_ip = caller_ip(&request);
    let (parts, body) = request.into_parts();
    let url = destination::from_uri(&parts.uri, PUBLISH_PREFIX)?;
    let now = now_ms();
    let options = headers::parse_publish(&parts.headers, &state.limits, now)?;
    let body = read_body(body, state.body_limit).await?;
    store(&state, envelope(url, options, body, caller_ip, None, now)).await
}

async fn enqueue(
    State(state): State<AppState>,
    request: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller_ip = caller_ip(&request);
    let (parts, body) = request.into_parts();
    let rest = parts
        .uri
        .path()
        .strip_prefix(ENQUEUE_PREFIX)
        .unwrap_or_default();
    let queue = rest.split('/').next().unwrap_or_default().to_string();
    validate_name("queue name", &queue).map_err(ApiError::BadRequest)?;
    refuse_delays(&parts.headers)?;
    let url = destination::from_uri(&parts.uri, &format!("{ENQUEUE_PREFIX}{queue}/"))?;
    let now = now_ms();
    let options = headers::parse_publish(&parts.headers, &state.limits, now)?;
    let body = read_body(body, state.body_limit).await?;
    if state.writer.views().queues.get(&queue).is_none() {
        let record = QueueRecord::new(&queue, DEFAULT_PARALLELISM, false, now);
        state
            .writer
            .put(record)
            .await
            .map_err(|e| ApiError::Unavailable(format!("queue not created, safe to retry: {e}")))?;
        tracing::info!(queue, "queue created by its first enqueue");
    }
    store(
        &state,
        envelope(url, options, body, caller_ip, Some(queue), now),
    )
    .await
}

fn refuse_delays(headers: &HeaderMap) -> Result<(), ApiError> {
    for name in NOT_ON_ENQUEUE {
        if headers.contains_key(name) {
            return Err(ApiError::BadRequest(format!(
                "{name} is not allowed on enqueue: a queued message is delivered in order, when its turn comes"
            )));
        }
    }
    Ok(())
}

fn caller_ip(request: &Request) -> Option<String> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
}

/// A new message, with the dedup rule its headers asked for.
struct NewMessage {
    envelope: Envelope,
    dedup: Option<Dedup>,
}

fn envelope(
    url: String,
    options: PublishOptions,
    body: Vec<u8>,
    caller_ip: Option<String>,
    queue_name: Option<String>,
    now: i64,
) -> NewMessage {
    NewMessage {
        envelope: Envelope {
            v: ENVELOPE_VERSION,
            message_id: ids::message_id(),
            url,
            method: options.method,
            header: options.forward,
            body,
            created_at: now,
            not_before: options.not_before.unwrap_or(now),
            max_retries: options.max_retries,
            retried: 0,
            retry_delay_expression: options.retry_delay,
            timeout_ms: options
                .timeout
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            labels: options.labels,
            caller_ip,
            callback: options.callback,
            failure_callback: options.failure_callback,
            queue_name,
            flow_control: options.flow_control,
        },
        dedup: options.dedup,
    }
}

/// Stores a new message (unless it is a duplicate) and answers as the SDKs expect.
async fn store(state: &AppState, new: NewMessage) -> Result<(StatusCode, Json<Value>), ApiError> {
    let NewMessage { envelope, dedup } = new;
    let now = envelope.created_at;
    let dedup_key = dedup.as_ref().map(|d| dedup_key(d, &envelope));
    if let Some(key) = dedup_key.clone() {
        let existing =
            query_store(&state.writer.views().store, move |s| s.dedup(&key, now)).await?;
        if let Some(original) = existing {
            tracing::debug!(message_id = %original.message_id, "duplicate publish; not stored again");
            return Ok((
                StatusCode::ACCEPTED,
                Json(json!({
                    "messageId": original.message_id,
                    "url": original.url,
                    "deduplicated": true,
                })),
            ));
        }
    }
    accept(state, &envelope).await?;
    if let Some(key) = dedup_key {
        let window = i64::try_from(state.dedup_window.as_millis()).unwrap_or(i64::MAX);
        let record = DedupRecord {
            v: DEDUP_VERSION,
            key,
            message_id: envelope.message_id.clone(),
            url: envelope.url.clone(),
            expires_at: now.saturating_add(window),
        };
        // The message is stored either way; without the record a retried publish would be
        // stored twice, which at-least-once allows.
        if let Err(e) = state.writer.put(record).await {
            tracing::warn!(message_id = %envelope.message_id, error = %e, "dedup id not recorded");
        }
    }
    if let Some(values) = &envelope.flow_control {
        remember_flow_control(state, values, now).await;
    }
    Ok((
        StatusCode::OK,
        Json(json!({
            "messageId": envelope.message_id,
            "url": envelope.url,
        })),
    ))
}

/// Stores a new message: the envelope (ready topic or delay ladder) and its CREATED event. Answers
/// 503 when Kafka did not take the envelope.
pub async fn accept(state: &AppState, envelope: &Envelope) -> Result<(), ApiError> {
    let ack =
        state.writer.accept(envelope).await.map_err(|e| {
            ApiError::Unavailable(format!("message not stored, safe to retry: {e}"))
        })?;
    tracing::debug!(
        message_id = %envelope.message_id,
        queue = envelope.queue_name.as_deref(),
        partition = ack.partition,
        offset = ack.offset,
        not_before = envelope.not_before,
        "accepted"
    );
    Ok(())
}

/// Keeps the key's settings record in step with the newest message's values (unless pinned).
/// The message is stored either way, and the delivery stage reads the values off the message
/// itself, so a failure here only leaves `GET /v2/flowControl` behind: it is logged.
async fn remember_flow_control(state: &AppState, values: &FlowControl, now: i64) {
    let next = match state.writer.views().flow.get(&values.key) {
        None => Some(FlowControlRecord::new(values, now)),
        Some(current) => current.with_message_values(values, now),
    };
    if let Some(record) = next {
        if let Err(e) = state.writer.put(record).await {
            tracing::warn!(key = %values.key, error = %e, "flow-control settings not recorded");
        }
    }
}

/// The dedup key of a publish: the id as given, or a hash of what makes the content.
fn dedup_key(dedup: &Dedup, envelope: &Envelope) -> String {
    match dedup {
        Dedup::Id(id) => format!("id:{id}"),
        Dedup::Content => {
            let mut hash = Sha256::new();
            hash.update(envelope.url.as_bytes());
            hash.update([0]);
            hash.update(
                envelope
                    .queue_name
                    .as_deref()
                    .unwrap_or_default()
                    .as_bytes(),
            );
            hash.update([0]);
            hash.update(&envelope.body);
            for (name, values) in &envelope.header {
                for v in values {
                    hash.update([0]);
                    hash.update(name.to_ascii_lowercase().as_bytes());
                    hash.update(b":");
                    hash.update(v.as_bytes());
                }
            }
            format!("content:{}", URL_SAFE_NO_PAD.encode(hash.finalize()))
        }
    }
}

/// Reads the whole body, refusing more than `limit` bytes with 413.
async fn read_body(body: axum::body::Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(e) => {
            let inner = e.into_inner();
            if inner
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(ApiError::PayloadTooLarge(limit))
            } else {
                Err(ApiError::BadRequest(format!(
                    "could not read the request body: {inner}"
                )))
            }
        }
    }
}
