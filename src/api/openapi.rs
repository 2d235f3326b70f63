//! `GET /openapi.json` (no token needed): the OpenAPI 3.1 document of the whole API, generated
//! with utoipa from the handlers' `#[utoipa::path]` attributes and their request and response
//! types, so it describes what the code sends; the copy committed as `openapi.json` at the
//! repository root is checked against it (`tests/openapi.rs`).
//!
//! Design choice: [`ApiDoc`]'s `paths(...)` list is the one place an operation is added to the
//! document (the schemas it names are collected from it); what every `/v2` operation shares
//! (the bearer or `qstash_token` authentication, the 401/414/431/503 answers of the middleware, the
//! 429 of the management rate limit) is added by
//! [`V2Common`], not repeated on each handler. The document is built once, on first use.

use std::sync::OnceLock;

use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::Router;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::auth;
use super::error::ErrorBody;
use super::{
    batch, dlq, events, flow_control, health, keys, llm, messages, publish, queues, rate_limit,
    schedules, url_groups, AppState,
};

/// Prefixes of the authenticated API (`/llm`: the chat proxy).
const AUTHENTICATED_PREFIXES: [&str; 2] = ["/v2", "/llm"];
/// Name of the bearer-token security scheme.
const BEARER_SCHEME: &str = "bearerAuth";
/// Name of the query-token security scheme (`?qstash_token=`).
const QUERY_TOKEN_SCHEME: &str = "queryToken";
/// The answer of a management call over its token's limit (`api::rate_limit`).
const RATE_LIMITED: (&str, &str) = (
    "429",
    "Over the token's limit on management calls (`rate_limit.management_per_second`, off by default); `Burst-RateLimit-Limit`, `-Remaining` and `-Reset` say more",
);

/// The whole API. To document a new route: give its handler a `#[utoipa::path(...)]` and add the
/// handler to `paths(...)` here.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "kstash",
        description = "Self-hosted, Kafka-backed HTTP message queue and scheduler speaking the QStash v2 API. Every failure is answered with `{\"error\": \"…\"}`."
    ),
    paths(
        publish::publish,
        publish::enqueue,
        batch::batch,
        keys::get_keys,
        keys::rotate,
        keys::rotate_alias,
        llm::chat,
        messages::get_message,
        messages::cancel_one,
        messages::cancel_many,
        events::events,
        events::logs,
        dlq::list,
        dlq::delete_many,
        dlq::get_one,
        dlq::delete_one,
        dlq::retry_one,
        dlq::retry_many,
        queues::list,
        queues::upsert,
        queues::get_one,
        queues::delete_one,
        queues::pause,
        queues::resume,
        flow_control::list,
        flow_control::get_one,
        flow_control::pause,
        flow_control::resume,
        flow_control::pin,
        flow_control::unpin,
        flow_control::reset_rate,
        flow_control::global_parallelism,
        url_groups::list,
        url_groups::get_one,
        url_groups::delete_group,
        url_groups::add_endpoints,
        url_groups::remove_endpoints,
        schedules::list,
        schedules::create,
        schedules::get_one,
        schedules::delete_one,
        schedules::pause,
        schedules::resume,
        health::health,
        health::ready,
        health::live,
        serve,
    ),
    components(schemas(ErrorBody)),
    modifiers(&V2Common)
)]
pub struct ApiDoc;

/// Adds what every `/v2` operation shares: the bearer token, and the answers of the middleware
/// in front of every route (`auth`, `limits`, the start-up gate).
struct V2Common;

/// `(status, description)` of the answers every `/v2` route may give.
const V2_ERRORS: [(&str, &str); 4] = [
    ("401", "Missing or invalid bearer token"),
    ("414", "The request URI is too long"),
    ("431", "The request headers are too large"),
    (
        "503",
        "Kafka did not take the write (safe to retry unless it says otherwise), every request slot is taken, or the process is starting (`Retry-After`)",
    ),
];

impl Modify for V2Common {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER_SCHEME,
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            QUERY_TOKEN_SCHEME,
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::new(auth::TOKEN_PARAM))),
        );
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !AUTHENTICATED_PREFIXES.iter().any(|p| path.starts_with(p)) {
                continue;
            }
            let limited = rate_limit::is_management(path);
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ];
            for operation in operations.into_iter().flatten() {
                add_v2_common(operation, limited);
            }
        }
    }
}

/// The answer of an operation with a path parameter to one that is not UTF-8 once
/// percent-decoded (`api::extract::Path`), unless it documents its own 400.
const BAD_PATH_PARAMETER: (&str, &str) = ("400", "A path parameter that is not UTF-8");

fn add_v2_common(operation: &mut Operation, rate_limited: bool) {
    let no_scopes: [&str; 0] = [];
    // Either scheme (OpenAPI: alternatives in one list).
    operation.security = Some(vec![
        SecurityRequirement::new(BEARER_SCHEME, no_scopes),
        SecurityRequirement::new(QUERY_TOKEN_SCHEME, no_scopes),
    ]);
    let has_path_parameter = operation
        .parameters
        .iter()
        .flatten()
        .any(|p| p.parameter_in == ParameterIn::Path);
    let path_error = has_path_parameter.then_some(BAD_PATH_PARAMETER);
    let limit_error = rate_limited.then_some(RATE_LIMITED);
    for (status, description) in V2_ERRORS.into_iter().chain(path_error).chain(limit_error) {
        let error = ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build();
        operation
            .responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| error.into());
    }
}

/// The document, built once.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    static DOCUMENT: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    DOCUMENT.get_or_init(ApiDoc::openapi)
}

/// The document as served and committed: pretty-printed JSON with a trailing newline.
pub fn document_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        // A document of plain strings and maps always encodes.
        let mut text = document().to_pretty_json().unwrap_or_default();
        text.push('\n');
        text
    })
}

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(serve))
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi", tag = "meta", security(),
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json", body = Object)))]
async fn serve() -> ([(axum::http::HeaderName, &'static str); 1], &'static str) {
    ([(CONTENT_TYPE, "application/json")], document_json())
}
