//! One delivery attempt over HTTP, in two explicit steps: [`HttpDelivery::prepare`] turns an
//! envelope into a signed request (or refuses it), [`HttpDelivery::call`] sends it and reduces
//! whatever happens to an [`Outcome`]. Neither step touches Kafka; `outcome.rs` does.
//!
//! Redirects are not followed: a 3xx is a failed attempt like any other non-2xx status (QStash
//! documents no redirect handling, and following them would let a destination steer deliveries
//! past the address guard). Proxies come only from `delivery.proxy`, never from the environment
//! (`HTTP(S)_PROXY`, `ALL_PROXY`): a proxy resolves and connects on its own, so through one the
//! destination is checked by [`check_host`] before each attempt. Forwarded headers that would
//! change where or how the request goes (`Host`, hop-by-hop and framing headers) are not sent.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, Request, Url};

use super::guard::{check_host, DestinationPolicy, GuardedResolver};
use crate::model::destination::validate_url;
use crate::model::envelope::{Envelope, HeaderMap as JsonHeaderMap};
use crate::signing::Signer;

/// Response bytes kept for events, callbacks and the DLQ; the rest is discarded.
pub const RESPONSE_BODY_LIMIT: usize = 64 * 1024;
/// Connect timeout of deliveries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Forwarded headers never sent: `Host` would send the request to another virtual host than the
/// checked destination (`Upstash-Forward-Host`); the others are per-connection or framing headers
/// that the client sets itself.
const NOT_FORWARDED: [&str; 11] = [
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// What a destination answered (body truncated to [`RESPONSE_BODY_LIMIT`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub header: JsonHeaderMap,
    pub body: Vec<u8>,
}

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx.
    Delivered(Response),
    /// Any other status.
    Failed(Response),
    /// No response: refused destination, connection error, timeout.
    Error(String),
}

/// Builds, signs and sends deliveries.
#[derive(Debug, Clone)]
pub struct HttpDelivery {
    client: reqwest::Client,
    policy: Arc<DestinationPolicy>,
    signer: Signer,
    timeouts: Timeouts,
    /// Whether deliveries go through the configured proxy.
    proxied: bool,
}

/// Per-attempt timeouts: `default` without `Upstash-Timeout`; `max` caps any `Upstash-Timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub default: Duration,
    pub max: Duration,
}

impl HttpDelivery {
    /// The delivery client; `proxy` (an `http://` or `https://` URL) is the only proxy it uses.
    pub fn new(
        signer: Signer,
        policy: DestinationPolicy,
        user_agent: &str,
        timeouts: Timeouts,
        proxy: Option<&Url>,
    ) -> Result<Self, reqwest::Error> {
        let policy = Arc::new(policy);
        let trusted = proxy.and_then(|p| p.host_str()).map(str::to_string);
        let mut builder = reqwest::Client::builder()
            .user_agent(user_agent)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .dns_resolver(Arc::new(GuardedResolver::new(policy.clone(), trusted)))
            .no_proxy();
        if let Some(proxy) = proxy {
            builder = builder.proxy(reqwest::Proxy::all(proxy.clone())?);
        }
        Ok(HttpDelivery {
            client: builder.build()?,
            policy,
            signer,
            timeouts,
            proxied: proxy.is_some(),
        })
    }

    /// A signed request for the next attempt of `envelope`, or why it cannot be sent.
    pub fn prepare(&self, envelope: &Envelope) -> Result<Request, String> {
        let url = validate_url(&envelope.url).map_err(|e| e.to_string())?;
        self.check_ip_literal(&url)?;
        let method = Method::from_bytes(envelope.method.as_bytes())
            .map_err(|_| format!("invalid method {:?}", envelope.method))?;
        let mut headers = HeaderMap::new();
        for (name, values) in &envelope.header {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("invalid header name {name:?}"))?;
            if NOT_FORWARDED.contains(&name.as_str()) {
                tracing::debug!(message_id = %envelope.message_id, header = %name, "forwarded header not sent");
                continue;
            }
            for v in values {
                let value = HeaderValue::from_str(v)
                    .map_err(|_| format!("invalid value for header {name}"))?;
                headers.append(name.clone(), value);
            }
        }
        let now_secs = crate::model::now_ms() / 1000;
        let signature = self.signer.sign(&envelope.url, &envelope.body, now_secs);
        let mut set = |name: &'static str, value: &str| -> Result<(), String> {
            let value =
                HeaderValue::from_str(value).map_err(|_| format!("invalid value for {name}"))?;
            headers.insert(name, value);
            Ok(())
        };
        set("upstash-message-id", &envelope.message_id)?;
        set("upstash-retried", &envelope.retried.to_string())?;
        set("upstash-signature", &signature)?;
        if let Some(ip) = &envelope.caller_ip {
            set("upstash-caller-ip", ip)?;
        }
        if let Some(group) = &envelope.topic_name {
            set("upstash-topic-name", group)?;
        }
        if let Some(schedule) = &envelope.schedule_id {
            set("upstash-schedule-id", schedule)?;
        }
        let timeout = envelope
            .timeout_ms
            .map(Duration::from_millis)
            .map_or(self.timeouts.default, |t| t.min(self.timeouts.max));
        let mut request = Request::new(method, url);
        *request.headers_mut() = headers;
        *request.body_mut() = Some(envelope.body.clone().into());
        *request.timeout_mut() = Some(timeout);
        Ok(request)
    }

    /// IP-literal hosts do not go through the resolver, so check them here.
    fn check_ip_literal(&self, url: &Url) -> Result<(), String> {
        let ip = match url.host() {
            Some(url::Host::Ipv4(v4)) => std::net::IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => std::net::IpAddr::V6(v6),
            _ => return Ok(()),
        };
        if self.policy.permits(ip) {
            Ok(())
        } else {
            Err(format!(
                "destination address {ip} is not allowed (loopback/private/link-local); allow it with delivery.allowed_networks"
            ))
        }
    }

    /// Sends the request; never fails, every failure is an [`Outcome`].
    pub async fn call(&self, request: Request) -> Outcome {
        if self.proxied {
            // IP literals were checked by `prepare`; names are resolved by the proxy, so check
            // what they resolve to here.
            if let Some(url::Host::Domain(host)) = request.url().host() {
                if let Err(refused) = check_host(&self.policy, host).await {
                    return Outcome::Error(refused);
                }
            }
        }
        let timeout = request.timeout().copied();
        let mut response = match self.client.execute(request).await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Outcome::Error(format!(
                    "timed out after {:?}",
                    timeout.unwrap_or(self.timeouts.default)
                ))
            }
            // Without the URL: it may carry credentials, and the error text is logged and kept.
            Err(e) => return Outcome::Error(error_chain(&e.without_url())),
        };
        let status = response.status().as_u16();
        let mut header = JsonHeaderMap::new();
        for (name, value) in response.headers() {
            header
                .entry(name.as_str().to_string())
                .or_default()
                .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
        }
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = RESPONSE_BODY_LIMIT - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if body.len() >= RESPONSE_BODY_LIMIT {
                        break;
                    }
                }
                Ok(None) => break,
                // The status already arrived; a broken body does not change the verdict.
                Err(e) => {
                    tracing::debug!(error = %e, "response body read failed");
                    break;
                }
            }
        }
        let response = Response {
            status,
            header,
            body,
        };
        if (200..300).contains(&status) {
            Outcome::Delivered(response)
        } else {
            Outcome::Failed(response)
        }
    }
}

/// An error with its causes, e.g. "error sending request: … : destination x resolves only to …".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::envelope::sample;

    fn delivery(allowed: Vec<ipnet::IpNet>) -> HttpDelivery {
        HttpDelivery::new(
            Signer::new("sig_current_aaaaaaaaaaaaaaaaaaaaaaaa", "sig_next"),
            DestinationPolicy::new(allowed),
            "Upstash-QStash",
            Timeouts {
                default: Duration::from_secs(30),
                max: Duration::from_secs(60),
            },
            None,
        )
        .unwrap()
    }

    #[test]
    fn headers_that_change_where_or_how_the_request_goes_are_not_sent() {
        let mut e = sample();
        for (name, value) in [
            ("Host", "internal.example"),
            ("Connection", "close"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "1"),
            ("Proxy-Authorization", "Basic eA=="),
            ("X-Kept", "yes"),
        ] {
            e.header.insert(name.into(), vec![value.into()]);
        }
        let req = delivery(vec![]).prepare(&e).unwrap();
        let h = req.headers();
        for gone in [
            "host",
            "connection",
            "transfer-encoding",
            "content-length",
            "proxy-authorization",
        ] {
            assert!(!h.contains_key(gone), "{gone} must not be sent");
        }
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn prepare_builds_the_signed_request() {
        let mut e = sample();
        e.header
            .insert("Upstash-Message-Id".into(), vec!["spoofed".into()]);
        let req = delivery(vec![]).prepare(&e).unwrap();
        assert_eq!(req.method(), Method::PUT);
        assert_eq!(req.url().as_str(), "https://example.com/a?b=c");
        let h = req.headers();
        assert_eq!(h["content-type"], "text/plain");
        assert_eq!(h["upstash-message-id"], "msg_1", "kstash's own headers win");
        assert_eq!(h["upstash-retried"], "0");
        assert!(h.contains_key("upstash-signature"));
        assert_eq!(h["upstash-caller-ip"], "127.0.0.1");
        assert_eq!(h["upstash-topic-name"], "group");
        assert_eq!(h["upstash-schedule-id"], "scd_1");
        assert_eq!(
            req.timeout(),
            Some(&Duration::from_secs(1)),
            "Upstash-Timeout shortens"
        );
        assert_eq!(req.body().unwrap().as_bytes().unwrap(), e.body.as_slice());
    }

    #[test]
    fn timeouts_default_and_cap() {
        let d = delivery(vec![]);
        let mut e = sample();
        e.timeout_ms = None;
        assert_eq!(
            d.prepare(&e).unwrap().timeout(),
            Some(&Duration::from_secs(30)),
            "default"
        );
        e.timeout_ms = Some(45_000);
        assert_eq!(
            d.prepare(&e).unwrap().timeout(),
            Some(&Duration::from_secs(45)),
            "above the default, within the max"
        );
        e.timeout_ms = Some(3_600_000);
        assert_eq!(
            d.prepare(&e).unwrap().timeout(),
            Some(&Duration::from_secs(60)),
            "capped at the max"
        );
    }

    #[test]
    fn prepare_refuses_internal_ip_literals_unless_allowed() {
        let mut e = sample();
        e.url = "http://169.254.169.254/latest/meta-data".into();
        let err = delivery(vec![]).prepare(&e).unwrap_err();
        assert!(err.contains("not allowed"), "{err}");
        e.url = "http://127.0.0.1:9/x".into();
        assert!(delivery(vec![]).prepare(&e).is_err());
        assert!(delivery(vec!["127.0.0.0/8".parse().unwrap()])
            .prepare(&e)
            .is_ok());
    }
}
