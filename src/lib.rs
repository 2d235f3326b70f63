//! kstash: a self-hosted, Kafka-backed HTTP message queue and scheduler speaking the QStash v2 API.
//!
//! Data flows one way: `api` validates and produces to Kafka topics (through `state::writer`);
//! `delay` moves delayed messages down the delay ladder; `delivery` consumes the ready topic and
//! calls destinations, in order per queue and within flow-control limits; `schedule` fires cron
//! schedules. `kafka` holds what is
//! generic about Kafka (clients, the producer, the parallel consumer with its lanes and commit
//! tracking, the embedded dev cluster) and knows no record types; `model` holds the records and
//! parsing rules; `state` the views rebuilt from Kafka; `topics` the catalog of topics; `server`
//! starts and stops a process. See `docs/architecture.md`.
#![deny(unsafe_code)]

pub mod api;
pub mod config;
pub mod delay;
pub mod delivery;
pub mod health;
pub mod kafka;
pub mod listener;
pub mod model;
pub mod poison;
pub mod schedule;
pub mod server;
pub mod signing;
pub mod state;
pub mod topics;
