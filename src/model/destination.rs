//! Where a published message goes, read off the raw request target.
//!
//! The SDKs put the destination URL into the path unencoded (`/v2/publish/https://x.com/p?q=1`), so
//! the destination is the raw path remainder plus the raw query string. We
//! work on the raw `Uri`, never on decoded path parameters, so `//` and `%2F` survive untouched.
//! A destination that is not an `http(s)://` URL is the name of a URL group.

use axum::http::Uri;

/// Why a destination was refused; the text goes to the client in a 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    #[error("destination is missing")]
    Missing,
    #[error("destination {0:?} is not a valid URL: {1}")]
    InvalidUrl(String, String),
    #[error("destination {0:?} must be an http:// or https:// URL")]
    NotAUrl(String),
    #[error("destination {0:?} is neither an http(s) URL nor a URL group name: {1}")]
    NotAGroup(String, String),
}

/// A publish's destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Url(String),
    /// A URL group, by name.
    Group(String),
    /// One of the hosted service's built-in destinations (`api/llm`), resolved by the API to a
    /// URL (`api::llm`).
    Api(String),
}

/// Prefix of the hosted service's built-in destinations (`api/llm`).
pub const API_PREFIX: &str = "api/";

/// Reads a raw destination: an http(s) URL, else a URL group name.
pub fn parse(raw: &str) -> Result<Destination, DestinationError> {
    let lower = raw.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        validate_url(raw)?;
        return Ok(Destination::Url(raw.to_string()));
    }
    if raw.starts_with(API_PREFIX) {
        return Ok(Destination::Api(raw.to_string()));
    }
    super::queue::validate_name("URL group name", raw)
        .map_err(|e| DestinationError::NotAGroup(raw.to_string(), e))?;
    Ok(Destination::Group(raw.to_string()))
}

/// The destination of a publish: everything after `prefix` in the path, plus `?query` if any.
pub fn from_uri(uri: &Uri, prefix: &str) -> Result<Destination, DestinationError> {
    let path = uri.path();
    let rest = path.strip_prefix(prefix).unwrap_or_default();
    if rest.is_empty() {
        return Err(DestinationError::Missing);
    }
    let raw = match uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    parse(&raw)
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
        match from_uri(&target.parse::<Uri>().unwrap(), P)? {
            Destination::Url(url) => Ok(url),
            Destination::Group(name) => Ok(format!("group:{name}")),
            Destination::Api(name) => Ok(format!("api:{name}")),
        }
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
        assert_eq!(dest("/v2/publish/my-group").unwrap(), "group:my-group");
        assert_eq!(dest("/v2/publish/api/llm").unwrap(), "api:api/llm");
        assert!(matches!(
            dest("/v2/publish/ftp://x.com"),
            Err(DestinationError::NotAGroup(..))
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
