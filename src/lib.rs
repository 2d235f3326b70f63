//! kstash: a self-hosted, Kafka-backed HTTP message queue and scheduler speaking the QStash v2 API.
//!
//! Data flows one way: `api` validates and produces to Kafka topics; `delivery` consumes them and
//! calls destinations; `delay` moves delayed messages down the delay ladder. `kafka` sets up clients, topics and the embedded dev cluster; `model` holds
//! the records and parsing rules; `server` starts and stops a process. See `DESIGN.md`.
#![deny(unsafe_code)]

pub mod api;
pub mod config;
pub mod delay;
pub mod delivery;
pub mod kafka;
pub mod model;
pub mod server;
pub mod signing;
pub mod state;
