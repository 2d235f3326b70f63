//! An in-memory view of a compacted settings topic: queues, URL groups, schedules.
//!
//! Design choice: settings are few and small and are read on hot paths (every delivery of a queued
//! message, every publish to a URL group), so they live in a concurrent map (`dashmap`), not in the
//! on-disk store; the compacted topic keeps them across restarts. An older write never replaces a
//! newer one (by `updated_at`), because the API writes its change through at once and then reads it
//! again from Kafka, after any writes that preceded it.

use dashmap::DashMap;

/// A settings record: named, and stamped with a strictly increasing update time.
pub trait Setting: Clone {
    fn name(&self) -> &str;
    fn updated_at(&self) -> i64;
}

/// Every record of one settings topic, by name.
#[derive(Debug)]
pub struct Registry<R> {
    records: DashMap<String, R>,
}

impl<R> Default for Registry<R> {
    fn default() -> Self {
        Registry {
            records: DashMap::new(),
        }
    }
}

impl<R: Setting> Registry<R> {
    /// A record (a tombstone when `record` is `None`).
    pub fn apply(&self, name: &str, record: Option<R>) {
        match record {
            Some(r) => {
                let newer = self
                    .records
                    .get(name)
                    .is_none_or(|current| current.updated_at() <= r.updated_at());
                if newer {
                    self.records.insert(name.to_string(), r);
                }
            }
            None => {
                self.records.remove(name);
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<R> {
        self.records.get(name).map(|r| r.clone())
    }

    /// Every record, by name.
    pub fn list(&self) -> Vec<R> {
        let mut all: Vec<R> = self.records.iter().map(|r| r.clone()).collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::queue::QueueRecord;

    #[test]
    fn newest_write_wins_and_tombstones_remove() {
        let view = Registry::<QueueRecord>::default();
        let mut newer = QueueRecord::new("q", 2, false, 1);
        newer.updated_at = 5;
        view.apply("q", Some(newer.clone()));
        view.apply("q", Some(QueueRecord::new("q", 9, false, 1)));
        assert_eq!(view.get("q"), Some(newer), "an older write is ignored");
        view.apply("a", Some(QueueRecord::new("a", 1, true, 2)));
        assert_eq!(
            view.list()
                .iter()
                .map(|q| q.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "q"]
        );
        view.apply("q", None);
        assert_eq!(view.get("q"), None);
    }
}
