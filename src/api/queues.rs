//! `/v2/queues`: FIFO queues: upsert, list, get, delete, pause, resume.
//!
//! Settings are records on the compacted queues topic, written through (`state::writer`), so this
//! process answers with its own change at once and every other process sees it within its tail
//! lag. `lag` is the number of the queue's messages not yet delivered, failed or cancelled, from
//! the local view of the events. Deleting a queue removes its settings; messages already in it are
//! still delivered, in order, as in a new queue (parallelism 1); an enqueue re-creates it.

use super::limits::BoundedBody;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::messages::query_store;
use super::AppState;
use crate::model::now_ms;
use crate::model::queue::{validate_name, QueueRecord, DEFAULT_PARALLELISM};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/queues", get(list).post(upsert))
        .route("/v2/queues/", get(list).post(upsert))
        .route("/v2/queues/{name}", get(get_one).delete(delete_one))
        .route(
            "/v2/queues/{name}/pause",
            post(|s, p| set_paused(s, p, true)),
        )
        .route(
            "/v2/queues/{name}/resume",
            post(|s, p| set_paused(s, p, false)),
        )
}

/// The body of an upsert, as both SDKs send it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Upsert {
    queue_name: String,
    #[serde(default)]
    parallelism: Option<u32>,
    #[serde(default)]
    paused: Option<bool>,
}

/// A queue as the SDKs read it (Python requires all six keys).
async fn render(state: &AppState, q: QueueRecord) -> Result<Value, ApiError> {
    let name = q.name.clone();
    let lag = query_store(&state.views().store, move |s| s.queue_lag(&name)).await?;
    Ok(json!({
        "name": q.name,
        "parallelism": q.parallelism,
        "createdAt": q.created_at,
        "updatedAt": q.updated_at,
        "lag": lag,
        "paused": q.paused,
    }))
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

async fn upsert(
    State(state): State<AppState>,
    BoundedBody(body): BoundedBody,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(render(&state, record).await?))
}

async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut out = Vec::new();
    for q in state.views().queues.list() {
        out.push(render(&state, q).await?);
    }
    Ok(Json(Value::Array(out)))
}

async fn get_one(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let q = find(&state, &name)?;
    Ok(Json(render(&state, q).await?))
}

async fn delete_one(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    find(&state, &name)?;
    stored(state.writer.remove::<QueueRecord>(&name).await)?;
    tracing::info!(queue = %name, "queue deleted");
    Ok(Json(json!({ "deleted": 1 })))
}

async fn set_paused(
    State(state): State<AppState>,
    Path(name): Path<String>,
    paused: bool,
) -> Result<Json<Value>, ApiError> {
    let existing = find(&state, &name)?;
    let record = QueueRecord {
        paused,
        updated_at: now_ms().max(existing.updated_at + 1),
        ..existing
    };
    stored(state.writer.put(record.clone()).await)?;
    tracing::info!(queue = %name, paused, "queue paused or resumed");
    Ok(Json(render(&state, record).await?))
}
