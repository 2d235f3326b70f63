//! FIFO queues: a queue's settings record and its name rule.
//!
//! The settings live on the compacted queues topic (key: the queue name; schema
//! `schemas/queue.v1.json`), so every process knows every queue. A queue's messages are keyed by
//! `q:<name>` on the ready topic (see `model::envelope`), which puts one queue on one partition;
//! the delivery stage then runs at most `parallelism` of them at a time, in order.

use serde::{Deserialize, Serialize};

/// Schema version of [`QueueRecord`].
pub const QUEUE_VERSION: u32 = 1;
/// Parallelism of a queue created by its first enqueue.
pub const DEFAULT_PARALLELISM: u32 = 1;
/// Longest queue name accepted.
pub const MAX_NAME_LEN: usize = 100;

/// A queue's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueRecord {
    pub v: u32,
    pub name: String,
    /// Messages of the queue in flight at most (1: strict FIFO).
    pub parallelism: u32,
    /// A paused queue accepts messages and delivers none until resumed.
    #[serde(default)]
    pub paused: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

crate::json_record!(QueueRecord, "queue", QUEUE_VERSION, key = name);

impl QueueRecord {
    /// A new queue.
    pub fn new(name: &str, parallelism: u32, paused: bool, now_ms: i64) -> Self {
        QueueRecord {
            v: QUEUE_VERSION,
            name: name.to_string(),
            parallelism,
            paused,
            created_at: now_ms,
            updated_at: now_ms,
        }
    }
}

/// Queue names (and URL-group names): 1 to [`MAX_NAME_LEN`] letters, digits, `-`, `_` or `.`.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{what} must be 1 to {MAX_NAME_LEN} characters long"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{what} {name:?} contains {c:?}: only letters, digits, '-', '_' and '.' are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::record::Record;

    #[test]
    fn names_follow_the_documented_rule() {
        for ok in ["q", "my-queue_1.v2", &"a".repeat(MAX_NAME_LEN)] {
            validate_name("queue name", ok).unwrap();
        }
        for (bad, needle) in [
            ("", "1 to"),
            ("a b", "' '"),
            ("a/b", "'/'"),
            ("ü", "'ü'"),
            (&"a".repeat(MAX_NAME_LEN + 1) as &str, "1 to"),
        ] {
            let err = validate_name("queue name", bad).unwrap_err();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
    }

    #[test]
    fn record_round_trips_and_matches_the_published_schema() {
        let r = QueueRecord::new("orders", 3, true, 7);
        crate::model::schema_test::assert_round_trip(&r, "queue.v1.json");
        assert_eq!(QueueRecord::schema_header(), "queue.v1");
    }
}
