//! `POST /v2/batch`: many publishes (and enqueues) in one call.
//!
//! The body is a JSON array of `{destination, headers, body, queue?}`; each item is exactly one
//! publish (or, with `queue`, one enqueue) with its own `Upstash-*` headers, to a URL or a URL
//! group. The answer is an array in request order: a `{messageId, url}` object per item, a nested
//! array for a URL-group item, and `{"error": "…"}` in the slot of an item that was refused (its
//! own 4xx reason) without failing the others. A body that is not such an array is a 400.
//!
//! Throughput is the point of a batch: the items are stored together (their records produced
//! concurrently, so the producer sends them in the same batches, and one wait covers all the
//! acknowledgements), except items of the same queue or flow-control key, which are stored one
//! after the other in request order so their order in Kafka is the order of the array.

use std::collections::BTreeMap;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::routing::post;
use axum::Router;
use futures::future::join_all;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::limits::read_body;
use super::publish::{caller_ip, refuse_delays, store, Publish, PublishAnswer};
use super::render::Reply;
use super::AppState;
use crate::model::destination;
use crate::model::headers;
use crate::model::now_ms;
use crate::model::queue::validate_name;

pub fn router() -> Router<AppState> {
    Router::new().route("/v2/batch", post(batch))
}

/// One item of the array: one publish (or, with `queue`, one enqueue).
#[derive(Debug, Deserialize, ToSchema)]
pub struct BatchItem {
    /// A URL or the name of a URL group.
    destination: String,
    /// The item's own headers (`Upstash-*` settings, `Content-Type`, `Upstash-Forward-*`).
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// The message body.
    #[serde(default)]
    body: Option<String>,
    /// Enqueue to this queue instead of publishing.
    #[serde(default)]
    queue: Option<String>,
}

/// The answer for one item: what its publish answers, or why it was refused.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum BatchReply {
    Stored(PublishAnswer),
    Refused(ErrorBody),
}

impl BatchReply {
    fn refused(e: &ApiError) -> Self {
        BatchReply::Refused(ErrorBody::of(e))
    }
}

/// Many publishes and enqueues in one call; answered in request order.
#[utoipa::path(post, path = "/v2/batch", operation_id = "batch", tag = "messages",
    request_body(content = Vec<BatchItem>, description = "The publishes, in order"),
    responses(
        (status = 200, description = "One answer per item, in request order (a refused item gets its own error)", body = Vec<BatchReply>),
        (status = 400, description = "The body is not such an array", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
    ))]
pub async fn batch(
    State(state): State<AppState>,
    request: Request,
) -> Result<Reply<Vec<BatchReply>>, ApiError> {
    let caller_ip = caller_ip(&request);
    let bytes = read_body(request.into_body(), state.batch_limit).await?;
    let items: Vec<BatchItem> = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::BadRequest(format!(
            "body must be a JSON array of {{destination, headers, body, queue?}}: {e}"
        ))
    })?;
    let now = now_ms();
    // Parse every item first; a bad one gets its error in its slot.
    let mut replies: Vec<Option<BatchReply>> = vec![None; items.len()];
    let mut lanes: BTreeMap<String, Vec<(usize, Publish)>> = BTreeMap::new();
    for (i, item) in items.into_iter().enumerate() {
        match parse(&state, item, caller_ip.clone(), now) {
            Ok(publish) => {
                // Items of one queue (or flow-control key) keep their order; others run at once.
                let lane = match (&publish.queue, &publish.spec.flow_control) {
                    (Some(q), _) => format!("q:{q}"),
                    (None, Some(fc)) => format!("f:{}", fc.key),
                    (None, None) => format!("#{i}"),
                };
                lanes.entry(lane).or_default().push((i, publish));
            }
            Err(e) => replies[i] = Some(BatchReply::refused(&e)),
        }
    }
    let stored = join_all(lanes.into_values().map(|lane| {
        let state = &state;
        async move {
            let mut out = Vec::with_capacity(lane.len());
            for (i, publish) in lane {
                let reply = match store(state, publish).await {
                    Ok((_, reply)) => BatchReply::Stored(reply),
                    Err(e) => BatchReply::refused(&e),
                };
                out.push((i, reply));
            }
            out
        }
    }))
    .await;
    for (i, reply) in stored.into_iter().flatten() {
        replies[i] = Some(reply);
    }
    // Every slot was filled above: a refused item in the first loop, a stored one in the second.
    let unanswered = || {
        BatchReply::Refused(ErrorBody {
            error: "item not processed".into(),
        })
    };
    Ok(Reply(
        replies
            .into_iter()
            .map(|r| r.unwrap_or_else(unanswered))
            .collect(),
    ))
}

/// One item as a publish, or why it is refused.
fn parse(
    state: &AppState,
    item: BatchItem,
    caller_ip: Option<String>,
    now: i64,
) -> Result<Publish, ApiError> {
    let mut headers = HeaderMap::new();
    for (name, value) in &item.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ApiError::BadRequest(format!("invalid header name {name:?}")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| ApiError::BadRequest(format!("invalid value for header {name}")))?;
        headers.append(name, value);
    }
    let queue = item.queue.filter(|q| !q.is_empty());
    if let Some(q) = &queue {
        validate_name("queue", q).map_err(ApiError::BadRequest)?;
        refuse_delays(&headers)?;
    }
    let destination = destination::parse(&item.destination)?;
    let mut options = headers::parse_publish(&headers, &state.limits, now)?;
    let destination = state.llm.resolve(destination, &mut options)?;
    let body = item.body.unwrap_or_default().into_bytes();
    if body.len() > state.body_limit {
        return Err(ApiError::PayloadTooLarge(state.body_limit));
    }
    Ok(Publish::new(
        destination,
        queue,
        options,
        body,
        caller_ip,
        now,
    ))
}
