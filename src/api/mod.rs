//! The QStash v2 HTTP API. Each resource is a file exporting a `router()`; this file assembles them
//! behind authentication and gives unknown routes a JSON 404/405. `/health*` and `/openapi.json`
//! (the OpenAPI document of it all, `openapi`) need no token.
//!
//! The API only validates and produces to Kafka; it knows nothing of delivery.

pub mod auth;
pub mod batch;
pub mod dlq;
pub mod error;
pub mod events;
pub mod extract;
pub mod flow_control;
pub mod health;
pub mod keys;
pub mod limits;
pub mod llm;
pub mod messages;
pub mod openapi;
pub mod publish;
pub mod query;
pub mod queues;
pub mod rate_limit;
pub mod render;
pub mod schedules;
pub mod url_groups;

use axum::extract::MatchedPath;
use axum::http::Uri;
use axum::middleware;
use axum::Router;
use tower_http::trace::TraceLayer;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use crate::health::Health;
use crate::state::writer::Writer;
use crate::state::Views;
use error::ApiError;

/// What every handler may use.
#[derive(Clone)]
pub struct AppState {
    /// Every write (produce → ack → local view) and, through it, the views.
    pub writer: Writer,
    pub tokens: auth::Tokens,
    pub body_limit: usize,
    /// Largest `POST /v2/batch` body.
    pub batch_limit: usize,
    pub limits: crate::model::headers::Limits,
    pub dedup_window: std::time::Duration,
    /// Largest queue parallelism (more: 412).
    pub max_queue_parallelism: u32,
    /// This process's cap on deliveries in flight, and how many are in flight now (a gauge the
    /// delivery stage keeps; the API only reads it).
    pub global_parallelism: (usize, Arc<AtomicUsize>),
    /// URI and header size, requests in progress, body deadline.
    pub request_limits: limits::RequestLimits,
    /// Whether the views have caught up and Kafka answers (`/health/*`, the start-up gate).
    pub health: Health,
    /// On the embedded cluster (`kstash dev`): what its partitions still hold, so a publish that
    /// would make it drop needed records is refused.
    pub dev_room: Option<Arc<crate::kafka::dev_room::Room>>,
    /// Where the deprecated `api/llm` destination goes.
    pub llm: llm::Llm,
    /// The per-token limit on management calls (off by default).
    pub management_limit: rate_limit::ManagementLimit,
}

impl AppState {
    /// The local views of the state topics.
    pub fn views(&self) -> &Arc<Views> {
        self.writer.views()
    }
}

/// The whole API as a router (tested with `oneshot`, served by `server`).
pub fn router(state: AppState) -> Router {
    let v2 = Router::new()
        .merge(publish::router())
        .merge(keys::router())
        .merge(messages::router())
        .merge(events::router())
        .merge(dlq::router())
        .merge(queues::router())
        .merge(flow_control::router())
        .merge(url_groups::router())
        .merge(batch::router())
        .merge(schedules::router())
        .merge(llm::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.health.clone(),
            health::require_caught_up,
        ))
        // Inside authentication: it counts per authenticated token.
        .layer(middleware::from_fn_with_state(
            state.management_limit.clone(),
            rate_limit::enforce,
        ))
        .layer(middleware::from_fn_with_state(
            state.tokens.clone(),
            auth::require_token,
        ))
        // Outside authentication: unauthenticated floods are bounded too.
        .layer(middleware::from_fn_with_state(
            state.request_limits.clone(),
            limits::enforce,
        ));
    // No token needed; an unsupported method is answered in JSON like everywhere else.
    let public = Router::new()
        .merge(health::router())
        .merge(openapi::router())
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .merge(public)
        .merge(v2)
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state)
}

/// The span of a request: its method and route, not its URI, whose path holds a destination URL
/// that may carry credentials.
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("(no route)", MatchedPath::as_str);
    tracing::debug_span!("request", method = %request.method(), route)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
