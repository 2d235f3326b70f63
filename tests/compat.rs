//! The rest of the QStash API (issue 9), end to end: signing-key rotation across processes under
//! load, `Upstash-Redact-Fields` in every API answer while deliveries carry the real values, the
//! `api/llm` destination routed to a configured OpenAI-compatible endpoint with the answer in the
//! callback (and the TS SDK's synchronous chat call proxied there), the per-token management rate
//! limit, and the `qstash_token` query parameter.
//!
//! Expectations about what kstash did are polled for with a deadline ([`eventually`]) or awaited
//! as deliveries, never waited for with a sleep. Runs on the embedded cluster, or on a real broker
//! with KSTASH_TEST_BROKERS.

mod common;

use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::{eventually, Api, Receiver, Script, TestKafka, CURRENT_KEY, NEXT_KEY, TOKEN};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// Messages published before and after the rotation, while the first ones are being delivered.
const LOAD_PER_PHASE: usize = 100;
/// Messages published once every process signs with the new key.
const AFTER_SWITCH: usize = 20;

/// Whether `token` verifies with `key` the way the SDK receivers check it.
fn verifies(token: &str, key: &str, body: &[u8]) -> bool {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_issuer(&["Upstash"]);
    validation.set_required_spec_claims(&["iss", "sub", "exp", "nbf"]);
    jsonwebtoken::decode::<kstash::signing::Claims>(
        token,
        &DecodingKey::from_secret(key.as_bytes()),
        &validation,
    )
    .is_ok_and(|t| t.claims.body == kstash::signing::body_hash(body))
}

/// The SDK receivers' rule: the current key, else the next one.
fn receiver_accepts(token: &str, current: &str, next: &str, body: &[u8]) -> bool {
    verifies(token, current, body) || verifies(token, next, body)
}

async fn keys(api: &Api) -> (String, String) {
    let (status, k) = api.call(Method::GET, "/v2/keys", None).await;
    assert_eq!(status, 200, "{k}");
    (
        k["current"].as_str().unwrap().to_string(),
        k["next"].as_str().unwrap().to_string(),
    )
}

fn redacted(value: &[u8]) -> String {
    format!("REDACTED:{:x}", Sha256::digest(value))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_reaches_every_process_and_receivers_holding_both_keys_reject_nothing() {
    let kafka = TestKafka::new();
    let a = kafka.start(kafka.config()).await;
    let b = kafka.start(kafka.config()).await;
    let (api_a, api_b) = (Api::new(a.addr()), Api::new(b.addr()));
    let mut receiver = Receiver::start().await;

    // The configured keys seeded the topic.
    assert_eq!(
        keys(&api_a).await,
        (CURRENT_KEY.to_string(), NEXT_KEY.to_string())
    );

    // Load through both processes; the rotation happens while the first half is delivered.
    let url = receiver.url("/signed");
    for i in 0..LOAD_PER_PHASE {
        let api = if i % 2 == 0 { &api_a } else { &api_b };
        let (status, json) = api.publish(&url, format!("before {i}"), &[]).await;
        assert_eq!(status, 200, "{json}");
    }
    let rotated_at = Instant::now();
    let (status, rotated) = api_a.call(Method::POST, "/v2/keys/rotate", None).await;
    assert_eq!(status, 200, "{rotated}");
    let new_current = rotated["current"].as_str().unwrap().to_string();
    let new_next = rotated["next"].as_str().unwrap().to_string();
    assert_eq!(new_current, NEXT_KEY, "next becomes current");
    assert!(
        new_next.starts_with("sig_") && new_next.len() >= 32,
        "{new_next}"
    );
    assert!(
        new_next != CURRENT_KEY && new_next != NEXT_KEY,
        "a fresh next key"
    );
    assert_eq!(keys(&api_a).await, (new_current.clone(), new_next.clone()));
    // The other process switches without being told; watched while the load goes on.
    let rotated = (new_current.clone(), new_next.clone());
    let watched = Api::new(b.addr());
    let switch = tokio::spawn(async move {
        eventually("the other process to serve the rotated keys", || async {
            (keys(&watched).await == rotated).then(|| rotated_at.elapsed())
        })
        .await
    });
    for i in 0..LOAD_PER_PHASE {
        let api = if i % 2 == 0 { &api_b } else { &api_a };
        let (status, json) = api.publish(&url, format!("after {i}"), &[]).await;
        assert_eq!(status, 200, "{json}");
    }

    let switched_after = switch.await.unwrap();
    eprintln!("the second process served the rotated keys {switched_after:?} after the rotation");

    // Every delivery verifies with the keys a receiver held before the rotation.
    let delivered = receiver.take(2 * LOAD_PER_PHASE).await;
    let rejected: Vec<String> = delivered
        .iter()
        .filter(|r| {
            !receiver_accepts(
                r.header("upstash-signature").unwrap_or_default(),
                CURRENT_KEY,
                NEXT_KEY,
                &r.body,
            )
        })
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert!(rejected.is_empty(), "rejected deliveries: {rejected:?}");
    let on_new_key = delivered
        .iter()
        .filter(|r| {
            verifies(
                r.header("upstash-signature").unwrap(),
                &new_current,
                &r.body,
            )
        })
        .count();
    assert!(
        on_new_key > 0,
        "some deliveries were signed after the switch"
    );

    // Once both processes switched, everything is signed with the new current key only.
    for i in 0..AFTER_SWITCH {
        let api = if i % 2 == 0 { &api_a } else { &api_b };
        let (status, json) = api.publish(&url, format!("switched {i}"), &[]).await;
        assert_eq!(status, 200, "{json}");
    }
    for r in receiver.take(AFTER_SWITCH).await {
        let token = r.header("upstash-signature").unwrap();
        assert!(
            verifies(token, &new_current, &r.body),
            "signed with the new current key"
        );
        assert!(
            !verifies(token, CURRENT_KEY, &r.body),
            "not with the old one"
        );
    }

    // The topic, not the configuration, holds the keys from now on.
    a.stop().await;
    b.stop().await;
    let c = kafka.start(kafka.config()).await;
    assert_eq!(
        keys(&Api::new(c.addr())).await,
        (new_current, new_next),
        "a restart keeps the rotated keys"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redacted_fields_are_hidden_in_every_answer_but_delivered_as_published() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    let body = b"card=4111-1111";
    let auth = "Bearer s3cret";
    let headers = [
        ("Upstash-Redact-Fields", "body, header[Authorization]"),
        ("Upstash-Forward-Authorization", auth),
        ("Upstash-Forward-X-Keep", "visible"),
        ("Upstash-Retries", "0"),
    ];

    // A pending message: GET shows the hashes, the unredacted header as it is.
    let mut delayed = headers.to_vec();
    delayed.push(("Upstash-Delay", "1h"));
    let (status, json) = api
        .publish(&receiver.url("/later"), &body[..], &delayed)
        .await;
    assert_eq!(status, 200, "{json}");
    let pending = json["messageId"].as_str().unwrap().to_string();
    let (status, m) = api
        .call(Method::GET, &format!("/v2/messages/{pending}"), None)
        .await;
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["body"], redacted(body));
    assert_eq!(
        m["header"]["Authorization"],
        json!([redacted(auth.as_bytes())])
    );
    assert_eq!(m["header"]["X-Keep"], json!(["visible"]));
    assert!(!m.to_string().contains("s3cret") && !m.to_string().contains("4111"));
    let (status, _) = api
        .call(Method::DELETE, &format!("/v2/messages/{pending}"), None)
        .await;
    assert_eq!(status, 202);

    // A delivered (and failed) one: the destination gets the real values; the DLQ and the logs
    // show the hashes.
    receiver.set(Script::status(500));
    let (status, json) = api
        .publish(&receiver.url("/now"), &body[..], &headers)
        .await;
    assert_eq!(status, 200, "{json}");
    let id = json["messageId"].as_str().unwrap().to_string();
    let got = receiver.next().await;
    assert_eq!(got.message_id(), id);
    assert_eq!(&got.body[..], body, "delivered unredacted");
    assert_eq!(got.header("authorization"), Some(auth));
    let entry = eventually("the DLQ entry", || async {
        let (_, list) = api
            .send(Method::GET, "/v2/dlq", &[("messageId", &id)], &[], None)
            .await;
        list["messages"].as_array().and_then(|m| m.first().cloned())
    })
    .await;
    assert_eq!(entry["body"], redacted(body));
    assert_eq!(
        entry["header"]["Authorization"],
        json!([redacted(auth.as_bytes())])
    );
    let created = eventually("the CREATED log entry", || async {
        api.logs(&[("messageId", &id), ("state", "CREATED")])
            .await
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(created["body"], STANDARD.encode(redacted(body)));
    assert_eq!(
        created["header"]["Authorization"],
        json!([redacted(auth.as_bytes())])
    );
    for entry in api.logs(&[("messageId", &id)]).await {
        assert!(!entry.to_string().contains("s3cret"), "{entry}");
    }

    // A DLQ retry delivers the original values.
    receiver.set(Script::ok());
    let dlq_id = entry["dlqId"].as_str().unwrap();
    let (status, json) = api
        .call(Method::POST, &format!("/v2/dlq/retry/{dlq_id}"), None)
        .await;
    assert_eq!(status, 201, "{json}");
    let again = receiver.next().await;
    assert_eq!(&again.body[..], body);
    assert_eq!(again.header("authorization"), Some(auth));

    // Schedules show their messages redacted too.
    let (status, json) = api
        .send(
            Method::POST,
            &format!("/v2/schedules/{}", receiver.url("/cron")),
            &[],
            &[
                ("Upstash-Cron", "0 4 * * *"),
                ("Upstash-Redact-Fields", "headers"),
                ("Upstash-Forward-X-Token", "tok"),
            ],
            None,
        )
        .await;
    assert_eq!(status, 200, "{json}");
    let schedule_id = json["scheduleId"].as_str().unwrap();
    let (_, schedule) = api
        .call(Method::GET, &format!("/v2/schedules/{schedule_id}"), None)
        .await;
    assert_eq!(schedule["header"]["X-Token"], json!([redacted(b"tok")]));

    // An unknown field is refused, naming it.
    let (status, json) = api
        .publish(
            &receiver.url("/x"),
            "b",
            &[("Upstash-Redact-Fields", "body,bodyy")],
        )
        .await;
    assert_eq!(status, 400);
    assert!(json["error"].as_str().unwrap().contains("bodyy"), "{json}");
    kstash.stop().await;
}

/// A local LLM endpoint: answers OpenAI chat completions (`/v1/chat/completions`) with
/// [`completion`] and Anthropic messages (`/v1/messages`) with [`anthropic_message`], and reports
/// each request's credential header (`authorization`, or `x-api-key` with `anthropic-version`)
/// and body.
struct ChatStub {
    url: String,
    requests: mpsc::UnboundedReceiver<(Option<String>, Value)>,
}

fn anthropic_message() -> Value {
    json!({
        "id": "msg_stub", "type": "message", "role": "assistant", "model": "stub",
        "content": [{"type": "text", "text": "pong"}], "stop_reason": "end_turn"
    })
}

fn completion() -> Value {
    json!({
        "id": "chatcmpl-kstash",
        "object": "chat.completion",
        "model": "stub",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"}, "finish_reason": "stop"}]
    })
}

impl ChatStub {
    async fn start() -> Self {
        type Tx = mpsc::UnboundedSender<(Option<String>, Value)>;
        async fn chat(
            State(tx): State<Tx>,
            headers: HeaderMap,
            Json(body): Json<Value>,
        ) -> axum::response::Response {
            use axum::response::IntoResponse;
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            let stream = body["stream"] == true;
            let _ = tx.send((auth, body));
            if stream {
                let events = format!("data: {}\n\ndata: [DONE]\n\n", completion());
                ([("content-type", "text/event-stream")], events).into_response()
            } else {
                (
                    [("x-ratelimit-remaining-requests", "41")],
                    Json(completion()),
                )
                    .into_response()
            }
        }
        async fn messages(
            State(tx): State<Tx>,
            headers: HeaderMap,
            Json(body): Json<Value>,
        ) -> Json<Value> {
            let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
            let _ = tx.send((
                Some(format!(
                    "{} {}",
                    header("x-api-key"),
                    header("anthropic-version")
                )),
                body,
            ));
            Json(anthropic_message())
        }
        let (tx, requests) = mpsc::unbounded_channel();
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/messages", post(messages))
            .with_state(tx);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        ChatStub { url, requests }
    }

    async fn next(&mut self) -> (Option<String>, Value) {
        tokio::time::timeout(common::WAIT, self.requests.recv())
            .await
            .expect("a chat completion request in time")
            .expect("the stub runs")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_llm_and_provider_urls_reach_the_chat_endpoint_and_answer_in_the_callback() {
    let mut stub = ChatStub::start().await;
    let kafka = TestKafka::new();
    let mut config = kafka.config();
    config.llm.base_url = stub.url.clone();
    config.llm.token = "llm-secret".into();
    let kstash = kafka.start(config).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    let request = json!({"model": "stub", "messages": [{"role": "user", "content": "ping"}]});

    // The deprecated `api/llm` (TS `api: {name: "llm"}`): to the configured endpoint, with its
    // token; the completion comes back in the callback.
    let callback = receiver.url("/llm-callback");
    let (status, json) = api
        .publish(
            "api/llm",
            request.to_string(),
            &[
                ("Content-Type", "application/json"),
                ("Upstash-Callback", &callback),
            ],
        )
        .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        json["url"],
        format!("{}/v1/chat/completions", stub.url),
        "{json}"
    );
    let (auth, body) = stub.next().await;
    assert_eq!(auth.as_deref(), Some("Bearer llm-secret"));
    assert_eq!(body, request);
    let called_back = receiver.next().await;
    let payload: Value = serde_json::from_slice(&called_back.body).unwrap();
    assert_eq!(payload["status"], 200, "{payload}");
    assert_eq!(payload["sourceMessageId"], json["messageId"]);
    let answer = STANDARD.decode(payload["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&answer).unwrap(),
        completion()
    );

    // The API shows the configured token redacted.
    let (_, json) = api
        .publish("api/llm", request.to_string(), &[("Upstash-Delay", "1h")])
        .await;
    let id = json["messageId"].as_str().unwrap();
    let (_, m) = api
        .call(Method::GET, &format!("/v2/messages/{id}"), None)
        .await;
    assert_eq!(
        m["header"]["Authorization"],
        json!([redacted(b"Bearer llm-secret")]),
        "{m}"
    );

    // The SDKs' `custom({baseUrl, token})` / `openai({token})` providers are plain publishes to
    // `<base>/v1/chat/completions` with the publisher's token forwarded.
    let (status, json) = api
        .publish(
            &format!("{}/v1/chat/completions", stub.url),
            request.to_string(),
            &[
                ("Content-Type", "application/json"),
                ("Upstash-Forward-Authorization", "Bearer user-token"),
                ("Upstash-Callback", &callback),
            ],
        )
        .await;
    assert_eq!(status, 200, "{json}");
    let (auth, _) = stub.next().await;
    assert_eq!(
        auth.as_deref(),
        Some("Bearer user-token"),
        "the publisher's own token"
    );
    let payload: Value = serde_json::from_slice(&receiver.next().await.body).unwrap();
    assert_eq!(payload["status"], 200);

    // The TS SDK's `anthropic({token})` provider: `/v1/messages` with `x-api-key` and
    // `anthropic-version` forwarded (here at the stub's address instead of api.anthropic.com).
    let (status, json) = api
        .publish(
            &format!("{}/v1/messages", stub.url),
            request.to_string(),
            &[
                ("Content-Type", "application/json"),
                ("Upstash-Forward-X-Api-Key", "ant-token"),
                ("Upstash-Forward-Anthropic-Version", "2023-06-01"),
                ("Upstash-Callback", &callback),
            ],
        )
        .await;
    assert_eq!(status, 200, "{json}");
    let (credentials, body) = stub.next().await;
    assert_eq!(credentials.as_deref(), Some("ant-token 2023-06-01"));
    assert_eq!(body, request);
    let payload: Value = serde_json::from_slice(&receiver.next().await.body).unwrap();
    let answer = STANDARD.decode(payload["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&answer).unwrap(),
        anthropic_message()
    );

    // The TS SDK's deprecated `client.chat().create(…)` (upstash provider) is proxied: the SDK's
    // own fields taken out, the configured token, the answer (JSON or a stream) passed back.
    let http = reqwest::Client::new();
    let mut chat = request.clone();
    chat["provider"] =
        json!({"owner": "upstash", "baseUrl": "https://qstash.upstash.io/llm", "token": "t"});
    chat["system"] = json!("be brief");
    let answer = http
        .post(format!("http://{}/llm/v1/chat/completions", kstash.addr()))
        .bearer_auth(TOKEN)
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["x-ratelimit-remaining-requests"],
        "41",
        "the upstream's rate-limit headers come back"
    );
    assert_eq!(answer.json::<Value>().await.unwrap(), completion());
    let (auth, body) = stub.next().await;
    assert_eq!(auth.as_deref(), Some("Bearer llm-secret"));
    assert_eq!(
        body, request,
        "without the SDK's provider and system fields"
    );
    chat["stream"] = json!(true);
    let answer = http
        .post(format!("http://{}/llm/v1/chat/completions", kstash.addr()))
        .bearer_auth(TOKEN)
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.headers()["content-type"], "text/event-stream");
    let events = answer.text().await.unwrap();
    assert!(events.ends_with("data: [DONE]\n\n"), "{events}");
    assert!(events.contains("chatcmpl-kstash"), "{events}");
    stub.next().await;

    // Any other `api/…` destination is refused.
    let (status, json) = api.publish("api/email", "x", &[]).await;
    assert_eq!(status, 400, "{json}");
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_calls_are_limited_per_token_and_publishing_is_not() {
    let kafka = TestKafka::new();
    let mut config = kafka.config();
    const LIMIT: u32 = 3;
    config.rate_limit.management_per_second = LIMIT;
    config.auth.tokens = vec![TOKEN.to_string(), "other-token".to_string()];
    let kstash = kafka.start(config).await;
    let base = format!("http://{}", kstash.addr());
    let http = reqwest::Client::new();
    let get = |token: &'static str| {
        http.get(format!("{base}/v2/queues"))
            .bearer_auth(token)
            .send()
    };

    // A burst over the budget: the calls past it get 429 with the headers the SDKs read.
    let mut limited = None;
    for _ in 0..(LIMIT * 4) {
        let response = get(TOKEN).await.unwrap();
        if response.status() == 429 {
            limited = Some(response);
            break;
        }
        assert_eq!(response.status(), 200);
    }
    let limited = limited.expect("a 429 within four times the budget");
    let header = |name: &str| {
        limited
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    assert_eq!(header("burst-ratelimit-limit").as_deref(), Some("3"));
    assert_eq!(header("burst-ratelimit-remaining").as_deref(), Some("0"));
    let reset: u64 = header("burst-ratelimit-reset").unwrap().parse().unwrap();
    let now = u64::try_from(kstash::model::now_ms() / 1000).unwrap();
    assert!((now..=now + 2).contains(&reset), "reset {reset} near {now}");
    let body: Value = limited.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("per token"),
        "{body}"
    );

    // Another token has its own budget; publishing is never limited.
    assert_eq!(get("other-token").await.unwrap().status(), 200);
    let api = Api::new(kstash.addr());
    for _ in 0..(LIMIT * 2) {
        let (status, json) = api
            .publish("https://example.com/x", "b", &[("Upstash-Delay", "1h")])
            .await;
        assert_eq!(status, 200, "{json}");
    }
    // The budget refills.
    eventually("the budget to refill", || async {
        (get(TOKEN).await.unwrap().status() == 200).then_some(())
    })
    .await;
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_may_come_in_the_query_and_never_reaches_the_destination() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let mut receiver = Receiver::start().await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", kstash.addr());
    let destination = receiver.url("/q?keep=1");

    let response = http
        .post(format!(
            "{base}/v2/publish/{destination}&qstash_token={TOKEN}&also=2"
        ))
        .body("via query")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let json: Value = response.json().await.unwrap();
    assert_eq!(json["url"], format!("{destination}&also=2"), "{json}");
    let got = receiver.next().await;
    assert_eq!(got.uri.query(), Some("keep=1&also=2"));

    let response = http
        .get(format!("{base}/v2/queues?qstash_token=wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let response = http
        .get(format!("{base}/v2/keys?qstash_token={TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    kstash.stop().await;
}
