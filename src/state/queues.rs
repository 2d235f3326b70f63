//! The in-memory view of the queues topic: every queue's settings, read by the queue API and by
//! the delivery stage before it starts a queued message.
//!
//! Design choice: queue settings are few and small and are read on every delivery of a queued
//! message, so they live in a concurrent map (`dashmap`), not in the on-disk store; the compacted
//! topic keeps them across restarts.

use dashmap::DashMap;

use crate::model::queue::QueueRecord;

/// Every known queue.
#[derive(Debug, Default)]
pub struct QueueView {
    queues: DashMap<String, QueueRecord>,
}

impl QueueView {
    /// A queue's settings (a tombstone when `record` is `None`). An older write never replaces a
    /// newer one (the API writes through, then reads its own write again from Kafka).
    pub fn apply(&self, name: &str, record: Option<QueueRecord>) {
        match record {
            Some(r) => {
                let newer = self
                    .queues
                    .get(name)
                    .is_none_or(|current| current.updated_at <= r.updated_at);
                if newer {
                    self.queues.insert(name.to_string(), r);
                }
            }
            None => {
                self.queues.remove(name);
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<QueueRecord> {
        self.queues.get(name).map(|r| r.clone())
    }

    /// Every queue, by name.
    pub fn list(&self) -> Vec<QueueRecord> {
        let mut all: Vec<QueueRecord> = self.queues.iter().map(|r| r.clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_write_wins_and_tombstones_remove() {
        let view = QueueView::default();
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
