//! `GET /health/live`, `GET /health/ready` (also `GET /health`), no token needed; and the gate
//! that answers `/v2` with 503 while the views are still catching up at start-up.
//!
//! Liveness is the HTTP server answering: a process that answers it needs no restart. Readiness
//! (`crate::health`) is the views having caught up with Kafka and Kafka answering; the body says
//! which part is missing and, while catching up, how far it has come.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::error::ApiError;
use super::AppState;
use crate::health::Health;
use crate::model::now_ms;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(ready))
        .route("/health/ready", get(ready))
        .route("/health/live", get(live))
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "live" }))
}

async fn ready(State(state): State<AppState>) -> Response {
    let r = state.health.report(now_ms());
    let status = if r.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if r.ready() { "ready" } else { "not ready" },
        "state": {
            "caughtUp": r.caught_up,
            "recordsApplied": r.records_applied,
            "partitionsLeft": r.partitions_left,
        },
        "kafka": {
            "reachable": r.kafka_reachable,
            "lastContact": r.kafka_ok_at,
            "error": r.kafka_error,
        },
    });
    (status, Json(body)).into_response()
}

/// Answers 503 (with `Retry-After`) until the views have caught up.
pub async fn require_caught_up(
    State(health): State<Health>,
    request: Request,
    next: Next,
) -> Response {
    if health.is_caught_up() {
        next.run(request).await
    } else {
        ApiError::Starting.into_response()
    }
}
