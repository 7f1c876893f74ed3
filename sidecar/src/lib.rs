//! `wg-sidecar`: the WireGuard data plane of wg-injector.
//!
//! Owns: the sidecar's library pieces — CLI contract ([`cli`]), Vault client ([`vault`]), key
//! sources ([`keysource`]), the WireGuard interface seam ([`tunnel`]), routes and kill switch
//! ([`routes`]), the interface MTU ([`mtu`]), health and metrics ([`health`], [`metrics`]), the pure decisions
//! ([`backoff`], [`rotation`]) and the two commands ([`init`], [`run`]). The gateway and key
//! operations reuse these modules.
//! Must never: put key material in argv, environment, logs, metrics or errors.

pub mod access;
pub mod backoff;
pub mod bootstrap;
pub mod cli;
pub mod error;
pub mod events;
pub mod forwarding;
pub mod gateway;
pub mod health;
pub mod init;
pub mod keys;
pub mod keysource;
pub mod lifecycle;
pub mod logfmt;
pub mod metrics;
pub mod mtu;
pub mod nat;
pub mod pod_index;
pub mod pod_watch;
pub mod policy;
pub mod policy_watch;
pub mod pool;
pub mod publish;
pub mod registration;
pub mod rotation;
pub mod routes;
pub mod run;
pub mod secret;
pub mod tunnel;
pub mod vault;

pub use error::{Result, SidecarError};
