//! Loading a PEM certificate chain and private key into a rustls `CertifiedKey`, and reading
//! certificate expiry.
//!
//! Owns: PEM decoding, key/certificate consistency, expiry. Errors name the file that failed.
//! Must never log or return key bytes in errors.

use std::path::Path;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// Load the serving certificate chain (leaf first) from `cert_path` and its private key from
/// `key_path`, and check that they belong together.
pub fn load_pem(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, Error> {
    let cert = std::fs::read(cert_path).map_err(|source| Error::ReadFile {
        what: "serving certificate",
        path: cert_path.to_path_buf(),
        source,
    })?;
    let key = std::fs::read(key_path).map_err(|source| Error::ReadFile {
        what: "private key",
        path: key_path.to_path_buf(),
        source,
    })?;
    certified_key_from_pem(
        &cert,
        &cert_path.display().to_string(),
        &key,
        &key_path.display().to_string(),
    )
}

/// Build a `CertifiedKey` from PEM bytes; `*_origin` name where the bytes came from (for errors).
pub fn certified_key_from_pem(
    cert_pem: &[u8],
    cert_origin: &str,
    key_pem: &[u8],
    key_origin: &str,
) -> Result<CertifiedKey, Error> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::DecodePem {
            what: "serving certificate",
            origin: cert_origin.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(Error::DecodePem {
            what: "serving certificate",
            origin: cert_origin.to_owned(),
            reason: "no CERTIFICATE block found".to_owned(),
        });
    }
    // The pem error type never echoes the document, so it is safe to show.
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| Error::DecodePem {
        what: "private key",
        origin: key_origin.to_owned(),
        reason: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, &crate::crypto_provider()).map_err(|source| {
        Error::BuildCertifiedKey {
            cert_origin: cert_origin.to_owned(),
            key_origin: key_origin.to_owned(),
            source,
        }
    })
}

/// The `notAfter` of a DER certificate, as Unix seconds.
pub fn not_after(cert_der: &[u8]) -> Result<i64, Error> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|e| Error::ParseCertificate {
            reason: e.to_string(),
        })?;
    Ok(cert.validity().not_after.timestamp())
}

/// The `notAfter` of the first certificate of a PEM document, as Unix seconds.
pub fn not_after_pem(cert_pem: &str) -> Result<i64, Error> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
        Error::ParseCertificate {
            reason: e.to_string(),
        }
    })?;
    not_after(&der)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{generate_ca, issue_serving_cert};
    use std::time::Duration;

    const DAY: Duration = Duration::from_secs(86_400);

    fn pair() -> crate::ServingCertificate {
        let ca = generate_ca("ca", DAY).unwrap();
        issue_serving_cert(&ca, &["localhost".to_owned()], DAY).unwrap()
    }

    #[test]
    fn a_matching_pair_loads_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let leaf = pair();
        std::fs::write(dir.path().join("tls.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.path().join("tls.key"), &leaf.key_pem).unwrap();
        let key = load_pem(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).unwrap();
        assert_eq!(key.cert.len(), 1);
        key.keys_match().unwrap();
    }

    #[test]
    fn a_missing_key_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tls.crt"), pair().cert_pem).unwrap();
        let err = load_pem(&dir.path().join("tls.crt"), &dir.path().join("nope.key")).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("private key"), "{message}");
        assert!(message.contains("nope.key"), "{message}");
    }

    #[test]
    fn a_file_without_a_certificate_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tls.crt"), "hello").unwrap();
        std::fs::write(dir.path().join("tls.key"), pair().key_pem).unwrap();
        let message = load_pem(&dir.path().join("tls.crt"), &dir.path().join("tls.key"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("tls.crt"), "{message}");
        assert!(message.contains("no CERTIFICATE block"), "{message}");
    }

    #[test]
    fn a_key_from_another_pair_is_refused() {
        let a = pair();
        let b = pair();
        let err = certified_key_from_pem(
            a.cert_pem.as_bytes(),
            "a.crt",
            b.key_pem.as_bytes(),
            "b.key",
        )
        .unwrap_err();
        assert!(matches!(err, Error::BuildCertifiedKey { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("a.crt") && message.contains("b.key"),
            "{message}"
        );
    }

    #[test]
    fn expiry_is_read_from_der_and_pem_alike() {
        let leaf = pair();
        let der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        assert_eq!(
            not_after(&der).unwrap(),
            not_after_pem(&leaf.cert_pem).unwrap()
        );
        assert!(not_after(b"not a certificate").is_err());
    }
}
