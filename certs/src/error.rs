//! The crate's one error enum: each variant names the action that failed and, for files, the path.

use std::path::PathBuf;

/// Everything that can fail while generating, loading or reloading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Generating a key pair or signing a certificate failed.
    #[error("failed to generate {what}: {source}")]
    Generate {
        /// What was being generated (`CA certificate`, `serving certificate`, …).
        what: &'static str,
        /// The underlying rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// A name given for a serving certificate is neither a DNS name nor an IP address.
    #[error("invalid subject alternative name {name:?}: {source}")]
    InvalidSubjectName {
        /// The rejected name.
        name: String,
        /// The underlying rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// A serving certificate needs at least one name.
    #[error("a serving certificate needs at least one DNS name or IP address")]
    NoSubjectNames,
    /// Reading a file failed.
    #[error("failed to read {what} from {}: {source}", path.display())]
    ReadFile {
        /// `serving certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM document could not be decoded or held no usable item.
    #[error("failed to decode {what} from {origin}: {reason}")]
    DecodePem {
        /// `serving certificate` or `private key`.
        what: &'static str,
        /// The file (or `memory`) the PEM came from.
        origin: String,
        /// Why it failed.
        reason: String,
    },
    /// The private key is unusable or does not match the certificate.
    #[error("serving certificate {cert_origin} and private key {key_origin} do not form a usable pair: {source}")]
    BuildCertifiedKey {
        /// Where the certificate came from.
        cert_origin: String,
        /// Where the key came from.
        key_origin: String,
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
    /// An X.509 certificate could not be parsed.
    #[error("failed to parse X.509 certificate: {reason}")]
    ParseCertificate {
        /// The parser's message.
        reason: String,
    },
}
