//! Serving the current certificate to rustls and hot-reloading it from disk.
//!
//! Owns: the certificate every new TLS handshake gets, and the decision to swap it. It polls
//! the files' content (which follows Kubernetes' atomic `..data` symlink swaps), swaps only a
//! pair that loads and matches, and keeps the old pair when a new one is bad (logged once per
//! bad content). Must never block a handshake on IO: `resolve` only clones an `Arc`.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::Error;

/// A rustls certificate resolver whose certificate can be swapped while serving.
pub struct ReloadingResolver {
    current: RwLock<Arc<CertifiedKey>>,
    expiry: AtomicI64,
    files: Option<Files>,
}

struct Files {
    cert: PathBuf,
    key: PathBuf,
    seen: Mutex<Seen>,
}

/// Fingerprints of file contents already handled, so unchanged or known-bad content is skipped.
#[derive(Default)]
struct Seen {
    loaded: u64,
    rejected: Option<u64>,
}

impl fmt::Debug for ReloadingResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingResolver")
            .field("expiry", &self.expiry.load(Ordering::Relaxed))
            .field("cert_path", &self.files.as_ref().map(|f| &f.cert))
            .field("key_path", &self.files.as_ref().map(|f| &f.key))
            .finish_non_exhaustive()
    }
}

fn expiry_of(key: &CertifiedKey) -> Result<i64, Error> {
    let leaf = key.cert.first().ok_or_else(|| Error::ParseCertificate {
        reason: "empty certificate chain".to_owned(),
    })?;
    crate::load::not_after(leaf)
}

fn fingerprint(cert: &[u8], key: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    cert.hash(&mut hasher);
    key.hash(&mut hasher);
    hasher.finish()
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

impl ReloadingResolver {
    /// Load the pair from files (which must be valid now) and remember them for reloading.
    pub fn from_files(cert_path: &Path, key_path: &Path) -> Result<Self, Error> {
        let cert = read(cert_path, "serving certificate")?;
        let key = read(key_path, "private key")?;
        let certified = crate::load::certified_key_from_pem(
            &cert,
            &cert_path.display().to_string(),
            &key,
            &key_path.display().to_string(),
        )?;
        let resolver = Self::from_certified_key(certified)?;
        Ok(Self {
            files: Some(Files {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
                seen: Mutex::new(Seen {
                    loaded: fingerprint(&cert, &key),
                    rejected: None,
                }),
            }),
            ..resolver
        })
    }

    /// Serve a fixed pair (e.g. a generated self-signed one); [`Self::replace`] can still swap it.
    pub fn from_certified_key(key: CertifiedKey) -> Result<Self, Error> {
        let expiry = expiry_of(&key)?;
        Ok(Self {
            current: RwLock::new(Arc::new(key)),
            expiry: AtomicI64::new(expiry),
            files: None,
        })
    }

    /// The pair new handshakes get.
    #[must_use]
    pub fn current(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// `notAfter` of the current leaf certificate, Unix seconds.
    #[must_use]
    pub fn expiry_unix_seconds(&self) -> i64 {
        self.expiry.load(Ordering::Relaxed)
    }

    /// Swap in a new pair (used by reloads and by a future self-managed renewal).
    pub fn replace(&self, key: CertifiedKey) -> Result<(), Error> {
        let expiry = expiry_of(&key)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
        self.expiry.store(expiry, Ordering::Relaxed);
        Ok(())
    }

    /// Re-read the files; swap when their content changed and the new pair is good.
    ///
    /// Returns `Ok(true)` after a swap, `Ok(false)` when nothing changed (or the content was
    /// already rejected), and the error the first time a given bad content is seen; the old
    /// pair keeps serving in every error case.
    pub fn reload_if_changed(&self) -> Result<bool, Error> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        let cert = read(&files.cert, "serving certificate")?;
        let key = read(&files.key, "private key")?;
        let print = fingerprint(&cert, &key);
        let mut seen = files.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if print == seen.loaded || seen.rejected == Some(print) {
            return Ok(false);
        }
        let loaded = crate::load::certified_key_from_pem(
            &cert,
            &files.cert.display().to_string(),
            &key,
            &files.key.display().to_string(),
        )
        .and_then(|certified| self.replace(certified));
        match loaded {
            Ok(()) => {
                *seen = Seen {
                    loaded: print,
                    rejected: None,
                };
                Ok(true)
            }
            Err(e) => {
                seen.rejected = Some(print);
                Err(e)
            }
        }
    }

    /// Poll the files every `interval` until the runtime shuts down. Swaps are logged at info,
    /// bad pairs at warn (once per bad content; the old pair keeps serving).
    pub fn spawn_watcher(self: Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let resolver = Arc::clone(&self);
                match tokio::task::spawn_blocking(move || resolver.reload_if_changed()).await {
                    Ok(Ok(true)) => tracing::info!(
                        not_after = self.expiry_unix_seconds(),
                        "reloaded serving certificate"
                    ),
                    Ok(Ok(false)) => {}
                    Ok(Err(error)) => tracing::warn!(
                        %error,
                        "kept the current serving certificate: the new files are not a usable pair"
                    ),
                    Err(error) => tracing::error!(%error, "certificate reload task failed"),
                }
            }
        })
    }
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{generate_ca, issue_serving_cert, ServingCertificate};

    const DAY: Duration = Duration::from_secs(86_400);

    fn pair(days: u32) -> ServingCertificate {
        let ca = generate_ca("ca", DAY).unwrap();
        issue_serving_cert(&ca, &["localhost".to_owned()], DAY * days).unwrap()
    }

    fn write(dir: &Path, leaf: &ServingCertificate) {
        std::fs::write(dir.join("tls.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.join("tls.key"), &leaf.key_pem).unwrap();
    }

    fn resolver(dir: &Path) -> ReloadingResolver {
        ReloadingResolver::from_files(&dir.join("tls.crt"), &dir.join("tls.key")).unwrap()
    }

    #[test]
    fn unchanged_files_are_not_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &pair(1));
        let r = resolver(dir.path());
        let before = r.current();
        assert!(!r.reload_if_changed().unwrap());
        assert!(Arc::ptr_eq(&before, &r.current()));
    }

    #[test]
    fn new_files_swap_the_certificate_and_its_expiry() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &pair(1));
        let r = resolver(dir.path());
        let old_expiry = r.expiry_unix_seconds();
        let next = pair(3);
        write(dir.path(), &next);
        assert!(r.reload_if_changed().unwrap());
        let served = r.current();
        let expected = crate::load::certified_key_from_pem(
            next.cert_pem.as_bytes(),
            "m",
            next.key_pem.as_bytes(),
            "m",
        )
        .unwrap();
        assert_eq!(served.cert, expected.cert);
        assert!(r.expiry_unix_seconds() > old_expiry + 86_400);
    }

    #[test]
    fn a_mismatched_new_pair_keeps_the_old_one_and_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &pair(1));
        let r = resolver(dir.path());
        let before = r.current();
        std::fs::write(dir.path().join("tls.crt"), pair(1).cert_pem).unwrap();
        assert!(r.reload_if_changed().is_err());
        assert!(Arc::ptr_eq(&before, &r.current()));
        assert!(
            !r.reload_if_changed().unwrap(),
            "the same bad content is reported once"
        );
        // Completing the rotation (matching key arrives) is then picked up.
        let good = pair(2);
        write(dir.path(), &good);
        assert!(r.reload_if_changed().unwrap());
        assert!(!Arc::ptr_eq(&before, &r.current()));
    }

    #[test]
    fn a_kubernetes_style_symlink_swap_is_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let first = root.join("..2024_1");
        std::fs::create_dir(&first).unwrap();
        write(&first, &pair(1));
        std::os::unix::fs::symlink("..2024_1", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/tls.crt", root.join("tls.crt")).unwrap();
        std::os::unix::fs::symlink("..data/tls.key", root.join("tls.key")).unwrap();
        let r = resolver(root);
        let before = r.current();

        let second = root.join("..2024_2");
        std::fs::create_dir(&second).unwrap();
        write(&second, &pair(1));
        std::os::unix::fs::symlink("..2024_2", root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        std::fs::remove_dir_all(&first).unwrap();

        assert!(r.reload_if_changed().unwrap());
        assert!(!Arc::ptr_eq(&before, &r.current()));
    }

    #[test]
    fn a_fixed_pair_never_reloads_but_can_be_replaced() {
        let first = pair(1).certified_key().unwrap();
        let r = ReloadingResolver::from_certified_key(first).unwrap();
        assert!(!r.reload_if_changed().unwrap());
        let before = r.current();
        r.replace(pair(2).certified_key().unwrap()).unwrap();
        assert!(!Arc::ptr_eq(&before, &r.current()));
    }
}
