//! Bearer-token authentication for every `/v2` route.
//!
//! The token comes from `Authorization: Bearer <token>` or, as QStash also allows, from the query
//! parameter `qstash_token`. A query token is removed from the request before any handler sees
//! it, so it never becomes part of a stored destination URL (a publish's destination is the raw
//! path plus the raw query) or of a filter. Tokens are compared in constant time (`subtle`)
//! against each configured token, so response timing does not reveal how much of a guessed token
//! was right.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::Uri;
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::error::ApiError;

const BEARER_PREFIX: &str = "Bearer ";
/// The query parameter that may carry the token instead of the header.
pub const TOKEN_PARAM: &str = "qstash_token";

/// The token a request was authenticated with (a request extension, for the per-token limit).
#[derive(Debug, Clone)]
pub struct Caller(pub String);

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

/// `query` without its `qstash_token` parameters (the others kept byte for byte), and the first
/// token's decoded value; `None` for the query when nothing else is left.
pub fn split_token(query: &str) -> (Option<String>, Option<String>) {
    let mut token = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if key != TOKEN_PARAM {
                return true;
            }
            if token.is_none() {
                token = url::form_urlencoded::parse(format!("t={value}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned());
            }
            false
        })
        .collect();
    let rest = (!kept.is_empty()).then(|| kept.join("&"));
    (token, rest)
}

/// `uri` with `query` as its query.
fn with_query(uri: &Uri, query: Option<&str>) -> Result<Uri, ApiError> {
    let path_and_query = match query {
        Some(q) => format!("{}?{q}", uri.path()),
        None => uri.path().to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|_| ApiError::BadRequest("invalid request target".into()))?,
    );
    Uri::from_parts(parts).map_err(|_| ApiError::BadRequest("invalid request target".into()))
}

/// Middleware: 401 unless `Authorization: Bearer <token>` or `?qstash_token=<token>` carries an
/// accepted token (the header wins when both are given).
pub async fn require_token(
    State(tokens): State<Tokens>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (query_token, rest) = match request.uri().query() {
        Some(q)
            if q.split('&')
                .any(|p| p.split('=').next() == Some(TOKEN_PARAM)) =>
        {
            split_token(q)
        }
        _ => (None, None),
    };
    if let Some(query_token) = query_token {
        *request.uri_mut() = with_query(request.uri(), rest.as_deref())?;
        if request.headers().get(AUTHORIZATION).is_none() {
            if !tokens.accepts(query_token.trim()) {
                return Err(ApiError::Unauthorized("invalid token"));
            }
            request
                .extensions_mut()
                .insert(Caller(query_token.trim().to_string()));
            return Ok(next.run(request).await);
        }
    }
    let header = request
        .headers()
        .get(AUTHORIZATION)
        .ok_or(ApiError::Unauthorized(
            "missing Authorization header (or qstash_token query parameter)",
        ))?;
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
    let caller = Caller(token.trim().to_string());
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_token_is_taken_out_and_the_rest_kept_as_is() {
        assert_eq!(
            split_token("x=1&qstash_token=a%2Bb&y=%2F"),
            (Some("a+b".into()), Some("x=1&y=%2F".into()))
        );
        assert_eq!(split_token("qstash_token=t"), (Some("t".into()), None));
        assert_eq!(
            split_token("qstash_token=t&qstash_token=u&z"),
            (Some("t".into()), Some("z".into()))
        );
        assert_eq!(split_token("a=1"), (None, Some("a=1".into())));
    }

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
