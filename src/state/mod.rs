//! Materialised views of Kafka topics, for the read and bulk APIs and for the checks delivery
//! makes before an attempt (cancellations).
//!
//! `store` is the local on-disk store (redb) and its queries; `tail` fills it from the topics and
//! says when it has caught up. Kafka remains the only source of truth: a process's store is empty
//! at start and rebuilt by reading the topics, so processes stay stateless and symmetric.

pub mod store;
pub mod tail;

pub use store::{Change, DedupEntry, Store};
