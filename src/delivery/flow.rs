//! Flow-control limits as enforced by the owner of a key: at most `parallelism` attempts in
//! flight and at most `rate` attempt starts per `period`, per flow-control key.
//!
//! Design choice: records are keyed by their flow-control key, so one partition (one consumer)
//! owns each key, and the limits are enforced locally with no coordination: a concurrent registry
//! (`dashmap`) of per-key limiters, each a parallelism counter and a `governor` rate limiter.
//! Excess waits in the key's lane; nothing is rejected or dropped.
//!
//! The rate is a GCRA (`governor`) with one start every `period / rate`, and a burst allowance of
//! [`BURST_WINDOW`] worth of starts (at least one) so timer jitter does not lower the achieved
//! rate. In any window of one period there are thus at most `rate` starts plus that small burst.
//! The values in force are the newest message's, except where the key is pinned (then the pinned
//! values, from the flow-control view). A reset (`resetRate`, or a pin) starts a fresh limiter.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{watch, Notify};

use crate::model::flow::{FlowControl, FlowControlRecord};

/// The rate limiter's burst covers this much time worth of starts (at least one start).
pub const BURST_WINDOW: Duration = Duration::from_millis(10);
/// A waiting acquire looks at its key's settings again at least this often.
const RECHECK: Duration = Duration::from_secs(1);
/// A limiter idle (nothing held) for longer than its period plus this is dropped by [`FlowLimiters::sweep`].
const IDLE_GRACE: Duration = Duration::from_secs(60);

/// The rate part of the values in force, and what its limiter was built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RateConfig {
    rate: u32,
    period_ms: u64,
    reset_at: Option<i64>,
}

struct Inner {
    parallelism: Option<u32>,
    running: u32,
    rate: Option<RateConfig>,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    last_used: Instant,
}

/// The limits of one key.
pub struct FlowLimiter {
    inner: Mutex<Inner>,
    freed: Notify,
}

/// Held while an attempt runs; frees its parallelism slot when dropped.
pub struct FlowPermit {
    limiter: Arc<FlowLimiter>,
}

impl Drop for FlowPermit {
    fn drop(&mut self) {
        let mut inner = self.limiter.lock();
        inner.running = inner.running.saturating_sub(1);
        inner.last_used = Instant::now();
        drop(inner);
        self.limiter.freed.notify_waiters();
    }
}

/// A GCRA quota of `rate` per `period`, or `None` when the values make no limit.
fn quota(rate: u32, period: Duration) -> Option<Quota> {
    let rate_nz = NonZeroU32::new(rate)?;
    let interval = period.checked_div(rate)?.max(Duration::from_nanos(1));
    let burst_starts = BURST_WINDOW.as_nanos() * u128::from(rate) / period.as_nanos().max(1);
    let burst = NonZeroU32::new(
        u32::try_from(burst_starts)
            .unwrap_or(u32::MAX)
            .clamp(1, rate_nz.get()),
    )?;
    Some(Quota::with_period(interval)?.allow_burst(burst))
}

impl FlowLimiter {
    fn new() -> Self {
        FlowLimiter {
            inner: Mutex::new(Inner {
                parallelism: None,
                running: 0,
                rate: None,
                limiter: None,
                last_used: Instant::now(),
            }),
            freed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the limits in line with `values` (already resolved against pins) and a rate reset.
    fn configure(&self, values: &FlowControl, reset_at: Option<i64>) {
        let mut inner = self.lock();
        if inner.parallelism != values.parallelism {
            inner.parallelism = values.parallelism;
            self.freed.notify_waiters();
        }
        let rate = values.rate.map(|rate| RateConfig {
            rate,
            period_ms: values.period_ms,
            reset_at,
        });
        if inner.rate != rate {
            inner.limiter = rate.and_then(|r| {
                quota(r.rate, Duration::from_millis(r.period_ms))
                    .map(|q| Arc::new(RateLimiter::direct(q)))
            });
            inner.rate = rate;
        }
    }

    /// Waits for a parallelism slot (and for the key not to be paused), then for the rate.
    /// `configure` brings the limits in line with the key's current settings; it is called again
    /// whenever they change while this start waits, so a pin or a rate reset applies to a message
    /// already waiting, not only to later ones.
    async fn acquire(
        self: Arc<Self>,
        paused: impl Fn() -> bool,
        configure: impl Fn(&FlowLimiter),
        mut changes: watch::Receiver<u64>,
    ) -> FlowPermit {
        configure(&self);
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut inner = self.lock();
                let room = inner.parallelism.is_none_or(|p| inner.running < p);
                if room && !paused() {
                    inner.running += 1;
                    inner.last_used = Instant::now();
                    break;
                }
            }
            tokio::select! {
                _ = &mut freed => {}
                _ = changes.changed() => configure(&self),
                _ = tokio::time::sleep(RECHECK) => configure(&self),
            }
        }
        let permit = FlowPermit {
            limiter: self.clone(),
        };
        // `until_ready` takes a start only when it resolves, so giving up on it (to wait on a
        // replaced limiter instead) costs nothing.
        loop {
            let Some(limiter) = self.lock().limiter.clone() else {
                break;
            };
            tokio::select! {
                _ = limiter.until_ready() => break,
                _ = changes.changed() => configure(&self),
            }
        }
        permit
    }

    fn idle_for(&self, period_grace: Duration) -> bool {
        let inner = self.lock();
        let period = inner
            .rate
            .map_or(Duration::ZERO, |r| Duration::from_millis(r.period_ms));
        inner.running == 0 && inner.last_used.elapsed() > period + period_grace
    }
}

/// Every key's limiter, owned by the delivery stage of one process.
pub struct FlowLimiters {
    limiters: DashMap<String, Arc<FlowLimiter>>,
}

impl Default for FlowLimiters {
    fn default() -> Self {
        FlowLimiters {
            limiters: DashMap::new(),
        }
    }
}

impl FlowLimiters {
    /// Waits until an attempt of a message with `values` may start: the key not paused, a
    /// parallelism slot free, the rate allowing it. The values in force are `values` resolved
    /// against the key's pins in `settings`.
    pub async fn acquire(
        &self,
        values: &FlowControl,
        settings: impl Fn() -> Option<FlowControlRecord>,
        changes: watch::Receiver<u64>,
    ) -> FlowPermit {
        let limiter = self
            .limiters
            .entry(values.key.clone())
            .or_insert_with(|| Arc::new(FlowLimiter::new()))
            .clone();
        let configure = |l: &FlowLimiter| {
            let current = settings();
            let effective = current
                .as_ref()
                .map_or_else(|| values.clone(), |s| s.effective(values));
            l.configure(&effective, current.as_ref().and_then(|s| s.rate_reset_at));
        };
        let paused = || settings().is_some_and(|s| s.paused);
        limiter.acquire(paused, configure, changes).await
    }

    /// Drops limiters of keys idle for longer than their period (their rate state has fully
    /// recovered by then), so the registry does not grow with every key ever seen.
    pub fn sweep(&self) -> usize {
        let before = self.limiters.len();
        self.limiters
            .retain(|_, l| Arc::strong_count(l) > 1 || !l.idle_for(IDLE_GRACE));
        before - self.limiters.len()
    }

    /// Keys with a limiter.
    pub fn len(&self) -> usize {
        self.limiters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiters.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(parallelism: Option<u32>, rate: Option<u32>, period_ms: u64) -> FlowControl {
        FlowControl {
            key: "k".into(),
            parallelism,
            rate,
            period_ms,
        }
    }

    #[test]
    fn the_quota_spaces_starts_with_a_small_burst() {
        let q = quota(100, Duration::from_secs(1)).unwrap();
        assert_eq!(q.replenish_interval(), Duration::from_millis(10));
        assert_eq!(q.burst_size().get(), 1);
        let q = quota(10_000, Duration::from_secs(1)).unwrap();
        assert_eq!(q.burst_size().get(), 100, "10 ms worth of starts");
        let q = quota(10, Duration::from_secs(86_400)).unwrap();
        assert_eq!(q.burst_size().get(), 1);
        assert!(quota(0, Duration::from_secs(1)).is_none());
    }

    #[tokio::test]
    async fn parallelism_bounds_permits_and_a_drop_frees_one() {
        let limiters = FlowLimiters::default();
        let (_tx, rx) = watch::channel(0);
        let v = values(Some(2), None, 1000);
        let a = limiters.acquire(&v, || None, rx.clone()).await;
        let _b = limiters.acquire(&v, || None, rx.clone()).await;
        let third = limiters.acquire(&v, || None, rx.clone());
        tokio::pin!(third);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut third)
                .await
                .is_err(),
            "a third attempt waits"
        );
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("a freed slot lets it start");
    }

    #[tokio::test]
    async fn a_paused_key_waits_and_pinned_values_win() {
        let limiters = FlowLimiters::default();
        let (tx, rx) = watch::channel(0);
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let mut record = crate::model::flow::sample_record();
        record.pinned_parallelism = true;
        record.parallelism = Some(1);
        record.rate = None;
        record.rate_reset_at = None;
        let settings = {
            let paused = paused.clone();
            move || {
                let mut r = record.clone();
                r.paused = paused.load(std::sync::atomic::Ordering::SeqCst);
                Some(r)
            }
        };
        let v = values(Some(5), None, 1000);
        let first = limiters.acquire(&v, settings.clone(), rx.clone());
        tokio::pin!(first);
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut first)
            .await
            .is_err());
        paused.store(false, std::sync::atomic::Ordering::SeqCst);
        tx.send(1).unwrap();
        let _held = tokio::time::timeout(Duration::from_secs(5), first)
            .await
            .expect("resumed");
        let second = limiters.acquire(&v, settings, rx);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), second)
                .await
                .is_err(),
            "the pinned parallelism 1 holds, not the message's 5"
        );
    }

    #[tokio::test]
    async fn a_rate_reset_releases_a_start_already_waiting() {
        let limiters = Arc::new(FlowLimiters::default());
        let (tx, rx) = watch::channel(0);
        let reset_at = Arc::new(std::sync::Mutex::new(None::<i64>));
        let settings = {
            let reset_at = reset_at.clone();
            move || {
                let mut r = crate::model::flow::sample_record();
                (r.pinned_parallelism, r.paused, r.parallelism) = (false, false, None);
                r.rate_reset_at = *reset_at.lock().unwrap();
                Some(r)
            }
        };
        let v = values(None, Some(1), 60_000);
        drop(limiters.acquire(&v, settings.clone(), rx.clone()).await);
        let waiting = {
            let (limiters, v, settings, rx) =
                (limiters.clone(), v.clone(), settings.clone(), rx.clone());
            tokio::spawn(async move { drop(limiters.acquire(&v, settings, rx).await) })
        };
        assert!(
            tokio::time::timeout(Duration::from_millis(100), async {
                while !waiting.is_finished() {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .is_err(),
            "one start per minute: the second waits"
        );
        *reset_at.lock().unwrap() = Some(1);
        tx.send(1).unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the reset released the waiting start")
            .unwrap();
    }

    #[tokio::test]
    async fn the_rate_spaces_starts() {
        let limiters = FlowLimiters::default();
        let (_tx, rx) = watch::channel(0);
        let v = values(None, Some(20), 1000);
        let started = Instant::now();
        for _ in 0..5 {
            drop(limiters.acquire(&v, || None, rx.clone()).await);
        }
        // The first start is free; four more at 50 ms each.
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(190), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        assert_eq!(limiters.sweep(), 0, "just used");
    }
}
