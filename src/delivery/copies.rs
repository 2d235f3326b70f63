//! Copies of one message that reach this process's delivery stage together are attempted once.
//!
//! Around a rebalance the same attempt can be read twice in one process: a partition given back
//! to it is read again from its committed offset while the first read is still being worked on,
//! or the delay stage forwarded a record twice (its previous owner finished the hop while the new
//! one had started it). The events view catches a copy read after the first one's DELIVERED
//! event came back from Kafka, not one read while the first is in flight or just after. So the
//! stage keeps, per process, the attempts in flight (message id and attempt number) and the
//! messages finished in the last [`RECENT`]: a copy of either is finished at once (committed, not
//! attempted). Memory is bounded by the in-flight bound and by what finishes in [`RECENT`].

use std::time::Duration;

use dashmap::{DashMap, DashSet};

/// How long a finished message is remembered.
pub const RECENT: Duration = Duration::from_secs(10);

/// The attempts in flight and the messages finished recently.
#[derive(Default)]
pub struct Copies {
    in_flight: DashSet<(String, u32)>,
    /// Message id → when it finished (unix ms).
    finished: DashMap<String, i64>,
}

/// Held while an attempt runs; ends it when dropped.
pub struct Attempt<'a> {
    copies: &'a Copies,
    key: (String, u32),
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.copies.in_flight.remove(&self.key);
    }
}

impl Copies {
    /// Starts attempt `retried` of `message_id`, or `None` when this is a copy: the same attempt
    /// is in flight, or the message finished recently.
    pub fn start(&self, message_id: &str, retried: u32) -> Option<Attempt<'_>> {
        if self.finished.contains_key(message_id) {
            return None;
        }
        let key = (message_id.to_string(), retried);
        self.in_flight
            .insert(key.clone())
            .then_some(Attempt { copies: self, key })
    }

    /// The message was delivered or failed for good at `now_ms`.
    pub fn finished(&self, message_id: &str, now_ms: i64) {
        self.finished.insert(message_id.to_string(), now_ms);
    }

    /// Forgets messages finished before `now_ms - RECENT`; returns how many are remembered.
    pub fn sweep(&self, now_ms: i64) -> usize {
        let cutoff = now_ms - i64::try_from(RECENT.as_millis()).unwrap_or(i64::MAX);
        self.finished.retain(|_, at| *at >= cutoff);
        self.finished.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_of_an_attempt_in_flight_or_of_a_finished_message_is_not_attempted() {
        let c = Copies::default();
        let first = c.start("msg_1", 0).expect("the first read");
        assert!(c.start("msg_1", 0).is_none(), "a copy while it runs");
        assert!(c.start("msg_2", 0).is_some(), "other messages go");
        drop(first);
        let again = c
            .start("msg_1", 0)
            .expect("a later retry of the same record may run");
        c.finished("msg_1", 1_000);
        drop(again);
        assert!(
            c.start("msg_1", 1).is_none(),
            "finished: any later copy is skipped"
        );
        assert_eq!(c.sweep(1_000 + RECENT.as_millis() as i64), 1);
        assert_eq!(c.sweep(1_001 + RECENT.as_millis() as i64), 0);
        assert!(c.start("msg_1", 1).is_some(), "forgotten after RECENT");
    }
}
