//! `Upstash-Signature`: the HS256 JWT every delivery carries.
//!
//! The key is the UTF-8 bytes of the `sig_…` string itself, as the SDK receivers expect. The
//! `body` claim is base64url (with padding) of SHA-256 over the exact bytes sent; receivers strip
//! padding before comparing, so padded tokens verify in both SDKs.

use base64::engine::general_purpose::URL_SAFE;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::ids;

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
    current: String,
    next: String,
    key: EncodingKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer { .. }")
    }
}

impl Signer {
    pub fn new(current: &str, next: &str) -> Self {
        Signer {
            current: current.to_string(),
            next: next.to_string(),
            key: EncodingKey::from_secret(current.as_bytes()),
        }
    }

    pub fn current_key(&self) -> &str {
        &self.current
    }

    pub fn next_key(&self) -> &str {
        &self.next
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
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
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
    fn empty_bodies_still_carry_a_body_claim() {
        assert_eq!(
            body_hash(b""),
            "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU="
        );
    }
}
