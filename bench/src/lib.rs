//! `wg-bench`: the webhook under load, against its floor.
//!
//! Runs `wg-injector serve` and a **floor server** ([`floor`]) built on the same TLS + HTTP
//! stack (the injector's own [`wg_injector::server::serve`]) that decodes the same
//! `AdmissionReview` and answers `allowed: true` with no patch, then drives both with the same
//! open-loop and closed-loop load ([`load`]) and reports latency, throughput, the ratio ours /
//! floor and the injector's memory ([`report`]).
//!
//! This crate is a measuring tool, not a test: it sends traffic to loopback only, every run is
//! bounded in time, and it kills only the processes it started ([`process`]).

pub mod doc;
pub mod error;
pub mod floor;
pub mod load;
pub mod payload;
pub mod process;
pub mod report;
pub mod suite;

pub use error::Error;
