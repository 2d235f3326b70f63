//! `/v2/queues`: FIFO queues: upsert, list, get, delete, pause, resume.
//!
//! Settings are records on the compacted queues topic, written through (`state::writer`), so this
//! process answers with its own change at once and every other process sees it within its tail
//! lag. `lag` is the number of the queue's messages not yet delivered, failed or cancelled, from
//! the local view of the events. Deleting a queue removes its settings; messages already in it are
//! still delivered, in order, as in a new queue (parallelism 1); an enqueue re-creates it.

use super::extract::Path;
use super::limits::BoundedBody;
use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::messages::query_store;
use super::render::{Deleted, Reply};
use super::AppState;
use crate::model::now_ms;
use crate::model::queue::{validate_name, QueueRecord, DEFAULT_PARALLELISM};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/queues", get(list).post(upsert))
        .route("/v2/queues/", get(list).post(upsert))
        .route("/v2/queues/{name}", get(get_one).delete(delete_one))
        .route("/v2/queues/{name}/pause", post(pause))
        .route("/v2/queues/{name}/resume", post(resume))
}

/// The body of an upsert, as both SDKs send it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Upsert {
    queue_name: String,
    /// Messages of the queue delivered at once at most (default 1).
    #[serde(default)]
    parallelism: Option<u32>,
    /// Default: unchanged (false for a new queue).
    #[serde(default)]
    paused: Option<bool>,
}

/// A queue as the SDKs read it (Python requires all six keys).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueView {
    pub name: String,
    pub parallelism: u32,
    pub created_at: i64,
    pub updated_at: i64,
    /// Messages of the queue not yet delivered, failed or cancelled.
    pub lag: u64,
    pub paused: bool,
}

async fn render(state: &AppState, q: QueueRecord) -> Result<QueueView, ApiError> {
    let name = q.name.clone();
    let lag = query_store(&state.views().store, move |s| s.queue_lag(&name)).await?;
    Ok(QueueView {
        name: q.name,
        parallelism: q.parallelism,
        created_at: q.created_at,
        updated_at: q.updated_at,
        lag,
        paused: q.paused,
    })
}

fn stored<T>(r: Result<T, rdkafka::error::KafkaError>) -> Result<T, ApiError> {
    r.map_err(|e| ApiError::not_stored("queue change", &e))
}

fn find(state: &AppState, name: &str) -> Result<QueueRecord, ApiError> {
    state
        .views()
        .queues
        .get(name)
        .ok_or_else(|| ApiError::NotFound(format!("queue {name:?} not found")))
}

/// Creates a queue or changes its settings.
#[utoipa::path(post, path = "/v2/queues", operation_id = "upsertQueue", tag = "queues",
    request_body = Upsert,
    responses(
        (status = 200, description = "The queue as saved", body = QueueView),
        (status = 400, description = "A bad body or queue name", body = ErrorBody),
        (status = 412, description = "Parallelism above the configured maximum", body = ErrorBody),
    ))]
pub async fn upsert(
    State(state): State<AppState>,
    BoundedBody(body): BoundedBody,
) -> Result<Reply<QueueView>, ApiError> {
    let request: Upsert = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "body must be JSON {{\"queueName\", \"parallelism\"?, \"paused\"?}}: {e}"
        ))
    })?;
    validate_name("queueName", &request.queue_name).map_err(ApiError::BadRequest)?;
    let parallelism = request.parallelism.unwrap_or(DEFAULT_PARALLELISM);
    if parallelism == 0 {
        return Err(ApiError::BadRequest(
            "parallelism must be at least 1".into(),
        ));
    }
    if parallelism > state.max_queue_parallelism {
        return Err(ApiError::PreconditionFailed(format!(
            "parallelism {parallelism} is above the maximum of {}",
            state.max_queue_parallelism
        )));
    }
    let now = now_ms();
    let record = match state.views().queues.get(&request.queue_name) {
        Some(existing) => QueueRecord {
            parallelism,
            paused: request.paused.unwrap_or(existing.paused),
            updated_at: now.max(existing.updated_at + 1),
            ..existing
        },
        None => QueueRecord::new(
            &request.queue_name,
            parallelism,
            request.paused.unwrap_or(false),
            now,
        ),
    };
    tracing::info!(queue = %record.name, parallelism, paused = record.paused, "queue upserted");
    stored(state.writer.put(record.clone()).await)?;
    Ok(Reply(render(&state, record).await?))
}

/// Every queue.
#[utoipa::path(get, path = "/v2/queues", operation_id = "listQueues", tag = "queues",
    responses((status = 200, description = "Every queue", body = Vec<QueueView>)))]
pub async fn list(State(state): State<AppState>) -> Result<Reply<Vec<QueueView>>, ApiError> {
    let mut out = Vec::new();
    for q in state.views().queues.list() {
        out.push(render(&state, q).await?);
    }
    Ok(Reply(out))
}

/// One queue.
#[utoipa::path(get, path = "/v2/queues/{name}", operation_id = "getQueue", tag = "queues",
    params(("name" = String, Path, description = "Queue name", example = "orders")),
    responses(
        (status = 200, description = "The queue", body = QueueView),
        (status = 404, description = "No such queue", body = ErrorBody),
    ))]
pub async fn get_one(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Reply<QueueView>, ApiError> {
    let q = find(&state, &name)?;
    Ok(Reply(render(&state, q).await?))
}

/// Deletes a queue's settings (its messages are still delivered, in order).
#[utoipa::path(delete, path = "/v2/queues/{name}", operation_id = "deleteQueue", tag = "queues",
    params(("name" = String, Path, description = "Queue name", example = "orders")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 404, description = "No such queue", body = ErrorBody),
    ))]
pub async fn delete_one(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Reply<Deleted>, ApiError> {
    find(&state, &name)?;
    stored(state.writer.remove::<QueueRecord>(&name).await)?;
    tracing::info!(queue = %name, "queue deleted");
    Ok(Reply(Deleted { deleted: 1 }))
}

/// Pauses a queue: its messages wait until it is resumed.
#[utoipa::path(post, path = "/v2/queues/{name}/pause", operation_id = "pauseQueue", tag = "queues",
    params(("name" = String, Path, description = "Queue name", example = "orders")),
    responses(
        (status = 200, description = "Paused", body = QueueView),
        (status = 404, description = "No such queue", body = ErrorBody),
    ))]
pub async fn pause(
    state: State<AppState>,
    name: Path<String>,
) -> Result<Reply<QueueView>, ApiError> {
    set_paused(state, name, true).await
}

/// Resumes a paused queue.
#[utoipa::path(post, path = "/v2/queues/{name}/resume", operation_id = "resumeQueue", tag = "queues",
    params(("name" = String, Path, description = "Queue name", example = "orders")),
    responses(
        (status = 200, description = "Resumed", body = QueueView),
        (status = 404, description = "No such queue", body = ErrorBody),
    ))]
pub async fn resume(
    state: State<AppState>,
    name: Path<String>,
) -> Result<Reply<QueueView>, ApiError> {
    set_paused(state, name, false).await
}

async fn set_paused(
    State(state): State<AppState>,
    Path(name): Path<String>,
    paused: bool,
) -> Result<Reply<QueueView>, ApiError> {
    let existing = find(&state, &name)?;
    let record = QueueRecord {
        paused,
        updated_at: now_ms().max(existing.updated_at + 1),
        ..existing
    };
    stored(state.writer.put(record.clone()).await)?;
    tracing::info!(queue = %name, paused, "queue paused or resumed");
    Ok(Reply(render(&state, record).await?))
}
