//! A small Vault / OpenBao client over `vaultrs`: login, KV v2 read with version, CAS write, list.
//!
//! Owns: the HTTP client (TLS with an optional CA file), the login methods (kubernetes, approle,
//! token file — credentials re-read from their files at every login), re-login on 403, and the
//! KV v2 calls the sidecar, the gateway and `keys` need.
//! Must never: log or return a token or a secret value in an error; read the process environment
//! (vaultrs' `VAULT_*` defaults are overridden explicitly).

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use tokio::sync::RwLock;
use vaultrs::{
    api::{
        self,
        kv2::{requests::ReadSecretRequest, requests::SetSecretRequestOptions},
    },
    client::{Client, VaultClient, VaultClientSettingsBuilder},
    error::ClientError,
};

use crate::{
    error::{Result, SidecarError},
    secret::Secret,
};

/// How to authenticate to Vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuth {
    /// Kubernetes auth: the projected service-account JWT read from `jwt_file` at every login.
    Kubernetes {
        /// Auth mount (`kubernetes`).
        mount: String,
        /// Vault role.
        role: String,
        /// Projected token file.
        jwt_file: PathBuf,
    },
    /// AppRole with role-id and secret-id files.
    AppRole {
        /// Auth mount (`approle`).
        mount: String,
        /// File holding the role id.
        role_id_file: PathBuf,
        /// File holding the secret id.
        secret_id_file: PathBuf,
    },
    /// A Vault token read from a file.
    Token {
        /// The token file.
        file: PathBuf,
    },
}

impl VaultAuth {
    fn method(&self) -> &'static str {
        match self {
            Self::Kubernetes { .. } => "kubernetes",
            Self::AppRole { .. } => "approle",
            Self::Token { .. } => "token",
        }
    }

    fn mount(&self) -> String {
        match self {
            Self::Kubernetes { mount, .. } | Self::AppRole { mount, .. } => mount.clone(),
            Self::Token { .. } => "token".to_owned(),
        }
    }
}

/// Connection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultSettings {
    /// Address, e.g. `https://vault.vault:8200`.
    pub addr: String,
    /// CA bundle (PEM) for Vault's TLS; system roots when `None`.
    pub ca_file: Option<PathBuf>,
    /// Auth method.
    pub auth: VaultAuth,
}

/// One KV v2 secret version: every field wrapped as a [`Secret`], plus its version number.
#[derive(Debug, Clone)]
pub struct KvRecord {
    /// Field name → value.
    pub data: BTreeMap<String, Secret>,
    /// KV v2 version of this data.
    pub version: u64,
    /// When this version was written (KV v2 metadata `created_time`; `None` if unparsable).
    pub created_time: Option<jiff::Timestamp>,
}

/// Per-request timeout: a Vault that does not answer is a failure to retry, not a hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A logged-in (or about to be) Vault client shared by the control loop's tasks.
pub struct Vault {
    settings: VaultSettings,
    client: RwLock<VaultClient>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

pub(crate) fn read_secret_file(path: &std::path::Path) -> Result<Secret> {
    std::fs::read_to_string(path)
        .map(Secret::new)
        .map_err(|source| SidecarError::ReadFile {
            path: path.to_owned(),
            source,
        })
}

fn client_error_reason(e: &ClientError) -> (String, Option<u16>) {
    match e {
        ClientError::APIError { code, errors } => {
            (format!("status {code}: {}", errors.join("; ")), Some(*code))
        }
        other => {
            // The client's own message ("An error occurred with the request") hides the cause:
            // append the source chain (connection refused, timed out, bad certificate…).
            let mut reason = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                let text = cause.to_string();
                if !reason.contains(&text) {
                    reason.push_str(": ");
                    reason.push_str(&text);
                }
                source = cause.source();
            }
            (reason, None)
        }
    }
}

/// Whether `addr` is plaintext `http://` (the scheme in any case).
fn is_plaintext(addr: &str) -> bool {
    addr.get(.."http://".len())
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"))
}

impl Vault {
    /// Builds the client (reads the CA file now; does not contact Vault). Every command that
    /// talks to Vault (`run`, `gateway`, `keys`, `vault bootstrap`) builds its one client here,
    /// so this is where a plaintext address is warned about, once per process.
    pub fn new(settings: VaultSettings) -> Result<Self> {
        if is_plaintext(&settings.addr) {
            tracing::warn!(
                vault_addr = %settings.addr,
                "--vault-addr is plaintext http://: Vault traffic (tokens, private and preshared \
                 keys) crosses the network in the clear; use https:// with --vault-ca-file"
            );
        }
        let client_err = |reason: String| SidecarError::VaultClient {
            addr: settings.addr.clone(),
            reason,
        };
        let ca_certs = settings
            .ca_file
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>();
        let built = VaultClientSettingsBuilder::default()
            .address(settings.addr.as_str())
            .token("")
            .ca_certs(ca_certs)
            .verify(true)
            .timeout(Some(REQUEST_TIMEOUT))
            .build()
            .map_err(|e| client_err(e.to_string()))?;
        let client = VaultClient::new(built).map_err(|e| client_err(e.to_string()))?;
        Ok(Self {
            settings,
            client: RwLock::new(client),
        })
    }

    /// The settings this client was built with.
    #[must_use]
    pub fn settings(&self) -> &VaultSettings {
        &self.settings
    }

    /// Logs in with the configured method, re-reading credentials from their files.
    pub async fn login(&self) -> Result<()> {
        let auth = &self.settings.auth;
        let login_err = |reason: String| SidecarError::VaultLogin {
            method: auth.method(),
            mount: auth.mount(),
            reason,
        };
        let token = match auth {
            VaultAuth::Token { file } => read_secret_file(file)?,
            VaultAuth::Kubernetes {
                mount,
                role,
                jwt_file,
            } => {
                let jwt = read_secret_file(jwt_file)?;
                let client = self.client.read().await;
                let info = vaultrs::auth::kubernetes::login(&*client, mount, role, jwt.expose())
                    .await
                    .map_err(|e| login_err(client_error_reason(&e).0))?;
                Secret::new(info.client_token)
            }
            VaultAuth::AppRole {
                mount,
                role_id_file,
                secret_id_file,
            } => {
                let role_id = read_secret_file(role_id_file)?;
                let secret_id = read_secret_file(secret_id_file)?;
                let client = self.client.read().await;
                let info = vaultrs::auth::approle::login(
                    &*client,
                    mount,
                    role_id.expose(),
                    secret_id.expose(),
                )
                .await
                .map_err(|e| login_err(client_error_reason(&e).0))?;
                Secret::new(info.client_token)
            }
        };
        if token.is_empty() {
            return Err(login_err("empty token".to_owned()));
        }
        self.client.write().await.set_token(token.expose());
        Ok(())
    }

    fn needs_relogin(r: &Result<impl Sized>) -> bool {
        matches!(
            r,
            Err(SidecarError::VaultKv {
                status: Some(401 | 403),
                ..
            })
        )
    }

    /// Reads the latest version of a KV v2 secret with its version number; logs in again once on 403.
    pub async fn read(&self, mount: &str, path: &str) -> Result<KvRecord> {
        let first = self.read_once(mount, path).await;
        if Self::needs_relogin(&first) {
            self.login().await?;
            return self.read_once(mount, path).await;
        }
        first
    }

    async fn read_once(&self, mount: &str, path: &str) -> Result<KvRecord> {
        let client = self.client.read().await;
        let client = &*client;
        let kv_err = |e: &ClientError| {
            let (reason, status) = client_error_reason(e);
            SidecarError::VaultKv {
                op: "read",
                mount: mount.to_owned(),
                path: path.to_owned(),
                reason,
                status,
            }
        };
        let req = ReadSecretRequest::builder()
            .mount(mount)
            .path(path)
            .build()
            .map_err(|e| SidecarError::VaultKv {
                op: "read",
                mount: mount.to_owned(),
                path: path.to_owned(),
                reason: e.to_string(),
                status: None,
            })?;
        let res = api::exec_with_result(client, req)
            .await
            .map_err(|e| kv_err(&e))?;
        let mut data = BTreeMap::new();
        if let serde_json::Value::Object(map) = res.data {
            for (k, v) in map {
                let s = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                data.insert(k, Secret::new(s));
            }
        }
        Ok(KvRecord {
            data,
            version: res.metadata.version,
            created_time: res.metadata.created_time.parse().ok(),
        })
    }

    /// Writes a KV v2 secret. With `cas = Some(v)` the write only succeeds when the current
    /// version is `v` (`Some(0)`: only if absent). Returns the new version.
    pub async fn write(
        &self,
        mount: &str,
        path: &str,
        data: &BTreeMap<String, Secret>,
        cas: Option<u32>,
    ) -> Result<u64> {
        let first = self.write_once(mount, path, data, cas).await;
        if Self::needs_relogin(&first) {
            self.login().await?;
            return self.write_once(mount, path, data, cas).await;
        }
        first
    }

    async fn write_once(
        &self,
        mount: &str,
        path: &str,
        data: &BTreeMap<String, Secret>,
        cas: Option<u32>,
    ) -> Result<u64> {
        let client = self.client.read().await;
        let client = &*client;
        let plain: BTreeMap<&str, &str> =
            data.iter().map(|(k, v)| (k.as_str(), v.expose())).collect();
        let res = match cas {
            Some(cas) => {
                vaultrs::kv2::set_with_options(
                    client,
                    mount,
                    path,
                    &plain,
                    SetSecretRequestOptions { cas },
                )
                .await
            }
            None => vaultrs::kv2::set(client, mount, path, &plain).await,
        };
        res.map(|m| m.version).map_err(|e| {
            let (reason, status) = client_error_reason(&e);
            SidecarError::VaultKv {
                op: "write",
                mount: mount.to_owned(),
                path: path.to_owned(),
                reason,
                status,
            }
        })
    }

    /// Lists the keys under a KV v2 folder (names ending in `/` are sub-folders).
    pub async fn list(&self, mount: &str, path: &str) -> Result<Vec<String>> {
        let first = self.list_once(mount, path).await;
        if Self::needs_relogin(&first) {
            self.login().await?;
            return self.list_once(mount, path).await;
        }
        first
    }

    /// Deletes a KV v2 secret with all its versions and metadata (an allocation rolled back, an
    /// identity removed), logging in again once on 403.
    pub async fn delete_all(&self, mount: &str, path: &str) -> Result<()> {
        let once = || async {
            let client = self.client.read().await;
            vaultrs::kv2::delete_metadata(&*client, mount, path)
                .await
                .map_err(|e| {
                    let (reason, status) = client_error_reason(&e);
                    SidecarError::VaultKv {
                        op: "delete",
                        mount: mount.to_owned(),
                        path: path.to_owned(),
                        reason,
                        status,
                    }
                })
        };
        let first = once().await;
        if Self::needs_relogin(&first) {
            self.login().await?;
            return once().await;
        }
        first
    }

    /// The accessor of the auth method mounted at `mount` (policies name alias metadata by it).
    pub async fn auth_accessor(&self, mount: &str) -> Result<String> {
        let client = self.client.read().await;
        let mounts = vaultrs::sys::auth::list(&*client).await.map_err(|e| {
            let (reason, status) = client_error_reason(&e);
            SidecarError::VaultAdmin {
                op: "list the auth methods for",
                target: format!("{mount}/"),
                reason,
                status,
            }
        })?;
        let key = format!("{}/", mount.trim_matches('/'));
        match mounts.get(&key) {
            Some(m) if m.mount_type == "kubernetes" => Ok(m.accessor.clone()),
            Some(m) => Err(SidecarError::VaultAdmin {
                op: "use",
                target: format!("auth mount {key}"),
                reason: format!("it is a {} auth method, not kubernetes", m.mount_type),
                status: None,
            }),
            None => Err(SidecarError::VaultAdmin {
                op: "find",
                target: format!("auth mount {key}"),
                reason: format!(
                    "it is not enabled: run `bao auth enable -path={} kubernetes` and write its \
                     config (docs/install.md, First run, step 1)",
                    key.trim_end_matches('/')
                ),
                status: None,
            }),
        }
    }

    /// Writes (creates or replaces) an ACL policy.
    pub async fn write_policy(&self, name: &str, hcl: &str) -> Result<()> {
        let client = self.client.read().await;
        vaultrs::sys::policy::set(&*client, name, hcl)
            .await
            .map_err(|e| {
                let (reason, status) = client_error_reason(&e);
                SidecarError::VaultAdmin {
                    op: "write policy",
                    target: name.to_owned(),
                    reason,
                    status,
                }
            })
    }

    /// Writes (creates or replaces) a Kubernetes-auth role.
    pub async fn write_kubernetes_role(
        &self,
        mount: &str,
        role: &crate::bootstrap::RoleSpec,
        audience: &str,
        ttl: &str,
    ) -> Result<()> {
        let client = self.client.read().await;
        let mut builder = api::auth::kubernetes::requests::CreateKubernetesRoleRequest::builder();
        builder
            .bound_service_account_names(role.service_accounts.clone())
            .bound_service_account_namespaces(role.namespaces.clone())
            .audience(audience)
            .token_ttl(ttl)
            .token_policies(role.policies.clone());
        vaultrs::auth::kubernetes::role::create(
            &*client,
            mount.trim_matches('/'),
            &role.name,
            Some(&mut builder),
        )
        .await
        .map_err(|e| {
            let (reason, status) = client_error_reason(&e);
            SidecarError::VaultAdmin {
                op: "write role",
                target: format!("auth/{}/role/{}", mount.trim_matches('/'), role.name),
                reason,
                status,
            }
        })
    }

    async fn list_once(&self, mount: &str, path: &str) -> Result<Vec<String>> {
        let client = self.client.read().await;
        let client = &*client;
        vaultrs::kv2::list(client, mount, path).await.map_err(|e| {
            let (reason, status) = client_error_reason(&e);
            SidecarError::VaultKv {
                op: "list",
                mount: mount.to_owned(),
                path: path.to_owned(),
                reason,
                status,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::{Arc, Mutex};

    /// The log lines `Vault::new` writes for `addr`, captured from a local subscriber.
    fn log_of_building_a_client_for(addr: &str) -> String {
        let lines = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = Arc::clone(&lines);
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || CaptureWriter(Arc::clone(&sink)))
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            Vault::new(VaultSettings {
                addr: addr.to_owned(),
                ca_file: None,
                auth: VaultAuth::Token {
                    file: PathBuf::from("/nonexistent/token"),
                },
            })
            .unwrap();
        });
        let captured = lines.lock().unwrap().clone();
        String::from_utf8(captured).unwrap()
    }

    struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for CaptureWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_plaintext_vault_address_is_warned_about_once_when_the_client_is_built() {
        let log = log_of_building_a_client_for("http://127.0.0.1:8200");
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(log.contains("WARN") && log.contains("plaintext"), "{log}");
        assert!(log.contains("http://127.0.0.1:8200"), "{log}");
        assert!(is_plaintext("HTTP://vault:8200"));
    }

    #[test]
    fn an_https_vault_address_builds_a_client_without_a_warning() {
        let log = log_of_building_a_client_for("https://vault.vault.svc:8200");
        assert_eq!(log, "");
    }
}
