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
use axum::Router;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::render::Reply;
use super::AppState;
use crate::health::Health;
use crate::model::now_ms;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/health/ready", get(ready))
        .route("/health/live", get(live))
}

/// `GET /health/live`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Liveness {
    /// Always `live`.
    pub status: String,
}

/// `GET /health/ready`: whether this process serves `/v2`, and which part is missing if not.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not ready`.
    pub status: String,
    pub state: ViewsProgress,
    pub kafka: KafkaStatus,
}

/// How far the views have caught up with Kafka.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ViewsProgress {
    pub caught_up: bool,
    pub records_applied: u64,
    pub partitions_left: usize,
}

/// Whether Kafka answers.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaStatus {
    pub reachable: bool,
    /// Unix ms of the last successful contact with Kafka (`null` before the first).
    pub last_contact: Option<i64>,
    /// Why the last contact failed (`null` when it did not).
    pub error: Option<String>,
}

const LIVE: &str = "live";
const READY: &str = "ready";
const NOT_READY: &str = "not ready";

/// Liveness: the HTTP server answers.
#[utoipa::path(get, path = "/health/live", operation_id = "live", tag = "health", security(),
    responses((status = 200, description = "The process serves HTTP", body = Liveness)))]
pub async fn live() -> Reply<Liveness> {
    Reply(Liveness {
        status: LIVE.to_string(),
    })
}

/// Readiness (also `GET /health`): the views have caught up and Kafka answers.
#[utoipa::path(get, path = "/health/ready", operation_id = "ready", tag = "health", security(),
    responses(
        (status = 200, description = "Ready to serve `/v2`", body = Readiness),
        (status = 503, description = "Not ready; the body says which part is missing", body = Readiness),
    ))]
pub async fn ready(State(state): State<AppState>) -> Response {
    let r = state.health.report(now_ms());
    let status = if r.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        status: if r.ready() { READY } else { NOT_READY }.to_string(),
        state: ViewsProgress {
            caught_up: r.caught_up,
            records_applied: r.records_applied,
            partitions_left: r.partitions_left,
        },
        kafka: KafkaStatus {
            reachable: r.kafka_reachable,
            last_contact: r.kafka_ok_at,
            error: r.kafka_error,
        },
    };
    (status, Reply(body)).into_response()
}

/// Readiness, as `GET /health/ready`.
#[utoipa::path(get, path = "/health", operation_id = "health", tag = "health", security(),
    responses(
        (status = 200, description = "Ready to serve `/v2`", body = Readiness),
        (status = 503, description = "Not ready; the body says which part is missing", body = Readiness),
    ))]
pub async fn health(state: State<AppState>) -> Response {
    ready(state).await
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
