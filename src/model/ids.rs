//! Identifier generation: `msg_…` message ids and `jwt_…` token ids.
//!
//! Ids are opaque to the SDKs; they only need to be unique and URL-safe. We use base58 (no
//! look-alike characters, no URL-reserved ones) of a millisecond timestamp followed by random
//! bytes, so ids sort roughly by creation time, which keeps logs and Kafka keys readable.

use rand::RngCore;

/// Random bytes per id: 128 bits makes a collision practically impossible.
const RANDOM_BYTES: usize = 16;

/// Prefix of message ids.
pub const MESSAGE_ID_PREFIX: &str = "msg_";
/// Prefix of dead-letter ids.
pub const DLQ_ID_PREFIX: &str = "dlq_";
/// Prefix of JWT ids (`jti`).
pub const JWT_ID_PREFIX: &str = "jwt_";

fn random_id(prefix: &str) -> String {
    let mut bytes = [0u8; 8 + RANDOM_BYTES];
    let millis = u64::try_from(super::now_ms()).unwrap_or_default();
    bytes[..8].copy_from_slice(&millis.to_be_bytes());
    rand::thread_rng().fill_bytes(&mut bytes[8..]);
    format!("{prefix}{}", bs58::encode(bytes).into_string())
}

/// A new id with `prefix` (e.g. a schedule id).
pub fn random_with_prefix(prefix: &str) -> String {
    random_id(prefix)
}

/// A new message id.
pub fn message_id() -> String {
    random_id(MESSAGE_ID_PREFIX)
}

/// A new dead-letter id.
pub fn dlq_id() -> String {
    random_id(DLQ_ID_PREFIX)
}

/// Prefix of process instance ids.
pub const INSTANCE_ID_PREFIX: &str = "ins_";

/// A new id for this process instance (e.g. its transactional identity).
pub fn instance_id() -> String {
    random_id(INSTANCE_ID_PREFIX)
}

/// A new JWT id.
pub fn jwt_id() -> String {
    random_id(JWT_ID_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_prefixed_url_safe_and_unique() {
        let ids: HashSet<String> = (0..10_000).map(|_| message_id()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(100) {
            assert!(id.starts_with("msg_"));
            assert!(id[4..].chars().all(|c| c.is_ascii_alphanumeric()), "{id}");
        }
        assert!(jwt_id().starts_with("jwt_"));
    }
}
