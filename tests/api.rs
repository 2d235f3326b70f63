//! The HTTP API as a `Router`, driven with `oneshot` (no sockets): authentication, errors as JSON
//! with the right status, and "accepted means stored" (a 200 is only given once the envelope is on
//! the ready topic).

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use common::{TestKafka, TOKEN};
use http_body_util::BodyExt;
use kstash::api;
use kstash::kafka::record::Record;
use kstash::model::envelope::Envelope;
use serde_json::Value;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

const BODY_LIMIT: usize = 1024;

fn app(kafka: &TestKafka) -> Router {
    app_with(kafka, |_| {})
}

fn app_with(kafka: &TestKafka, adjust: impl FnOnce(&mut kstash::config::Config)) -> Router {
    let mut config = kafka.config();
    config.server.body_limit = BODY_LIMIT;
    adjust(&mut config);
    let store = kstash::state::Store::create(None, config.state.cache_bytes).unwrap();
    // No state tailer here: the (empty) views count as caught up.
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

async fn call(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("body is not JSON: {:?}", String::from_utf8_lossy(&bytes)));
    (status, json)
}

fn post(uri: &str) -> axum::http::request::Builder {
    Request::post(uri).header("authorization", format!("Bearer {TOKEN}"))
}

#[tokio::test]
async fn v2_requires_a_valid_bearer_token() {
    let kafka = TestKafka::new();
    let app = app(&kafka);
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Basic dGVzdA=="),
        Some(TOKEN),
    ] {
        let mut req = Request::get("/v2/keys");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let (status, json) = call(&app, req.body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert!(json["error"].is_string(), "{json}");
    }
    let (status, _) = call(
        &app,
        Request::get("/health/live").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "health needs no token");
}

#[tokio::test]
async fn keys_returns_current_and_next() {
    let kafka = TestKafka::new();
    let req = Request::get("/v2/keys")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .unwrap();
    let (status, json) = call(&app(&kafka), req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["current"], common::CURRENT_KEY);
    assert_eq!(json["next"], common::NEXT_KEY);
}

#[tokio::test]
async fn client_mistakes_are_json_4xx() {
    let kafka = TestKafka::new();
    let app = app(&kafka);
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            post("/v2/publish/").body(Body::from("x")).unwrap(),
            StatusCode::BAD_REQUEST,
            "missing",
        ),
        (
            post("/v2/publish/ftp://example.com/x")
                .body(Body::from("x"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "http",
        ),
        (
            post("/v2/publish/https://example.com/x")
                .header("Upstash-Delay", "400d")
                .body(Body::from("x"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "maximum delay",
        ),
        (
            post("/v2/publish/https://example.com/x")
                .header("Upstash-Flow-Control-Key", "k")
                .body(Body::from("x"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "needs Upstash-Flow-Control-Value",
        ),
        (
            post("/v2/publish/https://example.com/x")
                .header("Upstash-Flow-Control-Key", "k")
                .header("Upstash-Flow-Control-Value", "parallelism=0")
                .body(Body::from("x"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "parallelism must be at least 1",
        ),
        (
            post("/v2/enqueue/bad%20name/https://example.com/x")
                .body(Body::from("x"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "only letters, digits",
        ),
        (
            post("/v2/enqueue/q1/https://example.com/x")
                .header("Upstash-Delay", "10s")
                .body(Body::from("x"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "upstash-delay is not allowed on enqueue",
        ),
        (
            post("/v2/enqueue/q1/https://example.com/x")
                .header("Upstash-Not-Before", "1900000000")
                .body(Body::from("x"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "upstash-not-before is not allowed on enqueue",
        ),
        (
            post("/v2/enqueue/q1").body(Body::from("x")).unwrap(),
            StatusCode::BAD_REQUEST,
            "destination is missing",
        ),
        (
            post("/v2/queues")
                .header("content-type", "application/json")
                .body(Body::from(r#"{"queueName":"q1","parallelism":100000}"#))
                .unwrap(),
            StatusCode::PRECONDITION_FAILED,
            "above the maximum",
        ),
        (
            post("/v2/queues")
                .header("content-type", "application/json")
                .body(Body::from(r#"{"queueName":"no/slash"}"#))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "only letters, digits",
        ),
        (
            post("/v2/queues").body(Body::from("not json")).unwrap(),
            StatusCode::BAD_REQUEST,
            "queueName",
        ),
        (
            Request::get("/v2/queues/unknown")
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(Body::empty())
                .unwrap(),
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            post("/v2/queues/unknown/pause")
                .body(Body::empty())
                .unwrap(),
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            Request::get("/v2/flowControl/unknown")
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(Body::empty())
                .unwrap(),
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            post("/v2/flowControl/unknown/resetRate")
                .body(Body::empty())
                .unwrap(),
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            post("/v2/publish/https://example.com/x")
                .header("Upstash-Method", "TRACE")
                .body(Body::from("x"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "Upstash-Method",
        ),
        (
            post("/v2/publish/https://example.com/x")
                .body(Body::from(vec![b'a'; BODY_LIMIT + 1]))
                .unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "limit",
        ),
        (
            // Small-body resources answer an oversized body in JSON too.
            post("/v2/queues/")
                .body(Body::from(vec![b' '; BODY_LIMIT + 1]))
                .unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "limit",
        ),
        (
            post("/v2/nothing-here").body(Body::empty()).unwrap(),
            StatusCode::NOT_FOUND,
            "no route",
        ),
        (
            // No llm.base_url configured: refused, saying what to set.
            post("/v2/publish/api/llm").body(Body::from("{}")).unwrap(),
            StatusCode::BAD_REQUEST,
            "llm.base_url",
        ),
        (
            post("/v2/publish/https://example.com/x")
                .header("Upstash-Retires", "5")
                .body(Body::from("x"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "upstash-retires",
        ),
        (
            // A misspelt filter must not widen a bulk cancel to everything.
            Request::delete("/v2/messages?labell=x")
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "labell",
        ),
        (
            Request::delete("/v2/dlq?queue=x")
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "\"queue\"",
        ),
        (
            Request::get("/v2/publish/https://example.com/x")
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(Body::empty())
                .unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
        ),
        // Found by scripts/api-fuzz.sh and by hand: answered in plain text by axum before.
        (
            Request::get("/v2/queues/%FF")
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "UTF-8",
        ),
        (
            Request::builder()
                .method("TRACE")
                .uri("/health")
                .body(Body::empty())
                .unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
        ),
        (
            Request::delete("/openapi.json")
                .body(Body::empty())
                .unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
        ),
    ];
    for (req, expected, needle) in cases {
        let uri = req.uri().to_string();
        let (status, json) = call(&app, req).await;
        assert_eq!(status, expected, "{uri}: {json}");
        let error = json["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(needle),
            "{uri}: {error:?} should mention {needle:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_publish_is_already_on_the_ready_topic() {
    let kafka = TestKafka::new();
    let config = kafka.config();
    // Topics exist before the API is used (the server's start-up step).
    kafka.create_topics(&config);
    if kafka.is_real() {
        kstash::kafka::topics::ensure(&config.kafka, kstash::topics::specs(&config), None)
            .await
            .unwrap();
    }
    let app = app(&kafka);
    let req = post("/v2/publish/https://example.com/p?q=1")
        .header("content-type", "text/plain")
        .header("upstash-forward-a", "b")
        .header("upstash-timeout", "5s")
        .header("upstash-label", "l1,l2")
        .body(Body::from("stored"))
        .unwrap();
    let (status, json) = call(&app, req).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let id = json["messageId"].as_str().unwrap().to_string();

    // Once the 200 is out, the envelope must be readable from Kafka.
    let ready = format!("{}ready", config.kafka.topic_prefix);
    let records = kafka.read_until(&ready, |r| !r.is_empty());
    let envelope = Envelope::decode(&records[0]).unwrap();
    assert_eq!(envelope.message_id, id);
    assert_eq!(envelope.url, "https://example.com/p?q=1");
    assert_eq!(envelope.body, b"stored");
    assert_eq!(envelope.method, "POST");
    assert_eq!(envelope.header["Content-Type"], vec!["text/plain"]);
    assert_eq!(envelope.header["A"], vec!["b"]);
    assert_eq!(envelope.timeout_ms, Some(5000));
    assert_eq!(envelope.labels, vec!["l1", "l2"]);
    assert_eq!(envelope.retried, 0);
}

#[tokio::test]
async fn oversized_heads_and_a_full_house_are_answered_in_json() {
    let kafka = TestKafka::new();
    let app = app_with(&kafka, |c| {
        c.server.max_uri_bytes = 512;
        c.server.max_header_bytes = 1024;
        c.server.max_concurrent_requests = 1;
        c.server.body_read_timeout = Duration::from_secs(1);
    });
    let keys = || {
        Request::get("/v2/keys")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Body::empty())
            .unwrap()
    };

    let long_uri = format!("/v2/messages/msg_{}", "a".repeat(600));
    let (status, json) = call(&app, Request::get(long_uri).body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::URI_TOO_LONG, "{json}");
    assert!(json["error"].as_str().unwrap().contains("512"), "{json}");

    let mut big = keys();
    big.headers_mut()
        .insert("x-big", "b".repeat(2000).parse().unwrap());
    let (status, json) = call(&app, big).await;
    assert_eq!(
        status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "{json}"
    );

    // A publish whose body never comes holds the only request slot ...
    let trickle = post("/v2/publish/https://example.com/x")
        .body(Body::from_stream(futures::stream::pending::<
            Result<Vec<u8>, std::io::Error>,
        >()))
        .unwrap();
    let held = tokio::spawn({
        let app = app.clone();
        async move { call(&app, trickle).await }
    });
    // ... so another request is refused with 503 and Retry-After, once the slot is taken.
    let deadline = Instant::now() + common::WAIT;
    let refused = loop {
        assert!(Instant::now() < deadline, "the slot was never taken");
        let response = app.clone().oneshot(keys()).await.unwrap();
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            break response;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(refused.headers()["retry-after"], "1");
    let bytes = refused.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&bytes).expect("a JSON body");
    assert!(
        json["error"].as_str().unwrap().contains("too many"),
        "{json}"
    );

    // The trickling body misses its deadline: 408, and the slot is free again.
    let (status, json) = tokio::time::timeout(common::WAIT, held)
        .await
        .expect("the body deadline ends the request")
        .unwrap();
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{json}");
    let (status, json) = call(&app, keys()).await;
    assert_eq!(status, StatusCode::OK, "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_finish_its_request_head_is_disconnected() {
    let kafka = TestKafka::new();
    let mut config = kafka.config();
    config.server.header_read_timeout = Duration::from_secs(1);
    let kstash = kafka.start(config).await;

    let mut slow = tokio::net::TcpStream::connect(kstash.addr()).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: kstash\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(common::WAIT, slow.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "a connection that never finished its head was kept open"
    );

    // Whole requests are still served.
    let health = reqwest::get(format!("http://{}/health", kstash.addr()))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    kstash.stop().await;
}
