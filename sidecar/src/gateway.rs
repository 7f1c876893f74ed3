//! `wg-sidecar gateway`: the WireGuard server that injected Pods connect to.
//!
//! Owns: the gateway's flags and config, the pure reconcile steps shared by both pod sources
//! (desired peer table → diff against the running table; unchanged peers appear nowhere),
//! applying a diff as one batch, the gateway's metrics and health endpoints, and the two loops:
//!
//! - `--pod-source kubernetes` (the default): a watch of the profile's Pods
//!   ([`crate::pod_watch`]) feeds the pure index ([`crate::pod_index`]); the loop applies the
//!   index's peer table on every change (debounced by [`DEBOUNCE`]), runs the record and claim
//!   reads it asks for (at most [`MAX_VAULT_TASKS`] at once), deletes what it releases, and sweeps
//!   orphaned records and claims every `--orphan-sweep-interval`;
//! - `--pod-source vault`: every record below `--vault-peers-path`, at any depth, is read every
//!   `--poll-interval` (N reads per poll; it cannot tell a live Pod from a dead one).
//!
//! Both check the gateway key every `--poll-interval` and tick statistics every second.
//!
//! Who may use the gateway at all is decided in kubernetes mode, before any read of a Pod's
//! record: a Pod must carry the injector's status annotation, and, with
//! `--allow-namespace-selector` / `--allow-service-accounts` ([`crate::access`]), be in a
//! selected namespace (the Namespaces are then watched too, metadata only) and run as a listed
//! service account. A refused Pod is logged (`peer refused`), counted
//! (`wg_gateway_peers_refused_total{reason}`) and, when it has a sidecar, told: the gateway
//! writes a verdict to `<--vault-verdicts-path>/<gateway>/<ns>/<sa>/<uid>` (create-only first,
//! so of all replicas one write lands; the others read it and write only when it says something
//! else), which the Pod's sidecar shows on `/ready`; it is deleted when the Pod is admitted or
//! goes, and the orphan sweep collects the rest.
//!
//! Who may go where is one nftables table ([`crate::nat`]), always installed: tunnel traffic is
//! forwarded only to the advertised networks ([`advertised`]: `--private-networks`, else the
//! public record's `allowed_ips`, re-read with the key check; none: nothing is forwarded), and in
//! kubernetes mode each peer gets the egress its Pod's NetworkPolicies give it
//! ([`crate::policy_watch`], watched beside the Pods). A peer's rules are written before its
//! WireGuard peer is added, and nothing is applied before the policies are listed.
//! Must never: touch a peer whose desired state did not change (its session must live on), log
//! key material (preshared keys included), remove an admitted peer because a Vault read failed,
//! let a peer run without its policy, or write to Vault other than verdicts on refused Pods,
//! deleting what a gone Pod left behind, and — with `--endpoints`, once at start — the
//! `endpoints` of its own public record ([`crate::publish`]: check-and-set, no other field).
//!
//! On SIGTERM the gateway drains ([`drain`]): `/ready` answers 503 at once, the loop and the
//! data plane go on for `--shutdown-delay` (the Service and load balancer take the Pod out
//! meanwhile, and its peers keep their sessions), then the table and the interface are removed.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use futures_util::{stream, StreamExt};
use ipnet::IpNet;
use jiff::Timestamp;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::task::JoinSet;

use crate::{
    access::Access,
    error::{Result, SidecarError},
    forwarding::{self, Ipv4Forwarding},
    health::HANDSHAKE_FRESH,
    keys::{list_opt, PeerRecord, VaultArgs},
    keysource::{GatewayRecord, PrivateRecord},
    nat::{self, Nat},
    pod_index::{
        old_enough, ClaimRead, PeerChange, PodIndex, ReadRequest, RecordRead, RecordRef, Refusal,
        Release, VerdictChange,
    },
    pod_watch::{self, NamespaceWatchUpdate, WatchUpdate},
    policy::Egress,
    policy_watch::{self, PolicyStore, PolicyWatchUpdate},
    registration::{gateway_name, Claim, Layout, PodIdentity, Verdict},
    tunnel::{PeerSpec, PeerStats, Tunnel, WgTunnel},
    vault::{TokenCounters, Vault},
};

pub use crate::pod_index::{Peer, PeerTable};

/// Delay between an index change and applying the peer table (changes arriving meanwhile are
/// applied together).
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// Vault reads and deletes in flight at most (kubernetes mode).
pub const MAX_VAULT_TASKS: usize = 64;

/// The first orphan sweep waits at most this long after the first list for the initial reads.
const FIRST_SWEEP_WAIT: Duration = Duration::from_secs(30);

/// Deepest folder level the vault pod source lists below `--vault-peers-path`.
const MAX_LIST_DEPTH: usize = 6;

/// Flags of `wg-sidecar gateway`.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// WireGuard interface name.
    #[arg(long, env = "WG_SIDECAR_INTERFACE", default_value = "wg0")]
    pub interface: String,
    /// UDP port WireGuard listens on.
    #[arg(long, env = "WG_SIDECAR_LISTEN_PORT", default_value_t = 51820)]
    pub listen_port: u16,
    /// Interface MTU.
    #[arg(long, env = "WG_SIDECAR_MTU", default_value_t = 1420, value_parser = clap::value_parser!(u32).range(1280..=9000))]
    pub mtu: u32,
    /// The gateway's public record, e.g. `wg/gateways/corp` (checked against the private key).
    #[arg(long, env = "WG_SIDECAR_VAULT_GATEWAY_PATH")]
    pub vault_gateway_path: String,
    /// The gateway's private record (default: `gateways` → `gateway-keys` in the public path).
    #[arg(long, env = "WG_SIDECAR_VAULT_GATEWAY_KEY_PATH")]
    pub vault_gateway_key_path: Option<String>,
    /// Folder of the peer records. Kubernetes mode reads `<path>/<gateway>/<ns>/<sa>/<pod-uid>`;
    /// vault mode reads every record below it at any depth (`<ns>/<sa>` from `keys provision`,
    /// or point it at `<path>/<gateway>` for the Pods' own records).
    #[arg(long, env = "WG_SIDECAR_VAULT_PEERS_PATH", default_value = "wg/peers")]
    pub vault_peers_path: String,
    /// Folder of the tunnel-address claims (`<path>/<gateway>/<address>`; kubernetes mode).
    #[arg(
        long,
        env = "WG_SIDECAR_VAULT_ADDRESSES_PATH",
        default_value = "wg/addresses"
    )]
    pub vault_addresses_path: String,
    /// Folder of the verdicts on refused Pods (`<path>/<gateway>/<ns>/<sa>/<pod-uid>`, read by
    /// the Pod's sidecar for its `/ready`; kubernetes mode).
    #[arg(
        long,
        env = "WG_SIDECAR_VAULT_VERDICTS_PATH",
        default_value = "wg/verdicts"
    )]
    pub vault_verdicts_path: String,
    /// Only Pods of namespaces whose labels match this selector may use the gateway (kubectl
    /// syntax: `team=payments,env in (prod,staging)`, also `!=`, `notin`, `key`, `!key`; chart
    /// `access.namespaceSelector`). Empty: every namespace. Kubernetes mode; the gateway then
    /// watches Namespaces (RBAC: namespaces get, list, watch).
    #[arg(long, env = "WG_SIDECAR_ALLOW_NAMESPACE_SELECTOR", default_value = "")]
    pub allow_namespace_selector: String,
    /// Only Pods running as one of these service accounts may use the gateway, comma-separated
    /// `namespace/name` (chart `access.serviceAccounts`); with a selector too, both must hold.
    /// Empty: every service account. Kubernetes mode.
    #[arg(long, env = "WG_SIDECAR_ALLOW_SERVICE_ACCOUNTS", value_delimiter = ',')]
    pub allow_service_accounts: Vec<String>,
    /// Where the peers come from: `kubernetes` (watch the profile's Pods, read each new Pod's
    /// record once, remove a Pod's peer when it goes) or `vault` (read every record below
    /// `--vault-peers-path` every `--poll-interval`, for a gateway that cannot see the cluster;
    /// it cannot tell a live Pod from a dead one).
    #[arg(long, env = "WG_SIDECAR_POD_SOURCE", default_value = "kubernetes")]
    pub pod_source: String,
    /// Value of the `wg-injector.io/tunnel` label of this gateway's Pods (default: the gateway
    /// name, the last segment of `--vault-gateway-path`).
    #[arg(long, env = "WG_SIDECAR_PROFILE")]
    pub profile: Option<String>,
    /// Seconds between sweeps for records and claims no live Pod holds (kubernetes mode).
    #[arg(long, env = "WG_SIDECAR_ORPHAN_SWEEP_INTERVAL", default_value_t = 300)]
    pub orphan_sweep_interval: u64,
    /// Seconds a record or claim must be old before the sweep may collect it (a Pod between
    /// its claim and the watch event is younger). For tests.
    #[arg(
        long,
        env = "WG_SIDECAR_ORPHAN_GRACE",
        default_value_t = 60,
        hide = true
    )]
    pub orphan_grace: u64,
    /// Address of `/healthz`, `/ready`, `/metrics`; the default `[::]` takes IPv6 and IPv4
    /// clients (`0.0.0.0` on a host without IPv6).
    #[arg(long, env = "WG_SIDECAR_HEALTH_ADDR", default_value = crate::health::DEFAULT_ADDR)]
    pub health_addr: SocketAddr,
    /// Seconds between reconciles with Vault: the gateway key check in both modes, the whole
    /// peer poll in vault mode (where a removed peer loses access within one).
    #[arg(long, env = "WG_SIDECAR_POLL_INTERVAL", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub poll_interval: u64,
    /// Keepalive the gateway sends to every connected peer, in seconds (0 = off). Sidecars treat
    /// silence longer than their `--failover-after` as a dead gateway, so keep this well below it.
    #[arg(long, env = "WG_SIDECAR_PEER_KEEPALIVE", default_value_t = 5)]
    pub peer_keepalive: u16,
    /// Masquerade tunnel traffic leaving to the private network (an nftables table of our own).
    #[arg(long, env = "WG_SIDECAR_MASQUERADE", action = clap::ArgAction::Set, default_value_t = true)]
    pub masquerade: bool,
    /// The networks the gateway advertises and forwards to, comma-separated CIDRs (IPv4 and
    /// IPv6): tunnel traffic to anything else is dropped, and only traffic towards these is
    /// masqueraded. Empty (the default): the `allowed_ips` of the gateway's public record
    /// (re-read every `--poll-interval`); when that is empty too, nothing is forwarded.
    #[arg(long, env = "WG_SIDECAR_PRIVATE_NETWORKS", value_delimiter = ',')]
    pub private_networks: Vec<String>,
    /// Peers of Pods that no egress NetworkPolicy selects get nothing (without it they get every
    /// advertised network, NetworkPolicy's default allow). Vault mode has no policies: every peer
    /// gets nothing.
    #[arg(
        long,
        env = "WG_SIDECAR_DEFAULT_DENY",
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        require_equals = true,
        default_value_t = false,
        default_missing_value = "true"
    )]
    pub default_deny: bool,
    /// The endpoints sidecars dial, comma-separated `host:port` (`[v6]:port`; the chart's
    /// `server.publicEndpoint`). At start the gateway writes them to its public record when it
    /// lists others (check-and-set; nothing else in the record changes) and creates the record
    /// when there is none ([`crate::publish`]). Empty: the record is left as it is.
    #[arg(long, env = "WG_SIDECAR_ENDPOINTS", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Seconds between SIGTERM and the cleanup: `/ready` answers 503 at once while the peers are
    /// still forwarded, so the Service and load balancer take the Pod out before its interface
    /// goes (0: clean up at once). Keep terminationGracePeriodSeconds above it.
    #[arg(
        long,
        env = "WG_SIDECAR_SHUTDOWN_DELAY",
        default_value_t = 5,
        value_name = "SECONDS"
    )]
    pub shutdown_delay: u64,
    /// Vault connection.
    #[command(flatten)]
    pub vault: VaultArgs,
}

/// Where the gateway learns its peers (`--pod-source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodSource {
    /// Watch the profile's Pods; read each new Pod's record once.
    Kubernetes,
    /// Poll every record below the peers folder.
    Vault,
}

/// Validated configuration of `wg-sidecar gateway`.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Interface name.
    pub interface: String,
    /// UDP listen port.
    pub listen_port: u16,
    /// MTU.
    pub mtu: u32,
    /// Vault settings.
    pub vault: crate::vault::VaultSettings,
    /// KV v2 mount.
    pub kv_mount: String,
    /// Public gateway record.
    pub gateway_path: String,
    /// Private gateway record.
    pub gateway_key_path: String,
    /// Peer records folder (vault mode lists below it).
    pub peers_path: String,
    /// Where the peers come from.
    pub pod_source: PodSource,
    /// The gateway's name (folder of its Pods' records and claims).
    pub gateway_name: String,
    /// The `wg-injector.io/tunnel` label value of its Pods.
    pub profile: String,
    /// Records and claims under the KV mount (kubernetes mode).
    pub layout: Layout,
    /// Period of the orphan sweep.
    pub orphan_sweep_interval: Duration,
    /// Age a record or claim needs before the sweep collects it.
    pub orphan_grace: Duration,
    /// Health listen address.
    pub health_addr: SocketAddr,
    /// Reconcile period.
    pub poll_interval: Duration,
    /// Keepalive sent to peers (None = off).
    pub peer_keepalive: Option<u16>,
    /// Masquerade tunnel sources leaving by other interfaces.
    pub masquerade: bool,
    /// `--private-networks` (empty: the public record's `allowed_ips`, see [`advertised`]).
    pub private_networks: Vec<IpNet>,
    /// Peers no egress policy selects get nothing.
    pub default_deny: bool,
    /// Who may use the gateway (kubernetes mode).
    pub access: Access,
    /// `--endpoints`, validated (empty: nothing is published).
    pub endpoints: Vec<String>,
    /// `--shutdown-delay`.
    pub shutdown_delay: Duration,
}

impl GatewayArgs {
    /// Validates the flags; errors name the flag at fault.
    pub fn into_config(self) -> Result<GatewayConfig> {
        let bad = |m: String| SidecarError::InvalidConfig(m);
        if self.interface.is_empty()
            || self.interface.len() > 15
            || self.interface.contains(['/', ' '])
        {
            return Err(bad(
                "--interface must be 1-15 characters without '/' or spaces".into(),
            ));
        }
        let mut private_networks = Vec::new();
        for raw in &self.private_networks {
            let v = raw.trim();
            if v.is_empty() {
                continue;
            }
            let net: IpNet = v.parse().map_err(|e| {
                bad(format!(
                    "--private-networks: {v:?} is not a CIDR (e.g. 10.20.0.0/16 or fd00::/64): {e}"
                ))
            })?;
            if !private_networks.contains(&net.trunc()) {
                private_networks.push(net.trunc());
            }
        }
        let gateway_key_path = crate::keys::gateway_key_path(
            &self.vault_gateway_path,
            self.vault_gateway_key_path.as_deref(),
        )?;
        let pod_source = match self.pod_source.trim() {
            "kubernetes" => PodSource::Kubernetes,
            "vault" => PodSource::Vault,
            other => {
                return Err(bad(format!(
                    "--pod-source must be kubernetes or vault, not {other:?}"
                )))
            }
        };
        let name = gateway_name(&self.vault_gateway_path).to_owned();
        if name.is_empty() {
            return Err(bad(format!(
                "--vault-gateway-path {:?} has no gateway name (its last segment)",
                self.vault_gateway_path
            )));
        }
        let profile = self.profile.clone().unwrap_or_else(|| name.clone());
        if !is_label_value(&profile) {
            return Err(bad(format!(
                "--profile {profile:?} is not a label value (1-63 letters, digits, '-', '_' or                  '.', starting and ending with a letter or digit)"
            )));
        }
        let folder = |flag: &str, v: &str| {
            let t = v.trim_matches('/');
            if t.is_empty() || t.contains("//") {
                Err(bad(format!("{flag} {v:?} is not a KV folder path")))
            } else {
                Ok(t.to_owned())
            }
        };
        let peers_path = folder("--vault-peers-path", &self.vault_peers_path)?;
        let addresses_path = folder("--vault-addresses-path", &self.vault_addresses_path)?;
        let verdicts_path = folder("--vault-verdicts-path", &self.vault_verdicts_path)?;
        let access = self.access(pod_source)?;
        let endpoints = crate::publish::parse_endpoints(&self.endpoints).map_err(bad)?;
        if self.orphan_sweep_interval == 0 {
            return Err(bad(
                "--orphan-sweep-interval must be at least 1 second".to_owned()
            ));
        }
        Ok(GatewayConfig {
            interface: self.interface,
            listen_port: self.listen_port,
            mtu: self.mtu,
            vault: self.vault.settings()?,
            kv_mount: self.vault.vault_kv_mount.clone(),
            gateway_path: self.vault_gateway_path,
            gateway_key_path,
            layout: Layout {
                kv_mount: self.vault.vault_kv_mount.clone(),
                peers_prefix: peers_path.clone(),
                addresses_prefix: addresses_path,
                verdicts_prefix: verdicts_path,
            },
            peers_path,
            pod_source,
            gateway_name: name,
            profile,
            orphan_sweep_interval: Duration::from_secs(self.orphan_sweep_interval),
            orphan_grace: Duration::from_secs(self.orphan_grace),
            health_addr: self.health_addr,
            poll_interval: Duration::from_secs(self.poll_interval),
            peer_keepalive: (self.peer_keepalive > 0).then_some(self.peer_keepalive),
            masquerade: self.masquerade,
            private_networks,
            default_deny: self.default_deny,
            access,
            endpoints,
            shutdown_delay: Duration::from_secs(self.shutdown_delay),
        })
    }
}

impl GatewayArgs {
    /// `--allow-namespace-selector` and `--allow-service-accounts`, which only kubernetes mode
    /// can apply.
    fn access(&self, pod_source: PodSource) -> Result<Access> {
        let access = Access::parse(&self.allow_namespace_selector, &self.allow_service_accounts)?;
        if pod_source == PodSource::Vault && !access.allows_all() {
            return Err(SidecarError::InvalidConfig(
                "--allow-namespace-selector and --allow-service-accounts need --pod-source \
                 kubernetes (the vault pod source cannot see namespaces or Pods)"
                    .to_owned(),
            ));
        }
        Ok(access)
    }
}

/// A Kubernetes label value: at most 63 characters, alphanumerics, `-`, `_`, `.` inside.
fn is_label_value(v: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    !v.is_empty()
        && v.len() <= 63
        && v.starts_with(alnum)
        && v.ends_with(alnum)
        && v.chars().all(|c| alnum(c) || matches!(c, '-' | '_' | '.'))
}

/// Where the advertised networks come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworksFrom {
    /// `--private-networks`.
    Flag,
    /// The public gateway record's `allowed_ips` (what the sidecars route into the tunnel).
    Record,
}

/// The networks the gateway advertises: the only destinations of its tunnel traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertised {
    /// Truncated, deduplicated, sorted (empty: nothing is forwarded).
    pub networks: Vec<IpNet>,
    /// Their source.
    pub from: NetworksFrom,
    /// With `--private-networks`: the record's `allowed_ips` when they are set and differ.
    pub record_differs: Option<Vec<IpNet>>,
}

fn normalized(nets: &[IpNet]) -> Vec<IpNet> {
    let mut v: Vec<IpNet> = nets.iter().map(IpNet::trunc).collect();
    v.sort();
    v.dedup();
    v
}

/// One source of truth for the networks: `--private-networks` when given, else the public
/// record's `allowed_ips` (`None`: the record could not be read).
#[must_use]
pub fn advertised(flag: &[IpNet], record: Option<&[IpNet]>) -> Advertised {
    let from_record = normalized(record.unwrap_or_default());
    if flag.is_empty() {
        return Advertised {
            networks: from_record,
            from: NetworksFrom::Record,
            record_differs: None,
        };
    }
    let networks = normalized(flag);
    let record_differs =
        (!from_record.is_empty() && from_record != networks).then_some(from_record);
    Advertised {
        networks,
        from: NetworksFrom::Flag,
        record_differs,
    }
}

fn cidr_list(nets: &[IpNet]) -> String {
    let v: Vec<String> = nets.iter().map(ToString::to_string).collect();
    v.join(",")
}

impl Advertised {
    /// Logs what the gateway forwards to (at start and when it changes).
    fn log(&self) {
        if let Some(record) = &self.record_differs {
            tracing::warn!(
                private_networks = %cidr_list(&self.networks),
                record_allowed_ips = %cidr_list(record),
                "--private-networks and the gateway record's allowed_ips differ: the gateway \
                 forwards to --private-networks only, the sidecars route the record's allowed_ips"
            );
        }
        if self.networks.is_empty() {
            tracing::warn!(
                "the gateway advertises no network (no --private-networks, no allowed_ips in its \
                 public record): it forwards no tunnel traffic"
            );
        } else {
            let from = match self.from {
                NetworksFrom::Flag => "--private-networks",
                NetworksFrom::Record => "the gateway record's allowed_ips",
            };
            tracing::info!(networks = %cidr_list(&self.networks), from, "tunnel traffic is forwarded to these networks only");
        }
    }
}

/// The desired peer table at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Public key → peer.
    pub peers: PeerTable,
    /// The earliest key activation still ahead (reconcile again then).
    pub next_activation: Option<Timestamp>,
    /// Identities left out, with the reason (duplicate key or address).
    pub conflicts: Vec<(String, String)>,
}

/// The pure step from peer records (identity, record) to the desired table at `now`: each
/// identity's effective key (the next key once activated) owns its addresses. Records are taken
/// in identity order; a later one reusing a key or an address is left out and reported.
#[must_use]
pub fn desired_peers(records: &[(String, PeerRecord)], now: Timestamp) -> Desired {
    let mut sorted: Vec<&(String, PeerRecord)> = records.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Desired::default();
    let mut owners: HashMap<IpNet, &str> = HashMap::new();
    for (identity, rec) in sorted {
        if let Some(t) = rec.pending_activation(now) {
            out.next_activation = Some(out.next_activation.map_or(t, |n| n.min(t)));
        }
        let key = rec.effective_public_key(now);
        if out.peers.contains_key(key) {
            out.conflicts.push((
                identity.clone(),
                "public key already used by another identity".into(),
            ));
            continue;
        }
        let nets: Vec<IpNet> = rec.addresses.iter().map(IpNet::trunc).collect();
        if let Some((net, other)) = nets.iter().find_map(|n| owners.get(n).map(|o| (n, *o))) {
            out.conflicts.push((
                identity.clone(),
                format!("address {net} already owned by {other}"),
            ));
            continue;
        }
        for n in &nets {
            owners.insert(*n, identity);
        }
        out.peers.insert(
            key.to_owned(),
            Peer {
                allowed_ips: nets,
                preshared_key: rec.preshared_key.clone(),
            },
        );
    }
    out
}

/// What to change in the running table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerDiff {
    /// New keys.
    pub add: PeerTable,
    /// Keys to remove.
    pub remove: Vec<String>,
    /// Keys whose allowed IPs or preshared key changed (applied as remove + add: the peer's
    /// session restarts).
    pub update: PeerTable,
}

impl PeerDiff {
    /// True when nothing changes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty() && self.update.is_empty()
    }
}

/// The pure diff: unchanged peers appear nowhere.
#[must_use]
pub fn diff(running: &PeerTable, desired: &PeerTable) -> PeerDiff {
    let mut d = PeerDiff::default();
    for (k, ips) in desired {
        match running.get(k) {
            None => {
                d.add.insert(k.clone(), ips.clone());
            }
            Some(cur) if cur != ips => {
                d.update.insert(k.clone(), ips.clone());
            }
            Some(_) => {}
        }
    }
    d.remove = running
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .cloned()
        .collect();
    d
}

fn spec(public_key: &str, peer: &Peer, keepalive: Option<u16>) -> PeerSpec {
    PeerSpec {
        public_key: public_key.to_owned(),
        preshared_key: peer.preshared_key.clone(),
        endpoint: None,
        allowed_ips: peer.allowed_ips.clone(),
        keepalive,
    }
}

/// Applies `d` to `tunnel` as one batch (peers get `keepalive` and their preshared key) and, on
/// success, to `running`.
pub fn apply_diff(
    tunnel: &mut impl Tunnel,
    running: &mut PeerTable,
    d: &PeerDiff,
    keepalive: Option<u16>,
) -> Result<()> {
    let remove: Vec<String> = d.remove.iter().chain(d.update.keys()).cloned().collect();
    let add: Vec<PeerSpec> = d
        .add
        .iter()
        .chain(d.update.iter())
        .map(|(k, peer)| spec(k, peer, keepalive))
        .collect();
    tunnel.apply_peer_changes(&remove, &add)?;
    for k in &d.remove {
        running.remove(k);
    }
    for (k, peer) in d.add.iter().chain(d.update.iter()) {
        running.insert(k.clone(), peer.clone());
    }
    Ok(())
}

/// The `reason` label values of `wg_gateway_peers_refused_total` ([`pod_index::Refusal::reason`]),
/// exported from zero.
const REFUSAL_REASONS: [&str; 9] = [
    "not_injected",
    "namespace_not_selected",
    "service_account_not_allowed",
    "identity_mismatch",
    "no_pod_identity",
    "outside_pool",
    "address_conflict",
    "duplicate_key",
    "invalid_record",
];

/// Gateway metrics (`wg_gateway_*`).
#[derive(Clone)]
pub struct GatewayMetrics {
    registry: Arc<Registry>,
    /// Peers in the running table.
    pub peers: Gauge,
    /// Peers with a handshake in the last 180 s (the HPA's figure).
    pub active_peers: Gauge,
    peer_rx: Family<Vec<(String, String)>, Counter>,
    peer_tx: Family<Vec<(String, String)>, Counter>,
    /// Unix time of the peer's last completed handshake (no series before its first one).
    peer_handshake: Family<Vec<(String, String)>, Gauge>,
    last_seen: Arc<Mutex<HashMap<String, (u64, u64)>>>,
    /// KV version of the gateway key in use (set at every key check).
    pub key_version: Gauge,
    /// Unix time the key in use took effect: its `not_before`, else when its version was written.
    key_activation: Gauge,
    /// `not_before` of a written key the gateway holds back until then (0: none).
    pub key_pending_activation: Gauge,
    /// Reconcile duration (Vault read + diff + apply).
    pub reconcile_duration: Histogram,
    /// Failed reconciles.
    pub reconcile_errors: Counter,
    /// Peer table changes by operation.
    pub peer_changes: Family<Vec<(String, String)>, Counter>,
    /// Identities left out for conflicts at the last reconcile.
    pub conflicts: Gauge,
    /// 1 when `/ready` answers 200.
    pub ready: Gauge,
    /// Live Pods of the profile in the index (kubernetes mode).
    pub pods_watched: Gauge,
    vault_reads: Family<Vec<(String, String)>, Counter>,
    peers_refused: Family<Vec<(String, String)>, Counter>,
    records_released: Family<Vec<(String, String)>, Counter>,
    /// Errors of the Pod watch (each retried with backoff).
    pub watch_errors: Counter,
    /// Seconds from the start to the first complete peer table (kubernetes mode: the first
    /// list and a first answer for every running sidecar in it).
    pub sync_duration: Gauge<f64, AtomicU64>,
    /// Rules in the peers' egress chains.
    pub policy_rules: Gauge,
    /// Peers with an egress chain (selected by an egress NetworkPolicy).
    pub policy_peers: Gauge,
    /// Distinct parts of the policies selecting admitted peers that were dropped.
    pub policy_unsupported: Gauge,
    /// Duration of writing the peers' egress rules (one `set_peer_policies` call).
    pub policy_apply_duration: Histogram,
    /// NetworkPolicies the gateway watches (kubernetes mode).
    pub policies_watched: Gauge,
    /// Errors of the NetworkPolicy watch (each retried with backoff).
    pub policy_watch_errors: Counter,
    /// Errors of the Namespace watch (each retried with backoff).
    pub namespace_watch_errors: Counter,
    /// Verdicts written to Vault (a write that changed what the Pod reads).
    pub verdicts_written: Counter,
    /// Pod keys rotated in place and applied (kubernetes mode).
    pub pod_key_rotations: Counter,
    /// Tunnel packets the forward filter dropped, by reason.
    dropped: Family<Vec<(String, String)>, Counter>,
    /// The table's counters at the last read (a re-install starts them from zero).
    last_dropped: Arc<Mutex<nat::DropCounters>>,
    /// `/metrics` scrapes that served the last recorded peer statistics (the interface read
    /// failed or took longer than [`crate::health::REFRESH_TIMEOUT`]).
    pub metrics_refresh_failures: Counter,
}

impl std::fmt::Debug for GatewayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayMetrics")
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayMetrics {
    /// Creates and registers every metric.
    #[must_use]
    pub fn new() -> Self {
        let mut r = Registry::default();
        let m = Self {
            registry: Arc::new(Registry::default()),
            peers: Gauge::default(),
            active_peers: Gauge::default(),
            peer_rx: Family::default(),
            peer_tx: Family::default(),
            peer_handshake: Family::default(),
            last_seen: Arc::default(),
            key_version: Gauge::default(),
            key_activation: Gauge::default(),
            key_pending_activation: Gauge::default(),
            reconcile_duration: Histogram::new([
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            reconcile_errors: Counter::default(),
            peer_changes: Family::default(),
            conflicts: Gauge::default(),
            ready: Gauge::default(),
            pods_watched: Gauge::default(),
            vault_reads: Family::default(),
            peers_refused: Family::default(),
            records_released: Family::default(),
            watch_errors: Counter::default(),
            sync_duration: Gauge::default(),
            policy_rules: Gauge::default(),
            policy_peers: Gauge::default(),
            policy_unsupported: Gauge::default(),
            policy_apply_duration: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            policies_watched: Gauge::default(),
            policy_watch_errors: Counter::default(),
            namespace_watch_errors: Counter::default(),
            verdicts_written: Counter::default(),
            pod_key_rotations: Counter::default(),
            dropped: Family::default(),
            last_dropped: Arc::default(),
            metrics_refresh_failures: Counter::default(),
        };
        r.register(
            "wg_gateway_peers",
            "Peers in the running table",
            m.peers.clone(),
        );
        r.register(
            "wg_gateway_metrics_refresh_failures",
            "Scrapes of /metrics that served the last recorded peer statistics because reading \
             the interface failed or took longer than 1 s",
            m.metrics_refresh_failures.clone(),
        );
        r.register(
            "wg_gateway_active_peers",
            "Peers with a handshake in the last 180 seconds",
            m.active_peers.clone(),
        );
        r.register(
            "wg_gateway_peer_receive_bytes",
            "Bytes received from the peer",
            m.peer_rx.clone(),
        );
        r.register(
            "wg_gateway_peer_transmit_bytes",
            "Bytes sent to the peer",
            m.peer_tx.clone(),
        );
        r.register(
            "wg_gateway_reconcile_duration_seconds",
            "Duration of a reconcile with Vault (read, diff, apply)",
            m.reconcile_duration.clone(),
        );
        r.register(
            "wg_gateway_reconcile_errors",
            "Failed reconciles",
            m.reconcile_errors.clone(),
        );
        r.register(
            "wg_gateway_peer_changes",
            "Peer table changes applied (label op: add, remove, update)",
            m.peer_changes.clone(),
        );
        r.register(
            "wg_gateway_peer_conflicts",
            "Identities left out at the last reconcile (duplicate key or address)",
            m.conflicts.clone(),
        );
        r.register(
            "wg_gateway_ready",
            "1 when the gateway is ready",
            m.ready.clone(),
        );
        m.register_handshake_and_key_metrics(&mut r);
        m.register_pod_metrics(&mut r);
        m.register_policy_metrics(&mut r);
        Self {
            registry: Arc::new(r),
            ..m
        }
    }

    /// Registers the peers' handshake times and the gateway key's metrics.
    fn register_handshake_and_key_metrics(&self, r: &mut Registry) {
        let m = self;
        r.register(
            "wg_gateway_peer_last_handshake_timestamp_seconds",
            "Unix time of the peer's last completed handshake (no series before the first one)",
            m.peer_handshake.clone(),
        );
        r.register(
            "wg_gateway_key_version",
            "KV version of the gateway's private key in use",
            m.key_version.clone(),
        );
        r.register(
            "wg_gateway_key_activation_timestamp_seconds",
            "Unix time the gateway key in use took effect (its not_before, else when that KV \
             version was written); 0 until the first key check",
            m.key_activation.clone(),
        );
        r.register(
            "wg_gateway_key_pending_activation_timestamp_seconds",
            "not_before of a rotated gateway key written but held back until then (0: none)",
            m.key_pending_activation.clone(),
        );
    }

    /// Registers the kubernetes mode's metrics.
    fn register_pod_metrics(&self, r: &mut Registry) {
        let m = self;
        // Every reason from zero: a rate from the first refusal on, and the dashboard and the
        // chart's test (tests/gateway_observability.rs) see the family before any refusal.
        for reason in REFUSAL_REASONS {
            drop(
                m.peers_refused
                    .get_or_create(&Self::labels(&[("reason", reason)])),
            );
        }
        r.register(
            "wg_gateway_pods_watched",
            "Live Pods of the profile the gateway watches",
            m.pods_watched.clone(),
        );
        r.register(
            "wg_gateway_vault_reads",
            "Vault KV reads (label kind: record, claim, sweep, poll)",
            m.vault_reads.clone(),
        );
        r.register(
            "wg_gateway_peers_refused",
            "Pods and peer records refused (label reason: not_injected, namespace_not_selected, \
             service_account_not_allowed, identity_mismatch, no_pod_identity, outside_pool, \
             address_conflict, duplicate_key, invalid_record)",
            m.peers_refused.clone(),
        );
        r.register(
            "wg_gateway_verdicts_written",
            "Verdicts on refused Pods written to Vault for their sidecars (one per refusal over \
             all replicas)",
            m.verdicts_written.clone(),
        );
        r.register(
            "wg_gateway_pod_key_rotations",
            "Pod keys rotated in place (wg-sidecar run --key-rotation-interval) and applied: the \
             Pod's next key replaced its key, same addresses",
            m.pod_key_rotations.clone(),
        );
        r.register(
            "wg_gateway_namespace_watch_errors",
            "Errors of the Namespace watch (with access.namespaceSelector; retried with backoff)",
            m.namespace_watch_errors.clone(),
        );
        r.register(
            "wg_gateway_records_released",
            "Records, claims and verdicts deleted from Vault for Pods that are gone or admitted \
             (label kind: record, claim, verdict; origin: released, swept)",
            m.records_released.clone(),
        );
        r.register(
            "wg_gateway_watch_errors",
            "Errors of the Pod watch (retried with backoff)",
            m.watch_errors.clone(),
        );
        r.register(
            "wg_gateway_sync_duration_seconds",
            "Seconds from the start to the first complete peer table",
            m.sync_duration.clone(),
        );
    }

    /// Registers the egress policy metrics.
    fn register_policy_metrics(&self, r: &mut Registry) {
        let m = self;
        r.register(
            "wg_gateway_policy_rules",
            "Rules in the peers' egress chains (their final verdicts included)",
            m.policy_rules.clone(),
        );
        r.register(
            "wg_gateway_policy_peers",
            "Peers with an egress chain (selected by an egress NetworkPolicy)",
            m.policy_peers.clone(),
        );
        r.register(
            "wg_gateway_policy_unsupported",
            "Parts of the NetworkPolicies selecting admitted peers that cannot apply in the \
             tunnel and were dropped",
            m.policy_unsupported.clone(),
        );
        r.register(
            "wg_gateway_policy_apply_duration_seconds",
            "Duration of writing the peers' egress rules",
            m.policy_apply_duration.clone(),
        );
        r.register(
            "wg_gateway_policies_watched",
            "NetworkPolicies the gateway watches (kubernetes mode)",
            m.policies_watched.clone(),
        );
        r.register(
            "wg_gateway_policy_watch_errors",
            "Errors of the NetworkPolicy watch (retried with backoff)",
            m.policy_watch_errors.clone(),
        );
        r.register(
            "wg_gateway_dropped_packets",
            "Tunnel packets dropped by the gateway's forward filter (label reason: \
             outside_networks, a destination the gateway does not advertise; policy, refused by \
             the peer's egress NetworkPolicy or by defaultDeny)",
            m.dropped.clone(),
        );
    }

    /// Records statistics: peer counts, active peers and per-peer byte counters.
    pub fn record(&self, stats: &[PeerStats], now: SystemTime) {
        let mut last = self
            .last_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.record_locked(&mut last, stats, now);
    }

    /// Reads the interface's statistics with `read` and records them as one step: the loop's
    /// tick and a `/metrics` scrape both come this way, so an earlier read is never recorded
    /// after a later one (that would read as a counter reset and count its bytes twice).
    pub fn refresh_peers(
        &self,
        read: impl FnOnce() -> Result<Vec<PeerStats>>,
    ) -> Result<Vec<PeerStats>> {
        let mut last = self
            .last_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stats = read()?;
        self.record_locked(&mut last, &stats, SystemTime::now());
        Ok(stats)
    }

    fn record_locked(
        &self,
        last: &mut HashMap<String, (u64, u64)>,
        stats: &[PeerStats],
        now: SystemTime,
    ) {
        let active = stats
            .iter()
            .filter(|p| {
                p.last_handshake
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age < HANDSHAKE_FRESH)
            })
            .count();
        self.peers
            .set(i64::try_from(stats.len()).unwrap_or(i64::MAX));
        self.active_peers
            .set(i64::try_from(active).unwrap_or(i64::MAX));
        let mut seen = HashMap::with_capacity(stats.len());
        for p in stats {
            let labels = vec![("public_key".to_owned(), p.public_key.clone())];
            let (prx, ptx) = last.get(&p.public_key).copied().unwrap_or((0, 0));
            let drx = p.rx_bytes.checked_sub(prx).unwrap_or(p.rx_bytes);
            let dtx = p.tx_bytes.checked_sub(ptx).unwrap_or(p.tx_bytes);
            self.peer_rx.get_or_create(&labels).inc_by(drx);
            self.peer_tx.get_or_create(&labels).inc_by(dtx);
            match p
                .last_handshake
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            {
                Some(t) => {
                    self.peer_handshake
                        .get_or_create(&labels)
                        .set(i64::try_from(t.as_secs()).unwrap_or(i64::MAX));
                }
                None => {
                    self.peer_handshake.remove(&labels);
                }
            }
            seen.insert(p.public_key.clone(), (p.rx_bytes, p.tx_bytes));
        }
        for gone in last.keys().filter(|k| !seen.contains_key(*k)) {
            let labels = vec![("public_key".to_owned(), gone.clone())];
            self.peer_rx.remove(&labels);
            self.peer_tx.remove(&labels);
            self.peer_handshake.remove(&labels);
        }
        *last = seen;
    }

    /// Records the gateway key in use (`rec`, read from Vault) and a held-back one (`pending`).
    pub fn record_key(&self, rec: &crate::vault::KvRecord, pending: Option<Timestamp>) {
        let not_before = rec
            .data
            .get("not_before")
            .and_then(|v| v.expose().parse::<Timestamp>().ok());
        if let Some(t) = not_before.or(rec.created_time) {
            self.key_activation.set(t.as_second());
        }
        self.key_version
            .set(i64::try_from(rec.version).unwrap_or(i64::MAX));
        self.key_pending_activation
            .set(pending.map_or(0, Timestamp::as_second));
    }

    /// Records the table's drop counters (read every statistics tick).
    pub fn record_drops(&self, now: nat::DropCounters) {
        let mut last = self
            .last_dropped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (reason, new, old) in [
            (
                "outside_networks",
                now.outside_networks,
                last.outside_networks,
            ),
            ("policy", now.policy, last.policy),
        ] {
            let labels = vec![("reason".to_owned(), reason.to_owned())];
            // Below the last read: the table was installed again and counts from zero.
            self.dropped
                .get_or_create(&labels)
                .inc_by(new.checked_sub(old).unwrap_or(new));
        }
        *last = now;
    }

    fn count_changes(&self, d: &PeerDiff) {
        for (op, n) in [
            ("add", d.add.len()),
            ("remove", d.remove.len()),
            ("update", d.update.len()),
        ] {
            if n > 0 {
                self.peer_changes
                    .get_or_create(&vec![("op".to_owned(), op.to_owned())])
                    .inc_by(n as u64);
            }
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Counts `n` Vault reads of `kind`.
    pub fn count_reads(&self, kind: &str, n: u64) {
        self.vault_reads
            .get_or_create(&Self::labels(&[("kind", kind)]))
            .inc_by(n);
    }

    /// Counts one refusal for `reason`.
    pub fn count_refused(&self, reason: &str) {
        self.peers_refused
            .get_or_create(&Self::labels(&[("reason", reason)]))
            .inc();
    }

    /// Counts one deletion of `kind` (`record` or `claim`) by `origin` (`released` or `swept`).
    pub fn count_released(&self, kind: &str, origin: &str) {
        self.records_released
            .get_or_create(&Self::labels(&[("kind", kind), ("origin", origin)]))
            .inc();
    }

    /// The text exposition.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// What the loop shares with the HTTP handlers.
#[derive(Debug)]
pub struct GatewayHealth {
    last_tick: Mutex<Instant>,
    reconciled: AtomicBool,
    interface_up: AtomicBool,
    last_error: Mutex<Option<String>>,
    ticks: AtomicU64,
    /// SIGTERM came: not ready, whatever else holds ([`drain`]).
    draining: AtomicBool,
    /// Metrics served on `/metrics`.
    pub metrics: GatewayMetrics,
    /// Reads the peers' current byte counters before `/metrics` encodes them.
    refresh: crate::health::ScrapeRefresh,
}

impl GatewayHealth {
    /// Fresh state: alive, not ready.
    #[must_use]
    pub fn new() -> Arc<Self> {
        let metrics = GatewayMetrics::new();
        Arc::new(Self {
            last_tick: Mutex::new(Instant::now()),
            reconciled: AtomicBool::new(false),
            interface_up: AtomicBool::new(false),
            last_error: Mutex::new(None),
            ticks: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            refresh: crate::health::ScrapeRefresh::new(metrics.metrics_refresh_failures.clone()),
            metrics,
        })
    }

    fn tick(&self) {
        *self
            .last_tick
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
        self.ticks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Ready = interface up and at least one successful reconcile (later Vault failures keep
    /// the last known peer table serving).
    pub fn ready(&self) -> std::result::Result<(), String> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.draining.load(Relaxed) {
            return Err("shutting down: draining (peers still forwarded)".into());
        }
        if !self.interface_up.load(Relaxed) {
            return Err("interface not up".into());
        }
        if !self.reconciled.load(Relaxed) {
            let why = self
                .last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
                .unwrap_or_else(|| "no reconcile with Vault yet".into());
            return Err(why);
        }
        Ok(())
    }

    fn set(&self, interface_up: bool, reconciled: Option<std::result::Result<(), String>>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.interface_up.store(interface_up, Relaxed);
        match reconciled {
            Some(Ok(())) => {
                self.reconciled.store(true, Relaxed);
            }
            Some(Err(e)) => {
                *self
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
            }
            None => {}
        }
        self.metrics.ready.set(i64::from(self.ready().is_ok()));
    }
}

async fn healthz(State(s): State<Arc<GatewayHealth>>) -> impl IntoResponse {
    let stalled = s
        .last_tick
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .elapsed()
        >= crate::health::LOOP_STALL;
    if stalled {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "control loop stalled\n".to_owned(),
        )
    } else {
        (StatusCode::OK, "ok\n".to_owned())
    }
}

async fn ready(State(s): State<Arc<GatewayHealth>>) -> impl IntoResponse {
    match s.ready() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(State(s): State<Arc<GatewayHealth>>) -> impl IntoResponse {
    s.refresh.refresh(crate::health::REFRESH_TIMEOUT).await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// The gateway's health router.
pub fn router(state: Arc<GatewayHealth>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Every record below `prefix` at any depth (up to six folders), as paths relative to it:
/// `<ns>/<sa>` (`keys provision`) and `<gateway>/<ns>/<sa>/<uid>` (registered Pods) alike.
pub async fn list_records(vault: &Vault, mount: &str, prefix: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut folders = vec![String::new()];
    for _ in 0..MAX_LIST_DEPTH {
        let mut deeper = Vec::new();
        for folder in folders {
            let path = if folder.is_empty() {
                prefix.to_owned()
            } else {
                format!("{prefix}/{folder}")
            };
            for name in list_opt(vault, mount, &path).await? {
                let rel = if folder.is_empty() {
                    name
                } else {
                    format!("{folder}/{name}")
                };
                match rel.strip_suffix('/') {
                    Some(sub) => deeper.push(sub.to_owned()),
                    None => out.push(rel),
                }
            }
        }
        if deeper.is_empty() {
            break;
        }
        folders = deeper;
    }
    out.sort();
    Ok(out)
}

/// Reads every peer record below `peers_path` (16 reads in flight). Unreadable or invalid
/// records are left out and returned as `(identity, error)` pairs (see [`keep_last_known`]).
pub async fn load_peer_records(
    vault: &Vault,
    mount: &str,
    peers_path: &str,
) -> Result<(Vec<(String, PeerRecord)>, Vec<(String, String)>)> {
    let ids = list_records(vault, mount, peers_path).await?;
    let results: Vec<(String, Result<PeerRecord>)> = stream::iter(ids)
        .map(|id| async move {
            let path = format!("{peers_path}/{id}");
            let r = vault.read(mount, &path).await.and_then(|rec| {
                PeerRecord::from_fields(&format!("{mount}/{path}"), &rec.data, rec.version)
            });
            (id, r)
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut ok = Vec::with_capacity(results.len());
    let mut errors = Vec::new();
    for (id, r) in results {
        match r {
            Ok(rec) => ok.push((id, rec)),
            Err(e) => errors.push((id, e.to_string())),
        }
    }
    Ok((ok, errors))
}

/// The records to reconcile with: the ones read now, plus — for every identity that is still
/// listed but whose read failed this time — the record last read for it. A failed Vault read
/// (timeout, 5xx, a record half-written by a rotation) must never take a working peer off the
/// gateway; only an identity that is no longer listed is removed. Updates `last` to the result.
pub fn keep_last_known(
    fresh: Vec<(String, PeerRecord)>,
    failed: &[(String, String)],
    last: &mut BTreeMap<String, PeerRecord>,
) -> Vec<(String, PeerRecord)> {
    let mut kept: BTreeMap<String, PeerRecord> = fresh.into_iter().collect();
    for (id, _) in failed {
        if let Some(previous) = last.get(id) {
            kept.entry(id.clone()).or_insert_with(|| previous.clone());
        }
    }
    *last = kept.clone();
    kept.into_iter().collect()
}

/// Binds the gateway's health port the sidecar's way ([`crate::health::listen`]: `[::]` takes
/// both families) and serves its router in a background task.
fn bind(addr: SocketAddr, state: Arc<GatewayHealth>) -> Result<SocketAddr> {
    let herr = |source| SidecarError::Health {
        addr: addr.to_string(),
        source,
    };
    let listener = crate::health::listen(addr)?;
    let local = listener.local_addr().map_err(herr)?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(state)).await {
            tracing::error!(error = %e, "health server stopped");
        }
    });
    Ok(local)
}

struct Gateway {
    cfg: GatewayConfig,
    vault: Arc<Vault>,
    health: Arc<GatewayHealth>,
    tunnel: WgTunnel,
    running: PeerTable,
    /// The gateway's nftables table: masquerading, the forward filter, the peers' egress.
    nat: Nat,
    /// The networks the table forwards to now.
    networks: Advertised,
    /// What the table masquerades (the gateway's own networks with `--masquerade`).
    masquerade_sources: Vec<IpNet>,
    /// The egress last written, by public key (written again after a re-install).
    egress: BTreeMap<String, Egress>,
    /// Addresses that may still have an egress chain (released once no peer holds them).
    policy_addresses: BTreeSet<IpAddr>,
    /// The peer records last read successfully, by identity ([`keep_last_known`]).
    last_records: BTreeMap<String, PeerRecord>,
    next_activation: Option<Timestamp>,
    /// KV version of the private record whose key is in use.
    key_version: u64,
    /// `not_before` of a held-back gateway key (see `docs/rotation.md`).
    key_due: Option<Timestamp>,
    /// Who each peer is, for the connection events ([`crate::events`]).
    events: crate::events::GatewayEvents,
}

async fn read_key(vault: &Vault, cfg: &GatewayConfig) -> Result<crate::vault::KvRecord> {
    vault.read(&cfg.kv_mount, &cfg.gateway_key_path).await
}

/// The public record, read with the key poll when it is the source of the networks (no
/// `--private-networks`); `None` otherwise.
async fn read_record(vault: &Vault, cfg: &GatewayConfig) -> Option<Result<GatewayRecord>> {
    if !cfg.private_networks.is_empty() {
        return None;
    }
    Some(
        vault
            .read(&cfg.kv_mount, &cfg.gateway_path)
            .await
            .and_then(|r| GatewayRecord::from_fields(&cfg.gateway_path, &r.data, r.version)),
    )
}

impl Gateway {
    /// Applies a new gateway key in place once its `not_before` has come.
    fn apply_key(&mut self, rec: &crate::vault::KvRecord) -> Result<()> {
        if rec.version == self.key_version {
            self.health.metrics.record_key(rec, self.key_due);
            return Ok(());
        }
        let p = PrivateRecord::from_fields(
            &format!("{}/{}", self.cfg.kv_mount, self.cfg.gateway_key_path),
            &rec.data,
            rec.version,
        )?;
        let now = Timestamp::now();
        if let Some(t) = p.not_before.filter(|t| *t > now) {
            if self.key_due != Some(t) {
                tracing::info!(version = rec.version, not_before = %t, "new gateway key waits for its not_before");
            }
            self.key_due = Some(t);
            self.health
                .metrics
                .key_pending_activation
                .set(t.as_second());
            return Ok(());
        }
        self.tunnel.set_private_key(&p.private_key)?;
        self.key_version = rec.version;
        self.key_due = None;
        self.health.metrics.record_key(rec, None);
        tracing::info!(version = rec.version, public_key = %p.public_key()?, "gateway key rotated in place");
        crate::events::emit(&self.events.key_rotated(&p.public_key()?, rec.version));
        Ok(())
    }

    /// Makes the interface's peers equal to `desired` (unchanged peers untouched) and their
    /// egress rules equal to `egress` (public key → policy; a peer not in it gets the table's
    /// default). Every desired peer's rules are written before the interface changes, so a new
    /// peer never runs without its policy; when they cannot be, the interface is left as it is
    /// (the caller retries). Rules of addresses no peer holds any more go after the interface
    /// change: a removed peer is off the interface before its rules are.
    fn apply_table(
        &mut self,
        desired: &PeerTable,
        egress: &BTreeMap<String, Egress>,
    ) -> Result<()> {
        let refused = unenforceable(desired, egress);
        let kept: PeerTable;
        let desired = if refused.is_empty() {
            desired
        } else {
            for k in &refused {
                tracing::warn!(public_key = %k, "peer refused: it has an egress policy, and an allowed IP wider than one address cannot carry one");
            }
            kept = desired
                .iter()
                .filter(|(k, _)| !refused.contains(*k))
                .map(|(k, p)| (k.clone(), p.clone()))
                .collect();
            &kept
        };
        self.write_policies(desired, egress)?;
        self.egress.clone_from(egress);
        let d = diff(&self.running, desired);
        if d.is_empty() {
            self.release_policies();
            return Ok(());
        }
        let keepalive = self.cfg.peer_keepalive;
        if let Err(e) = apply_diff(&mut self.tunnel, &mut self.running, &d, keepalive) {
            // The interface's state is unknown now: rebuild the table from what it reports, so
            // the next reconcile re-applies every peer it cannot vouch for.
            self.running = self
                .tunnel
                .peer_stats()
                .map(|s| {
                    s.into_iter()
                        .map(|p| {
                            let unknown = Peer {
                                allowed_ips: Vec::new(),
                                preshared_key: None,
                            };
                            (p.public_key, unknown)
                        })
                        .collect()
                })
                .unwrap_or_default();
            return Err(e);
        }
        self.health.metrics.count_changes(&d);
        tracing::info!(
            added = d.add.len(),
            removed = d.remove.len(),
            updated = d.update.len(),
            peers = self.running.len(),
            "peer table reconciled"
        );
        self.release_policies();
        Ok(())
    }

    /// Writes the egress rules of every peer of `desired` (only changed peers cost anything).
    fn write_policies(
        &mut self,
        desired: &PeerTable,
        egress: &BTreeMap<String, Egress>,
    ) -> Result<()> {
        let mut changes = Vec::with_capacity(desired.len());
        for (key, peer) in desired {
            let Some(a) = nat::PeerAddresses::from_allowed_ips(&peer.allowed_ips) else {
                continue; // no policy (see `unenforceable`): the table's default applies
            };
            let e = egress.get(key);
            if matches!(e, Some(Egress::Allowed(_))) {
                self.policy_addresses.extend(a.addresses().iter().copied());
            }
            changes.push((a, e));
        }
        let started = Instant::now();
        let result = self.nat.set_peer_policies(&changes);
        self.observe_policies(started);
        let done = result?;
        if done.transactions > 0 {
            tracing::info!(
                written = done.written,
                removed = done.removed,
                transactions = done.transactions,
                peers_with_policy = self.nat.rule_counts().peers,
                "peer egress rules applied"
            );
        }
        Ok(())
    }

    /// Removes the egress rules of addresses no running peer holds.
    fn release_policies(&mut self) {
        let held: HashSet<IpAddr> = self
            .running
            .values()
            .flat_map(|p| p.allowed_ips.iter().map(IpNet::addr))
            .collect();
        let stale: Vec<IpAddr> = self
            .policy_addresses
            .iter()
            .filter(|a| !held.contains(a))
            .copied()
            .collect();
        if stale.is_empty() {
            return;
        }
        let changes: Vec<(nat::PeerAddresses, Option<&Egress>)> = stale
            .iter()
            .filter_map(|a| nat::PeerAddresses::new([*a]))
            .map(|a| (a, None))
            .collect();
        let started = Instant::now();
        let result = self.nat.set_peer_policies(&changes);
        self.observe_policies(started);
        match result {
            Ok(_) => {
                for a in &stale {
                    self.policy_addresses.remove(a);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "removing the egress rules of gone peers failed; retried at the next change (no peer holds their addresses)");
            }
        }
    }

    fn observe_policies(&self, started: Instant) {
        let m = &self.health.metrics;
        m.policy_apply_duration
            .observe(started.elapsed().as_secs_f64());
        let c = self.nat.rule_counts();
        m.policy_rules
            .set(i64::try_from(c.peer_rules).unwrap_or(i64::MAX));
        m.policy_peers
            .set(i64::try_from(c.peers).unwrap_or(i64::MAX));
    }

    /// Takes a fresh read of the public record (made only without `--private-networks`) and
    /// re-installs the table when its `allowed_ips` changed; the peers' egress rules are written
    /// again right after (the re-install drops them). True when that failed: the caller must
    /// write them again soon.
    fn refresh_networks(&mut self, record: Result<GatewayRecord>) -> bool {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the public gateway record; the advertised networks stay");
                return false;
            }
        };
        let now = advertised(&self.cfg.private_networks, Some(&record.allowed_ips));
        if now.networks == self.networks.networks {
            return false;
        }
        tracing::info!(
            before = %cidr_list(&self.networks.networks),
            after = %cidr_list(&now.networks),
            "the gateway record's allowed_ips changed: re-installing the nftables table"
        );
        now.log();
        match install_rules(&self.cfg, &self.masquerade_sources, &now.networks) {
            Ok(n) => self.nat = n,
            Err(e) => {
                self.health.metrics.reconcile_errors.inc();
                tracing::warn!(error = %e, "re-installing the nftables table failed; the old one stays, retrying at the next poll");
                return false;
            }
        }
        self.networks = now;
        self.policy_addresses.clear();
        let running = self.running.clone();
        let egress = std::mem::take(&mut self.egress);
        let r = self.write_policies(&running, &egress);
        self.egress = egress;
        if let Err(e) = r {
            self.health.metrics.reconcile_errors.inc();
            tracing::warn!(error = %e, "writing the peers' egress rules after the re-install failed; retrying");
            return true;
        }
        false
    }

    /// One vault-mode reconcile: the key, then every record below the peers folder.
    async fn reconcile(&mut self) -> Result<()> {
        let started = Instant::now();
        let key = read_key(&self.vault, &self.cfg).await?;
        self.apply_key(&key)?;
        if let Some(record) = read_record(&self.vault, &self.cfg).await {
            // Vault mode has no policies: nothing to write again when that fails.
            let _ = self.refresh_networks(record);
        }
        let (fresh, errors) =
            load_peer_records(&self.vault, &self.cfg.kv_mount, &self.cfg.peers_path).await?;
        self.health
            .metrics
            .count_reads("poll", (fresh.len() + errors.len()) as u64);
        for (id, e) in &errors {
            let kept = self.last_records.contains_key(id);
            tracing::warn!(identity = %id, error = %e, kept_last_known = kept, "peer record not read");
        }
        let records = keep_last_known(fresh, &errors, &mut self.last_records);
        let now = Timestamp::now();
        let desired = desired_peers(&records, now);
        for (id, why) in &desired.conflicts {
            tracing::warn!(identity = %id, reason = %why, "peer left out");
        }
        self.health
            .metrics
            .conflicts
            .set(i64::try_from(desired.conflicts.len() + errors.len()).unwrap_or(i64::MAX));
        // No NetworkPolicies in vault mode: every peer gets the table's default.
        self.apply_table(&desired.peers, &BTreeMap::new())?;
        crate::events::emit_all(self.events.on_records(&records, &desired.conflicts, now));
        self.next_activation = match (desired.next_activation, self.key_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.health
            .metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Statistics tick. Returns false when the userspace device has stopped answering (it no
    /// longer takes SIGTERM itself: `tunnel/userspace.rs` replaces its signalfd).
    fn tick(&mut self) -> bool {
        self.health.tick();
        let tunnel = &self.tunnel;
        match self
            .health
            .metrics
            .refresh_peers(|| tunnel.peer_stats().or_else(|_| tunnel.peer_stats()))
        {
            Ok(s) => {
                crate::events::emit_all(self.events.on_stats(&s, SystemTime::now()));
                match self.nat.drop_counters() {
                    Ok(d) => {
                        self.health.metrics.record_drops(d);
                        crate::events::emit_all(self.events.on_drops(d, Instant::now()));
                    }
                    Err(e) => tracing::debug!(error = %e, "reading the drop counters failed"),
                }
                true
            }
            Err(e) if self.tunnel.mode() == crate::tunnel::Mode::Userspace => {
                tracing::warn!(error = %e, "the userspace WireGuard device stopped answering; shutting down");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading peer statistics failed");
                true
            }
        }
    }
}

/// Creates the gateway's interface, and makes `/metrics` read its byte counters at scrape time
/// (the loop records them once a second; a scrape should not see them up to a second late).
fn create_tunnel(
    cfg: &GatewayConfig,
    private: &PrivateRecord,
    health: &Arc<GatewayHealth>,
) -> Result<WgTunnel> {
    let tunnel = WgTunnel::create_listening(
        &cfg.interface,
        cfg.mtu,
        &private.addresses,
        &private.private_key,
        cfg.listen_port,
    )?;
    let (reader, metrics) = (tunnel.stats_reader(), health.metrics.clone());
    health.refresh.set(Arc::new(move || {
        metrics.refresh_peers(|| reader.peer_stats()).map(drop)
    }));
    Ok(tunnel)
}

/// Logs in and reads the gateway's private record, retrying with backoff; `None` on shutdown.
async fn load_gateway_key(
    cfg: &GatewayConfig,
    vault: &Vault,
    health: &GatewayHealth,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Option<PrivateRecord> {
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let attempt = async {
            vault.login().await?;
            let rec = vault.read(&cfg.kv_mount, &cfg.gateway_key_path).await?;
            PrivateRecord::from_fields(
                &format!("{}/{}", cfg.kv_mount, cfg.gateway_key_path),
                &rec.data,
                rec.version,
            )
        };
        match attempt.await {
            Ok(p) => return Some(p),
            Err(e) => {
                let delay = backoff.next_delay(rand::random::<f64>());
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis(), "loading the gateway key failed; not ready");
                health.set(
                    false,
                    Some(Err(format!("loading the gateway key failed: {e}"))),
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = &mut *shutdown => return None,
                }
            }
        }
    }
}

/// Installs (or re-installs) the gateway's nftables table, always: masquerading of `sources`,
/// the forward filter letting tunnel traffic into `networks` only (none: nowhere), and the
/// per-peer egress part, whose default for peers without a policy is `networks`
/// (`--default-deny`: nothing).
fn install_rules(cfg: &GatewayConfig, sources: &[IpNet], networks: &[IpNet]) -> Result<Nat> {
    let n = Nat::install_with(&cfg.interface, sources, networks, cfg.default_deny)?;
    tracing::info!(
        table = %nat::table_name(&cfg.interface),
        masquerade = cfg.masquerade,
        networks = %cidr_list(networks),
        default_deny = cfg.default_deny,
        "nftables table installed (NAT, forward filter, per-peer egress)"
    );
    Ok(n)
}

/// Peers that have an egress policy but an allowed IP wider than one address: refused (the
/// per-address map cannot hold a range, and leaving part of it out would widen their egress).
fn unenforceable(desired: &PeerTable, egress: &BTreeMap<String, Egress>) -> BTreeSet<String> {
    desired
        .iter()
        .filter(|(k, p)| {
            matches!(egress.get(*k), Some(Egress::Allowed(_)))
                && nat::PeerAddresses::from_allowed_ips(&p.allowed_ips).is_none()
        })
        .map(|(k, _)| k.clone())
        .collect()
}

/// Turns IP forwarding on (IPv6 too with `ipv6`) and logs which way; a failure is a warning and
/// the gateway serves on (the node or the Pod spec may still forward).
async fn enable_forwarding(ipv6: bool) {
    match forwarding::enable_ipv4().await {
        Ok(Ipv4Forwarding::PerInterface {
            interfaces,
            sysctl_error,
        }) => tracing::info!(
            forwarding = "per-interface netlink",
            interfaces = %interfaces.join(","),
            sysctl_error = %sysctl_error,
            "IPv4 forwarding on: {} is not writable, so it is on for each interface instead",
            forwarding::IPV4_SYSCTL
        ),
        Ok(way) => tracing::info!(
            forwarding = way.way(),
            already_on = matches!(way, Ipv4Forwarding::AlreadyOn),
            "IPv4 forwarding on"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "IPv4 forwarding is off: tunnel traffic will not reach the private network"
        ),
    }
    if !ipv6 {
        return;
    }
    match forwarding::enable_ipv6() {
        Ok(already_on) => tracing::info!(forwarding = "sysctl", already_on, "IPv6 forwarding on"),
        Err(e) => tracing::warn!(
            error = %e,
            "IPv6 forwarding is off: Linux forwards IPv6 only by net.ipv6.conf.all.forwarding (no per-interface or netlink way); set it to 1 in the Pod's securityContext.sysctls (the wg-gateway chart does with server.ipv6=true or an IPv6 network in server.privateNetworks)"
        ),
    }
}

/// The addresses the peers may hold: the public record's `pool`, or (a record written before
/// pools were recorded) the networks of the gateway's own addresses.
fn peer_pools(record: Option<&GatewayRecord>, own: &[IpNet]) -> Vec<IpNet> {
    match record {
        Some(g) if !g.pool.is_empty() => g.pool.clone(),
        _ => own.iter().map(IpNet::trunc).collect(),
    }
}

/// After the shutdown signal: `/ready` answers 503 at once; when the gateway was serving, the
/// caller's loop (and so the data plane) goes on for `delay` before the cleanup, so the Service
/// and load balancer take the Pod out first (the injector's `--shutdown-delay` does the same).
async fn drain(health: &GatewayHealth, delay: Duration) {
    use std::sync::atomic::Ordering::Relaxed;
    let serving = health.interface_up.load(Relaxed);
    health.draining.store(true, Relaxed);
    health.metrics.ready.set(0);
    if serving && !delay.is_zero() {
        tracing::info!(
            shutdown_delay_seconds = delay.as_secs(),
            "shutting down: /ready answers 503; peers are still forwarded until the Pod leaves the Service"
        );
        tokio::time::sleep(delay).await;
    }
}

/// `--endpoints` → the public record, once at start ([`crate::publish`]); every outcome is
/// logged, a failure is a warning naming the fix and the gateway serves on.
async fn publish_endpoints(cfg: &GatewayConfig, vault: &Vault, public_key: &str, own: &[IpNet]) {
    let own = crate::publish::Own {
        public_key: public_key.to_owned(),
        pool: own.iter().map(IpNet::trunc).collect(),
        allowed_ips: cfg.private_networks.clone(),
        keepalive: cfg.peer_keepalive,
    };
    let new = cfg.endpoints.join(",");
    let record = format!("{}/{}", cfg.kv_mount, cfg.gateway_path);
    match crate::publish::publish(
        vault,
        &cfg.kv_mount,
        &cfg.gateway_path,
        &cfg.endpoints,
        &own,
    )
    .await
    {
        Ok(crate::publish::Outcome::Unchanged) => {
            tracing::info!(%record, endpoints = %new, "the public record already lists --endpoints");
        }
        Ok(crate::publish::Outcome::Updated { old, version }) => tracing::info!(
            %record,
            old = %old.join(","),
            new = %new,
            version,
            "published --endpoints in the public record (endpoints: old -> new; no other field changed)"
        ),
        Ok(crate::publish::Outcome::Created { version }) => tracing::warn!(
            %record,
            endpoints = %new,
            pool = %cidr_list(&own.pool),
            allowed_ips = %cidr_list(&own.allowed_ips),
            version,
            "there was no public record: created it from the gateway's key and addresses (`wg-sidecar keys provision-gateway` writes it too)"
        ),
        Err(e) if status_of(&e) == Some(403) => tracing::warn!(
            %record,
            error = %e,
            endpoints = %new,
            "cannot publish --endpoints: the gateway's Vault policy does not allow writing its public record; run `wg-sidecar vault bootstrap` again (it grants exactly that) or `wg-sidecar keys provision-gateway --endpoints`"
        ),
        Err(e) => tracing::warn!(
            %record,
            error = %e,
            endpoints = %new,
            "cannot publish --endpoints in the public record; sidecars use what it lists (fix it with `wg-sidecar keys provision-gateway --endpoints`)"
        ),
    }
}

/// Runs the gateway until `shutdown` completes and the drain ([`drain`]) is over; then removes
/// the NAT table and the interface.
pub async fn run(cfg: GatewayConfig, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    let health = GatewayHealth::new();
    let (drain_health, delay) = (health.clone(), cfg.shutdown_delay);
    let shutdown = async move {
        shutdown.await;
        drain(&drain_health, delay).await;
    };
    tokio::pin!(shutdown);
    let bound = bind(cfg.health_addr, health.clone())?;
    tracing::info!(addr = %bound, "health endpoints listening");
    // Kubernetes mode needs the API: without a usable client, fail now, naming the flag.
    let kube = match cfg.pod_source {
        PodSource::Kubernetes => Some(pod_watch::client().await?),
        PodSource::Vault => None,
    };
    // The token is renewed while the gateway runs and revoked on the way out (issue 18).
    let (vault, renewal) = Vault::with_renewal(cfg.vault.clone(), TokenCounters::default())?;
    let Some(private) = load_gateway_key(&cfg, &vault, &health, &mut shutdown).await else {
        return Ok(());
    };
    let public_key = private.public_key()?;
    if !cfg.endpoints.is_empty() {
        publish_endpoints(&cfg, &vault, &public_key, &private.addresses).await;
    }
    let record = match vault
        .read(&cfg.kv_mount, &cfg.gateway_path)
        .await
        .and_then(|r| GatewayRecord::from_fields(&cfg.gateway_path, &r.data, r.version))
    {
        Ok(g) => {
            if g.public_key != public_key {
                tracing::warn!(
                    record = %cfg.gateway_path,
                    "the public record's key does not match the gateway's private key; sidecars will not connect"
                );
            }
            Some(g)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the public gateway record (not needed to serve; the peers' pool is taken from the gateway's own addresses)");
            None
        }
    };
    let pools = peer_pools(record.as_ref(), &private.addresses);
    let tunnel = create_tunnel(&cfg, &private, &health)?;
    tracing::info!(interface = %cfg.interface, port = cfg.listen_port, %public_key, mode = tunnel.mode().as_str(), "gateway interface up");
    // After the interface exists: without a writable /proc/sys, IPv4 forwarding is turned on
    // per interface, and only interfaces present now get it.
    let networks = advertised(
        &cfg.private_networks,
        record.as_ref().map(|r| r.allowed_ips.as_slice()),
    );
    networks.log();
    let ipv6 = forwarding::ipv6_needed(&private.addresses, &pools, &networks.networks);
    enable_forwarding(ipv6).await;
    let masquerade_sources = if cfg.masquerade {
        private.addresses.clone()
    } else {
        Vec::new()
    };
    let nat = match install_rules(&cfg, &masquerade_sources, &networks.networks) {
        Ok(n) => n,
        Err(e) => {
            let mut tunnel = tunnel;
            let _ = tunnel.remove();
            return Err(e);
        }
    };
    let mut gw = Gateway {
        events: crate::events::GatewayEvents::new(&cfg.gateway_name, &public_key),
        cfg,
        vault,
        health: health.clone(),
        tunnel,
        running: PeerTable::new(),
        nat,
        networks,
        masquerade_sources,
        egress: BTreeMap::new(),
        policy_addresses: BTreeSet::new(),
        last_records: BTreeMap::new(),
        next_activation: None,
        key_version: private.version,
        key_due: None,
    };
    health.set(true, None);
    match kube {
        Some(client) => gw.run_kubernetes(client, pools, &mut shutdown).await,
        None => gw.run_vault(&mut shutdown).await,
    }
    tracing::info!("shutting down: removing the nftables table and the interface");
    health.set(false, None);
    if let Err(e) = gw.nat.remove() {
        tracing::warn!(error = %e, "removing the nftables table failed");
    }
    renewal.finish().await;
    gw.tunnel.remove()
}

fn status_of(e: &SidecarError) -> Option<u16> {
    match e {
        SidecarError::VaultKv { status, .. } => *status,
        _ => None,
    }
}

fn log_change(c: &PeerChange, metrics: &GatewayMetrics) {
    match c {
        PeerChange::Admitted { pod, public_key } => tracing::info!(
            namespace = %pod.namespace, pod = %pod.name, uid = %pod.uid, %public_key,
            "peer admitted"
        ),
        PeerChange::Refused {
            pod,
            public_key,
            refusal,
        } => {
            metrics.count_refused(refusal.reason());
            tracing::warn!(
                namespace = %pod.namespace, pod = %pod.name, uid = %pod.uid,
                public_key = public_key.as_deref().unwrap_or("-"),
                reason = refusal.reason(), detail = %refusal,
                "peer refused"
            );
        }
        PeerChange::Rotated {
            pod,
            old,
            public_key,
        } => {
            metrics.pod_key_rotations.inc();
            tracing::info!(
                namespace = %pod.namespace, pod = %pod.name, uid = %pod.uid, old_key = %old,
                %public_key, "peer key rotated in place"
            );
        }
        PeerChange::Removed {
            pod,
            public_key,
            reason,
        } => tracing::info!(
            namespace = %pod.namespace, pod = %pod.name, uid = %pod.uid, %public_key, reason,
            "peer removed"
        ),
    }
}

/// What a kubernetes-mode task reports back to the loop.
enum Done {
    Record(Box<(ReadRequest, RecordRead)>),
    Claim(IpAddr, ClaimRead),
    Released,
    Listed(Result<Listing>),
    Swept,
    /// The private record, and the public one when it is the source of the networks.
    Key(
        Box<(
            Result<crate::vault::KvRecord>,
            Option<Result<GatewayRecord>>,
        )>,
    ),
}

/// What the sweep lists: records, claims and verdicts of the gateway.
struct Listing {
    records: Vec<RecordRef>,
    claims: Vec<IpAddr>,
    verdicts: Vec<RecordRef>,
}

/// What the Vault tasks of kubernetes mode share.
struct VaultWork {
    vault: Arc<Vault>,
    layout: Layout,
    gateway: String,
    metrics: GatewayMetrics,
    kube: kube::Client,
    grace: Duration,
}

impl VaultWork {
    fn mount(&self) -> &str {
        &self.layout.kv_mount
    }

    async fn read_record(&self, req: ReadRequest) -> Done {
        let path = self.layout.record_path(&self.gateway, &req.pod);
        self.metrics.count_reads("record", 1);
        let result = match self.vault.read(self.mount(), &path).await {
            Ok(rec) => match PeerRecord::from_fields(
                &format!("{}/{path}", self.mount()),
                &rec.data,
                rec.version,
            ) {
                Ok(p) => RecordRead::Found(p),
                Err(e) => RecordRead::Invalid(e.to_string()),
            },
            Err(e) if status_of(&e) == Some(404) => RecordRead::NotFound,
            Err(e) => RecordRead::Failed(e.to_string()),
        };
        match &result {
            RecordRead::NotFound => tracing::debug!(%path, "record not published yet"),
            RecordRead::Failed(e) | RecordRead::Invalid(e) => {
                tracing::warn!(%path, error = %e, "record not read; retrying");
            }
            RecordRead::Found(_) => {}
        }
        Done::Record(Box::new((req, result)))
    }

    /// The claim of `address` and who it names (`Ok(None)`: no claim).
    async fn claim(
        &self,
        address: IpAddr,
        kind: &str,
    ) -> Result<Option<(Claim, Option<Timestamp>)>> {
        let path = self.layout.claim_path(&self.gateway, address);
        self.metrics.count_reads(kind, 1);
        match self.vault.read(self.mount(), &path).await {
            Ok(rec) => Ok(Claim::from_fields(&path, &rec.data)
                .ok()
                .map(|c| (c, rec.created_time))),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn read_claim(&self, address: IpAddr) -> Done {
        let result = match self.claim(address, "claim").await {
            Ok(Some((c, _))) => ClaimRead::Holder(c.pod),
            Ok(None) => ClaimRead::Nobody,
            Err(e) => {
                tracing::warn!(%address, error = %e, "claim not read; retrying");
                ClaimRead::Failed(e.to_string())
            }
        };
        Done::Claim(address, result)
    }

    /// Deletes `path` with all its versions; a 404 is fine (another replica was first).
    async fn delete(&self, path: &str, kind: &str, origin: &str) {
        match self.vault.delete_all(self.mount(), path).await {
            Ok(()) => {
                self.metrics.count_released(kind, origin);
                tracing::info!(%path, kind, origin, "deleted from Vault");
            }
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => tracing::warn!(%path, error = %e, "delete failed; the orphan sweep retries"),
        }
    }

    /// Tells a refused Pod why: writes its verdict create-only (`cas=0`), so of all replicas
    /// one write lands; when one is there already it is read, and written again (check-and-set
    /// on the version read) only when it says something else.
    async fn write_verdict(&self, pod: PodIdentity, refusal: Refusal) {
        let mount = self.mount();
        let path = self.layout.verdict_path(&self.gateway, &pod);
        let verdict = Verdict {
            reason: refusal.reason().to_owned(),
            message: refusal.to_string(),
            gateway: self.gateway.clone(),
            time: Timestamp::now(),
            pod,
        };
        let fields = verdict.to_fields();
        let cas = match self.vault.write(mount, &path, &fields, Some(0)).await {
            Ok(_) => None,
            Err(e) if status_of(&e) == Some(400) => {
                self.metrics.count_reads("verdict", 1);
                match self.vault.read(mount, &path).await {
                    Ok(rec) => {
                        let same = Verdict::from_fields(&path, &rec.data)
                            .is_ok_and(|old| old.same_as(&verdict));
                        if same {
                            return;
                        }
                        u32::try_from(rec.version).ok()
                    }
                    Err(e) => {
                        tracing::warn!(%path, error = %e, "verdict not read; the Pod's /ready may not say why it is refused");
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(%path, error = %e, "verdict not written; the Pod's /ready will not say why it is refused (the gateway needs create and update on its verdicts path)");
                return;
            }
        };
        if let Some(version) = cas {
            match self.vault.write(mount, &path, &fields, Some(version)).await {
                Ok(_) => {}
                // Another replica wrote meanwhile: it decided the same.
                Err(e) if status_of(&e) == Some(400) => return,
                Err(e) => {
                    tracing::warn!(%path, error = %e, "verdict not updated");
                    return;
                }
            }
        }
        self.metrics.verdicts_written.inc();
        tracing::info!(%path, reason = %verdict.reason, "verdict written for the refused Pod's sidecar");
    }

    async fn verdict(&self, change: VerdictChange) -> Done {
        match change {
            VerdictChange::Write { pod, refusal } => self.write_verdict(pod, refusal).await,
            VerdictChange::Delete(pod) => {
                let path = self.layout.verdict_path(&self.gateway, &pod);
                self.delete(&path, "verdict", "released").await;
            }
        }
        Done::Released
    }

    async fn release(&self, r: Release) -> Done {
        match r {
            Release::Record(pod) => {
                let path = self.layout.record_path(&self.gateway, &pod);
                self.delete(&path, "record", "released").await;
            }
            Release::Verdict(pod) => {
                let path = self.layout.verdict_path(&self.gateway, &pod);
                self.delete(&path, "verdict", "released").await;
            }
            Release::Claim { address, holder } => {
                // Only a claim that still names the gone Pod: its record may have named an
                // address another Pod holds.
                match self.claim(address, "claim").await {
                    Ok(Some((c, _))) if c.pod.uid == holder.uid => {
                        let path = self.layout.claim_path(&self.gateway, address);
                        self.delete(&path, "claim", "released").await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(%address, error = %e, "claim not released; the orphan sweep retries");
                    }
                }
            }
        }
        Done::Released
    }

    /// Lists `<peers>/<gateway>/<ns>/<sa>/<uid>`, `<addresses>/<gateway>/<addr>` and
    /// `<verdicts>/<gateway>/<ns>/<sa>/<uid>`.
    async fn list(&self) -> Result<Listing> {
        let records = self
            .list_pod_folder(&self.layout.peers_folder(&self.gateway))
            .await?;
        let verdicts = self
            .list_pod_folder(&self.layout.verdicts_folder(&self.gateway))
            .await?;
        let claims = list_opt(
            &self.vault,
            self.mount(),
            &self.layout.claims_folder(&self.gateway),
        )
        .await?
        .iter()
        .filter_map(|n| crate::pool::parse_record_name(n))
        .collect();
        Ok(Listing {
            records,
            claims,
            verdicts,
        })
    }

    /// The `<ns>/<sa>/<uid>` entries below `folder`.
    async fn list_pod_folder(&self, folder: &str) -> Result<Vec<RecordRef>> {
        let mount = self.mount();
        let mut records = Vec::new();
        for ns in list_opt(&self.vault, mount, folder).await? {
            let Some(ns) = ns.strip_suffix('/') else {
                continue;
            };
            for sa in list_opt(&self.vault, mount, &format!("{folder}/{ns}")).await? {
                let Some(sa) = sa.strip_suffix('/') else {
                    continue;
                };
                for uid in list_opt(&self.vault, mount, &format!("{folder}/{ns}/{sa}")).await? {
                    if !uid.ends_with('/') {
                        records.push(RecordRef {
                            namespace: ns.to_owned(),
                            service_account: sa.to_owned(),
                            uid,
                        });
                    }
                }
            }
        }
        Ok(records)
    }

    /// True when the Kubernetes API shows `pod` (same UID) alive: the last check before the
    /// sweep deletes something the watch says is gone.
    async fn alive(&self, pod: &PodIdentity) -> Option<bool> {
        match pod_watch::pod_uid(&self.kube, &pod.namespace, &pod.name).await {
            Ok(uid) => Some(uid.as_deref() == Some(pod.uid.as_str())),
            Err(e) => {
                tracing::warn!(namespace = %pod.namespace, pod = %pod.name, error = %e, "cannot check the Pod; sweep skips it");
                None
            }
        }
    }

    /// Deletes the candidates that are older than the grace period and whose Pod is gone.
    async fn sweep(&self, listing: Listing, live: HashSet<String>) -> Done {
        let now = Timestamp::now();
        let Listing {
            records,
            claims,
            verdicts,
        } = listing;
        let records_folder = self.layout.peers_folder(&self.gateway);
        let verdicts_folder = self.layout.verdicts_folder(&self.gateway);
        for (folder, refs, kind) in [
            (&records_folder, records, "record"),
            (&verdicts_folder, verdicts, "verdict"),
        ] {
            for r in refs {
                let path = format!("{folder}/{}/{}/{}", r.namespace, r.service_account, r.uid);
                self.metrics.count_reads("sweep", 1);
                let rec = match self.vault.read(self.mount(), &path).await {
                    Ok(rec) => rec,
                    Err(e) if status_of(&e) == Some(404) => continue,
                    Err(e) => {
                        tracing::warn!(%path, error = %e, kind, "sweep cannot read it");
                        continue;
                    }
                };
                if !old_enough(rec.created_time, now, self.grace) {
                    continue;
                }
                // One naming the Pod of its own path: make sure that Pod is gone.
                if let Ok(Some(pod)) = PodIdentity::from_fields(&path, &rec.data) {
                    if pod.uid == r.uid && self.alive(&pod).await != Some(false) {
                        continue;
                    }
                }
                tracing::info!(%path, kind, "orphaned {kind}: no live Pod has its UID");
                self.delete(&path, kind, "swept").await;
            }
        }
        for address in claims {
            let (claim, created) = match self.claim(address, "sweep").await {
                Ok(Some((c, t))) => (Some(c), t),
                Ok(None) => continue,
                // A claim that does not parse names nobody: its creation time still counts.
                Err(e) => {
                    tracing::warn!(%address, error = %e, "sweep cannot read the claim");
                    continue;
                }
            };
            if !old_enough(created, now, self.grace) {
                continue;
            }
            if let Some(c) = &claim {
                if live.contains(&c.pod.uid) || self.alive(&c.pod).await != Some(false) {
                    continue;
                }
            }
            tracing::info!(%address, "orphaned claim: no live Pod holds it");
            let path = self.layout.claim_path(&self.gateway, address);
            self.delete(&path, "claim", "swept").await;
        }
        Done::Swept
    }
}

/// Logs the access rules, and watches the Namespaces when the selector needs their labels (else
/// a stream that never yields).
fn namespace_watch(
    access: &Access,
    client: &kube::Client,
) -> std::pin::Pin<Box<dyn futures_util::Stream<Item = NamespaceWatchUpdate> + Send>> {
    if access.allows_all() {
        tracing::info!("access: every injected Pod of the profile may use the gateway");
    } else {
        tracing::info!(
            namespace_selector = %access.selector_text(),
            service_accounts = %access.service_accounts_text(),
            "access: only Pods of selected namespaces and listed service accounts (empty: any) may use the gateway"
        );
    }
    if !access.needs_namespaces() {
        return Box::pin(stream::pending());
    }
    tracing::info!("watching Namespaces (metadata) for access.namespaceSelector (no peer is admitted before they are listed)");
    Box::pin(pod_watch::watch_namespaces(client.clone()))
}

/// Loop state of kubernetes mode beyond the index.
struct KubeLoop {
    index: PodIndex,
    policies: PolicyStore,
    tasks: JoinSet<Done>,
    releases: std::collections::VecDeque<Release>,
    verdicts: std::collections::VecDeque<VerdictChange>,
    started: Instant,
    dirty_at: Option<Instant>,
    first_list_at: Option<Instant>,
    synced: bool,
    sweeping: bool,
    next_sweep: Option<Instant>,
    key_reading: bool,
    next_key: Instant,
    /// Kubernetes Events on refused Pods ([`crate::events::PodEvents`]).
    pod_events: crate::events::PodEvents,
}

impl Gateway {
    fn jittered(d: Duration) -> Duration {
        crate::backoff::jittered(d, rand::random::<f64>())
    }

    /// Vault mode: the whole peer table from Vault every `--poll-interval`.
    async fn run_vault(&mut self, shutdown: &mut (impl Future<Output = ()> + Unpin)) {
        let mut next_reconcile = Instant::now();
        loop {
            let now_ts = Timestamp::now();
            let activation_due = self.next_activation.is_some_and(|t| t <= now_ts);
            if Instant::now() >= next_reconcile || activation_due {
                let r = tokio::select! {
                    r = self.reconcile() => r,
                    () = &mut *shutdown => break,
                };
                match r {
                    Ok(()) => self.health.set(true, Some(Ok(()))),
                    Err(e) => {
                        self.health.metrics.reconcile_errors.inc();
                        tracing::warn!(error = %e, "reconcile failed; keeping the current peer table");
                        self.health
                            .set(true, Some(Err(format!("reconcile failed: {e}"))));
                    }
                }
                next_reconcile = Instant::now() + Self::jittered(self.cfg.poll_interval);
            }
            if !self.tick() {
                break;
            }
            // Wake for the next second, or earlier for a key activation.
            let mut wait = Duration::from_secs(1);
            if let Some(t) = self.next_activation {
                let until =
                    Duration::try_from(Timestamp::now().duration_until(t)).unwrap_or_default();
                wait = wait.min(until);
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = &mut *shutdown => break,
            }
        }
    }

    /// Kubernetes mode: the profile's Pods from the watch, one record read per sidecar start.
    async fn run_kubernetes(
        &mut self,
        client: kube::Client,
        pools: Vec<IpNet>,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) {
        let work = Arc::new(VaultWork {
            vault: self.vault.clone(),
            layout: self.cfg.layout.clone(),
            gateway: self.cfg.gateway_name.clone(),
            metrics: self.health.metrics.clone(),
            kube: client.clone(),
            grace: self.cfg.orphan_grace,
        });
        let pool_list: Vec<String> = pools.iter().map(ToString::to_string).collect();
        tracing::info!(
            profile = %self.cfg.profile,
            selector = %pod_watch::selector(&self.cfg.profile),
            gateway = %self.cfg.gateway_name,
            pool = %pool_list.join(","),
            "watching the profile's Pods in every namespace"
        );
        let access = self.cfg.access.clone();
        let mut st = KubeLoop {
            index: PodIndex::new(pools).with_access(access.clone()),
            policies: PolicyStore::new(),
            tasks: JoinSet::new(),
            releases: std::collections::VecDeque::new(),
            verdicts: std::collections::VecDeque::new(),
            started: Instant::now(),
            dirty_at: None,
            first_list_at: None,
            synced: false,
            sweeping: false,
            next_sweep: None,
            key_reading: false,
            next_key: Instant::now() + Self::jittered(self.cfg.poll_interval),
            pod_events: crate::events::PodEvents::new(client.clone(), &self.cfg.gateway_name),
        };
        self.health.set(
            true,
            Some(Err(
                "the Pod watch has not listed the profile's Pods yet".into()
            )),
        );
        tracing::info!("watching the NetworkPolicies of every namespace (peers are admitted once they are listed)");
        let policy_events = policy_watch::watch(client.clone());
        tokio::pin!(policy_events);
        let namespace_events = namespace_watch(&access, &client);
        tokio::pin!(namespace_events);
        let events = pod_watch::watch(client, &self.cfg.profile);
        tokio::pin!(events);
        let mut next_tick = Instant::now();
        loop {
            let now = Instant::now();
            self.step(&mut st, &work, now);
            if now >= next_tick {
                if !self.tick() {
                    break;
                }
                next_tick = now + Duration::from_secs(1);
            }
            let mut wake = next_tick.min(st.next_key);
            // Until the policies are listed nothing is applied: a policy event wakes the loop.
            if let Some(t) = st.dirty_at.filter(|_| st.policies.synced()) {
                wake = wake.min(t + DEBOUNCE);
            }
            if st.tasks.len() < MAX_VAULT_TASKS {
                if let Some(t) = st.index.next_due() {
                    wake = wake.min(t);
                }
            }
            if let Some(t) = st.next_sweep.filter(|_| !st.sweeping) {
                wake = wake.min(t);
            }
            tokio::select! {
                u = events.next() => match u {
                    Some(WatchUpdate::Event(e)) => st.index.apply(e, Instant::now()),
                    Some(WatchUpdate::Error(e)) => {
                        self.health.metrics.watch_errors.inc();
                        tracing::warn!(error = %e, "Pod watch failed; retrying with backoff (the peer table stays)");
                        if !st.synced {
                            self.health.set(true, Some(Err(format!("the Pod watch failed: {e}"))));
                        }
                    }
                    None => {
                        tracing::error!("the Pod watch ended; shutting down");
                        break;
                    }
                },
                u = policy_events.next() => if !self.on_policy_update(&mut st, u) {
                    break;
                },
                u = namespace_events.next() => if !self.on_namespace_update(&mut st, u) {
                    break;
                },
                Some(done) = st.tasks.join_next(), if !st.tasks.is_empty() => match done {
                    Ok(d) => self.finish(&mut st, &work, d),
                    Err(e) => tracing::warn!(error = %e, "a Vault task failed"),
                },
                () = tokio::time::sleep_until(wake.into()) => {}
                () = &mut *shutdown => break,
            }
        }
        // Deletes still in flight are abandoned: another replica or the sweep finishes them.
        st.tasks.abort_all();
    }

    /// One pass of the kubernetes-mode loop at `now`: apply the table, start due Vault work.
    fn step(&mut self, st: &mut KubeLoop, work: &Arc<VaultWork>, now: Instant) {
        st.index.tick(now, Timestamp::now());
        if st.index.take_changed() | st.policies.take_changed() {
            st.dirty_at.get_or_insert(now);
        }
        if st.first_list_at.is_none() && st.index.synced() {
            st.first_list_at = Some(now);
            tracing::info!(
                pods = st.index.watched(),
                "first list of the profile's Pods"
            );
            let why = format!(
                "initial sync: reading the records of {} listed Pods",
                st.index.watched()
            );
            self.health.set(true, Some(Err(why)));
        }
        // Nothing is applied before the policies are listed: a new peer never runs without its
        // policy.
        if st.policies.synced() && st.dirty_at.is_some_and(|t| now >= t + DEBOUNCE) {
            self.apply_index(st, now);
        }
        self.health
            .metrics
            .pods_watched
            .set(i64::try_from(st.index.watched()).unwrap_or(i64::MAX));
        self.health
            .metrics
            .policies_watched
            .set(i64::try_from(st.policies.len()).unwrap_or(i64::MAX));
        // Ready once the first list is in and every running sidecar of it had an answer: a
        // replica joining behind the load balancer already knows its peers.
        if !st.synced && st.index.initial_reads_done() && st.dirty_at.is_none() {
            st.synced = true;
            let secs = st.started.elapsed().as_secs_f64();
            self.health.metrics.sync_duration.set(secs);
            self.health.set(true, Some(Ok(())));
            tracing::info!(
                pods = st.index.watched(),
                peers = self.running.len(),
                seconds = secs,
                "initial sync complete"
            );
        }
        st.releases.extend(st.index.take_releases());
        let room = |st: &KubeLoop| MAX_VAULT_TASKS.saturating_sub(st.tasks.len());
        while room(st) > 0 {
            let Some(r) = st.releases.pop_front() else {
                break;
            };
            let w = work.clone();
            st.tasks.spawn(async move { w.release(r).await });
        }
        while room(st) > 0 {
            let Some(v) = st.verdicts.pop_front() else {
                break;
            };
            // A Pod gone meanwhile was released (its verdict with it): nothing to tell.
            if matches!(&v, VerdictChange::Write { pod, .. } if !st.index.is_live(&pod.uid)) {
                continue;
            }
            let w = work.clone();
            st.tasks.spawn(async move { w.verdict(v).await });
        }
        for req in st.index.due_reads(now, room(st)) {
            let w = work.clone();
            st.tasks.spawn(async move { w.read_record(req).await });
        }
        for address in st.index.due_claim_reads(now, room(st)) {
            let w = work.clone();
            st.tasks.spawn(async move { w.read_claim(address).await });
        }
        if st.next_sweep.is_none() {
            if let Some(t) = st.first_list_at {
                if st.index.initial_reads_done() || now >= t + FIRST_SWEEP_WAIT {
                    st.next_sweep = Some(now);
                }
            }
        }
        if !st.sweeping && st.next_sweep.is_some_and(|t| t <= now) {
            st.sweeping = true;
            let w = work.clone();
            st.tasks.spawn(async move { Done::Listed(w.list().await) });
        }
        let key_due = self.key_due.is_some_and(|t| t <= Timestamp::now());
        if !st.key_reading && (now >= st.next_key || key_due) {
            st.key_reading = true;
            // The loop wakes for `next_key`: not again before this read has answered.
            st.next_key = now + Self::jittered(self.cfg.poll_interval);
            let vault = self.vault.clone();
            let cfg = self.cfg.clone();
            st.tasks.spawn(async move {
                let key = read_key(&vault, &cfg).await;
                Done::Key(Box::new((key, read_record(&vault, &cfg).await)))
            });
        }
    }

    /// Applies the index's peer table with the egress its Pods' policies give them.
    fn apply_index(&mut self, st: &mut KubeLoop, now: Instant) {
        st.dirty_at = None;
        let started = Instant::now();
        let out = st.index.peers(now);
        for c in &out.changes {
            log_change(c, &self.health.metrics);
            crate::events::emit(&self.events.on_change(c));
            st.pod_events.tell(c);
        }
        st.verdicts.extend(out.verdicts);
        self.health
            .metrics
            .conflicts
            .set(i64::try_from(out.refused).unwrap_or(i64::MAX));
        let egress = policy_watch::peer_egress(&st.policies, st.index.admitted_pods());
        for (policy, version, dropped) in st.policies.unreported(&egress.unsupported) {
            tracing::warn!(
                %policy, resource_version = %version, dropped = %dropped.join("; "),
                "NetworkPolicy rules that cannot apply in the tunnel were dropped (never widened)"
            );
        }
        self.health
            .metrics
            .policy_unsupported
            .set(i64::try_from(egress.unsupported.len()).unwrap_or(i64::MAX));
        if let Err(e) = self.apply_table(&out.table, &egress.egress) {
            self.health.metrics.reconcile_errors.inc();
            tracing::warn!(error = %e, "applying the peer table failed; retrying in 1 s");
            st.dirty_at = Some(now + Duration::from_secs(1));
        }
        self.health
            .metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// Takes a NetworkPolicy watch update; false when the watch ended.
    fn on_policy_update(&self, st: &mut KubeLoop, u: Option<PolicyWatchUpdate>) -> bool {
        match u {
            Some(PolicyWatchUpdate::Event(e)) => st.policies.apply(*e),
            Some(PolicyWatchUpdate::Error(e)) => {
                self.health.metrics.policy_watch_errors.inc();
                tracing::warn!(error = %e, "NetworkPolicy watch failed; retrying with backoff (the rules in force stay; no peer is admitted before the first list: the gateway needs networkpolicies get, list, watch)");
                if !st.policies.synced() {
                    self.health.set(
                        true,
                        Some(Err(format!("the NetworkPolicy watch failed: {e}"))),
                    );
                }
            }
            None => {
                tracing::error!("the NetworkPolicy watch ended; shutting down");
                return false;
            }
        }
        true
    }

    /// Takes a Namespace watch update; false when the watch ended.
    fn on_namespace_update(&self, st: &mut KubeLoop, u: Option<NamespaceWatchUpdate>) -> bool {
        match u {
            Some(NamespaceWatchUpdate::Event(e)) => st.index.apply_namespace(e),
            Some(NamespaceWatchUpdate::Error(e)) => {
                self.health.metrics.namespace_watch_errors.inc();
                tracing::warn!(error = %e, "Namespace watch failed; retrying with backoff (access decisions stay; none is made before the first list: the gateway needs namespaces get, list, watch)");
                if !st.index.namespaces_synced() {
                    self.health
                        .set(true, Some(Err(format!("the Namespace watch failed: {e}"))));
                }
            }
            None => {
                tracing::error!("the Namespace watch ended; shutting down");
                return false;
            }
        }
        true
    }

    /// Takes a finished task's result.
    fn finish(&mut self, st: &mut KubeLoop, work: &Arc<VaultWork>, done: Done) {
        let now = Instant::now();
        match done {
            Done::Record(b) => {
                let (req, r) = *b;
                st.index.record_read(&req, r, now);
            }
            Done::Claim(a, r) => st.index.claim_read(a, r, now),
            Done::Released => {}
            Done::Listed(Ok(listed)) => {
                let candidates = Listing {
                    records: st.index.orphan_records(&listed.records),
                    claims: st.index.orphan_claims(&listed.claims),
                    verdicts: st.index.orphan_records(&listed.verdicts),
                };
                if candidates.records.is_empty()
                    && candidates.claims.is_empty()
                    && candidates.verdicts.is_empty()
                {
                    self.sweep_done(st, now);
                } else {
                    tracing::debug!(
                        records = candidates.records.len(),
                        claims = candidates.claims.len(),
                        verdicts = candidates.verdicts.len(),
                        "sweep candidates"
                    );
                    let live = st.index.live_uids();
                    let w = work.clone();
                    st.tasks
                        .spawn(async move { w.sweep(candidates, live).await });
                }
            }
            Done::Listed(Err(e)) => {
                tracing::warn!(error = %e, "orphan sweep cannot list Vault; next sweep at the interval");
                self.sweep_done(st, now);
            }
            Done::Swept => self.sweep_done(st, now),
            Done::Key(b) => {
                let (r, record) = *b;
                st.key_reading = false;
                st.next_key = now + Self::jittered(self.cfg.poll_interval);
                if record.is_some_and(|rec| self.refresh_networks(rec)) {
                    st.dirty_at = Some(now);
                }
                if let Err(e) = r.and_then(|rec| self.apply_key(&rec)) {
                    self.health.metrics.reconcile_errors.inc();
                    tracing::warn!(error = %e, "gateway key check failed; keeping the current key");
                }
                if let Some(t) = self.key_due {
                    let until =
                        Duration::try_from(Timestamp::now().duration_until(t)).unwrap_or_default();
                    st.next_key = st.next_key.min(now + until);
                }
            }
        }
    }

    fn sweep_done(&self, st: &mut KubeLoop, now: Instant) {
        st.sweeping = false;
        st.next_sweep = Some(now + Self::jittered(self.cfg.orphan_sweep_interval));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use jiff::{SignedDuration, Timestamp};

    use super::{
        apply_diff, desired_peers, diff, keep_last_known, IpNet, Peer, PeerTable, PodSource,
    };
    use crate::{
        keys::{generate_keypair, PeerRecord},
        tunnel::{Mode, PeerSpec, PeerStats, Tunnel},
    };
    use std::collections::BTreeMap;

    fn rec(key: &str, addr: &str) -> PeerRecord {
        PeerRecord {
            public_key: key.into(),
            addresses: vec![addr.parse().unwrap()],
            next_public_key: None,
            activate_at: None,
            rotates_at: None,
            preshared_key: None,
            pod: None,
            version: 1,
        }
    }

    fn table(pairs: &[(&str, &str)]) -> PeerTable {
        pairs
            .iter()
            .map(|(k, a)| {
                let peer = Peer {
                    allowed_ips: vec![a.parse().unwrap()],
                    preshared_key: None,
                };
                ((*k).to_owned(), peer)
            })
            .collect()
    }

    #[test]
    fn a_failed_read_keeps_the_last_known_record_and_an_unlisted_identity_goes() {
        let mut last = BTreeMap::new();
        let first = keep_last_known(
            vec![
                ("shop/web".into(), rec("A", "10.9.0.2/32")),
                ("shop/api".into(), rec("B", "10.9.0.3/32")),
            ],
            &[],
            &mut last,
        );
        assert_eq!(first.len(), 2);
        // shop/web's read fails this time: its peer stays, exactly as it was.
        let second = keep_last_known(
            vec![("shop/api".into(), rec("B", "10.9.0.3/32"))],
            &[("shop/web".into(), "503 from Vault".into())],
            &mut last,
        );
        assert_eq!(
            second,
            vec![
                ("shop/api".to_owned(), rec("B", "10.9.0.3/32")),
                ("shop/web".to_owned(), rec("A", "10.9.0.2/32")),
            ]
        );
        // shop/web no longer listed: gone. A failed read of a never-seen identity adds nothing.
        let third = keep_last_known(
            vec![("shop/api".into(), rec("B", "10.9.0.3/32"))],
            &[("shop/new".into(), "403".into())],
            &mut last,
        );
        assert_eq!(
            third,
            vec![("shop/api".to_owned(), rec("B", "10.9.0.3/32"))]
        );
        assert_eq!(last.len(), 1);
    }

    #[test]
    fn unchanged_peers_are_not_touched_and_changes_are_classified() {
        let running = table(&[
            ("a", "10.99.0.2/32"),
            ("b", "10.99.0.3/32"),
            ("c", "10.99.0.4/32"),
        ]);
        let desired = table(&[
            ("a", "10.99.0.2/32"),
            ("b", "10.99.0.9/32"),
            ("d", "10.99.0.5/32"),
        ]);
        let d = diff(&running, &desired);
        assert_eq!(d.add, table(&[("d", "10.99.0.5/32")]));
        assert_eq!(d.update, table(&[("b", "10.99.0.9/32")]));
        assert_eq!(d.remove, vec!["c".to_owned()]);
        assert!(diff(&desired, &desired).is_empty());
    }

    #[test]
    fn a_rotated_key_replaces_the_old_one_exactly_at_activation() {
        let (_, old) = generate_keypair();
        let (_, new) = generate_keypair();
        let t = Timestamp::now() + SignedDuration::from_secs(30);
        let r = PeerRecord {
            next_public_key: Some(new.clone()),
            activate_at: Some(t),
            rotates_at: None,
            ..rec(&old, "10.99.0.2/32")
        };
        let before = desired_peers(
            &[("shop/web".into(), r.clone())],
            t - SignedDuration::from_secs(1),
        );
        assert!(before.peers.contains_key(&old));
        assert_eq!(before.next_activation, Some(t));
        let after = desired_peers(&[("shop/web".into(), r)], t);
        assert!(after.peers.contains_key(&new) && !after.peers.contains_key(&old));
        assert_eq!(after.next_activation, None);
        let d = diff(&before.peers, &after.peers);
        assert_eq!(d.remove, vec![old]);
        assert_eq!(d.add.len(), 1);
    }

    #[test]
    fn duplicate_keys_and_addresses_leave_out_the_later_identity() {
        let now = Timestamp::now();
        let d = desired_peers(
            &[
                ("b/two".into(), rec("k1", "10.99.0.2/32")),
                ("a/one".into(), rec("k1", "10.99.0.3/32")),
                ("c/three".into(), rec("k3", "10.99.0.3/32")),
                ("d/four".into(), rec("k4", "10.99.0.4/32")),
            ],
            now,
        );
        assert_eq!(
            d.peers,
            table(&[("k1", "10.99.0.3/32"), ("k4", "10.99.0.4/32")])
        );
        let left_out: Vec<&str> = d.conflicts.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(left_out, vec!["b/two", "c/three"]);
    }

    fn gateway_args(extra: &[&str]) -> super::GatewayArgs {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            g: super::GatewayArgs,
        }
        let mut argv = vec![
            "gateway",
            "--vault-addr=http://v",
            "--vault-role=wg-gateway",
            "--vault-gateway-path=wg/gateways/corp",
        ];
        argv.extend_from_slice(extra);
        <T as clap::Parser>::try_parse_from(argv).unwrap().g
    }

    #[test]
    fn endpoints_are_validated_at_parse_time_and_the_shutdown_delay_defaults_to_5s() {
        use std::time::Duration;
        let cfg = gateway_args(&[]).into_config().unwrap();
        assert!(
            cfg.endpoints.is_empty(),
            "nothing published without the flag"
        );
        assert_eq!(cfg.shutdown_delay, Duration::from_secs(5));
        let cfg = gateway_args(&[
            "--endpoints=vpn.example.com:51820, [2001:db8::1]:51820",
            "--shutdown-delay=0",
        ])
        .into_config()
        .unwrap();
        assert_eq!(
            cfg.endpoints,
            ["vpn.example.com:51820", "[2001:db8::1]:51820"]
        );
        assert_eq!(cfg.shutdown_delay, Duration::ZERO);
        let e = gateway_args(&["--endpoints=203.0.113.1"])
            .into_config()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--endpoints") && e.contains("\"203.0.113.1\"") && e.contains("e.g."),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_draining_gateway_is_not_ready_at_once() {
        use super::{drain, GatewayHealth};
        use std::time::{Duration, Instant};
        let h = GatewayHealth::new();
        h.set(true, Some(Ok(())));
        assert!(h.ready().is_ok());
        let started = Instant::now();
        drain(&h, Duration::ZERO).await;
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(h.ready().unwrap_err().contains("shutting down"));
        // A later reconcile does not make it ready again.
        h.set(true, Some(Ok(())));
        assert!(h.ready().is_err());
    }

    #[test]
    fn the_chart_flags_parse_and_the_private_record_path_is_derived() {
        let cfg = gateway_args(&["--listen-port=51820", "--health-addr=0.0.0.0:9901"])
            .into_config()
            .unwrap();
        assert_eq!(cfg.gateway_key_path, "wg/gateway-keys/corp");
        assert_eq!(cfg.peers_path, "wg/peers");
        assert_eq!(cfg.peer_keepalive, Some(5));
        assert!(cfg.masquerade);
        let cfg = gateway_args(&["--peer-keepalive=0", "--masquerade=false"])
            .into_config()
            .unwrap();
        assert_eq!(cfg.peer_keepalive, None);
        assert!(!cfg.masquerade);
        assert!(
            cfg.private_networks.is_empty(),
            "default: the record's allowed_ips"
        );
        assert!(!cfg.default_deny);
        for (arg, want) in [
            ("--default-deny", true),
            ("--default-deny=true", true),
            ("--default-deny=false", false),
        ] {
            assert_eq!(
                gateway_args(&[arg]).into_config().unwrap().default_deny,
                want,
                "{arg}"
            );
        }
    }

    #[test]
    fn the_networks_are_the_flag_else_the_record_and_a_difference_is_named() {
        use super::{advertised, NetworksFrom};
        let nets = |v: &[&str]| -> Vec<IpNet> { v.iter().map(|n| n.parse().unwrap()).collect() };
        let record = nets(&["10.20.0.9/24", "fd00:20::/64"]);
        // No flag: the record's allowed_ips, truncated and sorted.
        let a = advertised(&[], Some(&record));
        assert_eq!(a.networks, nets(&["10.20.0.0/24", "fd00:20::/64"]));
        assert_eq!((a.from, a.record_differs), (NetworksFrom::Record, None));
        // Neither (or an unreadable record): nothing, so nothing is forwarded.
        assert!(advertised(&[], None).networks.is_empty());
        assert!(advertised(&[], Some(&[])).networks.is_empty());
        // The flag wins; the record's differing networks are kept for the warning.
        let a = advertised(&nets(&["10.30.0.0/16"]), Some(&record));
        assert_eq!(
            (a.networks.clone(), a.from),
            (nets(&["10.30.0.0/16"]), NetworksFrom::Flag)
        );
        assert_eq!(
            a.record_differs,
            Some(nets(&["10.20.0.0/24", "fd00:20::/64"]))
        );
        // The same set in another order or spelling is no difference.
        let same = advertised(&nets(&["fd00:20::1/64", "10.20.0.0/24"]), Some(&record));
        assert_eq!(same.record_differs, None);
        assert_eq!(
            advertised(&nets(&["10.30.0.0/16"]), Some(&[])).record_differs,
            None
        );
    }

    #[test]
    fn a_peer_with_a_policy_and_an_allowed_range_is_unenforceable_and_a_host_one_is_not() {
        use crate::policy::Egress;
        let desired = table(&[
            ("a", "10.99.0.2/32"),
            ("b", "10.99.1.0/24"),
            ("c", "10.99.2.0/24"),
        ]);
        let egress = BTreeMap::from([
            ("a".to_owned(), Egress::Allowed(vec![])),
            ("b".to_owned(), Egress::Allowed(vec![])),
        ]);
        let refused = super::unenforceable(&desired, &egress);
        assert_eq!(
            refused.into_iter().collect::<Vec<_>>(),
            ["b"],
            "c has no policy"
        );
    }

    #[test]
    fn private_networks_parse_as_cidrs_and_a_bad_one_is_refused_naming_flag_and_value() {
        let cfg = gateway_args(&["--private-networks=10.20.0.9/24, fd00:20::/64,,10.20.0.0/24"])
            .into_config()
            .unwrap();
        let want: Vec<IpNet> = vec![
            "10.20.0.0/24".parse().unwrap(),
            "fd00:20::/64".parse().unwrap(),
        ];
        assert_eq!(cfg.private_networks, want, "truncated, deduplicated");
        let err = gateway_args(&["--private-networks=10.20.0.0/24,10.300.0.0/16"])
            .into_config()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--private-networks") && err.contains("10.300.0.0/16"),
            "{err}"
        );
    }

    #[test]
    fn pod_source_defaults_to_kubernetes_with_the_gateway_name_as_profile() {
        let cfg = gateway_args(&[]).into_config().unwrap();
        assert_eq!(cfg.pod_source, PodSource::Kubernetes);
        assert_eq!(cfg.gateway_name, "corp");
        assert_eq!(cfg.profile, "corp");
        assert_eq!(cfg.layout.peers_folder("corp"), "wg/peers/corp");
        assert_eq!(cfg.layout.claims_folder("corp"), "wg/addresses/corp");
        assert_eq!(
            cfg.orphan_sweep_interval,
            std::time::Duration::from_secs(300)
        );
        assert_eq!(cfg.orphan_grace, std::time::Duration::from_secs(60));
        let cfg = gateway_args(&[
            "--pod-source=vault",
            "--profile=corp-eu",
            "--vault-addresses-path=vpn/addresses/",
            "--orphan-sweep-interval=5",
            "--orphan-grace=2",
        ])
        .into_config()
        .unwrap();
        assert_eq!(cfg.pod_source, PodSource::Vault);
        assert_eq!(cfg.profile, "corp-eu");
        assert_eq!(cfg.layout.addresses_prefix, "vpn/addresses");
        assert_eq!(cfg.orphan_sweep_interval, std::time::Duration::from_secs(5));
    }

    #[test]
    fn bad_pod_source_profile_folder_or_sweep_interval_is_refused_naming_the_flag() {
        for (arg, flag) in [
            ("--pod-source=etcd", "--pod-source"),
            ("--profile=-corp", "--profile"),
            ("--profile=corp/eu", "--profile"),
            ("--vault-addresses-path=/", "--vault-addresses-path"),
            ("--vault-peers-path=wg//peers", "--vault-peers-path"),
            ("--orphan-sweep-interval=0", "--orphan-sweep-interval"),
            ("--vault-verdicts-path=/", "--vault-verdicts-path"),
            (
                "--allow-namespace-selector=env in (prod",
                "--allow-namespace-selector",
            ),
            ("--allow-service-accounts=shop", "--allow-service-accounts"),
        ] {
            let err = gateway_args(&[arg]).into_config().unwrap_err();
            assert!(
                matches!(&err, crate::SidecarError::InvalidConfig(m) if m.contains(flag)),
                "{arg}: {err}"
            );
        }
    }

    #[test]
    fn the_access_flags_parse_as_the_chart_renders_them_and_need_the_kubernetes_pod_source() {
        let cfg = gateway_args(&[
            "--allow-namespace-selector=vpn=allowed,team in (payments,shop)",
            "--allow-service-accounts=shop/web,bank/api",
        ])
        .into_config()
        .unwrap();
        assert!(cfg.access.needs_namespaces());
        assert_eq!(
            cfg.access.selector_text(),
            "vpn=allowed,team in (payments,shop)"
        );
        assert_eq!(cfg.access.service_accounts_text(), "bank/api,shop/web");
        assert_eq!(cfg.layout.verdicts_prefix, "wg/verdicts");
        let open = gateway_args(&[]).into_config().unwrap();
        assert!(open.access.allows_all(), "no flag: every Pod");
        let err = gateway_args(&["--pod-source=vault", "--allow-service-accounts=shop/web"])
            .into_config()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--allow-service-accounts") && err.contains("--pod-source kubernetes"),
            "{err}"
        );
    }

    #[test]
    fn the_preshared_key_travels_from_the_record_to_the_peer_and_a_new_one_is_an_update() {
        use crate::secret::Secret;
        let (_, psk) = generate_keypair();
        let mut r = rec("k1", "10.99.0.2/32");
        r.preshared_key = Some(Secret::new(psk.clone()));
        let with = desired_peers(&[("corp/shop/web/1".into(), r.clone())], Timestamp::now());
        assert_eq!(
            with.peers["k1"].preshared_key.as_ref().map(Secret::expose),
            Some(psk.as_str())
        );
        let without = desired_peers(
            &[("corp/shop/web/1".into(), rec("k1", "10.99.0.2/32"))],
            Timestamp::now(),
        );
        let d = diff(&without.peers, &with.peers);
        assert_eq!(d.update.len(), 1, "{d:?}");
        let mut t = Recorder::default();
        let mut running = without.peers;
        apply_diff(&mut t, &mut running, &d, None).unwrap();
        assert_eq!(t.psks, vec![Some(psk)]);
        assert_eq!(running, with.peers);
    }

    #[test]
    fn a_gateway_path_without_gateways_segment_needs_an_explicit_key_path() {
        let mut a = gateway_args(&[]);
        a.vault_gateway_path = "custom/corp".into();
        let err = a.clone().into_config().unwrap_err().to_string();
        assert!(err.contains("--vault-gateway-key-path"), "{err}");
        a.vault_gateway_key_path = Some("custom/corp-key".into());
        assert_eq!(a.into_config().unwrap().gateway_key_path, "custom/corp-key");
    }

    #[tokio::test]
    async fn ready_needs_the_interface_and_one_reconcile_and_metrics_show_active_peers() {
        use axum::{body::Body, http::Request};
        use tower::ServiceExt;
        let h = super::GatewayHealth::new();
        let get = |p: &'static str| Request::get(p).body(Body::empty()).unwrap();
        let ready = |h: &std::sync::Arc<super::GatewayHealth>| {
            let router = super::router(h.clone());
            async move { router.oneshot(get("/ready")).await.unwrap().status() }
        };
        assert_eq!(ready(&h).await, 503);
        h.set(true, Some(Err("vault down".into())));
        assert_eq!(ready(&h).await, 503);
        h.set(true, Some(Ok(())));
        assert_eq!(ready(&h).await, 200);
        // A later failure keeps serving the last table: still ready.
        h.set(true, Some(Err("vault down".into())));
        assert_eq!(ready(&h).await, 200);
        let now = std::time::SystemTime::now();
        let peer = |k: &str, age: Option<u64>| PeerStats {
            public_key: k.into(),
            endpoint: None,
            rx_bytes: 10,
            tx_bytes: 20,
            last_handshake: age.map(|a| now - std::time::Duration::from_secs(a)),
        };
        h.metrics.record(
            &[peer("A", Some(5)), peer("B", Some(200)), peer("C", None)],
            now,
        );
        let text = h.metrics.encode();
        assert!(text.contains("wg_gateway_peers 3"), "{text}");
        assert!(text.contains("wg_gateway_active_peers 1"), "{text}");
        assert!(
            text.contains("wg_gateway_peer_receive_bytes_total{public_key=\"A\"} 10"),
            "{text}"
        );
        // A peer that left loses its series.
        h.metrics.record(&[peer("A", Some(5))], now);
        let text = h.metrics.encode();
        assert!(!text.contains("public_key=\"B\""), "{text}");
    }

    #[derive(Default)]
    struct Recorder {
        batches: Vec<(Vec<String>, Vec<String>)>,
        psks: Vec<Option<String>>,
    }

    impl Tunnel for Recorder {
        fn mode(&self) -> Mode {
            Mode::Userspace
        }
        #[allow(clippy::unnecessary_literal_bound)]
        fn name(&self) -> &str {
            "rec0"
        }
        fn set_private_key(&mut self, _: &crate::secret::Secret) -> crate::Result<()> {
            Ok(())
        }
        fn set_peer(&mut self, _: &PeerSpec) -> crate::Result<()> {
            unreachable!("the gateway applies batches")
        }
        fn remove_peer(&mut self, _: &str) -> crate::Result<()> {
            unreachable!("the gateway applies batches")
        }
        fn apply_peer_changes(&mut self, remove: &[String], add: &[PeerSpec]) -> crate::Result<()> {
            self.batches.push((
                remove.to_vec(),
                add.iter().map(|p| p.public_key.clone()).collect(),
            ));
            self.psks.extend(
                add.iter()
                    .map(|p| p.preshared_key.as_ref().map(|k| k.expose().to_owned())),
            );
            Ok(())
        }
        fn peer_stats(&self) -> crate::Result<Vec<PeerStats>> {
            Ok(Vec::new())
        }
        fn remove(&mut self) -> crate::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn drop_counters_are_exported_as_increments_and_a_reinstalled_table_counts_on() {
        let m = super::GatewayMetrics::new();
        let read = |outside, policy| crate::nat::DropCounters {
            outside_networks: outside,
            policy,
        };
        m.record_drops(read(5, 0));
        m.record_drops(read(7, 2));
        // The table was installed again: its counters restart from zero.
        m.record_drops(read(1, 0));
        let text = m.encode();
        assert!(
            text.contains("wg_gateway_dropped_packets_total{reason=\"outside_networks\"} 8"),
            "{text}"
        );
        assert!(
            text.contains("wg_gateway_dropped_packets_total{reason=\"policy\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn handshake_times_and_the_key_in_use_are_exported_and_a_gone_peer_loses_its_series() {
        use std::time::{Duration, SystemTime, UNIX_EPOCH};
        let m = super::GatewayMetrics::new();
        let peer = |k: &str, hs: Option<u64>| PeerStats {
            public_key: k.to_owned(),
            endpoint: None,
            rx_bytes: 1,
            tx_bytes: 1,
            last_handshake: hs.map(|s| UNIX_EPOCH + Duration::from_secs(s)),
        };
        let now = UNIX_EPOCH + Duration::from_secs(1_900_000_100);
        m.record(&[peer("a", Some(1_900_000_000)), peer("b", None)], now);
        let text = m.encode();
        assert!(
            text.contains(
                "wg_gateway_peer_last_handshake_timestamp_seconds{public_key=\"a\"} 1900000000"
            ),
            "{text}"
        );
        assert!(
            !text.contains("timestamp_seconds{public_key=\"b\"}"),
            "{text}"
        );
        assert!(
            text.contains("wg_gateway_peers_refused_total{reason=\"not_injected\"} 0"),
            "every refusal reason from zero: {text}"
        );
        m.record(&[peer("b", Some(1_900_000_050))], SystemTime::now());
        let text = m.encode();
        assert!(!text.contains("public_key=\"a\""), "{text}");
        assert!(text.contains("{public_key=\"b\"} 1900000050"), "{text}");

        let rec = |version, not_before: Option<&str>| crate::vault::KvRecord {
            data: not_before
                .map(|t| {
                    (
                        "not_before".to_owned(),
                        crate::secret::Secret::new(t.to_owned()),
                    )
                })
                .into_iter()
                .collect(),
            version,
            created_time: Some("2030-03-17T17:46:40Z".parse().unwrap()),
        };
        m.record_key(&rec(3, None), Some("2030-03-18T00:00:00Z".parse().unwrap()));
        let text = m.encode();
        for line in [
            "wg_gateway_key_version 3",
            "wg_gateway_key_activation_timestamp_seconds 1900000000",
            "wg_gateway_key_pending_activation_timestamp_seconds 1900022400",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
        // A rotated key takes effect at its not_before, not when it was written.
        m.record_key(&rec(4, Some("2030-03-17T17:48:20Z")), None);
        let text = m.encode();
        for line in [
            "wg_gateway_key_version 4",
            "wg_gateway_key_activation_timestamp_seconds 1900000100",
            "wg_gateway_key_pending_activation_timestamp_seconds 0",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
    }

    #[test]
    fn a_diff_is_applied_as_one_batch_with_updates_as_remove_then_add() {
        let mut t = Recorder::default();
        let mut running = table(&[("a", "10.99.0.2/32"), ("b", "10.99.0.3/32")]);
        let desired = table(&[("b", "10.99.0.7/32"), ("c", "10.99.0.4/32")]);
        let d = diff(&running, &desired);
        apply_diff(&mut t, &mut running, &d, Some(5)).unwrap();
        assert_eq!(t.batches.len(), 1);
        assert_eq!(t.batches[0].0, vec!["a", "b"]);
        assert_eq!(t.batches[0].1, vec!["c", "b"]);
        assert_eq!(running, desired);
    }
}
