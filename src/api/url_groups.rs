//! `/v2/topics`: URL groups (called "topics" on the wire): add and remove endpoints, list, get,
//! delete.
//!
//! A group is one record on the compacted URL-groups topic, written through `state::writer`.
//! Adding endpoints creates the group when missing; an endpoint with the URL (or the name) of one
//! already in the group replaces it. Removing takes each endpoint by name or URL (a JSON body on a
//! DELETE, as both SDKs send it); removing the last endpoint deletes the group. Deleting a group
//! does not cancel messages already published to it.

use super::extract::Path;
use super::limits::BoundedBody;
use axum::extract::State;
use axum::routing::{delete, get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::render::{Deleted, Reply};
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

/// Endpoints to add (an endpoint with the URL or name of one in the group replaces it).
#[derive(Debug, Deserialize, ToSchema)]
pub struct AddBody {
    endpoints: Vec<Endpoint>,
}

/// Endpoints to remove, each by name, URL or both.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RemoveBody {
    endpoints: Vec<EndpointRef>,
}

/// A URL group as the SDKs read it (Python requires name, createdAt, updatedAt,
/// endpoints[].url).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UrlGroupView {
    pub name: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub endpoints: Vec<Endpoint>,
}

/// `{"removed": n}`: how many endpoints were removed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Removed {
    pub removed: usize,
}

fn render(g: &UrlGroupRecord) -> UrlGroupView {
    UrlGroupView {
        name: g.name.clone(),
        created_at: g.created_at,
        updated_at: g.updated_at,
        endpoints: g.endpoints.clone(),
    }
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

/// Adds endpoints to a URL group, creating it when missing.
#[utoipa::path(post, path = "/v2/topics/{name}/endpoints", operation_id = "addEndpoints", tag = "urlGroups",
    params(("name" = String, Path, description = "URL group name", example = "subscribers")),
    request_body = AddBody,
    responses(
        (status = 200, description = "The group as saved", body = UrlGroupView),
        (status = 400, description = "A bad body, name or endpoint", body = ErrorBody),
    ))]
pub async fn add_endpoints(
    State(state): State<AppState>,
    Path(name): Path<String>,
    BoundedBody(bytes): BoundedBody,
) -> Result<Reply<UrlGroupView>, ApiError> {
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
    Ok(Reply(render(&group)))
}

/// Removes endpoints from a URL group; removing the last deletes the group.
#[utoipa::path(delete, path = "/v2/topics/{name}/endpoints", operation_id = "removeEndpoints", tag = "urlGroups",
    params(("name" = String, Path, description = "URL group name", example = "subscribers")),
    request_body = RemoveBody,
    responses(
        (status = 200, description = "How many were removed", body = Removed),
        (status = 400, description = "A bad body", body = ErrorBody),
        (status = 404, description = "No such URL group", body = ErrorBody),
    ))]
pub async fn remove_endpoints(
    State(state): State<AppState>,
    Path(name): Path<String>,
    BoundedBody(bytes): BoundedBody,
) -> Result<Reply<Removed>, ApiError> {
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
        return Ok(Reply(Removed { removed: 0 }));
    }
    if group.endpoints.is_empty() {
        stored(state.writer.remove::<UrlGroupRecord>(&name).await)?;
        tracing::info!(group = %name, "last endpoint removed; URL group deleted");
    } else {
        stored(state.writer.put(group.clone()).await)?;
    }
    Ok(Reply(Removed { removed }))
}

/// Every URL group.
#[utoipa::path(get, path = "/v2/topics", operation_id = "listUrlGroups", tag = "urlGroups",
    responses((status = 200, description = "Every URL group", body = Vec<UrlGroupView>)))]
pub async fn list(State(state): State<AppState>) -> Reply<Vec<UrlGroupView>> {
    Reply(state.views().url_groups.list().iter().map(render).collect())
}

/// One URL group.
#[utoipa::path(get, path = "/v2/topics/{name}", operation_id = "getUrlGroup", tag = "urlGroups",
    params(("name" = String, Path, description = "URL group name", example = "subscribers")),
    responses(
        (status = 200, description = "The group", body = UrlGroupView),
        (status = 404, description = "No such URL group", body = ErrorBody),
    ))]
pub async fn get_one(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Reply<UrlGroupView>, ApiError> {
    Ok(Reply(render(&find(&state, &name)?)))
}

/// Deletes a URL group (messages already published to it stay).
#[utoipa::path(delete, path = "/v2/topics/{name}", operation_id = "deleteUrlGroup", tag = "urlGroups",
    params(("name" = String, Path, description = "URL group name", example = "subscribers")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 404, description = "No such URL group", body = ErrorBody),
    ))]
pub async fn delete_group(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Reply<Deleted>, ApiError> {
    find(&state, &name)?;
    stored(state.writer.remove::<UrlGroupRecord>(&name).await)?;
    tracing::info!(group = %name, "URL group deleted");
    Ok(Reply(Deleted { deleted: 1 }))
}
