//! Bearer-token authentication for every `/v2` route.
//!
//! Tokens are compared in constant time (`subtle`) against each configured token, so response
//! timing does not reveal how much of a guessed token was right.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::error::ApiError;

const BEARER_PREFIX: &str = "Bearer ";

/// The accepted tokens.
#[derive(Clone)]
pub struct Tokens(Arc<Vec<String>>);

impl Tokens {
    pub fn new(tokens: Vec<String>) -> Self {
        Tokens(Arc::new(tokens))
    }

    /// Whether `candidate` is one of the tokens; every token is compared, in constant time.
    pub fn accepts(&self, candidate: &str) -> bool {
        // Start-up refuses empty tokens; an empty candidate is refused here as well.
        !candidate.is_empty()
            && self.0.iter().fold(false, |found, token| {
                found | bool::from(token.as_bytes().ct_eq(candidate.as_bytes()))
            })
    }
}

/// Middleware: 401 unless `Authorization: Bearer <token>` carries an accepted token.
pub async fn require_token(
    State(tokens): State<Tokens>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = request
        .headers()
        .get(AUTHORIZATION)
        .ok_or(ApiError::Unauthorized("missing Authorization header"))?;
    let token = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix(BEARER_PREFIX))
        .ok_or(ApiError::Unauthorized(
            "Authorization header must be 'Bearer <token>'",
        ))?;
    if !tokens.accepts(token.trim()) {
        return Err(ApiError::Unauthorized("invalid token"));
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_configured_tokens() {
        let t = Tokens::new(vec!["alpha".into(), "beta".into()]);
        assert!(t.accepts("alpha"));
        assert!(t.accepts("beta"));
        assert!(!t.accepts("alph"));
        assert!(!t.accepts("alphaa"));
        assert!(!t.accepts(""));
        assert!(!Tokens::new(vec![]).accepts(""));
        assert!(!Tokens::new(vec!["alpha".into(), String::new()]).accepts(""));
    }
}
