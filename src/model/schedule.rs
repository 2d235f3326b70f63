//! Schedules: a cron expression and the message to publish at each of its times.
//!
//! Two records per schedule, on two compacted topics with the same number of partitions, keyed by
//! the schedule id:
//! - [`ScheduleRecord`] on `state.schedules`: the settings, written by the API (create, upsert,
//!   pause, resume; a tombstone deletes);
//! - [`ScheduleFire`] on `state.schedule_fires`: the last time it fired and the messages of that
//!   fire, written by the scheduler in the same Kafka transaction as those messages.
//!
//! Keeping them apart means the API and the scheduler never overwrite each other's writes (a pause
//! racing a fire). Both land on the same partition number, so the process that owns partition `p`
//! of the schedules topic (consumer-group assignment, range assignor) also reads partition `p` of
//! the fires topic and knows exactly what it fired. Cron expressions have five fields, are
//! evaluated in UTC unless prefixed with `CRON_TZ=<IANA zone> `, and are parsed with `croner`.

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use serde::{Deserialize, Serialize};

use super::callback::Callback;
use super::envelope::{base64_bytes, Envelope, HeaderMap, ENVELOPE_VERSION};
use super::flow::FlowControl;

/// Schema version of [`ScheduleRecord`].
pub const SCHEDULE_VERSION: u32 = 1;
/// Schema version of [`ScheduleFire`].
pub const SCHEDULE_FIRE_VERSION: u32 = 1;
/// Prefix of generated schedule ids.
pub const SCHEDULE_ID_PREFIX: &str = "scd_";
/// Prefix that sets a cron expression's time zone.
const CRON_TZ_PREFIX: &str = "CRON_TZ=";
/// Longest schedule id accepted.
pub const MAX_ID_LEN: usize = 100;

/// A parsed cron expression with its time zone.
#[derive(Debug, Clone)]
pub struct CronSpec {
    cron: Cron,
    tz: Tz,
}

impl CronSpec {
    /// `[CRON_TZ=<zone> ]<minute> <hour> <day of month> <month> <day of week>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (tz, expression) = match text.strip_prefix(CRON_TZ_PREFIX) {
            Some(rest) => {
                let (zone, expression) = rest.split_once(char::is_whitespace).ok_or_else(|| {
                    "CRON_TZ= must be followed by a zone and the expression".to_string()
                })?;
                let tz = Tz::from_str(zone).map_err(|_| {
                    format!("unknown time zone {zone:?} (use an IANA name like Europe/Berlin)")
                })?;
                (tz, expression.trim())
            }
            None => (Tz::UTC, text),
        };
        let fields = expression.split_whitespace().count();
        if fields != 5 {
            return Err(format!(
                "a cron expression has 5 fields (minute hour day-of-month month day-of-week), got {fields} in {expression:?}"
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .build()
            .parse(expression)
            .map_err(|e| format!("invalid cron expression {expression:?}: {e}"))?;
        Ok(CronSpec { cron, tz })
    }

    fn at(&self, ms: i64) -> Option<DateTime<Tz>> {
        Utc.timestamp_millis_opt(ms)
            .single()
            .map(|t| t.with_timezone(&self.tz))
    }

    /// The first time of the expression strictly after `after_ms` (unix ms).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let t = self.at(after_ms)?;
        self.cron
            .find_next_occurrence(&t, false)
            .ok()
            .map(|t| t.timestamp_millis())
    }

    /// The last time of the expression at or before `at_ms`.
    pub fn latest_at_or_before(&self, at_ms: i64) -> Option<i64> {
        let t = self.at(at_ms)?;
        self.cron
            .find_previous_occurrence(&t, true)
            .ok()
            .map(|t| t.timestamp_millis())
    }
}

/// Schedule ids (given with `Upstash-Schedule-Id`): letters, digits, `-`, `_`, `.`.
pub fn validate_id(id: &str) -> Result<(), String> {
    super::queue::validate_name("schedule id", id).map(|_| ())?;
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "schedule id is longer than {MAX_ID_LEN} characters"
        ));
    }
    Ok(())
}

/// The message a schedule publishes at each of its times: every publish option, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageSpec {
    pub method: String,
    #[serde(default)]
    pub header: HeaderMap,
    #[serde(rename = "bodyBase64", with = "base64_bytes", default)]
    pub body: Vec<u8>,
    pub max_retries: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_delay_expression: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Delay of each generated message after its fire time (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<Callback>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_callback: Option<Callback>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_control: Option<FlowControl>,
    #[serde(rename = "callerIP", default, skip_serializing_if = "Option::is_none")]
    pub caller_ip: Option<String>,
    /// `Upstash-Redact-Fields`, passed on to every message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redact: Option<super::redact::Redact>,
}

/// Where a message goes: its URL, and the URL group it was published to, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub topic_name: Option<String>,
    pub endpoint_name: Option<String>,
}

impl MessageSpec {
    /// The message for `target`, created at `now_ms` with id `message_id`.
    pub fn envelope(
        &self,
        message_id: String,
        target: Target,
        queue_name: Option<String>,
        schedule_id: Option<String>,
        now_ms: i64,
    ) -> Envelope {
        let delay = self
            .delay_ms
            .map_or(0, |d| i64::try_from(d).unwrap_or(i64::MAX));
        Envelope {
            v: ENVELOPE_VERSION,
            message_id,
            url: target.url,
            method: self.method.clone(),
            header: self.header.clone(),
            body: self.body.clone(),
            created_at: now_ms,
            not_before: now_ms.saturating_add(delay),
            max_retries: self.max_retries,
            retried: 0,
            retry_delay_expression: self.retry_delay_expression.clone(),
            timeout_ms: self.timeout_ms,
            labels: self.labels.clone(),
            caller_ip: self.caller_ip.clone(),
            callback: self.callback.clone(),
            failure_callback: self.failure_callback.clone(),
            queue_name,
            flow_control: self.flow_control.clone(),
            topic_name: target.topic_name,
            endpoint_name: target.endpoint_name,
            schedule_id,
            long_delay: false,
            redact: self.redact.clone(),
        }
    }
}

/// A schedule's settings (key: its id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleRecord {
    pub v: u32,
    pub schedule_id: String,
    /// The expression as given (with its `CRON_TZ=` prefix, if any).
    pub cron: String,
    /// A URL, or the name of a URL group.
    pub destination: String,
    /// Each fire enqueues into this queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_name: Option<String>,
    pub message: MessageSpec,
    #[serde(default)]
    pub paused: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

crate::json_record!(
    ScheduleRecord,
    "schedule",
    SCHEDULE_VERSION,
    key = schedule_id
);

/// What a schedule's last fire was (key: the schedule id), written with the fired messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleFire {
    pub v: u32,
    pub schedule_id: String,
    /// The cron time that fired (unix ms).
    pub scheduled_at: i64,
    /// When it was fired (unix ms).
    pub fired_at: i64,
    /// The messages of that fire (several for a URL group).
    pub message_ids: Vec<String>,
    /// Why the fire published nothing (an unknown URL group), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

crate::json_record!(
    ScheduleFire,
    "schedule_fire",
    SCHEDULE_FIRE_VERSION,
    key = schedule_id
);

impl ScheduleRecord {
    /// The cron time this schedule fires at next: after `last` (its last fire, if any) and after
    /// its last change (creation, update, resume: times that passed while it was paused, or
    /// before it said so, are not fired); `None` when the expression never matches again.
    pub fn next_fire(&self, cron: &CronSpec, last: Option<i64>) -> Option<i64> {
        let after = last.unwrap_or(self.created_at).max(self.updated_at);
        cron.next_after(after)
    }

    /// The cron time to fire at `now_ms`, if one is due: times missed while nothing fired (no
    /// process was up) fire once, for the latest of them.
    pub fn due(&self, cron: &CronSpec, last: Option<i64>, now_ms: i64) -> Option<i64> {
        if self.paused {
            return None;
        }
        let next = self.next_fire(cron, last)?;
        (next <= now_ms).then(|| cron.latest_at_or_before(now_ms).unwrap_or(next).max(next))
    }
}

/// 2026-11-30T10:00:30Z, when [`sample`] was created.
#[cfg(test)]
pub(crate) const SAMPLE_CREATED_AT: i64 = 1_796_032_830_000;

/// A schedule with every option set, every minute.
#[cfg(test)]
pub(crate) fn sample() -> ScheduleRecord {
    ScheduleRecord {
        v: SCHEDULE_VERSION,
        schedule_id: "scd_1".into(),
        cron: "* * * * *".into(),
        destination: "https://example.com/cron".into(),
        queue_name: Some("q".into()),
        message: MessageSpec {
            method: "POST".into(),
            header: HeaderMap::from([("Content-Type".into(), vec!["text/plain".into()])]),
            body: b"tick".to_vec(),
            max_retries: 3,
            retry_delay_expression: Some("1000".into()),
            timeout_ms: Some(5000),
            delay_ms: Some(1000),
            labels: vec!["l".into()],
            callback: Some(crate::model::callback::sample()),
            failure_callback: None,
            flow_control: Some(FlowControl {
                key: "k".into(),
                parallelism: Some(1),
                rate: None,
                period_ms: 1000,
            }),
            caller_ip: Some("127.0.0.1".into()),
            redact: None,
        },
        paused: false,
        created_at: SAMPLE_CREATED_AT,
        updated_at: SAMPLE_CREATED_AT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000;
    const T: i64 = SAMPLE_CREATED_AT;

    #[test]
    fn cron_times_in_utc_and_in_a_zone() {
        let every_minute = CronSpec::parse("* * * * *").unwrap();
        assert_eq!(
            every_minute.next_after(T),
            Some(T + 30_000),
            "the next full minute"
        );
        assert_eq!(every_minute.latest_at_or_before(T), Some(T - 30_000));
        let on_the_minute = T + 30_000;
        assert_eq!(
            every_minute.next_after(on_the_minute),
            Some(on_the_minute + MINUTE),
            "strictly after"
        );
        // 09:00 in Berlin is 08:00 UTC in November.
        let berlin = CronSpec::parse("CRON_TZ=Europe/Berlin 0 9 * * *").unwrap();
        let next = berlin.next_after(T).unwrap();
        let utc = Utc.timestamp_millis_opt(next).single().unwrap();
        assert_eq!(utc.format("%H:%M").to_string(), "08:00");
    }

    #[test]
    fn bad_expressions_name_the_problem() {
        for (text, needle) in [
            ("* * * *", "5 fields"),
            ("* * * * * *", "5 fields"),
            ("61 * * * *", "invalid cron expression"),
            ("CRON_TZ=Mars/Olympus * * * * *", "unknown time zone"),
            ("CRON_TZ=UTC", "must be followed"),
            ("", "5 fields"),
        ] {
            let err = CronSpec::parse(text).expect_err(text);
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn ids_follow_the_documented_rule() {
        validate_id("daily-report_1.v2").unwrap();
        assert!(validate_id("no spaces").is_err());
        assert!(validate_id("").is_err());
    }

    #[test]
    fn the_first_fire_is_the_first_time_after_creation() {
        let s = sample();
        let cron = CronSpec::parse(&s.cron).unwrap();
        assert_eq!(s.next_fire(&cron, None), Some(T + 30_000));
        assert_eq!(
            s.next_fire(&cron, Some(T + 30_000)),
            Some(T + 30_000 + MINUTE)
        );
        let resumed = ScheduleRecord {
            updated_at: T + 10 * MINUTE,
            ..s.clone()
        };
        assert_eq!(
            resumed.next_fire(&cron, Some(T + 30_000)),
            Some(T + 30_000 + 10 * MINUTE),
            "times that passed while paused are not fired on resume"
        );
    }

    #[test]
    fn missed_times_fire_once_for_the_latest_and_paused_ones_not_at_all() {
        let s = sample();
        let cron = CronSpec::parse(&s.cron).unwrap();
        let first = T + 30_000;
        assert_eq!(s.due(&cron, None, first - 1), None, "not yet");
        assert_eq!(s.due(&cron, None, first + 200), Some(first), "on time");
        assert_eq!(
            s.due(&cron, Some(first), first + 500),
            None,
            "fired already"
        );
        let down_for_an_hour = first + 60 * MINUTE + 5_000;
        assert_eq!(
            s.due(&cron, Some(first), down_for_an_hour),
            Some(first + 60 * MINUTE),
            "one fire, for the latest missed minute"
        );
        let paused = ScheduleRecord {
            paused: true,
            ..s.clone()
        };
        assert_eq!(paused.due(&cron, None, down_for_an_hour), None);
    }

    #[test]
    fn a_fire_publishes_the_template_as_a_message() {
        let s = sample();
        let target = Target {
            url: "https://a.com".into(),
            topic_name: Some("g".into()),
            endpoint_name: Some("a".into()),
        };
        let e = s.message.envelope(
            "msg_x".into(),
            target,
            s.queue_name.clone(),
            Some(s.schedule_id.clone()),
            T,
        );
        assert_eq!(
            (e.url.as_str(), e.body.as_slice()),
            ("https://a.com", &b"tick"[..])
        );
        assert_eq!(
            e.not_before,
            T + 1000,
            "the schedule's delay applies to each message"
        );
        assert_eq!(e.schedule_id.as_deref(), Some("scd_1"));
        assert_eq!(e.topic_name.as_deref(), Some("g"));
        assert_eq!(e.max_retries, 3);
    }

    #[test]
    fn records_round_trip_and_match_the_published_schemas() {
        crate::model::schema_test::assert_round_trip(&sample(), "schedule.v1.json");
        let fire = ScheduleFire {
            v: SCHEDULE_FIRE_VERSION,
            schedule_id: "scd_1".into(),
            scheduled_at: T,
            fired_at: T + 5,
            message_ids: vec!["msg_1".into()],
            error: Some("x".into()),
        };
        crate::model::schema_test::assert_round_trip(&fire, "schedule_fire.v1.json");
    }
}
