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
}
