//! Which offsets are finished while records of a partition finish out of order, and what to commit.
//!
//! Records of one partition are worked on concurrently and finish in any order, but a Kafka commit
//! says "everything below this offset is done". So the committed position of a partition is its
//! lowest unfinished offset; committing anything higher would lose the unfinished records on a
//! crash. One record can stay unfinished for long (a FIFO queue head retrying for an hour) while
//! thousands of later ones finish; so that a restart does not deliver all of those again, the
//! finished offsets above the position travel in the commit's metadata string
//! ([`commit_metadata`]), and the next assignment of the partition starts from them.
//!
//! Per partition the tracker keeps:
//! - `position`: the lowest unfinished offset; everything below it is finished. It only advances
//!   when the offsets starting at it are finished.
//! - `done`: the finished offsets above the position, as maximal half-open ranges (memory grows
//!   with the number of runs, not of records; [`OffsetTracker::runs`] lets the caller apply
//!   back-pressure when they fragment).
//! - `held`: offsets in memory (buffered or being worked on) and not finished.
//! - `next`: one past the highest offset seen in this assignment.
//!
//! Every offset in `[position, next)` that is neither done nor held is unfinished and not in
//! memory: *parked* (taken from Kafka, then dropped from memory unfinished because its lane's
//! buffer was full; read again after the consumer seeks back), or not read again yet after a
//! rewind. So for a record read from Kafka, [`OffsetTracker::state`] says whether it is already
//! finished (skip it), held (skip it, it is in memory) or pending (work on it).
//!
//! Kafka offsets are not dense (compaction, transaction markers, retention). Reading is
//! sequential, so an offset held beyond the high mark means the offsets between the high mark and
//! it are not in the log, and they count as finished (else the position would wait for them
//! forever). This is the rule the commit of "one past the highest started offset" always relied
//! on, and it puts one duty on the caller: every record read that is [`OffsetState::Pending`] is
//! [`held`](OffsetTracker::hold) before a later record of its partition is; one that cannot be
//! kept is held and [`released`](OffsetTracker::release) right away.
//!
//! Each assignment of a partition gets a new epoch: a record that finishes after its partition was
//! revoked (and perhaps assigned back) carries the old epoch and is ignored, so it cannot move a
//! position that now belongs to a newer assignment.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::commit_metadata;

/// Identifies one held record, returned by [`OffsetTracker::hold`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    epoch: u64,
}

/// What to do with a record read from Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetState {
    /// Finished already (in this assignment or, per the commit metadata, an earlier one): skip it.
    Finished,
    /// In memory, buffered or being worked on: skip it.
    Held,
    /// Unfinished and not in memory (new, parked, or unknown): work on it.
    Pending,
}

/// An offset commit for one partition: `offset` is the lowest unfinished offset, `metadata` says
/// which offsets above it are finished ([`commit_metadata`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Commit {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub metadata: String,
}

/// A set of offsets as maximal half-open ranges `start -> end`: neither overlapping nor adjacent.
#[derive(Debug, Default)]
struct RangeSet(BTreeMap<i64, i64>);

impl RangeSet {
    fn contains(&self, offset: i64) -> bool {
        self.0
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, end)| offset < *end)
    }

    /// Adds `[start, end)`, merging it with the ranges it overlaps or touches.
    fn insert(&mut self, mut start: i64, mut end: i64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                self.0.remove(&s);
                start = s;
                end = end.max(e);
            }
        }
        while let Some((&s, &e)) = self.0.range(start..=end).next() {
            self.0.remove(&s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    /// Removes the range starting at `start`, returning its end.
    fn take_at(&mut self, start: i64) -> Option<i64> {
        self.0.remove(&start)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn iter(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.0.iter().map(|(s, e)| (*s, *e))
    }
}

#[derive(Debug, Default)]
struct PartitionState {
    epoch: u64,
    /// Lowest unfinished offset; `None` until known (no committed offset and nothing held yet).
    position: Option<i64>,
    /// Finished offsets above `position`.
    done: RangeSet,
    /// Offsets in memory and not finished.
    held: BTreeSet<i64>,
    /// One past the highest offset seen in this assignment; meaningful once `position` is known.
    next: i64,
    /// Offset and metadata last committed successfully (or found committed on assignment).
    committed: Option<(i64, String)>,
    /// Attempts running now (a handler working on a record of this partition).
    running: usize,
    /// Being revoked: no further attempt may start.
    revoking: bool,
}

impl PartitionState {
    fn state(&self, offset: i64) -> OffsetState {
        match self.position {
            Some(position) if offset < position || self.done.contains(offset) => {
                OffsetState::Finished
            }
            _ if self.held.contains(&offset) => OffsetState::Held,
            _ => OffsetState::Pending,
        }
    }

    /// Marks `[start, end)` finished and advances the position over what is finished at it.
    fn mark_done(&mut self, start: i64, end: i64) {
        let Some(mut position) = self.position else {
            return;
        };
        self.done.insert(start.max(position), end);
        while let Some(end) = self.done.take_at(position) {
            position = end;
        }
        self.position = Some(position);
    }

    /// The commit of the current position, if it is known.
    fn commit(&self, topic: &str, partition: i32, max_metadata_bytes: usize) -> Option<Commit> {
        let position = self.position?;
        Some(Commit {
            topic: topic.to_string(),
            partition,
            offset: position,
            metadata: commit_metadata::encode(
                position,
                self.done.iter(),
                self.next,
                max_metadata_bytes,
            ),
        })
    }

    /// The commit of the current position if it says more than the last successful one. A
    /// position below the committed offset is never committed (that would move Kafka's back).
    fn due(&self, topic: &str, partition: i32, max_metadata_bytes: usize) -> Option<Commit> {
        let commit = self.commit(topic, partition, max_metadata_bytes)?;
        let due = match &self.committed {
            None => true,
            Some((offset, metadata)) => {
                commit.offset > *offset
                    || (commit.offset == *offset && commit.metadata != *metadata)
            }
        };
        due.then_some(commit)
    }
}

/// Offsets per topic-partition of one consumer.
#[derive(Debug)]
pub struct OffsetTracker {
    partitions: HashMap<(String, i32), PartitionState>,
    next_epoch: u64,
    /// Longest commit metadata written (Kafka refuses more than `offset.metadata.max.bytes`).
    max_metadata_bytes: usize,
}

impl OffsetTracker {
    /// A tracker whose commit metadata stays within `max_metadata_bytes`.
    pub fn new(max_metadata_bytes: usize) -> Self {
        OffsetTracker {
            partitions: HashMap::new(),
            next_epoch: 0,
            max_metadata_bytes,
        }
    }

    /// The partition was (re)assigned: forget anything from an earlier assignment. `committed` is
    /// the group's committed offset and its metadata as read from Kafka (`None` when there is
    /// none): the position starts there, and the offsets the metadata says are finished are
    /// skipped. Without a committed offset, the first held offset becomes the position.
    pub fn assign(&mut self, topic: &str, partition: i32, committed: Option<(i64, &str)>) {
        self.next_epoch += 1;
        let mut state = PartitionState {
            epoch: self.next_epoch,
            ..PartitionState::default()
        };
        if let Some((offset, metadata)) = committed.filter(|(offset, _)| *offset >= 0) {
            state.position = Some(offset);
            state.next = offset;
            if let Some(decoded) = commit_metadata::decode(offset, metadata) {
                for (start, end) in decoded.done {
                    state.done.insert(start, end);
                }
                state.next = decoded.next;
            }
            state.committed = Some((offset, metadata.to_string()));
        }
        self.partitions
            .insert((topic.to_string(), partition), state);
    }

    /// Whether the record at `offset`, read from Kafka, is finished, held, or to be worked on.
    pub fn state(&self, topic: &str, partition: i32, offset: i64) -> OffsetState {
        self.partitions
            .get(&(topic.to_string(), partition))
            .map_or(OffsetState::Pending, |s| s.state(offset))
    }

    /// A record is taken into memory (buffered or started). Offsets between the high mark and
    /// `offset` are not in the log and count as finished (see the module doc). Holding a finished
    /// offset changes nothing (finishing its ticket neither).
    pub fn hold(&mut self, topic: &str, partition: i32, offset: i64) -> Ticket {
        let key = (topic.to_string(), partition);
        if !self.partitions.contains_key(&key) {
            // Records can arrive before the assign callback was seen by us (not with librdkafka's
            // ordering, but cheap to be safe about).
            self.assign(topic, partition, None);
        }
        let state = self.partitions.get_mut(&key).expect("just ensured");
        match state.position {
            None => {
                state.position = Some(offset);
                state.next = offset.saturating_add(1);
            }
            Some(_) if offset >= state.next => {
                state.mark_done(state.next, offset);
                state.next = offset.saturating_add(1);
            }
            Some(_) => {}
        }
        if state.state(offset) == OffsetState::Pending {
            state.held.insert(offset);
        }
        Ticket {
            topic: key.0,
            partition,
            offset,
            epoch: state.epoch,
        }
    }

    /// The partition state a ticket belongs to, unless it is from an earlier assignment.
    fn current(&mut self, ticket: &Ticket) -> Option<&mut PartitionState> {
        self.partitions
            .get_mut(&(ticket.topic.clone(), ticket.partition))
            .filter(|s| s.epoch == ticket.epoch)
    }

    /// Whether `ticket` still belongs to the current assignment of its partition (a record whose
    /// partition was revoked must not be attempted again: its next owner has it).
    pub fn is_current(&self, ticket: &Ticket) -> bool {
        self.partitions
            .get(&(ticket.topic.clone(), ticket.partition))
            .is_some_and(|s| s.epoch == ticket.epoch)
    }

    /// The held record was dropped from memory unfinished (parked): it is read again later.
    /// Returns false when the ticket belongs to an earlier assignment and was ignored.
    pub fn release(&mut self, ticket: &Ticket) -> bool {
        let Some(state) = self.current(ticket) else {
            return false;
        };
        state.held.remove(&ticket.offset);
        true
    }

    /// The record is finished (delivered, or durably handed on). Returns false when the ticket
    /// belongs to an earlier assignment and was ignored.
    pub fn finish(&mut self, ticket: &Ticket) -> bool {
        let Some(state) = self.current(ticket) else {
            return false;
        };
        state.held.remove(&ticket.offset);
        if state.state(ticket.offset) == OffsetState::Pending {
            state.mark_done(ticket.offset, ticket.offset.saturating_add(1));
        }
        true
    }

    /// Commits that say more than the last successful commit of their partition, sorted.
    pub fn due_commits(&self) -> Vec<Commit> {
        let mut due: Vec<_> = self
            .partitions
            .iter()
            .filter_map(|((topic, partition), s)| s.due(topic, *partition, self.max_metadata_bytes))
            .collect();
        due.sort();
        due
    }

    /// Records a successful commit (an older one than recorded already is ignored).
    pub fn committed(&mut self, topic: &str, partition: i32, offset: i64, metadata: &str) {
        if let Some(s) = self.partitions.get_mut(&(topic.to_string(), partition)) {
            if s.committed.as_ref().is_none_or(|(o, _)| *o <= offset) {
                s.committed = Some((offset, metadata.to_string()));
            }
        }
    }

    /// The partition was revoked; returns its last commit if it says more than the last
    /// successful one (the caller commits it while it still owns the partition).
    pub fn revoke(&mut self, topic: &str, partition: i32) -> Option<Commit> {
        self.partitions
            .remove(&(topic.to_string(), partition))?
            .due(topic, partition, self.max_metadata_bytes)
    }

    /// An attempt on the ticket's record is about to start: false (do not start it) when the
    /// partition was revoked or is being revoked (its next owner reads the record again).
    pub fn attempt_starts(&mut self, ticket: &Ticket) -> bool {
        match self.current(ticket) {
            Some(state) if !state.revoking => {
                state.running += 1;
                true
            }
            _ => false,
        }
    }

    /// An attempt started with [`OffsetTracker::attempt_starts`] ended.
    pub fn attempt_ended(&mut self, ticket: &Ticket) {
        if let Some(state) = self.current(ticket) {
            state.running = state.running.saturating_sub(1);
        }
    }

    /// The partition is about to be revoked: no attempt starts any more.
    pub fn revoking(&mut self, topic: &str, partition: i32) {
        if let Some(state) = self.partitions.get_mut(&(topic.to_string(), partition)) {
            state.revoking = true;
        }
    }

    /// Attempts running on the partitions of `tps`.
    pub fn running(&self, tps: &[(String, i32)]) -> usize {
        tps.iter()
            .filter_map(|tp| self.partitions.get(tp))
            .map(|s| s.running)
            .sum()
    }

    /// Records held across all partitions.
    pub fn held_count(&self) -> usize {
        self.partitions.values().map(|s| s.held.len()).sum()
    }

    /// The partition's lowest unfinished offset, when known.
    pub fn position(&self, topic: &str, partition: i32) -> Option<i64> {
        self.partitions
            .get(&(topic.to_string(), partition))?
            .position
    }

    /// Runs of finished offsets above the partition's position: how fragmented it is.
    pub fn runs(&self, topic: &str, partition: i32) -> usize {
        self.partitions
            .get(&(topic.to_string(), partition))
            .map_or(0, |s| s.done.len())
    }

    /// Runs of finished offsets above the positions of all partitions.
    pub fn total_runs(&self) -> usize {
        self.partitions.values().map(|s| s.done.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: &str = "ready";
    /// What the consumer passes: below Kafka's default `offset.metadata.max.bytes` (4096).
    const LIMIT: usize = 4000;

    fn commit(partition: i32, offset: i64, metadata: &str) -> Commit {
        Commit {
            topic: T.into(),
            partition,
            offset,
            metadata: metadata.into(),
        }
    }

    fn offsets(t: &OffsetTracker, range: std::ops::Range<i64>) -> Vec<OffsetState> {
        range.map(|o| t.state(T, 0, o)).collect()
    }

    #[test]
    fn position_is_the_lowest_unfinished_offset() {
        let mut t = OffsetTracker::new(LIMIT);
        t.assign(T, 0, None);
        let tickets: Vec<_> = (10..15).map(|o| t.hold(T, 0, o)).collect();
        assert_eq!(t.due_commits(), vec![commit(0, 10, "")]);
        t.finish(&tickets[1]);
        t.finish(&tickets[3]);
        let due = t.due_commits();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].offset, 10, "10 still held");
        assert_eq!(due[0].metadata, "ks1:a:1.1.1.1.1", "11 and 13 finished");
        t.finish(&tickets[0]);
        let due = t.due_commits().remove(0);
        assert_eq!((due.offset, due.metadata.as_str()), (12, "ks1:c:1.1.1"));
        t.committed(T, 0, 12, &due.metadata);
        assert!(t.due_commits().is_empty());
        t.finish(&tickets[2]);
        t.finish(&tickets[4]);
        assert_eq!(
            t.due_commits(),
            vec![commit(0, 15, "")],
            "all done: one past the last"
        );
        assert_eq!(t.held_count(), 0);
        assert_eq!(t.runs(T, 0), 0);
    }

    #[test]
    fn finishing_after_revoke_is_ignored() {
        let mut t = OffsetTracker::new(LIMIT);
        t.assign(T, 1, None);
        let done = t.hold(T, 1, 4);
        let old = t.hold(T, 1, 5);
        t.finish(&done);
        assert_eq!(
            t.revoke(T, 1),
            Some(commit(1, 5, "")),
            "commit up to the unfinished record"
        );
        t.assign(T, 1, Some((5, "")));
        let new = t.hold(T, 1, 5);
        assert!(
            !t.finish(&old),
            "an old ticket must not finish the new assignment's record"
        );
        assert!(!t.release(&old));
        assert_eq!(t.state(T, 1, 5), OffsetState::Held);
        assert!(t.due_commits().is_empty(), "5 is what Kafka has");
        assert!(t.finish(&new));
        assert_eq!(t.due_commits(), vec![commit(1, 6, "")]);
    }

    #[test]
    fn revoke_reports_nothing_when_already_committed() {
        let mut t = OffsetTracker::new(LIMIT);
        t.assign(T, 0, None);
        let a = t.hold(T, 0, 0);
        t.finish(&a);
        t.committed(T, 0, 1, "");
        assert_eq!(t.revoke(T, 0), None);
        assert_eq!(t.revoke(T, 7), None, "unknown partition");
    }

    #[test]
    fn an_older_commit_does_not_undo_a_newer_one() {
        let mut t = OffsetTracker::new(LIMIT);
        t.assign(T, 0, Some((10, "")));
        let a = t.hold(T, 0, 10);
        t.finish(&a);
        t.committed(T, 0, 11, "");
        t.committed(T, 0, 10, "");
        assert!(t.due_commits().is_empty());
    }

    #[test]
    fn held_released_and_finished() {
        let mut t = OffsetTracker::new(LIMIT);
        t.assign(T, 0, Some((0, "")));
        assert_eq!(t.state(T, 0, 0), OffsetState::Pending);
        let a = t.hold(T, 0, 0);
        assert_eq!((t.state(T, 0, 0), t.held_count()), (OffsetState::Held, 1));
        assert!(t.release(&a));
        assert_eq!(
            (t.state(T, 0, 0), t.held_count()),
            (OffsetState::Pending, 0)
        );
        assert_eq!(t.position(T, 0), Some(0), "parked, still unfinished");
        let a = t.hold(T, 0, 0);
        assert_eq!(t.state(T, 0, 0), OffsetState::Held);
        assert!(t.finish(&a));
        assert_eq!(
            (t.state(T, 0, 0), t.held_count()),
            (OffsetState::Finished, 0)
        );
        assert_eq!(t.position(T, 0), Some(1));
        let again = t.hold(T, 0, 0);
        assert_eq!(
            (t.state(T, 0, 0), t.held_count()),
            (OffsetState::Finished, 0),
            "holding a finished offset changes nothing"
        );
        assert!(t.finish(&again));
        assert_eq!(t.position(T, 0), Some(1));
        assert_eq!(t.state(T, 9, 0), OffsetState::Pending, "unknown partition");
    }

    #[test]
    fn a_parked_record_keeps_the_position() {
        let mut t = OffsetTracker::new(LIMIT);
        t.assign(T, 0, None);
        let tickets: Vec<_> = (0..10).map(|o| t.hold(T, 0, o)).collect();
        t.release(&tickets[3]);
        for (o, ticket) in tickets.iter().enumerate() {
            if o != 3 {
                t.finish(ticket);
            }
        }
        assert_eq!(t.position(T, 0), Some(3));
        assert_eq!(t.state(T, 0, 3), OffsetState::Pending);
        assert_eq!((t.runs(T, 0), t.total_runs(), t.held_count()), (1, 1, 0));
        assert_eq!(t.due_commits(), vec![commit(0, 3, "ks1:3:1.6")]);
        let reread = t.hold(T, 0, 3);
        t.finish(&reread);
        assert_eq!(t.due_commits(), vec![commit(0, 10, "")]);
        assert_eq!(t.runs(T, 0), 0);
    }

    #[test]
    fn rereading_after_a_rewind() {
        use OffsetState::{Finished, Held, Pending};
        let mut t = OffsetTracker::new(LIMIT);
        t.assign(T, 0, Some((0, "")));
        let tickets: Vec<_> = (0..6).map(|o| t.hold(T, 0, o)).collect();
        t.finish(&tickets[1]);
        t.finish(&tickets[4]);
        t.release(&tickets[2]);
        t.release(&tickets[3]);
        // The consumer seeks back to 2 and reads on past the high mark (6).
        assert_eq!(
            offsets(&t, 0..8),
            [Held, Finished, Pending, Pending, Finished, Held, Pending, Pending]
        );
        let two = t.hold(T, 0, 2);
        assert_eq!(t.state(T, 0, 3), Pending, "holding 2 says nothing about 3");
        t.finish(&two);
        t.finish(&tickets[0]);
        assert_eq!(t.position(T, 0), Some(3));
    }

    #[test]
    fn offsets_missing_from_the_log_count_as_finished() {
        let mut t = OffsetTracker::new(LIMIT);
        t.assign(T, 0, None);
        let a = t.hold(T, 0, 0);
        let b = t.hold(T, 0, 5);
        assert_eq!(t.state(T, 0, 3), OffsetState::Finished);
        t.finish(&b);
        assert_eq!(t.due_commits(), vec![commit(0, 0, "ks1:0:1.5")]);
        t.finish(&a);
        assert_eq!(t.position(T, 0), Some(6));

        // The committed offset fell out of retention: the log starts later.
        t.assign(T, 1, Some((100, "")));
        let c = t.hold(T, 1, 150);
        assert_eq!(t.position(T, 1), Some(150));
        t.finish(&c);
        assert_eq!(t.position(T, 1), Some(151));
    }

    #[test]
    fn finished_offsets_survive_a_restart() {
        use OffsetState::{Finished, Pending};
        let mut t = OffsetTracker::new(LIMIT);
        t.assign(T, 0, None);
        let tickets: Vec<_> = (0..1001).map(|o| t.hold(T, 0, o)).collect();
        for ticket in &tickets[1..] {
            t.finish(ticket);
        }
        let due = t.due_commits();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].offset, 0, "the FIFO head is unfinished");
        let metadata = &due[0].metadata;
        assert!(metadata.len() < 40, "{metadata}");
        assert_eq!(metadata, "ks1:0:1.rs");

        let mut restarted = OffsetTracker::new(LIMIT);
        restarted.assign(T, 0, Some((0, metadata)));
        assert_eq!(restarted.state(T, 0, 0), Pending);
        assert!((1..1001).all(|o| restarted.state(T, 0, o) == Finished));
        assert_eq!(restarted.state(T, 0, 1001), Pending);
        assert!(restarted.due_commits().is_empty(), "nothing new to say");
        let head = restarted.hold(T, 0, 0);
        restarted.finish(&head);
        assert_eq!(restarted.due_commits(), vec![commit(0, 1001, "")]);
    }

    #[test]
    fn metadata_for_another_offset_is_not_trusted() {
        let mut t = OffsetTracker::new(LIMIT);
        t.assign(T, 0, Some((5, "ks1:0:1.rs")));
        assert_eq!(t.position(T, 0), Some(5));
        assert_eq!(t.state(T, 0, 6), OffsetState::Pending);
        assert_eq!(
            t.due_commits(),
            vec![commit(0, 5, "")],
            "the stale metadata is replaced"
        );
        t.assign(T, 1, Some((0, "not ours")));
        assert_eq!(t.state(T, 1, 1), OffsetState::Pending);
        t.assign(T, 2, Some((-1001, "")));
        assert_eq!(t.position(T, 2), None, "an invalid offset is no offset");
    }

    #[test]
    fn metadata_stays_within_the_limit() {
        const SMALL: usize = 24;
        let mut t = OffsetTracker::new(SMALL);
        t.assign(T, 0, Some((0, "")));
        let tickets: Vec<_> = (0..100).map(|o| t.hold(T, 0, o)).collect();
        for ticket in tickets.iter().skip(1).step_by(2) {
            t.finish(ticket);
        }
        assert_eq!(t.runs(T, 0), 50);
        let due = t.due_commits().remove(0);
        assert!(due.metadata.len() <= SMALL, "{}", due.metadata);
        let decoded = commit_metadata::decode(0, &due.metadata).unwrap();
        assert!(decoded.done.iter().all(|(s, e)| s % 2 == 1 && *e == s + 1));
        assert!(decoded.next < 100);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Read the next record from Kafka; hold it when pending.
        Read,
        Finish(usize),
        /// Drop a held record from memory unfinished.
        Park(usize),
        /// Seek back to the lowest parked record.
        Rewind,
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        let op = prop_oneof![
            4 => Just(Op::Read),
            3 => any::<usize>().prop_map(Op::Finish),
            1 => any::<usize>().prop_map(Op::Park),
            1 => Just(Op::Rewind),
        ];
        proptest::collection::vec(op, 0..400)
    }

    /// Offsets in the log: ascending from a random base, with random gaps.
    fn log() -> impl Strategy<Value = Vec<i64>> {
        (0..1_000i64, proptest::collection::vec(1..4i64, 1..80)).prop_map(|(base, steps)| {
            steps
                .into_iter()
                .scan(base, |o, step| {
                    *o += step;
                    Some(*o)
                })
                .collect()
        })
    }

    /// What the tracker should say, kept the obvious way.
    #[derive(Default)]
    struct Model {
        finished: BTreeSet<i64>,
        held: BTreeSet<i64>,
        parked: BTreeSet<i64>,
        /// One past the highest offset read, once one was.
        next: Option<i64>,
    }

    impl Model {
        fn state(&self, log: &[i64], offset: i64) -> OffsetState {
            let seen = self.next.is_some_and(|next| offset < next);
            if seen && (offset < log[0] || log.binary_search(&offset).is_err())
                || self.finished.contains(&offset)
            {
                OffsetState::Finished
            } else if self.held.contains(&offset) {
                OffsetState::Held
            } else {
                OffsetState::Pending
            }
        }

        fn position(&self, log: &[i64]) -> Option<i64> {
            let next = self.next?;
            Some(
                log.iter()
                    .copied()
                    .take_while(|o| *o < next)
                    .find(|o| !self.finished.contains(o))
                    .unwrap_or(next),
            )
        }
    }

    proptest! {
        /// Whatever records finish or are parked in whatever order, and however the log has gaps,
        /// the position is the lowest unfinished offset, every offset's state is right, and the
        /// commit metadata carries exactly the finished offsets to a restarted tracker (or, when
        /// cut short, never more than them).
        #[test]
        fn tracks_random_finishes_and_parks(log in log(), ops in ops(), tiny in 0..40usize) {
            let mut t = OffsetTracker::new(LIMIT);
            let mut small = OffsetTracker::new(tiny);
            t.assign(T, 0, None);
            small.assign(T, 0, None);
            let mut model = Model::default();
            let mut tickets: HashMap<i64, (Ticket, Ticket)> = HashMap::new();
            let mut cursor = 0;
            let checked = log[0] - 2..log[log.len() - 1] + 3;
            for op in ops {
                match op {
                    Op::Read => {
                        let Some(&offset) = log.get(cursor) else { continue };
                        cursor += 1;
                        let expected = model.state(&log, offset);
                        prop_assert_eq!(t.state(T, 0, offset), expected);
                        if expected == OffsetState::Pending {
                            tickets.insert(offset, (t.hold(T, 0, offset), small.hold(T, 0, offset)));
                            model.held.insert(offset);
                            model.parked.remove(&offset);
                            model.next = Some(model.next.map_or(offset + 1, |n| n.max(offset + 1)));
                        }
                    }
                    Op::Finish(i) | Op::Park(i) if !model.held.is_empty() => {
                        let offset = *model.held.iter().nth(i % model.held.len()).unwrap();
                        model.held.remove(&offset);
                        let (a, b) = tickets.remove(&offset).unwrap();
                        if matches!(op, Op::Finish(_)) {
                            prop_assert!(t.finish(&a) && small.finish(&b));
                            model.finished.insert(offset);
                        } else {
                            prop_assert!(t.release(&a) && small.release(&b));
                            model.parked.insert(offset);
                        }
                    }
                    Op::Finish(_) | Op::Park(_) => {}
                    Op::Rewind => {
                        if let Some(lowest) = model.parked.first() {
                            cursor = cursor.min(log.binary_search(lowest).unwrap());
                        }
                    }
                }

                let position = t.position(T, 0);
                prop_assert_eq!(position, model.position(&log));
                prop_assert_eq!(small.position(T, 0), position);
                prop_assert_eq!(t.held_count(), model.held.len());
                for o in checked.clone() {
                    prop_assert_eq!(t.state(T, 0, o), model.state(&log, o), "offset {}", o);
                }
                let Some(position) = position else { continue };

                // A restart from the commit sees everything finished as finished, the rest pending.
                let due = t.due_commits().remove(0);
                prop_assert_eq!(due.offset, position);
                let mut restarted = OffsetTracker::new(LIMIT);
                restarted.assign(T, 0, Some((due.offset, &due.metadata)));
                for o in checked.clone() {
                    let expected = match model.state(&log, o) {
                        OffsetState::Held => OffsetState::Pending,
                        s => s,
                    };
                    prop_assert_eq!(restarted.state(T, 0, o), expected, "offset {}", o);
                }

                // Cut short: never claims more than what is finished, nor a higher high mark.
                let due = small.due_commits();
                let metadata = due.first().map_or("", |c| c.metadata.as_str());
                prop_assert!(metadata.len() <= tiny);
                if let Some(decoded) = commit_metadata::decode(position, metadata) {
                    prop_assert!(decoded.next <= model.next.unwrap());
                    for o in decoded.done.iter().flat_map(|&(s, e)| s..e) {
                        prop_assert_eq!(model.state(&log, o), OffsetState::Finished);
                    }
                }
            }
        }
    }
}
