//! Flow control: what `Upstash-Flow-Control-Value` asks for,
//! and the per-key settings record stored on the compacted flow-control topic.
//!
//! Messages sharing a flow-control key share two limits: at most `parallelism` attempts in flight
//! and at most `rate` attempt starts per `period`. The newest message's values become the key's
//! values unless the key is pinned (then the pinned ones hold). Design choices where the reference
//! leaves room:
//! - The value is `parallelism=<n>, rate=<n>, period=<duration>` in any subset and order, separated
//!   by commas with or without spaces (TS sends `", "`); `ratePerSecond` is read as `rate` (the TS
//!   option's older name). At least one of parallelism or rate; an unknown or repeated part, a zero,
//!   or a value above the configured maximum is a 400 naming the part.
//! - `period` defaults to one second and is at most `flow_control.max_period` (one week).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::headers::{parse_duration, HeaderError};

/// Period of the rate when the value gives none.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(1);
/// Longest flow-control key accepted.
pub const MAX_KEY_LEN: usize = 200;

/// Upper bounds of flow-control values (`[flow_control]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLimits {
    pub max_parallelism: u32,
    pub max_rate: u32,
    pub max_period: Duration,
}

/// What one message asks of its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowControl {
    /// The flow-control key.
    pub key: String,
    /// Attempts in flight at most; none = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u32>,
    /// Attempt starts per period at most; none = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u32>,
    /// Length of the rate period (ms).
    pub period_ms: u64,
}

impl FlowControl {
    /// Reads `Upstash-Flow-Control-Key` and `Upstash-Flow-Control-Value`.
    pub fn parse(key: &str, value: &str, limits: &FlowLimits) -> Result<Self, HeaderError> {
        validate_key(key)?;
        let bad = |m: String| HeaderError(format!("Upstash-Flow-Control-Value: {m}"));
        let mut parallelism = None;
        let mut rate = None;
        let mut period = None;
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, text) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not name=value")))?;
            let (name, text) = (name.trim(), text.trim());
            let count = |max: u32| -> Result<u32, HeaderError> {
                let n: u32 = text
                    .parse()
                    .map_err(|_| bad(format!("{name} must be a positive integer, got {text:?}")))?;
                if n == 0 {
                    return Err(bad(format!("{name} must be at least 1")));
                }
                if n > max {
                    return Err(bad(format!("{name} {n} is above the maximum of {max}")));
                }
                Ok(n)
            };
            let slot_taken = || bad(format!("{name} is given twice"));
            match name {
                "parallelism" => {
                    if parallelism
                        .replace(count(limits.max_parallelism)?)
                        .is_some()
                    {
                        return Err(slot_taken());
                    }
                }
                "rate" | "ratePerSecond" => {
                    if rate.replace(count(limits.max_rate)?).is_some() {
                        return Err(slot_taken());
                    }
                }
                "period" => {
                    let d = parse_duration(text).map_err(|e| bad(format!("period: {e}")))?;
                    if d.is_zero() {
                        return Err(bad("period must be positive".into()));
                    }
                    if d > limits.max_period {
                        return Err(bad(format!(
                            "period is longer than the maximum of {}",
                            super::short_duration(limits.max_period)
                        )));
                    }
                    if period.replace(d).is_some() {
                        return Err(slot_taken());
                    }
                }
                other => {
                    return Err(bad(format!(
                        "unknown part {other:?} (expected parallelism, rate, period)"
                    )))
                }
            }
        }
        if parallelism.is_none() && rate.is_none() {
            return Err(bad("give at least one of parallelism and rate".into()));
        }
        Ok(FlowControl {
            key: key.to_string(),
            parallelism,
            rate,
            period_ms: duration_ms(period.unwrap_or(DEFAULT_PERIOD)),
        })
    }

    /// The value in the canonical form [`FlowControl::parse`] reads back.
    pub fn value(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = self.parallelism {
            parts.push(format!("parallelism={p}"));
        }
        if let Some(r) = self.rate {
            parts.push(format!("rate={r}"));
        }
        parts.push(format!("period={}ms", self.period_ms));
        parts.join(", ")
    }
}

/// A flow-control key must be non-empty visible ASCII without `/` (it is a path segment of the
/// flow-control API), at most [`MAX_KEY_LEN`] long.
pub fn validate_key(key: &str) -> Result<(), HeaderError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(HeaderError(format!(
            "Upstash-Flow-Control-Key must be 1 to {MAX_KEY_LEN} characters"
        )));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
        return Err(HeaderError(
            "Upstash-Flow-Control-Key must be visible ASCII without '/'".into(),
        ));
    }
    Ok(())
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The settings of a flow-control key as stored (key: the flow-control key; schema
/// `schemas/flow_control.v1.json`). Written by the API: when a publish brings values that differ
/// from the stored ones, and by pause, resume, pin, unpin and reset-rate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowControlRecord {
    pub v: u32,
    pub key: String,
    /// The values in force: the newest message's, or the pinned ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u32>,
    pub period_ms: u64,
    /// Messages' values no longer change `parallelism` (resp. `rate` and `period`).
    #[serde(default)]
    pub pinned_parallelism: bool,
    #[serde(default)]
    pub pinned_rate: bool,
    /// No new attempts start while paused; messages wait.
    #[serde(default)]
    pub paused: bool,
    /// The rate period was restarted at this time (unix ms) by a reset-rate or a pin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_reset_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Schema version of [`FlowControlRecord`].
pub const FLOW_CONTROL_VERSION: u32 = 1;

crate::json_record!(
    FlowControlRecord,
    "flow_control",
    FLOW_CONTROL_VERSION,
    key = key
);

impl FlowControlRecord {
    /// A new key with the values of its first message.
    pub fn new(values: &FlowControl, now_ms: i64) -> Self {
        FlowControlRecord {
            v: FLOW_CONTROL_VERSION,
            key: values.key.clone(),
            parallelism: values.parallelism,
            rate: values.rate,
            period_ms: values.period_ms,
            pinned_parallelism: false,
            pinned_rate: false,
            paused: false,
            rate_reset_at: None,
            created_at: now_ms,
            updated_at: now_ms,
        }
    }

    /// The record after a message with `values` arrived, or `None` when nothing changes (pinned
    /// parts keep their values).
    pub fn with_message_values(&self, values: &FlowControl, now_ms: i64) -> Option<Self> {
        let mut next = self.clone();
        if !self.pinned_parallelism {
            next.parallelism = values.parallelism;
        }
        if !self.pinned_rate {
            next.rate = values.rate;
            next.period_ms = values.period_ms;
        }
        (next != *self).then(|| {
            next.updated_at = now_ms.max(self.updated_at + 1);
            next
        })
    }

    /// The limits in force for a message carrying `values`: pinned parts from this record, the
    /// rest from the message (the newest message's values win unless pinned).
    pub fn effective(&self, values: &FlowControl) -> FlowControl {
        FlowControl {
            key: values.key.clone(),
            parallelism: if self.pinned_parallelism {
                self.parallelism
            } else {
                values.parallelism
            },
            rate: if self.pinned_rate {
                self.rate
            } else {
                values.rate
            },
            period_ms: if self.pinned_rate {
                self.period_ms
            } else {
                values.period_ms
            },
        }
    }
}

#[cfg(test)]
pub(crate) fn sample_record() -> FlowControlRecord {
    FlowControlRecord {
        v: FLOW_CONTROL_VERSION,
        key: "k".into(),
        parallelism: Some(2),
        rate: Some(10),
        period_ms: 60_000,
        pinned_parallelism: true,
        pinned_rate: false,
        paused: true,
        rate_reset_at: Some(5),
        created_at: 1,
        updated_at: 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: FlowLimits = FlowLimits {
        max_parallelism: 100,
        max_rate: 1000,
        max_period: Duration::from_secs(7 * 86400),
    };

    fn parse(v: &str) -> Result<FlowControl, HeaderError> {
        FlowControl::parse("k", v, &LIMITS)
    }

    #[test]
    fn reads_any_subset_in_any_order() {
        let all = parse("parallelism=2, rate=10, period=1m").unwrap();
        assert_eq!(
            (all.parallelism, all.rate, all.period_ms),
            (Some(2), Some(10), 60_000)
        );
        let reordered = parse("period=3d5h12m,rate=5,parallelism=1").unwrap();
        assert_eq!(reordered.period_ms, (3 * 86400 + 5 * 3600 + 12 * 60) * 1000);
        let only_rate = parse("rate=3").unwrap();
        assert_eq!(
            (only_rate.parallelism, only_rate.rate, only_rate.period_ms),
            (None, Some(3), 1000),
            "period defaults to 1 s"
        );
        assert_eq!(parse("parallelism=7").unwrap().rate, None);
        assert_eq!(parse("ratePerSecond=4").unwrap().rate, Some(4));
        assert_eq!(
            parse(&all.value()).unwrap(),
            all,
            "canonical form reads back"
        );
    }

    #[test]
    fn malformed_values_are_refused_naming_the_problem() {
        for (value, needle) in [
            ("", "at least one"),
            ("period=1s", "at least one"),
            ("parallelism=0", "at least 1"),
            ("parallelism=x", "positive integer"),
            ("parallelism=-1", "positive integer"),
            ("rate=1001", "maximum"),
            ("parallelism=101", "maximum"),
            ("rate=1, rate=2", "twice"),
            ("rate=1, period=0s", "positive"),
            ("rate=1, period=8d", "maximum"),
            ("rate=1, period=soon", "period"),
            ("speed=3", "unknown part"),
            ("rate", "name=value"),
        ] {
            let err = parse(value).expect_err(value);
            assert!(err.0.contains(needle), "{value:?}: {err}");
        }
        for key in ["", "a/b", "sp ace", &"k".repeat(MAX_KEY_LEN + 1)] {
            assert!(
                FlowControl::parse(key, "rate=1", &LIMITS).is_err(),
                "{key:?}"
            );
        }
    }

    #[test]
    fn newest_values_win_unless_pinned() {
        let first = parse("parallelism=2, rate=10").unwrap();
        let record = FlowControlRecord::new(&first, 1);
        assert_eq!(record.with_message_values(&first, 2), None, "no change");
        let newer = parse("parallelism=5").unwrap();
        let updated = record.with_message_values(&newer, 3).unwrap();
        assert_eq!((updated.parallelism, updated.rate), (Some(5), None));
        assert_eq!(updated.updated_at, 3);
        let pinned = FlowControlRecord {
            pinned_parallelism: true,
            ..record.clone()
        };
        let after = pinned.with_message_values(&newer, 4).unwrap();
        assert_eq!(
            (after.parallelism, after.rate),
            (Some(2), None),
            "pinned parallelism kept, rate follows the message"
        );
        assert_eq!(pinned.effective(&newer).parallelism, Some(2));
        assert_eq!(record.effective(&newer).parallelism, Some(5));
    }

    #[test]
    fn record_round_trips_and_matches_the_published_schema() {
        let r = sample_record();
        crate::model::schema_test::assert_round_trip(&r, "flow_control.v1.json");
    }

    proptest! {
        #[test]
        fn parser_never_panics(key in "\\PC{0,10}", value in "\\PC{0,40}") {
            let _ = FlowControl::parse(&key, &value, &LIMITS);
        }
    }
}
