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
    pub topics: TopicsConfig,
    pub delivery: DeliveryConfig,
    pub delay: DelayConfig,
    pub state: StateConfig,
    pub dev: DevConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub body_limit: usize,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
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
    #[serde(default)]
    pub librdkafka: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    pub ready: TopicConfig,
    pub delay: TopicConfig,
    pub dlq: TopicConfig,
    pub cancellations: TopicConfig,
    pub dedup: TopicConfig,
    pub events: TopicConfig,
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
pub struct StateConfig {
    pub dir: String,
    #[serde(with = "humantime_serde")]
    pub events_retention: Duration,
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    pub cache_bytes: usize,
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

    /// Checks what serde cannot: required secrets, sane numbers.
    pub fn validate(&self, mode: Mode) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.auth.tokens.iter().all(|t| t.is_empty()) {
            return invalid(
                "auth.tokens is empty: set at least one token (KSTASH_AUTH_TOKENS)".into(),
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
        if self.delivery.max_in_flight == 0 {
            return invalid("delivery.max_in_flight must be at least 1".into());
        }
        for (name, topic) in [
            ("ready", &self.topics.ready),
            ("events", &self.topics.events),
        ] {
            if topic.partitions < 1 {
                return invalid(format!("topics.{name}.partitions must be at least 1"));
            }
        }
        if self.state.prune_interval.is_zero() {
            return invalid("state.prune_interval must be positive".into());
        }
        if self.dev.partitions < 1 {
            return invalid("dev.partitions must be at least 1".into());
        }
        if self.server.body_limit == 0 {
            return invalid("server.body_limit must be at least 1".into());
        }
        Ok(())
    }
}

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

/// Configuration sections; only `KSTASH_<SECTION>_*` variables are configuration, so other
/// `KSTASH_*` variables (`KSTASH_CONFIG`, the tests' `KSTASH_TEST_BROKERS`) are left alone while a
/// mistyped key inside a section is still refused.
const SECTIONS: [&str; 7] = [
    "server", "auth", "signing", "kafka", "topics", "delivery", "dev",
];

/// `KSTASH_SECTION_KEY` → `section.key`.
fn env_provider() -> Env {
    Env::prefixed(ENV_PREFIX)
        .filter(|key| {
            let section = key.as_str().split('_').next().unwrap_or_default();
            SECTIONS.iter().any(|s| s.eq_ignore_ascii_case(section))
        })
        .map(|key| env_key_to_path(key.as_str()).into())
}

fn env_key_to_path(key: &str) -> String {
    let lower = key.to_ascii_lowercase();
    match lower.split_once('_') {
        Some((section, rest)) => format!("{section}.{rest}"),
        None => lower,
    }
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
    fn env_keys_split_on_the_first_underscore_only() {
        assert_eq!(env_key_to_path("KAFKA_BROKERS"), "kafka.brokers");
        assert_eq!(env_key_to_path("SERVER_BODY_LIMIT"), "server.body_limit");
        assert_eq!(
            env_key_to_path("SIGNING_CURRENT_KEY"),
            "signing.current_key"
        );
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
