//! The one error enum of `wg-bench`: each variant names the action that failed.

use std::path::PathBuf;

/// What went wrong while setting up or running a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A server process could not be started.
    #[error("failed to start {what} ({program}): {source}")]
    SpawnServer {
        /// Which server.
        what: &'static str,
        /// The program path.
        program: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A server did not print its caBundle or never became ready.
    #[error("{what} did not become ready: {reason}")]
    ServerNotReady {
        /// Which server.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The caBundle a server printed is not a usable CA certificate.
    #[error("failed to read the caBundle printed by {what}: {reason}")]
    BadCaBundle {
        /// Which server.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A TLS or HTTP connection to a server failed.
    #[error("failed to connect to {addr}: {reason}")]
    Connect {
        /// The server address.
        addr: std::net::SocketAddr,
        /// Why.
        reason: String,
    },
    /// A server answered the warm-up request with something other than what it must answer.
    #[error("{what} answered the warm-up review wrongly: {reason}")]
    WrongAnswer {
        /// Which server.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// Generating the self-signed certificate of the floor server failed.
    #[error("failed to generate the floor server's certificate: {0}")]
    Certificate(#[from] wg_certs::Error),
    /// The injector's server plumbing refused to start.
    #[error("failed to set up the server: {0}")]
    Server(#[from] wg_injector::Error),
    /// Reading or writing the benchmarks document failed.
    #[error("failed to {action} {path}: {source}")]
    Document {
        /// `read` or `write`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}
