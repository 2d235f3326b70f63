//! Layered configuration: embedded defaults → optional TOML file → `KSTASH_*` environment.
//!
//! The defaults live in `config/default.toml`, embedded with `include_str!`, so the file that
//! documents every key is also the one that sets its default: they cannot drift apart. Environment
//! variables are named `KSTASH_<SECTION>_<KEY>`; the first `_` after the prefix separates the
//! section from the key, so keys may contain underscores (`KSTASH_SERVER_BODY_LIMIT`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// The documented defaults, embedded in the binary.
pub const DEFAULTS_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables read by [`Config::load`].
pub const ENV_PREFIX: &str = "KSTASH_";

/// The QStash dev-server token (base64 of `{"UserID":"defaultUser","Password":"defaultPassword"}`),
/// used by `kstash dev` so that SDKs in dev mode work unchanged.
pub const DEV_TOKEN: &str =
    "eyJVc2VySUQiOiJkZWZhdWx0VXNlciIsIlBhc3N3b3JkIjoiZGVmYXVsdFBhc3N3b3JkIn0=";
/// The QStash dev-server current signing key.
pub const DEV_CURRENT_SIGNING_KEY: &str = "sig_7kYjw48mhY7kAjqNGcy6cr29RJ6r";
/// The QStash dev-server next signing key.
pub const DEV_NEXT_SIGNING_KEY: &str = "sig_5ZB6DVzB1wjE8S6rZ7eenA8Pdnhs";

/// Errors while loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub signing: SigningConfig,
    pub kafka: KafkaConfig,
    /// Per topic (`[topics.<name>]`): partitions and topic configs; the names are the catalog's
    /// (`topics::config_keys`).
    pub topics: BTreeMap<String, TopicConfig>,
    pub delivery: DeliveryConfig,
    pub delay: DelayConfig,
    pub queues: QueuesConfig,
    pub flow_control: FlowControlConfig,
    pub state: StateConfig,
    pub llm: LlmConfig,
    pub rate_limit: RateLimitConfig,
    pub dev: DevConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub body_limit: usize,
    pub batch_limit: usize,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    pub max_concurrent_requests: usize,
    pub max_uri_bytes: usize,
    pub max_header_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub tokens: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    pub current_key: String,
    pub next_key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic_prefix: String,
    pub client_id: String,
    pub group_id: String,
    pub delay_group_id: String,
    pub create_topics: bool,
    pub replication_factor: i32,
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    #[serde(with = "humantime_serde")]
    pub produce_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
    pub scheduler_group_id: String,
    pub commit_metadata_max_bytes: usize,
    #[serde(default)]
    pub librdkafka: BTreeMap<String, String>,
    /// Largest record kstash writes (bytes): not a setting but derived from `server.body_limit`
    /// ([`Config::record_limit`]) by `server::start`, so the clients' limits fit the records.
    /// 0: librdkafka's defaults.
    #[serde(skip)]
    pub max_record_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub partitions: i32,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    pub max_in_flight: usize,
    pub max_in_flight_per_host: usize,
    pub breaker_failures: u32,
    #[serde(with = "humantime_serde")]
    pub breaker_open: Duration,
    pub lane_buffer: usize,
    pub max_buffered: usize,
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    pub default_retries: u32,
    pub max_retries: u32,
    pub user_agent: String,
    pub allowed_networks: Vec<IpNet>,
    /// `http://` or `https://` proxy URL for deliveries; empty for none.
    pub proxy: String,
}

impl DeliveryConfig {
    /// The configured delivery proxy (validated by [`Config::validate`]).
    pub fn proxy_url(&self) -> Result<Option<url::Url>, String> {
        if self.proxy.is_empty() {
            return Ok(None);
        }
        let url = url::Url::parse(&self.proxy)
            .map_err(|e| format!("delivery.proxy is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err("delivery.proxy must be an http:// or https:// URL with a host".into());
        }
        Ok(Some(url))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelayConfig {
    #[serde(deserialize_with = "durations")]
    pub buckets: Vec<Duration>,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    pub max_in_flight: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuesConfig {
    pub max_parallelism: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowControlConfig {
    pub max_parallelism: u32,
    pub max_rate: u32,
    #[serde(with = "humantime_serde")]
    pub max_period: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    pub dir: String,
    #[serde(with = "humantime_serde")]
    pub events_retention: Duration,
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    pub cache_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub long_delay_after: Duration,
}

/// `[llm]`: where the deprecated `api/llm` destination goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// OpenAI-compatible base URL; empty: `api/llm` is refused.
    pub base_url: String,
    /// Bearer token for it; empty: none.
    pub token: String,
}

/// `[rate_limit]`: the per-token limit on management calls.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Calls per token per second; 0: off.
    pub management_per_second: u32,
    /// Bucket size; 0: `management_per_second`.
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevConfig {
    pub partitions: i32,
    #[serde(with = "humantime_serde")]
    pub watchdog_interval: Duration,
}

/// Which way the process runs; `Dev` swaps in the dev credentials and loopback allowances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Dev,
}

impl Config {
    /// Loads defaults, then `file` (if any), then the `KSTASH_*` environment.
    pub fn load(mode: Mode, file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULTS_TOML));
        if mode == Mode::Dev {
            figment = figment.merge(Toml::string(&dev_overrides()));
        }
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(env_provider());
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate(mode)?;
        Ok(config)
    }

    /// Loads only the embedded defaults (plus dev overrides in dev mode); used by tests.
    pub fn defaults(mode: Mode) -> Self {
        let mut figment = Figment::from(Toml::string(DEFAULTS_TOML));
        if mode == Mode::Dev {
            figment = figment.merge(Toml::string(&dev_overrides()));
        }
        figment
            .extract()
            .expect("embedded default configuration is valid")
    }

    /// Checks what serde cannot: required secrets, sane numbers, a valid delay ladder, a
    /// configuration for every topic. Every problem is refused here, at start-up, with the key to
    /// fix, rather than surfacing later as a panic, a hang or a silent misbehaviour.
    pub fn validate(&self, mode: Mode) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.auth.tokens.iter().all(|t| t.trim().is_empty()) {
            return invalid(
                "auth.tokens is empty: set at least one token (KSTASH_AUTH_TOKENS)".into(),
            );
        }
        if self.auth.tokens.iter().any(|t| t.trim().is_empty()) {
            return invalid(
                "auth.tokens has an empty token: an empty token would let any request with 'Authorization: Bearer ' in; remove it".into(),
            );
        }
        for (name, key) in [
            ("signing.current_key", &self.signing.current_key),
            ("signing.next_key", &self.signing.next_key),
        ] {
            if key.is_empty() {
                return invalid(format!(
                    "{name} is empty (KSTASH_SIGNING_{})",
                    name[8..].to_uppercase()
                ));
            }
            if mode == Mode::Serve && key.len() < MIN_SIGNING_KEY_LEN {
                return invalid(format!(
                    "{name} is shorter than {MIN_SIGNING_KEY_LEN} characters; use e.g. sig_ + 28 random characters"
                ));
            }
        }
        crate::delay::ladder::Ladder::new(&self.delay.buckets).map_err(ConfigError::Invalid)?;
        if !self.llm.base_url.is_empty() {
            crate::model::destination::validate_url(&self.llm.base_url).map_err(|e| {
                ConfigError::Invalid(format!("llm.base_url (KSTASH_LLM_BASE_URL): {e}"))
            })?;
        }
        self.validate_topics()?;
        self.validate_record_limit()?;
        let positive_counts = [
            ("server.body_limit", self.server.body_limit),
            ("server.batch_limit", self.server.batch_limit),
            (
                "server.max_concurrent_requests",
                self.server.max_concurrent_requests,
            ),
            ("server.max_uri_bytes", self.server.max_uri_bytes),
            ("server.max_header_bytes", self.server.max_header_bytes),
            (
                "kafka.commit_metadata_max_bytes",
                self.kafka.commit_metadata_max_bytes,
            ),
            ("delivery.max_in_flight", self.delivery.max_in_flight),
            (
                "delivery.max_in_flight_per_host",
                self.delivery.max_in_flight_per_host,
            ),
            ("delivery.lane_buffer", self.delivery.lane_buffer),
            ("delivery.max_buffered", self.delivery.max_buffered),
            ("delay.max_in_flight", self.delay.max_in_flight),
            ("state.cache_bytes", self.state.cache_bytes),
            (
                "queues.max_parallelism",
                self.queues.max_parallelism as usize,
            ),
            (
                "flow_control.max_parallelism",
                self.flow_control.max_parallelism as usize,
            ),
            ("flow_control.max_rate", self.flow_control.max_rate as usize),
        ];
        for (name, value) in positive_counts {
            if value == 0 {
                return invalid(format!("{name} must be at least 1"));
            }
        }
        let positive_durations = [
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.body_read_timeout", self.server.body_read_timeout),
            ("kafka.session_timeout", self.kafka.session_timeout),
            ("kafka.produce_timeout", self.kafka.produce_timeout),
            ("kafka.transaction_timeout", self.kafka.transaction_timeout),
            ("delivery.commit_interval", self.delivery.commit_interval),
            ("delivery.timeout", self.delivery.timeout),
            ("delivery.max_timeout", self.delivery.max_timeout),
            ("delivery.breaker_open", self.delivery.breaker_open),
            ("delay.max_delay", self.delay.max_delay),
            ("flow_control.max_period", self.flow_control.max_period),
            ("state.events_retention", self.state.events_retention),
            ("state.prune_interval", self.state.prune_interval),
            ("state.dedup_window", self.state.dedup_window),
            ("state.long_delay_after", self.state.long_delay_after),
            ("dev.watchdog_interval", self.dev.watchdog_interval),
        ];
        for (name, value) in positive_durations {
            if value.is_zero() {
                return invalid(format!("{name} must be longer than zero"));
            }
        }
        if self.delivery.timeout > self.delivery.max_timeout {
            return invalid(format!(
                "delivery.timeout ({}) must not exceed delivery.max_timeout ({})",
                humantime::format_duration(self.delivery.timeout),
                humantime::format_duration(self.delivery.max_timeout)
            ));
        }
        if self.delivery.max_buffered < self.delivery.lane_buffer {
            return invalid(format!(
                "delivery.max_buffered ({}) must be at least delivery.lane_buffer ({})",
                self.delivery.max_buffered, self.delivery.lane_buffer
            ));
        }
        if self.kafka.commit_metadata_max_bytes > MAX_COMMIT_METADATA_BYTES {
            return invalid(format!(
                "kafka.commit_metadata_max_bytes must be at most {MAX_COMMIT_METADATA_BYTES} (Kafka's default offset.metadata.max.bytes is 4096)"
            ));
        }
        if self.delivery.default_retries > self.delivery.max_retries {
            return invalid("delivery.default_retries must not exceed delivery.max_retries".into());
        }
        let events_topic_ms = self
            .topic("events")
            .config
            .get("retention.ms")
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|ms| *ms >= 0)
            .map(|ms| Duration::from_millis(ms.unsigned_abs()));
        for (name, keeps) in [
            ("state.events_retention", Some(self.state.events_retention)),
            ("topics.events.config.\"retention.ms\"", events_topic_ms),
        ] {
            if keeps.is_some_and(|keeps| self.state.long_delay_after >= keeps) {
                return invalid(format!(
                    "state.long_delay_after must be shorter than {name}: a message waiting longer than the events are kept is found through state.pending only"
                ));
            }
        }
        if self.dev.partitions < 1 {
            return invalid("dev.partitions must be at least 1".into());
        }
        self.delivery.proxy_url().map_err(ConfigError::Invalid)?;
        let (schedules, fires) = (
            self.topic("schedules").partitions,
            self.topic("schedule_fires").partitions,
        );
        if schedules != fires {
            return invalid(format!(
                "topics.schedule_fires.partitions ({fires}) must equal topics.schedules.partitions ({schedules}): a schedule and its fires share a partition number"
            ));
        }
        Ok(())
    }

    /// Every topic of the catalog has a configuration with at least one partition, and no
    /// configuration names a topic kstash does not have (a typo would otherwise be ignored).
    fn validate_topics(&self) -> Result<(), ConfigError> {
        let known = crate::topics::config_keys();
        for key in self.topics.keys() {
            if !known.contains(&key.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "topics.{key} is not a kstash topic (known: {})",
                    known.join(", ")
                )));
            }
        }
        for key in known {
            match self.topics.get(key) {
                None => return Err(ConfigError::Invalid(format!("topics.{key} is missing"))),
                Some(t) if t.partitions < 1 => {
                    return Err(ConfigError::Invalid(format!(
                        "topics.{key}.partitions must be at least 1"
                    )))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The configuration of topic `key` (one of `topics::config_keys`, guaranteed by
    /// [`Config::validate`]).
    pub fn topic(&self, key: &str) -> &TopicConfig {
        self.topics
            .get(key)
            .unwrap_or_else(|| panic!("validated configuration has topics.{key}"))
    }

    /// The largest record kstash may write for a body of `server.body_limit` bytes: a callback
    /// message carries the body base64-encoded twice (in its payload's `sourceBody`, and the
    /// payload as the callback's own body), so 16/9 of it, plus [`RECORD_HEADROOM`] for
    /// headers, the attempt's response (at most 64 KiB) and the JSON around them. Every topic is
    /// created with `max.message.bytes` of at least this, and the producer's `message.max.bytes`
    /// is this.
    pub fn record_limit(&self) -> usize {
        self.server
            .body_limit
            .div_ceil(9)
            .saturating_mul(16)
            .saturating_add(RECORD_HEADROOM)
    }

    /// Topics whose configuration sets `max.message.bytes` below [`Config::record_limit`].
    fn validate_record_limit(&self) -> Result<(), ConfigError> {
        let needed = self.record_limit();
        for (key, topic) in &self.topics {
            if let Some(value) = topic.config.get(TOPIC_MAX_MESSAGE_BYTES) {
                let fits = value.trim().parse::<usize>().is_ok_and(|v| v >= needed);
                if !fits {
                    return Err(ConfigError::Invalid(format!(
                        "topics.{key}.config.\"{TOPIC_MAX_MESSAGE_BYTES}\" is {value}, but server.body_limit ({}) needs records of up to {needed} bytes (a callback carries the body base64-encoded twice): raise it, remove it (kstash then sets it), or lower server.body_limit",
                        self.server.body_limit
                    )));
                }
            }
        }
        Ok(())
    }

    /// Gives every topic `partitions` partitions (the embedded cluster, tests).
    pub fn set_partitions(&mut self, partitions: i32) {
        for topic in self.topics.values_mut() {
            topic.partitions = partitions;
        }
    }
}

/// Room in a record beyond the (twice-encoded) body: headers, a response of at most 64 KiB, JSON.
pub const RECORD_HEADROOM: usize = 1024 * 1024;

/// The topic configuration that bounds a record's size.
pub const TOPIC_MAX_MESSAGE_BYTES: &str = "max.message.bytes";

/// Upper bound of `kafka.commit_metadata_max_bytes`: Kafka refuses commits whose metadata exceeds
/// the broker's `offset.metadata.max.bytes` (default 4096).
pub const MAX_COMMIT_METADATA_BYTES: usize = 4096;

/// Signing keys shorter than this are refused in serve mode (PyJWT warns below 32 bytes).
pub const MIN_SIGNING_KEY_LEN: usize = 32;

/// Where `kstash dev` listens (the port the SDKs' dev mode expects).
pub const DEV_LISTEN: &str = "127.0.0.1:8080";
/// Consumer session timeout on the embedded cluster, which rebalances after `timeout − 1 s`.
pub const DEV_SESSION_TIMEOUT: &str = "2s";

/// Defaults that `kstash dev` changes: the well-known dev credentials.
fn dev_overrides() -> String {
    format!(
        "[server]\nlisten = \"{DEV_LISTEN}\"\n\
         [auth]\ntokens = [\"{DEV_TOKEN}\"]\n\
         [signing]\ncurrent_key = \"{DEV_CURRENT_SIGNING_KEY}\"\nnext_key = \"{DEV_NEXT_SIGNING_KEY}\"\n\
         [kafka]\nsession_timeout = \"{DEV_SESSION_TIMEOUT}\"\n\
         [delivery]\nallowed_networks = [\"127.0.0.0/8\", \"::1/128\"]\n"
    )
}

/// The configuration sections: the top-level tables of the embedded defaults, so a new section is
/// reachable from the environment as soon as it is documented there. Only `KSTASH_<SECTION>_*`
/// variables are configuration, so other `KSTASH_*` variables (`KSTASH_CONFIG`, the tests'
/// `KSTASH_TEST_BROKERS`) are left alone while a mistyped key inside a section is still refused.
fn sections() -> Vec<String> {
    DEFAULTS_TOML
        .lines()
        .filter_map(|line| line.trim().strip_prefix('['))
        .filter(|rest| !rest.starts_with('['))
        .filter_map(|rest| rest.split([']', '.']).next())
        .map(str::to_string)
        .collect()
}

/// `KSTASH_SECTION_KEY` → `section.key` for the known sections; other variables are skipped.
fn env_provider() -> Env {
    let filter_sections = sections();
    let map_sections = filter_sections.clone();
    Env::prefixed(ENV_PREFIX)
        .filter(move |key| env_key_to_path(key.as_str(), &filter_sections).is_some())
        .map(move |key| {
            env_key_to_path(key.as_str(), &map_sections)
                .unwrap_or_default()
                .into()
        })
}

/// The config path of an environment key (without the prefix): the section is the longest known
/// section name followed by `_` (sections may contain `_` themselves, e.g. `flow_control`); the
/// rest is the key, which may contain `_` too (`SERVER_BODY_LIMIT` → `server.body_limit`).
fn env_key_to_path(key: &str, sections: &[String]) -> Option<String> {
    let lower = key.to_ascii_lowercase();
    sections
        .iter()
        .filter_map(|s| {
            let rest = lower.strip_prefix(s.as_str())?.strip_prefix('_')?;
            (!rest.is_empty()).then(|| (s.len(), format!("{s}.{rest}")))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, path)| path)
}

fn durations<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| humantime::parse_duration(s).map_err(serde::de::Error::custom))
        .collect()
}

fn list_or_comma_separated<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        OneOrMany::Many(v) => v,
    })
}

#[cfg(test)]
// figment's `Jail` closures must return `figment::Error`, which is large; nothing to fix here.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn env_keys_map_to_section_and_key() {
        let sections = sections();
        let path = |k: &str| env_key_to_path(k, &sections);
        assert_eq!(path("KAFKA_BROKERS").as_deref(), Some("kafka.brokers"));
        assert_eq!(
            path("SERVER_BODY_LIMIT").as_deref(),
            Some("server.body_limit")
        );
        assert_eq!(
            path("SIGNING_CURRENT_KEY").as_deref(),
            Some("signing.current_key")
        );
        assert_eq!(
            path("FLOW_CONTROL_MAX_RATE").as_deref(),
            Some("flow_control.max_rate")
        );
        assert_eq!(path("TEST_BROKERS"), None, "not a section");
        assert_eq!(path("CONFIG"), None);
    }

    #[test]
    fn every_section_of_the_defaults_is_reachable_from_the_environment() {
        let sections = sections();
        for expected in [
            "server",
            "auth",
            "signing",
            "kafka",
            "topics",
            "delivery",
            "delay",
            "queues",
            "flow_control",
            "state",
            "dev",
        ] {
            assert!(
                sections.iter().any(|s| s == expected),
                "{expected}: {sections:?}"
            );
        }
        figment::Jail::expect_with(|jail| {
            jail.set_env("KSTASH_STATE_DEDUP_WINDOW", "3m");
            jail.set_env("KSTASH_DELAY_MAX_IN_FLIGHT", "7");
            jail.set_env("KSTASH_QUEUES_MAX_PARALLELISM", "9");
            jail.set_env("KSTASH_FLOW_CONTROL_MAX_RATE", "11");
            jail.set_env("KSTASH_TOPICS_READY", "{partitions=24}");
            let c = Config::load(Mode::Dev, None).expect("loads");
            assert_eq!(c.state.dedup_window, Duration::from_secs(180));
            assert_eq!(c.delay.max_in_flight, 7);
            assert_eq!(c.queues.max_parallelism, 9);
            assert_eq!(c.flow_control.max_rate, 11);
            assert_eq!(c.topic("ready").partitions, 24);
            assert!(
                c.topic("ready").config.contains_key("retention.ms"),
                "a table from the environment merges into the default"
            );
            Ok(())
        });
    }

    #[test]
    fn bad_values_are_refused_with_the_key_to_fix() {
        for (var, value, needle) in [
            ("KSTASH_DELAY_BUCKETS", "[\"5s\", \"1s\"]", "ascending"),
            ("KSTASH_DELAY_BUCKETS", "[]", "must not be empty"),
            (
                "KSTASH_TOPICS_READY",
                "{partitions=0}",
                "topics.ready.partitions",
            ),
            ("KSTASH_TOPICS_READDY", "{partitions=1}", "topics.readdy"),
            (
                "KSTASH_DELIVERY_COMMIT_INTERVAL",
                "0s",
                "delivery.commit_interval",
            ),
            ("KSTASH_STATE_PRUNE_INTERVAL", "0s", "state.prune_interval"),
            (
                "KSTASH_DELIVERY_MAX_IN_FLIGHT",
                "0",
                "delivery.max_in_flight",
            ),
            ("KSTASH_DELAY_MAX_IN_FLIGHT", "0", "delay.max_in_flight"),
            ("KSTASH_DELIVERY_LANE_BUFFER", "0", "delivery.lane_buffer"),
            ("KSTASH_DELIVERY_TIMEOUT", "1h", "delivery.max_timeout"),
            (
                "KSTASH_DEV_WATCHDOG_INTERVAL",
                "0s",
                "dev.watchdog_interval",
            ),
            (
                "KSTASH_KAFKA_SESSION_TIMEOUT",
                "0s",
                "kafka.session_timeout",
            ),
            (
                "KSTASH_KAFKA_COMMIT_METADATA_MAX_BYTES",
                "100000",
                "commit_metadata_max_bytes",
            ),
            (
                "KSTASH_QUEUES_MAX_PARALLELISM",
                "0",
                "queues.max_parallelism",
            ),
            ("KSTASH_AUTH_TOKENS", "[\"good\", \" \"]", "empty token"),
            ("KSTASH_DELIVERY_PROXY", "socks5://p:1080", "delivery.proxy"),
            ("KSTASH_DELIVERY_PROXY", "not a url", "delivery.proxy"),
        ] {
            figment::Jail::expect_with(|jail| {
                jail.set_env(var, value);
                let err = Config::load(Mode::Dev, None).expect_err(var);
                assert!(err.to_string().contains(needle), "{var}={value}: {err}");
                Ok(())
            });
        }
    }

    #[test]
    fn a_topic_limit_below_the_records_of_the_body_limit_is_refused() {
        let mut c = Config::defaults(Mode::Dev);
        c.server.body_limit = 4 * 1024 * 1024;
        assert!(
            c.record_limit() > 2 * c.server.body_limit,
            "a callback doubles the body"
        );
        c.validate(Mode::Dev).unwrap();
        let events = &mut c.topics.get_mut("events").unwrap().config;
        events.insert(TOPIC_MAX_MESSAGE_BYTES.into(), "1048588".into());
        let err = c.validate(Mode::Dev).unwrap_err().to_string();
        assert!(err.contains("topics.events.config"), "names the key: {err}");
        let fits = c.record_limit().to_string();
        let events = &mut c.topics.get_mut("events").unwrap().config;
        events.insert(TOPIC_MAX_MESSAGE_BYTES.into(), fits);
        c.validate(Mode::Dev).unwrap();
    }

    #[test]
    fn defaults_parse_and_dev_mode_has_dev_credentials() {
        let dev = Config::defaults(Mode::Dev);
        assert_eq!(dev.auth.tokens, vec![DEV_TOKEN.to_string()]);
        assert_eq!(dev.signing.current_key, DEV_CURRENT_SIGNING_KEY);
        dev.validate(Mode::Dev).unwrap();
        let serve = Config::defaults(Mode::Serve);
        assert!(serve.auth.tokens.is_empty());
        assert!(
            serve.validate(Mode::Serve).is_err(),
            "serve must require a token"
        );
    }

    #[test]
    fn file_then_env_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "k.toml",
                "[kafka]\nbrokers = \"file:1\"\nlinger = \"7ms\"\n[auth]\ntokens = [\"t\"]\n[signing]\ncurrent_key = \"sig_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\nnext_key = \"sig_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"\n",
            )?;
            jail.set_env("KSTASH_KAFKA_BROKERS", "env:2");
            jail.set_env("KSTASH_AUTH_TOKENS", "a, b");
            jail.set_env("KSTASH_SERVER_BODY_LIMIT", "42");
            jail.set_env("KSTASH_DELIVERY_ALLOWED_NETWORKS", "[\"10.0.0.0/8\"]");
            jail.set_env(
                "KSTASH_KAFKA_LIBRDKAFKA",
                "{\"socket.keepalive.enable\"=\"true\"}",
            );
            let c = Config::load(Mode::Serve, Some(Path::new("k.toml"))).expect("loads");
            assert_eq!(c.kafka.brokers, "env:2", "env wins over file");
            assert_eq!(
                c.kafka.linger,
                Duration::from_millis(7),
                "file wins over defaults"
            );
            assert_eq!(c.auth.tokens, vec!["a".to_string(), "b".to_string()]);
            assert_eq!(c.server.body_limit, 42);
            assert_eq!(
                c.delivery.allowed_networks,
                vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]
            );
            assert_eq!(
                c.kafka
                    .librdkafka
                    .get("socket.keepalive.enable")
                    .map(String::as_str),
                Some("true")
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("KSTASH_SERVER_LISTNE", "0.0.0.0:1");
            let err = Config::load(Mode::Dev, None).expect_err("typo must be refused");
            assert!(err.to_string().contains("listne"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn other_kstash_variables_are_not_configuration() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("KSTASH_TEST_BROKERS", "127.0.0.1:1");
            jail.set_env("KSTASH_CONFIG", "/nonexistent");
            Config::load(Mode::Dev, None).expect("ignored");
            Ok(())
        });
    }

    #[test]
    fn short_signing_keys_are_refused_in_serve_mode() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("KSTASH_AUTH_TOKENS", "t");
            jail.set_env("KSTASH_SIGNING_CURRENT_KEY", "short");
            jail.set_env(
                "KSTASH_SIGNING_NEXT_KEY",
                "sig_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
            );
            let err = Config::load(Mode::Serve, None).expect_err("short key");
            assert!(err.to_string().contains("current_key"), "{err}");
            Ok(())
        });
    }
}
