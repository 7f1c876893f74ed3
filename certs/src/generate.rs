//! Generating a CA and serving certificates with rcgen.
//!
//! Owns: key generation (ECDSA P-256), CA and leaf parameters, validity windows. Must never
//! write files or log key material; callers decide where PEM goes. Reusable by a future
//! self-managed mode that keeps the CA in a Kubernetes Secret ([`CertificateAuthority::from_pem`]).

use std::fmt;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::OffsetDateTime;

use crate::Error;

/// Certificates start this long in the past so a peer with a slightly late clock accepts them.
const CLOCK_SKEW: time::Duration = time::Duration::minutes(5);

/// A certificate authority able to issue serving certificates.
pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// The CA certificate in PEM (what goes into a webhook's `caBundle`, base64-encoded).
    #[must_use]
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key in PKCS#8 PEM. Secret: keep it in memory or a 0600 tmpfs file only.
    #[must_use]
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Rebuild a CA from its stored PEM certificate and key (e.g. read back from a Secret).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| Error::DecodePem {
            what: "CA private key",
            origin: "memory".to_owned(),
            reason: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| Error::DecodePem {
            what: "CA certificate",
            origin: "memory".to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }
}

/// A serving certificate and its private key, both PEM.
pub struct ServingCertificate {
    /// The leaf certificate in PEM.
    pub cert_pem: String,
    /// The leaf private key in PKCS#8 PEM. Secret.
    pub key_pem: String,
}

impl fmt::Debug for ServingCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCertificate")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl ServingCertificate {
    /// The pair as a rustls certified key, ready to serve.
    pub fn certified_key(&self) -> Result<rustls::sign::CertifiedKey, Error> {
        crate::load::certified_key_from_pem(
            self.cert_pem.as_bytes(),
            "memory",
            self.key_pem.as_bytes(),
            "memory",
        )
    }
}

fn validity(lifetime: Duration) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    // A lifetime beyond what `time` can represent is clamped to a century.
    let lifetime = time::Duration::try_from(lifetime).unwrap_or(time::Duration::days(36_500));
    (now - CLOCK_SKEW, now + lifetime)
}

/// Generate a self-signed CA named `common_name`, valid for `lifetime`.
pub fn generate_ca(common_name: &str, lifetime: Duration) -> Result<CertificateAuthority, Error> {
    let generate = |source| Error::Generate {
        what: "CA certificate",
        source,
    };
    let key = KeyPair::generate().map_err(generate)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params.not_before, params.not_after) = validity(lifetime);
    let cert = params.self_signed(&key).map_err(generate)?;
    Ok(CertificateAuthority {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        issuer: Issuer::new(params, key),
    })
}

/// Issue a serving certificate signed by `ca` for `names` (DNS names, or IP addresses when a
/// name parses as one), valid for `lifetime`. The first name becomes the subject common name.
pub fn issue_serving_cert(
    ca: &CertificateAuthority,
    names: &[String],
    lifetime: Duration,
) -> Result<ServingCertificate, Error> {
    let first = names.first().ok_or(Error::NoSubjectNames)?;
    let mut params = CertificateParams::default();
    for name in names {
        // `CertificateParams::new` decides DNS vs IP per name; do it one by one to name the bad one.
        let one = CertificateParams::new(vec![name.clone()]).map_err(|source| {
            Error::InvalidSubjectName {
                name: name.clone(),
                source,
            }
        })?;
        params.subject_alt_names.extend(one.subject_alt_names);
    }
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, first);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    (params.not_before, params.not_after) = validity(lifetime);
    let generate = |source| Error::Generate {
        what: "serving certificate",
        source,
    };
    let key = KeyPair::generate().map_err(generate)?;
    let cert = params.signed_by(&key, &ca.issuer).map_err(generate)?;
    Ok(ServingCertificate {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn a_serving_certificate_is_signed_by_its_ca_and_names_every_san() {
        let ca = generate_ca("wg-injector test CA", DAY).unwrap();
        let names = vec![
            "wg-injector.wg-system.svc".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        let leaf = issue_serving_cert(&ca, &names, DAY).unwrap();

        let ca_der = rustls_pki_types::CertificateDer::from_pem_slice_for_test(ca.cert_pem());
        let leaf_der = rustls_pki_types::CertificateDer::from_pem_slice_for_test(&leaf.cert_pem);
        let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let (_, leaf_x509) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
        assert!(ca_x509.is_ca());
        assert_eq!(leaf_x509.issuer(), ca_x509.subject());
        leaf_x509
            .verify_signature(Some(ca_x509.public_key()))
            .unwrap();
        let san = leaf_x509.subject_alternative_name().unwrap().unwrap();
        let rendered: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            rendered,
            vec![
                "DNSName(wg-injector.wg-system.svc)",
                "IPAddress(7f:00:00:01)"
            ]
        );
    }

    #[test]
    fn the_lifetime_sets_not_after() {
        let ca = generate_ca("ca", DAY).unwrap();
        let leaf = issue_serving_cert(&ca, &["localhost".to_owned()], 2 * DAY).unwrap();
        let expiry = crate::load::not_after_pem(&leaf.cert_pem).unwrap();
        let expected = OffsetDateTime::now_utc().unix_timestamp() + 2 * 86_400;
        assert!((expiry - expected).abs() < 60, "{expiry} vs {expected}");
    }

    #[test]
    fn a_ca_read_back_from_pem_issues_certificates_it_signed() {
        let ca = generate_ca("stored ca", DAY).unwrap();
        let again = CertificateAuthority::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        let leaf = issue_serving_cert(&again, &["localhost".to_owned()], DAY).unwrap();
        let ca_der = rustls_pki_types::CertificateDer::from_pem_slice_for_test(ca.cert_pem());
        let leaf_der = rustls_pki_types::CertificateDer::from_pem_slice_for_test(&leaf.cert_pem);
        let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let (_, leaf_x509) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
        leaf_x509
            .verify_signature(Some(ca_x509.public_key()))
            .unwrap();
    }

    #[test]
    fn no_names_is_refused() {
        let ca = generate_ca("ca", DAY).unwrap();
        assert!(matches!(
            issue_serving_cert(&ca, &[], DAY),
            Err(Error::NoSubjectNames)
        ));
    }

    #[test]
    fn a_bad_name_is_named_in_the_error() {
        let ca = generate_ca("ca", DAY).unwrap();
        let err = issue_serving_cert(&ca, &["bäd.example".to_owned()], DAY);
        if let Err(Error::InvalidSubjectName { name, .. }) = err {
            assert_eq!(name, "bäd.example");
        } else {
            // DNS names must be IA5 (ASCII) strings.
            panic!("expected InvalidSubjectName, got {err:?}");
        }
    }

    #[test]
    fn the_key_is_redacted_from_debug_output() {
        let ca = generate_ca("ca", DAY).unwrap();
        let leaf = issue_serving_cert(&ca, &["localhost".to_owned()], DAY).unwrap();
        assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
        assert!(!format!("{leaf:?}").contains("PRIVATE KEY"));
    }

    trait FromPemForTest {
        fn from_pem_slice_for_test(pem: &str) -> Self;
    }
    impl FromPemForTest for rustls_pki_types::CertificateDer<'static> {
        fn from_pem_slice_for_test(pem: &str) -> Self {
            use rustls_pki_types::pem::PemObject;
            Self::from_pem_slice(pem.as_bytes()).unwrap()
        }
    }
}
