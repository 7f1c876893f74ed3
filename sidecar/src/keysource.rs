//! Where the sidecar's keys come from: the records, their parsing, and the [`KeySource`] seam.
//!
//! Owns: the typed private record (a static identity's, or a hand-wired sidecar's) and gateway
//! record (`wg/gateways/<name>`) with their validation, and the sources: a key born in the Pod
//! and registered through Vault ([`RegisteredKeySource`], the default), a private record in
//! Vault KV v2, and a mounted folder.
//! Must never: log a private or preshared key, or keep one outside a [`Secret`].

use std::{
    collections::BTreeMap,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use base64::Engine;
use ipnet::IpNet;

use crate::{
    error::{Result, SidecarError},
    keys::PeerRecord,
    registration::{Layout, PodIdentity, Registration, Verdict},
    rotation::PodKeyStep,
    secret::Secret,
    vault::Vault,
};

/// The Pod's own record: private key, addresses, optional preshared key.
#[derive(Debug, Clone)]
pub struct PrivateRecord {
    /// Base64 WireGuard private key.
    pub private_key: Secret,
    /// Interface addresses (IPv4 and/or IPv6), as CIDRs.
    pub addresses: Vec<IpNet>,
    /// Optional base64 preshared key.
    pub preshared_key: Option<Secret>,
    /// Apply this key only at or after this instant (rotation).
    pub not_before: Option<jiff::Timestamp>,
    /// Version of the record (KV v2 version, or a change counter for files).
    pub version: u64,
}

/// The gateway's public record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRecord {
    /// Base64 public key of the gateway.
    pub public_key: String,
    /// Endpoints `host:port`, tried in turn.
    pub endpoints: Vec<String>,
    /// CIDRs reachable through the gateway (empty: use `--routes`).
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between the keepalives the gateway sends each peer (`keepalive` field, written by
    /// `keys provision-gateway`). When set, a session that stays silent for `--failover-after`
    /// means the gateway is gone; when absent only the handshake rule applies.
    pub keepalive: Option<u16>,
    /// The Pods' address pools (one IPv4 and/or one IPv6 CIDR; `pool` field): registering
    /// sidecars claim their tunnel address from them.
    pub pool: Vec<IpNet>,
    /// Version of the record.
    pub version: u64,
}

/// Decodes a base64 WireGuard key (32 bytes); the error never contains the value.
pub fn decode_key(source_name: &str, field: &str, value: &str) -> Result<[u8; 32]> {
    let bad = || SidecarError::InvalidRecord {
        source_name: source_name.to_owned(),
        reason: format!("field {field} is not a base64 32-byte WireGuard key"),
    };
    let mut bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|_| bad())?;
    let out: [u8; 32] = bytes.as_slice().try_into().map_err(|_| bad())?;
    zeroize::Zeroize::zeroize(&mut bytes);
    Ok(out)
}

/// Parses a comma list of CIDRs; a bare address becomes a host prefix.
pub fn parse_cidrs(source_name: &str, field: &str, value: &str) -> Result<Vec<IpNet>> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| SidecarError::InvalidRecord {
                    source_name: source_name.to_owned(),
                    reason: format!("field {field}: {s:?} is not a CIDR or IP address"),
                })
        })
        .collect()
}

fn split_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn required<'a>(
    source_name: &str,
    fields: &'a BTreeMap<String, Secret>,
    field: &str,
) -> Result<&'a Secret> {
    fields
        .get(field)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| SidecarError::InvalidRecord {
            source_name: source_name.to_owned(),
            reason: format!("missing field {field}"),
        })
}

impl PrivateRecord {
    /// Builds and validates the record from its fields.
    pub fn from_fields(
        source_name: &str,
        fields: &BTreeMap<String, Secret>,
        version: u64,
    ) -> Result<Self> {
        let private_key = required(source_name, fields, "private_key")?.clone();
        decode_key(source_name, "private_key", private_key.expose())?;
        let preshared_key = fields
            .get("preshared_key")
            .filter(|v| !v.is_empty())
            .cloned();
        if let Some(psk) = &preshared_key {
            decode_key(source_name, "preshared_key", psk.expose())?;
        }
        let addresses = parse_cidrs(
            source_name,
            "address",
            required(source_name, fields, "address")?.expose(),
        )?;
        if addresses.is_empty() {
            return Err(SidecarError::InvalidRecord {
                source_name: source_name.to_owned(),
                reason: "field address holds no address".to_owned(),
            });
        }
        let not_before = match fields.get("not_before").filter(|v| !v.is_empty()) {
            None => None,
            Some(v) => Some(v.expose().parse::<jiff::Timestamp>().map_err(|e| {
                SidecarError::InvalidRecord {
                    source_name: source_name.to_owned(),
                    reason: format!("field not_before is not RFC 3339: {e}"),
                }
            })?),
        };
        Ok(Self {
            private_key,
            addresses,
            preshared_key,
            not_before,
            version,
        })
    }

    /// The base64 public key matching the private key (safe to log).
    pub fn public_key(&self) -> Result<String> {
        let mut raw = decode_key("private record", "private_key", self.private_key.expose())?;
        let key = defguard_wireguard_rs::key::Key::new(raw);
        zeroize::Zeroize::zeroize(&mut raw);
        Ok(key.public_key().to_string())
    }
}

impl GatewayRecord {
    /// Builds and validates the gateway record from its fields.
    pub fn from_fields(
        source_name: &str,
        fields: &BTreeMap<String, Secret>,
        version: u64,
    ) -> Result<Self> {
        let public_key = required(source_name, fields, "public_key")?
            .expose()
            .to_owned();
        decode_key(source_name, "public_key", &public_key)?;
        let endpoints = fields
            .get("endpoints")
            .map(|v| split_list(v.expose()))
            .unwrap_or_default();
        let allowed_ips = match fields.get("allowed_ips") {
            Some(v) => parse_cidrs(source_name, "allowed_ips", v.expose())?,
            None => Vec::new(),
        };
        let keepalive = match fields.get("keepalive").filter(|v| !v.is_empty()) {
            None => None,
            Some(v) => match v.expose().parse::<u16>() {
                Ok(0) => None,
                Ok(k) => Some(k),
                Err(_) => {
                    return Err(SidecarError::InvalidRecord {
                        source_name: source_name.to_owned(),
                        reason: "field keepalive is not a number of seconds".to_owned(),
                    })
                }
            },
        };
        let pool = match fields.get("pool") {
            Some(v) => parse_cidrs(source_name, "pool", v.expose())?
                .into_iter()
                .map(|n| n.trunc())
                .collect(),
            None => Vec::new(),
        };
        Ok(Self {
            public_key,
            endpoints,
            allowed_ips,
            keepalive,
            pool,
            version,
        })
    }
}

/// The seam between the control loop and wherever keys live.
pub trait KeySource: Send + Sync {
    /// Human-readable name for logs (`vault secret/wg/keys/shop/web`, `file /var/run/...`).
    fn describe(&self) -> String;
    /// Makes the source usable (Vault: log in). Called before the first load and after failures.
    fn prepare(&self) -> impl std::future::Future<Output = Result<()>> + Send;
    /// Loads the Pod's private record.
    fn load_private(&self) -> impl std::future::Future<Output = Result<PrivateRecord>> + Send;
    /// Loads the gateway record.
    fn load_gateway(&self) -> impl std::future::Future<Output = Result<GatewayRecord>> + Send;
    /// True when the first load registers the Pod (failures are counted by reason).
    fn registers(&self) -> bool {
        false
    }
    /// The gateway's verdict on this Pod, when it refuses it (`None`: no verdict, or a source
    /// that does not register with a gateway).
    fn load_verdict(&self) -> impl std::future::Future<Output = Result<Option<Verdict>>> + Send {
        std::future::ready(Ok(None))
    }
    /// When the source next has news without anything in Vault changing (a Pod's own key
    /// rotation: publish the next key, fold it): the control loop polls then.
    fn next_change(&self) -> Option<std::time::SystemTime> {
        None
    }
}

/// Keys from Vault / OpenBao KV v2.
#[derive(Debug, Clone)]
pub struct VaultKeySource {
    vault: Arc<Vault>,
    kv_mount: String,
    key_path: String,
    gateway_path: String,
}

impl VaultKeySource {
    /// A source reading `key_path` and `gateway_path` under `kv_mount`.
    #[must_use]
    pub fn new(
        vault: Arc<Vault>,
        kv_mount: String,
        key_path: String,
        gateway_path: String,
    ) -> Self {
        Self {
            vault,
            kv_mount,
            key_path,
            gateway_path,
        }
    }
}

impl KeySource for VaultKeySource {
    fn describe(&self) -> String {
        format!("vault {}/{}", self.kv_mount, self.key_path)
    }

    async fn prepare(&self) -> Result<()> {
        self.vault.login().await
    }

    async fn load_private(&self) -> Result<PrivateRecord> {
        let rec = self.vault.read(&self.kv_mount, &self.key_path).await?;
        PrivateRecord::from_fields(
            &format!("{}/{}", self.kv_mount, self.key_path),
            &rec.data,
            rec.version,
        )
    }

    async fn load_gateway(&self) -> Result<GatewayRecord> {
        let rec = self.vault.read(&self.kv_mount, &self.gateway_path).await?;
        GatewayRecord::from_fields(
            &format!("{}/{}", self.kv_mount, self.gateway_path),
            &rec.data,
            rec.version,
        )
    }
}

/// A key born in the Pod (or a static identity's key from Vault), registered with the gateway
/// through Vault ([`crate::registration`]). The first load registers; later loads return the
/// registered record without asking Vault (the key lives as long as the process), unless the key
/// rotates in place ([`RegisteredKeySource::with_key_rotation`]): then the load at `rotates_at`
/// publishes a next key and returns it held back until `activate_at` + 0.5 s
/// (`not_before`), and the load after `activate_at` folds it into the record
/// ([`crate::rotation::pod_key_step`]).
#[derive(Debug)]
pub struct RegisteredKeySource {
    vault: Arc<Vault>,
    layout: Layout,
    pod: PodIdentity,
    gateway_path: String,
    static_key_path: Option<String>,
    /// Rotate the key born in the Pod this often (`--key-rotation-interval`).
    key_rotation: Option<std::time::Duration>,
    registered: tokio::sync::Mutex<Option<Registered>>,
    /// [`crate::rotation::pod_key_due`] of the published record (read without the async lock).
    rotation_due: std::sync::Mutex<Option<jiff::Timestamp>>,
    /// The gateway record read by the registration, handed to the first `load_gateway` (the
    /// control loop loads both right after each other: one Vault read, not two).
    fresh_gateway: std::sync::Mutex<Option<GatewayRecord>>,
}

impl RegisteredKeySource {
    /// A source registering `pod` with the gateway whose public record is `gateway_path`.
    #[must_use]
    pub fn new(
        vault: Arc<Vault>,
        layout: Layout,
        pod: PodIdentity,
        gateway_path: String,
        static_key_path: Option<String>,
    ) -> Self {
        Self {
            vault,
            layout,
            pod,
            gateway_path,
            static_key_path,
            key_rotation: None,
            registered: tokio::sync::Mutex::new(None),
            rotation_due: std::sync::Mutex::new(None),
            fresh_gateway: std::sync::Mutex::new(None),
        }
    }

    /// The same source rotating the Pod's key in place every `interval` (a static identity's
    /// key is never rotated here: `wg-sidecar keys rotate` does that).
    #[must_use]
    pub fn with_key_rotation(mut self, interval: Option<std::time::Duration>) -> Self {
        self.key_rotation = interval.filter(|_| self.static_key_path.is_none());
        self
    }

    fn set_rotation_due(&self, published: &PeerRecord) {
        *self
            .rotation_due
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            crate::rotation::pod_key_due(published);
    }

    /// Publishes `record` as the Pod's record; returns its KV version.
    async fn publish(&self, record: &PeerRecord) -> Result<u64> {
        let name = crate::registration::gateway_name(&self.gateway_path);
        let path = self.layout.record_path(name, &self.pod);
        self.vault
            .write(&self.layout.kv_mount, &path, &record.to_fields(), None)
            .await
    }

    /// One step of the Pod's own key rotation ([`crate::rotation::pod_key_step`]) on `reg`. A
    /// failed write changes nothing (the next poll tries again; the gateway keeps the key).
    async fn rotate(&self, reg: &mut Registered, interval: std::time::Duration) {
        let now = jiff::Timestamp::now();
        match crate::rotation::pod_key_step(&reg.published, interval, now) {
            PodKeyStep::Wait => return,
            PodKeyStep::Start {
                activate_at,
                rotates_at,
            } => {
                let (private_key, next_public_key) = crate::keys::generate_keypair();
                let mut next = reg.published.clone();
                next.next_public_key = Some(next_public_key.clone());
                next.activate_at = Some(activate_at);
                next.rotates_at = Some(rotates_at);
                match self.publish(&next).await {
                    Ok(version) => {
                        tracing::info!(pod = %self.pod.display(), public_key = %reg.published.public_key, %next_public_key, %activate_at, record_version = version, "key rotation: next key published");
                        next.version = version;
                        reg.published = next;
                        let margin =
                            jiff::SignedDuration::try_from(crate::rotation::POD_KEY_SWITCH_MARGIN)
                                .unwrap_or_default();
                        reg.private = PrivateRecord {
                            private_key,
                            not_before: activate_at.checked_add(margin).ok(),
                            version: reg.private.version + 1,
                            ..reg.private.clone()
                        };
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "key rotation: publishing the next key failed; keeping the current key, retrying at the next poll");
                    }
                }
            }
            PodKeyStep::Fold => {
                let mut folded = reg.published.clone();
                folded.public_key = folded.next_public_key.take().unwrap_or(folded.public_key);
                folded.activate_at = None;
                match self.publish(&folded).await {
                    Ok(version) => {
                        tracing::info!(pod = %self.pod.display(), public_key = %folded.public_key, rotates_at = %crate::logfmt::opt(folded.rotates_at.as_ref()), record_version = version, "key rotation: the next key is the key");
                        folded.version = version;
                        reg.published = folded;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "key rotation: folding the next key into the record failed; retrying at the next poll (gateways that read the record already switch at activate_at)");
                    }
                }
            }
        }
        self.set_rotation_due(&reg.published);
    }

    async fn read_gateway(&self) -> Result<GatewayRecord> {
        let rec = self
            .vault
            .read(&self.layout.kv_mount, &self.gateway_path)
            .await?;
        GatewayRecord::from_fields(
            &format!("{}/{}", self.layout.kv_mount, self.gateway_path),
            &rec.data,
            rec.version,
        )
    }

    /// The key pair to register: born now, or the static identity's.
    async fn key(&self) -> Result<(Secret, Vec<IpNet>)> {
        match &self.static_key_path {
            None => Ok((crate::keys::generate_keypair().0, Vec::new())),
            Some(path) => {
                let rec = self.vault.read(&self.layout.kv_mount, path).await?;
                let mut fields = rec.data;
                // A static record's address is optional: without one the pool assigns it.
                let fixed = if let Some(a) = fields.get("address").filter(|v| !v.is_empty()) {
                    parse_cidrs(path, "address", a.expose())?
                } else {
                    fields.insert("address".into(), Secret::new("0.0.0.0/32".into()));
                    Vec::new()
                };
                let p = PrivateRecord::from_fields(
                    &format!("{}/{path}", self.layout.kv_mount),
                    &fields,
                    rec.version,
                )?;
                Ok((p.private_key, fixed))
            }
        }
    }

    async fn register(&self) -> Result<Registered> {
        let gateway = self.read_gateway().await?;
        let (private_key, fixed) = self.key().await?;
        let preshared_key = crate::keys::generate_keypair().0;
        let public_key = public_key_of(&private_key)?;
        let name = crate::registration::gateway_name(&self.gateway_path);
        let r = crate::registration::register(
            &self.vault,
            &self.layout,
            &Registration {
                pod: &self.pod,
                gateway: name,
                gateway_record: &gateway,
                public_key: &public_key,
                preshared_key: &preshared_key,
                fixed_addresses: &fixed,
                rotates_at: self.key_rotation.map(|i| {
                    crate::rotation::first_pod_key_rotation(
                        jiff::Timestamp::now(),
                        i,
                        rand::random::<f64>(),
                    )
                }),
            },
        )
        .await?;
        let addresses: Vec<String> = r.addresses.iter().map(ToString::to_string).collect();
        tracing::info!(
            pod = %self.pod.display(),
            uid = %self.pod.uid,
            gateway = %name,
            %public_key,
            addresses = %addresses.join(","),
            kept_address = r.reused,
            static_identity = self.static_key_path.is_some(),
            "registered with the gateway"
        );
        *self
            .fresh_gateway
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(gateway);
        self.set_rotation_due(&r.record);
        Ok(Registered {
            private: PrivateRecord {
                private_key,
                addresses: r.addresses,
                preshared_key: Some(preshared_key),
                not_before: None,
                version: 1,
            },
            published: r.record,
        })
    }
}

/// What a registered sidecar holds: its key (or the next one, held back until its
/// `not_before`) and the record it published last.
#[derive(Debug)]
struct Registered {
    private: PrivateRecord,
    published: PeerRecord,
}

/// The base64 public key of a base64 private key.
fn public_key_of(private_key: &Secret) -> Result<String> {
    let mut raw = decode_key("generated key", "private_key", private_key.expose())?;
    let key = defguard_wireguard_rs::key::Key::new(raw);
    zeroize::Zeroize::zeroize(&mut raw);
    Ok(key.public_key().to_string())
}

impl KeySource for RegisteredKeySource {
    fn describe(&self) -> String {
        format!(
            "vault registration {}/{}",
            self.layout.kv_mount,
            self.layout.record_path(
                crate::registration::gateway_name(&self.gateway_path),
                &self.pod
            )
        )
    }

    fn registers(&self) -> bool {
        true
    }

    async fn prepare(&self) -> Result<()> {
        self.vault.login().await
    }

    async fn load_private(&self) -> Result<PrivateRecord> {
        let mut slot = self.registered.lock().await;
        if let Some(reg) = &mut *slot {
            if let Some(interval) = self.key_rotation {
                self.rotate(reg, interval).await;
            }
            return Ok(reg.private.clone());
        }
        let reg = self.register().await?;
        let p = reg.private.clone();
        *slot = Some(reg);
        Ok(p)
    }

    fn next_change(&self) -> Option<std::time::SystemTime> {
        let due = *self
            .rotation_due
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        due.filter(|t| *t > jiff::Timestamp::now())
            .map(std::time::SystemTime::from)
    }

    async fn load_verdict(&self) -> Result<Option<Verdict>> {
        let gateway = crate::registration::gateway_name(&self.gateway_path);
        let path = self.layout.verdict_path(gateway, &self.pod);
        match self.vault.read(&self.layout.kv_mount, &path).await {
            Ok(rec) => Verdict::from_fields(&format!("{}/{path}", self.layout.kv_mount), &rec.data)
                // Only a verdict on this Pod counts (the path says so; the record must agree).
                .map(|v| (v.pod == self.pod).then_some(v)),
            Err(SidecarError::VaultKv {
                status: Some(404), ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn load_gateway(&self) -> Result<GatewayRecord> {
        let fresh = self
            .fresh_gateway
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match fresh {
            Some(g) => Ok(g),
            None => self.read_gateway().await,
        }
    }
}

/// Keys from a mounted folder: `private_key`, `address`, optional `preshared_key`,
/// `peer_public_key`, optional `peer_endpoints`, optional `peer_allowed_ips`, optional `not_before`.
/// Versions count content changes, starting at 1.
#[derive(Debug)]
pub struct FileKeySource {
    dir: PathBuf,
    private_state: Mutex<(u64, u64)>,
    gateway_state: Mutex<(u64, u64)>,
}

impl FileKeySource {
    /// A source reading the folder `dir`.
    #[must_use]
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            private_state: Mutex::new((0, 0)),
            gateway_state: Mutex::new((0, 0)),
        }
    }

    fn read_fields(&self, names: &[(&str, &str)]) -> Result<BTreeMap<String, Secret>> {
        let mut out = BTreeMap::new();
        for (file, field) in names {
            let path = self.dir.join(file);
            match std::fs::read_to_string(&path) {
                Ok(v) => {
                    out.insert((*field).to_owned(), Secret::new(v));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(SidecarError::ReadFile { path, source }),
            }
        }
        Ok(out)
    }

    fn version_of(state: &Mutex<(u64, u64)>, fields: &BTreeMap<String, Secret>) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (k, v) in fields {
            k.hash(&mut h);
            v.expose().hash(&mut h);
        }
        let digest = h.finish();
        let mut st = state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if st.1 == 0 || st.0 != digest {
            *st = (digest, st.1 + 1);
        }
        st.1
    }

    fn dir_name(&self) -> String {
        self.dir.display().to_string()
    }

    /// The folder.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl KeySource for FileKeySource {
    fn describe(&self) -> String {
        format!("file {}", self.dir_name())
    }

    async fn prepare(&self) -> Result<()> {
        Ok(())
    }

    async fn load_private(&self) -> Result<PrivateRecord> {
        let fields = self.read_fields(&[
            ("private_key", "private_key"),
            ("address", "address"),
            ("preshared_key", "preshared_key"),
            ("not_before", "not_before"),
        ])?;
        let v = Self::version_of(&self.private_state, &fields);
        PrivateRecord::from_fields(&self.dir_name(), &fields, v)
    }

    async fn load_gateway(&self) -> Result<GatewayRecord> {
        let fields = self.read_fields(&[
            ("peer_public_key", "public_key"),
            ("peer_endpoints", "endpoints"),
            ("peer_allowed_ips", "allowed_ips"),
        ])?;
        let v = Self::version_of(&self.gateway_state, &fields);
        GatewayRecord::from_fields(&self.dir_name(), &fields, v)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use super::{FileKeySource, GatewayRecord, KeySource, PrivateRecord};
    use crate::secret::Secret;

    const KEY: &str = "YBk6X3pP8KFvbF4VBcZ8mwQmEsdWcCHpzrCdsHCgtW0=";

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, Secret> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Secret::new((*v).to_owned())))
            .collect()
    }

    #[test]
    fn a_dual_stack_private_record_parses() {
        let r = PrivateRecord::from_fields(
            "t",
            &fields(&[
                ("private_key", KEY),
                ("address", "10.9.0.2/32, fd00::2/128"),
            ]),
            3,
        )
        .unwrap();
        assert_eq!(r.addresses.len(), 2);
        assert_eq!(r.version, 3);
        assert!(r.preshared_key.is_none());
        assert!(!r.public_key().unwrap().is_empty());
    }

    #[test]
    fn a_bad_private_key_is_refused_without_echoing_it() {
        let err = PrivateRecord::from_fields(
            "t",
            &fields(&[("private_key", "c2VjcmV0LXZhbHVl"), ("address", "10.0.0.1")]),
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("private_key"), "{err}");
        assert!(!err.contains("c2VjcmV0LXZhbHVl"), "{err}");
    }

    #[test]
    fn a_missing_address_is_named() {
        let err = PrivateRecord::from_fields("t", &fields(&[("private_key", KEY)]), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("address"), "{err}");
    }

    #[test]
    fn not_before_must_be_rfc3339() {
        let f = fields(&[
            ("private_key", KEY),
            ("address", "10.0.0.1/32"),
            ("not_before", "tomorrow"),
        ]);
        assert!(PrivateRecord::from_fields("t", &f, 1).is_err());
        let f = fields(&[
            ("private_key", KEY),
            ("address", "10.0.0.1/32"),
            ("not_before", "2030-01-01T00:00:00Z"),
        ]);
        assert!(PrivateRecord::from_fields("t", &f, 1)
            .unwrap()
            .not_before
            .is_some());
    }

    #[test]
    fn gateway_record_splits_endpoints_and_allowed_ips() {
        let g = GatewayRecord::from_fields(
            "g",
            &fields(&[
                ("public_key", KEY),
                ("endpoints", "gw1.example:51820, 192.0.2.1:51820"),
                ("allowed_ips", "10.0.0.0/8,fd00::/64"),
            ]),
            7,
        )
        .unwrap();
        assert_eq!(g.endpoints, vec!["gw1.example:51820", "192.0.2.1:51820"]);
        assert_eq!(g.allowed_ips.len(), 2);
        assert_eq!(g.keepalive, None);
    }

    #[test]
    fn a_gateway_record_may_advertise_its_keepalive() {
        let rec = |k: &str| {
            GatewayRecord::from_fields("g", &fields(&[("public_key", KEY), ("keepalive", k)]), 1)
        };
        assert_eq!(rec("5").unwrap().keepalive, Some(5));
        assert_eq!(rec("0").unwrap().keepalive, None);
        assert!(rec("soon").is_err());
    }

    #[tokio::test]
    async fn file_source_version_changes_only_when_content_changes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("private_key"), format!("{KEY}\n")).unwrap();
        std::fs::write(d.path().join("address"), "10.0.0.2/32").unwrap();
        std::fs::write(d.path().join("peer_public_key"), KEY).unwrap();
        let src = FileKeySource::new(d.path().to_owned());
        assert_eq!(src.load_private().await.unwrap().version, 1);
        assert_eq!(src.load_private().await.unwrap().version, 1);
        std::fs::write(d.path().join("address"), "10.0.0.3/32").unwrap();
        assert_eq!(src.load_private().await.unwrap().version, 2);
        let g = src.load_gateway().await.unwrap();
        assert_eq!(g.public_key, KEY);
        assert!(g.endpoints.is_empty());
    }
}
