//! Reading the `Upstash-*` control headers of a publish request (`qstash-api.md` §3).
//!
//! Header names are matched without regard to case (the TS SDK lower-cases them, Python does not).
//! Every header kstash recognises but does not implement yet is refused with a 400 naming it,
//! rather than silently ignored: a message published with `Upstash-Delay` must never be delivered
//! early because this build did not know about delays.

use std::time::Duration;

use axum::http::HeaderMap;

use super::envelope::HeaderMap as JsonHeaderMap;
use super::retry::RetryDelayExpr;

/// Prefix of headers forwarded to the destination with the prefix removed.
pub const FORWARD_PREFIX: &str = "upstash-forward-";
/// Delivery methods QStash allows.
pub const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];
/// Method used when `Upstash-Method` is absent.
pub const DEFAULT_METHOD: &str = "POST";

/// Headers that are recognised but whose feature this build does not have yet.
const NOT_YET_SUPPORTED: [&str; 8] = [
    "upstash-callback",
    "upstash-failure-callback",
    "upstash-deduplication-id",
    "upstash-flow-control-key",
    "upstash-flow-control-value",
    "upstash-redact-fields",
    "upstash-queue-name",
    "upstash-cron",
];

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
}

/// What the headers of one publish ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOptions {
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
}

/// Parses the control headers of a publish received at `now_ms`.
pub fn parse_publish(
    headers: &HeaderMap,
    limits: &Limits,
    now_ms: i64,
) -> Result<PublishOptions, HeaderError> {
    let mut delay: Option<Duration> = None;
    let mut not_before_secs: Option<i64> = None;
    let mut options = PublishOptions {
        not_before: None,
        method: DEFAULT_METHOD.to_string(),
        forward: JsonHeaderMap::new(),
        timeout: None,
        labels: Vec::new(),
        max_retries: limits.default_retries,
        retry_delay: None,
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
            let method = text()?.to_ascii_uppercase();
            if !METHODS.contains(&method.as_str()) {
                return Err(HeaderError(format!(
                    "Upstash-Method must be one of {}, got {method:?}",
                    METHODS.join(", ")
                )));
            }
            options.method = method;
        } else if lower == "upstash-timeout" {
            let d = parse_duration(text()?)
                .map_err(|e| HeaderError(format!("Upstash-Timeout: {e}")))?;
            if d.is_zero() {
                return Err(HeaderError("Upstash-Timeout must be positive".into()));
            }
            options.timeout = Some(d);
        } else if lower == "upstash-delay" {
            delay = Some(
                parse_duration(text()?).map_err(|e| HeaderError(format!("Upstash-Delay: {e}")))?,
            );
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
            let retries: u32 = text()?.parse().map_err(|_| {
                HeaderError("Upstash-Retries must be a non-negative integer".into())
            })?;
            if retries > limits.max_retries {
                return Err(HeaderError(format!(
                    "Upstash-Retries {retries} is above the maximum of {}",
                    limits.max_retries
                )));
            }
            options.max_retries = retries;
        } else if lower == "upstash-retry-delay" {
            let source = text()?;
            RetryDelayExpr::parse(source)
                .map_err(|e| HeaderError(format!("Upstash-Retry-Delay: {e}")))?;
            options.retry_delay = Some(source.to_string());
        } else if lower == "upstash-content-based-deduplication" {
            if text()?.eq_ignore_ascii_case("true") {
                return Err(not_yet(lower));
            }
        } else if NOT_YET_SUPPORTED.contains(&lower)
            || lower.starts_with("upstash-callback-")
            || lower.starts_with("upstash-failure-callback-")
        {
            return Err(not_yet(lower));
        }
        // Everything else (Authorization, telemetry, other Upstash-* headers, hop-by-hop headers)
        // stays here: only Content-Type and Upstash-Forward-* reach the destination.
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
    Ok(options)
}

const MILLIS_PER_SECOND: i64 = 1000;

fn too_far(header: &str, limits: &Limits) -> HeaderError {
    HeaderError(format!(
        "{header} is further away than the maximum delay of {}",
        humantime::format_duration(limits.max_delay)
    ))
}

fn not_yet(name: &str) -> HeaderError {
    HeaderError(format!(
        "header {name} is not supported yet by this kstash build"
    ))
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
    fn unimplemented_features_are_refused_not_ignored() {
        for (k, v) in [
            ("Upstash-Callback", "https://x.com"),
            ("Upstash-Callback-Forward-A", "b"),
            ("Upstash-Deduplication-Id", "x"),
            ("Upstash-Content-Based-Deduplication", "True"),
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
