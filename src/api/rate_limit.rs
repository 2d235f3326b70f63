//! The per-token limit on management calls, as the hosted service has it: every `/v2` call except
//! publish, enqueue and batch counts against its token's budget; over it, 429 with
//! `Burst-RateLimit-Limit`, `-Remaining` and `-Reset` (unix seconds), which both SDKs turn into
//! their rate-limit error. Off unless `rate_limit.management_per_second` is set.
//!
//! Design choice: a `governor` GCRA limiter keyed by token (the one crate the delivery stage's
//! flow control already uses), with its state-information middleware so the answer can say how
//! much of the burst is left. The token is the one authentication accepted (`auth::Caller`), so
//! the limiter runs inside authentication and an unauthenticated flood never creates keys. Counts
//! are per process.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::{Quota, RateLimiter};

use super::auth::Caller;
use super::error::ApiError;
use crate::config::RateLimitConfig;

/// Calls the hosted service leaves unlimited: they are the product, not management.
const UNLIMITED_PREFIXES: [&str; 3] = ["/v2/publish", "/v2/enqueue", "/v2/batch"];
const LIMIT_HEADER: &str = "burst-ratelimit-limit";
const REMAINING_HEADER: &str = "burst-ratelimit-remaining";
const RESET_HEADER: &str = "burst-ratelimit-reset";

type Keyed = RateLimiter<
    String,
    governor::state::keyed::DefaultKeyedStateStore<String>,
    DefaultClock,
    StateInformationMiddleware,
>;

/// The limiter; `None` inside when the limit is off.
#[derive(Clone, Default)]
pub struct ManagementLimit(Option<Arc<(Keyed, u32)>>);

/// What a 429 says about the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Burst {
    pub limit: u32,
    pub remaining: u32,
    /// When the budget allows a call again (unix seconds, rounded up).
    pub reset_secs: u64,
}

impl Burst {
    pub fn add_headers(&self, headers: &mut HeaderMap) {
        for (name, value) in [
            (LIMIT_HEADER, u64::from(self.limit)),
            (REMAINING_HEADER, u64::from(self.remaining)),
            (RESET_HEADER, self.reset_secs),
        ] {
            headers.insert(name, HeaderValue::from(value));
        }
    }
}

impl ManagementLimit {
    pub fn new(config: &RateLimitConfig) -> Self {
        let Some(per_second) = NonZeroU32::new(config.management_per_second) else {
            return ManagementLimit(None);
        };
        let burst = NonZeroU32::new(config.burst).unwrap_or(per_second);
        let limiter = RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))
            .with_middleware::<StateInformationMiddleware>();
        ManagementLimit(Some(Arc::new((limiter, per_second.get()))))
    }

    /// `Err` with the budget when `token` is over its limit.
    pub fn check(&self, token: &str) -> Result<(), Burst> {
        let Some(inner) = &self.0 else {
            return Ok(());
        };
        let (limiter, limit) = &**inner;
        match limiter.check_key(&token.to_string()) {
            Ok(_) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let reset = SystemTime::now() + wait + Duration::from_millis(999);
                Err(Burst {
                    limit: *limit,
                    remaining: 0,
                    reset_secs: reset
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs(),
                })
            }
        }
    }
}

/// Whether a call to `path` counts against the management limit.
pub fn is_management(path: &str) -> bool {
    !UNLIMITED_PREFIXES.iter().any(|p| path.starts_with(p))
}

/// Middleware (inside authentication): 429 when the caller's token is over its budget.
pub async fn enforce(
    State(limit): State<ManagementLimit>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if is_management(request.uri().path()) {
        if let Some(caller) = request.extensions().get::<Caller>() {
            limit.check(&caller.0).map_err(ApiError::RateLimited)?;
        }
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_management_calls_count() {
        for path in [
            "/v2/publish/https://x",
            "/v2/enqueue/q/https://x",
            "/v2/batch",
        ] {
            assert!(!is_management(path), "{path}");
        }
        for path in [
            "/v2/messages/m",
            "/v2/queues",
            "/v2/keys",
            "/v2/dlq",
            "/v2/events",
        ] {
            assert!(is_management(path), "{path}");
        }
    }

    #[test]
    fn each_token_has_its_own_budget_and_off_means_off() {
        let limit = ManagementLimit::new(&RateLimitConfig {
            management_per_second: 2,
            burst: 0,
        });
        assert!(limit.check("a").is_ok());
        assert!(limit.check("a").is_ok());
        let over = limit.check("a").unwrap_err();
        assert_eq!((over.limit, over.remaining), (2, 0));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!((now..=now + 2).contains(&over.reset_secs), "{over:?}");
        assert!(limit.check("b").is_ok(), "another token is not affected");

        let off = ManagementLimit::new(&RateLimitConfig {
            management_per_second: 0,
            burst: 5,
        });
        assert!((0..100).all(|_| off.check("a").is_ok()));
    }
}
