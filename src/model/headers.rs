//! Reading the `Upstash-*` control headers of a publish request (`qstash-api.md` §3).
//!
//! Header names are matched without regard to case (the TS SDK lower-cases them, Python does not).
//! Every header kstash recognises but does not implement yet is refused with a 400 naming it,
//! rather than silently ignored: a message published with `Upstash-Delay` must never be delivered
//! early because this build did not know about delays.

use std::time::Duration;

use axum::http::HeaderMap;

use super::envelope::HeaderMap as JsonHeaderMap;

/// Prefix of headers forwarded to the destination with the prefix removed.
pub const FORWARD_PREFIX: &str = "upstash-forward-";
/// Delivery methods QStash allows.
pub const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];
/// Method used when `Upstash-Method` is absent.
pub const DEFAULT_METHOD: &str = "POST";

/// Headers that are recognised but whose feature this build does not have yet.
const NOT_YET_SUPPORTED: [&str; 11] = [
    "upstash-delay",
    "upstash-not-before",
    "upstash-retry-delay",
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

/// What the headers of one publish ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOptions {
    pub method: String,
    /// Headers for the destination (Content-Type and forwarded ones), publisher's case.
    pub forward: JsonHeaderMap,
    pub timeout: Option<Duration>,
    pub labels: Vec<String>,
    pub max_retries: u32,
}

/// Parses the control headers of a publish.
pub fn parse_publish(headers: &HeaderMap) -> Result<PublishOptions, HeaderError> {
    let mut options = PublishOptions {
        method: DEFAULT_METHOD.to_string(),
        forward: JsonHeaderMap::new(),
        timeout: None,
        labels: Vec::new(),
        max_retries: 0,
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
            if retries > 0 {
                return Err(HeaderError(
                    "Upstash-Retries above 0 is not supported yet by this kstash build (retries arrive with the delay ladder)".into(),
                ));
            }
            options.max_retries = retries;
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
    Ok(options)
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
        assert!(parse_publish(&headers(&[("upstash-method", "TRACE")])).is_err());
        assert!(parse_publish(&headers(&[("upstash-timeout", "0s")])).is_err());
        assert!(parse_publish(&headers(&[("upstash-retries", "-1")])).is_err());
    }

    #[test]
    fn unimplemented_features_are_refused_not_ignored() {
        for (k, v) in [
            ("Upstash-Delay", "10s"),
            ("Upstash-Not-Before", "1"),
            ("Upstash-Retries", "3"),
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
