//! `wg-certs`: the lifecycle of the webhook's TLS material.
//!
//! It owns generating a CA and serving certificates ([`generate`]), loading a PEM pair into a
//! rustls [`CertifiedKey`](rustls::sign::CertifiedKey) with errors that name the file
//! ([`load`]), reading expiry dates ([`load::not_after`]) and serving the current pair to rustls
//! while reloading it from disk when the files change ([`reload`]).
//!
//! It never talks to Kubernetes and never logs key material; private keys only leave it as
//! PEM strings handed to the caller (who must keep them off argv, env and persistent disk).

pub mod error;
pub mod generate;
pub mod load;
pub mod reload;

pub use error::Error;
pub use generate::{generate_ca, issue_serving_cert, CertificateAuthority, ServingCertificate};
pub use load::{certified_key_from_pem, load_pem, not_after};
pub use reload::ReloadingResolver;

/// The crypto provider used for every TLS object this workspace builds (ring).
#[must_use]
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
