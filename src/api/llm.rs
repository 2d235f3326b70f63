//! The deprecated `api/llm` destination: the TS SDK's `api: {name: "llm"}` without a provider
//! publishes to `/v2/publish/api/llm`, which the hosted service routed to its own model.
//!
//! Design choice: a self-hosted kstash routes it to an OpenAI-compatible endpoint the operator
//! configures (`[llm]`), as a plain message to `<base_url>/v1/chat/completions`: from here on it is
//! delivered, retried and called back like any other message (the answer reaches the publisher in
//! the callback, as with the hosted service). The configured token is added as `Authorization` and
//! shown redacted by the API. Without a base URL the publish is refused with a 400 that says what
//! to configure; any other `api/…` name is refused too. The SDKs' provider destinations (`openai`,
//! `anthropic`, `custom`) are ordinary URLs and never come here.

use super::error::ApiError;
use crate::config::LlmConfig;
use crate::model::destination::Destination;
use crate::model::headers::PublishOptions;

/// The one built-in destination kstash knows.
pub const LLM_API: &str = "api/llm";
/// Path of the chat-completions call under an OpenAI-compatible base URL.
pub const CHAT_COMPLETIONS_PATH: &str = "/v1/chat/completions";
/// Header carrying the configured token.
const AUTHORIZATION: &str = "Authorization";

/// Where `api/llm` goes, from `[llm]`.
#[derive(Debug, Clone, Default)]
pub struct Llm {
    /// `<base_url>/v1/chat/completions`; `None` when no base URL is configured.
    url: Option<String>,
    /// `Bearer <token>`; `None` without a token.
    authorization: Option<String>,
}

impl Llm {
    pub fn new(config: &LlmConfig) -> Self {
        let base = config.base_url.trim().trim_end_matches('/');
        let base = base.strip_suffix(CHAT_COMPLETIONS_PATH).unwrap_or(base);
        Llm {
            url: (!base.is_empty()).then(|| format!("{base}{CHAT_COMPLETIONS_PATH}")),
            authorization: (!config.token.is_empty()).then(|| format!("Bearer {}", config.token)),
        }
    }

    /// `destination` with `api/llm` replaced by the configured URL (and its token added to
    /// `options`); every other destination as it is.
    pub fn resolve(
        &self,
        destination: Destination,
        options: &mut PublishOptions,
    ) -> Result<Destination, ApiError> {
        let Destination::Api(name) = destination else {
            return Ok(destination);
        };
        if name != LLM_API {
            return Err(unknown_api(&name));
        }
        let url = self.url.clone().ok_or_else(|| {
            ApiError::BadRequest(format!(
                "destination {LLM_API} needs an OpenAI-compatible endpoint: set llm.base_url (KSTASH_LLM_BASE_URL) on this kstash, or publish with an SDK provider (openai, anthropic, custom)"
            ))
        })?;
        if let Some(authorization) = &self.authorization {
            let forwarded = options
                .forward
                .keys()
                .any(|k| k.eq_ignore_ascii_case(AUTHORIZATION));
            if !forwarded {
                options
                    .forward
                    .insert(AUTHORIZATION.to_string(), vec![authorization.clone()]);
                options.redact = Some(
                    options
                        .redact
                        .take()
                        .unwrap_or_default()
                        .with_header(AUTHORIZATION),
                );
            }
        }
        Ok(Destination::Url(url))
    }
}

/// The 400 for an `api/…` destination kstash does not have.
pub fn unknown_api(name: &str) -> ApiError {
    ApiError::BadRequest(format!(
        "destination {name:?} is not supported: the only built-in destination is {LLM_API}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::headers::{parse_publish, Limits};

    fn options(pairs: &[(&str, &str)]) -> PublishOptions {
        let mut h = axum::http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let limits = Limits {
            max_delay: std::time::Duration::from_secs(60),
            default_retries: 3,
            max_retries: 5,
            flow: crate::model::flow::FlowLimits {
                max_parallelism: 10,
                max_rate: 10,
                max_period: std::time::Duration::from_secs(60),
            },
        };
        parse_publish(&h, &limits, 0).unwrap()
    }

    fn config(base_url: &str, token: &str) -> LlmConfig {
        LlmConfig {
            base_url: base_url.into(),
            token: token.into(),
        }
    }

    #[test]
    fn api_llm_goes_to_the_configured_endpoint_with_its_token_redacted() {
        let llm = Llm::new(&config("http://llm.internal:8000/", "secret"));
        let mut o = options(&[]);
        let d = llm
            .resolve(Destination::Api(LLM_API.into()), &mut o)
            .unwrap();
        assert_eq!(
            d,
            Destination::Url("http://llm.internal:8000/v1/chat/completions".into())
        );
        assert_eq!(o.forward["Authorization"], ["Bearer secret"]);
        assert_eq!(o.redact.unwrap().headers, ["authorization"]);

        // The publisher's own Authorization wins; a base URL given with the path is not doubled.
        let llm = Llm::new(&config("https://x.example/v1/chat/completions", "secret"));
        let mut o = options(&[("Upstash-Forward-Authorization", "Bearer mine")]);
        let d = llm
            .resolve(Destination::Api(LLM_API.into()), &mut o)
            .unwrap();
        assert_eq!(
            d,
            Destination::Url("https://x.example/v1/chat/completions".into())
        );
        assert_eq!(o.forward["Authorization"], ["Bearer mine"]);
        assert!(o.redact.is_none());
    }

    #[test]
    fn without_a_base_url_or_for_other_apis_the_publish_is_refused() {
        let mut o = options(&[]);
        let e = Llm::new(&config("", ""))
            .resolve(Destination::Api(LLM_API.into()), &mut o)
            .unwrap_err();
        assert!(e.to_string().contains("llm.base_url"), "{e}");
        let e = Llm::new(&config("http://x", ""))
            .resolve(Destination::Api("api/email".into()), &mut o)
            .unwrap_err();
        assert!(e.to_string().contains("api/email"), "{e}");
        let url = Destination::Url("https://a.example".into());
        assert_eq!(Llm::default().resolve(url.clone(), &mut o).unwrap(), url);
    }
}
