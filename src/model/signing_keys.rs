//! The signing keys' record: the current and next `sig_…` keys every process signs deliveries
//! with (`signing::Signer`) and `GET /v2/keys` shows.
//!
//! Design choice: the keys live on a compacted topic (schema `schemas/signing_keys.v1.json`), so a
//! rotation made through any process reaches every process as fast as the views tail their topics
//! (well under a second), and survives restarts. Two keys are used:
//! - [`SEED_KEY`]: written at start-up from the configured keys when the topic holds nothing, with
//!   `updatedAt` 0, so a seed never outranks a rotation, whatever order they reach Kafka in;
//! - [`ROTATION_KEY`]: every `POST /v2/keys/rotate`, stamped with its time.
//!
//! The view takes the record with the latest `updatedAt`: after the first rotation the configured
//! keys no longer matter (change them with a rotation, not in the configuration).

use rand::distributions::Alphanumeric;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Schema version of [`SigningKeysRecord`].
pub const SIGNING_KEYS_VERSION: u32 = 1;
/// Kafka key of the record seeded from the configuration.
pub const SEED_KEY: &str = "seed";
/// Kafka key of the record written by rotations.
pub const ROTATION_KEY: &str = "rotation";
/// Prefix of every signing key.
pub const KEY_PREFIX: &str = "sig_";
/// Random characters after the prefix: 28 like QStash's, so a key is 32 bytes (PyJWT warns
/// about HMAC keys shorter than that).
pub const KEY_RANDOM_CHARS: usize = 28;

/// The signing keys as of `updated_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SigningKeysRecord {
    pub v: u32,
    /// [`SEED_KEY`] or [`ROTATION_KEY`].
    pub id: String,
    /// Deliveries are signed with this key.
    pub current: String,
    /// Receivers also accept this key; the next rotation makes it current.
    pub next: String,
    /// Unix ms of the rotation; 0 for the seed.
    pub updated_at: i64,
}

crate::json_record!(
    SigningKeysRecord,
    "signing_keys",
    SIGNING_KEYS_VERSION,
    key = id
);

impl SigningKeysRecord {
    /// The record seeding the topic with the configured keys.
    pub fn seed(current: &str, next: &str) -> Self {
        SigningKeysRecord {
            v: SIGNING_KEYS_VERSION,
            id: SEED_KEY.to_string(),
            current: current.to_string(),
            next: next.to_string(),
            updated_at: 0,
        }
    }

    /// The rotation of these keys at `now_ms`: next becomes current, a fresh key becomes next.
    /// Stamped later than this record even when clocks disagree.
    pub fn rotated(&self, now_ms: i64) -> Self {
        SigningKeysRecord {
            v: SIGNING_KEYS_VERSION,
            id: ROTATION_KEY.to_string(),
            current: self.next.clone(),
            next: fresh_key(),
            updated_at: now_ms.max(self.updated_at + 1),
        }
    }
}

/// A new random signing key: [`KEY_PREFIX`] and [`KEY_RANDOM_CHARS`] alphanumerics from the
/// thread's cryptographically secure generator.
pub fn fresh_key() -> String {
    let random: String = rand::thread_rng()
        .sample_iter(Alphanumeric)
        .take(KEY_RANDOM_CHARS)
        .map(char::from)
        .collect();
    format!("{KEY_PREFIX}{random}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::record::Record;

    #[test]
    fn rotation_makes_next_current_and_a_fresh_next() {
        let seed = SigningKeysRecord::seed("sig_a", "sig_b");
        let r1 = seed.rotated(1_000);
        assert_eq!(
            (r1.current.as_str(), r1.id.as_str()),
            ("sig_b", ROTATION_KEY)
        );
        assert!(r1.next.starts_with(KEY_PREFIX));
        assert_eq!(r1.next.len(), KEY_PREFIX.len() + KEY_RANDOM_CHARS);
        assert_ne!(r1.next, "sig_b");
        assert_eq!(r1.updated_at, 1_000);
        // A clock behind the last rotation still stamps the next one later.
        let r2 = r1.rotated(500);
        assert_eq!(r2.current, r1.next);
        assert_eq!(r2.updated_at, 1_001);
        assert_ne!(fresh_key(), fresh_key());
    }

    #[test]
    fn record_round_trips_and_matches_the_published_schema() {
        let r = SigningKeysRecord::seed("sig_a", "sig_b").rotated(7);
        crate::model::schema_test::assert_round_trip(&r, "signing_keys.v1.json");
        assert_eq!(SigningKeysRecord::schema_header(), "signing_keys.v1");
    }
}
