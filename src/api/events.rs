//! `GET /v2/events` (key `events`, what the SDKs call) and `GET /v2/logs` (key `logs`, the current
//! docs): the message log, newest first, from this process's view of the events topic.
//!
//! The cursor is the decimal key of the last entry returned (time and Kafka coordinates, so the
//! same on every process); it may exceed 2^53, so it is a string. No more entries: no cursor.

use axum::extract::State;
use axum::http::Uri;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::ApiError;
use super::messages::query_store;
use super::query::{Filter, Query};
use super::{render, AppState};

/// Entries per page without `count`.
const DEFAULT_COUNT: usize = 100;
/// Largest `count`.
const MAX_COUNT: usize = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/events", get(|s, u| list(s, u, "events")))
        .route("/v2/logs", get(|s, u| list(s, u, "logs")))
}

async fn list(
    State(state): State<AppState>,
    uri: Uri,
    key: &'static str,
) -> Result<Json<Value>, ApiError> {
    let q = Query::parse(&uri);
    let count = q.count(DEFAULT_COUNT, MAX_COUNT)?;
    let before = q
        .one("cursor")
        .map(|c| {
            c.parse::<u128>()
                .map_err(|_| ApiError::BadRequest("cursor is not one this server gave out".into()))
        })
        .transpose()?;
    let filter = Filter::from_query(&q, &["messageId", "messageIds", "host", "path", "state"])?;
    // One more than asked tells whether there is a next page.
    let mut page = query_store(&state.views().store, move |s| {
        s.events(before, count + 1, |e| filter.matches_event(e))
    })
    .await?;
    let more = page.len() > count;
    page.truncate(count);
    let mut body = json!({ key: page.iter().map(|(_, e)| render::event(e)).collect::<Vec<_>>() });
    if more {
        if let Some((k, _)) = page.last() {
            body["cursor"] = json!(k.to_string());
        }
    }
    Ok(Json(body))
}
