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
//!
//! The TS SDK's deprecated synchronous chat API (`client.chat().create(…)` with the `upstash()`
//! provider: `POST /llm/v1/chat/completions`) is proxied to the same endpoint: the request body
//! without the SDK's own fields, the configured token, and the answer passed back as it streams
//! (JSON, or server-sent events with `stream: true`), status and rate-limit headers included. It
//! is the one synchronous call of the API; it touches no topic.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION as AUTHORIZATION_HEADER, CONTENT_TYPE};
use axum::response::Response;
use axum::routing::post;
use axum::Router;

use super::error::{ApiError, ErrorBody};
use super::limits::read_body;
use super::AppState;
use crate::config::LlmConfig;
use crate::model::destination::Destination;
use crate::model::headers::PublishOptions;

/// The one built-in destination kstash knows.
pub const LLM_API: &str = "api/llm";
/// Path of the chat-completions call under an OpenAI-compatible base URL.
pub const CHAT_COMPLETIONS_PATH: &str = "/v1/chat/completions";
/// Header carrying the configured token.
const AUTHORIZATION: &str = "Authorization";
/// Fields the TS SDK puts into the chat request for itself; an OpenAI-compatible endpoint may
/// refuse them, so the proxy takes them out.
const SDK_ONLY_FIELDS: [&str; 3] = ["provider", "system", "analytics"];
/// Answer headers passed back: the body's type and the upstream's rate limits, which the TS SDK
/// reads on a 429 (`x-ratelimit-*`).
const PASSED_BACK_PREFIX: &str = "x-ratelimit-";
/// Longest a chat call may take upstream (a completion can take minutes).
const CHAT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);
/// Connect timeout to the upstream.
const CHAT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub fn router() -> Router<AppState> {
    // The TS SDK's `client.chat()`.
    Router::new().route("/llm/v1/chat/completions", post(chat))
}

/// Where `api/llm` goes, from `[llm]`.
#[derive(Debug, Clone, Default)]
pub struct Llm {
    /// `<base_url>/v1/chat/completions`; `None` when no base URL is configured.
    url: Option<String>,
    /// `Bearer <token>`; `None` without a token.
    authorization: Option<String>,
    /// The chat proxy's client (no proxy from the environment, no redirects).
    client: reqwest::Client,
}

impl Llm {
    pub fn new(config: &LlmConfig) -> Self {
        let base = config.base_url.trim().trim_end_matches('/');
        let base = base.strip_suffix(CHAT_COMPLETIONS_PATH).unwrap_or(base);
        Llm {
            url: (!base.is_empty()).then(|| format!("{base}{CHAT_COMPLETIONS_PATH}")),
            authorization: (!config.token.is_empty()).then(|| format!("Bearer {}", config.token)),
            client: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(CHAT_CONNECT_TIMEOUT)
                .timeout(CHAT_TIMEOUT)
                .build()
                .unwrap_or_default(),
        }
    }

    fn not_configured(what: &str) -> ApiError {
        ApiError::BadRequest(format!(
            "{what} needs an OpenAI-compatible endpoint: set llm.base_url (KSTASH_LLM_BASE_URL) on this kstash, or use an SDK provider (openai, anthropic, custom)"
        ))
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
        let url = self
            .url
            .clone()
            .ok_or_else(|| Self::not_configured(&format!("destination {LLM_API}")))?;
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

/// The TS SDK's deprecated synchronous chat call, proxied to `llm.base_url`.
#[utoipa::path(post, path = "/llm/v1/chat/completions", operation_id = "chatCompletions", tag = "llm",
    request_body(content = Object, content_type = "application/json",
        description = "An OpenAI chat-completion request (the TS SDK's `provider`, `system` and `analytics` fields are removed)"),
    responses(
        (status = 200, description = "The endpoint's answer as it streams: a chat completion, or server-sent events with `stream: true`; other statuses are the endpoint's own", body = Object),
        (status = 400, description = "No `llm.base_url` configured, or the body is not a JSON object", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 502, description = "The endpoint did not answer", body = ErrorBody),
    ))]
pub async fn chat(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let llm = &state.llm;
    let url = llm
        .url
        .as_deref()
        .ok_or_else(|| Llm::not_configured("the chat proxy"))?;
    let body = read_body(request.into_body(), state.body_limit).await?;
    let mut chat: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("a chat request is a JSON object: {e}")))?;
    for field in SDK_ONLY_FIELDS {
        chat.remove(field);
    }
    let mut upstream = llm
        .client
        .post(url)
        .header(CONTENT_TYPE, "application/json")
        .body(serde_json::Value::Object(chat).to_string());
    if let Some(authorization) = &llm.authorization {
        upstream = upstream.header(AUTHORIZATION_HEADER, authorization);
    }
    let answer = upstream
        .send()
        .await
        .map_err(|e| ApiError::BadGateway(format!("the LLM endpoint did not answer: {e}")))?;
    let mut response = Response::builder().status(answer.status().as_u16());
    for (name, value) in answer.headers() {
        if name == CONTENT_TYPE || name.as_str().starts_with(PASSED_BACK_PREFIX) {
            response = response.header(name.as_str(), value.as_bytes());
        }
    }
    response
        .body(Body::from_stream(answer.bytes_stream()))
        .map_err(|e| ApiError::BadGateway(format!("the LLM endpoint's answer: {e}")))
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
