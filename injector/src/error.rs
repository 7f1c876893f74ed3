//! The crate's one error enum. A denial is not an error: see [`crate::admission::Denial`].

/// Everything that can fail in `wg-injector` outside of admission decisions.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Placeholder until the first real variant lands.
    #[error("not implemented yet: {0}")]
    NotImplemented(&'static str),
    /// The injector configuration file could not be read.
    #[error("failed to read injector config {path}")]
    ReadConfig {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The injector configuration is not valid YAML of the expected shape.
    #[error("failed to parse injector config {path}: {source}")]
    ParseConfig {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// The injector configuration parsed but breaks a rule.
    #[error("invalid injector config {path}: {message}")]
    InvalidConfig {
        /// The file.
        path: std::path::PathBuf,
        /// Which key and what is allowed.
        message: String,
    },
    /// An offline-CLI input could not be read or parsed.
    #[error("failed to read manifests from {source_name}: {message}")]
    ReadManifests {
        /// The file name or `-` for stdin.
        source_name: String,
        /// Why.
        message: String,
    },
    /// A `serve` flag (or combination of flags) is invalid; the message names the flag.
    #[error("invalid {flag}: {reason}")]
    InvalidFlag {
        /// The flag, e.g. `--tls-cert`.
        flag: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// TLS material could not be generated or loaded.
    #[error(transparent)]
    Certificate(#[from] wg_certs::Error),
    /// The webhook could not listen on its address.
    #[error("failed to listen on {addr}: {source}")]
    BindListener {
        /// The address from `--listen`.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An HTTP body is not an `AdmissionReview` with a `request` (answered with HTTP 400).
    #[error("failed to decode AdmissionReview: {0}")]
    DecodeReview(String),
    /// A Kubernetes API call failed (self-managed certificates, version discovery).
    #[error("failed to {action}: {source}")]
    Kube {
        /// What was attempted, e.g. `update Secret wg/wg-injector-tls`.
        action: String,
        /// The client or API error.
        #[source]
        source: kube::Error,
    },
    /// The apiserver reported a version that does not parse as numbers.
    #[error("failed to parse the apiserver version: major {major:?}, minor {minor:?}")]
    UnknownClusterVersion {
        /// `major` of `/version`.
        major: String,
        /// `minor` of `/version`.
        minor: String,
    },
    /// A CA just generated did not parse back (a bug in certificate generation).
    #[error("failed to read back a freshly generated CA certificate")]
    UnreadableGeneratedCa,
    /// The `AdmissionReview` response could not be serialized.
    #[error("failed to encode AdmissionReview response: {0}")]
    EncodeReview(#[source] serde_json::Error),
}
