//! The one error type of the `wg-sidecar` crate.
//!
//! Owns: every failure the library can report, each variant named after the action that failed.
//! Must never: carry key material or tokens in a message (only paths, names and causes).

use std::path::PathBuf;

/// Everything that can go wrong in the sidecar library.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// A flag or flag combination is invalid.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A file (token, CA, key folder entry) could not be read.
    #[error("failed to read {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Building the Vault client failed (address, CA file).
    #[error("failed to build Vault client for {addr}: {reason}")]
    VaultClient {
        /// Vault address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// Logging in to Vault failed.
    #[error("failed to log in to Vault with {method} auth at mount {mount}: {reason}")]
    VaultLogin {
        /// Auth method (kubernetes, approle, token).
        method: &'static str,
        /// Auth mount.
        mount: String,
        /// What went wrong.
        reason: String,
    },
    /// A KV v2 read, write or list failed.
    #[error("failed to {op} Vault KV v2 {mount}/{path}: {reason}")]
    VaultKv {
        /// `read`, `write` or `list`.
        op: &'static str,
        /// KV mount.
        mount: String,
        /// Secret path.
        path: String,
        /// What went wrong.
        reason: String,
        /// HTTP status when Vault answered with an error.
        status: Option<u16>,
    },
    /// A Vault administration call (`vault bootstrap`) failed.
    #[error("failed to {op} {target} in Vault: {reason}")]
    VaultAdmin {
        /// `list auth methods of`, `write policy`, `write role`.
        op: &'static str,
        /// The auth mount, policy or role.
        target: String,
        /// What went wrong (the API's errors, or the fix when the mount is missing).
        reason: String,
        /// HTTP status when Vault answered with an error.
        status: Option<u16>,
    },
    /// A key record (Vault or file) is missing a field or has a bad value.
    #[error("invalid key record {source_name}: {reason}")]
    InvalidRecord {
        /// Where the record came from (a Vault path or a folder).
        source_name: String,
        /// What is wrong (never the value of a secret field).
        reason: String,
    },
    /// Creating or configuring the WireGuard interface failed.
    #[error("failed to {op} WireGuard interface {interface}: {reason}")]
    Tunnel {
        /// What was attempted.
        op: &'static str,
        /// Interface name.
        interface: String,
        /// What went wrong.
        reason: String,
    },
    /// A netlink route operation failed.
    #[error("failed to {op} route {cidr}: {reason}")]
    Route {
        /// What was attempted.
        op: &'static str,
        /// The route's destination.
        cidr: String,
        /// What went wrong.
        reason: String,
    },
    /// A netlink routing-rule operation failed.
    #[error("failed to add routing rule `{rule}`: {reason}")]
    Rule {
        /// The rule, as `ip rule` prints it.
        rule: String,
        /// What went wrong.
        reason: String,
    },
    /// Opening a netlink socket or looking up a link failed.
    #[error("netlink failure: {0}")]
    Netlink(String),
    /// The health server could not bind or serve.
    #[error("failed to serve health endpoints on {addr}: {source}")]
    Health {
        /// Listen address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// An endpoint name could not be resolved.
    #[error("failed to resolve endpoint {endpoint}: {reason}")]
    Resolve {
        /// The endpoint as configured (`host:port`).
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// An address pool has no free address left.
    #[error("address pool {pool} is exhausted")]
    PoolExhausted {
        /// The pool.
        pool: String,
    },
    /// A concurrent writer won a KV v2 check-and-set race too many times.
    #[error("failed to {op}: {reason}")]
    Conflict {
        /// What was attempted.
        op: String,
        /// What went wrong.
        reason: String,
    },
    /// Listing the network namespace's interfaces over rtnetlink failed (to turn on IPv4
    /// forwarding on each of them).
    #[error("failed to list the network interfaces over rtnetlink: {source}")]
    ListInterfaces {
        /// The cause (with the errno when the kernel refused).
        #[source]
        source: std::io::Error,
    },
    /// Turning on IPv4 forwarding on one interface over rtnetlink failed.
    #[error("failed to turn on IPv4 forwarding on interface {interface} over rtnetlink: {source}")]
    InterfaceForwarding {
        /// The interface.
        interface: String,
        /// The cause (with the errno when the kernel refused).
        #[source]
        source: std::io::Error,
    },
    /// Writing a forwarding sysctl under `/proc/sys` failed.
    #[error("failed to write 1 to {path}: {source}")]
    ForwardingSysctl {
        /// The sysctl file.
        path: &'static str,
        /// The cause (read-only `/proc/sys` in a Pod: EROFS).
        #[source]
        source: std::io::Error,
    },
    /// Installing or removing the gateway's NAT (masquerade) rules failed.
    #[error("failed to {op} NAT rules: {reason}")]
    Nat {
        /// What was attempted.
        op: &'static str,
        /// What went wrong.
        reason: String,
    },
}

/// Result alias for the crate.
pub type Result<T, E = SidecarError> = std::result::Result<T, E>;
