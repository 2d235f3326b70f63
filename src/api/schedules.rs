//! `/v2/schedules`: create (or update) a cron schedule, list, get, delete, pause, resume.
//!
//! `POST /v2/schedules/{destination}` takes the raw destination like a publish (a URL or a URL
//! group name), `Upstash-Cron` (five fields, UTC, optional `CRON_TZ=<zone> ` prefix),
//! `Upstash-Schedule-Id` (updates that schedule in place when it exists), `Upstash-Queue-Name`
//! (each fire enqueues there) and every publish option, which each fire carries; `Upstash-Delay`
//! delays each fired message. The settings are a record on the compacted schedules topic; the
//! scheduler (`src/schedule/`) fires them. Pause and resume accept PATCH (the SDKs) and POST (the
//! docs). A schedule JSON carries every field the SDKs read, with `lastScheduleTime`,
//! `nextScheduleTime` and `lastScheduleStates` from the schedule's last fire.

use axum::extract::{Path, Request, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::limits::read_body;
use super::messages::query_store;
use super::publish::caller_ip;
use super::render::schedule as schedule_json;
use super::AppState;
use crate::model::destination::{self, Destination};
use crate::model::event::State as EventState;
use crate::model::headers::{self, SCHEDULE_ONLY};
use crate::model::queue::validate_name;
use crate::model::schedule::{
    validate_id, CronSpec, ScheduleFire, ScheduleRecord, SCHEDULE_ID_PREFIX, SCHEDULE_VERSION,
};
use crate::model::{ids, now_ms};

/// Path prefix in front of a schedule's raw destination.
pub const SCHEDULES_PREFIX: &str = "/v2/schedules/";
/// Headers a schedule does not take: a schedule has no single due time and is not deduplicated.
const NOT_ON_SCHEDULES: [&str; 3] = [
    "upstash-not-before",
    "upstash-deduplication-id",
    "upstash-content-based-deduplication",
];

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/schedules", get(list))
        .route("/v2/schedules/", get(list))
        .route(
            "/v2/schedules/{*rest}",
            post(post_rest)
                .patch(patch_rest)
                .get(get_one)
                .delete(delete_one),
        )
}

/// `<id>/pause` or `<id>/resume` (an id has no `/` and no `:`, so a destination URL never looks
/// like one).
fn pause_action(rest: &str) -> Option<(String, bool)> {
    let (id, action) = rest.rsplit_once('/')?;
    validate_id(id).ok()?;
    match action {
        "pause" => Some((id.to_string(), true)),
        "resume" => Some((id.to_string(), false)),
        _ => None,
    }
}

/// POST: pause or resume (the docs' form), else create.
async fn post_rest(
    State(state): State<AppState>,
    Path(rest): Path<String>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    match pause_action(&rest) {
        Some((id, paused)) => set_paused(state, id, paused).await,
        None => create(state, request).await,
    }
}

/// PATCH: pause or resume (the SDKs' form).
async fn patch_rest(
    State(state): State<AppState>,
    Path(rest): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (id, paused) = pause_action(&rest)
        .ok_or_else(|| ApiError::NotFound(format!("no route for PATCH /v2/schedules/{rest}")))?;
    set_paused(state, id, paused).await
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    h.get(name)
        .map(|v| {
            v.to_str().map(str::trim).map_err(|_| {
                ApiError::BadRequest(format!("header {name} must be visible ASCII text"))
            })
        })
        .transpose()
}

async fn create(state: AppState, request: Request) -> Result<Json<Value>, ApiError> {
    let caller_ip = caller_ip(&request);
    let (parts, body) = request.into_parts();
    let destination = destination::from_uri(&parts.uri, SCHEDULES_PREFIX)?;
    let h = &parts.headers;
    let cron = header(h, "upstash-cron")?
        .ok_or_else(|| ApiError::BadRequest("Upstash-Cron is required".into()))?
        .to_string();
    CronSpec::parse(&cron).map_err(|e| ApiError::BadRequest(format!("Upstash-Cron: {e}")))?;
    let id = match header(h, "upstash-schedule-id")? {
        Some(id) => {
            validate_id(id).map_err(ApiError::BadRequest)?;
            id.to_string()
        }
        None => ids::random_with_prefix(SCHEDULE_ID_PREFIX),
    };
    let queue_name = header(h, "upstash-queue-name")?
        .map(|q| {
            validate_name("Upstash-Queue-Name", q)
                .map(|_| q.to_string())
                .map_err(ApiError::BadRequest)
        })
        .transpose()?;
    for name in NOT_ON_SCHEDULES {
        if h.contains_key(name) {
            return Err(ApiError::BadRequest(format!(
                "{name} is not accepted on a schedule"
            )));
        }
    }
    let mut publish_headers = h.clone();
    for name in SCHEDULE_ONLY {
        publish_headers.remove(name);
    }
    let now = now_ms();
    let mut options = headers::parse_publish(&publish_headers, &state.limits, now)?;
    // `api/llm` is resolved once, here: the schedule stores the URL it stands for.
    let destination = match state.llm.resolve(destination, &mut options)? {
        Destination::Url(url) => url,
        Destination::Group(name) => name,
        Destination::Api(name) => return Err(super::llm::unknown_api(&name)),
    };
    let body = read_body(body, state.body_limit).await?.to_vec();
    let delay_ms = options
        .not_before
        .map(|nb| u64::try_from(nb.saturating_sub(now)).unwrap_or_default());
    let message = options.into_spec(body, caller_ip, delay_ms);
    let existing = state.views().schedules.get(&id);
    let record = ScheduleRecord {
        v: SCHEDULE_VERSION,
        schedule_id: id.clone(),
        cron,
        destination,
        queue_name,
        message,
        paused: existing.as_ref().is_some_and(|s| s.paused),
        created_at: existing.as_ref().map_or(now, |s| s.created_at),
        updated_at: existing.as_ref().map_or(now, |s| now.max(s.updated_at + 1)),
    };
    stored(state.writer.put(record).await)?;
    tracing::info!(schedule_id = %id, updated = existing.is_some(), "schedule saved");
    Ok(Json(json!({ "scheduleId": id })))
}

fn stored<T>(r: Result<T, rdkafka::error::KafkaError>) -> Result<T, ApiError> {
    r.map_err(|e| ApiError::not_stored("schedule change", &e))
}

fn find(state: &AppState, id: &str) -> Result<ScheduleRecord, ApiError> {
    state
        .views()
        .schedules
        .get(id)
        .ok_or_else(|| ApiError::NotFound(format!("schedule {id:?} not found")))
}

/// `{messageId: IN_PROGRESS|SUCCESS|FAIL}` for the messages of the last fire.
async fn last_states(state: &AppState, fire: Option<&ScheduleFire>) -> Result<Value, ApiError> {
    let ids = fire.map(|f| f.message_ids.clone()).unwrap_or_default();
    let states = query_store(&state.views().store, move |s| {
        let mut out = Map::new();
        for id in ids {
            let word = match s.final_state(&id)? {
                None => "IN_PROGRESS",
                Some(EventState::Delivered) => "SUCCESS",
                Some(_) => "FAIL",
            };
            out.insert(id, json!(word));
        }
        Ok(out)
    })
    .await?;
    Ok(Value::Object(states))
}

/// A schedule as the SDKs read it (Python requires scheduleId, destination, cron, createdAt,
/// method, retries).
async fn render(state: &AppState, s: &ScheduleRecord) -> Result<Value, ApiError> {
    let fire = state.views().schedule_fires.get(&s.schedule_id);
    let mut o = schedule_json(s, fire.as_ref(), now_ms());
    o.insert(
        "lastScheduleStates".into(),
        last_states(state, fire.as_ref()).await?,
    );
    Ok(Value::Object(o))
}

async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut out = Vec::new();
    for s in state.views().schedules.list() {
        out.push(render(&state, &s).await?);
    }
    Ok(Json(Value::Array(out)))
}

async fn get_one(
    State(state): State<AppState>,
    Path(rest): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let s = find(&state, &rest)?;
    Ok(Json(render(&state, &s).await?))
}

async fn delete_one(
    State(state): State<AppState>,
    Path(rest): Path<String>,
) -> Result<Json<Value>, ApiError> {
    find(&state, &rest)?;
    stored(state.writer.remove::<ScheduleRecord>(&rest).await)?;
    // Its fire record goes too (best effort: without settings, a fire record is never used).
    if let Err(e) = state.writer.remove::<ScheduleFire>(&rest).await {
        tracing::warn!(schedule_id = %rest, error = %e, "fire record of a deleted schedule not removed");
    }
    tracing::info!(schedule_id = %rest, "schedule deleted");
    Ok(Json(json!({ "deleted": 1 })))
}

async fn set_paused(state: AppState, id: String, paused: bool) -> Result<Json<Value>, ApiError> {
    let existing = find(&state, &id)?;
    let record = ScheduleRecord {
        paused,
        updated_at: now_ms().max(existing.updated_at + 1),
        ..existing
    };
    stored(state.writer.put(record.clone()).await)?;
    tracing::info!(schedule_id = %id, paused, "schedule paused or resumed");
    Ok(Json(render(&state, &record).await?))
}
