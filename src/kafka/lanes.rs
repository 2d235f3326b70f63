//! Lanes: the per-key ordering and bounds inside a partition consumer (see
//! `docs/architecture.md`, "Lanes").
//!
//! A record may belong to a *lane*, named by its Kafka key (a queue, a flow-control key) or by its
//! destination when that is at its bound. A lane starts its records in offset order, at most
//! `parallelism` at a time, and not at all while paused; records without a lane start at once.
//! Each lane has its own dispatcher (in `consumer.rs`); this file is the bookkeeping it runs on,
//! kept free of I/O so it is tested on its own.
//!
//! Memory is bounded twice: a lane keeps at most `lane_buffer` records waiting, all lanes together
//! at most `max_buffered`. A record that would exceed a bound is not kept: the lane is *parked* at
//! that record's offset and drops every later record of its own (so its order cannot be broken),
//! while other lanes keep flowing. Once the lane has drained to half its bound (and the process
//! to three quarters of its own), it asks for a *rewind*: the consumer seeks the partition back to
//! the parked offset and the lane takes its records again from there. A paused lane sheds what it
//! holds the same way, so a paused queue waits in Kafka, not in memory. The offset tracker keeps
//! every parked record unfinished, so nothing is committed past it and nothing is lost.
//!
//! A deep backlog in one lane would make every rewind read the whole rest of the backlog again
//! (quadratic in its depth). So when a lane parks again *while re-reading* records read before,
//! the consumer jumps forward again ([`Lanes::fast_forward_target`]): everything between is
//! either finished, in memory, or parked by a lane that will rewind to it itself. Two kinds of
//! lanes rely on the pass going on, and then there is no jump (or a shorter one): a lane that was
//! taken back during this pass and is still catching up on its records below where reading had
//! stood, and a lane that asked for a rewind this pass was to serve (the jump stops at its
//! records). Each rewind then costs about one lane buffer of records, not the backlog.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::Notify;

/// A lane: a key within one partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LaneId {
    pub topic: String,
    pub partition: i32,
    pub key: String,
}

/// How a lane may run now (the handler's view of its queue or key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LanePolicy {
    /// Records of the lane running at most.
    pub parallelism: usize,
    /// Start nothing.
    pub paused: bool,
}

impl LanePolicy {
    /// No bound beyond the consumer's own.
    pub const UNLIMITED: LanePolicy = LanePolicy {
        parallelism: usize::MAX,
        paused: false,
    };
}

/// Seek `topic`/`partition` back to `offset` so a parked lane can take its records again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewind {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// What became of a pushed record.
#[derive(Debug)]
pub enum Pushed<T> {
    /// Waiting in its lane; `start_dispatcher` when the lane has no dispatcher running, with the
    /// lane's generation to give it.
    Queued {
        start_dispatcher: Option<u64>,
        notify: Arc<Notify>,
    },
    /// Not kept (the lane is parked): the item is handed back so its ticket can be released.
    Parked(T),
}

/// What a lane's dispatcher does next.
#[derive(Debug)]
pub enum Next<T> {
    /// Start this record (counted as running until [`Lanes::finished`]).
    Start { offset: i64, item: T },
    /// Nothing to start now: wait for the notify (a push, a finish, a policy change).
    Wait(Arc<Notify>),
    /// The lane is gone (empty, or its partition revoked): the dispatcher ends.
    Exit,
}

#[derive(Debug)]
struct Lane<T> {
    generation: u64,
    waiting: VecDeque<(i64, T)>,
    running: usize,
    /// Lowest offset of a record of this lane dropped from memory and not taken back yet.
    parked_from: Option<i64>,
    rewind_requested: bool,
    /// Taken back during a re-read and not yet past where reading had stood: it needs the pass to
    /// go on over all of its records read before.
    catching_up: bool,
    dispatching: bool,
    notify: Arc<Notify>,
}

/// The lanes of one consumer.
#[derive(Debug)]
pub struct Lanes<T> {
    lanes: HashMap<LaneId, Lane<T>>,
    /// Records waiting in all lanes.
    buffered: usize,
    lane_buffer: usize,
    max_buffered: usize,
    next_generation: u64,
}

/// Fraction of `max_buffered` below which parked lanes may rewind: numerator / denominator.
const REWIND_BELOW_NUM: usize = 3;
const REWIND_BELOW_DEN: usize = 4;

impl<T> Lanes<T> {
    pub fn new(lane_buffer: usize, max_buffered: usize) -> Self {
        Lanes {
            lanes: HashMap::new(),
            buffered: 0,
            lane_buffer: lane_buffer.max(1),
            max_buffered: max_buffered.max(1),
            next_generation: 0,
        }
    }

    /// Whether lane `id` holds records (waiting, running or parked).
    pub fn contains(&self, id: &LaneId) -> bool {
        self.lanes.contains_key(id)
    }

    /// Records waiting in all lanes.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    fn global_room_for_rewind(&self) -> bool {
        self.buffered * REWIND_BELOW_DEN <= self.max_buffered * REWIND_BELOW_NUM
    }

    /// Takes record `offset` of lane `id` (in offset order per lane), or parks it. `read_high` is
    /// one past the highest offset of the partition read so far (below it is a re-read).
    pub fn push(&mut self, id: &LaneId, offset: i64, item: T, read_high: i64) -> Pushed<T> {
        let full_globally = self.buffered >= self.max_buffered;
        let lane_buffer = self.lane_buffer;
        let generation = &mut self.next_generation;
        let lane = self.lanes.entry(id.clone()).or_insert_with(|| {
            *generation += 1;
            Lane {
                generation: *generation,
                waiting: VecDeque::new(),
                running: 0,
                parked_from: None,
                rewind_requested: false,
                catching_up: false,
                dispatching: false,
                notify: Arc::new(Notify::new()),
            }
        });
        if let Some(parked) = lane.parked_from {
            // Parked: only the first dropped record may come back (a rewind re-read it); every
            // later one waits for it, or order would break.
            if offset != parked || lane.waiting.len() >= lane_buffer || full_globally {
                if offset <= parked {
                    lane.parked_from = Some(offset);
                    lane.rewind_requested = false;
                }
                return Pushed::Parked(item);
            }
            lane.parked_from = None;
            lane.rewind_requested = false;
        } else if lane.waiting.len() >= lane_buffer || full_globally {
            lane.parked_from = Some(offset);
            lane.rewind_requested = false;
            lane.catching_up = false;
            return Pushed::Parked(item);
        }
        lane.catching_up = offset + 1 < read_high;
        lane.waiting.push_back((offset, item));
        self.buffered += 1;
        let start_dispatcher = (!lane.dispatching).then(|| {
            lane.dispatching = true;
            lane.generation
        });
        Pushed::Queued {
            start_dispatcher,
            notify: lane.notify.clone(),
        }
    }

    /// The dispatcher of lane `id` (of `generation`) asks what to do under `policy`. Returns what
    /// to do, the items shed because the lane is paused (to release), and a rewind to ask for.
    pub fn next(
        &mut self,
        id: &LaneId,
        generation: u64,
        policy: LanePolicy,
    ) -> (Next<T>, Vec<T>, Option<Rewind>) {
        let Some(lane) = self
            .lanes
            .get_mut(id)
            .filter(|l| l.generation == generation)
        else {
            return (Next::Exit, Vec::new(), None);
        };
        let mut shed = Vec::new();
        if policy.paused {
            if let Some((first, _)) = lane.waiting.front() {
                let first = *first;
                lane.parked_from = Some(lane.parked_from.map_or(first, |p| p.min(first)));
                lane.rewind_requested = false;
                self.buffered -= lane.waiting.len();
                shed = lane.waiting.drain(..).map(|(_, item)| item).collect();
            }
            let notify = lane.notify.clone();
            return (Next::Wait(notify), shed, None);
        }
        if lane.running < policy.parallelism {
            if let Some((offset, item)) = lane.waiting.pop_front() {
                lane.running += 1;
                self.buffered -= 1;
                let rewind = self.rewind_for(id);
                return (Next::Start { offset, item }, shed, rewind);
            }
        }
        if lane.waiting.is_empty() && lane.running == 0 {
            let rewind = self.rewind_for(id);
            let lane = self.lanes.get_mut(id).expect("present");
            if lane.parked_from.is_none() {
                self.lanes.remove(id);
            } else {
                lane.dispatching = false;
            }
            return (Next::Exit, shed, rewind);
        }
        let rewind = self.rewind_for(id);
        let notify = self.lanes[id].notify.clone();
        (Next::Wait(notify), shed, rewind)
    }

    /// A record the dispatcher took could not start after all (shutdown while it waited at the
    /// gate): it goes back to the front.
    pub fn unstart(&mut self, id: &LaneId, generation: u64, offset: i64, item: T) -> Option<T> {
        match self
            .lanes
            .get_mut(id)
            .filter(|l| l.generation == generation)
        {
            Some(lane) => {
                lane.running = lane.running.saturating_sub(1);
                lane.waiting.push_front((offset, item));
                self.buffered += 1;
                None
            }
            None => Some(item),
        }
    }

    /// A running record of lane `id` ended; wakes its dispatcher. Returns a rewind to ask for.
    pub fn finished(&mut self, id: &LaneId, generation: u64) -> Option<Rewind> {
        let lane = self
            .lanes
            .get_mut(id)
            .filter(|l| l.generation == generation)?;
        lane.running = lane.running.saturating_sub(1);
        lane.notify.notify_one();
        self.rewind_for(id)
    }

    /// A rewind for lane `id` if it is parked, has room again and has not asked yet.
    fn rewind_for(&mut self, id: &LaneId) -> Option<Rewind> {
        let global_room = self.global_room_for_rewind();
        let lane_buffer = self.lane_buffer;
        let lane = self.lanes.get_mut(id)?;
        let parked = lane.parked_from?;
        if lane.rewind_requested || !global_room || lane.waiting.len() * 2 > lane_buffer {
            return None;
        }
        lane.rewind_requested = true;
        Some(Rewind {
            topic: id.topic.clone(),
            partition: id.partition,
            offset: parked,
        })
    }

    /// Where the partition of `lane` may jump forward to after `lane` parked again at `offset`
    /// while re-reading below `read_high` (one past the highest offset read): `read_high`, or the
    /// lowest parked offset above `offset` of another lane of the partition that asked for a
    /// rewind (it relies on this pass to reach its records). `None`: no jump.
    pub fn fast_forward_target(&self, lane: &LaneId, offset: i64, read_high: i64) -> Option<i64> {
        if offset + 1 >= read_high {
            return None;
        }
        let someone_catching_up = self.lanes.iter().any(|(id, l)| {
            id != lane && id.topic == lane.topic && id.partition == lane.partition && l.catching_up
        });
        if someone_catching_up {
            return None;
        }
        let waiting_for_this_pass = self
            .lanes
            .iter()
            .filter(|(id, l)| {
                *id != lane
                    && id.topic == lane.topic
                    && id.partition == lane.partition
                    && l.rewind_requested
            })
            .filter_map(|(_, l)| l.parked_from)
            .filter(|p| *p > offset)
            .min();
        let target = waiting_for_this_pass.map_or(read_high, |p| p.min(read_high));
        (target > offset + 1).then_some(target)
    }

    /// Rewinds every parked lane may ask for now (after the process freed room).
    pub fn rewinds_due(&mut self) -> Vec<Rewind> {
        let ids: Vec<LaneId> = self
            .lanes
            .iter()
            .filter(|(_, l)| l.parked_from.is_some() && !l.rewind_requested)
            .map(|(id, _)| id.clone())
            .collect();
        ids.iter().filter_map(|id| self.rewind_for(id)).collect()
    }

    /// A rewind of `topic`/`partition` could not be done: its lanes may ask again.
    pub fn rewind_failed(&mut self, topic: &str, partition: i32) {
        for (id, lane) in &mut self.lanes {
            if id.topic == topic && id.partition == partition {
                lane.rewind_requested = false;
            }
        }
    }

    /// Wakes every dispatcher (policies changed).
    pub fn wake_all(&self) {
        for lane in self.lanes.values() {
            lane.notify.notify_one();
        }
    }

    /// The partition was revoked: its lanes go (their dispatchers exit); returns what waited.
    pub fn revoke(&mut self, topic: &str, partition: i32) -> Vec<T> {
        let ids: Vec<LaneId> = self
            .lanes
            .keys()
            .filter(|id| id.topic == topic && id.partition == partition)
            .cloned()
            .collect();
        let mut dropped = Vec::new();
        for id in ids {
            if let Some(lane) = self.lanes.remove(&id) {
                self.buffered -= lane.waiting.len();
                lane.notify.notify_one();
                dropped.extend(lane.waiting.into_iter().map(|(_, item)| item));
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(key: &str) -> LaneId {
        LaneId {
            topic: "ready".into(),
            partition: 0,
            key: key.into(),
        }
    }

    /// `read_high` for records read for the first time (nothing above them was read yet).
    const NEW: i64 = 0;

    const FIFO: LanePolicy = LanePolicy {
        parallelism: 1,
        paused: false,
    };

    fn queued<T: std::fmt::Debug>(p: Pushed<T>) -> Option<u64> {
        match p {
            Pushed::Queued {
                start_dispatcher, ..
            } => start_dispatcher,
            Pushed::Parked(item) => panic!("parked {item:?}"),
        }
    }

    fn started<T: std::fmt::Debug>(n: Next<T>) -> (i64, T) {
        match n {
            Next::Start { offset, item } => (offset, item),
            other => panic!("expected a start, got {other:?}"),
        }
    }

    #[test]
    fn one_at_a_time_in_offset_order() {
        let mut lanes = Lanes::new(10, 100);
        let q = id("q:a");
        let generation =
            queued(lanes.push(&q, 1, "m1", NEW)).expect("first push starts a dispatcher");
        assert_eq!(
            queued(lanes.push(&q, 3, "m3", NEW)),
            None,
            "dispatcher already running"
        );
        let (offset, item) = started(lanes.next(&q, generation, FIFO).0);
        assert_eq!((offset, item), (1, "m1"));
        assert!(
            matches!(lanes.next(&q, generation, FIFO).0, Next::Wait(_)),
            "m1 runs"
        );
        lanes.finished(&q, generation);
        assert_eq!(started(lanes.next(&q, generation, FIFO).0), (3, "m3"));
        lanes.finished(&q, generation);
        assert!(matches!(lanes.next(&q, generation, FIFO).0, Next::Exit));
        assert_eq!(lanes.buffered(), 0);
        // A new record starts a new dispatcher with a new generation.
        let again = queued(lanes.push(&q, 9, "m9", NEW)).unwrap();
        assert_ne!(again, generation);
        assert!(
            matches!(lanes.next(&q, generation, FIFO).0, Next::Exit),
            "stale dispatcher"
        );
    }

    #[test]
    fn parallelism_bounds_running_records() {
        let mut lanes = Lanes::new(10, 100);
        let q = id("q:b");
        let g = queued(lanes.push(&q, 0, 0, NEW)).unwrap();
        for o in 1..5 {
            lanes.push(&q, o, o, NEW);
        }
        let two = LanePolicy {
            parallelism: 2,
            paused: false,
        };
        started(lanes.next(&q, g, two).0);
        started(lanes.next(&q, g, two).0);
        assert!(matches!(lanes.next(&q, g, two).0, Next::Wait(_)));
        lanes.finished(&q, g);
        assert_eq!(started(lanes.next(&q, g, two).0).0, 2);
    }

    #[test]
    fn a_full_lane_parks_keeps_order_and_rewinds_once_drained() {
        let mut lanes = Lanes::new(4, 100);
        let q = id("q:c");
        let other = id("q:d");
        let g = queued(lanes.push(&q, 0, 0, NEW)).unwrap();
        for o in 1..4 {
            lanes.push(&q, o * 2, o * 2, NEW);
        }
        assert!(
            matches!(lanes.push(&q, 8, 8, NEW), Pushed::Parked(8)),
            "lane full"
        );
        assert!(
            matches!(lanes.push(&q, 10, 10, NEW), Pushed::Parked(10)),
            "later records of a parked lane are dropped too"
        );
        assert!(
            matches!(lanes.push(&other, 9, 9, NEW), Pushed::Queued { .. }),
            "other lanes keep flowing"
        );
        // Drain to half: the first start leaves 3 waiting (> 2): no rewind yet.
        let (_, rewind) = {
            let (n, _, r) = lanes.next(&q, g, FIFO);
            started(n);
            ((), r)
        };
        assert_eq!(rewind, None);
        lanes.finished(&q, g);
        let (n, _, rewind) = lanes.next(&q, g, FIFO);
        started(n);
        assert_eq!(
            rewind,
            Some(Rewind {
                topic: "ready".into(),
                partition: 0,
                offset: 8
            }),
            "2 waiting = half: rewind to the first parked record"
        );
        lanes.finished(&q, g);
        assert_eq!(lanes.next(&q, g, FIFO).2, None, "asked once");
        // The re-read: 10 before 8 would break order, so it is dropped; 8 is taken back.
        assert!(matches!(lanes.push(&q, 10, 10, NEW), Pushed::Parked(10)));
        assert!(matches!(lanes.push(&q, 8, 8, NEW), Pushed::Queued { .. }));
        assert!(matches!(lanes.push(&q, 10, 10, NEW), Pushed::Queued { .. }));
    }

    #[test]
    fn a_lane_parking_again_while_re_reading_jumps_forward_but_not_past_a_waiting_lane() {
        let mut lanes = Lanes::new(2, 100);
        let (a, b) = (id("q:a"), id("q:b"));
        lanes.push(&a, 10, 10, NEW);
        lanes.push(&a, 11, 11, NEW);
        assert!(matches!(lanes.push(&a, 12, 12, NEW), Pushed::Parked(_)));
        assert_eq!(
            lanes.fast_forward_target(&a, 12, 100),
            Some(100),
            "nothing else waits: jump to where reading stood"
        );
        assert_eq!(
            lanes.fast_forward_target(&a, 99, 100),
            None,
            "nothing to skip"
        );
        // b parked at 50 and asked for a rewind that this pass was to serve.
        let gb = match lanes.push(&b, 40, 40, NEW) {
            Pushed::Queued {
                start_dispatcher, ..
            } => start_dispatcher.unwrap(),
            p => panic!("{p:?}"),
        };
        lanes.push(&b, 41, 41, NEW);
        assert!(matches!(lanes.push(&b, 50, 50, NEW), Pushed::Parked(_)));
        let (n, _, rewind) = lanes.next(&b, gb, FIFO);
        started(n);
        assert_eq!(rewind.map(|r| r.offset), Some(50), "b has room: it asks");
        assert_eq!(
            lanes.fast_forward_target(&a, 12, 100),
            Some(50),
            "stop where the other lane's records start"
        );
        assert_eq!(lanes.fast_forward_target(&a, 60, 100), Some(100));

        // c is taken back during the re-read (its record 20, below where reading stood at 100):
        // its later records of the last pass are still ahead, so nobody jumps past them.
        let c = id("q:c");
        lanes.push(&c, 15, 15, NEW);
        lanes.push(&c, 16, 16, NEW);
        assert!(matches!(lanes.push(&c, 20, 20, NEW), Pushed::Parked(_)));
        let gc = lanes.lanes[&c].generation;
        let (first, _, _) = lanes.next(&c, gc, FIFO);
        lanes.finished(&c, gc);
        let (second, _, _) = lanes.next(&c, gc, FIFO);
        assert_eq!((started(first).0, started(second).0), (15, 16));
        assert!(matches!(lanes.push(&c, 20, 20, 100), Pushed::Queued { .. }));
        assert_eq!(
            lanes.fast_forward_target(&a, 60, 100),
            None,
            "c catches up on this pass"
        );
        assert!(matches!(
            lanes.push(&c, 100, 100, 101),
            Pushed::Queued { .. }
        ));
        assert_eq!(
            lanes.fast_forward_target(&a, 60, 101),
            Some(101),
            "c has caught up"
        );
    }

    #[test]
    fn a_paused_lane_sheds_its_records_and_rewinds_when_resumed() {
        let mut lanes = Lanes::new(10, 100);
        let q = id("q:e");
        let g = queued(lanes.push(&q, 5, 5, NEW)).unwrap();
        lanes.push(&q, 7, 7, NEW);
        let paused = LanePolicy {
            parallelism: 1,
            paused: true,
        };
        let (next, shed, rewind) = lanes.next(&q, g, paused);
        assert!(matches!(next, Next::Wait(_)));
        assert_eq!(shed, vec![5, 7]);
        assert_eq!(rewind, None);
        assert_eq!(lanes.buffered(), 0);
        assert!(
            matches!(lanes.push(&q, 9, 9, NEW), Pushed::Parked(9)),
            "parked while paused"
        );
        let (next, _, rewind) = lanes.next(&q, g, FIFO);
        assert!(
            matches!(next, Next::Exit),
            "nothing held; the dispatcher rests"
        );
        assert_eq!(
            rewind.map(|r| r.offset),
            Some(5),
            "resume starts with the oldest"
        );
        assert!(matches!(
            lanes.push(&q, 5, 5, NEW),
            Pushed::Queued {
                start_dispatcher: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn the_global_bound_parks_and_rewinds_below_three_quarters() {
        let mut lanes = Lanes::new(10, 4);
        let g: Vec<u64> = (0..4)
            .map(|o| queued(lanes.push(&id(&format!("k{o}")), o, o, NEW)).unwrap())
            .collect();
        let late = id("k9");
        assert!(matches!(lanes.push(&late, 9, 9, NEW), Pushed::Parked(9)));
        assert!(lanes.rewinds_due().is_empty(), "4 of 4 buffered");
        let (n, _, _) = lanes.next(&id("k0"), g[0], FIFO);
        started(n);
        let due = lanes.rewinds_due();
        assert_eq!(due.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![9]);
        assert!(lanes.rewinds_due().is_empty(), "asked once");
    }

    #[test]
    fn revoking_a_partition_drops_its_lanes() {
        let mut lanes = Lanes::new(10, 100);
        let q = id("q:f");
        let g = queued(lanes.push(&q, 1, 1, NEW)).unwrap();
        lanes.push(&q, 2, 2, NEW);
        started(lanes.next(&q, g, FIFO).0);
        assert_eq!(lanes.revoke("ready", 0), vec![2]);
        assert_eq!(lanes.buffered(), 0);
        assert_eq!(
            lanes.finished(&q, g),
            None,
            "the running record's lane is gone"
        );
        assert!(matches!(lanes.next(&q, g, FIFO).0, Next::Exit));
    }
}
