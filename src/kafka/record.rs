//! What a Kafka record type is to kstash: a schema name and version, a key, and an encoding.
//!
//! Design choice: every record kstash writes is versioned JSON (readable by any Kafka-native
//! consumer without a registry) carrying a `kstash-schema: <name>.v<version>` header, and every
//! reader refuses a version newer than it knows rather than misreading it. That contract lives
//! here once; a record type only states its name, version, key and `v` field
//! ([`JsonRecord`]), and the producer sends any [`Record`] without knowing what it is.

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Kafka header naming the schema of the record value, for Kafka-native consumers.
pub const SCHEMA_HEADER: &str = "kstash-schema";

/// A value that is not a record this build can read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{schema} record is not valid JSON: {error}")]
    Json {
        schema: &'static str,
        error: serde_json::Error,
    },
    #[error("{schema} record version {found} is newer than this build understands ({known})")]
    Version {
        schema: &'static str,
        found: u32,
        known: u32,
    },
}

/// A record type kstash writes to Kafka.
pub trait Record: Sized {
    /// Schema name, e.g. `envelope`; the header is `<name>.v<version>` (see `schemas/`).
    const SCHEMA: &'static str;
    /// Schema version written by this build; a reader refuses newer ones.
    const VERSION: u32;

    /// The Kafka key.
    fn key(&self) -> Cow<'_, str>;
    fn encode(&self) -> Vec<u8>;
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError>;

    /// The value of the [`SCHEMA_HEADER`].
    fn schema_header() -> String {
        format!("{}.v{}", Self::SCHEMA, Self::VERSION)
    }
}

/// A record stored as JSON with a `v` (schema version) field.
pub trait JsonRecord: Serialize + DeserializeOwned {
    const SCHEMA: &'static str;
    const VERSION: u32;
    fn key(&self) -> Cow<'_, str>;
    /// The `v` field as read.
    fn version(&self) -> u32;
}

/// Implements [`JsonRecord`] for a struct with a `v: u32` field whose Kafka key is one of its
/// string fields: `json_record!(CancelRecord, "cancel", CANCEL_VERSION, key = message_id)`.
#[macro_export]
macro_rules! json_record {
    ($ty:ty, $schema:literal, $version:expr, key = $field:ident) => {
        impl $crate::kafka::record::JsonRecord for $ty {
            const SCHEMA: &'static str = $schema;
            const VERSION: u32 = $version;
            fn key(&self) -> std::borrow::Cow<'_, str> {
                std::borrow::Cow::Borrowed(&self.$field)
            }
            fn version(&self) -> u32 {
                self.v
            }
        }
    };
}

impl<T: JsonRecord> Record for T {
    const SCHEMA: &'static str = <T as JsonRecord>::SCHEMA;
    const VERSION: u32 = <T as JsonRecord>::VERSION;

    fn key(&self) -> Cow<'_, str> {
        JsonRecord::key(self)
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record of plain data always serialises")
    }

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let record: T = serde_json::from_slice(bytes).map_err(|error| DecodeError::Json {
            schema: <T as JsonRecord>::SCHEMA,
            error,
        })?;
        if record.version() > <T as JsonRecord>::VERSION {
            return Err(DecodeError::Version {
                schema: <T as JsonRecord>::SCHEMA,
                found: record.version(),
                known: <T as JsonRecord>::VERSION,
            });
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        v: u32,
        id: String,
    }

    impl JsonRecord for Sample {
        const SCHEMA: &'static str = "sample";
        const VERSION: u32 = 2;
        fn key(&self) -> Cow<'_, str> {
            Cow::Borrowed(&self.id)
        }
        fn version(&self) -> u32 {
            self.v
        }
    }

    #[test]
    fn round_trips_and_refuses_newer_versions() {
        let s = Sample {
            v: 2,
            id: "a".into(),
        };
        assert_eq!(Sample::decode(&s.encode()).unwrap(), s);
        assert_eq!(Sample::schema_header(), "sample.v2");
        let newer = Sample {
            v: 3,
            id: "a".into(),
        };
        let err = Sample::decode(&newer.encode()).unwrap_err();
        assert!(err.to_string().contains("version 3"), "{err}");
        assert!(matches!(
            Sample::decode(b"{"),
            Err(DecodeError::Json { .. })
        ));
    }
}
