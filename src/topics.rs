//! The catalog of kstash's topics: their names and the configuration they are created with.
//!
//! Design choice: one place knows every topic. The pipeline topics (`ready` and one topic per
//! delay-ladder step) are listed here; the state-bearing topics are the variants of
//! [`state::Kind`](crate::state::Kind), each of which names its `[topics.<key>]` table and its
//! topic suffix. So a new state topic is one new `Kind` (plus its record type and its view) and
//! its documented defaults in `config/default.toml`; nothing here changes. `kafka::topics` then
//! creates whatever this catalog lists, knowing nothing about what the topics hold.

use std::collections::BTreeMap;

use crate::config::{Config, TOPIC_MAX_MESSAGE_BYTES};
use crate::delay::ladder::Ladder;
use crate::kafka::topics::TopicSpec;
use crate::state::Kind;

/// `[topics.<key>]` of the ready topic.
pub const READY: &str = "ready";
/// `[topics.<key>]` shared by every delay-ladder step topic.
pub const DELAY: &str = "delay";

/// The topics whose partitions `kstash dev` raises to `dev.partitions`: those that hold messages
/// and grow with traffic.
pub const DEV_SCALED: &[&str] = &[READY, DELAY, "events", "dlq", "cancellations", "dedup"];

/// Every `[topics.<key>]` kstash reads, in catalog order.
pub fn config_keys() -> Vec<&'static str> {
    let mut keys = vec![READY, DELAY];
    keys.extend(Kind::ALL.iter().map(|k| k.config_key()));
    keys
}

/// The full names of kstash's topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicNames {
    pub ready: String,
    /// One per delay-ladder step, in step order.
    pub delay: Vec<String>,
    /// The state-bearing topics, by kind.
    state: BTreeMap<Kind, String>,
}

impl TopicNames {
    pub fn new(prefix: &str, ladder: &Ladder) -> Self {
        TopicNames {
            ready: format!("{prefix}{READY}"),
            delay: ladder
                .topic_suffixes()
                .iter()
                .map(|s| format!("{prefix}{s}"))
                .collect(),
            state: Kind::ALL
                .iter()
                .map(|k| (*k, format!("{prefix}{}", k.topic_suffix())))
                .collect(),
        }
    }

    /// The names for `config`.
    pub fn of(config: &Config) -> Self {
        Self::new(&config.kafka.topic_prefix, &ladder(config))
    }

    /// The topic holding records of `kind`.
    pub fn state(&self, kind: Kind) -> &str {
        &self.state[&kind]
    }

    /// Every state-bearing topic with its kind.
    pub fn state_topics(&self) -> impl Iterator<Item = (Kind, &str)> {
        self.state.iter().map(|(k, n)| (*k, n.as_str()))
    }
}

/// The delay ladder of a validated config.
pub fn ladder(config: &Config) -> Ladder {
    Ladder::new(&config.delay.buckets).expect("validated configuration has a valid ladder")
}

/// The topics `config` asks for, with full names, partitions and topic configs.
pub fn specs(config: &Config) -> Vec<TopicSpec> {
    let names = TopicNames::of(config);
    // Every topic takes records of the largest size kstash writes, unless configured larger
    // (`Config::validate` refuses smaller).
    let record_limit = config.record_limit().to_string();
    let spec = |name: &str, key: &str| {
        let t = config.topic(key);
        let mut topic_config = t.config.clone();
        topic_config
            .entry(TOPIC_MAX_MESSAGE_BYTES.to_string())
            .or_insert_with(|| record_limit.clone());
        TopicSpec {
            name: name.to_string(),
            partitions: t.partitions,
            config: topic_config.into_iter().collect(),
            min_record_bytes: config.record_limit(),
        }
    };
    let mut specs = vec![spec(&names.ready, READY)];
    specs.extend(names.delay.iter().map(|n| spec(n, DELAY)));
    specs.extend(
        names
            .state_topics()
            .map(|(kind, name)| spec(name, kind.config_key())),
    );
    specs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;

    #[test]
    fn every_catalog_topic_has_a_documented_default() {
        let config = Config::defaults(Mode::Serve);
        let specs = specs(&config);
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        for expected in [
            "kstash.ready",
            "kstash.delay.0s",
            "kstash.delay.1d",
            "kstash.dlq",
            "kstash.events",
            "kstash.state.cancellations",
            "kstash.state.dedup",
            "kstash.state.queues",
            "kstash.state.flow_control",
            "kstash.state.url_groups",
            "kstash.state.schedules",
            "kstash.state.schedule_fires",
        ] {
            assert!(names.contains(&expected), "{expected} in {names:?}");
        }
        assert_eq!(config.topics.len(), config_keys().len());
    }
}
