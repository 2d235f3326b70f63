//! Extractors whose rejections leave through [`ApiError`], so a request the extractor refuses is
//! answered `{"error": "…"}` like every other client mistake (axum's own rejections are plain
//! text).
//!
//! Only [`Path`] is needed: the other inputs of the handlers are read by extractors that cannot
//! fail (`State`, `Uri`, `HeaderMap`, the whole `Request`) or by our own ([`super::limits`]'s
//! `BoundedBody`, which reads the body and parses it in the handler).

use axum::extract::rejection::PathRejection;
use axum::extract::FromRequestParts;

use super::error::ApiError;

/// `axum::extract::Path`, refused with a JSON 400 (a path segment that is not UTF-8 once
/// percent-decoded, e.g. `/v2/queues/%FF`).
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        // The only other kind, a route without the parameter, is a bug of the route table that
        // the tests of every route would show.
        ApiError::BadRequest(e.body_text())
    }
}
