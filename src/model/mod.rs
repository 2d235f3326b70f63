//! The data kstash stores in Kafka and the rules for reading it off an HTTP request.
//!
//! Everything here is pure (no I/O), so it is unit-tested without Kafka or sockets. The envelope
//! and event types are the Kafka-native contract; their JSON Schemas live in `schemas/`.

pub mod callback;
pub mod destination;
pub mod dlq;
pub mod envelope;
pub mod event;
pub mod headers;
pub mod ids;
pub mod retry;

/// Milliseconds since the Unix epoch, the time unit of every JSON timestamp in the QStash API.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}
