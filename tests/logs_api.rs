//! The log API (`GET /v2/events`, which the SDKs call, and `GET /v2/logs`, which the docs
//! describe) end to end: the same entries under `events` and
//! `logs`, newest first; the lifecycle of a delivered message (CREATED with its header and base64
//! body, ACTIVE, DELIVERED) and of a failing one (ERROR with the response under both
//! `responseHeader` and `responseHeaders`, RETRY with `nextDeliveryTime`, FAILED); every filter
//! (`messageId`, `messageIds`, `state` with IN_PROGRESS and both spellings of cancelled, `url`,
//! `label`, `host`, `path`, dates); and paging with `count` and a string `cursor` that walks
//! every entry once.
//!
//! The log follows the events topic, so every expectation about something kstash did is polled
//! for with a deadline ([`eventually`]), never waited for with a sleep. Runs on the embedded
//! cluster, or on a real broker with KSTASH_TEST_BROKERS.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::{eventually, Api, Receiver, TestKafka, WAIT};
use kstash::model::now_ms;
use kstash::server::Running;
use serde_json::{json, Value};

/// Enough to hold every entry of one test in one page.
const ALL: &str = "1000";

/// Authenticated JSON calls to kstash's API, with the log shortcuts of this file.
struct Http {
    api: Api,
}

impl Http {
    fn new(addr: SocketAddr) -> Self {
        Http {
            api: Api::new(addr),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
    ) -> (u16, Value) {
        self.api.send(method, path, query, &[], None).await
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, query).await
    }

    /// One page of `GET /v2/events`, insisting on 200 and an `events` array.
    async fn events(&self, query: &[(&str, &str)]) -> Value {
        self.page("/v2/events", "events", query).await
    }

    /// One page of `path`, insisting on 200 and a `key` array.
    async fn page(&self, path: &str, key: &str, query: &[(&str, &str)]) -> Value {
        let (status, json) = self.get(path, query).await;
        assert_eq!(status, 200, "GET {path} {query:?}: {json}");
        assert!(
            json[key].is_array(),
            "GET {path} answers {{\"{key}\": […]}}: {json}"
        );
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

/// A destination on `ip` that answers every request with `status`, `body` and one header.
async fn answering(
    ip: &str,
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
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
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

fn entries<'a>(json: &'a Value, key: &str) -> &'a Vec<Value> {
    json[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} array: {json}"))
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

/// `(messageId, state)` of each entry.
fn id_states(list: &[Value]) -> Vec<(String, String)> {
    list.iter()
        .map(|e| (text(e, "messageId"), text(e, "state")))
        .collect()
}

/// The states of one message's entries, oldest first.
fn states_in_time_order(list: &[Value], message_id: &str) -> Vec<String> {
    let mut states: Vec<String> = list
        .iter()
        .filter(|e| e["messageId"] == message_id)
        .map(|e| text(e, "state"))
        .collect();
    states.reverse();
    states
}

fn assert_newest_first(list: &[Value]) {
    for pair in list.windows(2) {
        assert!(
            int(&pair[0], "time") >= int(&pair[1], "time"),
            "newest first: {} before {}",
            pair[0],
            pair[1]
        );
    }
}

/// The entry of `message_id` in `state`.
fn entry<'a>(list: &'a [Value], message_id: &str, state: &str) -> &'a Value {
    list.iter()
        .find(|e| e["messageId"] == message_id && e["state"] == state)
        .unwrap_or_else(|| panic!("no {state} entry for {message_id}"))
}

/// Waits until the log of `message_id` has an entry in `state`; returns that message's entries.
async fn until_state(http: &Http, message_id: &str, state: &str) -> Vec<Value> {
    eventually(&format!("{message_id} {state}"), move || async move {
        let json = http
            .events(&[("messageId", message_id), ("count", ALL)])
            .await;
        let list = entries(&json, "events");
        list.iter()
            .any(|e| e["state"] == state)
            .then(|| list.clone())
    })
    .await
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

/// The cursor of a page: absent at the end, else a non-empty string.
fn cursor(json: &Value) -> Option<String> {
    json.get("cursor").map(|c| {
        let c = c
            .as_str()
            .unwrap_or_else(|| panic!("cursor is not a string: {json}"));
        assert!(!c.is_empty(), "an empty cursor instead of none: {json}");
        c.to_string()
    })
}

/// Every entry of `path` matching `query`, page by page with `count`; checks that every page
/// but the last is full and has a cursor, and that the last has no `cursor` key.
async fn walk(
    http: &Http,
    path: &str,
    key: &str,
    query: &[(&str, &str)],
    count: usize,
) -> Vec<Value> {
    let count_text = count.to_string();
    let mut all = Vec::new();
    let mut next: Option<String> = None;
    for _ in 0..10_000 {
        let mut q = query.to_vec();
        q.push(("count", &count_text));
        if let Some(c) = &next {
            q.push(("cursor", c));
        }
        let page = http.page(path, key, &q).await;
        let list = entries(&page, key);
        assert!(
            list.len() <= count,
            "page larger than count {count}: {page}"
        );
        all.extend(list.iter().cloned());
        next = cursor(&page);
        match &next {
            Some(_) => assert_eq!(list.len(), count, "a page before the last is full"),
            None => return all,
        }
    }
    panic!("paging did not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_and_logs_list_a_delivery_newest_first_with_the_published_message() {
    let s = setup().await;
    let mut receiver = Receiver::start().await;
    let url = receiver.url("/hook?x=1");
    let started = now_ms();
    let id = publish(
        &s.api,
        &url,
        "hello logs",
        &[
            ("Content-Type", "text/plain"),
            ("Upstash-Forward-X-Test", "yes"),
            ("Upstash-Label", "greeting"),
        ],
    )
    .await;
    assert_eq!(receiver.next().await.message_id(), id);
    let mine = until_state(&s.http, &id, "DELIVERED").await;

    // Both endpoints, filtered or not, list the same entries under their own key.
    let by_id = [("messageId", id.as_str())];
    let events = s.http.page("/v2/events", "events", &by_id).await;
    let logs = s.http.page("/v2/logs", "logs", &by_id).await;
    assert_eq!(events["events"], logs["logs"]);
    assert!(events.get("logs").is_none() && logs.get("events").is_none());
    let all_events = s.http.page("/v2/events", "events", &[]).await;
    let all_logs = s.http.page("/v2/logs", "logs", &[]).await;
    assert_eq!(all_events["events"], all_logs["logs"]);
    assert_eq!(
        all_events["events"],
        json!(mine),
        "only this message so far"
    );

    let list = entries(&events, "events");
    assert_newest_first(list);
    assert_eq!(
        states_in_time_order(list, &id),
        ["CREATED", "ACTIVE", "DELIVERED"],
        "{events}"
    );
    for e in list {
        assert_eq!(text(e, "messageId"), id);
        assert_eq!(text(e, "url"), url);
        let time = int(e, "time");
        assert!((started..=now_ms()).contains(&time), "time is unix ms: {e}");
        assert_eq!(e["label"], "greeting", "{e}");
    }
    let created = entry(list, &id, "CREATED");
    assert_eq!(created["header"]["X-Test"], json!(["yes"]), "{created}");
    assert_eq!(created["header"]["Content-Type"], json!(["text/plain"]));
    assert_eq!(
        text(created, "body"),
        STANDARD.encode("hello logs"),
        "log bodies are base64"
    );
    assert_eq!(entry(list, &id, "DELIVERED")["responseStatus"], 200);
    s.kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filters_select_entries_by_message_state_url_label_host_path_and_date() {
    let s = setup().await;
    let receiver = Receiver::start().await;
    // Another host (127.0.0.2 is loopback too), whose destination always fails.
    let elsewhere = answering("127.0.0.2", 500, "no", ("x-reason", "down")).await;
    let (url_a, url_b, url_c, url_d) = (
        receiver.url("/a"),
        receiver.url("/b"),
        format!("{elsewhere}/c"),
        receiver.url("/d"),
    );
    let a = publish(&s.api, &url_a, "a", &[("Upstash-Label", "red")]).await;
    let b = publish(&s.api, &url_b, "b", &[("Upstash-Label", "blue")]).await;
    let c = publish(&s.api, &url_c, "c", &[("Upstash-Retries", "0")]).await;
    // D waits long enough to be cancelled first.
    let d = publish(&s.api, &url_d, "d", &[("Upstash-Delay", "8s")]).await;
    eventually("D to be pending", || async {
        let (status, _) = s.http.get(&format!("/v2/messages/{d}"), &[]).await;
        (status == 200).then_some(())
    })
    .await;
    let (status, json) = s
        .http
        .call(reqwest::Method::DELETE, &format!("/v2/messages/{d}"), &[])
        .await;
    assert!((200..300).contains(&status), "cancel D: {json}");
    for (id, last) in [
        (&a, "DELIVERED"),
        (&b, "DELIVERED"),
        (&c, "FAILED"),
        (&d, "CANCELED"),
    ] {
        until_state(&s.http, id, last).await;
    }

    // Nothing more happens now: the whole log is the reference for every filter.
    let full_json = s.http.events(&[("count", ALL)]).await;
    let full = entries(&full_json, "events").clone();
    assert_newest_first(&full);
    for (id, states) in [
        (&a, vec!["CREATED", "ACTIVE", "DELIVERED"]),
        (&b, vec!["CREATED", "ACTIVE", "DELIVERED"]),
        (&c, vec!["CREATED", "ACTIVE", "ERROR", "FAILED"]),
        (&d, vec!["CREATED", "CANCEL_REQUESTED", "CANCELED"]),
    ] {
        assert_eq!(states_in_time_order(&full, id), states, "{full_json}");
    }
    assert_eq!(full.len(), 13);

    let check = |query: Vec<(&'static str, String)>, keep: &dyn Fn(&Value) -> bool| {
        let expected: Vec<Value> = full.iter().filter(|e| keep(e)).cloned().collect();
        let total = full.len();
        let http = &s.http;
        async move {
            assert!(
                !expected.is_empty() && expected.len() < total,
                "a filter test must select some entries, not all"
            );
            let mut pairs: Vec<(&str, &str)> =
                query.iter().map(|(k, v)| (*k, v.as_str())).collect();
            pairs.push(("count", ALL));
            for (path, key) in [("/v2/events", "events"), ("/v2/logs", "logs")] {
                let got = http.page(path, key, &pairs).await;
                assert_eq!(
                    id_states(entries(&got, key)),
                    id_states(&expected),
                    "{path} {query:?}"
                );
                assert_eq!(got[key], json!(expected), "{path} {query:?}");
            }
        }
    };
    let is = |id: &String| {
        let id = id.clone();
        move |e: &Value| e["messageId"] == id.as_str()
    };
    let state_in =
        |states: &'static [&'static str]| move |e: &Value| states.iter().any(|s| e["state"] == *s);

    check(vec![("messageId", a.clone())], &is(&a)).await;
    check(
        vec![("messageIds", a.clone()), ("messageIds", b.clone())],
        &|e| is(&a)(e) || is(&b)(e),
    )
    .await;
    check(vec![("messageIds", format!("{c},{d}"))], &|e| {
        is(&c)(e) || is(&d)(e)
    })
    .await;
    check(
        vec![("state", "DELIVERED".into())],
        &state_in(&["DELIVERED"]),
    )
    .await;
    check(
        vec![("state", "IN_PROGRESS".into())],
        &state_in(&["ACTIVE", "RETRY", "ERROR"]),
    )
    .await;
    check(vec![("state", "FAILED".into())], &state_in(&["FAILED"])).await;
    check(
        vec![("state", "CANCELLED".into())],
        &state_in(&["CANCELED"]),
    )
    .await;
    check(vec![("state", "CANCELED".into())], &state_in(&["CANCELED"])).await;
    check(vec![("url", url_b.clone())], &is(&b)).await;
    check(vec![("label", "red".into())], &is(&a)).await;
    check(
        vec![("label", "red".into()), ("label", "blue".into())],
        &|e| is(&a)(e) || is(&b)(e),
    )
    .await;
    check(vec![("host", "127.0.0.2".into())], &is(&c)).await;
    check(vec![("host", "127.0.0.1".into())], &|e| !is(&c)(e)).await;
    check(vec![("path", "/b".into())], &is(&b)).await;
    check(
        vec![("label", "red".into()), ("state", "DELIVERED".into())],
        &|e| is(&a)(e) && e["state"] == "DELIVERED",
    )
    .await;
    check(
        vec![("messageId", c.clone()), ("state", "IN_PROGRESS".into())],
        &|e| is(&c)(e) && (e["state"] == "ACTIVE" || e["state"] == "ERROR"),
    )
    .await;
    // Dates are inclusive bounds on the entry time.
    // D's cancel request: after the other publishes, 8 s before D's CANCELED.
    let middle = int(entry(&full, &d, "CANCEL_REQUESTED"), "time");
    let time = |e: &Value| int(e, "time");
    check(vec![("fromDate", middle.to_string())], &|e| {
        time(e) >= middle
    })
    .await;
    check(vec![("toDate", middle.to_string())], &|e| time(e) <= middle).await;
    check(
        vec![
            ("fromDate", middle.to_string()),
            ("toDate", middle.to_string()),
        ],
        &|e| time(e) == middle,
    )
    .await;

    assert_json_error(
        "an unknown state",
        s.http.get("/v2/events", &[("state", "SLEEPING")]).await,
        400,
    );
    assert_json_error(
        "an unknown state on /v2/logs",
        s.http.get("/v2/logs", &[("state", "SLEEPING")]).await,
        400,
    );
    s.kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn count_and_cursor_page_through_every_entry_exactly_once() {
    const MESSAGES: usize = 34; // 3 entries each: 102, more than the default page
    let s = setup().await;
    let mut receiver = Receiver::start().await;
    let url = receiver.url("/many");
    let ids: Vec<String> = futures::future::join_all((0..MESSAGES).map(|i| {
        let (api, url) = (&s.api, &url);
        async move { publish(api, url, &format!("body {i}"), &[]).await }
    }))
    .await;
    receiver
        .collect_until(WAIT, |seen| ids.iter().all(|id| seen.contains_key(id)))
        .await;
    eventually("every message DELIVERED in the log", || async {
        let json = s
            .http
            .events(&[("state", "DELIVERED"), ("count", ALL)])
            .await;
        (entries(&json, "events").len() == MESSAGES).then_some(())
    })
    .await;
    let full_json = s.http.events(&[("count", ALL)]).await;
    let full = entries(&full_json, "events").clone();
    assert_eq!(full.len(), 3 * MESSAGES);
    assert_newest_first(&full);
    let unique: HashSet<(String, String)> = id_states(&full).into_iter().collect();
    assert_eq!(
        unique.len(),
        full.len(),
        "(messageId, state) identifies an entry"
    );

    // Without count: at most 100, then the cursor leads on to the rest.
    let first = s.http.events(&[]).await;
    assert_eq!(entries(&first, "events")[..], full[..100], "default page");
    let next = cursor(&first).expect("a cursor after a full default page");
    let rest = s.http.events(&[("cursor", &next)]).await;
    assert_eq!(entries(&rest, "events")[..], full[100..]);
    assert!(
        rest.get("cursor").is_none(),
        "no cursor key on the last page: {rest}"
    );

    // count=2: two entries and a string cursor.
    let two = s.http.events(&[("count", "2")]).await;
    assert_eq!(entries(&two, "events")[..], full[..2]);
    assert!(two["cursor"].is_string(), "the cursor is a string: {two}");

    // Walking with any count gives every entry once, in order, on both endpoints.
    for count in [7, 100, 101, 102, 500] {
        let walked = walk(&s.http, "/v2/events", "events", &[], count).await;
        assert_eq!(walked, full, "walk with count={count}");
    }
    assert_eq!(walk(&s.http, "/v2/logs", "logs", &[], 10).await, full);
    // With a filter, the cursor walks the filtered entries.
    let some: Vec<&str> = ids[..5].iter().map(String::as_str).collect();
    let filter: Vec<(&str, &str)> = some.iter().map(|id| ("messageIds", *id)).collect();
    let expected: Vec<Value> = full
        .iter()
        .filter(|e| some.iter().any(|id| e["messageId"] == *id))
        .cloned()
        .collect();
    assert_eq!(expected.len(), 15);
    assert_eq!(
        walk(&s.http, "/v2/events", "events", &filter, 2).await,
        expected
    );

    // Above 1000 is capped, not refused; nonsense is refused.
    let capped = s.http.events(&[("count", "5000")]).await;
    assert_eq!(entries(&capped, "events")[..], full[..]);
    assert!(capped.get("cursor").is_none(), "{capped}");
    for (what, query) in [
        ("count=0", [("count", "0")]),
        ("a negative count", [("count", "-1")]),
        ("a count that is not a number", [("count", "many")]),
        ("a garbage cursor", [("cursor", "not-a-cursor")]),
        ("a negative cursor", [("cursor", "-5")]),
    ] {
        assert_json_error(what, s.http.get("/v2/events", &query).await, 400);
        assert_json_error(what, s.http.get("/v2/logs", &query).await, 400);
    }
    s.kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_attempts_carry_the_response_and_retries_the_next_delivery_time() {
    let s = setup().await;
    let dest = answering("127.0.0.1", 500, "boom", ("x-reason", "overloaded")).await;
    let id = publish(
        &s.api,
        &format!("{dest}/fail"),
        "x",
        &[("Upstash-Retries", "1"), ("Upstash-Retry-Delay", "200")],
    )
    .await;
    let list = until_state(&s.http, &id, "FAILED").await;
    assert_newest_first(&list);
    assert_eq!(
        states_in_time_order(&list, &id),
        ["CREATED", "ACTIVE", "ERROR", "RETRY", "ACTIVE", "ERROR", "FAILED"]
    );
    let errors: Vec<&Value> = list.iter().filter(|e| e["state"] == "ERROR").collect();
    for e in &errors {
        assert_eq!(e["responseStatus"], 500, "{e}");
        assert!(
            e["responseHeader"].is_object(),
            "Python reads responseHeader: {e}"
        );
        assert_eq!(
            e["responseHeaders"], e["responseHeader"],
            "the docs say responseHeaders: {e}"
        );
        assert_eq!(
            header_values(&e["responseHeader"], "x-reason"),
            json!(["overloaded"])
        );
        assert_eq!(text(e, "responseBody"), STANDARD.encode("boom"), "{e}");
        assert!(!text(e, "error").is_empty());
    }
    let retry = entry(&list, &id, "RETRY");
    let (retry_time, next) = (int(retry, "time"), int(retry, "nextDeliveryTime"));
    assert!(
        (retry_time + 200..=retry_time + 1000).contains(&next),
        "Upstash-Retry-Delay: 200 ms after the failure: {retry}"
    );
    // The second attempt (the newest ACTIVE) was not early.
    let second_attempt = list.iter().find(|e| e["state"] == "ACTIVE").unwrap();
    assert!(
        int(second_attempt, "time") >= next,
        "{second_attempt} before {next}"
    );
    assert!(!text(entry(&list, &id, "FAILED"), "error").is_empty());
    s.kstash.stop().await;
}
