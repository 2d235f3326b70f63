//! An in-memory view of a compacted settings topic: queues, URL groups, schedules.
//!
//! Design choice: settings are few and small and are read on hot paths (every delivery of a queued
//! message, every publish to a URL group), so they live in a concurrent map (`dashmap`), not in the
//! on-disk store; the compacted topic keeps them across restarts. An older write never replaces a
//! newer one (by `updated_at`), because the API writes its change through at once and then reads it
//! again from Kafka, after any writes that preceded it. For the same reason a removal leaves a
//! marker with the removed record's `updated_at`: a write of that record read back from Kafka
//! after the removal was applied must not bring it back (a deleted schedule listed again until the
//! tombstone is read back); a new write, stamped later, does.

use dashmap::DashMap;

/// A settings record: named, and stamped with a strictly increasing update time.
pub trait Setting: Clone {
    fn name(&self) -> &str;
    fn updated_at(&self) -> i64;
}

/// What the view holds for a name.
#[derive(Debug)]
enum Slot<R> {
    Live(R),
    /// Removed; the removed record was last updated at this time.
    Removed(i64),
}

/// Every record of one settings topic, by name.
#[derive(Debug)]
pub struct Registry<R> {
    records: DashMap<String, Slot<R>>,
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
                let newer = self.records.get(name).is_none_or(|slot| match &*slot {
                    Slot::Live(current) => current.updated_at() <= r.updated_at(),
                    Slot::Removed(removed) => *removed < r.updated_at(),
                });
                if newer {
                    self.records.insert(name.to_string(), Slot::Live(r));
                }
            }
            None => {
                if let Some(mut slot) = self.records.get_mut(name) {
                    if let Slot::Live(current) = &*slot {
                        *slot = Slot::Removed(current.updated_at());
                    }
                }
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<R> {
        self.records.get(name).and_then(|slot| match &*slot {
            Slot::Live(r) => Some(r.clone()),
            Slot::Removed(_) => None,
        })
    }

    /// Every record, by name.
    pub fn list(&self) -> Vec<R> {
        let mut all: Vec<R> = self
            .records
            .iter()
            .filter_map(|slot| match &*slot {
                Slot::Live(r) => Some(r.clone()),
                Slot::Removed(_) => None,
            })
            .collect();
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

    #[test]
    fn a_removed_record_read_back_late_stays_removed_and_a_new_one_returns() {
        let view = Registry::<QueueRecord>::default();
        let mut first = QueueRecord::new("q", 1, false, 1);
        first.updated_at = 5;
        let mut paused = first.clone();
        paused.paused = true;
        paused.updated_at = 6;
        // Written through: created, paused, removed.
        view.apply("q", Some(first.clone()));
        view.apply("q", Some(paused.clone()));
        view.apply("q", None);
        // Read back from Kafka before the tombstone: neither write brings it back.
        view.apply("q", Some(first));
        view.apply("q", Some(paused));
        assert_eq!(view.get("q"), None);
        assert!(view.list().is_empty(), "listed after its removal");
        view.apply("q", None);
        let mut again = QueueRecord::new("q", 3, false, 7);
        again.updated_at = 7;
        view.apply("q", Some(again.clone()));
        assert_eq!(
            view.get("q"),
            Some(again),
            "created again after the removal"
        );
    }
}
