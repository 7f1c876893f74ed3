//! `wg-injector`: decides whether and how a Pod gets the WireGuard sidecar.
//!
//! The crate is a pure injection core ([`annotations`], [`config`], [`identity`], [`inject`],
//! [`admission`], [`routes`], [`tunnel_label`])
//! with thin edges: the HTTPS admission webhook ([`webhook`], [`review`], [`memo`],
//! [`metrics`]) and the offline CLI ([`offline`]). The core never does IO; the edges only
//! decode, call it and encode.

pub mod admission;
pub mod annotations;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod error;
pub mod identity;
pub mod inject;
pub mod memo;
pub mod metrics;
pub mod offline;
pub mod patch;
pub mod review;
pub mod routes;
pub mod server;
pub mod tunnel_label;
pub mod webhook;

pub use error::Error;
