//! `GET /v2/events` (key `events`, what the SDKs call) and `GET /v2/logs` (key `logs`, the current
//! docs): the message log, newest first, from this process's view of the events topic.
//!
//! The cursor is the decimal key of the last entry returned (time and Kafka coordinates, so the
//! same on every process); it may exceed 2^53, so it is a string. No more entries: no cursor.

use axum::extract::State;
use axum::http::Uri;
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::messages::query_store;
use super::query::{CommonFilters, Filter, LogFilters, PageParams, Query};
use super::render::{EventView, Reply};
use super::{render, AppState};

/// Entries per page without `count`.
const DEFAULT_COUNT: usize = 100;
/// Largest `count`.
const MAX_COUNT: usize = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/events", get(events))
        .route("/v2/logs", get(logs))
}

/// A page of the log under `events`, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventsPage {
    pub events: Vec<EventView>,
    /// Present when more entries follow: pass it as `cursor` for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub cursor: Option<String>,
}

/// A page of the log under `logs`, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LogsPage {
    pub logs: Vec<EventView>,
    /// Present when more entries follow: pass it as `cursor` for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub cursor: Option<String>,
}

/// The message log, newest first (the SDKs' call).
#[utoipa::path(get, path = "/v2/events", operation_id = "listEvents", tag = "logs",
    params(PageParams, LogFilters, CommonFilters),
    responses(
        (status = 200, description = "A page of log entries", body = EventsPage),
        (status = 400, description = "A bad count, cursor or filter", body = ErrorBody),
    ))]
pub async fn events(
    State(state): State<AppState>,
    uri: Uri,
) -> Result<Reply<EventsPage>, ApiError> {
    let (events, cursor) = list(&state, &uri).await?;
    Ok(Reply(EventsPage { events, cursor }))
}

/// The message log, newest first (the current docs' call).
#[utoipa::path(get, path = "/v2/logs", operation_id = "listLogs", tag = "logs",
    params(PageParams, LogFilters, CommonFilters),
    responses(
        (status = 200, description = "A page of log entries", body = LogsPage),
        (status = 400, description = "A bad count, cursor or filter", body = ErrorBody),
    ))]
pub async fn logs(State(state): State<AppState>, uri: Uri) -> Result<Reply<LogsPage>, ApiError> {
    let (logs, cursor) = list(&state, &uri).await?;
    Ok(Reply(LogsPage { logs, cursor }))
}

/// A page of entries and the cursor after it, if more follow.
async fn list(state: &AppState, uri: &Uri) -> Result<(Vec<EventView>, Option<String>), ApiError> {
    let q = Query::parse(uri);
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
    let cursor = if more {
        page.last().map(|(k, _)| k.to_string())
    } else {
        None
    };
    Ok((page.iter().map(|(_, e)| render::event(e)).collect(), cursor))
}
