//! Where a published message goes, read off the raw request target.
//!
//! The SDKs put the destination URL into the path unencoded (`/v2/publish/https://x.com/p?q=1`), so
//! the destination is the raw path remainder plus the raw query string. We
//! work on the raw `Uri`, never on decoded path parameters, so `//` and `%2F` survive untouched.

use axum::http::Uri;

/// Why a destination was refused; the text goes to the client in a 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    #[error("destination is missing")]
    Missing,
    #[error("destination {0:?} is not a valid URL: {1}")]
    InvalidUrl(String, String),
    #[error("destination {0:?} must be an http:// or https:// URL (URL groups and api/ destinations are not supported yet)")]
    NotAUrl(String),
}

/// The destination of a publish: everything after `prefix` in the path, plus `?query` if any.
pub fn from_uri(uri: &Uri, prefix: &str) -> Result<String, DestinationError> {
    let path = uri.path();
    let rest = path.strip_prefix(prefix).unwrap_or_default();
    if rest.is_empty() {
        return Err(DestinationError::Missing);
    }
    let raw = match uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    validate_url(&raw)?;
    Ok(raw)
}

/// Accepts absolute http(s) URLs with a host; refuses everything else with a reason.
pub fn validate_url(raw: &str) -> Result<reqwest::Url, DestinationError> {
    let lower = raw.to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err(DestinationError::NotAUrl(raw.to_string()));
    }
    let url = reqwest::Url::parse(raw)
        .map_err(|e| DestinationError::InvalidUrl(raw.to_string(), e.to_string()))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(DestinationError::InvalidUrl(
            raw.to_string(),
            "no host".into(),
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/v2/publish/";

    fn dest(target: &str) -> Result<String, DestinationError> {
        from_uri(&target.parse::<Uri>().unwrap(), P)
    }

    #[test]
    fn keeps_raw_path_query_and_encoding() {
        assert_eq!(
            dest("/v2/publish/https://example.com/path?x=1&y=2").unwrap(),
            "https://example.com/path?x=1&y=2"
        );
        assert_eq!(
            dest("/v2/publish/https://example.com/a%2Fb//c").unwrap(),
            "https://example.com/a%2Fb//c"
        );
        assert_eq!(
            dest("/v2/publish/http://127.0.0.1:9000").unwrap(),
            "http://127.0.0.1:9000"
        );
    }

    #[test]
    fn refuses_non_urls() {
        assert_eq!(dest("/v2/publish/"), Err(DestinationError::Missing));
        assert!(matches!(
            dest("/v2/publish/my-group"),
            Err(DestinationError::NotAUrl(_))
        ));
        assert!(matches!(
            dest("/v2/publish/ftp://x.com"),
            Err(DestinationError::NotAUrl(_))
        ));
        assert!(matches!(
            dest("/v2/publish/https://"),
            Err(DestinationError::InvalidUrl(..))
        ));
        assert!(matches!(
            dest("/v2/publish/http://exa%20mple.com/"),
            Err(DestinationError::InvalidUrl(..))
        ));
    }
}
