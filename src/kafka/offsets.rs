//! Which offsets may be committed while records of a partition finish out of order.
//!
//! Records of one partition are worked on concurrently and finish in any order, but a Kafka commit
//! says "everything below this offset is done". So the committable position of a partition is its
//! lowest unfinished offset, or one past the highest started offset when nothing is in flight.
//! Committing anything higher would lose the unfinished records on a crash.
//!
//! Each assignment of a partition gets a new epoch: a record that finishes after its partition was
//! revoked (and perhaps assigned back) carries the old epoch and is ignored, so it cannot move a
//! position that now belongs to a newer assignment.

use std::collections::{BTreeSet, HashMap};

/// Identifies one started record, returned by [`OffsetTracker::start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    epoch: u64,
}

#[derive(Debug, Default)]
struct PartitionState {
    epoch: u64,
    in_flight: BTreeSet<i64>,
    /// One past the highest offset started in this epoch.
    next: Option<i64>,
    /// Position last committed successfully.
    committed: Option<i64>,
}

impl PartitionState {
    fn position(&self) -> Option<i64> {
        self.in_flight.first().copied().or(self.next)
    }
}

/// Positions per topic-partition of one consumer.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<(String, i32), PartitionState>,
    next_epoch: u64,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The partition was (re)assigned: forget anything from an earlier assignment.
    pub fn assign(&mut self, topic: &str, partition: i32) {
        self.next_epoch += 1;
        self.partitions.insert(
            (topic.to_string(), partition),
            PartitionState {
                epoch: self.next_epoch,
                ..PartitionState::default()
            },
        );
    }

    /// The partition was revoked; returns its last committable position if it moved past the
    /// last commit (the caller commits it while it still owns the partition).
    pub fn revoke(&mut self, topic: &str, partition: i32) -> Option<i64> {
        let state = self.partitions.remove(&(topic.to_string(), partition))?;
        let position = state.position()?;
        (state.committed < Some(position)).then_some(position)
    }

    /// A record is being worked on.
    pub fn start(&mut self, topic: &str, partition: i32, offset: i64) -> Ticket {
        let key = (topic.to_string(), partition);
        if !self.partitions.contains_key(&key) {
            // Records can arrive before the assign callback was seen by us (not with librdkafka's
            // ordering, but cheap to be safe about).
            self.assign(topic, partition);
        }
        let state = self.partitions.get_mut(&key).expect("just ensured");
        state.in_flight.insert(offset);
        state.next = Some(state.next.map_or(offset + 1, |n| n.max(offset + 1)));
        Ticket {
            topic: key.0,
            partition,
            offset,
            epoch: state.epoch,
        }
    }

    /// The record is finished (delivered, or durably handed on). Returns false when the ticket
    /// belongs to an earlier assignment and was ignored.
    pub fn finish(&mut self, ticket: &Ticket) -> bool {
        match self
            .partitions
            .get_mut(&(ticket.topic.clone(), ticket.partition))
        {
            Some(state) if state.epoch == ticket.epoch => state.in_flight.remove(&ticket.offset),
            _ => false,
        }
    }

    /// Positions that moved past their last successful commit: `(topic, partition, position)`.
    pub fn due_commits(&self) -> Vec<(String, i32, i64)> {
        let mut due: Vec<_> = self
            .partitions
            .iter()
            .filter_map(|((topic, partition), s)| {
                let position = s.position()?;
                (s.committed < Some(position)).then(|| (topic.clone(), *partition, position))
            })
            .collect();
        due.sort();
        due
    }

    /// Records a successful commit of `position`.
    pub fn committed(&mut self, topic: &str, partition: i32, position: i64) {
        if let Some(s) = self.partitions.get_mut(&(topic.to_string(), partition)) {
            s.committed = s.committed.max(Some(position));
        }
    }

    /// Records in flight across all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|s| s.in_flight.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: &str = "ready";

    #[test]
    fn position_is_the_lowest_unfinished_offset() {
        let mut t = OffsetTracker::new();
        t.assign(T, 0);
        let tickets: Vec<_> = (10..15).map(|o| t.start(T, 0, o)).collect();
        assert_eq!(t.due_commits(), vec![(T.into(), 0, 10)]);
        t.finish(&tickets[1]);
        t.finish(&tickets[3]);
        assert_eq!(
            t.due_commits(),
            vec![(T.into(), 0, 10)],
            "10 still in flight"
        );
        t.finish(&tickets[0]);
        assert_eq!(t.due_commits(), vec![(T.into(), 0, 12)]);
        t.committed(T, 0, 12);
        assert!(t.due_commits().is_empty());
        t.finish(&tickets[2]);
        t.finish(&tickets[4]);
        assert_eq!(
            t.due_commits(),
            vec![(T.into(), 0, 15)],
            "all done: one past the last"
        );
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn finishing_after_revoke_is_ignored() {
        let mut t = OffsetTracker::new();
        t.assign(T, 1);
        let done = t.start(T, 1, 4);
        let old = t.start(T, 1, 5);
        t.finish(&done);
        assert_eq!(
            t.revoke(T, 1),
            Some(5),
            "commit up to the unfinished record"
        );
        t.assign(T, 1);
        let new = t.start(T, 1, 5);
        assert!(
            !t.finish(&old),
            "an old ticket must not finish the new assignment's record"
        );
        assert_eq!(t.due_commits(), vec![(T.into(), 1, 5)]);
        assert!(t.finish(&new));
        assert_eq!(t.due_commits(), vec![(T.into(), 1, 6)]);
    }

    #[test]
    fn revoke_reports_nothing_when_already_committed() {
        let mut t = OffsetTracker::new();
        t.assign(T, 0);
        let a = t.start(T, 0, 0);
        t.finish(&a);
        t.committed(T, 0, 1);
        assert_eq!(t.revoke(T, 0), None);
        assert_eq!(t.revoke(T, 7), None, "unknown partition");
    }

    proptest! {
        /// Whatever order records finish in, the committable position never passes an
        /// unfinished record, and reaches the end once all are finished.
        #[test]
        fn never_commits_past_an_unfinished_record(order in Just((0..40i64).collect::<Vec<_>>()).prop_shuffle()) {
            let mut t = OffsetTracker::new();
            t.assign(T, 0);
            let tickets: Vec<_> = (0..40).map(|o| t.start(T, 0, o)).collect();
            let mut finished = BTreeSet::new();
            for o in order {
                t.finish(&tickets[usize::try_from(o).unwrap()]);
                finished.insert(o);
                let position = t.due_commits()[0].2;
                let lowest_unfinished = (0..40).find(|x| !finished.contains(x)).unwrap_or(40);
                prop_assert_eq!(position, lowest_unfinished);
            }
        }
    }
}
