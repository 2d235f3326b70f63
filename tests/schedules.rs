//! Schedules end to end: the schedule API (create, upsert, get, list, pause, resume, delete, bad
//! cron), and a schedule firing every minute, on time, with its id on each message. The takeover
//! of a killed owner is in tests/process.rs.

mod common;

use std::time::Duration;

use common::{Api, Receiver, TestKafka};
use reqwest::Method;

/// A minute and a margin: the longest wait for the next fire of an every-minute schedule.
const NEXT_MINUTE: Duration = Duration::from_secs(75);
/// How late after its minute a fire may arrive.
const ON_TIME: i64 = 1000;
const MINUTE_MS: i64 = 60_000;

async fn create(
    api: &Api,
    destination: &str,
    headers: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    api.publish_path(&format!("/v2/schedules/{destination}"), "tick", headers)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_schedule_api_creates_updates_pauses_and_deletes() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let (status, created) = create(
        &api,
        "https://example.com/cron",
        &[
            ("Upstash-Cron", "CRON_TZ=Europe/Berlin 0 9 * * 1-5"),
            ("Upstash-Retries", "2"),
            ("Upstash-Delay", "30s"),
            ("Upstash-Forward-X-Job", "report"),
            ("Content-Type", "application/json"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let id = created["scheduleId"].as_str().unwrap().to_string();
    assert!(id.starts_with("scd_"));
    let (status, s) = api
        .call(Method::GET, &format!("/v2/schedules/{id}"), None)
        .await;
    assert_eq!(status, 200, "{s}");
    for key in [
        "scheduleId",
        "destination",
        "cron",
        "createdAt",
        "method",
        "retries",
    ] {
        assert!(s.get(key).is_some(), "{key} in {s}");
    }
    assert_eq!(s["cron"], "CRON_TZ=Europe/Berlin 0 9 * * 1-5");
    assert_eq!(
        (s["retries"].as_u64(), s["delay"].as_u64()),
        (Some(2), Some(30))
    );
    assert_eq!(s["header"]["X-Job"][0], "report");
    assert_eq!(s["body"], "tick");
    assert_eq!(s["isPaused"], false);
    assert!(s["nextScheduleTime"].as_i64().unwrap() > kstash::model::now_ms());

    // The same id updates in place.
    let (status, again) = create(
        &api,
        "https://example.com/other",
        &[
            ("Upstash-Cron", "*/5 * * * *"),
            ("Upstash-Schedule-Id", &id),
        ],
    )
    .await;
    assert_eq!(
        (status, again["scheduleId"].as_str()),
        (200, Some(id.as_str()))
    );
    let (_, s2) = api
        .call(Method::GET, &format!("/v2/schedules/{id}"), None)
        .await;
    assert_eq!(
        (s2["cron"].as_str(), s2["destination"].as_str()),
        (Some("*/5 * * * *"), Some("https://example.com/other"))
    );
    assert_eq!(s2["createdAt"], s["createdAt"]);

    for method in [Method::PATCH, Method::POST] {
        let (status, paused) = api
            .call(method.clone(), &format!("/v2/schedules/{id}/pause"), None)
            .await;
        assert_eq!(
            (status, &paused["isPaused"]),
            (200, &true.into()),
            "{method}"
        );
        let (status, resumed) = api
            .call(method.clone(), &format!("/v2/schedules/{id}/resume"), None)
            .await;
        assert_eq!(
            (status, &resumed["isPaused"]),
            (200, &false.into()),
            "{method}"
        );
    }
    let (_, list) = api.call(Method::GET, "/v2/schedules", None).await;
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["scheduleId"] == id));
    let (status, _) = api
        .call(Method::DELETE, &format!("/v2/schedules/{id}"), None)
        .await;
    assert_eq!(status, 200);
    let (status, _) = api
        .call(Method::GET, &format!("/v2/schedules/{id}"), None)
        .await;
    assert_eq!(status, 404);

    for (headers, needle) in [
        (vec![], "Upstash-Cron is required"),
        (vec![("Upstash-Cron", "* * *")], "5 fields"),
        (vec![("Upstash-Cron", "99 * * * *")], "invalid cron"),
        (
            vec![("Upstash-Cron", "CRON_TZ=Nowhere/Town * * * * *")],
            "unknown time zone",
        ),
        (
            vec![
                ("Upstash-Cron", "* * * * *"),
                ("Upstash-Schedule-Id", "a b"),
            ],
            "schedule id",
        ),
    ] {
        let (status, json) = create(&api, "https://example.com/x", &headers).await;
        assert_eq!(status, 400, "{headers:?}: {json}");
        assert!(
            json["error"].as_str().unwrap().contains(needle),
            "{headers:?}: {json}"
        );
    }
    let (status, json) = api
        .publish(
            "https://example.com/x",
            "x",
            &[("Upstash-Cron", "* * * * *")],
        )
        .await;
    assert_eq!(status, 400, "a publish does not take Upstash-Cron: {json}");
    kstash.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_every_minute_schedule_fires_on_the_minute_with_its_id() {
    let kafka = TestKafka::new();
    let kstash = kafka.start(kafka.config()).await;
    let api = Api::new(kstash.addr());
    let mut receiver = Receiver::start().await;
    let (status, created) = create(
        &api,
        &receiver.url("/minutely"),
        &[
            ("Upstash-Cron", "* * * * *"),
            ("Upstash-Schedule-Id", "minutely"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let mut minutes = Vec::new();
    for _ in 0..2 {
        let r = receiver.next_within(NEXT_MINUTE).await;
        assert_eq!(r.header("upstash-schedule-id"), Some("minutely"));
        assert_eq!(r.body.as_ref(), b"tick");
        let minute = r.wall_ms / MINUTE_MS * MINUTE_MS;
        let late = r.wall_ms - minute;
        assert!(late < ON_TIME, "arrived {late} ms after its minute");
        minutes.push(minute);
    }
    assert_eq!(
        minutes[1] - minutes[0],
        MINUTE_MS,
        "one fire per minute, none skipped"
    );
    let (_, s) = api.call(Method::GET, "/v2/schedules/minutely", None).await;
    assert_eq!(s["lastScheduleTime"], minutes[1]);
    let states = s["lastScheduleStates"].as_object().unwrap();
    assert_eq!(states.len(), 1);
    let logs = common::eventually("the fire's log entries with its schedule id", || async {
        let entries = api
            .logs(&[("scheduleId", "minutely"), ("state", "DELIVERED")])
            .await;
        (entries.len() == 2).then_some(entries)
    })
    .await;
    assert!(logs.iter().all(|e| e["scheduleId"] == "minutely"));
    kstash.stop().await;
}
