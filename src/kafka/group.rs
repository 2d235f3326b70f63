//! Consumer-group membership: applying a rebalance without asking librdkafka which protocol is in
//! use, and leaving the group without stalling a stop.
//!
//! rust-rdkafka's default `ConsumerContext::rebalance` calls `rd_kafka_rebalance_protocol()` to
//! choose between (incremental) assign and unassign. That call waits, with no timeout, for the
//! group thread to answer, and when the rebalance is the final revoke of a consumer being closed
//! the answer may never come (librdkafka issue 4041): the consumer's drop then blocks its thread
//! for ever, and a stop hangs. kstash's consumers use eager assignors only (the assignment
//! strategy is a key the raw pass-through may not set), so the answer is known in advance: an
//! assignment is applied with `assign`, a revocation with `unassign`. Both contexts (delivery and
//! delay consumers, scheduler) route their rebalances through [`rebalance`].
//!
//! The consumers leave their group by being dropped (librdkafka's close: the final revocation, a
//! commit, LeaveGroup), not by an `unsubscribe` first: an unsubscribe whose revocation is still
//! pending when the close starts is what made the close hang on the embedded cluster. A close
//! blocks, and can hang, so it never runs on a runtime thread: a stop closes through [`leave`]
//! (a thread of its own, waited for a bounded time), and every consumer is held in an
//! [`OffRuntime`], which moves a drop that happens anywhere else (a task aborted, the runtime shut
//! down with the task still running) to a thread of its own as well.

use std::ops::Deref;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::TopicPartitionList;

/// Runs `context.pre_rebalance` and then applies the rebalance the eager way.
pub fn rebalance<C: ConsumerContext>(
    context: &C,
    consumer: &BaseConsumer<C>,
    err: RDKafkaRespErr,
    tpl: &TopicPartitionList,
) {
    let rebalance = match err {
        RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
        RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
        other => Rebalance::Error(KafkaError::Rebalance(RDKafkaErrorCode::from(other))),
    };
    context.pre_rebalance(consumer, &rebalance);
    let applied = match rebalance {
        Rebalance::Assign(tpl) => consumer.assign(tpl),
        // A revocation, or an error the group cannot recover from in place: drop everything
        // assigned (the group hands it out again), as librdkafka's own default does.
        Rebalance::Revoke(_) | Rebalance::Error(_) => consumer.unassign(),
    };
    match applied {
        Ok(()) => context.post_rebalance(consumer, &rebalance),
        Err(e) => tracing::warn!(error = %e, "applying a rebalance failed"),
    }
}

/// How long a stop waits for a consumer to leave its group.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Name of the threads that close consumers.
const CLOSE_THREAD: &str = "kstash-consumer-close";

/// Runs `close` on a detached thread of its own.
fn close_on_own_thread(close: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(CLOSE_THREAD.into())
        .spawn(close)
        .map(drop)
}

/// Drops `consumer` (closing it, which leaves the group) on a thread of its own and waits up to
/// [`CLOSE_TIMEOUT`]. Finished offsets are committed before this is called, so a close that does
/// not finish costs nothing but the group noticing the member gone at its session timeout; the
/// thread is then left behind rather than blocking the runtime (whose shutdown would wait for a
/// blocking-pool thread for ever).
pub async fn leave<T: Send + 'static>(consumer: T) {
    let (done, closed) = tokio::sync::oneshot::channel();
    let spawned = close_on_own_thread(move || {
        drop(consumer);
        let _ = done.send(());
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the consumer-close thread; the group will notice at the session timeout");
        return;
    }
    if tokio::time::timeout(CLOSE_TIMEOUT, closed).await.is_err() {
        tracing::warn!(
            timeout = ?CLOSE_TIMEOUT,
            "leaving the consumer group did not finish; the group will notice at the session timeout"
        );
    }
}

/// Holds a value whose drop blocks (a consumer: the drop closes it). Dropped on a runtime thread,
/// the value is handed to a thread of its own and dropped there, so the runtime never waits on it;
/// dropped anywhere else (e.g. in [`leave`]'s thread), it is dropped in place.
pub struct OffRuntime<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> OffRuntime<T> {
    pub fn new(value: T) -> Self {
        OffRuntime(Some(value))
    }
}

impl<T: Send + 'static> Deref for OffRuntime<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.0
            .as_ref()
            .expect("the value is only taken out when dropped")
    }
}

impl<T: Send + 'static> Drop for OffRuntime<T> {
    fn drop(&mut self) {
        let Some(value) = self.0.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return drop(value);
        }
        if let Err(e) = close_on_own_thread(move || drop(value)) {
            // Leaking it is better than blocking a runtime thread, maybe for ever.
            tracing::warn!(error = %e, "cannot start a thread to close a consumer; it is left open");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::thread::ThreadId;

    use super::*;

    /// Waits for a release when dropped, then says on which thread it was dropped.
    struct BlockingDrop {
        release: mpsc::Receiver<()>,
        dropped_on: mpsc::Sender<ThreadId>,
    }

    impl Drop for BlockingDrop {
        fn drop(&mut self) {
            let _ = self.release.recv_timeout(Duration::from_secs(10));
            let _ = self.dropped_on.send(std::thread::current().id());
        }
    }

    fn blocking_drop() -> (BlockingDrop, mpsc::Sender<()>, mpsc::Receiver<ThreadId>) {
        let (release_tx, release) = mpsc::channel();
        let (dropped_on, dropped_rx) = mpsc::channel();
        let value = BlockingDrop {
            release,
            dropped_on,
        };
        (value, release_tx, dropped_rx)
    }

    #[tokio::test]
    async fn a_drop_on_a_runtime_thread_happens_on_another_thread() {
        let (value, release, dropped_on) = blocking_drop();
        drop(OffRuntime::new(value));
        // Had the drop run here, it would have waited for this release (then timed out).
        release.send(()).unwrap();
        let thread = dropped_on.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_ne!(thread, std::thread::current().id());
    }

    #[test]
    fn a_drop_off_the_runtime_happens_in_place() {
        let (value, release, dropped_on) = blocking_drop();
        release.send(()).unwrap();
        drop(OffRuntime::new(value));
        let thread = dropped_on.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(thread, std::thread::current().id());
    }
}
