//! `POST /v2/publish/{destination}` and `POST /v2/enqueue/{queue}/{destination}`: accept a
//! message and store it in Kafka. The same core serves each item of `POST /v2/batch`.
//!
//! The destination is read from the raw request target (see `model::destination`): a URL, or the
//! name of a URL group. The answer is sent only after Kafka acknowledged what it promises
//! (`acks=all`), so an accepted message survives any crash from then on:
//! - to a URL, `{"messageId","url"}` once the envelope is on the ready topic (or on the delay
//!   ladder when it is due later);
//! - to a URL group, a top-level JSON array of those, one per endpoint, once the per-endpoint
//!   messages (each with its own id, retries and DLQ entry) are written in **one Kafka
//!   transaction**, so a crash never leaves half a group published. Deduplication applies per
//!   endpoint.
//!
//! Enqueue is the same with the message keyed by its queue (so the delivery stage runs it in
//! order); the queue is created with parallelism 1 when missing, and `Upstash-Delay` /
//! `Upstash-Not-Before` are refused with a 400 as the hosted service does (a delayed message
//! cannot hold its place in a FIFO queue). A publish with flow control also keeps the key's
//! settings record up to date (the newest message's values, unless pinned).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::limits::read_body;
use super::messages::query_store;
use super::render::Reply;
use super::AppState;
use crate::kafka::record::Record;
use crate::model::dedup::{DedupRecord, DEDUP_VERSION};
use crate::model::destination::{self, Destination};
use crate::model::envelope::Envelope;
use crate::model::flow::{FlowControl, FlowControlRecord};
use crate::model::headers::{self, Dedup, PublishOptions};
use crate::model::queue::{validate_name, QueueRecord, DEFAULT_PARALLELISM};
use crate::model::schedule::{MessageSpec, Target};
use crate::model::{ids, now_ms};

/// Path prefix in front of the raw destination of a publish.
pub const PUBLISH_PREFIX: &str = "/v2/publish/";
/// Path prefix in front of `{queue}/{destination}` of an enqueue.
pub const ENQUEUE_PREFIX: &str = "/v2/enqueue/";
/// Headers that make no sense for a message that must keep its place in a queue.
const NOT_ON_ENQUEUE: [&str; 2] = ["upstash-delay", "upstash-not-before"];

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/publish/{*destination}", post(publish))
        .route("/v2/publish/", post(publish))
        .route("/v2/publish", post(publish))
        .route("/v2/enqueue/{*rest}", post(enqueue))
        .route("/v2/enqueue/", post(enqueue))
        .route("/v2/enqueue", post(enqueue))
}

/// A stored (or deduplicated) message.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    pub message_id: String,
    /// The destination URL.
    pub url: String,
    /// `true` when this was a duplicate of an earlier publish: `messageId` is the original's and
    /// nothing was stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub deduplicated: Option<bool>,
}

/// The answer of a publish: one message for a URL, an array (one per endpoint) for a URL group.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum PublishAnswer {
    Url(Published),
    UrlGroup(Vec<Published>),
}

// The `Upstash-*` request headers, read by `model::headers` (any case, `Upstash-Forward-*` by
// prefix, which no extractor reads); these types only describe them in the OpenAPI document,
// hence never built.

/// Settings of the message, taken by publish, enqueue, schedules and DLQ retry.
/// Also: `Upstash-Forward-<Name>` (forwarded to the destination as `<Name>`), and
/// `Upstash-Callback-<Setting>` / `Upstash-Failure-Callback-<Setting>` (`Method`, `Timeout`,
/// `Retries`, `Retry-Delay`, `Delay`, `Forward-<Name>`) configuring the callback messages.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct MessageHeaders {
    /// HTTP method of the delivery (default POST).
    #[param(
        nullable = false,
        rename = "Upstash-Method",
        pattern = "^(GET|POST|PUT|PATCH|DELETE)$"
    )]
    method: Option<String>,
    /// Per-attempt timeout: seconds, or a duration such as `30s`, `2m`.
    #[param(nullable = false, rename = "Upstash-Timeout")]
    timeout: Option<String>,
    /// Retries after the first attempt.
    #[param(nullable = false, rename = "Upstash-Retries", minimum = 0)]
    retries: Option<u32>,
    /// Delay before retry number `retried` (ms), an expression such as `1000 * pow(2, retried)`.
    #[param(nullable = false, rename = "Upstash-Retry-Delay")]
    retry_delay: Option<String>,
    /// Labels, comma-separated.
    #[param(nullable = false, rename = "Upstash-Label")]
    label: Option<String>,
    /// Absolute http(s) URL called after every attempt.
    #[param(nullable = false, rename = "Upstash-Callback")]
    callback: Option<String>,
    /// Absolute http(s) URL called once, after the final failed attempt.
    #[param(nullable = false, rename = "Upstash-Failure-Callback")]
    failure_callback: Option<String>,
    /// Flow-control key (with `Upstash-Flow-Control-Value`).
    #[param(nullable = false, rename = "Upstash-Flow-Control-Key")]
    flow_control_key: Option<String>,
    /// `parallelism=<n>, rate=<n>, period=<duration>` (any of them).
    #[param(nullable = false, rename = "Upstash-Flow-Control-Value")]
    flow_control_value: Option<String>,
    /// Fields the API shows as `REDACTED:<hex SHA-256>` while the delivery sends them as
    /// published: `body`, `header` (all), `header[Name]`, comma-separated (`headers` also works).
    #[param(nullable = false, rename = "Upstash-Redact-Fields")]
    redact_fields: Option<String>,
}

/// `Upstash-Delay`: publish and schedules (refused on enqueue).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct DelayHeader {
    /// Delay before the first attempt: seconds, or a duration such as `10s`, `5m`, `1h`.
    #[param(nullable = false, rename = "Upstash-Delay")]
    delay: Option<String>,
}

/// `Upstash-Not-Before`: publish only.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct NotBeforeHeader {
    /// Not to be delivered before this unix time (seconds).
    #[param(nullable = false, rename = "Upstash-Not-Before", minimum = 0)]
    not_before: Option<i64>,
}

/// Deduplication: publish and enqueue.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct DedupHeaders {
    /// A publish with the id of a live earlier one is not stored again.
    #[param(nullable = false, rename = "Upstash-Deduplication-Id")]
    deduplication_id: Option<String>,
    /// `true`: deduplicate by destination, body and forwarded headers.
    #[param(
        nullable = false,
        rename = "Upstash-Content-Based-Deduplication",
        pattern = "^(true|false)$"
    )]
    content_based_deduplication: Option<String>,
}

/// One publish, parsed: where to, what, and how duplicates are recognised.
pub struct Publish {
    pub destination: Destination,
    pub queue: Option<String>,
    pub spec: MessageSpec,
    /// Not to be delivered before (unix ms); `None` means at once.
    pub not_before: Option<i64>,
    pub dedup: Option<Dedup>,
    pub now: i64,
}

impl Publish {
    /// A publish of `body` to `destination` with the (already parsed) headers.
    pub fn new(
        destination: Destination,
        queue: Option<String>,
        mut options: PublishOptions,
        body: Vec<u8>,
        caller_ip: Option<String>,
        now: i64,
    ) -> Self {
        Publish {
            destination,
            queue,
            not_before: options.not_before,
            dedup: options.dedup.take(),
            now,
            spec: options.into_spec(body, caller_ip, None),
        }
    }

    /// The message for one target.
    fn envelope(&self, target: Target) -> Envelope {
        let mut e = self.spec.envelope(
            ids::message_id(),
            target,
            self.queue.clone(),
            None,
            self.now,
        );
        e.not_before = self.not_before.unwrap_or(self.now);
        e
    }
}

/// Publishes a message to a URL or a URL group.
#[utoipa::path(post, path = "/v2/publish/{destination}", operation_id = "publish", tag = "messages",
    params(
        ("destination" = String, Path, description = "A URL (`https://example.com/x`, the raw rest of the path, query included) or the name of a URL group", example = "https://example.com/hook"),
        MessageHeaders, DelayHeader, NotBeforeHeader, DedupHeaders,
    ),
    request_body(content = String, content_type = "text/plain", description = "The message body, delivered as is (any content type; its `Content-Type` is forwarded)"),
    responses(
        (status = 200, description = "Stored: one message for a URL, an array for a URL group", body = PublishAnswer),
        (status = 202, description = "A duplicate of an earlier publish; not stored again", body = PublishAnswer),
        (status = 400, description = "A bad destination or header", body = ErrorBody),
        (status = 404, description = "No such URL group", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
    ))]
pub async fn publish(
    State(state): State<AppState>,
    request: Request,
) -> Result<(StatusCode, Reply<PublishAnswer>), ApiError> {
    let caller_ip = caller_ip(&request);
    let (parts, body) = request.into_parts();
    let destination = destination::from_uri(&parts.uri, PUBLISH_PREFIX)?;
    let now = now_ms();
    let mut options = headers::parse_publish(&parts.headers, &state.limits, now)?;
    let destination = state.llm.resolve(destination, &mut options)?;
    let body = read_body(body, state.body_limit).await?.to_vec();
    let publish = Publish::new(destination, None, options, body, caller_ip, now);
    let (status, reply) = store(&state, publish).await?;
    Ok((status, Reply(reply)))
}

/// Enqueues a message to a FIFO queue (created with parallelism 1 when missing).
#[utoipa::path(post, path = "/v2/enqueue/{queueName}/{destination}", operation_id = "enqueue", tag = "queues",
    params(
        ("queueName" = String, Path, description = "The queue", example = "orders"),
        ("destination" = String, Path, description = "A URL (the raw rest of the path, query included) or the name of a URL group", example = "https://example.com/hook"),
        MessageHeaders, DedupHeaders,
    ),
    request_body(content = String, content_type = "text/plain", description = "The message body, delivered as is (any content type; its `Content-Type` is forwarded)"),
    responses(
        (status = 200, description = "Stored: one message for a URL, an array for a URL group", body = PublishAnswer),
        (status = 202, description = "A duplicate of an earlier publish; not stored again", body = PublishAnswer),
        (status = 400, description = "A bad queue name, destination or header (`Upstash-Delay` and `Upstash-Not-Before` are refused)", body = ErrorBody),
        (status = 404, description = "No such URL group", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
    ))]
pub async fn enqueue(
    State(state): State<AppState>,
    request: Request,
) -> Result<(StatusCode, Reply<PublishAnswer>), ApiError> {
    let caller_ip = caller_ip(&request);
    let (parts, body) = request.into_parts();
    let rest = parts
        .uri
        .path()
        .strip_prefix(ENQUEUE_PREFIX)
        .unwrap_or_default();
    let queue = rest.split('/').next().unwrap_or_default().to_string();
    validate_name("queue name", &queue).map_err(ApiError::BadRequest)?;
    refuse_delays(&parts.headers)?;
    let destination = destination::from_uri(&parts.uri, &format!("{ENQUEUE_PREFIX}{queue}/"))?;
    let now = now_ms();
    let mut options = headers::parse_publish(&parts.headers, &state.limits, now)?;
    let destination = state.llm.resolve(destination, &mut options)?;
    let body = read_body(body, state.body_limit).await?.to_vec();
    let publish = Publish::new(destination, Some(queue), options, body, caller_ip, now);
    let (status, reply) = store(&state, publish).await?;
    Ok((status, Reply(reply)))
}

/// `Upstash-Delay` and `Upstash-Not-Before` are refused on enqueue.
pub fn refuse_delays(headers: &HeaderMap) -> Result<(), ApiError> {
    for name in NOT_ON_ENQUEUE {
        if headers.contains_key(name) {
            return Err(ApiError::BadRequest(format!(
                "{name} is not allowed on enqueue: a queued message is delivered in order, when its turn comes"
            )));
        }
    }
    Ok(())
}

pub fn caller_ip(request: &Request) -> Option<String> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
}

/// Creates the queue with parallelism 1 if it has no settings yet.
async fn ensure_queue(state: &AppState, queue: &str, now: i64) -> Result<(), ApiError> {
    if state.views().queues.get(queue).is_none() {
        let record = QueueRecord::new(queue, DEFAULT_PARALLELISM, false, now);
        state
            .writer
            .put(record)
            .await
            .map_err(|e| ApiError::not_stored("queue", &e))?;
        tracing::info!(queue, "queue created by its first enqueue");
    }
    Ok(())
}

/// Stores a publish (unless it is a duplicate) and answers as the SDKs expect: the status and
/// the JSON (an object for a URL, an array for a URL group).
pub async fn store(
    state: &AppState,
    publish: Publish,
) -> Result<(StatusCode, PublishAnswer), ApiError> {
    if let Some(queue) = &publish.queue {
        ensure_queue(state, queue, publish.now).await?;
    }
    let reply = match &publish.destination {
        Destination::Url(url) => {
            let target = Target {
                url: url.clone(),
                topic_name: None,
                endpoint_name: None,
            };
            let envelope = publish.envelope(target);
            let key = publish
                .dedup
                .as_ref()
                .map(|d| dedup_key(d, &envelope, false));
            if let Some(original) = duplicate_of(state, key.clone(), publish.now).await? {
                return Ok((StatusCode::ACCEPTED, PublishAnswer::Url(original)));
            }
            accept(state, &envelope).await?;
            remember(state, key, &envelope).await;
            PublishAnswer::Url(Published::of(&envelope))
        }
        // Resolved by every caller (`Llm::resolve`); an unresolved one is refused.
        Destination::Api(name) => return Err(super::llm::unknown_api(name)),
        Destination::Group(name) => {
            let group = state
                .views()
                .url_groups
                .get(name)
                .ok_or_else(|| ApiError::NotFound(format!("URL group {name:?} not found")))?;
            let mut replies = Vec::new();
            let mut fresh = Vec::new();
            for endpoint in group.endpoints {
                let envelope = publish.envelope(Target {
                    url: endpoint.url,
                    topic_name: Some(group.name.clone()),
                    endpoint_name: endpoint.name,
                });
                let key = publish
                    .dedup
                    .as_ref()
                    .map(|d| dedup_key(d, &envelope, true));
                match duplicate_of(state, key.clone(), publish.now).await? {
                    Some(original) => replies.push(original),
                    None => {
                        replies.push(Published::of(&envelope));
                        fresh.push((envelope, key));
                    }
                }
            }
            let envelopes: Vec<Envelope> = fresh.iter().map(|(e, _)| e.clone()).collect();
            if !envelopes.is_empty() {
                state
                    .writer
                    .accept_all(&envelopes)
                    .await
                    .map_err(|e| ApiError::not_stored_tx("messages", &e))?;
                tracing::debug!(group = %name, messages = envelopes.len(), "fanned out");
            }
            for (envelope, key) in fresh {
                remember(state, key, &envelope).await;
            }
            PublishAnswer::UrlGroup(replies)
        }
    };
    if let Some(values) = &publish.spec.flow_control {
        remember_flow_control(state, values, publish.now).await;
    }
    Ok((StatusCode::OK, reply))
}

/// The answer for a duplicate of an earlier publish, if `key` names a live one.
async fn duplicate_of(
    state: &AppState,
    key: Option<String>,
    now: i64,
) -> Result<Option<Published>, ApiError> {
    let Some(key) = key else {
        return Ok(None);
    };
    let existing = query_store(&state.views().store, move |s| s.dedup(&key, now)).await?;
    Ok(existing.map(|original| {
        tracing::debug!(message_id = %original.message_id, "duplicate publish; not stored again");
        Published {
            message_id: original.message_id,
            url: original.url,
            deduplicated: Some(true),
        }
    }))
}

impl Published {
    /// A message just stored.
    fn of(envelope: &Envelope) -> Self {
        Published {
            message_id: envelope.message_id.clone(),
            url: envelope.url.clone(),
            deduplicated: None,
        }
    }
}

/// Records the dedup key of a stored message. The message is stored either way; without the
/// record a retried publish would be stored twice, which at-least-once allows.
async fn remember(state: &AppState, key: Option<String>, envelope: &Envelope) {
    let Some(key) = key else { return };
    let window = i64::try_from(state.dedup_window.as_millis()).unwrap_or(i64::MAX);
    let record = DedupRecord {
        v: DEDUP_VERSION,
        key,
        message_id: envelope.message_id.clone(),
        url: envelope.url.clone(),
        expires_at: envelope.created_at.saturating_add(window),
    };
    if let Err(e) = state.writer.put(record).await {
        tracing::warn!(message_id = %envelope.message_id, error = %e, "dedup id not recorded");
    }
}

/// On `kstash dev`: refuses (503) messages the embedded cluster has no room for without dropping
/// records still needed (`kafka::dev_room`). Each message is one record on the ready topic or
/// the ladder and one CREATED event a little larger, each on a partition not known before.
fn admit_on_dev(state: &AppState, envelopes: &[Envelope]) -> Result<(), ApiError> {
    let Some(room) = &state.dev_room else {
        return Ok(());
    };
    let largest = envelopes
        .iter()
        .map(|e| e.encode().len() as u64)
        .max()
        .unwrap_or_default();
    let per_partition = largest.saturating_mul(envelopes.len() as u64);
    room.admit(per_partition + per_partition / CREATED_EVENT_OVERHEAD_DIVISOR)
        .map_err(|full| ApiError::Unavailable(full.to_string()))
}

/// A CREATED event is its envelope plus a few fields: at most a quarter more.
const CREATED_EVENT_OVERHEAD_DIVISOR: u64 = 4;

/// Stores a new message: the envelope (ready topic or delay ladder) and its CREATED event. Answers
/// 503 when Kafka did not take the envelope.
pub async fn accept(state: &AppState, envelope: &Envelope) -> Result<(), ApiError> {
    admit_on_dev(state, std::slice::from_ref(envelope))?;
    let ack = state
        .writer
        .accept(envelope)
        .await
        .map_err(|e| ApiError::not_stored("message", &e))?;
    tracing::debug!(
        message_id = %envelope.message_id,
        queue = envelope.queue_name.as_deref(),
        partition = ack.partition,
        offset = ack.offset,
        not_before = envelope.not_before,
        "accepted"
    );
    Ok(())
}

/// Keeps the key's settings record in step with the newest message's values (unless pinned).
/// The message is stored either way, and the delivery stage reads the values off the message
/// itself, so a failure here only leaves `GET /v2/flowControl` behind: it is logged.
async fn remember_flow_control(state: &AppState, values: &FlowControl, now: i64) {
    let next = match state.views().flow.get(&values.key) {
        None => Some(FlowControlRecord::new(values, now)),
        Some(current) => current.with_message_values(values, now),
    };
    if let Some(record) = next {
        if let Err(e) = state.writer.put(record).await {
            tracing::warn!(key = %values.key, error = %e, "flow-control settings not recorded");
        }
    }
}

/// The dedup key of a publish: the id as given (per endpoint for a URL group, as the hosted
/// service does), or a hash of what makes the content (destination, queue, body, forwarded
/// headers).
fn dedup_key(dedup: &Dedup, envelope: &Envelope, per_endpoint: bool) -> String {
    match dedup {
        Dedup::Id(id) if per_endpoint => format!("id:{id} {}", envelope.url),
        Dedup::Id(id) => format!("id:{id}"),
        Dedup::Content => {
            let mut hash = Sha256::new();
            hash.update(envelope.url.as_bytes());
            hash.update([0]);
            hash.update(
                envelope
                    .queue_name
                    .as_deref()
                    .unwrap_or_default()
                    .as_bytes(),
            );
            hash.update([0]);
            hash.update(&envelope.body);
            for (name, values) in &envelope.header {
                for v in values {
                    hash.update([0]);
                    hash.update(name.to_ascii_lowercase().as_bytes());
                    hash.update(b":");
                    hash.update(v.as_bytes());
                }
            }
            format!("content:{}", URL_SAFE_NO_PAD.encode(hash.finalize()))
        }
    }
}
