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

use super::error::ApiError;
use super::AppState;
use crate::model::envelope::{Envelope, ENVELOPE_VERSION};
use crate::model::event::{Event, State as EventState};
use crate::model::{destination, headers, ids, now_ms};

/// Path prefix in front of the raw destination.
pub const PUBLISH_PREFIX: &str = "/v2/publish/";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/publish/{*destination}", post(publish))
        .route("/v2/publish/", post(publish))
        .route("/v2/publish", post(publish))
}

async fn publish(State(state): State<AppState>, request: Request) -> Result<Json<Value>, ApiError> {
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
    };
    let created = Event::new(&envelope, EventState::Created, now);
    let (stored, event) = tokio::join!(
        state.producer.send_envelope(&envelope),
        state.producer.send_event(&created)
    );
    let ack = stored
        .map_err(|e| ApiError::Unavailable(format!("message not stored, safe to retry: {e}")))?;
    if let Err(e) = event {
        tracing::warn!(message_id = %envelope.message_id, error = %e, "CREATED event not recorded");
    }
    tracing::info!(
        message_id = %envelope.message_id,
        partition = ack.partition,
        offset = ack.offset,
        not_before = envelope.not_before,
        "accepted"
    );
    Ok(Json(json!({
        "messageId": envelope.message_id,
        "url": envelope.url,
    })))
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
