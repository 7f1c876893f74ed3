//! `wg-sidecar keys provision|rotate|provision-gateway`: writing WireGuard identities into Vault.
//!
//! Owns: the public peer record (`wg/peers/<ns>/<sa>`: `public_key`, `address`, and during a
//! rotation `next_public_key` + `activate_at`), the pure rotation steps on those records (see
//! `docs/rotation.md`), address allocation through per-address records written with KV v2
//! check-and-set `cas=0`, and the shared Vault flags of the `gateway` and `keys` commands.
//! Must never: print, log or return a private key; overwrite a record without check-and-set
//! where a concurrent writer could lose an update.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use clap::Subcommand;
use ipnet::IpNet;
use jiff::Timestamp;

use crate::{
    cli::VaultAuthKind,
    error::{Result, SidecarError},
    keysource::{decode_key, parse_cidrs, PrivateRecord},
    pool,
    secret::Secret,
    vault::{Vault, VaultAuth, VaultSettings},
};

/// How often a check-and-set write is retried after losing a race.
const CAS_ATTEMPTS: usize = 16;

/// Vault connection flags shared by `gateway` and `keys` (same names as `run`'s).
#[derive(Debug, Clone, clap::Args)]
pub struct VaultArgs {
    /// Vault / OpenBao address.
    #[arg(long, env = "WG_SIDECAR_VAULT_ADDR")]
    pub vault_addr: String,
    /// CA bundle for Vault's TLS.
    #[arg(long, env = "WG_SIDECAR_VAULT_CA_FILE")]
    pub vault_ca_file: Option<PathBuf>,
    /// Vault auth method.
    #[arg(long, env = "WG_SIDECAR_VAULT_AUTH", value_enum, default_value_t = VaultAuthKind::Kubernetes)]
    pub vault_auth: VaultAuthKind,
    /// Auth mount path (default `kubernetes` or `approle`).
    #[arg(long, env = "WG_SIDECAR_VAULT_AUTH_MOUNT")]
    pub vault_auth_mount: Option<String>,
    /// Kubernetes-auth role.
    #[arg(long, env = "WG_SIDECAR_VAULT_ROLE")]
    pub vault_role: Option<String>,
    /// Service-account JWT (kubernetes) or Vault token (token) file; re-read at every login.
    #[arg(
        long,
        env = "WG_SIDECAR_VAULT_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub vault_token_file: PathBuf,
    /// AppRole role-id file.
    #[arg(long, env = "WG_SIDECAR_VAULT_ROLE_ID_FILE")]
    pub vault_role_id_file: Option<PathBuf>,
    /// AppRole secret-id file.
    #[arg(long, env = "WG_SIDECAR_VAULT_SECRET_ID_FILE")]
    pub vault_secret_id_file: Option<PathBuf>,
    /// KV v2 mount.
    #[arg(long, env = "WG_SIDECAR_VAULT_KV_MOUNT", default_value = "secret")]
    pub vault_kv_mount: String,
}

impl VaultArgs {
    /// Validated connection settings; errors name the missing flag.
    pub fn settings(&self) -> Result<VaultSettings> {
        let bad = |m: &str| SidecarError::InvalidConfig(m.to_owned());
        let auth = match self.vault_auth {
            VaultAuthKind::Kubernetes => VaultAuth::Kubernetes {
                mount: self
                    .vault_auth_mount
                    .clone()
                    .unwrap_or_else(|| "kubernetes".into()),
                role: self
                    .vault_role
                    .clone()
                    .ok_or_else(|| bad("--vault-role is required with --vault-auth kubernetes"))?,
                jwt_file: self.vault_token_file.clone(),
            },
            VaultAuthKind::Approle => VaultAuth::AppRole {
                mount: self
                    .vault_auth_mount
                    .clone()
                    .unwrap_or_else(|| "approle".into()),
                role_id_file: self.vault_role_id_file.clone().ok_or_else(|| {
                    bad("--vault-role-id-file is required with --vault-auth approle")
                })?,
                secret_id_file: self.vault_secret_id_file.clone().ok_or_else(|| {
                    bad("--vault-secret-id-file is required with --vault-auth approle")
                })?,
            },
            VaultAuthKind::Token => VaultAuth::Token {
                file: self.vault_token_file.clone(),
            },
        };
        Ok(VaultSettings {
            addr: self.vault_addr.clone(),
            ca_file: self.vault_ca_file.clone(),
            auth,
        })
    }
}

/// Where the records live (prefixes under the KV mount).
#[derive(Debug, Clone, clap::Args)]
pub struct LayoutArgs {
    /// Folder of the private records (`<prefix>/<ns>/<sa>`).
    #[arg(long, env = "WG_SIDECAR_KEYS_PREFIX", default_value = "wg/keys")]
    pub keys_prefix: String,
    /// Folder of the public peer records the gateway reads.
    #[arg(long, env = "WG_SIDECAR_PEERS_PREFIX", default_value = "wg/peers")]
    pub peers_prefix: String,
    /// Folder of the per-address allocation records.
    #[arg(
        long,
        env = "WG_SIDECAR_ALLOCATIONS_PREFIX",
        default_value = "wg/allocations"
    )]
    pub allocations_prefix: String,
    /// Folder of the registered Pods' address claims (`<prefix>/<gateway>/<address>`).
    #[arg(
        long,
        env = "WG_SIDECAR_ADDRESSES_PREFIX",
        default_value = "wg/addresses"
    )]
    pub addresses_prefix: String,
    /// Folder of the gateways' verdicts on refused Pods (`<prefix>/<gateway>/<ns>/<sa>/<uid>`).
    #[arg(
        long,
        env = "WG_SIDECAR_VERDICTS_PREFIX",
        default_value = "wg/verdicts"
    )]
    pub verdicts_prefix: String,
}

/// Where the gateways' records live (prefixes under the KV mount).
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayLayoutArgs {
    /// Folder of the public gateway records.
    #[arg(
        long,
        env = "WG_SIDECAR_GATEWAYS_PREFIX",
        default_value = "wg/gateways"
    )]
    pub gateways_prefix: String,
    /// Folder of the gateways' private records.
    #[arg(
        long,
        env = "WG_SIDECAR_GATEWAY_KEYS_PREFIX",
        default_value = "wg/gateway-keys"
    )]
    pub gateway_keys_prefix: String,
}

/// `wg-sidecar keys …`
#[derive(Debug, Clone, clap::Args)]
pub struct KeysArgs {
    /// The key operation.
    #[command(subcommand)]
    pub op: KeysOp,
}

/// Key operations.
#[derive(Debug, Clone, Subcommand)]
pub enum KeysOp {
    /// Create a key pair and tunnel address for a namespace/service account (idempotent).
    Provision(ProvisionArgs),
    /// Rotate key pairs in place (all identities, or one), in two phases.
    Rotate(RotateArgs),
    /// Create the gateway's key pair and public record (idempotent; updates endpoints).
    ProvisionGateway(ProvisionGatewayArgs),
}

/// Flags of `keys provision`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProvisionArgs {
    /// Kubernetes namespace of the identity.
    #[arg(long, env = "WG_SIDECAR_NAMESPACE")]
    pub namespace: String,
    /// Service account of the identity.
    #[arg(long, env = "WG_SIDECAR_SERVICE_ACCOUNT")]
    pub service_account: String,
    /// Address pools (at most one IPv4 and one IPv6), e.g. `10.99.0.0/16,fd99::/64`.
    #[arg(long, env = "WG_SIDECAR_POOL", value_delimiter = ',', required = true)]
    pub pool: Vec<IpNet>,
    /// Vault connection.
    #[command(flatten)]
    pub vault: VaultArgs,
    /// Record layout.
    #[command(flatten)]
    pub layout: LayoutArgs,
}

/// Flags of `keys rotate`.
#[derive(Debug, Clone, clap::Args)]
pub struct RotateArgs {
    /// Only this namespace's identity (with `--service-account`).
    #[arg(long, env = "WG_SIDECAR_NAMESPACE", requires = "service_account")]
    pub namespace: Option<String>,
    /// Only this service account (with `--namespace`).
    #[arg(long, env = "WG_SIDECAR_SERVICE_ACCOUNT", requires = "namespace")]
    pub service_account: Option<String>,
    /// Seconds between writing the next key and its activation; at least two poll intervals of
    /// the sidecars and the gateway.
    #[arg(long, env = "WG_SIDECAR_ACTIVATE_AFTER", default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..))]
    pub activate_after: u64,
    /// Seconds over which the identities' activations are spread (identity `i` of `n` activates
    /// `i × spread / n` after the first), so a large rotation does not make every sidecar and the
    /// gateway switch in the same second. 0: all at once.
    #[arg(long, env = "WG_SIDECAR_SPREAD", default_value_t = 0)]
    pub spread: u64,
    /// Wait for the activation and fold the next key into the current one (phase 2).
    #[arg(long, env = "WG_SIDECAR_WAIT", action = clap::ArgAction::Set, default_value_t = true)]
    pub wait: bool,
    /// Also rotate this gateway's key (`wg/gateways/<name>`; its private record is beside it
    /// under `gateway-keys/`). The public record is updated at the activation (needs `--wait`).
    #[arg(long, env = "WG_SIDECAR_VAULT_GATEWAY_PATH")]
    pub vault_gateway_path: Option<String>,
    /// The gateway's private record (default: `gateways/` → `gateway-keys/` in the path above).
    #[arg(long, env = "WG_SIDECAR_VAULT_GATEWAY_KEY_PATH")]
    pub vault_gateway_key_path: Option<String>,
    /// Vault connection.
    #[command(flatten)]
    pub vault: VaultArgs,
    /// Record layout.
    #[command(flatten)]
    pub layout: LayoutArgs,
}

/// Flags of `keys provision-gateway`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProvisionGatewayArgs {
    /// Gateway name (`wg/gateways/<name>`, private key under `wg/gateway-keys/<name>`).
    pub name: String,
    /// Endpoints `host:port` the sidecars try in turn (every gateway replica shares the key).
    /// Optional: the gateway publishes its own `--endpoints` (the chart's
    /// `server.publicEndpoint`) at start; without this flag the record keeps the endpoints it has.
    #[arg(long, env = "WG_SIDECAR_ENDPOINTS", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// CIDRs reachable through the gateway (written to the public record).
    #[arg(long, env = "WG_SIDECAR_ALLOWED_IPS", value_delimiter = ',')]
    pub allowed_ips: Vec<IpNet>,
    /// The peers' address pools; the gateway takes the first host of each.
    #[arg(long, env = "WG_SIDECAR_POOL", value_delimiter = ',', required = true)]
    pub pool: Vec<IpNet>,
    /// Keepalive interval the gateway replicas send (their `--peer-keepalive`), advertised in
    /// the public record so sidecars treat a silent session as a dead gateway (0 = none).
    #[arg(long, env = "WG_SIDECAR_PEER_KEEPALIVE", default_value_t = 5)]
    pub peer_keepalive: u16,
    /// Where the gateway records live.
    #[command(flatten)]
    pub gateway_layout: GatewayLayoutArgs,
    /// Vault connection.
    #[command(flatten)]
    pub vault: VaultArgs,
}

/// The public record of one identity, as the gateway reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRecord {
    /// Base64 public key in use.
    pub public_key: String,
    /// Tunnel addresses (host prefixes) owned by the peer.
    pub addresses: Vec<IpNet>,
    /// During a rotation: the key that replaces `public_key` at `activate_at`.
    pub next_public_key: Option<String>,
    /// When `next_public_key` takes over.
    pub activate_at: Option<Timestamp>,
    /// A registered Pod that rotates its key in place (`wg-sidecar run --key-rotation-interval`):
    /// when it publishes its next key (the gateway reads the record again then, and only then).
    pub rotates_at: Option<Timestamp>,
    /// The per-Pod preshared key the Pod generated (registered records only).
    pub preshared_key: Option<Secret>,
    /// The Pod that published the record (registered records only; see [`crate::registration`]).
    pub pod: Option<crate::registration::PodIdentity>,
    /// KV v2 version.
    pub version: u64,
}

fn field<'a>(fields: &'a BTreeMap<String, Secret>, name: &str) -> Option<&'a str> {
    fields
        .get(name)
        .map(Secret::expose)
        .filter(|v| !v.is_empty())
}

impl PeerRecord {
    /// Builds and validates the record from its KV fields.
    pub fn from_fields(
        source_name: &str,
        fields: &BTreeMap<String, Secret>,
        version: u64,
    ) -> Result<Self> {
        let bad = |reason: String| SidecarError::InvalidRecord {
            source_name: source_name.to_owned(),
            reason,
        };
        let public_key = field(fields, "public_key")
            .ok_or_else(|| bad("missing field public_key".into()))?
            .to_owned();
        decode_key(source_name, "public_key", &public_key)?;
        let addresses = parse_cidrs(
            source_name,
            "address",
            field(fields, "address").ok_or_else(|| bad("missing field address".into()))?,
        )?;
        if addresses.is_empty() {
            return Err(bad("field address holds no address".into()));
        }
        let next_public_key = field(fields, "next_public_key").map(str::to_owned);
        if let Some(k) = &next_public_key {
            decode_key(source_name, "next_public_key", k)?;
        }
        let activate_at = field(fields, "activate_at")
            .map(|v| {
                v.parse::<Timestamp>()
                    .map_err(|e| bad(format!("field activate_at is not RFC 3339: {e}")))
            })
            .transpose()?;
        if next_public_key.is_some() != activate_at.is_some() {
            return Err(bad(
                "next_public_key and activate_at must be set together".into()
            ));
        }
        let rotates_at = field(fields, "rotates_at")
            .map(|v| {
                v.parse::<Timestamp>()
                    .map_err(|e| bad(format!("field rotates_at is not RFC 3339: {e}")))
            })
            .transpose()?;
        let preshared_key = fields
            .get("preshared_key")
            .filter(|v| !v.is_empty())
            .cloned();
        if let Some(psk) = &preshared_key {
            decode_key(source_name, "preshared_key", psk.expose())?;
        }
        let pod = crate::registration::PodIdentity::from_fields(source_name, fields)?;
        Ok(Self {
            public_key,
            addresses,
            next_public_key,
            activate_at,
            rotates_at,
            preshared_key,
            pod,
            version,
        })
    }

    /// The KV fields of this record.
    #[must_use]
    pub fn to_fields(&self) -> BTreeMap<String, Secret> {
        let mut m = BTreeMap::new();
        m.insert("public_key".into(), Secret::new(self.public_key.clone()));
        m.insert("address".into(), Secret::new(join(&self.addresses)));
        if let (Some(k), Some(t)) = (&self.next_public_key, self.activate_at) {
            m.insert("next_public_key".into(), Secret::new(k.clone()));
            m.insert("activate_at".into(), Secret::new(t.to_string()));
        }
        if let Some(t) = self.rotates_at {
            m.insert("rotates_at".into(), Secret::new(t.to_string()));
        }
        if let Some(psk) = &self.preshared_key {
            m.insert("preshared_key".into(), psk.clone());
        }
        if let Some(pod) = &self.pod {
            pod.write_fields(&mut m);
        }
        m
    }

    /// The key the gateway must accept at `now`: the next key once its activation has come.
    #[must_use]
    pub fn effective_public_key(&self, now: Timestamp) -> &str {
        match (&self.next_public_key, self.activate_at) {
            (Some(k), Some(t)) if t <= now => k,
            _ => &self.public_key,
        }
    }

    /// The activation still ahead of `now`, if any (the gateway wakes up for it).
    #[must_use]
    pub fn pending_activation(&self, now: Timestamp) -> Option<Timestamp> {
        self.activate_at.filter(|t| *t > now)
    }
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// What `keys rotate` does to one identity, decided from its two records.
// One value per identity per run, matched at once: boxing `Fix` buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationStep {
    /// Nothing in flight: start a rotation (phase 1).
    Start,
    /// A rotation is in flight until this instant: leave it alone.
    InFlight(Timestamp),
    /// Write this peer record (fold an activated next key, or repair a record that does not
    /// match the private key after an interrupted run), then start a rotation.
    Fix(PeerRecord),
}

/// The pure rotation decision for one identity. `private_public_key` is the public half of the
/// private record's key and `not_before` its activation.
#[must_use]
pub fn rotation_step(
    peer: &PeerRecord,
    private_public_key: &str,
    not_before: Option<Timestamp>,
    now: Timestamp,
) -> RotationStep {
    let activation = not_before.unwrap_or(now);
    match (&peer.next_public_key, peer.activate_at) {
        (Some(next), Some(at)) if next == private_public_key => {
            if at > now {
                RotationStep::InFlight(at)
            } else {
                // Phase 2: fold next into current.
                RotationStep::Fix(PeerRecord {
                    public_key: next.clone(),
                    next_public_key: None,
                    activate_at: None,
                    rotates_at: None,
                    ..peer.clone()
                })
            }
        }
        _ if peer.public_key == private_public_key => {
            if peer.next_public_key.is_some() {
                // A next key the private record never got (interrupted run): drop it.
                RotationStep::Fix(PeerRecord {
                    next_public_key: None,
                    activate_at: None,
                    rotates_at: None,
                    ..peer.clone()
                })
            } else {
                RotationStep::Start
            }
        }
        _ if activation > now => RotationStep::Fix(PeerRecord {
            next_public_key: Some(private_public_key.to_owned()),
            activate_at: Some(activation),
            rotates_at: None,
            ..peer.clone()
        }),
        _ => RotationStep::Fix(PeerRecord {
            public_key: private_public_key.to_owned(),
            next_public_key: None,
            activate_at: None,
            rotates_at: None,
            ..peer.clone()
        }),
    }
}

/// A fresh WireGuard key pair: (private, public base64).
#[must_use]
pub fn generate_keypair() -> (Secret, String) {
    let k = defguard_wireguard_rs::key::Key::generate();
    let public = k.public_key().to_string();
    (Secret::new(k.to_string()), public)
}

fn status_of(e: &SidecarError) -> Option<u16> {
    match e {
        SidecarError::VaultKv { status, .. } => *status,
        _ => None,
    }
}

/// KV v2 answers 400 when a check-and-set version does not match.
fn is_cas_mismatch(e: &SidecarError) -> bool {
    status_of(e) == Some(400)
}

async fn read_opt(
    vault: &Vault,
    mount: &str,
    path: &str,
) -> Result<Option<crate::vault::KvRecord>> {
    match vault.read(mount, path).await {
        Ok(r) => Ok(Some(r)),
        Err(e) if status_of(&e) == Some(404) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Lists a folder; a folder that does not exist is empty.
pub async fn list_opt(vault: &Vault, mount: &str, path: &str) -> Result<Vec<String>> {
    match vault.list(mount, path).await {
        Ok(v) => Ok(v),
        Err(e) if status_of(&e) == Some(404) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn cas_version(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// What `keys provision` reports (public information only).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Provisioned {
    /// `<ns>/<sa>`.
    pub identity: String,
    /// Base64 public key.
    pub public_key: String,
    /// Tunnel addresses.
    pub address: String,
    /// False when the identity already existed and was left as it was.
    pub created: bool,
}

/// Allocates one address from `pool` by writing `<allocations>/<addr>` with `cas=0`.
async fn allocate(
    vault: &Vault,
    mount: &str,
    layout: &LayoutArgs,
    pool_net: IpNet,
    identity: &str,
) -> Result<IpAddr> {
    for _ in 0..CAS_ATTEMPTS {
        let taken: HashSet<IpAddr> = list_opt(vault, mount, &layout.allocations_prefix)
            .await?
            .iter()
            .filter_map(|n| pool::parse_record_name(n))
            .collect();
        let addr = pool::first_free(pool_net, &taken)?;
        let path = format!("{}/{}", layout.allocations_prefix, pool::record_name(addr));
        let mut rec = BTreeMap::new();
        rec.insert("identity".into(), Secret::new(identity.to_owned()));
        rec.insert("address".into(), Secret::new(addr.to_string()));
        match vault.write(mount, &path, &rec, Some(0)).await {
            Ok(_) => return Ok(addr),
            Err(e) if is_cas_mismatch(&e) => {
                tracing::debug!(%addr, "address taken concurrently; trying the next one");
            }
            Err(e) => return Err(e),
        }
    }
    Err(SidecarError::Conflict {
        op: format!("allocate an address from {pool_net}"),
        reason: format!("lost {CAS_ATTEMPTS} check-and-set races"),
    })
}

fn identity_path(prefix: &str, namespace: &str, sa: &str) -> Result<String> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    };
    if !ok(namespace) || !ok(sa) {
        return Err(SidecarError::InvalidConfig(format!(
            "--namespace {namespace:?} / --service-account {sa:?} must be Kubernetes names"
        )));
    }
    Ok(format!("{prefix}/{namespace}/{sa}"))
}

/// `keys provision`: creates the identity, or leaves an existing one as it is (re-writing its
/// peer record if that is missing).
pub async fn provision(vault: &Vault, args: &ProvisionArgs) -> Result<Provisioned> {
    let mount = &args.vault.vault_kv_mount;
    let l = &args.layout;
    let identity = format!("{}/{}", args.namespace, args.service_account);
    let key_path = identity_path(&l.keys_prefix, &args.namespace, &args.service_account)?;
    let peer_path = identity_path(&l.peers_prefix, &args.namespace, &args.service_account)?;
    if args.pool.iter().filter(|p| p.addr().is_ipv4()).count() > 1
        || args.pool.iter().filter(|p| p.addr().is_ipv6()).count() > 1
    {
        return Err(SidecarError::InvalidConfig(
            "--pool takes at most one IPv4 and one IPv6 CIDR".into(),
        ));
    }
    if let Some(existing) = read_opt(vault, mount, &key_path).await? {
        let private = PrivateRecord::from_fields(
            &format!("{mount}/{key_path}"),
            &existing.data,
            existing.version,
        )?;
        let public_key = private.public_key()?;
        if read_opt(vault, mount, &peer_path).await?.is_none() {
            let peer = PeerRecord {
                public_key: public_key.clone(),
                addresses: private.addresses.clone(),
                next_public_key: None,
                activate_at: None,
                rotates_at: None,
                preshared_key: None,
                pod: None,
                version: 0,
            };
            vault
                .write(mount, &peer_path, &peer.to_fields(), Some(0))
                .await?;
        }
        return Ok(Provisioned {
            identity,
            public_key,
            address: join(&private.addresses),
            created: false,
        });
    }
    let mut addresses = Vec::new();
    for p in &args.pool {
        match allocate(vault, mount, l, *p, &identity).await {
            Ok(a) => addresses.push(a),
            Err(e) => {
                release(vault, mount, l, &addresses).await;
                return Err(e);
            }
        }
    }
    let nets: Vec<IpNet> = addresses.iter().copied().map(pool::host_net).collect();
    let (private, public_key) = generate_keypair();
    let mut fields = BTreeMap::new();
    fields.insert("private_key".to_owned(), private);
    fields.insert("address".to_owned(), Secret::new(join(&nets)));
    if let Err(e) = vault.write(mount, &key_path, &fields, Some(0)).await {
        // Another run provisioned the same identity first: give our addresses back.
        release(vault, mount, l, &addresses).await;
        return Err(e);
    }
    let peer = PeerRecord {
        public_key: public_key.clone(),
        addresses: nets.clone(),
        next_public_key: None,
        activate_at: None,
        rotates_at: None,
        preshared_key: None,
        pod: None,
        version: 0,
    };
    vault
        .write(mount, &peer_path, &peer.to_fields(), None)
        .await?;
    tracing::info!(%identity, %public_key, address = %join(&nets), "identity provisioned");
    Ok(Provisioned {
        identity,
        public_key,
        address: join(&nets),
        created: true,
    })
}

async fn release(vault: &Vault, mount: &str, l: &LayoutArgs, addresses: &[IpAddr]) {
    for a in addresses {
        let path = format!("{}/{}", l.allocations_prefix, pool::record_name(*a));
        if let Err(e) = vault.delete_all(mount, &path).await {
            tracing::warn!(error = %e, address = %a, "failed to release an address");
        }
    }
}

/// Lists every `<ns>/<sa>` under `prefix`.
pub async fn list_identities(vault: &Vault, mount: &str, prefix: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for ns in list_opt(vault, mount, prefix).await? {
        let Some(ns) = ns.strip_suffix('/') else {
            continue;
        };
        for sa in list_opt(vault, mount, &format!("{prefix}/{ns}")).await? {
            if !sa.ends_with('/') {
                out.push(format!("{ns}/{sa}"));
            }
        }
    }
    Ok(out)
}

/// What `keys rotate` did to one identity.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rotated {
    /// `<ns>/<sa>`.
    pub identity: String,
    /// `started`, `in-flight`, `folded` or `failed: …`.
    pub outcome: String,
    /// When the new key takes over (RFC 3339), if one is pending.
    pub activate_at: Option<String>,
}

/// Applies the fix/fold step and, with `start`, phase 1 of a new rotation for one identity.
async fn rotate_one(
    vault: &Vault,
    mount: &str,
    l: &LayoutArgs,
    identity: &str,
    activate_after: Duration,
    start: bool,
) -> Result<Rotated> {
    let key_path = format!("{}/{identity}", l.keys_prefix);
    let peer_path = format!("{}/{identity}", l.peers_prefix);
    let priv_rec = vault.read(mount, &key_path).await?;
    let private = PrivateRecord::from_fields(
        &format!("{mount}/{key_path}"),
        &priv_rec.data,
        priv_rec.version,
    )?;
    let peer_rec = vault.read(mount, &peer_path).await?;
    let mut peer = PeerRecord::from_fields(
        &format!("{mount}/{peer_path}"),
        &peer_rec.data,
        peer_rec.version,
    )?;
    let now = Timestamp::now();
    let not_before = private.not_before;
    let mut outcome = "unchanged";
    match rotation_step(&peer, &private.public_key()?, not_before, now) {
        RotationStep::InFlight(at) => {
            return Ok(Rotated {
                identity: identity.to_owned(),
                outcome: "in-flight".into(),
                activate_at: Some(at.to_string()),
            })
        }
        RotationStep::Fix(fixed) => {
            let v = vault
                .write(
                    mount,
                    &peer_path,
                    &fixed.to_fields(),
                    Some(cas_version(peer.version)),
                )
                .await?;
            outcome = "folded";
            let pending = fixed.activate_at;
            peer = PeerRecord {
                version: v,
                ..fixed
            };
            if let Some(at) = pending {
                return Ok(Rotated {
                    identity: identity.to_owned(),
                    outcome: "repaired".into(),
                    activate_at: Some(at.to_string()),
                });
            }
        }
        RotationStep::Start => {}
    }
    if !start {
        return Ok(Rotated {
            identity: identity.to_owned(),
            outcome: outcome.into(),
            activate_at: None,
        });
    }
    // Phase 1: the private record first (sidecar switches at not_before), then the peer record
    // (gateway switches at activate_at). A crash in between is repaired by the next run.
    let activate_at = now
        .checked_add(jiff::SignedDuration::try_from(activate_after).unwrap_or_default())
        .unwrap_or(now);
    let (new_private, new_public) = generate_keypair();
    let mut fields = priv_rec.data.clone();
    fields.insert("private_key".into(), new_private);
    fields.insert("not_before".into(), Secret::new(activate_at.to_string()));
    vault
        .write(
            mount,
            &key_path,
            &fields,
            Some(cas_version(priv_rec.version)),
        )
        .await?;
    let next = PeerRecord {
        next_public_key: Some(new_public.clone()),
        activate_at: Some(activate_at),
        rotates_at: None,
        ..peer.clone()
    };
    vault
        .write(
            mount,
            &peer_path,
            &next.to_fields(),
            Some(cas_version(peer.version)),
        )
        .await?;
    tracing::info!(%identity, next_public_key = %new_public, %activate_at, "rotation started");
    Ok(Rotated {
        identity: identity.to_owned(),
        outcome: "started".into(),
        activate_at: Some(activate_at.to_string()),
    })
}

/// How long after phase 1 identity `index` of `count` activates: `activate_after` plus its share
/// of `spread` (`index × spread / count`), so activations are spread evenly over `spread` and the
/// first one keeps `activate_after`.
#[must_use]
pub fn staggered_activation(
    activate_after: Duration,
    spread: Duration,
    index: usize,
    count: usize,
) -> Duration {
    if count == 0 || spread.is_zero() {
        return activate_after;
    }
    let (i, n) = (index.min(count - 1) as u128, count as u128);
    let share = spread.as_millis() * i / n;
    activate_after + Duration::from_millis(u64::try_from(share).unwrap_or(u64::MAX))
}

/// The gateway's private record path for the public record `gateway_path`.
pub fn gateway_key_path(gateway_path: &str, explicit: Option<&str>) -> Result<String> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    match gateway_path.rsplit_once("gateways/") {
        Some((head, name)) if !name.is_empty() => Ok(format!("{head}gateway-keys/{name}")),
        _ => Err(SidecarError::InvalidConfig(format!(
            "--vault-gateway-key-path is required when --vault-gateway-path {gateway_path:?} has no `gateways/<name>` part"
        ))),
    }
}

/// Gateway key rotation, one step. The private record gets the new key with `not_before`; the
/// gateway switches at that instant; the public record follows once it has passed (sidecars then
/// replace their gateway peer at their next poll — see `docs/rotation.md`).
async fn rotate_gateway_step(
    vault: &Vault,
    mount: &str,
    pub_path: &str,
    key_path: &str,
    activate_after: Duration,
    start: bool,
) -> Result<Rotated> {
    let identity = format!("gateway {pub_path}");
    let priv_rec = vault.read(mount, key_path).await?;
    let private = PrivateRecord::from_fields(
        &format!("{mount}/{key_path}"),
        &priv_rec.data,
        priv_rec.version,
    )?;
    let pub_rec = vault.read(mount, pub_path).await?;
    let public = crate::keysource::GatewayRecord::from_fields(
        &format!("{mount}/{pub_path}"),
        &pub_rec.data,
        pub_rec.version,
    )?;
    let now = Timestamp::now();
    let private_public = private.public_key()?;
    if private_public != public.public_key {
        if let Some(t) = private.not_before.filter(|t| *t > now) {
            return Ok(Rotated {
                identity,
                outcome: "in-flight".into(),
                activate_at: Some(t.to_string()),
            });
        }
        let mut fields = pub_rec.data.clone();
        fields.insert("public_key".into(), Secret::new(private_public));
        vault
            .write(mount, pub_path, &fields, Some(cas_version(pub_rec.version)))
            .await?;
        return Ok(Rotated {
            identity,
            outcome: "folded".into(),
            activate_at: None,
        });
    }
    if !start {
        return Ok(Rotated {
            identity,
            outcome: "unchanged".into(),
            activate_at: None,
        });
    }
    let activate_at = now
        .checked_add(jiff::SignedDuration::try_from(activate_after).unwrap_or_default())
        .unwrap_or(now);
    let (new_private, new_public) = generate_keypair();
    let mut fields = priv_rec.data.clone();
    fields.insert("private_key".into(), new_private);
    fields.insert("not_before".into(), Secret::new(activate_at.to_string()));
    vault
        .write(
            mount,
            key_path,
            &fields,
            Some(cas_version(priv_rec.version)),
        )
        .await?;
    tracing::info!(gateway = %pub_path, next_public_key = %new_public, %activate_at, "gateway key rotation started");
    Ok(Rotated {
        identity,
        outcome: "started".into(),
        activate_at: Some(activate_at.to_string()),
    })
}

/// `keys rotate`: phase 1 for every selected identity (and the gateway with
/// `--vault-gateway-path`), then (with `--wait`) phase 2 after the last activation. Per-identity
/// failures are reported and make the command fail at the end.
pub async fn rotate(vault: &Vault, args: &RotateArgs) -> Result<Vec<Rotated>> {
    let mount = &args.vault.vault_kv_mount;
    let l = &args.layout;
    let identities = match (&args.namespace, &args.service_account) {
        (Some(ns), Some(sa)) => {
            identity_path(&l.peers_prefix, ns, sa)?;
            vec![format!("{ns}/{sa}")]
        }
        _ => list_identities(vault, mount, &l.peers_prefix).await?,
    };
    let after = Duration::from_secs(args.activate_after);
    let gateway = match &args.vault_gateway_path {
        Some(p) => Some((
            p.clone(),
            gateway_key_path(p, args.vault_gateway_key_path.as_deref())?,
        )),
        None => None,
    };
    let spread = Duration::from_secs(args.spread);
    let mut results = Vec::new();
    for (i, id) in identities.iter().enumerate() {
        let after_i = staggered_activation(after, spread, i, identities.len());
        let r = rotate_one(vault, mount, l, id, after_i, true)
            .await
            .unwrap_or_else(|e| Rotated {
                identity: id.clone(),
                outcome: format!("failed: {e}"),
                activate_at: None,
            });
        results.push(r);
    }
    if let Some((pub_path, key_path)) = &gateway {
        let r = rotate_gateway_step(vault, mount, pub_path, key_path, after, true)
            .await
            .unwrap_or_else(|e| Rotated {
                identity: format!("gateway {pub_path}"),
                outcome: format!("failed: {e}"),
                activate_at: None,
            });
        results.push(r);
    }
    if args.wait {
        let last = results
            .iter()
            .filter_map(|r| r.activate_at.as_deref()?.parse::<Timestamp>().ok())
            .max();
        if let Some(last) = last {
            let wait = Timestamp::now().duration_until(last);
            let wait = Duration::try_from(wait).unwrap_or_default() + Duration::from_secs(1);
            tracing::info!(
                seconds = wait.as_secs(),
                "waiting for the activation before phase 2"
            );
            tokio::time::sleep(wait).await;
            for r in &mut results {
                if let (Some(rest), Some((pub_path, key_path))) =
                    (r.identity.strip_prefix("gateway "), &gateway)
                {
                    debug_assert_eq!(rest, pub_path);
                    match rotate_gateway_step(vault, mount, pub_path, key_path, after, false).await
                    {
                        Ok(f) => r.outcome = format!("{} then {}", r.outcome, f.outcome),
                        Err(e) => r.outcome = format!("failed: phase 2: {e}"),
                    }
                    continue;
                }
                if r.activate_at.is_some() {
                    match rotate_one(vault, mount, l, &r.identity, after, false).await {
                        Ok(f) => {
                            r.outcome = format!("{} then {}", r.outcome, f.outcome);
                        }
                        Err(e) => r.outcome = format!("failed: phase 2: {e}"),
                    }
                }
            }
        }
    }
    Ok(results)
}

/// The `endpoints` field of a gateway's public record (what [`GatewayRecord`] splits again):
/// `host:port` values joined by commas. Shared by `keys provision-gateway` and the gateway's own
/// publishing ([`crate::publish`]).
///
/// [`GatewayRecord`]: crate::keysource::GatewayRecord
#[must_use]
pub fn endpoints_field(endpoints: &[String]) -> (&'static str, Secret) {
    ("endpoints", Secret::new(endpoints.join(",")))
}

/// Every field of a gateway's public record: `public_key`, `endpoints`, `allowed_ips`, `pool`
/// (each pool's network) and `keepalive` when not 0.
#[must_use]
pub fn gateway_record_fields(
    public_key: &str,
    endpoints: &[String],
    allowed_ips: &[IpNet],
    pool: &[IpNet],
    keepalive: u16,
) -> BTreeMap<String, Secret> {
    let mut f = BTreeMap::new();
    f.insert("public_key".to_owned(), Secret::new(public_key.to_owned()));
    let (k, v) = endpoints_field(endpoints);
    f.insert(k.to_owned(), v);
    f.insert("allowed_ips".to_owned(), Secret::new(join(allowed_ips)));
    f.insert(
        "pool".to_owned(),
        Secret::new(join(&pool.iter().map(IpNet::trunc).collect::<Vec<_>>())),
    );
    if keepalive > 0 {
        f.insert("keepalive".to_owned(), Secret::new(keepalive.to_string()));
    }
    f
}

/// `keys provision-gateway`: the gateway's private record (`private_key`, `address`) if absent,
/// and its public record (`public_key`, `endpoints`, `allowed_ips`) always.
pub async fn provision_gateway(vault: &Vault, args: &ProvisionGatewayArgs) -> Result<Provisioned> {
    let mount = &args.vault.vault_kv_mount;
    let key_path = format!("{}/{}", args.gateway_layout.gateway_keys_prefix, args.name);
    let pub_path = format!("{}/{}", args.gateway_layout.gateways_prefix, args.name);
    let (public_key, address, created) = if let Some(rec) =
        read_opt(vault, mount, &key_path).await?
    {
        let p = PrivateRecord::from_fields(&format!("{mount}/{key_path}"), &rec.data, rec.version)?;
        (p.public_key()?, join(&p.addresses), false)
    } else {
        let nets: Vec<IpNet> = args
            .pool
            .iter()
            .map(|p| {
                IpNet::new(pool::gateway_address(*p), p.prefix_len())
                    .unwrap_or_else(|_| pool::host_net(pool::gateway_address(*p)))
            })
            .collect();
        let (private, public) = generate_keypair();
        let mut f = BTreeMap::new();
        f.insert("private_key".to_owned(), private);
        f.insert("address".to_owned(), Secret::new(join(&nets)));
        vault.write(mount, &key_path, &f, Some(0)).await?;
        (public, join(&nets), true)
    };
    let endpoints = if args.endpoints.is_empty() {
        // Keep what the record lists (the gateway may have published it).
        match read_opt(vault, mount, &pub_path).await? {
            Some(rec) => crate::keysource::GatewayRecord::from_fields(
                &format!("{mount}/{pub_path}"),
                &rec.data,
                rec.version,
            )
            .map(|g| g.endpoints)
            .unwrap_or_default(),
            None => Vec::new(),
        }
    } else {
        args.endpoints.clone()
    };
    let f = gateway_record_fields(
        &public_key,
        &endpoints,
        &args.allowed_ips,
        &args.pool,
        args.peer_keepalive,
    );
    vault.write(mount, &pub_path, &f, None).await?;
    Ok(Provisioned {
        identity: format!("gateway/{}", args.name),
        public_key,
        address,
        created,
    })
}

/// Runs a `keys` subcommand and prints one JSON line per result (public data only).
pub async fn run(args: KeysArgs) -> Result<()> {
    let vault_args = match &args.op {
        KeysOp::Provision(a) => &a.vault,
        KeysOp::Rotate(a) => &a.vault,
        KeysOp::ProvisionGateway(a) => &a.vault,
    };
    let vault = Arc::new(Vault::new(vault_args.settings()?)?);
    vault.login().await?;
    match &args.op {
        KeysOp::Provision(a) => print(&provision(&vault, a).await?),
        KeysOp::ProvisionGateway(a) => print(&provision_gateway(&vault, a).await?),
        KeysOp::Rotate(a) => {
            let results = rotate(&vault, a).await?;
            let failed = results
                .iter()
                .filter(|r| r.outcome.contains("failed"))
                .count();
            for r in &results {
                print(r);
            }
            if failed > 0 {
                return Err(SidecarError::Conflict {
                    op: "rotate keys".into(),
                    reason: format!("{failed} of {} identities failed", results.len()),
                });
            }
        }
    }
    Ok(())
}

/// Prints one report line (public data only) to stdout.
fn print<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string(v).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;
    use jiff::{SignedDuration, Timestamp};

    use std::time::Duration;

    use super::{
        generate_keypair, rotation_step, staggered_activation, KeysOp, PeerRecord, RotationStep,
    };

    /// `wg-sidecar keys …` argv.
    #[derive(Debug, Parser)]
    #[command(name = "keys")]
    struct KeysCli {
        #[command(subcommand)]
        op: KeysOp,
    }

    fn peer(public: &str) -> PeerRecord {
        PeerRecord {
            public_key: public.into(),
            addresses: vec!["10.99.0.2/32".parse().unwrap()],
            next_public_key: None,
            activate_at: None,
            rotates_at: None,
            preshared_key: None,
            pod: None,
            version: 3,
        }
    }

    #[test]
    fn peer_records_round_trip_through_kv_fields() {
        let (_, a) = generate_keypair();
        let (_, b) = generate_keypair();
        let t: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        let p = PeerRecord {
            next_public_key: Some(b),
            activate_at: Some(t),
            rotates_at: None,
            ..peer(&a)
        };
        let back = PeerRecord::from_fields("t", &p.to_fields(), 3).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn a_next_key_without_activation_time_is_refused() {
        let (_, a) = generate_keypair();
        let mut f = peer(&a).to_fields();
        f.insert(
            "next_public_key".into(),
            crate::secret::Secret::new(a.clone()),
        );
        let err = PeerRecord::from_fields("t", &f, 1).unwrap_err().to_string();
        assert!(err.contains("activate_at"), "{err}");
    }

    #[test]
    fn the_gateway_switches_to_the_next_key_exactly_at_activation() {
        let (_, a) = generate_keypair();
        let (_, b) = generate_keypair();
        let t = Timestamp::now();
        let p = PeerRecord {
            next_public_key: Some(b.clone()),
            activate_at: Some(t),
            rotates_at: None,
            ..peer(&a)
        };
        let before = t - SignedDuration::from_millis(1);
        assert_eq!(p.effective_public_key(before), a);
        assert_eq!(p.pending_activation(before), Some(t));
        assert_eq!(p.effective_public_key(t), b);
        assert_eq!(p.pending_activation(t), None);
    }

    #[test]
    fn rotation_starts_only_when_the_records_agree_and_nothing_is_in_flight() {
        let (_, a) = generate_keypair();
        let now = Timestamp::now();
        assert_eq!(rotation_step(&peer(&a), &a, None, now), RotationStep::Start);
    }

    #[test]
    fn activations_are_spread_evenly_over_the_spread_and_the_first_keeps_activate_after() {
        let (after, spread) = (Duration::from_secs(90), Duration::from_secs(60));
        let at: Vec<u64> = (0..4)
            .map(|i| staggered_activation(after, spread, i, 4).as_secs())
            .collect();
        assert_eq!(at, [90, 105, 120, 135]);
        // No spread, one identity or none: every activation at activate_after.
        assert_eq!(staggered_activation(after, Duration::ZERO, 3, 4), after);
        assert_eq!(staggered_activation(after, spread, 0, 1), after);
        assert_eq!(staggered_activation(after, spread, 0, 0), after);
        // 10 000 identities over 60 s: 6 ms apart, the last before activate_after + spread.
        let last = staggered_activation(after, spread, 9_999, 10_000);
        assert_eq!(last, Duration::from_millis(149_994));
        assert_eq!(
            staggered_activation(after, spread, 1, 10_000),
            Duration::from_millis(90_006)
        );
    }

    #[test]
    fn a_pending_rotation_is_left_alone_and_folded_after_activation() {
        let (_, a) = generate_keypair();
        let (_, b) = generate_keypair();
        let now = Timestamp::now();
        let later = now + SignedDuration::from_secs(60);
        let p = PeerRecord {
            next_public_key: Some(b.clone()),
            activate_at: Some(later),
            rotates_at: None,
            ..peer(&a)
        };
        assert_eq!(
            rotation_step(&p, &b, Some(later), now),
            RotationStep::InFlight(later)
        );
        match rotation_step(&p, &b, Some(later), later) {
            RotationStep::Fix(f) => {
                assert_eq!(f.public_key, b);
                assert!(f.next_public_key.is_none() && f.activate_at.is_none());
                assert_eq!(f.addresses, p.addresses);
            }
            other => panic!("expected a fold, got {other:?}"),
        }
    }

    #[test]
    fn an_interrupted_phase_one_is_repaired_from_the_private_record() {
        let (_, a) = generate_keypair();
        let (_, b) = generate_keypair();
        let now = Timestamp::now();
        let later = now + SignedDuration::from_secs(60);
        // The private record got key b (activating later) but the peer record was never updated.
        match rotation_step(&peer(&a), &b, Some(later), now) {
            RotationStep::Fix(f) => {
                assert_eq!(f.public_key, a);
                assert_eq!(f.next_public_key.as_deref(), Some(b.as_str()));
                assert_eq!(f.activate_at, Some(later));
            }
            other => panic!("expected a repair, got {other:?}"),
        }
        // Same, found after the activation: the peer record takes b at once.
        match rotation_step(&peer(&a), &b, Some(now), later) {
            RotationStep::Fix(f) => assert_eq!(f.public_key, b),
            other => panic!("expected a repair, got {other:?}"),
        }
        // A next key the private record never received is dropped.
        let stray = PeerRecord {
            next_public_key: Some(b),
            activate_at: Some(later),
            rotates_at: None,
            ..peer(&a)
        };
        match rotation_step(&stray, &a, None, now) {
            RotationStep::Fix(f) => assert!(f.next_public_key.is_none()),
            other => panic!("expected a cleanup, got {other:?}"),
        }
    }

    #[test]
    fn keys_subcommands_parse_with_the_documented_flags() {
        let c = KeysCli::try_parse_from([
            "keys",
            "provision",
            "--namespace=shop",
            "--service-account=web",
            "--pool=10.99.0.0/16,fd99::/64",
            "--vault-addr=http://127.0.0.1:8200",
            "--vault-auth=token",
        ])
        .unwrap();
        match c.op {
            KeysOp::Provision(p) => {
                assert_eq!(p.pool.len(), 2);
                assert_eq!(p.layout.peers_prefix, "wg/peers");
            }
            other => panic!("{other:?}"),
        }
        let c = KeysCli::try_parse_from([
            "keys",
            "rotate",
            "--vault-addr=http://v",
            "--vault-role=wg-keys",
            "--activate-after=5",
            "--spread=60",
        ])
        .unwrap();
        assert!(
            matches!(c.op, KeysOp::Rotate(r) if r.activate_after == 5 && r.spread == 60 && r.wait)
        );
        assert!(KeysCli::try_parse_from([
            "keys",
            "rotate",
            "--vault-addr=http://v",
            "--namespace=shop"
        ])
        .is_err());
        let c = KeysCli::try_parse_from([
            "keys",
            "provision-gateway",
            "corp",
            "--endpoints=gw-a:51820,gw-b:51820",
            "--allowed-ips=10.20.0.0/16",
            "--pool=10.99.0.0/16",
            "--vault-addr=http://v",
            "--vault-auth=token",
        ])
        .unwrap();
        assert!(matches!(c.op, KeysOp::ProvisionGateway(g) if g.endpoints.len() == 2));
    }
}
