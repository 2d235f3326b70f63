//! `POST /v2/publish/{destination}`: accept a message and store it in Kafka.
//!
//! The destination is read from the raw request target (see `model::destination`); the answer
//! `{"messageId","url"}` is sent only after Kafka acknowledged the envelope on the ready topic, or
//! on the delay ladder when it is due later (`acks=all`), so an accepted message survives any crash from then on. The CREATED event is
//! produced alongside; losing it would cost a log line, not a message, so it does not fail the call.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use axum::http::StatusCode;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::messages::query_store;
use super::AppState;
use crate::model::envelope::{Envelope, ENVELOPE_VERSION};
use crate::model::event::{Event, State as EventState};
use crate::model::headers::Dedup;
use crate::model::{destination, headers, ids, now_ms};
use crate::state::{Change, DedupEntry};

/// Path prefix in front of the raw destination.
pub const PUBLISH_PREFIX: &str = "/v2/publish/";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/publish/{*destination}", post(publish))
        .route("/v2/publish/", post(publish))
        .route("/v2/publish", post(publish))
}

async fn publish(
    State(state): State<AppState>,
    request: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller_ip = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let (parts, body) = request.into_parts();
    let url = destination::from_uri(&parts.uri, PUBLISH_PREFIX)?;
    let now = now_ms();
    let options = headers::parse_publish(&parts.headers, &state.limits, now)?;
    let body = read_body(body, state.body_limit).await?;

    let envelope = Envelope {
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
    };
    let dedup_key = options.dedup.as_ref().map(|d| dedup_key(d, &envelope));
    if let Some(key) = dedup_key.clone() {
        let existing = query_store(&state.store, move |s| s.dedup(&key, now)).await?;
        if let Some(original) = existing {
            tracing::info!(message_id = %original.message_id, "duplicate publish; not stored again");
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
    accept(&state, &envelope).await?;
    if let Some(key) = dedup_key {
        let window = i64::try_from(state.dedup_window.as_millis()).unwrap_or(i64::MAX);
        let entry = DedupEntry {
            message_id: envelope.message_id.clone(),
            url: envelope.url.clone(),
            expires_at: now.saturating_add(window),
        };
        // The message is stored either way; without the record a retried publish would be
        // stored twice, which at-least-once allows.
        match state.producer.send_dedup(&key, &entry).await {
            Ok(_) => {
                let change = Change::Dedup {
                    key,
                    entry: Some(entry),
                };
                query_store(&state.store, move |s| s.apply(&[change])).await?;
            }
            Err(e) => {
                tracing::warn!(message_id = %envelope.message_id, error = %e, "dedup id not recorded")
            }
        }
    }
    Ok((
        StatusCode::OK,
        Json(json!({
            "messageId": envelope.message_id,
            "url": envelope.url,
        })),
    ))
}

/// Stores a new message: the envelope (ready topic or delay ladder) and its CREATED event,
/// also applied to this process's view so it can be read back at once. Answers 503 when Kafka
/// did not take the envelope.
pub async fn accept(state: &AppState, envelope: &Envelope) -> Result<(), ApiError> {
    let mut created = Event::new(envelope, EventState::Created, envelope.created_at);
    created.message = Some(Box::new(envelope.clone()));
    let (stored, event) = tokio::join!(
        state.producer.send_envelope(envelope),
        state.producer.send_event(&created)
    );
    let ack = stored
        .map_err(|e| ApiError::Unavailable(format!("message not stored, safe to retry: {e}")))?;
    match event {
        Ok(event_ack) => {
            let change = Change::Event {
                event: Box::new(created),
                partition: event_ack.partition,
                offset: event_ack.offset,
            };
            query_store(&state.store, move |s| s.apply(&[change])).await?;
        }
        Err(e) => {
            tracing::warn!(message_id = %envelope.message_id, error = %e, "CREATED event not recorded")
        }
    }
    tracing::info!(
        message_id = %envelope.message_id,
        partition = ack.partition,
        offset = ack.offset,
        not_before = envelope.not_before,
        "accepted"
    );
    Ok(())
}

/// The dedup key of a publish: the id as given, or a hash of what makes the content.
fn dedup_key(dedup: &Dedup, envelope: &Envelope) -> String {
    match dedup {
        Dedup::Id(id) => format!("id:{id}"),
        Dedup::Content => {
            let mut hash = Sha256::new();
            hash.update(envelope.url.as_bytes());
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
