//! The one error type of the HTTP API. Every failure leaves as `{"error":"…"}` with a status that
//! says whose fault it was: 4xx for the client's mistakes, 503 when Kafka could not take a message
//! (safe to retry), never a panic.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use rdkafka::error::KafkaError;

use crate::kafka::producer::{is_permanent, is_timeout, is_too_large};
use crate::kafka::transaction::TxError;
use crate::model::destination::DestinationError;
use crate::model::headers::HeaderError;

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a human.
    pub error: String,
}

impl ErrorBody {
    pub fn of(e: &ApiError) -> Self {
        ErrorBody {
            error: e.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Over a configured quota (queue parallelism), as the hosted service answers.
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    Unavailable(String),
    /// Kafka refused a record as too large for it (a retry cannot help).
    #[error("{0}")]
    TooLargeForKafka(String),
    #[error("request URI is longer than the limit of {0} bytes")]
    UriTooLong(usize),
    #[error("request headers are larger than the limit of {0} bytes")]
    HeadersTooLarge(usize),
    #[error("the request body did not arrive in time (server.body_read_timeout)")]
    RequestTimeout,
    /// Every request slot of this process is taken; answered with `Retry-After`.
    #[error("too many requests in progress; retry shortly")]
    Overloaded,
    /// The process is starting: its views are catching up with Kafka (`GET /health/ready` says
    /// how far); answered with `Retry-After`.
    #[error("kstash is starting (catching up with Kafka); retry shortly")]
    Starting,
    /// Over the per-token limit on management calls (`api::rate_limit`); answered with the
    /// `Burst-RateLimit-*` headers the SDKs read.
    #[error("too many requests: the limit is {} management calls per second per token", .0.limit)]
    RateLimited(super::rate_limit::Burst),
    /// An upstream kstash calls synchronously (the chat proxy's LLM endpoint) did not answer.
    #[error("{0}")]
    BadGateway(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge(_) | ApiError::TooLargeForKafka(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::Unavailable(_) | ApiError::Overloaded | ApiError::Starting => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

impl ApiError {
    /// A write (`what`: "message", "queue change", …) Kafka did not take: 503, safe to retry,
    /// unless Kafka refused it for good, which a retry cannot change (413 when too large, else
    /// 400). A timeout is a 503 too, but says that the write may have been stored.
    pub fn not_stored(what: &str, e: &KafkaError) -> Self {
        if is_too_large(e) {
            ApiError::TooLargeForKafka(format!("{what} too large for Kafka, not stored: {e}"))
        } else if is_timeout(e) {
            // Kafka did not answer in time: the record may still have been written.
            ApiError::Unavailable(format!(
                "{what} not confirmed: Kafka did not answer in time, so it may or may not be stored; a retry may store it twice (Upstash-Deduplication-Id prevents that): {e}"
            ))
        } else if is_permanent(e) {
            ApiError::BadRequest(format!("{what} refused by Kafka, not stored: {e}"))
        } else {
            ApiError::Unavailable(format!("{what} not stored, safe to retry: {e}"))
        }
    }

    /// As [`ApiError::not_stored`], for a transactional write.
    pub fn not_stored_tx(what: &str, e: &TxError) -> Self {
        match e {
            TxError::Kafka(e) => Self::not_stored(what, e),
            e => ApiError::Unavailable(format!("{what} not stored, safe to retry: {e}")),
        }
    }
}

/// Seconds an overloaded client is asked to wait (`Retry-After`).
const OVERLOAD_RETRY_AFTER_SECS: &str = "1";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let overloaded = matches!(
            self,
            ApiError::Overloaded | ApiError::Starting | ApiError::RateLimited(_)
        );
        if overloaded {
            // A load condition, not a fault; one line per refused request would flood the log.
            tracing::debug!("request refused: every request slot is taken");
        } else if status.is_server_error() {
            tracing::error!(status = status.as_u16(), error = %self, "request failed");
        }
        let mut response = (status, Json(ErrorBody::of(&self))).into_response();
        if overloaded {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(OVERLOAD_RETRY_AFTER_SECS),
            );
        }
        if let ApiError::RateLimited(burst) = &self {
            burst.add_headers(response.headers_mut());
        }
        response
    }
}

impl From<DestinationError> for ApiError {
    fn from(e: DestinationError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<HeaderError> for ApiError {
    fn from(e: HeaderError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}
