//! Reading the `Upstash-*` control headers of a publish request.
//!
//! Header names are matched without regard to case (the TS SDK lower-cases them, Python does not).
//! Every `Upstash-*` header is either honoured or refused with a 400 naming it, never silently
//! ignored: the schedule-only ones on a publish, Upstash Workflow's (no workflow engine here) and
//! any kstash does not know (a misspelt `Upstash-Retires` must not quietly mean 3 retries). The TS
//! SDK's `Upstash-Telemetry-*` are the one documented exception: read and dropped.
//!
//! Callbacks (`Upstash-Callback*`, `Upstash-Failure-Callback*`, see `model::callback`): the URL
//! must be an absolute http(s) URL. `…-Forward-X` is forwarded to the callback URL as `X`.
//! `…-Method`, `…-Timeout`, `…-Retries`, `…-Retry-Delay` and `…-Delay` take the same formats and
//! limits as the plain headers and configure the callback message; retries and the retry-delay
//! expression default to the source message's, the method to POST, the
//! timeout to the server's. Decisions where the API reference leaves room:
//! - **Lenient forwarding.** Any other `Upstash-Callback-X` / `Upstash-Failure-Callback-X` is
//!   forwarded as `X` too, because the Python SDK sends `callback_headers={"X": v}` as
//!   `Upstash-Callback-X` (without `-Forward-`). A forwarded header whose name is one of the
//!   settings above (`Method`, `Timeout`, …) can only be sent with `-Forward-`. The workflow SDK's
//!   `Upstash-Callback-Workflow-*` and `Upstash-Callback-Failure-Callback*` headers are not
//!   interpreted; they are forwarded like any other unknown suffix.
//! - Callback settings without the callback URL are validated, then ignored.

use std::time::Duration;

use axum::http::HeaderMap;

use super::callback::Callback;
use super::destination::validate_url;
use super::envelope::HeaderMap as JsonHeaderMap;
use super::flow::{FlowControl, FlowLimits};
use super::redact::{self, Redact};
use super::retry::RetryDelayExpr;
use super::schedule::MessageSpec;

/// Prefix of headers forwarded to the destination with the prefix removed.
pub const FORWARD_PREFIX: &str = "upstash-forward-";
/// Delivery methods QStash allows.
pub const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];
/// Method used when `Upstash-Method` is absent.
pub const DEFAULT_METHOD: &str = "POST";

/// Headers that belong to `POST /v2/schedules` only; on a publish they are refused, not ignored.
pub const SCHEDULE_ONLY: [&str; 3] = ["upstash-cron", "upstash-schedule-id", "upstash-queue-name"];
/// Every QStash control header starts with this (lower case); one kstash does not know is
/// refused, so a misspelt `Upstash-Retires` is never silently ignored.
const UPSTASH_PREFIX: &str = "upstash-";
/// The TS SDK's telemetry headers (`Upstash-Telemetry-Sdk`, `-Runtime`, `-Platform`): ignored.
const TELEMETRY_PREFIX: &str = "upstash-telemetry-";
/// Upstash Workflow's headers: refused (kstash has no workflow engine).
const WORKFLOW_PREFIX: &str = "upstash-workflow-";
/// Upstash Workflow's feature negotiation header.
const FEATURE_SET: &str = "upstash-feature-set";
/// `Upstash-Flow-Control-Key`, lower case.
const FLOW_CONTROL_KEY: &str = "upstash-flow-control-key";
/// `Upstash-Flow-Control-Value`, lower case.
const FLOW_CONTROL_VALUE: &str = "upstash-flow-control-value";

/// A header that cannot be accepted; the text goes to the client in a 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HeaderError(pub String);

/// Server-side limits a publish is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest `Upstash-Delay` / distance of `Upstash-Not-Before` into the future.
    pub max_delay: Duration,
    /// Retries when `Upstash-Retries` is absent.
    pub default_retries: u32,
    /// Largest accepted `Upstash-Retries`.
    pub max_retries: u32,
    /// Largest flow-control values.
    pub flow: FlowLimits,
}

/// How a publish asks to be deduplicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dedup {
    /// `Upstash-Deduplication-Id`.
    Id(String),
    /// `Upstash-Content-Based-Deduplication: true`: destination, body and forwarded headers.
    Content,
}

/// What the headers of one publish ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOptions {
    /// How duplicates of this publish are recognised, if at all.
    pub dedup: Option<Dedup>,
    pub method: String,
    /// Not to be delivered before (unix ms); `None` means now.
    pub not_before: Option<i64>,
    /// Headers for the destination (Content-Type and forwarded ones), publisher's case.
    pub forward: JsonHeaderMap,
    pub timeout: Option<Duration>,
    pub labels: Vec<String>,
    pub max_retries: u32,
    /// `Upstash-Retry-Delay`, validated.
    pub retry_delay: Option<String>,
    /// `Upstash-Callback*`, settings resolved.
    pub callback: Option<Callback>,
    /// `Upstash-Failure-Callback*`, settings resolved.
    pub failure_callback: Option<Callback>,
    /// `Upstash-Flow-Control-Key` with `-Value`.
    pub flow_control: Option<FlowControl>,
    /// `Upstash-Redact-Fields`.
    pub redact: Option<Redact>,
}

impl PublishOptions {
    /// The message these options describe, carrying `body`, due `delay_ms` after its creation.
    /// (`dedup` and `not_before` belong to the publish, not the message; take them first.)
    pub fn into_spec(
        self,
        body: Vec<u8>,
        caller_ip: Option<String>,
        delay_ms: Option<u64>,
    ) -> MessageSpec {
        MessageSpec {
            method: self.method,
            header: self.forward,
            body,
            max_retries: self.max_retries,
            retry_delay_expression: self.retry_delay,
            timeout_ms: self.timeout.map(duration_ms),
            delay_ms,
            labels: self.labels,
            callback: self.callback,
            failure_callback: self.failure_callback,
            flow_control: self.flow_control,
            caller_ip,
            redact: self.redact,
        }
    }
}

/// One of the two callback header families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CallbackFamily {
    /// The URL header, in its documented case (used in error messages).
    name: &'static str,
    /// The URL header, lower case.
    lower: &'static str,
}

/// `Upstash-Callback*`: called after every attempt.
const CALLBACK: CallbackFamily = CallbackFamily {
    name: "Upstash-Callback",
    lower: "upstash-callback",
};
/// `Upstash-Failure-Callback*`: called once, after the final failed attempt.
const FAILURE_CALLBACK: CallbackFamily = CallbackFamily {
    name: "Upstash-Failure-Callback",
    lower: "upstash-failure-callback",
};
/// Suffix (after `<family>-`) of headers forwarded to the callback URL.
const CALLBACK_FORWARD_SUFFIX: &str = "forward-";

/// What the headers of one callback family said, before defaults.
#[derive(Debug, Default)]
struct CallbackHeaders {
    url: Option<String>,
    method: Option<String>,
    forward: JsonHeaderMap,
    timeout: Option<Duration>,
    retries: Option<u32>,
    retry_delay: Option<String>,
    delay: Option<Duration>,
}

impl CallbackHeaders {
    /// Reads one header of `family`: the URL itself (`suffix` = None) or `<family>-<suffix>`.
    fn read(
        &mut self,
        family: CallbackFamily,
        suffix: Option<&str>,
        text: &str,
        limits: &Limits,
    ) -> Result<(), HeaderError> {
        let Some(suffix) = suffix else {
            validate_url(text).map_err(|e| {
                HeaderError(format!(
                    "{} must be an absolute http(s) URL: {e}",
                    family.name
                ))
            })?;
            self.url = Some(text.to_string());
            return Ok(());
        };
        let setting = |title: &str| format!("{}-{title}", family.name);
        match suffix {
            "method" => self.method = Some(parse_method(&setting("Method"), text)?),
            "timeout" => self.timeout = Some(parse_timeout(&setting("Timeout"), text)?),
            "retries" => self.retries = Some(parse_retries(&setting("Retries"), text, limits)?),
            "retry-delay" => {
                self.retry_delay = Some(parse_retry_delay(&setting("Retry-Delay"), text)?);
            }
            "delay" => {
                let name = setting("Delay");
                let delay = parse_delay(&name, text)?;
                if delay > limits.max_delay {
                    return Err(too_far(&name, limits));
                }
                self.delay = Some(delay);
            }
            "" => {
                return Err(HeaderError(format!(
                    "{}- needs a setting or header name after it",
                    family.name
                )))
            }
            other => {
                // -Forward-X, or (lenient, see the module doc) any other suffix X.
                let name = match other.strip_prefix(CALLBACK_FORWARD_SUFFIX) {
                    Some("") => {
                        return Err(HeaderError(format!(
                            "{}-Forward- needs a header name after it",
                            family.name
                        )))
                    }
                    Some(forwarded) => forwarded,
                    None => other,
                };
                self.forward
                    .entry(title_case(name))
                    .or_default()
                    .push(text.to_string());
            }
        }
        Ok(())
    }

    /// The stored callback, defaults taken from the source message; None without a URL.
    fn resolve(self, source: &PublishOptions) -> Option<Callback> {
        Some(Callback {
            url: self.url?,
            method: self.method.unwrap_or_else(|| DEFAULT_METHOD.to_string()),
            header: self.forward,
            timeout_ms: self.timeout.map(duration_ms),
            retries: self.retries.unwrap_or(source.max_retries),
            retry_delay_expression: self.retry_delay.or_else(|| source.retry_delay.clone()),
            delay_ms: self.delay.map(duration_ms),
        })
    }
}

/// Which callback family a lower-case header name belongs to, and its suffix (None for the URL
/// header itself).
fn callback_header(lower: &str) -> Option<(CallbackFamily, Option<&str>)> {
    [CALLBACK, FAILURE_CALLBACK].into_iter().find_map(|family| {
        let rest = lower.strip_prefix(family.lower)?;
        if rest.is_empty() {
            Some((family, None))
        } else {
            rest.strip_prefix('-').map(|suffix| (family, Some(suffix)))
        }
    })
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Parses the control headers of a publish received at `now_ms`.
pub fn parse_publish(
    headers: &HeaderMap,
    limits: &Limits,
    now_ms: i64,
) -> Result<PublishOptions, HeaderError> {
    let mut delay: Option<Duration> = None;
    let mut not_before_secs: Option<i64> = None;
    let mut callback = CallbackHeaders::default();
    let mut failure_callback = CallbackHeaders::default();
    let mut flow_key: Option<String> = None;
    let mut flow_value: Option<String> = None;
    let mut options = PublishOptions {
        dedup: None,
        not_before: None,
        method: DEFAULT_METHOD.to_string(),
        forward: JsonHeaderMap::new(),
        timeout: None,
        labels: Vec::new(),
        max_retries: limits.default_retries,
        retry_delay: None,
        callback: None,
        failure_callback: None,
        flow_control: None,
        redact: None,
    };
    for (name, value) in headers {
        let lower = name.as_str(); // http lower-cases names
        let text = || {
            value
                .to_str()
                .map(str::trim)
                .map_err(|_| HeaderError(format!("header {lower} must be visible ASCII text")))
        };
        if lower == "content-type" {
            options
                .forward
                .entry("Content-Type".to_string())
                .or_default()
                .push(text()?.to_string());
        } else if let Some(rest) = lower.strip_prefix(FORWARD_PREFIX) {
            if rest.is_empty() {
                return Err(HeaderError(
                    "Upstash-Forward- needs a header name after it".into(),
                ));
            }
            options
                .forward
                .entry(title_case(rest))
                .or_default()
                .push(text()?.to_string());
        } else if lower == "upstash-method" {
            options.method = parse_method("Upstash-Method", text()?)?;
        } else if lower == "upstash-timeout" {
            options.timeout = Some(parse_timeout("Upstash-Timeout", text()?)?);
        } else if lower == "upstash-delay" {
            delay = Some(parse_delay("Upstash-Delay", text()?)?);
        } else if lower == "upstash-not-before" {
            let secs: i64 = text()?.parse().map_err(|_| {
                HeaderError("Upstash-Not-Before must be a unix timestamp in seconds".into())
            })?;
            if secs < 0 {
                return Err(HeaderError(
                    "Upstash-Not-Before must not be negative".into(),
                ));
            }
            not_before_secs = Some(secs);
        } else if lower == "upstash-label" {
            options.labels.extend(
                text()?
                    .split(',')
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from),
            );
        } else if lower == "upstash-retries" {
            options.max_retries = parse_retries("Upstash-Retries", text()?, limits)?;
        } else if lower == "upstash-retry-delay" {
            options.retry_delay = Some(parse_retry_delay("Upstash-Retry-Delay", text()?)?);
        } else if let Some((family, suffix)) = callback_header(lower) {
            let target = if family == CALLBACK {
                &mut callback
            } else {
                &mut failure_callback
            };
            target.read(family, suffix, text()?, limits)?;
        } else if lower == "upstash-content-based-deduplication" {
            let value = text()?;
            if value.eq_ignore_ascii_case("true") {
                if options.dedup.is_none() {
                    options.dedup = Some(Dedup::Content);
                }
            } else if !value.eq_ignore_ascii_case("false") {
                return Err(HeaderError(
                    "Upstash-Content-Based-Deduplication must be true or false".into(),
                ));
            }
        } else if lower == "upstash-deduplication-id" {
            let id = text()?;
            if id.is_empty() {
                return Err(HeaderError(
                    "Upstash-Deduplication-Id must not be empty".into(),
                ));
            }
            // An explicit id wins over content-based deduplication.
            options.dedup = Some(Dedup::Id(id.to_string()));
        } else if lower == FLOW_CONTROL_KEY {
            flow_key = Some(text()?.to_string());
        } else if lower == FLOW_CONTROL_VALUE {
            flow_value = Some(text()?.to_string());
        } else if lower == redact::HEADER {
            options.redact = Some(Redact::parse(text()?).map_err(HeaderError)?);
        } else if SCHEDULE_ONLY.contains(&lower) {
            return Err(HeaderError(format!(
                "header {lower} is only accepted when creating a schedule (POST /v2/schedules/...)"
            )));
        } else if is_workflow(lower) {
            return Err(HeaderError(format!(
                "header {lower} belongs to Upstash Workflow, which kstash does not implement"
            )));
        } else if lower.starts_with(UPSTASH_PREFIX) && !lower.starts_with(TELEMETRY_PREFIX) {
            return Err(HeaderError(format!(
                "header {lower} is not a QStash header; to send it to the destination, prefix it with Upstash-Forward-"
            )));
        }
        // Everything else (Authorization, the TS SDK's telemetry, other headers) stays here: only
        // Content-Type and Upstash-Forward-* reach the destination.
    }
    let max_delay_ms = i64::try_from(limits.max_delay.as_millis()).unwrap_or(i64::MAX);
    // Upstash-Not-Before wins over Upstash-Delay.
    let not_before = match (not_before_secs, delay) {
        (Some(secs), _) => Some(secs.saturating_mul(MILLIS_PER_SECOND)),
        (None, Some(d)) => {
            let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
            if ms > max_delay_ms {
                return Err(too_far("Upstash-Delay", limits));
            }
            Some(now_ms.saturating_add(ms))
        }
        (None, None) => None,
    };
    if let Some(nb) = not_before {
        if nb.saturating_sub(now_ms) > max_delay_ms {
            return Err(too_far("Upstash-Not-Before", limits));
        }
    }
    options.not_before = not_before;
    options.flow_control = match (flow_key, flow_value) {
        (Some(key), Some(value)) => Some(FlowControl::parse(&key, &value, &limits.flow)?),
        (Some(_), None) => {
            return Err(HeaderError(
                "Upstash-Flow-Control-Key needs Upstash-Flow-Control-Value (parallelism=…, rate=…, period=…)".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(HeaderError(
                "Upstash-Flow-Control-Value needs Upstash-Flow-Control-Key".into(),
            ))
        }
        (None, None) => None,
    };
    options.callback = callback.resolve(&options);
    options.failure_callback = failure_callback.resolve(&options);
    Ok(options)
}

/// `Upstash-Method` and `…-Callback-Method`: one of [`METHODS`], any case.
fn parse_method(header: &str, text: &str) -> Result<String, HeaderError> {
    let method = text.to_ascii_uppercase();
    if METHODS.contains(&method.as_str()) {
        Ok(method)
    } else {
        Err(HeaderError(format!(
            "{header} must be one of {}, got {method:?}",
            METHODS.join(", ")
        )))
    }
}

/// `Upstash-Timeout` and `…-Callback-Timeout`: a positive duration.
fn parse_timeout(header: &str, text: &str) -> Result<Duration, HeaderError> {
    let d = parse_duration(text).map_err(|e| HeaderError(format!("{header}: {e}")))?;
    if d.is_zero() {
        return Err(HeaderError(format!("{header} must be positive")));
    }
    Ok(d)
}

/// `Upstash-Delay` and `…-Callback-Delay`: a duration (the caller checks the maximum).
fn parse_delay(header: &str, text: &str) -> Result<Duration, HeaderError> {
    parse_duration(text).map_err(|e| HeaderError(format!("{header}: {e}")))
}

/// `Upstash-Retries` and `…-Callback-Retries`: at most `limits.max_retries`.
fn parse_retries(header: &str, text: &str, limits: &Limits) -> Result<u32, HeaderError> {
    let retries: u32 = text
        .parse()
        .map_err(|_| HeaderError(format!("{header} must be a non-negative integer")))?;
    if retries > limits.max_retries {
        return Err(HeaderError(format!(
            "{header} {retries} is above the maximum of {}",
            limits.max_retries
        )));
    }
    Ok(retries)
}

/// `Upstash-Retry-Delay` and `…-Callback-Retry-Delay`: a valid expression, kept as written.
fn parse_retry_delay(header: &str, text: &str) -> Result<String, HeaderError> {
    RetryDelayExpr::parse(text).map_err(|e| HeaderError(format!("{header}: {e}")))?;
    Ok(text.to_string())
}

const MILLIS_PER_SECOND: i64 = 1000;

fn too_far(header: &str, limits: &Limits) -> HeaderError {
    HeaderError(format!(
        "{header} is further away than the maximum delay of {}",
        super::short_duration(limits.max_delay)
    ))
}

/// The Upstash Workflow protocol's headers (`Upstash-Workflow-*`, `Upstash-Feature-Set`).
fn is_workflow(lower: &str) -> bool {
    lower.starts_with(WORKFLOW_PREFIX) || lower == FEATURE_SET
}

/// `http` lower-cases header names, so the publisher's original case is gone by the time we see
/// it. We restore the conventional Title-Case (`x-my-header` → `X-My-Header`); receivers match
/// header names case-insensitively anyway.
fn title_case(lower: &str) -> String {
    lower
        .split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Parses QStash durations: one or more `<number><unit>` with units `ms`, `s`, `m`, `h`, `d`
/// (`10s`, `1d10h30m`, `1.5s`); a bare integer means seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?} has a number without a unit"))?;
        if number_len == 0 {
            return Err(format!("{text:?} is not a duration like 10s or 1h30m"));
        }
        let number: f64 = rest[..number_len]
            .parse()
            .map_err(|_| format!("{text:?} has a malformed number"))?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            other => return Err(format!("{text:?} has an unknown unit {other:?}")),
        };
        rest = &rest[unit_len..];
        total += number * seconds_per_unit;
    }
    if !total.is_finite() || total > MAX_DURATION_SECS {
        return Err(format!("{text:?} is too long"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Upper bound of any parsed duration (100 years), far above every configurable maximum.
const MAX_DURATION_SECS: f64 = 100.0 * 365.0 * 86400.0;

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderName, HeaderValue};
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        max_delay: Duration::from_secs(7 * 86400),
        default_retries: 3,
        max_retries: 5,
        flow: FlowLimits {
            max_parallelism: 10,
            max_rate: 100,
            max_period: Duration::from_secs(7 * 86400),
        },
    };
    const NOW: i64 = 1_700_000_000_000;

    fn parse_publish(h: &HeaderMap) -> Result<PublishOptions, HeaderError> {
        super::parse_publish(h, &LIMITS, NOW)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn forwards_content_type_and_prefixed_headers_only() {
        let o = parse_publish(&headers(&[
            ("Content-Type", "application/json"),
            ("Upstash-Forward-My-Header", "v1"),
            ("upstash-forward-my-header", "v2"),
            ("upstash-forward-upstash-workflow-sdk-version", "1"),
            ("Authorization", "Bearer secret"),
            ("Upstash-Telemetry-Sdk", "upstash-qstash-js@2.12.0"),
            ("X-Other", "no"),
        ]))
        .unwrap();
        assert_eq!(o.forward["Content-Type"], vec!["application/json"]);
        assert_eq!(o.forward["My-Header"], vec!["v1", "v2"]);
        assert_eq!(o.forward["Upstash-Workflow-Sdk-Version"], vec!["1"]);
        assert_eq!(o.forward.len(), 3, "{:?}", o.forward);
        assert_eq!(o.method, "POST");
    }

    #[test]
    fn method_timeout_and_labels() {
        let o = parse_publish(&headers(&[
            ("upstash-method", "put"),
            ("upstash-timeout", "1.5s"),
            ("upstash-label", "a, b"),
            ("upstash-retries", "0"),
        ]))
        .unwrap();
        assert_eq!(o.method, "PUT");
        assert_eq!(o.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(o.labels, vec!["a", "b"]);
        assert_eq!(o.max_retries, 0);
        assert_eq!(
            parse_publish(&headers(&[])).unwrap().max_retries,
            3,
            "default"
        );
        let o = parse_publish(&headers(&[(
            "upstash-retry-delay",
            "pow(2, retried) * 1000",
        )]))
        .unwrap();
        assert_eq!(o.retry_delay.as_deref(), Some("pow(2, retried) * 1000"));
        assert!(
            parse_publish(&headers(&[("upstash-retries", "6")])).is_err(),
            "above max"
        );
        let err = parse_publish(&headers(&[("upstash-retry-delay", "2 ** retried")])).unwrap_err();
        assert!(err.0.contains("Upstash-Retry-Delay"), "{err}");
        assert!(parse_publish(&headers(&[("upstash-method", "TRACE")])).is_err());
        assert!(parse_publish(&headers(&[("upstash-timeout", "0s")])).is_err());
        assert!(parse_publish(&headers(&[("upstash-retries", "-1")])).is_err());
    }

    #[test]
    fn unknown_and_misplaced_headers_are_refused_not_ignored() {
        for (k, v) in [
            ("Upstash-Queue-Name", "q"),
            ("Upstash-Redact-Fields", "bodyy"),
            ("Upstash-Cron", "* * * * *"),
            ("Upstash-Schedule-Id", "s"),
            ("Upstash-Retires", "5"),
            ("Upstash-Workflow-RunId", "wfr_1"),
            ("Upstash-Feature-Set", "LazyFetch"),
        ] {
            let err = parse_publish(&headers(&[(k, v)])).expect_err(k);
            assert!(
                err.0.contains(&k.to_ascii_lowercase()) || err.0.contains(k),
                "{err}"
            );
        }
        parse_publish(&headers(&[(
            "Upstash-Content-Based-Deduplication",
            "False",
        )]))
        .unwrap();
        // Telemetry is documented as ignorable; Authorization never reaches the destination.
        let o = parse_publish(&headers(&[
            ("Upstash-Telemetry-Sdk", "upstash-qstash-js@2.12.0"),
            ("Authorization", "Bearer t"),
        ]))
        .unwrap();
        assert!(o.forward.is_empty(), "{:?}", o.forward);
        let o = parse_publish(&headers(&[("Upstash-Redact-Fields", "body,header[X-A]")])).unwrap();
        let r = o.redact.unwrap();
        assert!(r.body);
        assert_eq!(r.headers, ["x-a"]);
    }

    #[test]
    fn flow_control_needs_key_and_value() {
        let o = parse_publish(&headers(&[
            ("Upstash-Flow-Control-Key", "tenant-1"),
            (
                "Upstash-Flow-Control-Value",
                "parallelism=2, rate=10, period=1m",
            ),
        ]))
        .unwrap();
        let fc = o.flow_control.expect("flow control");
        assert_eq!(
            (fc.key.as_str(), fc.parallelism, fc.rate, fc.period_ms),
            ("tenant-1", Some(2), Some(10), 60_000)
        );
        for (pairs, needle) in [
            (
                &[("Upstash-Flow-Control-Key", "k")][..],
                "needs Upstash-Flow-Control-Value",
            ),
            (
                &[("Upstash-Flow-Control-Value", "rate=1")][..],
                "needs Upstash-Flow-Control-Key",
            ),
            (
                &[
                    ("Upstash-Flow-Control-Key", "k"),
                    ("Upstash-Flow-Control-Value", "rate=1000"),
                ][..],
                "maximum",
            ),
        ] {
            let err = parse_publish(&headers(pairs)).expect_err(needle);
            assert!(err.0.contains(needle), "{err}");
        }
        assert_eq!(parse_publish(&headers(&[])).unwrap().flow_control, None);
    }

    #[test]
    fn deduplication_headers() {
        let dedup = |pairs: &[(&str, &str)]| parse_publish(&headers(pairs)).map(|o| o.dedup);
        assert_eq!(dedup(&[]), Ok(None));
        assert_eq!(
            dedup(&[("Upstash-Deduplication-Id", "abc")]),
            Ok(Some(Dedup::Id("abc".into())))
        );
        for yes in ["true", "True", "TRUE"] {
            assert_eq!(
                dedup(&[("Upstash-Content-Based-Deduplication", yes)]),
                Ok(Some(Dedup::Content))
            );
        }
        assert_eq!(
            dedup(&[("Upstash-Content-Based-Deduplication", "False")]),
            Ok(None)
        );
        assert_eq!(
            dedup(&[
                ("Upstash-Content-Based-Deduplication", "true"),
                ("Upstash-Deduplication-Id", "abc")
            ]),
            Ok(Some(Dedup::Id("abc".into()))),
            "an explicit id wins"
        );
        assert!(dedup(&[("Upstash-Content-Based-Deduplication", "yes")]).is_err());
        assert!(dedup(&[("Upstash-Deduplication-Id", "")]).is_err());
    }

    #[test]
    fn callbacks_with_settings_and_forwarded_headers() {
        let o = parse_publish(&headers(&[
            ("Upstash-Retries", "4"),
            ("Upstash-Retry-Delay", "500"),
            ("Upstash-Callback", "https://cb.example.com/done?x=1"),
            ("Upstash-Callback-Forward-X-Token", "t1"),
            ("Upstash-Callback-Method", "put"),
            ("Upstash-Callback-Timeout", "2s"),
            ("Upstash-Callback-Retries", "1"),
            ("Upstash-Callback-Retry-Delay", "100 * retried"),
            ("Upstash-Callback-Delay", "1m"),
            // Python's callback_headers={"X-Py": ...}: forwarded (lenient).
            ("Upstash-Callback-X-Py", "py"),
            ("upstash-failure-callback", "http://127.0.0.1:9/failed"),
            (
                "Upstash-Failure-Callback-Forward-Upstash-Workflow-Is-Failure",
                "true",
            ),
            ("Upstash-Failure-Callback-Y", "y"),
        ]))
        .unwrap();
        let cb = o.callback.expect("callback");
        assert_eq!(cb.url, "https://cb.example.com/done?x=1");
        assert_eq!(cb.method, "PUT");
        assert_eq!(cb.header["X-Token"], vec!["t1"]);
        assert_eq!(cb.header["X-Py"], vec!["py"]);
        assert_eq!(cb.header.len(), 2, "{:?}", cb.header);
        assert_eq!(cb.timeout_ms, Some(2000));
        assert_eq!(cb.retries, 1);
        assert_eq!(cb.retry_delay_expression.as_deref(), Some("100 * retried"));
        assert_eq!(cb.delay_ms, Some(60_000));
        let fcb = o.failure_callback.expect("failure callback");
        assert_eq!(fcb.url, "http://127.0.0.1:9/failed");
        assert_eq!(fcb.method, "POST", "default method");
        assert_eq!(fcb.header["Upstash-Workflow-Is-Failure"], vec!["true"]);
        assert_eq!(fcb.header["Y"], vec!["y"]);
        assert_eq!(fcb.retries, 4, "defaults to the message's retries");
        assert_eq!(fcb.retry_delay_expression.as_deref(), Some("500"));
        assert_eq!((fcb.timeout_ms, fcb.delay_ms), (None, None));
        // Nothing of it reaches the destination.
        assert!(o.forward.is_empty(), "{:?}", o.forward);

        let plain = parse_publish(&headers(&[("Upstash-Callback", "https://x.com")])).unwrap();
        let cb = plain.callback.unwrap();
        assert_eq!(
            (cb.retries, cb.retry_delay_expression),
            (3, None),
            "the default retries of the message"
        );
        assert_eq!(plain.failure_callback, None);
        let no_url = parse_publish(&headers(&[("Upstash-Callback-Retries", "1")])).unwrap();
        assert_eq!(no_url.callback, None, "settings without a URL are ignored");
    }

    #[test]
    fn invalid_callback_headers_are_refused() {
        for (k, v, needle) in [
            (
                "Upstash-Callback",
                "not-a-url",
                "Upstash-Callback must be an absolute",
            ),
            (
                "Upstash-Callback",
                "ftp://x.com/a",
                "Upstash-Callback must be",
            ),
            ("Upstash-Callback", "https://", "Upstash-Callback must be"),
            (
                "Upstash-Failure-Callback",
                "/relative",
                "Upstash-Failure-Callback must be",
            ),
            (
                "Upstash-Callback-Method",
                "TRACE",
                "Upstash-Callback-Method",
            ),
            ("Upstash-Callback-Timeout", "0s", "Upstash-Callback-Timeout"),
            (
                "Upstash-Callback-Timeout",
                "soon",
                "Upstash-Callback-Timeout",
            ),
            ("Upstash-Callback-Retries", "6", "above the maximum"),
            (
                "Upstash-Failure-Callback-Retries",
                "-1",
                "Upstash-Failure-Callback-Retries",
            ),
            (
                "Upstash-Callback-Retry-Delay",
                "2 ** retried",
                "Upstash-Callback-Retry-Delay",
            ),
            ("Upstash-Callback-Delay", "8d", "maximum delay"),
            (
                "Upstash-Failure-Callback-Delay",
                "x",
                "Upstash-Failure-Callback-Delay",
            ),
            ("Upstash-Callback-Forward-", "x", "needs a header name"),
            ("Upstash-Callback-", "x", "needs a setting or header name"),
        ] {
            let err = parse_publish(&headers(&[("Upstash-Callback", "https://x.com"), (k, v)]))
                .expect_err(&format!("{k}: {v}"));
            assert!(err.0.contains(needle), "{k}: {v}: {err}");
        }
        // Prefix look-alikes are not callback headers: unknown, so refused.
        let err = parse_publish(&headers(&[("Upstash-Callbacks", "x")])).unwrap_err();
        assert!(
            err.0.contains("upstash-callbacks is not a QStash header"),
            "{err}"
        );
    }

    #[test]
    fn delay_and_not_before() {
        let o = parse_publish(&headers(&[("Upstash-Delay", "1d10h30m")])).unwrap();
        assert_eq!(o.not_before, Some(NOW + (86400 + 36000 + 1800) * 1000));
        let o = parse_publish(&headers(&[
            ("Upstash-Delay", "10s"),
            ("Upstash-Not-Before", "1700000100"),
        ]))
        .unwrap();
        assert_eq!(o.not_before, Some(1_700_000_100_000), "Not-Before wins");
        assert_eq!(parse_publish(&headers(&[])).unwrap().not_before, None);
        for (k, v, needle) in [
            ("Upstash-Delay", "8d", "maximum delay"),
            ("Upstash-Delay", "soon", "Upstash-Delay"),
            ("Upstash-Not-Before", "1800000000", "maximum delay"),
            ("Upstash-Not-Before", "-5", "negative"),
            ("Upstash-Not-Before", "12.5", "unix timestamp"),
        ] {
            let err = parse_publish(&headers(&[(k, v)])).expect_err(v);
            assert!(err.0.contains(needle), "{k}: {v}: {err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(
            parse_duration("1d10h30m"),
            Ok(Duration::from_secs(86400 + 36000 + 1800))
        );
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        for bad in ["", "s", "10x", "1.2.3s", "-5s", "10 s", "5sm"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    proptest! {
        #[test]
        fn duration_parser_never_panics(s in "\\PC{0,20}") {
            let _ = parse_duration(&s);
        }

        #[test]
        fn duration_parser_reads_what_it_is_given(d in 0u64..1000, h in 0u64..24, m in 0u64..60, s in 0u64..60) {
            let text = format!("{d}d{h}h{m}m{s}s");
            prop_assert_eq!(parse_duration(&text), Ok(Duration::from_secs(d*86400 + h*3600 + m*60 + s)));
        }
    }
}
