//! The DLQ API (`/v2/dlq`) end to end: messages that failed for good are
//! listed newest first with the message and its last response (status 0 and the error after a
//! timeout), paged with `count` and `cursor`, filtered (`url`, `label`, `responseStatus`,
//! `messageId`, `dlqIds`, `fromDate`/`toDate`; `host` and `path` refused), fetched one by one,
//! deleted one by one or in bulk (ids in the query, ids in a JSON body, an explicitly empty list
//! that deletes nothing, a filter, everything), and retried as new messages, with the
//! `Upstash-*` headers of the retry call overriding the original settings.
//!
//! The API reads views that follow Kafka, so every expectation about something kstash did is
//! polled for with a deadline ([`eventually`]), never waited for with a sleep. Runs on the
//! embedded cluster, or on a real broker with KSTASH_TEST_BROKERS.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Router;
use common::{eventually, Api, Receiver, Script, TestKafka, WAIT};
use kstash::model::now_ms;
use kstash::server::Running;
use reqwest::Method;
use serde_json::{json, Value};

/// Authenticated JSON calls to kstash's API, with the DLQ shortcuts of this file.
struct Http {
    api: Api,
}

impl Http {
    fn new(addr: SocketAddr) -> Self {
        Http {
            api: Api::new(addr),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> (u16, Value) {
        self.api.send(method, path, query, headers, body).await
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> (u16, Value) {
        self.send(Method::GET, path, query, &[], None).await
    }

    async fn delete(&self, path: &str, query: &[(&str, &str)]) -> (u16, Value) {
        self.send(Method::DELETE, path, query, &[], None).await
    }

    /// `GET /v2/dlq` with `query`, insisting on 200.
    async fn list(&self, query: &[(&str, &str)]) -> Value {
        let (status, json) = self.get("/v2/dlq", query).await;
        assert_eq!(status, 200, "GET /v2/dlq {query:?}: {json}");
        assert!(json["messages"].is_array(), "{json}");
        json
    }
}

/// A running kstash with its clients.
struct Setup {
    _kafka: TestKafka,
    kstash: Running,
    api: Api,
    http: Http,
}

async fn setup() -> Setup {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let http = Http::new(kstash.addr());
    Setup {
        _kafka: kafka,
        kstash,
        api,
        http,
    }
}

/// A destination that answers every request with `status`, `body` and one header (the harness
/// receiver answers with an empty body).
async fn answering(
    status: u16,
    body: &'static str,
    header: (&'static str, &'static str),
) -> String {
    let app = Router::new().fallback(move || async move {
        let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
        response
            .headers_mut()
            .insert(header.0, header.1.parse().unwrap());
        response
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// Publishes and insists on success; returns the message id.
async fn publish(api: &Api, url: &str, body: &str, headers: &[(&str, &str)]) -> String {
    let (status, json) = api.publish(url, body.to_string(), headers).await;
    assert_eq!(status, 200, "publish to {url}: {json}");
    json["messageId"].as_str().unwrap().to_string()
}

/// The DLQ entry of `message_id`, once listed.
async fn dead_letter(http: &Http, message_id: &str) -> Value {
    eventually(&format!("{message_id} in the DLQ"), move || async move {
        let json = http.list(&[]).await;
        json["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["messageId"] == message_id)
            .cloned()
    })
    .await
}

/// Waits until the list holds exactly `message_ids`, newest first.
async fn until_listed(http: &Http, message_ids: &[&str]) {
    eventually(
        &format!("the DLQ to hold exactly {message_ids:?}"),
        || async { (message_ids_of(&http.list(&[]).await) == message_ids).then_some(()) },
    )
    .await
}

fn entries(json: &Value) -> &Vec<Value> {
    json["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages array: {json}"))
}

fn message_ids_of(json: &Value) -> Vec<String> {
    entries(json)
        .iter()
        .map(|m| m["messageId"].as_str().unwrap().to_string())
        .collect()
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

fn text(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string: {v}"))
        .to_string()
}

fn int(v: &Value, key: &str) -> i64 {
    v[key]
        .as_i64()
        .unwrap_or_else(|| panic!("{key} is not an integer: {v}"))
}

/// The cursor of a page; an absent or empty one means the end.
fn cursor(json: &Value) -> Option<String> {
    match json.get("cursor") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) if c.is_empty() => None,
        Some(Value::String(c)) => Some(c.clone()),
        Some(other) => panic!("cursor is not a string: {other}"),
    }
}

/// The values of a header map entry, whatever the case of its name.
fn header_values(map: &Value, name: &str) -> Value {
    map.as_object()
        .unwrap_or_else(|| panic!("not a header map: {map}"))
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no {name} in {map}"))
}

fn assert_json_error(what: &str, (status, json): (u16, Value), expected: u16) {
    assert_eq!(status, expected, "{what}: {json}");
    assert!(
        json["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: expected {{\"error\": …}}, got {json}"
    );
}

/// A message to publish: destination URL, body and extra headers.
type ToPublish<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

/// Publishes one message per `(url, body, extra headers)` with no retries, waiting for each to
/// reach the DLQ before the next, so that their failure times are distinct and in this order.
/// Returns the entries in publish order (oldest first).
async fn fail_one_by_one(s: &Setup, messages: &[ToPublish<'_>]) -> Vec<Value> {
    let mut out = Vec::new();
    for (url, body, extra) in messages {
        let mut headers = vec![("Upstash-Retries", "0")];
        headers.extend_from_slice(extra);
        let id = publish(&s.api, url, body, &headers).await;
        out.push(dead_letter(&s.http, &id).await);
    }
    for pair in out.windows(2) {
        assert!(
            int(&pair[1], "failedAt") > int(&pair[0], "failedAt"),
            "precondition: distinct failure times, in publish order: {pair:?}"
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_shows_entries_newest_first_with_message_and_last_response_and_pages_by_count() {
    let s = setup().await;
    let dest = answering(500, "down for maintenance", ("x-reason", "maintenance")).await;
    let started = now_ms();
    let mut published = Vec::new();
    for i in 0..3 {
        let url = format!("{dest}/item/{i}?n={i}");
        let item = i.to_string();
        let id = publish(
            &s.api,
            &url,
            &format!("payload {i}"),
            &[
                ("Upstash-Retries", "0"),
                ("Content-Type", "text/plain"),
                ("Upstash-Forward-X-Item", &item),
            ],
        )
        .await;
        // One at a time, so the order of failures is the order of publishing.
        dead_letter(&s.http, &id).await;
        published.push((id, url));
    }

    let all = s.http.list(&[]).await;
    let newest_first: Vec<String> = published.iter().rev().map(|(id, _)| id.clone()).collect();
    assert_eq!(message_ids_of(&all), newest_first, "newest first: {all}");
    assert_eq!(cursor(&all), None, "everything fits in one page: {all}");
    let mut dlq_ids = Vec::new();
    for (entry, (i, (id, url))) in entries(&all).iter().zip(published.iter().enumerate().rev()) {
        let dlq_id = text(entry, "dlqId");
        assert!(!dlq_id.is_empty() && !dlq_ids.contains(&dlq_id), "{entry}");
        dlq_ids.push(dlq_id);
        assert_eq!(&text(entry, "messageId"), id);
        assert_eq!(&text(entry, "url"), url);
        assert_eq!(entry["method"], "POST");
        assert_eq!(entry["header"]["X-Item"], json!([i.to_string()]), "{entry}");
        assert_eq!(entry["header"]["Content-Type"], json!(["text/plain"]));
        assert_eq!(text(entry, "body"), format!("payload {i}"));
        assert_eq!(entry["maxRetries"], 0);
        let (created, not_before) = (int(entry, "createdAt"), int(entry, "notBefore"));
        assert!(
            (started..=now_ms()).contains(&created),
            "createdAt {created} is unix ms of the publish"
        );
        assert_eq!(not_before, created, "no delay: due when created");
        assert_eq!(entry["responseStatus"], 500);
        assert_eq!(text(entry, "responseBody"), "down for maintenance");
        assert_eq!(
            header_values(&entry["responseHeader"], "x-reason"),
            json!(["maintenance"])
        );
    }

    // count=2: the two newest and a cursor; the cursor leads to the last one and no cursor.
    let first = s.http.list(&[("count", "2")]).await;
    assert_eq!(message_ids_of(&first), newest_first[..2], "{first}");
    let next = cursor(&first).unwrap_or_else(|| panic!("a cursor after a full page: {first}"));
    let rest = s.http.list(&[("count", "2"), ("cursor", &next)]).await;
    assert_eq!(message_ids_of(&rest), newest_first[2..], "{rest}");
    assert_eq!(cursor(&rest), None, "last page: {rest}");
    // A page that ends exactly at the last entry has no cursor either.
    let exact = s.http.list(&[("count", "3")]).await;
    assert_eq!(message_ids_of(&exact), newest_first);
    assert_eq!(cursor(&exact), None, "{exact}");
    // Too large a count is capped, not refused; nonsense is refused.
    let capped = s.http.list(&[("count", "5000")]).await;
    assert_eq!(message_ids_of(&capped), newest_first);
    assert_json_error(
        "count=0",
        s.http.get("/v2/dlq", &[("count", "0")]).await,
        400,
    );
    assert_json_error(
        "a cursor the server never gave out",
        s.http.get("/v2/dlq", &[("cursor", "not-a-cursor")]).await,
        400,
    );
    s.kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timed_out_last_attempt_is_listed_with_status_0_and_the_error() {
    let s = setup().await;
    let slow = Receiver::start().await;
    slow.set(Script::slow(Duration::from_secs(3)));
    let id = publish(
        &s.api,
        &slow.url("/slow"),
        "late",
        &[("Upstash-Retries", "0"), ("Upstash-Timeout", "1s")],
    )
    .await;
    let entry = dead_letter(&s.http, &id).await;
    assert_eq!(entry["responseStatus"], 0, "no response: {entry}");
    let error = text(&entry, "error").to_lowercase();
    assert!(
        error.contains("timed out") || error.contains("timeout"),
        "the error names the timeout: {entry}"
    );
    assert_eq!(text(&entry, "body"), "late");
    s.kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filters_select_entries_and_host_is_refused() {
    let s = setup().await;
    let down = Receiver::start().await;
    down.set(Script::status(500));
    let missing = Receiver::start().await;
    missing.set(Script::status(404));
    let (url_a, url_b, url_c) = (down.url("/a"), down.url("/b"), missing.url("/c"));
    let e = fail_one_by_one(
        &s,
        &[
            (&url_a, "zero", &[("Upstash-Label", "red")]),
            (&url_b, "one", &[("Upstash-Label", "blue")]),
            (&url_c, "two", &[("Upstash-Label", "red")]),
        ],
    )
    .await;
    let msg: Vec<String> = e.iter().map(|x| text(x, "messageId")).collect();
    let dlq: Vec<String> = e.iter().map(|x| text(x, "dlqId")).collect();
    let t1 = int(&e[1], "failedAt").to_string();
    assert_eq!(
        (&e[0]["responseStatus"], &e[2]["responseStatus"]),
        (&json!(500), &json!(404))
    );

    let http = &s.http;
    let msg = &msg;
    // `expected`: indices into `msg`, newest first.
    let check = |query: Vec<(&'static str, String)>, expected: Vec<usize>| async move {
        let pairs: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let got = http.list(&pairs).await;
        let expected: Vec<&str> = expected.iter().map(|&i| msg[i].as_str()).collect();
        assert_eq!(message_ids_of(&got), expected, "filter {query:?}: {got}");
    };
    // Newest first within every filter: e[2], e[1], e[0].
    check(vec![("url", url_a.clone())], vec![0]).await;
    check(
        vec![("url", url_a.clone()), ("url", url_c.clone())],
        vec![2, 0],
    )
    .await;
    check(vec![("label", "red".into())], vec![2, 0]).await;
    check(vec![("label", "blue".into())], vec![1]).await;
    check(vec![("label", "red,blue".into())], vec![2, 1, 0]).await;
    check(vec![("responseStatus", "500".into())], vec![1, 0]).await;
    check(vec![("responseStatus", "404".into())], vec![2]).await;
    check(vec![("messageId", msg[1].clone())], vec![1]).await;
    check(vec![("messageId", "msg_unknown".into())], vec![]).await;
    check(
        vec![("url", url_a.clone()), ("responseStatus", "404".into())],
        vec![],
    )
    .await;
    check(
        vec![("label", "red".into()), ("responseStatus", "500".into())],
        vec![0],
    )
    .await;
    // Dates are inclusive bounds on the failure time.
    check(vec![("fromDate", t1.clone())], vec![2, 1]).await;
    check(vec![("toDate", t1.clone())], vec![1, 0]).await;
    check(
        vec![("fromDate", t1.clone()), ("toDate", t1.clone())],
        vec![1],
    )
    .await;
    // By DLQ id, repeated or comma-separated; unknown ids are skipped.
    for query in [
        vec![("dlqIds", dlq[0].as_str()), ("dlqIds", dlq[2].as_str())],
        vec![("dlqIds", &format!("{},{}", dlq[0], dlq[2]))],
        vec![
            ("dlqIds", dlq[0].as_str()),
            ("dlqIds", "dlq_unknown"),
            ("dlqIds", dlq[2].as_str()),
        ],
    ] {
        let got = http.list(&query).await;
        assert_eq!(
            sorted(message_ids_of(&got)),
            sorted(vec![msg[0].clone(), msg[2].clone()]),
            "{query:?}: {got}"
        );
    }
    // The DLQ refuses host and path filters.
    assert_json_error(
        "host filter",
        http.get("/v2/dlq", &[("host", "127.0.0.1")]).await,
        400,
    );
    assert_json_error(
        "path filter",
        http.get("/v2/dlq", &[("path", "/a")]).await,
        400,
    );
    s.kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_one_returns_the_entry_and_404_for_an_unknown_id() {
    let s = setup().await;
    let down = Receiver::start().await;
    down.set(Script::status(500));
    let id = publish(
        &s.api,
        &down.url("/one"),
        "one",
        &[("Upstash-Retries", "0")],
    )
    .await;
    let entry = dead_letter(&s.http, &id).await;
    let dlq_id = text(&entry, "dlqId");

    let (status, got) = s.http.get(&format!("/v2/dlq/{dlq_id}"), &[]).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got, entry, "the same entry as in the list");
    assert_json_error(
        "unknown dlq id",
        s.http.get("/v2/dlq/dlq_unknown", &[]).await,
        404,
    );
    s.kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_one_removes_only_that_entry_and_unknown_ids_are_404() {
    let s = setup().await;
    let down = Receiver::start().await;
    down.set(Script::status(500));
    let (url_a, url_b) = (down.url("/a"), down.url("/b"));
    let e = fail_one_by_one(&s, &[(&url_a, "a", &[]), (&url_b, "b", &[])]).await;
    let (gone, kept) = (text(&e[0], "dlqId"), text(&e[1], "messageId"));

    let (status, json) = s.http.delete(&format!("/v2/dlq/{gone}"), &[]).await;
    assert_eq!(status, 200, "{json}");
    eventually("the deleted entry to be 404", || async {
        (s.http.get(&format!("/v2/dlq/{gone}"), &[]).await.0 == 404).then_some(())
    })
    .await;
    until_listed(&s.http, &[kept.as_str()]).await;
    assert_json_error(
        "deleting it again",
        s.http.delete(&format!("/v2/dlq/{gone}"), &[]).await,
        404,
    );
    assert_json_error(
        "deleting an unknown id",
        s.http.delete("/v2/dlq/dlq_unknown", &[]).await,
        404,
    );
    // The other entry is untouched.
    let (status, json) = s
        .http
        .get(&format!("/v2/dlq/{}", text(&e[1], "dlqId")), &[])
        .await;
    assert_eq!(status, 200, "{json}");
    s.kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulk_delete_by_query_ids_json_ids_filter_and_all_and_an_empty_list_deletes_nothing() {
    let s = setup().await;
    let down = Receiver::start().await;
    down.set(Script::status(500));
    let (keep, drop) = (down.url("/keep"), down.url("/drop"));
    let e = fail_one_by_one(
        &s,
        &[
            (&keep, "0", &[]),
            (&keep, "1", &[]),
            (&drop, "2", &[]),
            (&drop, "3", &[]),
            (&keep, "4", &[]),
            (&keep, "5", &[]),
        ],
    )
    .await;
    let msg: Vec<String> = e.iter().map(|x| text(x, "messageId")).collect();
    let dlq: Vec<String> = e.iter().map(|x| text(x, "dlqId")).collect();
    let listed =
        |ids: &[usize]| -> Vec<&str> { ids.iter().rev().map(|&i| msg[i].as_str()).collect() };
    let deleted = |(status, json): (u16, Value), n: u64, what: &str| {
        assert_eq!(status, 200, "{what}: {json}");
        assert_eq!(json["deleted"], n, "{what}: {json}");
    };

    // The TypeScript form: ids in the query.
    deleted(
        s.http.delete("/v2/dlq", &[("dlqIds", &dlq[0])]).await,
        1,
        "dlqIds in the query",
    );
    until_listed(&s.http, &listed(&[1, 2, 3, 4, 5])).await;

    // The Python form: ids in a JSON body; unknown ids are skipped.
    let body = json!({ "dlqIds": [dlq[1], "dlq_unknown"] });
    deleted(
        s.http
            .send(Method::DELETE, "/v2/dlq", &[], &[], Some(&body))
            .await,
        1,
        "dlqIds in a JSON body",
    );
    until_listed(&s.http, &listed(&[2, 3, 4, 5])).await;

    // An explicitly empty list deletes nothing (never "everything").
    let empty = json!({ "dlqIds": [] });
    deleted(
        s.http
            .send(Method::DELETE, "/v2/dlq", &[], &[], Some(&empty))
            .await,
        0,
        "an empty dlqIds list",
    );
    assert_eq!(
        message_ids_of(&s.http.list(&[]).await),
        listed(&[2, 3, 4, 5]),
        "the empty list left every entry in place"
    );

    // By filter: only the entries for that URL.
    deleted(
        s.http.delete("/v2/dlq", &[("url", &drop)]).await,
        2,
        "url filter",
    );
    until_listed(&s.http, &listed(&[4, 5])).await;

    // No ids and no filter: everything.
    deleted(s.http.delete("/v2/dlq", &[]).await, 2, "no ids, no filter");
    until_listed(&s.http, &[]).await;
    for id in &dlq {
        assert_eq!(s.http.get(&format!("/v2/dlq/{id}"), &[]).await.0, 404);
    }
    s.kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_one_delivers_a_new_message_with_the_original_body_and_removes_the_entry() {
    let s = setup().await;
    let mut receiver = Receiver::start().await;
    receiver.set(Script::status(500));
    let original = publish(
        &s.api,
        &receiver.url("/again"),
        "retry me",
        &[
            ("Upstash-Retries", "0"),
            ("Content-Type", "text/plain"),
            ("Upstash-Forward-X-Origin", "first publish"),
        ],
    )
    .await;
    assert_eq!(receiver.next().await.message_id(), original);
    let dlq_id = text(&dead_letter(&s.http, &original).await, "dlqId");

    receiver.set(Script::ok());
    let (status, json) = s
        .http
        .send(
            Method::POST,
            &format!("/v2/dlq/retry/{dlq_id}"),
            &[],
            &[],
            None,
        )
        .await;
    assert_eq!(status, 201, "{json}");
    let retried = text(&json, "messageId");
    assert!(retried.starts_with("msg_"), "{json}");
    assert_ne!(retried, original, "a retry is a new message");

    let got = receiver.next().await;
    assert_eq!(got.message_id(), retried);
    assert_eq!(&got.body[..], b"retry me", "the original body");
    assert_eq!(got.header("x-origin"), Some("first publish"));
    assert_eq!(got.header("content-type"), Some("text/plain"));
    assert_eq!(got.header("upstash-retried"), Some("0"));

    eventually("the retried entry to be 404", || async {
        (s.http.get(&format!("/v2/dlq/{dlq_id}"), &[]).await.0 == 404).then_some(())
    })
    .await;
    until_listed(&s.http, &[]).await;
    assert_json_error(
        "retrying it again",
        s.http
            .send(
                Method::POST,
                &format!("/v2/dlq/retry/{dlq_id}"),
                &[],
                &[],
                None,
            )
            .await,
        404,
    );
    assert_json_error(
        "retrying an unknown id",
        s.http
            .send(Method::POST, "/v2/dlq/retry/dlq_unknown", &[], &[], None)
            .await,
        404,
    );
    s.kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulk_retry_by_query_ids_json_ids_and_filter_delivers_new_messages() {
    let s = setup().await;
    let mut receiver = Receiver::start().await;
    receiver.set(Script::status(500));
    let (by_ids, by_filter) = (receiver.url("/ids"), receiver.url("/filter"));
    let e = fail_one_by_one(
        &s,
        &[
            (&by_ids, "body 0", &[]),
            (&by_ids, "body 1", &[]),
            (&by_ids, "body 2", &[]),
            (&by_filter, "body 3", &[]),
        ],
    )
    .await;
    let msg: Vec<String> = e.iter().map(|x| text(x, "messageId")).collect();
    let dlq: Vec<String> = e.iter().map(|x| text(x, "dlqId")).collect();
    // Take in the first (failed) attempts.
    receiver
        .collect_until(WAIT, |seen| msg.iter().all(|m| seen.contains_key(m)))
        .await;
    receiver.set(Script::ok());

    /// The new message ids of a bulk retry answer.
    fn new_ids((status, json): (u16, Value), n: usize) -> Vec<String> {
        assert!((200..300).contains(&status), "{json}");
        let responses = json["responses"]
            .as_array()
            .unwrap_or_else(|| panic!("no responses: {json}"));
        assert_eq!(responses.len(), n, "{json}");
        responses.iter().map(|r| text(r, "messageId")).collect()
    }
    let retry = |query: Vec<(&'static str, String)>, body: Option<Value>| {
        let http = &s.http;
        async move {
            let pairs: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
            http.send(Method::POST, "/v2/dlq/retry", &pairs, &[], body.as_ref())
                .await
        }
    };

    // The TypeScript form: ids in the query.
    let mut fresh = new_ids(
        retry(
            vec![("dlqIds", dlq[0].clone()), ("dlqIds", dlq[1].clone())],
            None,
        )
        .await,
        2,
    );
    until_listed(&s.http, &[msg[3].as_str(), msg[2].as_str()]).await;
    // An explicitly empty JSON list retries nothing.
    new_ids(retry(vec![], Some(json!({ "dlqIds": [] }))).await, 0);
    assert_eq!(
        message_ids_of(&s.http.list(&[]).await),
        [msg[3].as_str(), msg[2].as_str()]
    );
    // Ids in a JSON body.
    fresh.extend(new_ids(
        retry(vec![], Some(json!({ "dlqIds": [dlq[2]] }))).await,
        1,
    ));
    until_listed(&s.http, &[msg[3].as_str()]).await;
    // By filter.
    fresh.extend(new_ids(
        retry(vec![("url", by_filter.clone())], None).await,
        1,
    ));
    until_listed(&s.http, &[]).await;

    assert_eq!(sorted(fresh.clone()).len(), 4);
    for id in &fresh {
        assert!(
            !msg.contains(id),
            "retries get new ids: {fresh:?} vs {msg:?}"
        );
    }
    let mut bodies = Vec::new();
    while bodies.len() < fresh.len() {
        let got = receiver.next().await;
        assert!(fresh.contains(&got.message_id()), "unexpected delivery");
        assert_eq!(got.header("upstash-retried"), Some("0"));
        bodies.push(String::from_utf8(got.body.to_vec()).unwrap());
    }
    bodies.sort();
    assert_eq!(bodies, ["body 0", "body 1", "body 2", "body 3"]);
    s.kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstash_headers_of_the_retry_call_override_the_original_settings() {
    let s = setup().await;
    let mut receiver = Receiver::start().await;
    receiver.set(Script::status(500)); // and it stays down
    let original = publish(
        &s.api,
        &receiver.url("/down"),
        "same body",
        &[
            ("Upstash-Retries", "3"),
            ("Upstash-Retry-Delay", "50"),
            ("Content-Type", "text/plain"),
            ("Upstash-Forward-X-Version", "1"),
        ],
    )
    .await;
    let first = dead_letter(&s.http, &original).await;
    assert_eq!(first["maxRetries"], 3, "{first}");
    let old_dlq_id = text(&first, "dlqId");

    let (status, json) = s
        .http
        .send(
            Method::POST,
            &format!("/v2/dlq/retry/{old_dlq_id}"),
            &[],
            &[
                ("Upstash-Retries", "0"),
                ("Upstash-Forward-X-Version", "2"),
                ("Content-Type", "application/json"),
            ],
            None,
        )
        .await;
    assert_eq!(status, 201, "{json}");
    let retried = text(&json, "messageId");

    // With 0 retries the new message fails at its first attempt and is dead-lettered again;
    // with the original 3 it would be attempted 4 times and keep maxRetries 3.
    let again = dead_letter(&s.http, &retried).await;
    assert_ne!(text(&again, "dlqId"), old_dlq_id, "a new DLQ entry");
    assert_eq!(again["maxRetries"], 0, "Upstash-Retries override: {again}");
    assert_eq!(again["header"]["X-Version"], json!(["2"]), "{again}");
    assert_eq!(
        again["header"]["Content-Type"],
        json!(["text/plain"]),
        "the retry call's own Content-Type is not a setting: {again}"
    );
    assert_eq!(text(&again, "body"), "same body");
    let delivered = loop {
        let got = receiver.next().await;
        if got.message_id() == retried {
            break got;
        }
    };
    assert_eq!(delivered.header("x-version"), Some("2"));
    assert_eq!(delivered.header("content-type"), Some("text/plain"));
    assert_eq!(&delivered.body[..], b"same body");
    // Every attempt reached the receiver before the entry was written.
    assert_eq!(
        receiver.counts().get(&retried),
        Some(&1),
        "one attempt of the retried message"
    );
    eventually("the original entry to be gone", || async {
        (s.http.get(&format!("/v2/dlq/{old_dlq_id}"), &[]).await.0 == 404).then_some(())
    })
    .await;
    until_listed(&s.http, &[retried.as_str()]).await;
    s.kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_id_named_twice_is_acted_on_once_and_retry_can_add_a_callback() {
    let s = setup().await;
    let mut receiver = Receiver::start().await;
    receiver.set(Script::status(500));
    let original = publish(
        &s.api,
        &receiver.url("/twice"),
        "x",
        &[("Upstash-Retries", "0")],
    )
    .await;
    assert_eq!(receiver.next().await.message_id(), original);
    let dlq_id = text(&dead_letter(&s.http, &original).await, "dlqId");

    receiver.set(Script::ok());
    let callback = receiver.url("/callback");
    let (status, json) = s
        .http
        .send(
            Method::POST,
            "/v2/dlq/retry",
            &[("dlqIds", dlq_id.as_str()), ("dlqIds", dlq_id.as_str())],
            &[("Upstash-Callback", callback.as_str())],
            None,
        )
        .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        entries_of_responses(&json),
        1,
        "one entry, one new message: {json}"
    );
    let retried = json["responses"][0]["messageId"]
        .as_str()
        .unwrap()
        .to_string();
    // The retried message is delivered, then its callback (added by the retry call) arrives.
    let mut seen = Vec::new();
    for _ in 0..2 {
        let got = receiver.next().await;
        seen.push((got.uri.path().to_string(), got.body.clone()));
    }
    assert!(seen.iter().any(|(p, _)| p == "/twice"), "{seen:?}");
    let (_, cb_body) = seen
        .iter()
        .find(|(p, _)| p == "/callback")
        .expect("callback arrived");
    let payload: Value = serde_json::from_slice(cb_body).unwrap();
    assert_eq!(payload["sourceMessageId"], retried.as_str());
}

fn entries_of_responses(json: &Value) -> usize {
    json["responses"].as_array().map_or(0, Vec::len)
}
