//! The data kstash stores in Kafka and the rules for reading it off an HTTP request.
//!
//! Everything here is pure (no I/O), so it is unit-tested without Kafka or sockets. The envelope
//! and event types are the Kafka-native contract; their JSON Schemas live in `schemas/`.

pub mod callback;
pub mod cancel;
pub mod dedup;
pub mod destination;
pub mod dlq;
pub mod envelope;
pub mod event;
pub mod flow;
pub mod headers;
pub mod ids;
pub mod pending;
pub mod poison;
pub mod queue;
pub mod redact;
pub mod retry;
pub mod schedule;
pub mod signing_keys;
pub mod url_group;

/// `90s` → `90s`, `120s` → `2m`, `86400s` → `1d`, `1500ms` → `1500ms`: the largest unit that
/// divides evenly (topic names of the delay ladder, limits in error messages).
pub fn short_duration(d: std::time::Duration) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let ms = d.as_millis();
    if ms % 1000 != 0 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs();
    UNITS
        .iter()
        .find(|(size, _)| secs >= *size && secs % size == 0)
        .map_or_else(
            || "0s".to_string(),
            |(size, unit)| format!("{}{unit}", secs / size),
        )
}

/// Milliseconds since the Unix epoch, the time unit of every JSON timestamp in the QStash API.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// Checks written records against the published JSON Schemas in `schemas/`: every field written
/// is declared, every required field is written, recursively through `$ref`s (within a schema
/// and to the other schema files).
#[cfg(test)]
pub(crate) mod schema_test {
    use serde_json::Value;

    /// The schema file `name` under `schemas/`.
    pub fn schema(name: &str) -> Value {
        let text = match name {
            "envelope.v1.json" => include_str!("../../schemas/envelope.v1.json"),
            "event.v1.json" => include_str!("../../schemas/event.v1.json"),
            "dlq.v1.json" => include_str!("../../schemas/dlq.v1.json"),
            "queue.v1.json" => include_str!("../../schemas/queue.v1.json"),
            "flow_control.v1.json" => include_str!("../../schemas/flow_control.v1.json"),
            "cancel.v1.json" => include_str!("../../schemas/cancel.v1.json"),
            "dedup.v1.json" => include_str!("../../schemas/dedup.v1.json"),
            "url_group.v1.json" => include_str!("../../schemas/url_group.v1.json"),
            "schedule.v1.json" => include_str!("../../schemas/schedule.v1.json"),
            "schedule_fire.v1.json" => include_str!("../../schemas/schedule_fire.v1.json"),
            "poison.v1.json" => include_str!("../../schemas/poison.v1.json"),
            "pending.v1.json" => include_str!("../../schemas/pending.v1.json"),
            "signing_keys.v1.json" => include_str!("../../schemas/signing_keys.v1.json"),
            other => panic!("unknown schema {other}"),
        };
        serde_json::from_str(text).expect("schema is JSON")
    }

    /// `record` decodes back to itself and what it writes conforms to schema file `name`.
    pub fn assert_round_trip<R>(record: &R, name: &str)
    where
        R: crate::kafka::record::Record + PartialEq + std::fmt::Debug,
    {
        assert_eq!(&R::decode(&record.encode()).unwrap(), record);
        let written: Value = serde_json::from_slice(&record.encode()).unwrap();
        assert_conforms(&written, name);
    }

    /// Panics with the offending path when `written` does not conform to schema file `name`.
    pub fn assert_conforms(written: &Value, name: &str) {
        let root = schema(name);
        check(&root, &root, written, name);
    }

    fn check(root: &Value, node: &Value, written: &Value, path: &str) {
        if let Some(reference) = node["$ref"].as_str() {
            // `#/pointer` within this schema, `file.json` or `file.json#/pointer` in another.
            let (file, pointer) = reference.split_once('#').unwrap_or((reference, ""));
            let other;
            let base = if file.is_empty() {
                root
            } else {
                other = schema(file);
                &other
            };
            let target = base
                .pointer(pointer)
                .unwrap_or_else(|| panic!("{path}: dangling $ref {reference}"));
            return check(base, target, written, path);
        }
        let props = node["properties"].as_object().expect("object schema");
        for (key, value) in written.as_object().expect("an object") {
            let prop = props
                .get(key)
                .unwrap_or_else(|| panic!("field {path}.{key} missing from schema"));
            if value.is_object() && (prop.get("$ref").is_some() || prop.get("properties").is_some())
            {
                check(root, prop, value, &format!("{path}.{key}"));
            }
        }
        for key in node["required"].as_array().into_iter().flatten() {
            let key = key.as_str().unwrap_or_default();
            assert!(
                written.get(key).is_some(),
                "required field {path}.{key} not written"
            );
        }
    }
}
