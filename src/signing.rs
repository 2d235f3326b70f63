//! `Upstash-Signature`: the HS256 JWT every delivery carries.
//!
//! The key is the UTF-8 bytes of the `sig_…` string itself, as the SDK receivers expect. The
//! `body` claim is base64url (with padding) of SHA-256 over the exact bytes sent; receivers strip
//! padding before comparing, so padded tokens verify in both SDKs.
//!
//! The [`Signer`] is also the view of the signing-keys topic (`model::signing_keys`): it starts
//! with the configured keys and takes every newer record the views read, so a rotation through
//! any process changes what every process signs with. Clones share the keys.

use base64::engine::general_purpose::URL_SAFE;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use std::sync::{Arc, RwLock};

use crate::model::ids;
use crate::model::signing_keys::SigningKeysRecord;

/// Issuer claim the SDK receivers require.
pub const ISSUER: &str = "Upstash";
/// Token lifetime in seconds (QStash's default).
pub const TOKEN_LIFETIME_SECS: i64 = 300;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
    pub body: String,
}

/// Signs deliveries with the current key; knows the next key for rotation.
#[derive(Clone)]
pub struct Signer {
    keys: Arc<RwLock<Keys>>,
}

/// The keys in force and when they were set.
struct Keys {
    current: String,
    next: String,
    key: EncodingKey,
    /// `updatedAt` of the record they came from; `None` for the configured keys before the
    /// topic was read.
    updated_at: Option<i64>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer { .. }")
    }
}

impl Signer {
    /// A signer with the configured keys, until a record of the signing-keys topic replaces them.
    pub fn new(current: &str, next: &str) -> Self {
        Signer {
            keys: Arc::new(RwLock::new(Keys {
                current: current.to_string(),
                next: next.to_string(),
                key: EncodingKey::from_secret(current.as_bytes()),
                updated_at: None,
            })),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        // A writer never panics while holding the lock (it only assigns), so poisoning cannot
        // leave half-set keys; take them anyway.
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn current_key(&self) -> String {
        self.read().current.clone()
    }

    pub fn next_key(&self) -> String {
        self.read().next.clone()
    }

    /// The keys in force as a record (the base of a rotation); `None` until a record of the
    /// signing-keys topic was read (the topic is then still to be seeded).
    pub fn record(&self) -> Option<SigningKeysRecord> {
        let keys = self.read();
        keys.updated_at.map(|updated_at| SigningKeysRecord {
            v: crate::model::signing_keys::SIGNING_KEYS_VERSION,
            id: String::new(),
            current: keys.current.clone(),
            next: keys.next.clone(),
            updated_at,
        })
    }

    /// Takes `record` unless the keys in force are newer (records arrive in any order across
    /// the seed and rotation keys, and a process reads its own writes twice).
    pub fn apply(&self, record: &SigningKeysRecord) {
        let mut keys = self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if keys.updated_at.is_some_and(|at| at > record.updated_at) {
            return;
        }
        if keys.current != record.current {
            keys.key = EncodingKey::from_secret(record.current.as_bytes());
            keys.current.clone_from(&record.current);
        }
        keys.next.clone_from(&record.next);
        keys.updated_at = Some(record.updated_at);
    }

    /// A token for a request with `body` sent to `url`, valid from `now_secs`.
    pub fn sign(&self, url: &str, body: &[u8], now_secs: i64) -> String {
        let claims = Claims {
            iss: ISSUER.to_string(),
            sub: url.to_string(),
            iat: now_secs,
            nbf: now_secs,
            exp: now_secs + TOKEN_LIFETIME_SECS,
            jti: ids::jwt_id(),
            body: body_hash(body),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.read().key)
            .expect("HS256 signing with an in-memory key cannot fail")
    }
}

/// base64url (padded) of SHA-256 of `body`.
pub fn body_hash(body: &[u8]) -> String {
    URL_SAFE.encode(Sha256::digest(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn tokens_verify_with_the_current_key_and_carry_the_claims() {
        let signer = Signer::new("sig_current_aaaaaaaaaaaaaaaaaaaaaaaa", "sig_next");
        let now = crate::model::now_ms() / 1000;
        let token = signer.sign("https://example.com/x", b"hello", now);

        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["iss", "sub", "exp", "nbf"]);
        let data = jsonwebtoken::decode::<Claims>(
            &token,
            &DecodingKey::from_secret(b"sig_current_aaaaaaaaaaaaaaaaaaaaaaaa"),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims.sub, "https://example.com/x");
        assert_eq!(data.claims.exp - data.claims.iat, TOKEN_LIFETIME_SECS);
        assert!(data.claims.jti.starts_with("jwt_"));
        // sha256("hello"), base64url with padding
        assert_eq!(
            data.claims.body,
            "LPJNul-wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ="
        );

        let wrong = jsonwebtoken::decode::<Claims>(
            &token,
            &DecodingKey::from_secret(b"sig_next"),
            &validation,
        );
        assert!(wrong.is_err(), "must not verify with another key");
    }

    #[test]
    fn records_replace_the_keys_unless_older() {
        let signer = Signer::new("sig_config_aaaaaaaaaaaaaaaaaaaaaaa", "sig_config_next");
        let shared = signer.clone();
        assert!(
            signer.record().is_none(),
            "configured keys are not a record"
        );
        let seed = SigningKeysRecord::seed("sig_seed_current_aaaaaaaaaaaaaaaa", "sig_seed_next");
        let rotation = seed.rotated(1_000);
        shared.apply(&rotation);
        // The seed is older than the rotation, whatever order they are read in.
        shared.apply(&seed);
        assert_eq!(signer.current_key(), rotation.current);
        assert_eq!(signer.next_key(), rotation.next);
        assert_eq!(signer.record().unwrap().updated_at, 1_000);

        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        let token = signer.sign("https://example.com", b"", 1);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let ok = jsonwebtoken::decode::<Claims>(
            &token,
            &DecodingKey::from_secret(rotation.current.as_bytes()),
            &validation,
        );
        assert!(ok.is_ok(), "signed with the rotated current key");
    }

    #[test]
    fn empty_bodies_still_carry_a_body_claim() {
        assert_eq!(
            body_hash(b""),
            "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU="
        );
    }
}
