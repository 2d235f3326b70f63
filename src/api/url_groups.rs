//! `/v2/topics`: URL groups (called "topics" on the wire): add and remove endpoints, list, get,
//! delete.
//!
//! A group is one record on the compacted URL-groups topic, written through `state::writer`.
//! Adding endpoints creates the group when missing; an endpoint with the URL (or the name) of one
//! already in the group replaces it. Removing takes each endpoint by name or URL (a JSON body on a
//! DELETE, as both SDKs send it); removing the last endpoint deletes the group. Deleting a group
//! does not cancel messages already published to it.

use super::limits::BoundedBody;
use axum::extract::{Path, State};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::model::now_ms;
use crate::model::queue::validate_name;
use crate::model::url_group::{Endpoint, EndpointRef, UrlGroupRecord};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/topics", get(list))
        .route("/v2/topics/", get(list))
        .route("/v2/topics/{name}", get(get_one).delete(delete_group))
        .route(
            "/v2/topics/{name}/endpoints",
            post(add_endpoints).delete(remove_endpoints),
        )
        .route("/v2/topics/{name}/endpoints/", delete(remove_endpoints))
}

#[derive(Debug, Deserialize)]
struct AddBody {
    endpoints: Vec<Endpoint>,
}

#[derive(Debug, Deserialize)]
struct RemoveBody {
    endpoints: Vec<EndpointRef>,
}

/// A group as the SDKs read it (Python requires name, createdAt, updatedAt, endpoints[].url).
fn render(g: &UrlGroupRecord) -> Value {
    json!({
        "name": g.name,
        "createdAt": g.created_at,
        "updatedAt": g.updated_at,
        "endpoints": g.endpoints,
    })
}

fn body<T: serde::de::DeserializeOwned>(bytes: &[u8], shape: &str) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("body must be JSON {shape}: {e}")))
}

fn find(state: &AppState, name: &str) -> Result<UrlGroupRecord, ApiError> {
    state
        .views()
        .url_groups
        .get(name)
        .ok_or_else(|| ApiError::NotFound(format!("URL group {name:?} not found")))
}

fn stored<T>(r: Result<T, rdkafka::error::KafkaError>) -> Result<T, ApiError> {
    r.map_err(|e| ApiError::not_stored("URL group change", &e))
}

async fn add_endpoints(
    State(state): State<AppState>,
    Path(name): Path<String>,
    BoundedBody(bytes): BoundedBody,
) -> Result<Json<Value>, ApiError> {
    validate_name("URL group name", &name).map_err(ApiError::BadRequest)?;
    let AddBody { endpoints } = body(&bytes, r#"{"endpoints":[{"url","name"?}]}"#)?;
    if endpoints.is_empty() {
        return Err(ApiError::BadRequest("endpoints must not be empty".into()));
    }
    let now = now_ms();
    let existing = state.views().url_groups.get(&name);
    let fresh = existing.is_none();
    let mut group = existing.unwrap_or_else(|| UrlGroupRecord::new(&name, now));
    group.add(endpoints, now).map_err(ApiError::BadRequest)?;
    if fresh {
        group.updated_at = group.created_at;
    }
    stored(state.writer.put(group.clone()).await)?;
    tracing::info!(group = %name, endpoints = group.endpoints.len(), "URL group endpoints added");
    Ok(Json(render(&group)))
}

async fn remove_endpoints(
    State(state): State<AppState>,
    Path(name): Path<String>,
    BoundedBody(bytes): BoundedBody,
) -> Result<Json<Value>, ApiError> {
    let RemoveBody { endpoints } = body(&bytes, r#"{"endpoints":[{"name"?,"url"?}]}"#)?;
    if let Some(bad) = endpoints
        .iter()
        .find(|e| e.name.is_none() && e.url.is_none())
    {
        return Err(ApiError::BadRequest(format!(
            "each endpoint to remove needs a name or a url: {bad:?}"
        )));
    }
    let mut group = find(&state, &name)?;
    let removed = group.remove(&endpoints, now_ms());
    if removed == 0 {
        return Ok(Json(json!({ "removed": 0 })));
    }
    if group.endpoints.is_empty() {
        stored(state.writer.remove::<UrlGroupRecord>(&name).await)?;
        tracing::info!(group = %name, "last endpoint removed; URL group deleted");
    } else {
        stored(state.writer.put(group.clone()).await)?;
    }
    Ok(Json(json!({ "removed": removed })))
}

async fn list(State(state): State<AppState>) -> Json<Value> {
    Json(Value::Array(
        state.views().url_groups.list().iter().map(render).collect(),
    ))
}

async fn get_one(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(render(&find(&state, &name)?)))
}

async fn delete_group(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    find(&state, &name)?;
    stored(state.writer.remove::<UrlGroupRecord>(&name).await)?;
    tracing::info!(group = %name, "URL group deleted");
    Ok(Json(json!({ "deleted": 1 })))
}
