//! `Upstash-Redact-Fields`: which parts of a message the API must never show.
//!
//! Design choice: the message keeps its real values (the delivery, a DLQ retry and a schedule's
//! next message need them); the envelope carries *what* to redact, and every API rendering goes
//! through [`Redact::envelope`] / [`Redact::spec`], which replace each redacted value by
//! `REDACTED:<lowercase hex SHA-256 of the value>` (so a user can check a value they know against
//! it without the API revealing it). Accepted tokens, comma-separated, spaces allowed: `body`,
//! `header` or `headers` (every header), `header[Name]` or `headers[Name]` (one header, any case).
//! Anything else is refused, never ignored.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::envelope::{Envelope, HeaderMap};
use super::schedule::MessageSpec;

/// `Upstash-Redact-Fields`, lower case.
pub const HEADER: &str = "upstash-redact-fields";
/// What a redacted value is shown as, before its hash.
pub const REDACTED_PREFIX: &str = "REDACTED:";

/// The fields of a message the API shows redacted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Redact {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub body: bool,
    /// Every header.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_headers: bool,
    /// These headers (lower case).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
}

/// `REDACTED:<hex sha256>` of `value`.
pub fn redacted(value: &[u8]) -> String {
    format!("{REDACTED_PREFIX}{:x}", Sha256::digest(value))
}

impl Redact {
    /// Reads the header's value; the error names the offending token.
    pub fn parse(text: &str) -> Result<Redact, String> {
        let mut r = Redact::default();
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let lower = token.to_ascii_lowercase();
            match lower.as_str() {
                "body" => r.body = true,
                "header" | "headers" => r.all_headers = true,
                _ => {
                    let name = ["header[", "headers["]
                        .iter()
                        .find_map(|p| lower.strip_prefix(p))
                        .and_then(|rest| rest.strip_suffix(']'))
                        .map(str::trim)
                        .filter(|n| !n.is_empty() && axum::http::HeaderName::try_from(*n).is_ok())
                        .ok_or_else(|| {
                            format!(
                                "Upstash-Redact-Fields: unknown field {token:?} (expected body, header, headers, header[Name] or headers[Name])"
                            )
                        })?;
                    if !r.headers.iter().any(|h| h == name) {
                        r.headers.push(name.to_string());
                    }
                }
            }
        }
        if r == Redact::default() {
            return Err("Upstash-Redact-Fields names no field".into());
        }
        Ok(r)
    }

    /// Also redact header `name` (e.g. a credential kstash adds itself).
    pub fn with_header(mut self, name: &str) -> Self {
        let name = name.to_ascii_lowercase();
        if !self.headers.contains(&name) {
            self.headers.push(name);
        }
        self
    }

    fn header_redacted(&self, name: &str) -> bool {
        self.all_headers || self.headers.iter().any(|h| h.eq_ignore_ascii_case(name))
    }

    /// `header` with every redacted value replaced.
    pub fn header_map(&self, header: &HeaderMap) -> HeaderMap {
        header
            .iter()
            .map(|(name, values)| {
                let values = if self.header_redacted(name) {
                    values.iter().map(|v| redacted(v.as_bytes())).collect()
                } else {
                    values.clone()
                };
                (name.clone(), values)
            })
            .collect()
    }

    fn body_bytes(&self, body: &[u8]) -> Option<Vec<u8>> {
        self.body.then(|| redacted(body).into_bytes())
    }

    /// `m` as the API may show it.
    pub fn envelope(m: &Envelope) -> Cow<'_, Envelope> {
        shown(m)
    }

    /// A schedule's message as the API may show it.
    pub fn spec(m: &MessageSpec) -> Cow<'_, MessageSpec> {
        shown(m)
    }
}

/// A message (or a schedule's message template): its redaction and the fields it covers.
trait Redactable: Clone {
    fn redaction(&self) -> Option<&Redact>;
    fn header_and_body(&mut self) -> (&mut HeaderMap, &mut Vec<u8>);
}

impl Redactable for Envelope {
    fn redaction(&self) -> Option<&Redact> {
        self.redact.as_ref()
    }
    fn header_and_body(&mut self) -> (&mut HeaderMap, &mut Vec<u8>) {
        (&mut self.header, &mut self.body)
    }
}

impl Redactable for MessageSpec {
    fn redaction(&self) -> Option<&Redact> {
        self.redact.as_ref()
    }
    fn header_and_body(&mut self) -> (&mut HeaderMap, &mut Vec<u8>) {
        (&mut self.header, &mut self.body)
    }
}

/// `m` with its redacted values replaced (borrowed as it is when it redacts nothing).
fn shown<T: Redactable>(m: &T) -> Cow<'_, T> {
    let Some(r) = m.redaction() else {
        return Cow::Borrowed(m);
    };
    let r = r.clone();
    let mut shown = m.clone();
    let (header, body) = shown.header_and_body();
    *header = r.header_map(header);
    if let Some(redacted_body) = r.body_bytes(body) {
        *body = redacted_body;
    }
    Cow::Owned(shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_the_sdks_and_docs_use() {
        let r = Redact::parse("body,header[Authorization]").unwrap();
        assert!(r.body && !r.all_headers);
        assert_eq!(r.headers, ["authorization"]);
        let r = Redact::parse("headers[X-Secret], headers[x-secret] , HEADERS").unwrap();
        assert!(!r.body && r.all_headers);
        assert_eq!(r.headers, ["x-secret"]);
        assert!(Redact::parse("header").unwrap().all_headers);
        for bad in ["bodyy", "header[]", "header[a b]", "header[x", "", " , "] {
            assert!(Redact::parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(Redact::parse("bodyy").unwrap_err().contains("\"bodyy\""));
    }

    #[test]
    fn redacts_only_what_it_names_with_the_sha256() {
        let mut m = crate::model::envelope::sample();
        m.body = b"secret".to_vec();
        m.header = HeaderMap::from([
            ("Authorization".to_string(), vec!["Bearer t".to_string()]),
            ("X-Keep".to_string(), vec!["plain".to_string()]),
        ]);
        assert!(matches!(
            Redact::envelope(&m),
            std::borrow::Cow::Borrowed(_)
        ));
        m.redact = Some(Redact::parse("body, header[authorization]").unwrap());
        let shown = Redact::envelope(&m);
        // sha256("secret")
        assert_eq!(
            String::from_utf8(shown.body.clone()).unwrap(),
            "REDACTED:2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
        );
        assert_eq!(
            shown.header["Authorization"],
            [redacted(b"Bearer t")],
            "the named header"
        );
        assert_eq!(shown.header["X-Keep"], ["plain"]);
        // The message itself keeps its values for the delivery.
        assert_eq!(m.body, b"secret");
        let all = Redact::parse("headers").unwrap();
        assert_eq!(all.header_map(&m.header)["X-Keep"], [redacted(b"plain")]);
    }
}
