//! A small Vault / OpenBao client over `vaultrs`: login, KV v2 read with version, CAS write, list.
//!
//! Owns: the HTTP client (TLS with an optional CA file), the login methods (kubernetes, approle,
//! token file — credentials re-read from their files at every login), re-login on 403, the
//! token's life (renewed at 2/3 of its TTL while in use, a new login when renewal fails or
//! `token_max_ttl` is reached, the replaced token revoked, revoked on exit: see [`next_step`] and
//! [`TokenRenewal`]), and the KV v2 calls the sidecar, the gateway and `keys` need.
//! Must never: log or return a token or a secret value in an error; read the process environment
//! (vaultrs' `VAULT_*` defaults are overridden explicitly); renew or revoke a token it did not
//! log in for (`--vault-auth token`: the file's owner manages that token).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::{Notify, RwLock};
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

/// Bound on revoking a token: on exit (inside the sidecar's 900 ms shutdown deadline) and when a
/// new login replaces it. A revocation that does not happen leaves a lease that expires at its
/// TTL, which is what happened before revocation existed.
pub const REVOKE_TIMEOUT: Duration = Duration::from_millis(500);

/// Why a token in use is replaced by a new login (the label of `…_vault_token_relogins_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relogin {
    /// A renewal returned less than the login's TTL: `token_max_ttl` is near.
    MaxTtl,
    /// The token cannot be renewed (`renewable: false`).
    NotRenewable,
    /// Renewing failed (the token expired, was revoked, or Vault refused).
    RenewalFailed,
    /// A request got 401/403 (the token is gone, or the policy refuses the path).
    Forbidden,
}

impl Relogin {
    /// The metric label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxTtl => "max_ttl",
            Self::NotRenewable => "not_renewable",
            Self::RenewalFailed => "renewal_failed",
            Self::Forbidden => "forbidden",
        }
    }
}

/// Counters of the token's life, shared with a metrics registry (clones share values).
#[derive(Debug, Clone, Default)]
pub struct TokenCounters {
    /// Successful renewals (`auth/token/renew-self`).
    pub renewals: Counter,
    /// Failed renewals (each followed by a new login).
    pub renewal_failures: Counter,
    /// New logins in place of a token in use, by [`Relogin`] reason.
    pub relogins: Family<Vec<(String, String)>, Counter>,
    /// Tokens revoked: replaced by a new login, or on exit.
    pub revocations: Counter,
    /// Revocations that failed or timed out (the lease then expires at its TTL).
    pub revocation_failures: Counter,
    /// Failed logins of the renewal task; not registered by [`TokenCounters::register`] (the
    /// sidecar shares its `…_vault_login_failures` counter here).
    pub login_failures: Counter,
}

impl TokenCounters {
    /// Registers the counters as `<prefix>_vault_token_*` (all but `login_failures`).
    pub fn register(&self, r: &mut Registry, prefix: &str) {
        r.register(
            format!("{prefix}_vault_token_renewals"),
            "Vault token renewals (auth/token/renew-self), at 2/3 of the token's TTL",
            self.renewals.clone(),
        );
        r.register(
            format!("{prefix}_vault_token_renewal_failures"),
            "Failed Vault token renewals (each followed by a new login)",
            self.renewal_failures.clone(),
        );
        r.register(
            format!("{prefix}_vault_token_relogins"),
            "New Vault logins that replaced a token in use, by reason (max_ttl, not_renewable, \
             renewal_failed, forbidden); the replaced token is revoked",
            self.relogins.clone(),
        );
        r.register(
            format!("{prefix}_vault_token_revocations"),
            "Vault tokens revoked (auth/token/revoke-self): replaced by a new login, or on exit",
            self.revocations.clone(),
        );
        r.register(
            format!("{prefix}_vault_token_revocation_failures"),
            "Vault token revocations that failed or timed out (the lease expires at its TTL)",
            self.revocation_failures.clone(),
        );
    }

    fn count_relogin(&self, why: Relogin) {
        self.relogins
            .get_or_create(&vec![("reason".to_owned(), why.as_str().to_owned())])
            .inc();
    }
}

/// The lease of the token in use, as the login or the last renewal gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// When the token got its current TTL (the login, or the last renewal).
    pub since: Instant,
    /// Its TTL then.
    pub ttl: Duration,
    /// The TTL the login gave: a renewal that returns less is capped by `token_max_ttl`.
    pub login_ttl: Duration,
    /// Whether Vault allows renewing it.
    pub renewable: bool,
}

/// What to do with the token next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStep {
    /// Renew it (`auth/token/renew-self`).
    Renew,
    /// Log in again (and revoke it), for this reason.
    Login(Relogin),
}

/// When and how the token is kept alive: at 2/3 of its TTL, renew it; a token that cannot be
/// renewed, or whose last renewal returned less than the login's TTL (so `token_max_ttl` is
/// near and renewing can only shrink it), is replaced by a new login at that point instead.
#[must_use]
pub fn next_step(lease: &Lease) -> (Instant, TokenStep) {
    let at = lease.since + lease.ttl * 2 / 3;
    let step = if !lease.renewable {
        TokenStep::Login(Relogin::NotRenewable)
    } else if lease.ttl < lease.login_ttl {
        TokenStep::Login(Relogin::MaxTtl)
    } else {
        TokenStep::Renew
    };
    (at, step)
}

/// The token this client holds: its lease (`None`: none, or one that never expires) and a
/// generation that every new token bumps (a renewal answer for a replaced token is dropped).
#[derive(Debug, Default)]
struct TokenState {
    lease: Option<Lease>,
    generation: u64,
    /// A token from a login (not `--vault-auth token`) is installed: it may be revoked.
    owned: bool,
}

/// A logged-in (or about to be) Vault client shared by the control loop's tasks.
pub struct Vault {
    settings: VaultSettings,
    client: RwLock<VaultClient>,
    token: Mutex<TokenState>,
    /// Wakes the renewal task when a login installs a new token.
    token_changed: Notify,
    counters: TokenCounters,
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
            token: Mutex::default(),
            token_changed: Notify::new(),
            counters: TokenCounters::default(),
        })
    }

    /// Counts the token's renewals, new logins and revocations in `counters` (shared with a
    /// metrics registry).
    #[must_use]
    pub fn with_token_counters(mut self, counters: TokenCounters) -> Self {
        self.counters = counters;
        self
    }

    fn token_state(&self) -> std::sync::MutexGuard<'_, TokenState> {
        self.token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The lease of the token in use (`None`: not logged in, a token that never expires, or
    /// `--vault-auth token`).
    #[must_use]
    pub fn lease(&self) -> Option<Lease> {
        self.token_state().lease
    }

    /// The settings this client was built with.
    #[must_use]
    pub fn settings(&self) -> &VaultSettings {
        &self.settings
    }

    /// Logs in with the configured method, re-reading credentials from their files. A token
    /// from an earlier login is revoked once the new one is in place (bounded by
    /// [`REVOKE_TIMEOUT`]), so a new login leaves no lease behind.
    pub async fn login(&self) -> Result<()> {
        let auth = &self.settings.auth;
        let login_err = |reason: String| SidecarError::VaultLogin {
            method: auth.method(),
            mount: auth.mount(),
            reason,
        };
        let (token, info) = match auth {
            VaultAuth::Token { file } => (read_secret_file(file)?, None),
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
                (Secret::new(info.client_token.clone()), Some(info))
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
                (Secret::new(info.client_token.clone()), Some(info))
            }
        };
        if token.is_empty() {
            return Err(login_err("empty token".to_owned()));
        }
        let lease = info.as_ref().and_then(|i| {
            (i.lease_duration > 0).then(|| {
                let ttl = Duration::from_secs(i.lease_duration);
                Lease {
                    since: Instant::now(),
                    ttl,
                    login_ttl: ttl,
                    renewable: i.renewable,
                }
            })
        });
        drop(info);
        let mut client = self.client.write().await;
        if self.token_state().owned {
            self.revoke_held(&client).await;
        }
        client.set_token(token.expose());
        {
            let mut state = self.token_state();
            state.lease = lease;
            state.generation += 1;
            state.owned = !matches!(auth, VaultAuth::Token { .. });
        }
        drop(client);
        self.token_changed.notify_one();
        Ok(())
    }

    /// Logs in again because a request got 401/403 (the old token is revoked when possible).
    async fn relogin(&self) -> Result<()> {
        self.counters.count_relogin(Relogin::Forbidden);
        self.login().await
    }

    /// Revokes the token `client` holds (`auth/token/revoke-self`), bounded by
    /// [`REVOKE_TIMEOUT`]; returns whether Vault confirmed it.
    async fn revoke_held(&self, client: &VaultClient) -> bool {
        let why =
            match tokio::time::timeout(REVOKE_TIMEOUT, vaultrs::token::revoke_self(client)).await {
                Ok(Ok(())) => {
                    self.counters.revocations.inc();
                    return true;
                }
                Ok(Err(e)) => match client_error_reason(&e) {
                    // A token Vault no longer accepts (expired, revoked): no lease is left.
                    (reason, Some(401 | 403)) => {
                        tracing::debug!(%reason, "the replaced Vault token was already invalid");
                        return true;
                    }
                    (reason, _) => reason,
                },
                Err(_) => format!("no answer within {} ms", REVOKE_TIMEOUT.as_millis()),
            };
        self.counters.revocation_failures.inc();
        tracing::warn!(reason = %why, "revoking the Vault token failed; its lease expires at its TTL");
        false
    }

    /// Revokes the token this client logged in for (nothing for `--vault-auth token`), bounded
    /// by [`REVOKE_TIMEOUT`]; the client holds no token afterwards. Call it on exit.
    pub async fn revoke(&self) -> bool {
        let mut client = self.client.write().await;
        let owned = {
            let mut state = self.token_state();
            state.lease = None;
            state.generation += 1;
            std::mem::replace(&mut state.owned, false)
        };
        if !owned {
            return true;
        }
        let revoked = self.revoke_held(&client).await;
        client.set_token("");
        drop(client);
        if revoked {
            tracing::info!("Vault token revoked");
        }
        revoked
    }

    /// Renews the token in use (`auth/token/renew-self`) and records its new lease.
    async fn renew(&self) -> Result<()> {
        let generation = self.token_state().generation;
        let client = self.client.read().await;
        let info = vaultrs::token::renew_self(&*client, None)
            .await
            .map_err(|e| {
                let (reason, status) = client_error_reason(&e);
                SidecarError::VaultAdmin {
                    op: "renew",
                    target: "the token (auth/token/renew-self)".to_owned(),
                    reason,
                    status,
                }
            })?;
        drop(client);
        let mut state = self.token_state();
        if state.generation == generation {
            if let Some(lease) = &mut state.lease {
                lease.since = Instant::now();
                lease.ttl = Duration::from_secs(info.lease_duration);
                lease.renewable = info.renewable;
            }
        }
        Ok(())
    }

    /// Keeps the token alive until the task is aborted: renews at 2/3 of its TTL, logs in again
    /// when renewal fails or `token_max_ttl` is near (see [`next_step`]); failed logins retry
    /// with backoff (1 s doubling to 30 s) while the old token may still be valid.
    async fn keep_alive(&self) {
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            let changed = self.token_changed.notified();
            let Some((at, step)) = self.lease().as_ref().map(next_step) else {
                changed.await;
                continue;
            };
            tokio::select! {
                () = tokio::time::sleep_until(at.into()) => {}
                () = changed => continue,
            }
            let relogin = match step {
                TokenStep::Renew => match self.renew().await {
                    Ok(()) => {
                        self.counters.renewals.inc();
                        backoff.reset();
                        let ttl = self.lease().map_or(0, |l| l.ttl.as_secs());
                        tracing::debug!(ttl_s = ttl, "Vault token renewed");
                        continue;
                    }
                    Err(e) => {
                        self.counters.renewal_failures.inc();
                        tracing::warn!(error = %e, "renewing the Vault token failed; logging in again");
                        Relogin::RenewalFailed
                    }
                },
                TokenStep::Login(why) => why,
            };
            self.counters.count_relogin(relogin);
            match self.login().await {
                Ok(()) => {
                    backoff.reset();
                    tracing::info!(
                        reason = relogin.as_str(),
                        "logged in to Vault again; the old token is revoked"
                    );
                }
                Err(e) => {
                    self.counters.login_failures.inc();
                    let delay = backoff.next_delay(rand::random::<f64>());
                    tracing::warn!(reason = relogin.as_str(), error = %e, retry_in_ms = delay.as_millis(), "logging in to Vault again failed");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// [`Vault::new`] counting the token's life in `counters`, with its token kept alive from
    /// now on ([`Vault::renew_in_background`]): what a long-running command (`run`, `gateway`)
    /// starts with.
    pub fn with_renewal(
        settings: VaultSettings,
        counters: TokenCounters,
    ) -> Result<(Arc<Self>, TokenRenewal)> {
        let vault = Arc::new(Self::new(settings)?.with_token_counters(counters));
        let renewal = vault.renew_in_background();
        Ok((vault, renewal))
    }

    /// Starts keeping the token alive in the background (on the current tokio runtime); end it
    /// with [`TokenRenewal::finish`], which also revokes the token.
    #[must_use]
    pub fn renew_in_background(self: &Arc<Self>) -> TokenRenewal {
        let vault = Arc::clone(self);
        let task = tokio::spawn(async move { vault.keep_alive().await });
        TokenRenewal {
            vault: Arc::clone(self),
            task,
        }
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
            self.relogin().await?;
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
            self.relogin().await?;
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
            self.relogin().await?;
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
            self.relogin().await?;
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

/// The background task that keeps a [`Vault`] token alive ([`Vault::renew_in_background`]).
#[derive(Debug)]
pub struct TokenRenewal {
    vault: Arc<Vault>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenRenewal {
    /// Stops renewing and revokes the token (bounded by [`REVOKE_TIMEOUT`]): the clean-exit path.
    pub async fn finish(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
        self.vault.revoke().await;
    }
}

impl Drop for TokenRenewal {
    fn drop(&mut self) {
        self.task.abort();
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

    fn lease(ttl: u64, login_ttl: u64, renewable: bool) -> Lease {
        Lease {
            since: Instant::now(),
            ttl: Duration::from_secs(ttl),
            login_ttl: Duration::from_secs(login_ttl),
            renewable,
        }
    }

    #[test]
    fn a_token_is_renewed_at_two_thirds_of_its_ttl_and_replaced_once_renewal_cannot_extend_it() {
        let l = lease(3600, 3600, true);
        assert_eq!(
            next_step(&l),
            (l.since + Duration::from_secs(2400), TokenStep::Renew)
        );
        // A renewal capped by token_max_ttl (less than the login's TTL): log in again at 2/3
        // of what is left, before it expires.
        let l = lease(600, 3600, true);
        assert_eq!(
            next_step(&l),
            (
                l.since + Duration::from_secs(400),
                TokenStep::Login(Relogin::MaxTtl)
            )
        );
        let l = lease(90, 90, false);
        assert_eq!(
            next_step(&l),
            (
                l.since + Duration::from_secs(60),
                TokenStep::Login(Relogin::NotRenewable)
            )
        );
        assert_eq!(Relogin::RenewalFailed.as_str(), "renewal_failed");
        assert_eq!(Relogin::Forbidden.as_str(), "forbidden");
    }

    #[tokio::test]
    async fn a_token_from_a_file_is_never_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "operator-token").unwrap();
        // Nothing listens here: a revocation attempt would fail and be counted.
        let counters = TokenCounters::default();
        let vault = Vault::new(VaultSettings {
            addr: "http://127.0.0.1:9".to_owned(),
            ca_file: None,
            auth: VaultAuth::Token { file },
        })
        .unwrap()
        .with_token_counters(counters.clone());
        vault.login().await.unwrap();
        vault.login().await.unwrap();
        assert!(vault.lease().is_none());
        assert!(vault.revoke().await);
        assert_eq!(
            counters.revocations.get() + counters.revocation_failures.get(),
            0
        );
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
