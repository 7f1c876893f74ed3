//! Prometheus metrics of the sidecar (and, later, the gateway).
//!
//! Owns: metric names, help texts and the registry; helpers to record peer statistics.
//! Must never: put key material or tokens in a label or value (peers are labelled by public key).

use std::{
    collections::HashMap,
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::SystemTime,
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    error::Result,
    tunnel::{Mode, PeerStats},
    vault::TokenCounters,
};

type Labels = Vec<(String, String)>;

/// All metrics, cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    peer_rx: Family<Labels, Counter>,
    peer_tx: Family<Labels, Counter>,
    handshake_age: Family<Labels, Gauge<f64, AtomicU64>>,
    last_seen: Arc<Mutex<HashMap<String, (u64, u64)>>>,
    /// Version of the private record whose key is in use.
    pub key_version: Gauge,
    /// Version of the gateway record whose peer set is in use.
    pub gateway_version: Gauge,
    /// Failed Vault logins.
    pub vault_login_failures: Counter,
    /// Failed Vault reads.
    pub vault_read_failures: Counter,
    /// Private keys applied in place after the first.
    pub key_rotations: Counter,
    /// Peer sets applied in place after the first.
    pub peer_updates: Counter,
    /// Endpoint switches.
    pub endpoint_failovers: Counter,
    /// 1 when `/ready` answers 200.
    pub ready: Gauge,
    /// The WireGuard interface's MTU (fixed, or chosen by `--mtu auto`); 0 before it exists.
    pub interface_mtu: Gauge,
    /// `/metrics` scrapes that served the last recorded peer statistics because reading the
    /// interface failed or took too long.
    pub metrics_refresh_failures: Counter,
    /// The Vault token's renewals, new logins and revocations (given to the Vault client).
    pub vault_token: TokenCounters,
    mode: Family<Labels, Gauge>,
    registration_failures: Family<Labels, Counter>,
    gateway_refused: Family<Labels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Counts one failed registration under `reason` (a short stable label).
    pub fn count_registration_failure(&self, reason: &str) {
        self.registration_failures
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }

    /// Creates and registers every metric.
    #[must_use]
    pub fn new() -> Self {
        let mut r = Registry::default();
        let vault_login_failures = Counter::default();
        let m = Self {
            registry: Arc::new(Registry::default()),
            peer_rx: Family::default(),
            peer_tx: Family::default(),
            handshake_age: Family::default(),
            last_seen: Arc::default(),
            key_version: Gauge::default(),
            gateway_version: Gauge::default(),
            vault_token: TokenCounters {
                login_failures: vault_login_failures.clone(),
                ..TokenCounters::default()
            },
            vault_login_failures,
            vault_read_failures: Counter::default(),
            key_rotations: Counter::default(),
            peer_updates: Counter::default(),
            endpoint_failovers: Counter::default(),
            ready: Gauge::default(),
            interface_mtu: Gauge::default(),
            metrics_refresh_failures: Counter::default(),
            mode: Family::default(),
            registration_failures: Family::default(),
            gateway_refused: Family::default(),
        };
        r.register(
            "wg_sidecar_gateway_refused",
            "1 while the gateway refuses this Pod, by the refusal's reason (its verdict in Vault, \
             read while there is no handshake; e.g. namespace_not_selected, \
             service_account_not_allowed)",
            m.gateway_refused.clone(),
        );
        r.register(
            "wg_sidecar_registration_failures",
            "Failed registrations with the gateway, by reason (pool_exhausted, vault_refused, write_failed, claim_conflict, invalid_record, vault_unavailable)",
            m.registration_failures.clone(),
        );
        r.register(
            "wg_sidecar_peer_receive_bytes",
            "Bytes received from the peer",
            m.peer_rx.clone(),
        );
        r.register(
            "wg_sidecar_peer_transmit_bytes",
            "Bytes sent to the peer",
            m.peer_tx.clone(),
        );
        r.register(
            "wg_sidecar_peer_last_handshake_age_seconds",
            "Seconds since the last handshake with the peer (-1: never)",
            m.handshake_age.clone(),
        );
        r.register(
            "wg_sidecar_key_version",
            "KV version of the private record in use",
            m.key_version.clone(),
        );
        r.register(
            "wg_sidecar_gateway_record_version",
            "KV version of the gateway record in use",
            m.gateway_version.clone(),
        );
        r.register(
            "wg_sidecar_key_rotations",
            "Private keys applied in place",
            m.key_rotations.clone(),
        );
        r.register(
            "wg_sidecar_peer_updates",
            "Peer sets applied in place",
            m.peer_updates.clone(),
        );
        r.register(
            "wg_sidecar_endpoint_failovers",
            "Switches to another gateway endpoint",
            m.endpoint_failovers.clone(),
        );
        r.register(
            "wg_sidecar_ready",
            "1 when the tunnel is ready",
            m.ready.clone(),
        );
        r.register(
            "wg_sidecar_interface_mtu_bytes",
            "MTU of the WireGuard interface (--mtu, or chosen by --mtu auto from the path to the \
             gateway endpoint)",
            m.interface_mtu.clone(),
        );
        m.register_vault_and_scrape_metrics(&mut r);
        r.register(
            "wg_sidecar_mode",
            "WireGuard implementation in use (label mode)",
            m.mode.clone(),
        );
        Self {
            registry: Arc::new(r),
            ..m
        }
    }

    /// Registers the Vault client's metrics and the scrape-time refresh's failures.
    fn register_vault_and_scrape_metrics(&self, r: &mut Registry) {
        let m = self;
        r.register(
            "wg_sidecar_vault_login_failures",
            "Failed Vault logins",
            m.vault_login_failures.clone(),
        );
        r.register(
            "wg_sidecar_vault_read_failures",
            "Failed Vault or key-folder reads",
            m.vault_read_failures.clone(),
        );
        r.register(
            "wg_sidecar_metrics_refresh_failures",
            "Scrapes of /metrics that served the last recorded peer statistics because reading \
             the interface failed or took longer than 1 s",
            m.metrics_refresh_failures.clone(),
        );
        m.vault_token.register(r, "wg_sidecar");
    }

    /// Records the gateway's refusal of this Pod: 1 for `reason` (`None`: not refused, the
    /// series goes).
    pub fn set_gateway_refused(&self, reason: Option<&str>) {
        self.gateway_refused.clear();
        if let Some(r) = reason {
            self.gateway_refused
                .get_or_create(&vec![("reason".to_owned(), r.to_owned())])
                .set(1);
        }
    }

    /// Records which implementation runs the interface.
    pub fn set_mode(&self, mode: Mode) {
        for m in [Mode::Kernel, Mode::Userspace] {
            self.mode
                .get_or_create(&vec![("mode".to_owned(), m.as_str().to_owned())])
                .set(i64::from(m == mode));
        }
    }

    /// Records per-peer statistics (byte counters advance by the delta since the last call).
    pub fn record_peers(&self, peers: &[PeerStats], now: SystemTime) {
        let mut last = self
            .last_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.record_locked(&mut last, peers, now);
    }

    /// Reads the interface's statistics with `read` and records them, as one step: the control
    /// loop's tick and a `/metrics` scrape both come this way, so a read that started earlier
    /// is never recorded after one that started later (which would look like a counter reset
    /// and count its bytes twice). Returns what was read.
    pub fn refresh_peers(
        &self,
        read: impl FnOnce() -> Result<Vec<PeerStats>>,
    ) -> Result<Vec<PeerStats>> {
        let mut last = self
            .last_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let peers = read()?;
        self.record_locked(&mut last, &peers, SystemTime::now());
        Ok(peers)
    }

    fn record_locked(
        &self,
        last: &mut HashMap<String, (u64, u64)>,
        peers: &[PeerStats],
        now: SystemTime,
    ) {
        for p in peers {
            let labels = vec![("public_key".to_owned(), p.public_key.clone())];
            let (prx, ptx) = last.get(&p.public_key).copied().unwrap_or((0, 0));
            // A counter reset in the interface (peer re-added) restarts from the new value.
            let drx = if p.rx_bytes >= prx {
                p.rx_bytes - prx
            } else {
                p.rx_bytes
            };
            let dtx = if p.tx_bytes >= ptx {
                p.tx_bytes - ptx
            } else {
                p.tx_bytes
            };
            self.peer_rx.get_or_create(&labels).inc_by(drx);
            self.peer_tx.get_or_create(&labels).inc_by(dtx);
            last.insert(p.public_key.clone(), (p.rx_bytes, p.tx_bytes));
            let age = p
                .last_handshake
                .and_then(|t| now.duration_since(t).ok())
                .map_or(-1.0, |d| d.as_secs_f64());
            self.handshake_age.get_or_create(&labels).set(age);
        }
    }

    /// The text exposition.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Current value of a plain gauge by reading it (for logs and tests).
    #[must_use]
    pub fn key_version_value(&self) -> i64 {
        self.key_version.get()
    }
}

/// Convenience for a `u64` version into a gauge.
pub fn set_version(g: &Gauge, v: u64) {
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::Metrics;
    use crate::tunnel::{Mode, PeerStats};

    #[test]
    fn a_refresh_records_what_it_read_and_a_failed_read_keeps_the_last_values() {
        let m = Metrics::new();
        let stats = |tx| {
            vec![PeerStats {
                public_key: "PUB".into(),
                endpoint: None,
                rx_bytes: 0,
                tx_bytes: tx,
                last_handshake: None,
            }]
        };
        assert_eq!(m.refresh_peers(|| Ok(stats(100))).ok(), Some(stats(100)));
        assert!(m
            .refresh_peers(|| Err(crate::error::SidecarError::InvalidConfig("gone".into())))
            .is_err());
        assert!(m.refresh_peers(|| Ok(stats(250))).is_ok());
        let text = m.encode();
        assert!(
            text.contains("wg_sidecar_peer_transmit_bytes_total{public_key=\"PUB\"} 250"),
            "{text}"
        );
        assert!(
            text.contains("wg_sidecar_metrics_refresh_failures_total 0")
                && text.contains("wg_sidecar_vault_token_renewals_total 0")
                && text.contains("wg_sidecar_vault_token_revocations_total 0"),
            "{text}"
        );
    }

    #[test]
    fn exposition_has_unit_suffixed_names_and_peer_labels() {
        let m = Metrics::new();
        m.set_mode(Mode::Userspace);
        let now = SystemTime::now();
        let p = |rx, tx| PeerStats {
            public_key: "PUB".into(),
            endpoint: None,
            rx_bytes: rx,
            tx_bytes: tx,
            last_handshake: Some(now - Duration::from_secs(5)),
        };
        m.record_peers(&[p(100, 50)], now);
        m.record_peers(&[p(150, 70)], now);
        m.vault_login_failures.inc();
        m.interface_mtu.set(1340);
        m.set_gateway_refused(Some("service_account_not_allowed"));
        m.set_gateway_refused(Some("namespace_not_selected"));
        let text = m.encode();
        assert!(
            text.contains("wg_sidecar_gateway_refused{reason=\"namespace_not_selected\"} 1")
                && !text.contains("service_account_not_allowed\"}"),
            "{text}"
        );
        m.set_gateway_refused(None);
        assert!(!m.encode().contains("wg_sidecar_gateway_refused{"));
        let text = m.encode();
        assert!(
            text.contains("wg_sidecar_peer_receive_bytes_total{public_key=\"PUB\"} 150"),
            "{text}"
        );
        assert!(
            text.contains("wg_sidecar_peer_transmit_bytes_total{public_key=\"PUB\"} 70"),
            "{text}"
        );
        assert!(
            text.contains("wg_sidecar_peer_last_handshake_age_seconds{public_key=\"PUB\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("wg_sidecar_mode{mode=\"userspace\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("wg_sidecar_vault_login_failures_total 1"),
            "{text}"
        );
        assert!(
            text.contains("wg_sidecar_interface_mtu_bytes 1340"),
            "{text}"
        );
    }
}
