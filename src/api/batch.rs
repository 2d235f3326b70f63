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
use axum::{Json, Router};
use futures::future::join_all;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::limits::read_body;
use super::publish::{caller_ip, refuse_delays, store, Publish};
use super::AppState;
use crate::model::destination;
use crate::model::headers;
use crate::model::now_ms;
use crate::model::queue::validate_name;

pub fn router() -> Router<AppState> {
    Router::new().route("/v2/batch", post(batch))
}

/// One item of the array.
#[derive(Debug, Deserialize)]
struct Item {
    destination: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    queue: Option<String>,
}

async fn batch(State(state): State<AppState>, request: Request) -> Result<Json<Value>, ApiError> {
    let caller_ip = caller_ip(&request);
    let bytes = read_body(request.into_body(), state.batch_limit).await?;
    let items: Vec<Item> = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::BadRequest(format!(
            "body must be a JSON array of {{destination, headers, body, queue?}}: {e}"
        ))
    })?;
    let now = now_ms();
    // Parse every item first; a bad one gets its error in its slot.
    let mut replies: Vec<Option<Value>> = vec![None; items.len()];
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
            Err(e) => replies[i] = Some(json!({ "error": e.to_string() })),
        }
    }
    let stored = join_all(lanes.into_values().map(|lane| {
        let state = &state;
        async move {
            let mut out = Vec::with_capacity(lane.len());
            for (i, publish) in lane {
                let reply = match store(state, publish).await {
                    Ok((_, reply)) => reply,
                    Err(e) => json!({ "error": e.to_string() }),
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
    Ok(Json(Value::Array(
        replies.into_iter().map(Option::unwrap_or_default).collect(),
    )))
}

/// One item as a publish, or why it is refused.
fn parse(
    state: &AppState,
    item: Item,
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
