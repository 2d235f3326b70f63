//! The OpenAPI document (`GET /openapi.json`, `src/api/openapi.rs`): served without a token, the
//! same as the committed `openapi.json`, OpenAPI 3.1, and in step with the routers — every route
//! of `src/api/*.rs` is documented, and every documented operation reaches a handler.
//!
//! No Kafka: the router is built on a producer whose broker does not exist; no request here
//! reaches a write (each one is refused, or finds nothing, before), and a bounded wait covers one
//! that would.
//!
//! `KSTASH_WRITE_OPENAPI=1 cargo test --test openapi` rewrites `openapi.json` from the code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use kstash::api;
use kstash::config::{Config, Mode};
use serde_json::Value;
use tower::ServiceExt;

const TOKEN: &str = "openapi-test-token";
/// Nothing listens there: the API is built without Kafka.
const NO_BROKER: &str = "127.0.0.1:1";
/// Env var that makes the test rewrite the committed document.
const WRITE_ENV: &str = "KSTASH_WRITE_OPENAPI";
/// The committed document, relative to the repository root.
const COMMITTED: &str = "openapi.json";
/// How long a documented operation may take to answer; a handler still working then was reached.
const REACHED_AFTER: Duration = Duration::from_secs(5);
/// Value of every path parameter in the reachability check (a valid name and schedule id).
const PATH_VALUE: &str = "openapi-check";
/// Routes that are not operations of their own: the bare publish/enqueue prefixes (a missing
/// destination, answered 400) and `/v2/messages/` (a missing message id, answered 400).
const UNDOCUMENTED_ALIASES: [&str; 5] = [
    "/v2/publish",
    "/v2/publish/",
    "/v2/enqueue",
    "/v2/enqueue/",
    "/v2/messages/",
];
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn app() -> Router {
    let mut config = Config::defaults(Mode::Serve);
    config.auth.tokens = vec![TOKEN.to_string()];
    config.signing.current_key = "sig_openapi_current_0123456789abcdefgh".to_string();
    config.signing.next_key = "sig_openapi_next_0123456789abcdefghijkl".to_string();
    config.kafka.brokers = NO_BROKER.to_string();
    config.validate(Mode::Serve).expect("test config is valid");
    let store = kstash::state::Store::create(None, config.state.cache_bytes).unwrap();
    // No state tailer: the (empty) views count as caught up.
    let health = kstash::health::Health::default();
    health.caught_up(0);
    api::router(kstash::server::api_state(
        &config,
        kstash::kafka::Producer::new(&config.kafka).unwrap(),
        Arc::new(kstash::state::Views::new(
            Arc::new(store),
            kstash::signing::Signer::new(&config.signing.current_key, &config.signing.next_key),
        )),
        Arc::new(AtomicUsize::new(0)),
        health,
    ))
}

async fn served(app: &Router) -> String {
    let response = app
        .clone()
        .oneshot(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "served without a token");
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "served as JSON"
    );
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn the_served_document_is_the_committed_one() {
    let served = served(&app()).await;
    assert_eq!(served, api::openapi::document_json(), "served as built");
    let path = root().join(COMMITTED);
    if std::env::var(WRITE_ENV).is_ok_and(|v| !v.is_empty() && v != "0") {
        std::fs::write(&path, &served).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == served,
        "{COMMITTED} is not the document the code generates (the API changed?); regenerate it \
         with `{WRITE_ENV}=1 cargo test --test openapi` and commit it"
    );
}

#[tokio::test]
async fn the_document_is_openapi_3_1_with_the_shared_answers() {
    let doc: Value = serde_json::from_str(&served(&app()).await).unwrap();
    let version = doc["openapi"].as_str().unwrap();
    assert!(version.starts_with("3.1."), "OpenAPI {version}");
    assert!(doc["components"]["schemas"]["ErrorBody"]["properties"]["error"].is_object());
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    for (path, method, op) in operations(&doc) {
        let responses = op["responses"].as_object().unwrap();
        if path.starts_with("/v2") {
            assert!(
                op["security"].is_array(),
                "{method} {path}: needs the token"
            );
            assert!(responses.contains_key("401"), "{method} {path}");
        }
        for (status, response) in responses {
            if (status.starts_with('4') || status.starts_with('5')) && path.starts_with("/v2") {
                let schema = &response["content"]["application/json"]["schema"]["$ref"];
                assert_eq!(
                    schema, "#/components/schemas/ErrorBody",
                    "{method} {path} {status}: errors are ErrorBody"
                );
            }
        }
    }
    // A sample of typed answers with the keys the SDKs read.
    let has = |name: &str, key: &str| {
        let schema = &doc["components"]["schemas"][name];
        let parts = schema["allOf"].as_array().cloned().unwrap_or_default();
        [schema.clone()]
            .iter()
            .chain(&parts)
            .any(|s| s["properties"][key].is_object())
    };
    for key in ["callerIP", "callerIp", "bodyBase64", "callbackHeader"] {
        assert!(has("MessageView", key), "MessageView.{key}");
    }
    for key in [
        "responseHeader",
        "responseHeaders",
        "retryDelayExpr",
        "retryDelayExpression",
    ] {
        assert!(has("EventView", key), "EventView.{key}");
    }
}

/// `(path, method, operation)` of every operation of the document.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in METHODS {
            if let Some(op) = item.get(method) {
                out.push((path.clone(), method.to_string(), op.clone()));
            }
        }
    }
    out
}

/// `/a/{x}/b` → `/a/{}/b`: templates compare without their parameter names.
fn shape(path: &str) -> String {
    let mut out = String::new();
    let mut in_param = false;
    for c in path.chars() {
        match c {
            '{' => {
                in_param = true;
                out.push_str("{}");
            }
            '}' => in_param = false,
            c if !in_param => out.push(c),
            _ => {}
        }
    }
    out
}

/// The routes of `src/api/*.rs`: every `.route("<path>", <method>(…)…)`, read from the source so
/// a route added there is checked without touching this test.
fn routes() -> BTreeMap<String, BTreeSet<String>> {
    let mut routes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let dir = root().join("src/api");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let file = entry.unwrap().path();
        if file.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let source = std::fs::read_to_string(&file).unwrap();
        for (path, methods) in routes_in(&source, &file) {
            routes.entry(path).or_default().extend(methods);
        }
    }
    routes
}

fn routes_in(source: &str, file: &Path) -> Vec<(String, BTreeSet<String>)> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        // The arguments: up to the parenthesis closing `.route(`.
        let mut depth = 1;
        let end = rest
            .char_indices()
            .find_map(|(i, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                (depth == 0).then_some(i)
            })
            .unwrap_or_else(|| panic!("unbalanced .route( in {}", file.display()));
        let args = &rest[..end];
        let path = args
            .split('"')
            .nth(1)
            .unwrap_or_else(|| panic!("a .route( without a literal path in {}", file.display()));
        let methods: BTreeSet<String> = METHODS
            .iter()
            .filter(|m| {
                args.match_indices(&format!("{m}(")).any(|(i, _)| {
                    i == 0 || !args[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_')
                })
            })
            .map(|m| m.to_string())
            .collect();
        assert!(
            !methods.is_empty(),
            "no method for {path} in {}",
            file.display()
        );
        out.push((path.to_string(), methods));
        rest = &rest[end..];
    }
    out
}

#[tokio::test]
async fn every_route_is_documented() {
    let doc: Value = serde_json::from_str(api::openapi::document_json()).unwrap();
    let documented: BTreeSet<(String, String)> = operations(&doc)
        .into_iter()
        .map(|(path, method, _)| (shape(&path), method))
        .collect();
    let routes = routes();
    assert!(
        routes.contains_key("/v2/publish/{*destination}"),
        "{routes:?}"
    );
    let mut missing = Vec::new();
    for (path, methods) in &routes {
        if UNDOCUMENTED_ALIASES.contains(&path.as_str()) {
            continue;
        }
        let path = match path.strip_suffix('/') {
            Some(p) if !p.is_empty() => p,
            _ => path,
        };
        for method in methods {
            let covered = match path.split_once("{*") {
                // A catch-all: documented by the operations under it.
                Some((prefix, _)) => documented
                    .iter()
                    .any(|(p, m)| m == method && p.starts_with(&format!("{prefix}{{"))),
                None => documented.contains(&(shape(path), method.clone())),
            };
            if !covered {
                missing.push(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "routes missing from the OpenAPI document (add their handlers to `paths(...)` in \
         src/api/openapi.rs): {missing:?}"
    );
}

#[tokio::test]
async fn every_documented_operation_reaches_a_handler() {
    let app = app();
    let doc: Value = serde_json::from_str(api::openapi::document_json()).unwrap();
    for (path, method, _) in operations(&doc) {
        let uri = shape(&path).replace("{}", PATH_VALUE);
        let request = Request::builder()
            .method(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap())
            .uri(&uri)
            .header("authorization", format!("Bearer {TOKEN}"))
            // Refused by enqueue before its write; harmless elsewhere.
            .header("upstash-delay", "1s")
            .body(Body::empty())
            .unwrap();
        let answer = tokio::time::timeout(REACHED_AFTER, app.clone().oneshot(request)).await;
        let Ok(response) = answer else {
            continue; // still working: a handler was reached
        };
        let response = response.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            panic!(
                "{method} {uri}: answer is not JSON: {:?}",
                String::from_utf8_lossy(&bytes)
            )
        });
        assert_ne!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {uri}: documented but not routed"
        );
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            !error.starts_with("no route"),
            "{method} {uri}: documented but not routed: {error}"
        );
        if path.starts_with("/v2") && (status.is_client_error() || status.is_server_error()) {
            assert!(body["error"].is_string(), "{method} {uri}: {body}");
        }
    }
}
