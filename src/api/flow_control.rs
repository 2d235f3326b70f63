//! `/v2/flowControl` and `/v2/globalParallelism`.
//!
//! A key's settings are records on the compacted flow-control topic: the publish API writes the
//! newest message's values there; pause, resume, pin, unpin and reset-rate here write the rest,
//! through `state::writer`. The counters of a `FlowControlInfo` come from this process's view of
//! the events (`state::flow`), so any process answers for any key; the limits themselves are
//! enforced by the process that owns the key. `globalParallelism` is this process's cap on
//! deliveries in flight (`delivery.max_in_flight`) and how many are in flight now.

use std::sync::atomic::Ordering;

use axum::extract::{Path, State};
use axum::http::Uri;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::ApiError;
use super::messages::query_store;
use super::query::Query;
use super::AppState;
use crate::model::flow::FlowControlRecord;
use crate::model::now_ms;

const MILLIS_PER_SECOND: u64 = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/flowControl", get(list))
        .route("/v2/flowControl/", get(list))
        .route("/v2/flowControl/{key}", get(get_one))
        .route(
            "/v2/flowControl/{key}/pause",
            post(|s, p| pause(s, p, true)),
        )
        .route(
            "/v2/flowControl/{key}/resume",
            post(|s, p| pause(s, p, false)),
        )
        .route("/v2/flowControl/{key}/pin", post(pin))
        .route("/v2/flowControl/{key}/unpin", post(unpin))
        .route("/v2/flowControl/{key}/resetRate", post(reset_rate))
        .route("/v2/globalParallelism", get(global_parallelism))
}

/// A `FlowControlInfo` (every field both SDKs read; unlimited parts are reported as 0).
async fn render(state: &AppState, r: &FlowControlRecord) -> Result<Value, ApiError> {
    let now = now_ms();
    let counters = state.views().flow.counters(&r.key, now);
    let key = r.key.clone();
    let pending = query_store(&state.views().store, move |s| s.flow_pending(&key)).await?;
    let in_flight = u64::try_from(counters.in_flight).unwrap_or(u64::MAX);
    Ok(json!({
        "flowControlKey": r.key,
        "waitListSize": pending.saturating_sub(in_flight),
        "parallelismMax": r.parallelism.unwrap_or(0),
        "parallelismCount": counters.in_flight,
        "rateMax": r.rate.unwrap_or(0),
        "rateCount": counters.window_count,
        "ratePeriod": r.period_ms / MILLIS_PER_SECOND,
        "ratePeriodStart": counters.window_start_ms / 1000,
        "isPaused": r.paused,
        "isPinnedParallelism": r.pinned_parallelism,
        "isPinnedRate": r.pinned_rate,
    }))
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
) -> Result<Json<Value>, ApiError> {
    record.updated_at = now_ms().max(before + 1);
    state
        .writer
        .put(record.clone())
        .await
        .map_err(|e| ApiError::not_stored("flow-control change", &e))?;
    Ok(Json(render(state, &record).await?))
}

async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut out = Vec::new();
    for r in state.views().flow.list() {
        out.push(render(&state, &r).await?);
    }
    Ok(Json(Value::Array(out)))
}

async fn get_one(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let r = find(&state, &key)?;
    Ok(Json(render(&state, &r).await?))
}

async fn pause(
    State(state): State<AppState>,
    Path(key): Path<String>,
    paused: bool,
) -> Result<Json<Value>, ApiError> {
    let r = find(&state, &key)?;
    tracing::info!(key, paused, "flow-control key paused or resumed");
    let before = r.updated_at;
    save(&state, FlowControlRecord { paused, ..r }, before).await
}

/// `?parallelism=&rate=&period=` (integers; period in seconds): pins what is given.
async fn pin(
    State(state): State<AppState>,
    Path(key): Path<String>,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
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
async fn unpin(
    State(state): State<AppState>,
    Path(key): Path<String>,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
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
async fn reset_rate(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<Value>, ApiError> {
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

async fn global_parallelism(State(state): State<AppState>) -> Json<Value> {
    let (max, in_flight) = &state.global_parallelism;
    Json(json!({
        "parallelismMax": max,
        "parallelismCount": in_flight.load(Ordering::Relaxed),
    }))
}
