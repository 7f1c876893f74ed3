//! `wg-sidecar gateway`: the WireGuard server that injected Pods connect to.
//!
//! Owns: the gateway's flags and config, the pure reconcile core (peer records → desired peer
//! table → diff against the running table), applying a diff as one batch, the gateway's metrics
//! and health endpoints, and the loop: 1 s statistics tick, a Vault reconcile every
//! `--poll-interval` and at every pending key activation.
//! Must never: touch a peer whose desired state did not change (its session must live on), log
//! key material, or write to Vault (the gateway only reads).

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    net::SocketAddr,
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

use crate::{
    error::{Result, SidecarError},
    forwarding::{self, Ipv4Forwarding},
    health::HANDSHAKE_FRESH,
    keys::{list_identities, PeerRecord, VaultArgs},
    keysource::{GatewayRecord, PrivateRecord},
    nat::{self, Nat},
    tunnel::{PeerSpec, PeerStats, Tunnel, WgTunnel},
    vault::Vault,
};

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
    /// Folder of the peer records (`<path>/<ns>/<sa>`).
    #[arg(long, env = "WG_SIDECAR_VAULT_PEERS_PATH", default_value = "wg/peers")]
    pub vault_peers_path: String,
    /// Address of `/healthz`, `/ready`, `/metrics`.
    #[arg(long, env = "WG_SIDECAR_HEALTH_ADDR", default_value = "0.0.0.0:9901")]
    pub health_addr: SocketAddr,
    /// Seconds between reconciles with Vault (a removed peer loses access within one).
    #[arg(long, env = "WG_SIDECAR_POLL_INTERVAL", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub poll_interval: u64,
    /// Keepalive the gateway sends to every connected peer, in seconds (0 = off). Sidecars treat
    /// silence longer than their `--failover-after` as a dead gateway, so keep this well below it.
    #[arg(long, env = "WG_SIDECAR_PEER_KEEPALIVE", default_value_t = 5)]
    pub peer_keepalive: u16,
    /// Masquerade tunnel traffic leaving to the private network (an nftables table of our own).
    #[arg(long, env = "WG_SIDECAR_MASQUERADE", action = clap::ArgAction::Set, default_value_t = true)]
    pub masquerade: bool,
    /// Networks behind the gateway that tunnelled Pods may reach, comma-separated CIDRs (IPv4
    /// and IPv6). Tunnel traffic to anything else is dropped and only traffic towards these is
    /// masqueraded. Empty (the default): every destination the gateway can route to.
    #[arg(long, env = "WG_SIDECAR_PRIVATE_NETWORKS", value_delimiter = ',')]
    pub private_networks: Vec<String>,
    /// Vault connection.
    #[command(flatten)]
    pub vault: VaultArgs,
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
    /// Peer records folder.
    pub peers_path: String,
    /// Health listen address.
    pub health_addr: SocketAddr,
    /// Reconcile period.
    pub poll_interval: Duration,
    /// Keepalive sent to peers (None = off).
    pub peer_keepalive: Option<u16>,
    /// Masquerade tunnel sources leaving by other interfaces.
    pub masquerade: bool,
    /// The only destinations tunnel traffic may reach (empty = every destination).
    pub private_networks: Vec<IpNet>,
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
        Ok(GatewayConfig {
            interface: self.interface,
            listen_port: self.listen_port,
            mtu: self.mtu,
            vault: self.vault.settings()?,
            kv_mount: self.vault.vault_kv_mount,
            gateway_path: self.vault_gateway_path,
            gateway_key_path,
            peers_path: self.vault_peers_path.trim_end_matches('/').to_owned(),
            health_addr: self.health_addr,
            poll_interval: Duration::from_secs(self.poll_interval),
            peer_keepalive: (self.peer_keepalive > 0).then_some(self.peer_keepalive),
            masquerade: self.masquerade,
            private_networks,
        })
    }
}

/// The peer table: base64 public key → allowed IPs.
pub type PeerTable = BTreeMap<String, Vec<IpNet>>;

/// The desired peer table at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Public key → allowed IPs.
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
        out.peers.insert(key.to_owned(), nets);
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
    /// Keys whose allowed IPs changed (applied as remove + add: the peer's session restarts).
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

fn spec(public_key: &str, ips: &[IpNet], keepalive: Option<u16>) -> PeerSpec {
    PeerSpec {
        public_key: public_key.to_owned(),
        preshared_key: None,
        endpoint: None,
        allowed_ips: ips.to_vec(),
        keepalive,
    }
}

/// Applies `d` to `tunnel` as one batch (peers get `keepalive`) and, on success, to `running`.
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
        .map(|(k, ips)| spec(k, ips, keepalive))
        .collect();
    tunnel.apply_peer_changes(&remove, &add)?;
    for k in &d.remove {
        running.remove(k);
    }
    for (k, ips) in d.add.iter().chain(d.update.iter()) {
        running.insert(k.clone(), ips.clone());
    }
    Ok(())
}

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
    last_seen: Arc<Mutex<HashMap<String, (u64, u64)>>>,
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
            last_seen: Arc::default(),
            reconcile_duration: Histogram::new([
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            reconcile_errors: Counter::default(),
            peer_changes: Family::default(),
            conflicts: Gauge::default(),
            ready: Gauge::default(),
        };
        r.register(
            "wg_gateway_peers",
            "Peers in the running table",
            m.peers.clone(),
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
        Self {
            registry: Arc::new(r),
            ..m
        }
    }

    /// Records statistics: peer counts, active peers and per-peer byte counters.
    pub fn record(&self, stats: &[PeerStats], now: SystemTime) {
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
        let mut last = self
            .last_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut seen = HashMap::with_capacity(stats.len());
        for p in stats {
            let labels = vec![("public_key".to_owned(), p.public_key.clone())];
            let (prx, ptx) = last.get(&p.public_key).copied().unwrap_or((0, 0));
            let drx = p.rx_bytes.checked_sub(prx).unwrap_or(p.rx_bytes);
            let dtx = p.tx_bytes.checked_sub(ptx).unwrap_or(p.tx_bytes);
            self.peer_rx.get_or_create(&labels).inc_by(drx);
            self.peer_tx.get_or_create(&labels).inc_by(dtx);
            seen.insert(p.public_key.clone(), (p.rx_bytes, p.tx_bytes));
        }
        for gone in last.keys().filter(|k| !seen.contains_key(*k)) {
            let labels = vec![("public_key".to_owned(), gone.clone())];
            self.peer_rx.remove(&labels);
            self.peer_tx.remove(&labels);
        }
        *last = seen;
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
    /// Metrics served on `/metrics`.
    pub metrics: GatewayMetrics,
}

impl GatewayHealth {
    /// Fresh state: alive, not ready.
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            last_tick: Mutex::new(Instant::now()),
            reconciled: AtomicBool::new(false),
            interface_up: AtomicBool::new(false),
            last_error: Mutex::new(None),
            ticks: AtomicU64::new(0),
            metrics: GatewayMetrics::new(),
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

/// Reads every peer record under `peers_path` (16 reads in flight). Unreadable or invalid
/// records are left out and returned as `(identity, error)` pairs (see [`keep_last_known`]).
pub async fn load_peer_records(
    vault: &Vault,
    mount: &str,
    peers_path: &str,
) -> Result<(Vec<(String, PeerRecord)>, Vec<(String, String)>)> {
    let ids = list_identities(vault, mount, peers_path).await?;
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

async fn bind(addr: SocketAddr, state: Arc<GatewayHealth>) -> Result<SocketAddr> {
    let herr = |source| SidecarError::Health {
        addr: addr.to_string(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(herr)?;
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
    /// The peer records last read successfully, by identity ([`keep_last_known`]).
    last_records: BTreeMap<String, PeerRecord>,
    next_activation: Option<Timestamp>,
    /// KV version of the private record whose key is in use.
    key_version: u64,
    /// `not_before` of a held-back gateway key (see `docs/rotation.md`).
    key_due: Option<Timestamp>,
}

impl Gateway {
    /// Applies a new gateway key in place once its `not_before` has come.
    async fn reconcile_key(&mut self) -> Result<()> {
        let path = &self.cfg.gateway_key_path;
        let rec = self.vault.read(&self.cfg.kv_mount, path).await?;
        if rec.version == self.key_version {
            return Ok(());
        }
        let p = PrivateRecord::from_fields(
            &format!("{}/{path}", self.cfg.kv_mount),
            &rec.data,
            rec.version,
        )?;
        let now = Timestamp::now();
        if let Some(t) = p.not_before.filter(|t| *t > now) {
            if self.key_due != Some(t) {
                tracing::info!(version = rec.version, not_before = %t, "new gateway key waits for its not_before");
            }
            self.key_due = Some(t);
            return Ok(());
        }
        self.tunnel.set_private_key(&p.private_key)?;
        self.key_version = rec.version;
        self.key_due = None;
        tracing::info!(version = rec.version, public_key = %p.public_key()?, "gateway key rotated in place");
        Ok(())
    }

    async fn reconcile(&mut self) -> Result<()> {
        let started = Instant::now();
        self.reconcile_key().await?;
        let (fresh, errors) =
            load_peer_records(&self.vault, &self.cfg.kv_mount, &self.cfg.peers_path).await?;
        for (id, e) in &errors {
            let kept = self.last_records.contains_key(id);
            tracing::warn!(identity = %id, error = %e, kept_last_known = kept, "peer record not read");
        }
        let records = keep_last_known(fresh, &errors, &mut self.last_records);
        let desired = desired_peers(&records, Timestamp::now());
        for (id, why) in &desired.conflicts {
            tracing::warn!(identity = %id, reason = %why, "peer left out");
        }
        self.health
            .metrics
            .conflicts
            .set(i64::try_from(desired.conflicts.len() + errors.len()).unwrap_or(i64::MAX));
        let d = diff(&self.running, &desired.peers);
        if !d.is_empty() {
            let keepalive = self.cfg.peer_keepalive;
            if let Err(e) = apply_diff(&mut self.tunnel, &mut self.running, &d, keepalive) {
                // The interface's state is unknown now: rebuild the table from what it reports.
                self.running = self
                    .tunnel
                    .peer_stats()
                    .map(|s| s.into_iter().map(|p| (p.public_key, Vec::new())).collect())
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
        }
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

    /// Statistics tick. Returns false when the userspace device has stopped: BoringTun takes
    /// SIGTERM/SIGINT through its own signalfd, so the signal may reach it instead of us.
    fn tick(&self) -> bool {
        self.health.tick();
        match self
            .tunnel
            .peer_stats()
            .or_else(|_| self.tunnel.peer_stats())
        {
            Ok(s) => {
                self.health.metrics.record(&s, SystemTime::now());
                true
            }
            Err(e) if self.tunnel.mode() == crate::tunnel::Mode::Userspace => {
                tracing::warn!(error = %e, "the userspace WireGuard device stopped answering (it exits on SIGTERM); shutting down");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading peer statistics failed");
                true
            }
        }
    }
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

/// Installs the gateway's nftables table: masquerading of the tunnel `pool` (with
/// `--masquerade`) and, with `--private-networks`, the forward filter limiting tunnel traffic to
/// them. `None` when neither is asked for.
fn install_rules(cfg: &GatewayConfig, pool: &[IpNet]) -> Result<Option<Nat>> {
    if cfg.private_networks.is_empty() {
        tracing::info!("no --private-networks: tunnelled Pods reach every destination the gateway can route to");
    }
    if !cfg.masquerade && cfg.private_networks.is_empty() {
        return Ok(None);
    }
    let sources: &[IpNet] = if cfg.masquerade { pool } else { &[] };
    let n = Nat::install(&cfg.interface, sources, &cfg.private_networks)?;
    let networks: Vec<String> = cfg
        .private_networks
        .iter()
        .map(ToString::to_string)
        .collect();
    tracing::info!(
        table = %nat::table_name(&cfg.interface),
        masquerade = cfg.masquerade,
        private_networks = %networks.join(","),
        "NAT and forwarding rules installed"
    );
    Ok(Some(n))
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
            "IPv6 forwarding is off: IPv6 has no per-interface setting over netlink; set net.ipv6.conf.all.forwarding=1 in the Pod's securityContext.sysctls"
        ),
    }
}

/// Runs the gateway until `shutdown` completes; then removes the NAT table and the interface.
pub async fn run(cfg: GatewayConfig, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    tokio::pin!(shutdown);
    let health = GatewayHealth::new();
    let bound = bind(cfg.health_addr, health.clone()).await?;
    tracing::info!(addr = %bound, "health endpoints listening");
    let vault = Arc::new(Vault::new(cfg.vault.clone())?);
    let Some(private) = load_gateway_key(&cfg, &vault, &health, &mut shutdown).await else {
        return Ok(());
    };
    let public_key = private.public_key()?;
    match vault
        .read(&cfg.kv_mount, &cfg.gateway_path)
        .await
        .and_then(|r| GatewayRecord::from_fields(&cfg.gateway_path, &r.data, r.version))
    {
        Ok(g) if g.public_key != public_key => tracing::warn!(
            record = %cfg.gateway_path,
            "the public record's key does not match the gateway's private key; sidecars will not connect"
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the public gateway record (not needed to serve)");
        }
    }
    let tunnel = WgTunnel::create_listening(
        &cfg.interface,
        cfg.mtu,
        &private.addresses,
        &private.private_key,
        cfg.listen_port,
    )?;
    tracing::info!(interface = %cfg.interface, port = cfg.listen_port, %public_key, mode = tunnel.mode().as_str(), "gateway interface up");
    // After the interface exists: without a writable /proc/sys, IPv4 forwarding is turned on
    // per interface, and only interfaces present now get it.
    let ipv6 = private.addresses.iter().any(|a| a.addr().is_ipv6());
    enable_forwarding(ipv6).await;
    let nat = install_rules(&cfg, &private.addresses)?;
    let mut gw = Gateway {
        cfg,
        vault,
        health: health.clone(),
        tunnel,
        running: PeerTable::new(),
        last_records: BTreeMap::new(),
        next_activation: None,
        key_version: private.version,
        key_due: None,
    };
    health.set(true, None);
    let mut next_reconcile = Instant::now();
    loop {
        let now_ts = Timestamp::now();
        let activation_due = gw.next_activation.is_some_and(|t| t <= now_ts);
        if Instant::now() >= next_reconcile || activation_due {
            let r = tokio::select! {
                r = gw.reconcile() => r,
                () = &mut shutdown => break,
            };
            match r {
                Ok(()) => health.set(true, Some(Ok(()))),
                Err(e) => {
                    gw.health.metrics.reconcile_errors.inc();
                    tracing::warn!(error = %e, "reconcile failed; keeping the current peer table");
                    health.set(true, Some(Err(format!("reconcile failed: {e}"))));
                }
            }
            next_reconcile = Instant::now()
                + crate::backoff::jittered(gw.cfg.poll_interval, rand::random::<f64>());
        }
        if !gw.tick() {
            break;
        }
        // Wake for the next second, or earlier for a key activation.
        let mut wait = Duration::from_secs(1);
        if let Some(t) = gw.next_activation {
            let until = Duration::try_from(Timestamp::now().duration_until(t)).unwrap_or_default();
            wait = wait.min(until);
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = &mut shutdown => break,
        }
    }
    tracing::info!("shutting down: removing NAT rules and the interface");
    health.set(false, None);
    if let Some(n) = nat {
        if let Err(e) = n.remove() {
            tracing::warn!(error = %e, "removing NAT rules failed");
        }
    }
    gw.tunnel.remove()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use jiff::{SignedDuration, Timestamp};

    use super::{apply_diff, desired_peers, diff, keep_last_known, IpNet, PeerTable};
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
            version: 1,
        }
    }

    fn table(pairs: &[(&str, &str)]) -> PeerTable {
        pairs
            .iter()
            .map(|(k, a)| ((*k).to_owned(), vec![a.parse().unwrap()]))
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
            "default: every destination"
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
