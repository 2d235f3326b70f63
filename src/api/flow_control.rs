//! `/v2/flowControl` and `/v2/globalParallelism`.
//!
//! A key's settings are records on the compacted flow-control topic: the publish API writes the
//! newest message's values there; pause, resume, pin, unpin and reset-rate here write the rest,
//! through `state::writer`. The counters of a `FlowControlInfo` come from this process's view of
//! the events (`state::flow`), so any process answers for any key; the limits themselves are
//! enforced by the process that owns the key. `globalParallelism` is this process's cap on
//! deliveries in flight (`delivery.max_in_flight`) and how many are in flight now.

use std::sync::atomic::Ordering;

use super::extract::Path;
use axum::extract::State;
use axum::http::Uri;
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::messages::query_store;
use super::query::Query;
use super::render::Reply;
use super::AppState;
use crate::model::flow::FlowControlRecord;
use crate::model::now_ms;

const MILLIS_PER_SECOND: u64 = 1000;
const MILLIS_PER_SECOND_I64: i64 = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/flowControl", get(list))
        .route("/v2/flowControl/", get(list))
        .route("/v2/flowControl/{key}", get(get_one))
        .route("/v2/flowControl/{key}/pause", post(pause))
        .route("/v2/flowControl/{key}/resume", post(resume))
        .route("/v2/flowControl/{key}/pin", post(pin))
        .route("/v2/flowControl/{key}/unpin", post(unpin))
        .route("/v2/flowControl/{key}/resetRate", post(reset_rate))
        .route("/v2/globalParallelism", get(global_parallelism))
}

/// A `FlowControlInfo` (every field both SDKs read; unlimited parts are reported as 0).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowControlInfo {
    pub flow_control_key: String,
    /// Messages waiting for a delivery slot.
    pub wait_list_size: u64,
    /// Deliveries in flight at most (0: unlimited).
    pub parallelism_max: u32,
    /// Deliveries in flight now.
    pub parallelism_count: usize,
    /// Delivery starts per period at most (0: unlimited).
    pub rate_max: u32,
    /// Delivery starts in the current period.
    pub rate_count: usize,
    /// Length of the rate period (seconds).
    pub rate_period: u64,
    /// Start of the current period (unix seconds).
    pub rate_period_start: i64,
    pub is_paused: bool,
    pub is_pinned_parallelism: bool,
    pub is_pinned_rate: bool,
}

/// This process's cap on deliveries in flight, and how many are in flight now.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GlobalParallelism {
    pub parallelism_max: usize,
    pub parallelism_count: usize,
}

/// `?parallelism=&rate=&period=` of a pin (read by `Query`; only describes them in the OpenAPI
/// document, hence never built).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct PinParams {
    /// Pins the parallelism.
    #[param(nullable = false, minimum = 1)]
    parallelism: Option<u32>,
    /// Pins the rate.
    #[param(nullable = false, minimum = 1)]
    rate: Option<u32>,
    /// Pins the rate period (seconds).
    #[param(nullable = false, minimum = 1)]
    period: Option<u32>,
}

/// `?parallelism=<bool>&rate=<bool>` of an unpin (only describes them, hence never built).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct UnpinParams {
    /// Unpins the parallelism.
    #[param(nullable = false)]
    parallelism: Option<bool>,
    /// Unpins the rate and period.
    #[param(nullable = false)]
    rate: Option<bool>,
}

async fn render(state: &AppState, r: &FlowControlRecord) -> Result<FlowControlInfo, ApiError> {
    let now = now_ms();
    let counters = state.views().flow.counters(&r.key, now);
    let key = r.key.clone();
    let pending = query_store(&state.views().store, move |s| s.flow_pending(&key)).await?;
    let in_flight = u64::try_from(counters.in_flight).unwrap_or(u64::MAX);
    Ok(FlowControlInfo {
        flow_control_key: r.key.clone(),
        wait_list_size: pending.saturating_sub(in_flight),
        parallelism_max: r.parallelism.unwrap_or(0),
        parallelism_count: counters.in_flight,
        rate_max: r.rate.unwrap_or(0),
        rate_count: counters.window_count,
        rate_period: r.period_ms / MILLIS_PER_SECOND,
        rate_period_start: counters.window_start_ms / MILLIS_PER_SECOND_I64,
        is_paused: r.paused,
        is_pinned_parallelism: r.pinned_parallelism,
        is_pinned_rate: r.pinned_rate,
    })
}

fn find(state: &AppState, key: &str) -> Result<FlowControlRecord, ApiError> {
    state
        .views()
        .flow
        .get(key)
        .ok_or_else(|| ApiError::NotFound(format!("flow-control key {key:?} not found")))
}

/// Writes a changed settings record and answers with the key's info.
async fn save(
    state: &AppState,
    mut record: FlowControlRecord,
    before: i64,
) -> Result<Reply<FlowControlInfo>, ApiError> {
    record.updated_at = now_ms().max(before + 1);
    state
        .writer
        .put(record.clone())
        .await
        .map_err(|e| ApiError::not_stored("flow-control change", &e))?;
    Ok(Reply(render(state, &record).await?))
}

/// Every flow-control key.
#[utoipa::path(get, path = "/v2/flowControl", operation_id = "listFlowControlKeys", tag = "flowControl",
    responses((status = 200, description = "Every key", body = Vec<FlowControlInfo>)))]
pub async fn list(State(state): State<AppState>) -> Result<Reply<Vec<FlowControlInfo>>, ApiError> {
    let mut out = Vec::new();
    for r in state.views().flow.list() {
        out.push(render(&state, &r).await?);
    }
    Ok(Reply(out))
}

/// One flow-control key.
#[utoipa::path(get, path = "/v2/flowControl/{key}", operation_id = "getFlowControlKey", tag = "flowControl",
    params(("key" = String, Path, description = "Flow-control key", example = "tenant-1")),
    responses(
        (status = 200, description = "The key", body = FlowControlInfo),
        (status = 404, description = "No such key", body = ErrorBody),
    ))]
pub async fn get_one(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Reply<FlowControlInfo>, ApiError> {
    let r = find(&state, &key)?;
    Ok(Reply(render(&state, &r).await?))
}

/// Pauses deliveries of a key.
#[utoipa::path(post, path = "/v2/flowControl/{key}/pause", operation_id = "pauseFlowControlKey", tag = "flowControl",
    params(("key" = String, Path, description = "Flow-control key", example = "tenant-1")),
    responses(
        (status = 200, description = "Paused", body = FlowControlInfo),
        (status = 404, description = "No such key", body = ErrorBody),
    ))]
pub async fn pause(
    state: State<AppState>,
    key: Path<String>,
) -> Result<Reply<FlowControlInfo>, ApiError> {
    set_paused(state, key, true).await
}

/// Resumes deliveries of a key.
#[utoipa::path(post, path = "/v2/flowControl/{key}/resume", operation_id = "resumeFlowControlKey", tag = "flowControl",
    params(("key" = String, Path, description = "Flow-control key", example = "tenant-1")),
    responses(
        (status = 200, description = "Resumed", body = FlowControlInfo),
        (status = 404, description = "No such key", body = ErrorBody),
    ))]
pub async fn resume(
    state: State<AppState>,
    key: Path<String>,
) -> Result<Reply<FlowControlInfo>, ApiError> {
    set_paused(state, key, false).await
}

async fn set_paused(
    State(state): State<AppState>,
    Path(key): Path<String>,
    paused: bool,
) -> Result<Reply<FlowControlInfo>, ApiError> {
    let r = find(&state, &key)?;
    tracing::info!(key, paused, "flow-control key paused or resumed");
    let before = r.updated_at;
    save(&state, FlowControlRecord { paused, ..r }, before).await
}

/// `?parallelism=&rate=&period=` (integers; period in seconds): pins what is given.
#[utoipa::path(post, path = "/v2/flowControl/{key}/pin", operation_id = "pinFlowControlKey", tag = "flowControl",
    params(("key" = String, Path, description = "Flow-control key", example = "tenant-1"), PinParams),
    responses(
        (status = 200, description = "Pinned", body = FlowControlInfo),
        (status = 400, description = "None given, or a value out of range", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
    ))]
pub async fn pin(
    State(state): State<AppState>,
    Path(key): Path<String>,
    uri: Uri,
) -> Result<Reply<FlowControlInfo>, ApiError> {
    let mut r = find(&state, &key)?;
    let before = r.updated_at;
    let q = Query::parse(&uri);
    let positive = |name: &str, max: u32| -> Result<Option<u32>, ApiError> {
        let Some(n) = q.int(name)? else {
            return Ok(None);
        };
        if n < 1 || n > i64::from(max) {
            return Err(ApiError::BadRequest(format!(
                "{name} must be between 1 and {max}"
            )));
        }
        Ok(Some(u32::try_from(n).unwrap_or(max)))
    };
    let limits = state.limits.flow;
    let parallelism = positive("parallelism", limits.max_parallelism)?;
    let rate = positive("rate", limits.max_rate)?;
    let max_period_secs = u32::try_from(limits.max_period.as_secs()).unwrap_or(u32::MAX);
    let period = positive("period", max_period_secs)?;
    if parallelism.is_none() && rate.is_none() && period.is_none() {
        return Err(ApiError::BadRequest(
            "pin needs at least one of parallelism, rate, period".into(),
        ));
    }
    if let Some(p) = parallelism {
        r.parallelism = Some(p);
        r.pinned_parallelism = true;
    }
    if rate.is_some() || period.is_some() {
        if let Some(rate) = rate {
            r.rate = Some(rate);
        }
        if let Some(period) = period {
            r.period_ms = u64::from(period) * MILLIS_PER_SECOND;
        }
        r.pinned_rate = true;
        // Pinning resets the rate state.
        r.rate_reset_at = Some(now_ms());
    }
    tracing::info!(key, ?parallelism, ?rate, ?period, "flow-control key pinned");
    save(&state, r, before).await
}

/// `?parallelism=<bool>&rate=<bool>`: unpins those; the last pinned values hold until a message
/// brings others.
#[utoipa::path(post, path = "/v2/flowControl/{key}/unpin", operation_id = "unpinFlowControlKey", tag = "flowControl",
    params(("key" = String, Path, description = "Flow-control key", example = "tenant-1"), UnpinParams),
    responses(
        (status = 200, description = "Unpinned", body = FlowControlInfo),
        (status = 400, description = "A value that is not true or false", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
    ))]
pub async fn unpin(
    State(state): State<AppState>,
    Path(key): Path<String>,
    uri: Uri,
) -> Result<Reply<FlowControlInfo>, ApiError> {
    let mut r = find(&state, &key)?;
    let before = r.updated_at;
    let q = Query::parse(&uri);
    let flag = |name: &str| -> Result<bool, ApiError> {
        match q.one(name).as_deref() {
            None => Ok(false),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
            Some(v) => Err(ApiError::BadRequest(format!(
                "{name} must be true or false, got {v:?}"
            ))),
        }
    };
    if flag("parallelism")? {
        r.pinned_parallelism = false;
    }
    if flag("rate")? {
        r.pinned_rate = false;
    }
    tracing::info!(key, "flow-control key unpinned");
    save(&state, r, before).await
}

/// Zeroes the rate count and starts a new period now.
#[utoipa::path(post, path = "/v2/flowControl/{key}/resetRate", operation_id = "resetFlowControlRate", tag = "flowControl",
    params(("key" = String, Path, description = "Flow-control key", example = "tenant-1")),
    responses(
        (status = 200, description = "Rate reset", body = FlowControlInfo),
        (status = 404, description = "No such key", body = ErrorBody),
    ))]
pub async fn reset_rate(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Reply<FlowControlInfo>, ApiError> {
    let r = find(&state, &key)?;
    let before = r.updated_at;
    tracing::info!(key, "flow-control rate reset");
    save(
        &state,
        FlowControlRecord {
            rate_reset_at: Some(now_ms()),
            ..r
        },
        before,
    )
    .await
}

/// This process's cap on deliveries in flight, and how many are in flight now.
#[utoipa::path(get, path = "/v2/globalParallelism", operation_id = "getGlobalParallelism", tag = "flowControl",
    responses((status = 200, description = "The cap and the count", body = GlobalParallelism)))]
pub async fn global_parallelism(State(state): State<AppState>) -> Reply<GlobalParallelism> {
    let (max, in_flight) = &state.global_parallelism;
    Reply(GlobalParallelism {
        parallelism_max: *max,
        parallelism_count: in_flight.load(Ordering::Relaxed),
    })
}
