//! Query strings and filters shared by the list and bulk endpoints (messages, events, DLQ).
//!
//! The SDKs repeat a key for several values (`label=a&label=b`); the docs also allow one
//! comma-separated value (`label=a,b`): both are read. Values of one filter are ORed, different
//! filters ANDed. Filters name fields of the message.

use axum::http::Uri;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;
use crate::model::dlq::DlqRecord;
use crate::model::envelope::Envelope;
use crate::model::event::{Event, State};

/// The decoded `key=value` pairs of a query string.
#[derive(Debug, Default, Clone)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    pub fn parse(uri: &Uri) -> Self {
        Query {
            pairs: url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        }
    }

    /// Every value of `key`, repeated or comma-separated, empty ones dropped.
    pub fn all(&self, key: &str) -> Vec<String> {
        self.pairs
            .iter()
            .filter(|(k, _)| k == key)
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(String::from)
            .collect()
    }

    /// Whether `key` appears at all (even with an empty value).
    pub fn has(&self, key: &str) -> bool {
        self.pairs.iter().any(|(k, _)| k == key)
    }

    /// The first non-empty value of `key`.
    pub fn one(&self, key: &str) -> Option<String> {
        self.all(key).into_iter().next()
    }

    /// An integer parameter.
    pub fn int(&self, key: &str) -> Result<Option<i64>, ApiError> {
        self.one(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| ApiError::BadRequest(format!("{key} must be an integer")))
            })
            .transpose()
    }

    /// 400 naming the first key that is neither a filter ([`FILTER_KEYS`]) nor in `also`. For the
    /// bulk calls, where a misspelt filter would otherwise widen the call to *everything*.
    pub fn refuse_unknown(&self, also: &[&str]) -> Result<(), ApiError> {
        match self
            .pairs
            .iter()
            .find(|(k, _)| !FILTER_KEYS.contains(&k.as_str()) && !also.contains(&k.as_str()))
        {
            Some((k, _)) => Err(ApiError::BadRequest(format!(
                "unknown query parameter {k:?} (known here: {})",
                [FILTER_KEYS.as_slice(), also].concat().join(", ")
            ))),
            None => Ok(()),
        }
    }

    /// `count`, defaulting to `default` and capped at `max`.
    pub fn count(&self, default: usize, max: usize) -> Result<usize, ApiError> {
        match self.int("count")? {
            None => Ok(default),
            Some(n) if n >= 1 => Ok(usize::try_from(n).unwrap_or(max).min(max)),
            Some(_) => Err(ApiError::BadRequest("count must be at least 1".into())),
        }
    }
}

/// The filters every list and bulk endpoint reads (`Filter::from_query`).
pub const FILTER_KEYS: [&str; 10] = [
    "url",
    "label",
    "callerIp",
    "callerIP",
    "queueName",
    "flowControlKey",
    "topicName",
    "scheduleId",
    "fromDate",
    "toDate",
];

/// Ids given in a JSON body (`{"messageIds":[…]}` / `{"dlqIds":[…]}`), as the Python SDK sends.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdsBody {
    /// Messages to act on (`DELETE /v2/messages`); an empty list acts on none.
    pub message_ids: Option<Vec<String>>,
    /// DLQ entries to act on (`/v2/dlq`); an empty list acts on none.
    pub dlq_ids: Option<Vec<String>>,
}

impl IdsBody {
    /// Parses a body that may be empty; anything else that is not such JSON is a 400.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(IdsBody::default());
        }
        serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("request body must be JSON with ids: {e}")))
    }
}

/// `ids` without repeats, first occurrence first: an id named twice (or in both the query and
/// the body) is acted on once.
pub fn unique(ids: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    ids.into_iter()
        .filter(|id| seen.insert(id.clone()))
        .collect()
}

// The query parameters below are read by `Query` (repeated keys and comma-separated values, which
// no extractor reads); these types only describe them in the OpenAPI document, hence never built.

/// `count` and `cursor` of a paged list.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct PageParams {
    /// Entries to return (or, on a bulk call, to work through) at most.
    #[param(nullable = false, minimum = 1)]
    count: Option<u32>,
    /// The `cursor` of the previous page.
    #[param(nullable = false)]
    cursor: Option<String>,
}

/// Filters every list and bulk endpoint takes. Each may be repeated (or its values
/// comma-separated): values of one filter are ORed, different filters ANDed.
#[derive(IntoParams)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
#[allow(dead_code)]
pub struct CommonFilters {
    /// Destination URL.
    #[param(nullable = false)]
    url: Option<Vec<String>>,
    #[param(nullable = false)]
    label: Option<Vec<String>>,
    /// IP address of the publisher (also spelled `callerIP`).
    #[param(nullable = false)]
    caller_ip: Option<Vec<String>>,
    /// Same as `callerIp`.
    #[param(nullable = false, rename = "callerIP")]
    caller_ip_upper: Option<Vec<String>>,
    #[param(nullable = false)]
    queue_name: Option<Vec<String>>,
    #[param(nullable = false)]
    flow_control_key: Option<Vec<String>>,
    /// URL group ("topic") name.
    #[param(nullable = false)]
    topic_name: Option<Vec<String>>,
    #[param(nullable = false)]
    schedule_id: Option<Vec<String>>,
    /// Created (or, for the DLQ, failed) at or after (unix ms).
    #[param(nullable = false)]
    from_date: Option<i64>,
    /// Created (or, for the DLQ, failed) at or before (unix ms).
    #[param(nullable = false)]
    to_date: Option<i64>,
}

/// Filters of the message log (`/v2/events`, `/v2/logs`).
#[derive(IntoParams)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
#[allow(dead_code)]
pub struct LogFilters {
    #[param(nullable = false)]
    message_id: Option<Vec<String>>,
    #[param(nullable = false)]
    message_ids: Option<Vec<String>>,
    /// Host of the destination URL.
    #[param(nullable = false)]
    host: Option<Vec<String>>,
    /// Path of the destination URL.
    #[param(nullable = false)]
    path: Option<Vec<String>>,
    /// `CREATED`, `ACTIVE`, `RETRY`, `ERROR`, `DELIVERED`, `FAILED`, `CANCEL_REQUESTED`,
    /// `CANCELED` (or `CANCELLED`), or `IN_PROGRESS` (any of ACTIVE, RETRY, ERROR).
    #[param(nullable = false)]
    state: Option<Vec<String>>,
}

/// What a bulk cancel (`DELETE /v2/messages`) acts on: the ids given, else the filtered, else all.
#[derive(IntoParams)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
#[allow(dead_code)]
pub struct CancelFilters {
    /// Messages to cancel (with the body's `messageIds`); an empty value cancels none.
    #[param(nullable = false)]
    message_ids: Option<Vec<String>>,
    /// Host of the destination URL.
    #[param(nullable = false)]
    host: Option<Vec<String>>,
    /// Path of the destination URL.
    #[param(nullable = false)]
    path: Option<Vec<String>>,
}

/// Filters of the DLQ (`/v2/dlq`).
#[derive(IntoParams)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
#[allow(dead_code)]
pub struct DlqFilters {
    /// Entries to act on (with the body's `dlqIds`); an empty value acts on none.
    #[param(nullable = false)]
    dlq_ids: Option<Vec<String>>,
    #[param(nullable = false)]
    message_id: Option<Vec<String>>,
    /// HTTP status of the last attempt.
    #[param(nullable = false)]
    response_status: Option<Vec<u16>>,
}

/// Filters of the list and bulk endpoints.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    message_ids: Vec<String>,
    urls: Vec<String>,
    hosts: Vec<String>,
    paths: Vec<String>,
    labels: Vec<String>,
    caller_ips: Vec<String>,
    states: Vec<State>,
    response_statuses: Vec<u16>,
    queue_names: Vec<String>,
    flow_control_keys: Vec<String>,
    topic_names: Vec<String>,
    schedule_ids: Vec<String>,
    from_ms: Option<i64>,
    to_ms: Option<i64>,
}

impl Filter {
    /// Reads the filters; `extra` names the endpoint-specific keys it accepts among
    /// `messageId`, `messageIds`, `host`, `path`, `state`, `responseStatus`.
    pub fn from_query(q: &Query, extra: &[&str]) -> Result<Self, ApiError> {
        let allowed = |k: &str| extra.contains(&k);
        let mut f = Filter::default();
        for k in ["messageId", "messageIds"] {
            if allowed(k) {
                f.message_ids.extend(q.all(k));
            }
        }
        f.urls = q.all("url");
        if allowed("host") {
            f.hosts = q.all("host");
        } else if q.has("host") || q.has("path") {
            return Err(ApiError::BadRequest(
                "host and path filters are not supported here".into(),
            ));
        }
        if allowed("path") {
            f.paths = q.all("path");
        }
        f.labels = q.all("label");
        f.caller_ips = [q.all("callerIp"), q.all("callerIP")].concat();
        if allowed("state") {
            for s in q.all("state") {
                f.states.extend(parse_state(&s)?);
            }
        }
        if allowed("responseStatus") {
            for s in q.all("responseStatus") {
                f.response_statuses.push(s.parse().map_err(|_| {
                    ApiError::BadRequest("responseStatus must be an HTTP status".into())
                })?);
            }
        }
        f.queue_names = q.all("queueName");
        f.flow_control_keys = q.all("flowControlKey");
        f.topic_names = q.all("topicName");
        f.schedule_ids = q.all("scheduleId");
        f.from_ms = q.int("fromDate")?;
        f.to_ms = q.int("toDate")?;
        Ok(f)
    }

    /// Whether no filter was given.
    pub fn is_empty(&self) -> bool {
        self.message_ids.is_empty()
            && self.urls.is_empty()
            && self.hosts.is_empty()
            && self.paths.is_empty()
            && self.labels.is_empty()
            && self.caller_ips.is_empty()
            && self.states.is_empty()
            && self.response_statuses.is_empty()
            && self.queue_names.is_empty()
            && self.flow_control_keys.is_empty()
            && self.topic_names.is_empty()
            && self.schedule_ids.is_empty()
            && self.from_ms.is_none()
            && self.to_ms.is_none()
    }

    fn common(&self, m: Fields<'_>, time: i64) -> bool {
        let Fields {
            id,
            url,
            labels,
            caller_ip,
            queue,
            flow_control_key,
            topic_name,
            schedule_id,
        } = m;
        let any =
            |wanted: &[String], have: &str| wanted.is_empty() || wanted.iter().any(|w| w == have);
        let any_of = |wanted: &[String], have: Option<&str>| {
            wanted.is_empty() || have.is_some_and(|h| wanted.iter().any(|w| w == h))
        };
        let parsed = reqwest::Url::parse(url).ok();
        any(&self.message_ids, id)
            && any(&self.urls, url)
            && any(
                &self.hosts,
                parsed
                    .as_ref()
                    .and_then(|u| u.host_str())
                    .unwrap_or_default(),
            )
            && any(
                &self.paths,
                parsed.as_ref().map(|u| u.path()).unwrap_or_default(),
            )
            && (self.labels.is_empty() || labels.iter().any(|l| self.labels.contains(l)))
            && any(&self.caller_ips, caller_ip.unwrap_or_default())
            && any_of(&self.queue_names, queue)
            && any_of(&self.flow_control_keys, flow_control_key)
            && any_of(&self.topic_names, topic_name)
            && any_of(&self.schedule_ids, schedule_id)
            && self.from_ms.is_none_or(|f| time >= f)
            && self.to_ms.is_none_or(|t| time <= t)
    }

    /// For pending messages (cancel): dates are the creation time.
    pub fn matches_message(&self, m: &Envelope) -> bool {
        self.common(Fields::of(m), m.created_at)
    }

    /// For log entries: dates are the event time.
    pub fn matches_event(&self, e: &Event) -> bool {
        let fields = Fields {
            id: &e.message_id,
            url: &e.url,
            labels: &e.labels,
            caller_ip: e.caller_ip.as_deref(),
            queue: e.queue_name.as_deref(),
            flow_control_key: e.flow_control_key.as_deref(),
            topic_name: e.topic_name.as_deref(),
            schedule_id: e.schedule_id.as_deref(),
        };
        self.common(fields, e.time) && (self.states.is_empty() || self.states.contains(&e.state))
    }

    /// For DLQ entries: dates are the failure time.
    pub fn matches_dlq(&self, r: &DlqRecord) -> bool {
        self.common(Fields::of(&r.message), r.failed_at)
            && (self.response_statuses.is_empty()
                || r.response_status
                    .is_some_and(|s| self.response_statuses.contains(&s)))
    }
}

/// What the filters look at, from a message or an event.
#[derive(Debug, Clone, Copy)]
struct Fields<'a> {
    id: &'a str,
    url: &'a str,
    labels: &'a [String],
    caller_ip: Option<&'a str>,
    queue: Option<&'a str>,
    flow_control_key: Option<&'a str>,
    topic_name: Option<&'a str>,
    schedule_id: Option<&'a str>,
}

impl<'a> Fields<'a> {
    fn of(m: &'a Envelope) -> Self {
        Fields {
            id: &m.message_id,
            url: &m.url,
            labels: &m.labels,
            caller_ip: m.caller_ip.as_deref(),
            queue: m.queue_name.as_deref(),
            flow_control_key: m.flow_control.as_ref().map(|fc| fc.key.as_str()),
            topic_name: m.topic_name.as_deref(),
            schedule_id: m.schedule_id.as_deref(),
        }
    }
}

/// A `state` filter value; `IN_PROGRESS` means any of ACTIVE, RETRY, ERROR; both spellings of
/// cancelled are accepted.
fn parse_state(s: &str) -> Result<Vec<State>, ApiError> {
    Ok(match s.to_ascii_uppercase().as_str() {
        "IN_PROGRESS" => vec![State::Active, State::Retry, State::Error],
        "CANCELLED" => vec![State::Canceled],
        other => vec![
            serde_json::from_value(serde_json::Value::String(other.to_string()))
                .map_err(|_| ApiError::BadRequest(format!("unknown state {s:?}")))?,
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::envelope::sample;

    fn q(s: &str) -> Query {
        Query::parse(&format!("/x?{s}").parse::<Uri>().unwrap())
    }

    #[test]
    fn repeated_and_comma_separated_values() {
        let query = q("label=a&label=b,c&url=https%3A%2F%2Fx.com%2Fp&count=5");
        assert_eq!(query.all("label"), ["a", "b", "c"]);
        assert_eq!(query.one("url").as_deref(), Some("https://x.com/p"));
        assert_eq!(query.count(100, 1000).unwrap(), 5);
        assert_eq!(q("count=5000").count(100, 1000).unwrap(), 1000);
        assert!(q("count=0").count(100, 1000).is_err());
        assert!(q("count=x").count(100, 1000).is_err());
    }

    #[test]
    fn filters_and_within_or_between() {
        let m = sample(); // url https://example.com/a?b=c, label "a", caller 127.0.0.1, created 1
        let f = |s: &str| Filter::from_query(&q(s), &["host", "path", "messageIds"]).unwrap();
        assert!(f("").is_empty());
        assert!(f("label=zz,a").matches_message(&m), "OR within a filter");
        assert!(
            !f("label=a&host=other.com").matches_message(&m),
            "AND between filters"
        );
        assert!(f("host=example.com&path=/a").matches_message(&m));
        assert!(f("messageIds=msg_1&fromDate=1&toDate=1").matches_message(&m));
        assert!(!f("fromDate=2").matches_message(&m));
        assert!(f("queueName=orders").matches_message(&m));
        assert!(!f("queueName=q").matches_message(&m));
        assert!(f("flowControlKey=x,tenant-1").matches_message(&m));
        assert!(!f("flowControlKey=x").matches_message(&m));
        let mut plain = sample();
        plain.queue_name = None;
        assert!(!f("queueName=orders").matches_message(&plain));
        assert!(f("topicName=group&scheduleId=scd_1").matches_message(&m));
        assert!(!f("topicName=other").matches_message(&m));
        assert!(
            Filter::from_query(&q("host=x"), &[]).is_err(),
            "DLQ refuses host"
        );
    }

    #[test]
    fn ids_are_acted_on_once() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            unique(ids(&["a", "b", "a", "c", "b"])),
            ids(&["a", "b", "c"])
        );
    }

    #[test]
    fn state_filter_spellings() {
        assert_eq!(parse_state("IN_PROGRESS").unwrap().len(), 3);
        assert_eq!(parse_state("CANCELLED").unwrap(), [State::Canceled]);
        assert_eq!(parse_state("delivered").unwrap(), [State::Delivered]);
        assert!(parse_state("NOPE").is_err());
    }
}
