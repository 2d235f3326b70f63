//! The per-destination bound and circuit breaker: one slow or failing destination must not take
//! every delivery slot of a process.
//!
//! Design choice: a destination (`host[:port]`, read off the record's `kstash-destination`
//! header, no decoding) is one more kind of lane (`docs/architecture.md`, "Lanes"). A message with
//! no queue and no flow-control key starts at once when its destination has a free slot (the fast
//! path, no lane at all); when the destination is at its bound, or its breaker is not closed, the
//! message waits in the lane `d:<destination>` of its partition, whose dispatcher waits for a slot
//! (the lane's *gate*). So a hanging destination holds at most `delivery.max_in_flight_per_host`
//! slots and a lane buffer per partition in memory; beyond that its records are parked in Kafka
//! and read again later, while every other destination keeps flowing. Queued and flow-controlled
//! messages take the same slot in their lane's gate.
//!
//! The breaker counts consecutive failed attempts per destination (no response — timeouts,
//! connection errors — or a 5xx/429 answer; any other answer proves the destination is there).
//! After `delivery.breaker_failures` of them it *opens*: no attempt starts for
//! `delivery.breaker_open`, its lanes are paused (their records wait in Kafka, not in memory,
//! and spend no retries). Then one trial attempt is let through (*half-open*): its success closes
//! the breaker, its failure opens it again. The registry is a `dashmap` of destinations, each a
//! `tokio` semaphore and a [`Breaker`] (plain state, unit-tested).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::http::Outcome;
use crate::model::now_ms;

/// Prefix of the lane of a destination's messages that wait for a slot.
pub const DESTINATION_LANE_PREFIX: &str = "d:";
/// A waiting acquire looks at its destination's breaker again at least this often.
const RECHECK: Duration = Duration::from_secs(1);
/// A destination with nothing in flight and a closed breaker for this long is dropped by
/// [`Destinations::sweep`].
const IDLE_GRACE: Duration = Duration::from_secs(60);
/// Statuses that count as a failure of the destination itself (besides no answer at all).
const TOO_MANY_REQUESTS: u16 = 429;
const SERVER_ERRORS: std::ops::RangeInclusive<u16> = 500..=599;

/// The configured bound and breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestinationLimits {
    /// Attempts in flight per destination.
    pub max_in_flight: usize,
    /// Consecutive failed attempts that open the breaker; 0 turns the breaker off.
    pub breaker_failures: u32,
    /// How long an open breaker stops attempts before one trial.
    pub breaker_open: Duration,
}

/// A destination's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    /// Attempts go; `failures` in a row so far.
    Closed { failures: u32 },
    /// No attempt starts before `until` (unix ms).
    Open { until: i64 },
    /// One trial attempt decides; `trial` once it was handed out.
    HalfOpen { trial: bool },
}

/// What the breaker says to an attempt that wants to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Go,
    /// Go as the half-open breaker's trial.
    Trial,
    /// Wait until this unix time (ms).
    WaitUntil(i64),
    /// Wait for the trial in flight to decide.
    WaitForTrial,
}

impl Breaker {
    pub const CLOSED: Breaker = Breaker::Closed { failures: 0 };

    /// Whether an attempt may start at `now`; hands out the trial when half-open.
    pub fn admit(&mut self, now: i64) -> Admit {
        match *self {
            Breaker::Closed { .. } => Admit::Go,
            Breaker::Open { until } if now < until => Admit::WaitUntil(until),
            Breaker::Open { .. } | Breaker::HalfOpen { trial: false } => {
                *self = Breaker::HalfOpen { trial: true };
                Admit::Trial
            }
            Breaker::HalfOpen { trial: true } => Admit::WaitForTrial,
        }
    }

    /// Whether no attempt may start at `now` for a while (the breaker is open): the
    /// destination's lanes are paused.
    pub fn is_open(&self, now: i64) -> bool {
        matches!(*self, Breaker::Open { until } if now < until)
    }

    /// An attempt ended; returns true when this opened the breaker.
    pub fn record(&mut self, failed: bool, now: i64, limits: &DestinationLimits) -> bool {
        if limits.breaker_failures == 0 {
            return false;
        }
        let open_until =
            now.saturating_add(i64::try_from(limits.breaker_open.as_millis()).unwrap_or(i64::MAX));
        match (*self, failed) {
            (_, false) => {
                *self = Breaker::CLOSED;
                false
            }
            (Breaker::Closed { failures }, true) => {
                let failures = failures.saturating_add(1);
                if failures >= limits.breaker_failures {
                    *self = Breaker::Open { until: open_until };
                    true
                } else {
                    *self = Breaker::Closed { failures };
                    false
                }
            }
            (Breaker::HalfOpen { .. }, true) => {
                *self = Breaker::Open { until: open_until };
                true
            }
            // An attempt started before the breaker opened: it changes nothing.
            (Breaker::Open { .. }, true) => false,
        }
    }

    /// The trial ended without an attempt (the message was cancelled or finished already):
    /// another one may be tried.
    pub fn trial_abandoned(&mut self) {
        if *self == (Breaker::HalfOpen { trial: true }) {
            *self = Breaker::HalfOpen { trial: false };
        }
    }
}

/// Whether an attempt's outcome counts against its destination.
pub fn is_failure(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Delivered(_) => false,
        Outcome::Failed(r) => r.status == TOO_MANY_REQUESTS || SERVER_ERRORS.contains(&r.status),
        Outcome::Error(_) => true,
    }
}

/// One destination: its slots and its breaker.
struct Destination {
    slots: Arc<Semaphore>,
    breaker: Mutex<Breaker>,
    /// Notified when the breaker changes.
    changed: Notify,
    last_used: Mutex<Instant>,
}

impl Destination {
    fn breaker(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }
}

/// Held while an attempt runs: a slot of its destination (and the breaker's trial, if it is one).
pub struct DestinationPermit {
    _slot: OwnedSemaphorePermit,
    destination: Arc<Destination>,
    trial: bool,
}

impl Drop for DestinationPermit {
    fn drop(&mut self) {
        self.destination.touch();
        if self.trial {
            self.destination.breaker().trial_abandoned();
            self.destination.changed.notify_waiters();
        }
    }
}

/// The destinations of one process.
pub struct Destinations {
    destinations: DashMap<String, Arc<Destination>>,
    limits: DestinationLimits,
}

impl Destinations {
    pub fn new(limits: DestinationLimits) -> Self {
        Destinations {
            destinations: DashMap::new(),
            limits,
        }
    }

    fn get(&self, name: &str) -> Arc<Destination> {
        if let Some(d) = self.destinations.get(name) {
            return d.clone();
        }
        self.destinations
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Destination {
                    slots: Arc::new(Semaphore::new(self.limits.max_in_flight)),
                    breaker: Mutex::new(Breaker::CLOSED),
                    changed: Notify::new(),
                    last_used: Mutex::new(Instant::now()),
                })
            })
            .clone()
    }

    /// A slot of `name` if one is free now and its breaker is closed (the fast path); `None`
    /// sends the message to the destination's lane. A semaphore with waiters has no free
    /// permits, so messages that waited in a lane are served first.
    pub fn try_acquire(&self, name: &str) -> Option<DestinationPermit> {
        let destination = self.get(name);
        if !matches!(*destination.breaker(), Breaker::Closed { .. }) {
            return None;
        }
        let slot = destination.slots.clone().try_acquire_owned().ok()?;
        Some(DestinationPermit {
            _slot: slot,
            destination,
            trial: false,
        })
    }

    /// Waits for a slot of `name` that its breaker lets go.
    pub async fn acquire(&self, name: &str) -> DestinationPermit {
        let destination = self.get(name);
        loop {
            let changed = destination.changed.notified();
            let admit = destination.breaker().admit(now_ms());
            match admit {
                Admit::Go | Admit::Trial => {
                    let Ok(slot) = destination.slots.clone().acquire_owned().await else {
                        unreachable!("destination semaphores are never closed")
                    };
                    let permit = DestinationPermit {
                        _slot: slot,
                        destination: destination.clone(),
                        trial: admit == Admit::Trial,
                    };
                    // The breaker may have opened while this waited for a slot.
                    if admit == Admit::Trial
                        || matches!(*destination.breaker(), Breaker::Closed { .. })
                    {
                        return permit;
                    }
                }
                Admit::WaitUntil(until) => {
                    let wait = Duration::from_millis(u64::try_from(until - now_ms()).unwrap_or(0));
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep(wait.min(RECHECK)) => {}
                    }
                }
                Admit::WaitForTrial => {
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep(RECHECK) => {}
                    }
                }
            }
        }
    }

    /// Whether `name`'s breaker is open now (its lanes are paused).
    pub fn is_open(&self, name: &str) -> bool {
        self.destinations
            .get(name)
            .is_some_and(|d| d.breaker().is_open(now_ms()))
    }

    /// Records the outcome of an attempt to `name` for its breaker.
    pub fn record(&self, name: &str, outcome: &Outcome) {
        let destination = self.get(name);
        let opened = destination
            .breaker()
            .record(is_failure(outcome), now_ms(), &self.limits);
        if opened {
            tracing::warn!(
                destination = name,
                open_for = ?self.limits.breaker_open,
                "destination keeps failing; circuit breaker open: its messages wait in Kafka"
            );
        }
        destination.changed.notify_waiters();
    }

    /// Drops destinations idle (nothing in flight, breaker closed) for a while; returns how many.
    pub fn sweep(&self) -> usize {
        let before = self.destinations.len();
        let max = self.limits.max_in_flight;
        self.destinations.retain(|_, d| {
            Arc::strong_count(d) > 1
                || d.slots.available_permits() < max
                || !matches!(*d.breaker(), Breaker::Closed { failures: 0 })
                || d.last_used
                    .lock()
                    .map_or(true, |t| t.elapsed() < IDLE_GRACE)
        });
        before - self.destinations.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::http::Response;

    const LIMITS: DestinationLimits = DestinationLimits {
        max_in_flight: 2,
        breaker_failures: 3,
        breaker_open: Duration::from_secs(10),
    };

    fn status(status: u16) -> Outcome {
        Outcome::Failed(Response {
            status,
            header: Default::default(),
            body: vec![],
        })
    }

    #[test]
    fn the_breaker_opens_after_consecutive_failures_and_a_trial_decides() {
        let mut b = Breaker::CLOSED;
        assert!(!b.record(true, 0, &LIMITS));
        assert!(!b.record(true, 0, &LIMITS));
        assert!(!b.record(false, 0, &LIMITS), "a success resets the count");
        assert!(!b.record(true, 0, &LIMITS));
        assert!(!b.record(true, 0, &LIMITS));
        assert!(
            b.record(true, 1_000, &LIMITS),
            "the third failure in a row opens it"
        );
        assert!(b.is_open(5_000));
        assert_eq!(b.admit(5_000), Admit::WaitUntil(11_000));
        assert!(!b.is_open(11_000));
        assert_eq!(b.admit(11_000), Admit::Trial);
        assert_eq!(b.admit(11_001), Admit::WaitForTrial, "one trial at a time");
        assert!(
            b.record(true, 12_000, &LIMITS),
            "a failed trial opens it again"
        );
        assert_eq!(b.admit(12_001), Admit::WaitUntil(22_000));
        assert_eq!(b.admit(22_000), Admit::Trial);
        assert!(!b.record(false, 22_500, &LIMITS));
        assert_eq!(b, Breaker::CLOSED, "a successful trial closes it");
        assert_eq!(b.admit(22_501), Admit::Go);
    }

    #[test]
    fn an_abandoned_trial_lets_another_one_go_and_an_off_breaker_never_opens() {
        let mut b = Breaker::Open { until: 0 };
        assert_eq!(b.admit(1), Admit::Trial);
        b.trial_abandoned();
        assert_eq!(b.admit(2), Admit::Trial);
        let off = DestinationLimits {
            breaker_failures: 0,
            ..LIMITS
        };
        let mut b = Breaker::CLOSED;
        for _ in 0..100 {
            assert!(!b.record(true, 0, &off));
        }
        assert_eq!(b.admit(0), Admit::Go);
    }

    #[test]
    fn failures_are_no_answer_server_errors_and_429() {
        assert!(is_failure(&Outcome::Error("timed out".into())));
        assert!(is_failure(&status(500)));
        assert!(is_failure(&status(503)));
        assert!(is_failure(&status(429)));
        assert!(!is_failure(&status(404)), "the destination answered");
        assert!(!is_failure(&status(400)));
    }

    #[tokio::test]
    async fn a_destination_gives_out_at_most_its_bound_and_its_lane_goes_first() {
        let d = Destinations::new(LIMITS);
        let a = d.try_acquire("a").expect("a free slot");
        let _b = d.try_acquire("a").expect("a second free slot");
        assert!(d.try_acquire("a").is_none(), "at the bound: the lane");
        assert!(
            d.try_acquire("other").is_some(),
            "other destinations are not affected"
        );
        // A waiter (the lane's dispatcher) gets the next free slot, not a later fast path.
        let d = Arc::new(d);
        let waiter = tokio::spawn({
            let d = d.clone();
            async move { d.acquire("a").await }
        });
        tokio::task::yield_now().await;
        drop(a);
        let _lane = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter gets the slot")
            .unwrap();
        assert!(d.try_acquire("a").is_none());
    }

    #[tokio::test]
    async fn an_open_breaker_sends_every_message_to_the_lane() {
        let d = Destinations::new(LIMITS);
        for _ in 0..3 {
            d.record("a", &Outcome::Error("timed out".into()));
        }
        assert!(d.is_open("a"));
        assert!(d.try_acquire("a").is_none());
        assert!(!d.is_open("b"));
    }
}
