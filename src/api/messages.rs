//! `/v2/messages`: look at a pending message, cancel one, cancel many.
//!
//! "Pending" means created and not yet delivered, failed or cancelled, as this process's view of
//! the events topic says (`state`). A cancel is a record on the cancellations topic (which every
//! delivery worker checks before each attempt) plus a CANCEL_REQUESTED event; the worker that
//! would have made the next attempt writes CANCELED instead. The change is also applied to the
//! local view at once, so this process answers consistently right after the call.

use std::sync::Arc;

use super::extract::Path;
use super::limits::BoundedBody;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::routing::{delete, get};
use axum::Router;
use futures::StreamExt;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::query::{unique, CancelFilters, CommonFilters, Filter, IdsBody, Query};
use super::render::{MessageView, Reply};
use super::{render, AppState};
use crate::model::cancel::CancelRecord;
use crate::model::envelope::Envelope;
use crate::model::event::{Event, State as EventState};
use crate::model::now_ms;
use crate::state::Store;

/// Cancels written to Kafka at once by a bulk cancel.
const CANCEL_CONCURRENCY: usize = 32;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/messages/{id}", get(get_message).delete(cancel_one))
        .route("/v2/messages/", delete(missing_id).get(missing_id))
        .route("/v2/messages", delete(cancel_many))
}

/// `{"cancelled": n}`: how many cancels were recorded.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Cancelled {
    pub cancelled: usize,
}

/// A view error is a server problem, not the client's.
pub fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable(format!("state store: {e}"))
}

/// Runs a blocking store query off the async threads.
pub async fn query_store<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, crate::state::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
}

/// A pending message.
#[utoipa::path(get, path = "/v2/messages/{id}", operation_id = "getMessage", tag = "messages",
    params(("id" = String, Path, description = "Message id")),
    responses(
        (status = 200, description = "The message, not yet delivered, failed or cancelled", body = MessageView),
        (status = 404, description = "Delivered, failed, cancelled or unknown", body = ErrorBody),
    ))]
pub async fn get_message(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Reply<MessageView>, ApiError> {
    let found = query_store(&state.views().store, move |s| s.message(&id)).await?;
    match found {
        Some(m) => Ok(Reply(render::message(&m))),
        None => Err(ApiError::NotFound(
            "message not found (delivered, failed, cancelled or unknown)".into(),
        )),
    }
}

async fn missing_id() -> ApiError {
    ApiError::BadRequest("message id is missing".into())
}

/// Cancels a pending message.
#[utoipa::path(delete, path = "/v2/messages/{id}", operation_id = "cancelMessage", tag = "messages",
    params(("id" = String, Path, description = "Message id")),
    responses(
        (status = 202, description = "Cancel recorded", body = Cancelled),
        (status = 404, description = "Delivered, failed, cancelled or unknown", body = ErrorBody),
    ))]
pub async fn cancel_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Reply<Cancelled>), ApiError> {
    let found = query_store(&state.views().store, move |s| s.message(&id)).await?;
    let Some(message) = found else {
        return Err(ApiError::NotFound(
            "message not found (delivered, failed, cancelled or unknown)".into(),
        ));
    };
    let cancelled = cancel(&state, vec![message]).await?;
    Ok((StatusCode::ACCEPTED, Reply(Cancelled { cancelled })))
}

/// Bulk cancel: ids from the query (`messageIds`) or a JSON body; else filters; else all.
#[utoipa::path(delete, path = "/v2/messages", operation_id = "cancelMessages", tag = "messages",
    params(CancelFilters, CommonFilters),
    request_body(content = Option<IdsBody>, description = "Optional: `{\"messageIds\": [...]}`"),
    responses(
        (status = 202, description = "Cancels recorded", body = Cancelled),
        (status = 400, description = "A bad body or filter", body = ErrorBody),
    ))]
pub async fn cancel_many(
    State(state): State<AppState>,
    uri: Uri,
    BoundedBody(body): BoundedBody,
) -> Result<(StatusCode, Reply<Cancelled>), ApiError> {
    let q = Query::parse(&uri);
    // `count` is the TS SDK's legacy batch size; it changes nothing here.
    q.refuse_unknown(&["host", "path", "messageIds", "count"])?;
    let body = IdsBody::parse(&body)?;
    let explicit_ids = q.has("messageIds") || body.message_ids.is_some();
    let ids = unique([q.all("messageIds"), body.message_ids.unwrap_or_default()].concat());
    let targets = if explicit_ids {
        // An explicitly empty list cancels nothing (never "everything").
        query_store(&state.views().store, move |s| {
            let mut found = Vec::new();
            for id in &ids {
                if let Some(m) = s.message(id)? {
                    found.push(m);
                }
            }
            Ok(found)
        })
        .await?
    } else {
        let filter = Filter::from_query(&q, &["host", "path"])?;
        query_store(&state.views().store, move |s| {
            s.messages_where(|m| filter.matches_message(m))
        })
        .await?
    };
    let cancelled = cancel(&state, targets).await?;
    Ok((StatusCode::ACCEPTED, Reply(Cancelled { cancelled })))
}

/// Records cancel requests for `messages` (a cancel record, then a CANCEL_REQUESTED event);
/// returns how many were recorded.
async fn cancel(state: &AppState, messages: Vec<Envelope>) -> Result<usize, ApiError> {
    let now = now_ms();
    let results: Vec<Result<(), ApiError>> = futures::stream::iter(messages)
        .map(|m| async move {
            state
                .writer
                .put(CancelRecord::new(&m.message_id, now))
                .await
                .map_err(|e| ApiError::not_stored("cancel", &e))?;
            let event = Event::new(&m, EventState::CancelRequested, now);
            if let Err(e) = state.writer.put(event).await {
                tracing::warn!(message_id = %m.message_id, error = %e, "CANCEL_REQUESTED event not recorded");
            }
            tracing::debug!(message_id = %m.message_id, "cancel requested");
            Ok(())
        })
        .buffer_unordered(CANCEL_CONCURRENCY)
        .collect()
        .await;
    let cancelled = results.iter().filter(|r| r.is_ok()).count();
    match results.into_iter().find_map(Result::err) {
        Some(e) if cancelled == 0 => Err(e),
        _ => Ok(cancelled),
    }
}
