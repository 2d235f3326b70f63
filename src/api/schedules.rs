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

use super::extract::Path;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::collections::BTreeMap;

use axum::Router;
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::limits::read_body;
use super::messages::query_store;
use super::publish::{caller_ip, DelayHeader, MessageHeaders};
use super::render::{schedule as schedule_json, Deleted, FireState, Reply, ScheduleView};
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

/// The id of a created (or updated) schedule.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleCreated {
    pub schedule_id: String,
}

/// The schedule's own headers (read by `create`; this type only describes them in the OpenAPI
/// document, hence never built).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct ScheduleHeaders {
    /// Five cron fields, UTC unless prefixed with `CRON_TZ=<zone> `.
    #[param(rename = "Upstash-Cron")]
    cron: String,
    /// Updates that schedule in place when it exists; else a new id is made.
    #[param(nullable = false, rename = "Upstash-Schedule-Id")]
    schedule_id: Option<String>,
    /// Each fire enqueues to this queue.
    #[param(nullable = false, rename = "Upstash-Queue-Name")]
    queue_name: Option<String>,
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
) -> Result<Response, ApiError> {
    Ok(match pause_action(&rest) {
        Some((id, true)) => pause(state, id).await?.into_response(),
        Some((id, false)) => resume(state, id).await?.into_response(),
        None => create(state, request).await?.into_response(),
    })
}

/// PATCH: pause or resume (the SDKs' form).
async fn patch_rest(
    State(state): State<AppState>,
    Path(rest): Path<String>,
) -> Result<Reply<ScheduleView>, ApiError> {
    match pause_action(&rest) {
        Some((id, true)) => pause(state, id).await,
        Some((id, false)) => resume(state, id).await,
        None => Err(ApiError::NotFound(format!(
            "no route for PATCH /v2/schedules/{rest}"
        ))),
    }
}

/// Pauses a schedule: it does not fire until resumed.
#[utoipa::path(method(post, patch), path = "/v2/schedules/{scheduleId}/pause", operation_id = "pauseSchedule", tag = "schedules",
    params(("scheduleId" = String, Path, description = "Schedule id", example = "nightly-report")),
    responses(
        (status = 200, description = "Paused", body = ScheduleView),
        (status = 400, description = "Not a valid schedule id (a POST is then read as a create, whose destination it is not)", body = ErrorBody),
        (status = 404, description = "No such schedule", body = ErrorBody),
    ))]
pub async fn pause(state: AppState, id: String) -> Result<Reply<ScheduleView>, ApiError> {
    set_paused(state, id, true).await
}

/// Resumes a paused schedule.
#[utoipa::path(method(post, patch), path = "/v2/schedules/{scheduleId}/resume", operation_id = "resumeSchedule", tag = "schedules",
    params(("scheduleId" = String, Path, description = "Schedule id", example = "nightly-report")),
    responses(
        (status = 200, description = "Resumed", body = ScheduleView),
        (status = 400, description = "Not a valid schedule id (a POST is then read as a create, whose destination it is not)", body = ErrorBody),
        (status = 404, description = "No such schedule", body = ErrorBody),
    ))]
pub async fn resume(state: AppState, id: String) -> Result<Reply<ScheduleView>, ApiError> {
    set_paused(state, id, false).await
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

/// Creates a schedule (or, with `Upstash-Schedule-Id`, updates it in place); each fire publishes
/// the body with the settings of the `Upstash-*` headers.
#[utoipa::path(post, path = "/v2/schedules/{scheduleIdOrDestination}", operation_id = "createSchedule", tag = "schedules",
    params(
        ("scheduleIdOrDestination" = String, Path, description = "The destination: a URL (the raw rest of the path, query included) or the name of a URL group", example = "https://example.com/report"),
        ScheduleHeaders, MessageHeaders, DelayHeader,
    ),
    request_body(content = String, content_type = "text/plain", description = "The body of each fired message (any content type; its `Content-Type` is forwarded)"),
    responses(
        (status = 200, description = "Saved", body = ScheduleCreated),
        (status = 400, description = "A bad destination, cron or header", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
    ))]
pub async fn create(state: AppState, request: Request) -> Result<Reply<ScheduleCreated>, ApiError> {
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
    Ok(Reply(ScheduleCreated { schedule_id: id }))
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
async fn last_states(
    state: &AppState,
    fire: Option<&ScheduleFire>,
) -> Result<BTreeMap<String, FireState>, ApiError> {
    let ids = fire.map(|f| f.message_ids.clone()).unwrap_or_default();
    query_store(&state.views().store, move |s| {
        let mut out = BTreeMap::new();
        for id in ids {
            let word = match s.final_state(&id)? {
                None => FireState::InProgress,
                Some(EventState::Delivered) => FireState::Success,
                Some(_) => FireState::Fail,
            };
            out.insert(id, word);
        }
        Ok(out)
    })
    .await
}

/// A schedule as the SDKs read it (Python requires scheduleId, destination, cron, createdAt,
/// method, retries).
async fn render(state: &AppState, s: &ScheduleRecord) -> Result<ScheduleView, ApiError> {
    let fire = state.views().schedule_fires.get(&s.schedule_id);
    let mut view = schedule_json(s, fire.as_ref(), now_ms());
    view.last_schedule_states = Some(last_states(state, fire.as_ref()).await?);
    Ok(view)
}

/// Every schedule.
#[utoipa::path(get, path = "/v2/schedules", operation_id = "listSchedules", tag = "schedules",
    responses((status = 200, description = "Every schedule", body = Vec<ScheduleView>)))]
pub async fn list(State(state): State<AppState>) -> Result<Reply<Vec<ScheduleView>>, ApiError> {
    let mut out = Vec::new();
    for s in state.views().schedules.list() {
        out.push(render(&state, &s).await?);
    }
    Ok(Reply(out))
}

/// One schedule.
#[utoipa::path(get, path = "/v2/schedules/{scheduleIdOrDestination}", operation_id = "getSchedule", tag = "schedules",
    params(("scheduleIdOrDestination" = String, Path, description = "The schedule id", example = "nightly-report")),
    responses(
        (status = 200, description = "The schedule", body = ScheduleView),
        (status = 404, description = "No such schedule", body = ErrorBody),
    ))]
pub async fn get_one(
    State(state): State<AppState>,
    Path(rest): Path<String>,
) -> Result<Reply<ScheduleView>, ApiError> {
    let s = find(&state, &rest)?;
    Ok(Reply(render(&state, &s).await?))
}

/// Deletes a schedule (messages it already published stay).
#[utoipa::path(delete, path = "/v2/schedules/{scheduleIdOrDestination}", operation_id = "deleteSchedule", tag = "schedules",
    params(("scheduleIdOrDestination" = String, Path, description = "The schedule id", example = "nightly-report")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 404, description = "No such schedule", body = ErrorBody),
    ))]
pub async fn delete_one(
    State(state): State<AppState>,
    Path(rest): Path<String>,
) -> Result<Reply<Deleted>, ApiError> {
    find(&state, &rest)?;
    stored(state.writer.remove::<ScheduleRecord>(&rest).await)?;
    // Its fire record goes too (best effort: without settings, a fire record is never used).
    if let Err(e) = state.writer.remove::<ScheduleFire>(&rest).await {
        tracing::warn!(schedule_id = %rest, error = %e, "fire record of a deleted schedule not removed");
    }
    tracing::info!(schedule_id = %rest, "schedule deleted");
    Ok(Reply(Deleted { deleted: 1 }))
}

async fn set_paused(
    state: AppState,
    id: String,
    paused: bool,
) -> Result<Reply<ScheduleView>, ApiError> {
    let existing = find(&state, &id)?;
    let record = ScheduleRecord {
        paused,
        updated_at: now_ms().max(existing.updated_at + 1),
        ..existing
    };
    stored(state.writer.put(record.clone()).await)?;
    tracing::info!(schedule_id = %id, paused, "schedule paused or resumed");
    Ok(Reply(render(&state, &record).await?))
}
