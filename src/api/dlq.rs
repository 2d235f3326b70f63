//! `/v2/dlq`: list, get, delete and retry dead-lettered messages.
//!
//! Entries come from this process's view of the compacted DLQ topic. Deleting writes a tombstone;
//! retrying publishes a new message (new id, `retried` 0, the original body and settings, with any
//! `Upstash-*` headers of the retry call taking precedence) and then tombstones the entry. Bulk
//! calls take ids from the query (`dlqIds`) or a JSON body (`{"dlqIds":[…]}`, Python), else
//! filters, else everything; an explicitly empty id list touches nothing. They work through at
//! most `count` entries and return a `cursor` while more remain.

use super::extract::Path;
use super::limits::BoundedBody;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::messages::query_store;
use super::publish::MessageHeaders;
use super::query::{unique, CommonFilters, DlqFilters, Filter, IdsBody, PageParams, Query};
use super::render::{DlqView, Reply};
use super::{render, AppState};
use crate::model::dlq::DlqRecord;
use crate::model::envelope::Envelope;
use crate::model::headers;
use crate::model::{ids, now_ms};

/// Entries per page without `count`, and the largest `count`.
const DEFAULT_COUNT: usize = 100;
const MAX_COUNT: usize = 100;
/// Entries a bulk delete or retry works through per call at most.
const MAX_BULK: usize = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/dlq", get(list).delete(delete_many))
        .route("/v2/dlq/retry", post(retry_many))
        .route("/v2/dlq/retry/{id}", post(retry_one))
        .route("/v2/dlq/{id}", get(get_one).delete(delete_one))
}

/// `(failed_at, dlq_id)` ↔ `"<failed_at>-<dlq_id>"`.
fn parse_cursor(q: &Query) -> Result<Option<(u64, String)>, ApiError> {
    let Some(c) = q.one("cursor") else {
        return Ok(None);
    };
    let bad = || ApiError::BadRequest("cursor is not one this server gave out".into());
    let (time, id) = c.split_once('-').ok_or_else(bad)?;
    Ok(Some((time.parse().map_err(|_| bad())?, id.to_string())))
}

fn cursor_of(r: &DlqRecord) -> String {
    format!("{}-{}", r.failed_at, r.dlq_id)
}

/// The entries a list or bulk call is about, at most `count`, and the cursor after them.
async fn select(
    state: &AppState,
    uri: &Uri,
    body: Option<&[u8]>,
    count: usize,
) -> Result<(Vec<DlqRecord>, Option<String>), ApiError> {
    let q = Query::parse(uri);
    let body = body.map(IdsBody::parse).transpose()?.unwrap_or_default();
    if q.has("dlqIds") || body.dlq_ids.is_some() {
        let ids = unique([q.all("dlqIds"), body.dlq_ids.unwrap_or_default()].concat());
        let found = query_store(&state.views().store, move |s| {
            let mut out = Vec::new();
            for id in &ids {
                out.extend(s.dlq(id)?);
            }
            Ok(out)
        })
        .await?;
        return Ok((found, None));
    }
    let filter = Filter::from_query(&q, &["messageId", "responseStatus"])?;
    let cursor = parse_cursor(&q)?;
    let mut page = query_store(&state.views().store, move |s| {
        s.dlq_entries(cursor, count + 1, |r| filter.matches_dlq(r))
    })
    .await?;
    let more = page.len() > count;
    page.truncate(count);
    let next = if more {
        page.last().map(cursor_of)
    } else {
        None
    };
    Ok((page, next))
}

/// A page of DLQ entries, oldest failure first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DlqPage {
    pub messages: Vec<DlqView>,
    /// Present when more entries follow: pass it as `cursor` for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub cursor: Option<String>,
}

/// How many entries a delete removed, and the cursor when a bulk delete left more.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DlqDeleted {
    pub deleted: usize,
    /// Present when more entries are left: pass it as `cursor` to go on.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub cursor: Option<String>,
}

/// The new message a DLQ entry was published as.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retried {
    pub message_id: String,
}

/// The new messages of a bulk retry, and the cursor when more entries are left.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RetriedPage {
    pub responses: Vec<Retried>,
    /// Present when more entries are left: pass it as `cursor` to go on.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub cursor: Option<String>,
}

/// Dead-lettered messages.
#[utoipa::path(get, path = "/v2/dlq", operation_id = "listDlq", tag = "dlq",
    params(PageParams, DlqFilters, CommonFilters),
    responses(
        (status = 200, description = "A page of DLQ entries", body = DlqPage),
        (status = 400, description = "A bad count, cursor or filter", body = ErrorBody),
    ))]
pub async fn list(State(state): State<AppState>, uri: Uri) -> Result<Reply<DlqPage>, ApiError> {
    let count = Query::parse(&uri).count(DEFAULT_COUNT, MAX_COUNT)?;
    let (page, cursor) = select(&state, &uri, None, count).await?;
    Ok(Reply(DlqPage {
        messages: page.iter().map(render::dlq).collect(),
        cursor,
    }))
}

async fn find(state: &AppState, id: String) -> Result<DlqRecord, ApiError> {
    query_store(&state.views().store, move |s| s.dlq(&id))
        .await?
        .ok_or_else(|| ApiError::NotFound("dlq entry not found".into()))
}

/// One DLQ entry.
#[utoipa::path(get, path = "/v2/dlq/{id}", operation_id = "getDlqEntry", tag = "dlq",
    params(("id" = String, Path, description = "DLQ id")),
    responses(
        (status = 200, description = "The entry", body = DlqView),
        (status = 404, description = "No such entry", body = ErrorBody),
    ))]
pub async fn get_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Reply<DlqView>, ApiError> {
    Ok(Reply(render::dlq(&find(&state, id).await?)))
}

/// Deletes one DLQ entry.
#[utoipa::path(delete, path = "/v2/dlq/{id}", operation_id = "deleteDlqEntry", tag = "dlq",
    params(("id" = String, Path, description = "DLQ id")),
    responses(
        (status = 200, description = "Deleted", body = DlqDeleted),
        (status = 404, description = "No such entry", body = ErrorBody),
    ))]
pub async fn delete_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Reply<DlqDeleted>, ApiError> {
    let record = find(&state, id).await?;
    let deleted = delete(&state, vec![record]).await?;
    Ok(Reply(DlqDeleted {
        deleted,
        cursor: None,
    }))
}

/// Deletes the entries named (query `dlqIds` or body), else the filtered, else all, at most
/// `count` per call.
#[utoipa::path(delete, path = "/v2/dlq", operation_id = "deleteDlqEntries", tag = "dlq",
    params(PageParams, DlqFilters, CommonFilters),
    request_body(content = Option<IdsBody>, description = "Optional: `{\"dlqIds\": [...]}`"),
    responses(
        (status = 200, description = "Deleted", body = DlqDeleted),
        (status = 400, description = "A bad body, count, cursor or filter", body = ErrorBody),
    ))]
pub async fn delete_many(
    State(state): State<AppState>,
    uri: Uri,
    BoundedBody(body): BoundedBody,
) -> Result<Reply<DlqDeleted>, ApiError> {
    let q = Query::parse(&uri);
    q.refuse_unknown(&["messageId", "responseStatus", "dlqIds", "count", "cursor"])?;
    let count = q.count(MAX_BULK, MAX_BULK)?;
    let (targets, cursor) = select(&state, &uri, Some(&body), count).await?;
    let deleted = delete(&state, targets).await?;
    Ok(Reply(DlqDeleted { deleted, cursor }))
}

/// Tombstones the entries; returns how many.
async fn delete(state: &AppState, records: Vec<DlqRecord>) -> Result<usize, ApiError> {
    for r in &records {
        state
            .writer
            .remove::<DlqRecord>(&r.dlq_id)
            .await
            .map_err(|e| ApiError::not_stored("delete", &e))?;
    }
    Ok(records.len())
}

/// Publishes a DLQ entry's message again (as a new message) and removes the entry; `Upstash-*`
/// headers of this call override the original settings.
#[utoipa::path(post, path = "/v2/dlq/retry/{id}", operation_id = "retryDlqEntry", tag = "dlq",
    params(("id" = String, Path, description = "DLQ id"), MessageHeaders),
    responses(
        (status = 201, description = "Published again", body = Retried),
        (status = 400, description = "A bad header", body = ErrorBody),
        (status = 404, description = "No such entry", body = ErrorBody),
    ))]
pub async fn retry_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Reply<Retried>), ApiError> {
    let record = find(&state, id).await?;
    let message_id = retry(&state, record, &headers).await?;
    Ok((StatusCode::CREATED, Reply(Retried { message_id })))
}

/// Retries the entries named (query `dlqIds` or body), else the filtered, else all, at most
/// `count` per call.
#[utoipa::path(post, path = "/v2/dlq/retry", operation_id = "retryDlqEntries", tag = "dlq",
    params(PageParams, DlqFilters, CommonFilters, MessageHeaders),
    request_body(content = Option<IdsBody>, description = "Optional: `{\"dlqIds\": [...]}`"),
    responses(
        (status = 200, description = "Published again", body = RetriedPage),
        (status = 400, description = "A bad body, header, count, cursor or filter", body = ErrorBody),
    ))]
pub async fn retry_many(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    BoundedBody(body): BoundedBody,
) -> Result<Reply<RetriedPage>, ApiError> {
    let count = Query::parse(&uri).count(MAX_BULK, MAX_BULK)?;
    let (targets, cursor) = select(&state, &uri, Some(&body), count).await?;
    let mut responses = Vec::new();
    for r in targets {
        responses.push(Retried {
            message_id: retry(&state, r, &headers).await?,
        });
    }
    Ok(Reply(RetriedPage { responses, cursor }))
}

/// Publishes the entry's message again as a new message, then removes the entry.
async fn retry(
    state: &AppState,
    record: DlqRecord,
    headers: &HeaderMap,
) -> Result<String, ApiError> {
    let now = now_ms();
    let mut message = record.message.clone();
    message.message_id = ids::message_id();
    message.retried = 0;
    message.created_at = now;
    message.not_before = now;
    apply_overrides(&mut message, headers, state, now)?;
    super::publish::accept(state, &message).await?;
    // The new message is stored; failing to remove the entry now would only leave it listed.
    if let Err(e) = state.writer.remove::<DlqRecord>(&record.dlq_id).await {
        tracing::warn!(dlq_id = %record.dlq_id, error = %e, "retried entry not removed from the DLQ");
    }
    tracing::info!(dlq_id = %record.dlq_id, message_id = %message.message_id, "retried from the DLQ");
    Ok(message.message_id)
}

/// `Upstash-*` headers of the retry call override the original settings.
fn apply_overrides(
    m: &mut Envelope,
    h: &HeaderMap,
    state: &AppState,
    now: i64,
) -> Result<(), ApiError> {
    let options = headers::parse_publish(h, &state.limits, now)?;
    let has = |name: &str| h.contains_key(name);
    if has("upstash-method") {
        m.method = options.method;
    }
    if has("upstash-retries") {
        m.max_retries = options.max_retries;
    }
    if has("upstash-retry-delay") {
        m.retry_delay_expression = options.retry_delay;
    }
    if has("upstash-timeout") {
        m.timeout_ms = options
            .timeout
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
    }
    if let Some(nb) = options.not_before {
        m.not_before = nb;
    }
    if has("upstash-label") {
        m.labels = options.labels;
    }
    if options.callback.is_some() {
        m.callback = options.callback;
    }
    if options.failure_callback.is_some() {
        m.failure_callback = options.failure_callback;
    }
    // Forwarded headers of the retry call replace the original ones of the same name. Its own
    // Content-Type is the SDK's, not a setting for the message, so it is not taken.
    for (name, values) in options.forward {
        if name.eq_ignore_ascii_case("content-type") {
            continue;
        }
        m.header.retain(|k, _| !k.eq_ignore_ascii_case(&name));
        m.header.insert(name, values);
    }
    Ok(())
}
