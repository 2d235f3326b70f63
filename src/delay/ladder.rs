//! The delay ladder as pure arithmetic: which topic a message due later goes to, and when the
//! delay stage has to look at a record again.
//!
//! Steps are `0` followed by the configured buckets (1s 5s 30s 2m 10m 1h 6h 1d by default); each
//! step is a topic `<prefix>delay.<step>`. A message with `remaining` time to wait goes to the
//! largest step ≤ `remaining` and carries a *hop due* time = now + step. Step 0 (for waits shorter
//! than the smallest bucket) is due at once.
//!
//! The delay stage looks at a record at its *wake* time `min(hop_due, not_before − hold)`, where
//! `hold` is the smallest bucket: from there on the last stretch is held in memory, so delivery is
//! on time to the millisecond. Within one step's partition, hop-due times grow with append order,
//! and a record's wake time is never after the not-before of any record appended behind it
//! (`wake₁ ≤ hop_due₁ ≤ hop_due₂ ≤ not_before₂`), so pausing a partition until its head wakes can
//! never make a later record late, and nothing is ever early: the final hand-over to `ready`
//! happens at `not_before` or later.

use std::time::Duration;

use crate::model::short_duration;

/// Where a message goes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Due: the ready topic.
    Ready,
    /// The delay topic of step `step`, to be looked at again at `hop_due_ms`.
    Delay { step: usize, hop_due_ms: i64 },
}

/// The configured ladder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ladder {
    /// `0` then the buckets, ascending.
    steps: Vec<Duration>,
}

impl Ladder {
    /// `buckets` must be non-empty, positive and strictly ascending.
    pub fn new(buckets: &[Duration]) -> Result<Self, String> {
        if buckets.is_empty() {
            return Err("delay.buckets must not be empty".into());
        }
        if buckets[0].is_zero() {
            return Err("delay.buckets must be positive".into());
        }
        if buckets.windows(2).any(|w| w[0] >= w[1]) {
            return Err("delay.buckets must be strictly ascending".into());
        }
        let mut steps = vec![Duration::ZERO];
        steps.extend_from_slice(buckets);
        Ok(Ladder { steps })
    }

    /// How long before its due time a message is taken into memory: the smallest bucket.
    pub fn hold(&self) -> Duration {
        self.steps[1]
    }

    /// Number of steps (delay topics).
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Always false: a ladder has at least step 0 and one bucket.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Topic-name suffixes of the steps, e.g. `delay.0s`, `delay.1s`, `delay.2m`.
    pub fn topic_suffixes(&self) -> Vec<String> {
        self.steps
            .iter()
            .map(|s| format!("delay.{}", short_duration(*s)))
            .collect()
    }

    /// Where a message due at `not_before_ms` goes at `now_ms`.
    pub fn route(&self, not_before_ms: i64, now_ms: i64) -> Hop {
        let remaining = not_before_ms.saturating_sub(now_ms);
        if remaining <= 0 {
            return Hop::Ready;
        }
        let remaining = Duration::from_millis(u64::try_from(remaining).unwrap_or(u64::MAX));
        let step = self
            .steps
            .iter()
            .rposition(|s| *s <= remaining)
            .unwrap_or(0);
        Hop::Delay {
            step,
            hop_due_ms: now_ms.saturating_add(millis(self.steps[step])),
        }
    }

    /// When a record with these times must be looked at again.
    pub fn wake_ms(&self, not_before_ms: i64, hop_due_ms: i64) -> i64 {
        hop_due_ms.min(not_before_ms.saturating_sub(millis(self.hold())))
    }

    /// Whether the rest of the wait is short enough to hold in memory.
    pub fn in_last_stretch(&self, not_before_ms: i64, now_ms: i64) -> bool {
        not_before_ms.saturating_sub(now_ms) <= millis(self.hold())
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn default_ladder() -> Ladder {
        let s = |n| Duration::from_secs(n);
        Ladder::new(&[
            s(1),
            s(5),
            s(30),
            s(120),
            s(600),
            s(3600),
            s(21600),
            s(86400),
        ])
        .unwrap()
    }

    #[test]
    fn topics_are_named_by_step() {
        assert_eq!(
            default_ladder().topic_suffixes(),
            vec![
                "delay.0s",
                "delay.1s",
                "delay.5s",
                "delay.30s",
                "delay.2m",
                "delay.10m",
                "delay.1h",
                "delay.6h",
                "delay.1d"
            ]
        );
        assert_eq!(short_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(short_duration(Duration::from_secs(365 * 86400)), "365d");
    }

    #[test]
    fn routes_to_the_largest_step_not_above_the_remaining_time() {
        let l = default_ladder();
        assert_eq!(l.route(1000, 1000), Hop::Ready);
        assert_eq!(l.route(900, 1000), Hop::Ready);
        assert_eq!(
            l.route(1500, 1000),
            Hop::Delay {
                step: 0,
                hop_due_ms: 1000
            }
        );
        assert_eq!(
            l.route(1000 + 7_000, 1000),
            Hop::Delay {
                step: 2,
                hop_due_ms: 6000
            }
        );
        let year = 365 * 86_400_000;
        assert_eq!(
            l.route(year, 0),
            Hop::Delay {
                step: 8,
                hop_due_ms: 86_400_000
            }
        );
    }

    #[test]
    fn invalid_buckets_are_refused() {
        assert!(Ladder::new(&[]).is_err());
        assert!(Ladder::new(&[Duration::ZERO]).is_err());
        assert!(Ladder::new(&[Duration::from_secs(5), Duration::from_secs(1)]).is_err());
    }

    proptest! {
        /// Following the ladder from any start never reaches `ready` early, and wakes are never
        /// after the due time.
        #[test]
        fn hopping_is_never_early_and_terminates(start in 0i64..1_000_000, wait in 0i64..400_000_000) {
            let l = default_ladder();
            let not_before = start + wait;
            let mut now = start;
            let mut hops = 0;
            loop {
                match l.route(not_before, now) {
                    Hop::Ready => { prop_assert!(now >= not_before); break; }
                    Hop::Delay { hop_due_ms, .. } => {
                        prop_assert!(hop_due_ms <= not_before, "hop due after not-before");
                        let wake = l.wake_ms(not_before, hop_due_ms);
                        prop_assert!(wake <= not_before);
                        now = now.max(wake);
                        if l.in_last_stretch(not_before, now) {
                            now = not_before; // held in memory until due
                        }
                    }
                }
                hops += 1;
                prop_assert!(hops < 10_000);
            }
        }

        /// Records appended to one step in time order wake no later than any later record is due.
        #[test]
        fn a_paused_head_never_delays_a_later_record(p1 in 0i64..1_000_000, gap in 0i64..100_000, w1 in 0i64..200_000_000, w2 in 0i64..200_000_000) {
            let l = default_ladder();
            let p2 = p1 + gap;
            let (nb1, nb2) = (p1 + w1, p2 + w2);
            if let (Hop::Delay { step: s1, hop_due_ms: h1 }, Hop::Delay { step: s2, hop_due_ms: h2 }) = (l.route(nb1, p1), l.route(nb2, p2)) {
                if s1 == s2 {
                    let _ = h2;
                    prop_assert!(l.wake_ms(nb1, h1) <= nb2);
                }
            }
        }
    }
}
