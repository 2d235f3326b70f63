//! Per-request limits of the `/v2` API, answered in JSON like every other client mistake: the
//! request URI and header size (414, 431), the number of requests in progress (503 with
//! `Retry-After` beyond it), and how long the request body may take to arrive (408).
//!
//! Design choice: the body gets a *deadline*, not a timeout on the whole request. A client that
//! trickles its body (slowloris) is cut off, but once the body is in, the work behind it (a produce
//! and its ack) is never interrupted: an interrupted publish could be stored and still answered
//! with an error, and the client would publish it again. The request head's own deadline is the
//! connection's header-read timeout (`listener.rs`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::error::ApiError;
use super::AppState;
use crate::config::ServerConfig;

/// The limits, shared by every request of a process.
#[derive(Clone)]
pub struct RequestLimits(Arc<Inner>);

struct Inner {
    slots: Arc<Semaphore>,
    max_uri_bytes: usize,
    max_header_bytes: usize,
    body_read_timeout: Duration,
}

impl RequestLimits {
    pub fn new(server: &ServerConfig) -> Self {
        RequestLimits(Arc::new(Inner {
            slots: Arc::new(Semaphore::new(server.max_concurrent_requests)),
            max_uri_bytes: server.max_uri_bytes,
            max_header_bytes: server.max_header_bytes,
            body_read_timeout: server.body_read_timeout,
        }))
    }
}

/// The body did not arrive before its deadline.
#[derive(Debug, thiserror::Error)]
#[error("request body deadline passed")]
pub struct BodyDeadline;

/// Middleware: refuses oversized heads and requests beyond the concurrency bound, and gives the
/// body its deadline. The request slot is held until the response is ready.
pub async fn enforce(
    State(limits): State<RequestLimits>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let limits = &limits.0;
    let uri_bytes = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if uri_bytes > limits.max_uri_bytes {
        return Err(ApiError::UriTooLong(limits.max_uri_bytes));
    }
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if header_bytes > limits.max_header_bytes {
        return Err(ApiError::HeadersTooLarge(limits.max_header_bytes));
    }
    let Ok(_slot) = limits.slots.clone().try_acquire_owned() else {
        return Err(ApiError::Overloaded);
    };
    let deadline = Instant::now() + limits.body_read_timeout;
    let request = request.map(|body| with_deadline(body, deadline));
    Ok(next.run(request).await)
}

/// `body`, failing with [`BodyDeadline`] (and ending) if it is still arriving at `deadline`.
fn with_deadline(body: Body, deadline: Instant) -> Body {
    let frames = body.into_data_stream();
    let limited = futures::stream::unfold(Some(frames), move |frames| async move {
        let mut frames = frames?;
        match tokio::time::timeout_at(deadline, frames.next()).await {
            Ok(Some(chunk)) => Some((chunk.map_err(axum::Error::new), Some(frames))),
            Ok(None) => None,
            Err(_) => Some((Err(axum::Error::new(BodyDeadline)), None)),
        }
    });
    Body::from_stream(limited)
}

/// Reads the whole body: more than `limit` bytes is a 413, a missed deadline a 408, a broken body
/// a 400. Every handler that reads a body reads it here.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let inner = e.into_inner();
        if inner
            .downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            ApiError::PayloadTooLarge(limit)
        } else if is_deadline(inner.as_ref()) {
            ApiError::RequestTimeout
        } else {
            ApiError::BadRequest(format!("could not read the request body: {inner}"))
        }
    })
}

/// Whether `e` (or one of its sources) is a missed body deadline.
fn is_deadline(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<BodyDeadline>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// A whole request body of at most `server.body_limit` bytes, for handlers that take a small JSON
/// body: over the limit is a JSON 413 and a missed deadline a JSON 408, like publish (axum's own
/// `Bytes` extractor answers those in plain text).
pub struct BoundedBody(pub Bytes);

impl FromRequest<AppState> for BoundedBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        read_body(request.into_body(), state.body_limit)
            .await
            .map(BoundedBody)
    }
}
