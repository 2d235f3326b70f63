//! The in-memory view of flow control: every key's settings (from the flow-control topic) and
//! what its messages are doing (from the events topic), for `GET /v2/flowControl` and for the
//! delivery stage (pause, pins).
//!
//! Design choice: the counters a `FlowControlInfo` reports (attempts in flight, starts in the
//! current rate period) are derived from the ACTIVE and outcome events every process already
//! reads, so any process answers for any key without asking the one that owns it. They are a
//! report, not the limit: the owner enforces the limits itself (`delivery::flow`). The rate period
//! shown is a fixed window of the key's period, starting at the key's first start (or its last
//! rate reset) and rolling forward; applying an event twice changes nothing (counts are sets of
//! attempts).

use std::collections::HashSet;

use dashmap::DashMap;

use super::registry::Registry;
use crate::model::event::{Event, State};
use crate::model::flow::{FlowControlRecord, DEFAULT_PERIOD};

/// What a key's messages are doing now.
#[derive(Debug, Default, Clone)]
struct Runtime {
    /// Messages with an attempt in flight.
    active: HashSet<String>,
    /// Start of the current rate window (unix ms).
    window_start: i64,
    /// Attempts (message id, attempt number) started in the current window.
    window_starts: HashSet<(String, u32)>,
}

/// A key's counters at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub in_flight: usize,
    pub window_start_ms: i64,
    pub window_count: usize,
}

/// Every known flow-control key.
#[derive(Debug, Default)]
pub struct FlowView {
    settings: Registry<FlowControlRecord>,
    runtime: DashMap<String, Runtime>,
}

fn period_ms(record: Option<&FlowControlRecord>) -> i64 {
    let ms = record.map_or(DEFAULT_PERIOD.as_millis() as u64, |r| r.period_ms);
    i64::try_from(ms.max(1)).unwrap_or(i64::MAX)
}

/// The start of the window of length `period` (rolling forward from `start`) containing `t`.
fn window_containing(start: i64, period: i64, t: i64) -> i64 {
    if t < start {
        return start;
    }
    start + (t - start) / period * period
}

impl FlowView {
    /// A key's settings; an older write never replaces a newer one.
    pub fn apply(&self, key: &str, record: Option<FlowControlRecord>) {
        let newer = record.as_ref().filter(|r| {
            self.settings
                .get(key)
                .is_none_or(|current| current.updated_at <= r.updated_at)
        });
        if let Some(reset) = newer.and_then(|r| r.rate_reset_at) {
            let mut rt = self.runtime.entry(key.to_string()).or_default();
            if reset > rt.window_start {
                rt.window_start = reset;
                rt.window_starts.clear();
            }
        }
        self.settings.apply(key, record);
    }

    /// Follows an event of a message with a flow-control key.
    pub fn on_event(&self, event: &Event) {
        let Some(key) = &event.flow_control_key else {
            return;
        };
        let period = period_ms(self.settings.get(key).as_ref());
        let mut rt = self.runtime.entry(key.clone()).or_default();
        match event.state {
            State::Active => {
                rt.active.insert(event.message_id.clone());
                if rt.window_start == 0 {
                    rt.window_start = event.time;
                }
                let window = window_containing(rt.window_start, period, event.time);
                if window > rt.window_start {
                    rt.window_start = window;
                    rt.window_starts.clear();
                }
                if event.time >= rt.window_start {
                    rt.window_starts
                        .insert((event.message_id.clone(), event.retried));
                }
            }
            State::Created => {}
            _ => {
                rt.active.remove(&event.message_id);
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<FlowControlRecord> {
        self.settings.get(key)
    }

    /// Every key with settings, by key.
    pub fn list(&self) -> Vec<FlowControlRecord> {
        self.settings.list()
    }

    /// A key's counters at `now_ms`: a window that has ended counts nothing.
    pub fn counters(&self, key: &str, now_ms: i64) -> Counters {
        let period = period_ms(self.settings.get(key).as_ref());
        let Some(rt) = self.runtime.get(key) else {
            return Counters {
                in_flight: 0,
                window_start_ms: now_ms,
                window_count: 0,
            };
        };
        let current = window_containing(rt.window_start.max(1), period, now_ms);
        Counters {
            in_flight: rt.active.len(),
            window_start_ms: current,
            window_count: if current == rt.window_start {
                rt.window_starts.len()
            } else {
                0
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::envelope::sample;

    fn event(id: &str, state: State, time: i64, retried: u32) -> Event {
        let mut m = sample();
        m.message_id = id.into();
        m.retried = retried;
        Event::new(&m, state, time)
    }

    fn record(period_ms: u64, updated_at: i64) -> FlowControlRecord {
        let mut r = crate::model::flow::sample_record();
        r.key = "tenant-1".into();
        r.period_ms = period_ms;
        r.rate_reset_at = None;
        r.updated_at = updated_at;
        r
    }

    #[test]
    fn counts_attempts_in_flight_and_per_window_idempotently() {
        let view = FlowView::default();
        view.apply("tenant-1", Some(record(1000, 1)));
        for e in [
            event("a", State::Active, 10_000, 0),
            event("b", State::Active, 10_100, 0),
            event("b", State::Active, 10_100, 0), // applied twice
        ] {
            view.on_event(&e);
        }
        let c = view.counters("tenant-1", 10_200);
        assert_eq!(
            (c.in_flight, c.window_count, c.window_start_ms),
            (2, 2, 10_000)
        );
        view.on_event(&event("a", State::Delivered, 10_300, 0));
        view.on_event(&event("b", State::Error, 10_400, 0));
        view.on_event(&event("b", State::Active, 10_900, 1));
        let c = view.counters("tenant-1", 10_950);
        assert_eq!(
            (c.in_flight, c.window_count),
            (1, 3),
            "a retry is a new start"
        );
        view.on_event(&event("c", State::Active, 11_500, 0));
        let c = view.counters("tenant-1", 11_600);
        assert_eq!(
            (c.window_start_ms, c.window_count),
            (11_000, 1),
            "next window"
        );
        let later = view.counters("tenant-1", 15_000);
        assert_eq!(
            (later.window_start_ms, later.window_count),
            (15_000, 0),
            "an ended window counts nothing"
        );
    }

    #[test]
    fn a_rate_reset_starts_a_new_window_and_older_settings_lose() {
        let view = FlowView::default();
        view.apply("tenant-1", Some(record(60_000, 1)));
        view.on_event(&event("a", State::Active, 10_000, 0));
        let mut reset = record(60_000, 5);
        reset.rate_reset_at = Some(20_000);
        view.apply("tenant-1", Some(reset));
        let c = view.counters("tenant-1", 20_001);
        assert_eq!((c.window_start_ms, c.window_count), (20_000, 0));
        view.apply("tenant-1", Some(record(1000, 2)));
        assert_eq!(
            view.get("tenant-1").unwrap().period_ms,
            60_000,
            "older write ignored"
        );
        view.apply("tenant-1", None);
        assert!(view.get("tenant-1").is_none());
    }
}
