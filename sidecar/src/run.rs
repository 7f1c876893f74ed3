//! `wg-sidecar run`: the control loop of the Pod's tunnel.
//!
//! Owns: the order of startup (health port → rules and kill switch → keys with retry → interface
//! with its fwmark → peer → routes), the 1 s tick (statistics, readiness, failover), the
//! jittered KV poll (rotation in place), the check for the gateway's verdict while there is no
//! handshake (2 s, doubling to 10 s; a refusal becomes `/ready`'s reason,
//! `wg_sidecar_gateway_refused` and one log line; no check once handshaken) and shutdown
//! (remove the interface, keep the rules and the kill switch) on SIGTERM or on
//! `POST /quitquitquit` alike. With `--mtu auto` it sizes the interface for the path to the
//! endpoint before creating it and again on every move to another endpoint (see `mtu`).
//! Must never: log key material, recreate the interface to apply a change, or exit non-zero on a
//! clean shutdown.

use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::time::sleep;

use crate::{
    backoff::{jittered, Backoff},
    cli::{KeySourceConfig, RunConfig},
    error::{Result, SidecarError},
    health::{
        self, readiness, verdict_check_delay, with_verdict, HealthState, Readiness, ShutdownRequest,
    },
    keysource::{
        FileKeySource, GatewayRecord, KeySource, PrivateRecord, RegisteredKeySource, VaultKeySource,
    },
    metrics::{set_version, Metrics},
    mtu::{self, Clamp, MtuSetting},
    registration::Verdict,
    rotation::{plan, session_silent, should_fail_over, Applied},
    routes::Routes,
    tunnel::{replace_peers, PeerSpec, Tunnel, WgTunnel},
    vault::Vault,
};

/// Tick while not ready: short, so `/ready` flips soon after the first handshake.
const FAST_TICK: Duration = Duration::from_millis(50);
/// Tick once ready.
const SLOW_TICK: Duration = Duration::from_secs(1);

/// Longer than BoringTun's 1 s look at the TUN device's MTU (see `Controller::fit_mtu`).
const USERSPACE_MTU_SETTLE: Duration = Duration::from_millis(1100);

fn unit() -> f64 {
    rand::random::<f64>()
}

/// Runs the sidecar until `shutdown` completes or `request` is raised (`POST /quitquitquit`);
/// then removes the interface and returns. Both end the same way; the caller may also wait on
/// `request` to give the cleanup the deadline it gives SIGTERM.
pub async fn run(
    cfg: RunConfig,
    request: ShutdownRequest,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let metrics = Metrics::new();
    let health = HealthState::new(metrics, request.clone());
    let shutdown = async move {
        tokio::select! {
            () = shutdown => {}
            () = request.raised() => {}
        }
    };
    let bound = health::serve(cfg.health_addr, health.clone())?;
    tracing::info!(addr = %bound, "health endpoints listening");
    match &cfg.key_source {
        KeySourceConfig::Vault {
            settings,
            kv_mount,
            key_path,
            gateway_path,
            registration,
        } => {
            // The token is renewed while the sidecar runs and revoked on the way out (issue 18).
            let (vault, renewal) =
                Vault::with_renewal(settings.clone(), health.metrics.vault_token.clone())?;
            let ran = match (registration, key_path) {
                (Some((pod, layout)), static_key) => {
                    let src = RegisteredKeySource::new(
                        vault,
                        layout.clone(),
                        pod.clone(),
                        gateway_path.clone(),
                        static_key.clone(),
                    )
                    .with_key_rotation(cfg.key_rotation_interval);
                    run_with(cfg, src, health, shutdown).await
                }
                (None, Some(key_path)) => {
                    let src = VaultKeySource::new(
                        vault,
                        kv_mount.clone(),
                        key_path.clone(),
                        gateway_path.clone(),
                    );
                    run_with(cfg, src, health, shutdown).await
                }
                (None, None) => Err(SidecarError::InvalidConfig(
                    "--key-source vault needs the Pod identity or --vault-key-path".into(),
                )),
            };
            renewal.finish().await;
            ran
        }
        KeySourceConfig::File { dir } => {
            let src = FileKeySource::new(dir.clone());
            run_with(cfg, src, health, shutdown).await
        }
    }
}

fn count_failure(m: &Metrics, e: &SidecarError, during_login: bool) {
    match e {
        SidecarError::VaultLogin { .. } => m.vault_login_failures.inc(),
        SidecarError::ReadFile { .. } if during_login => m.vault_login_failures.inc(),
        _ => m.vault_read_failures.inc(),
    };
}

async fn load_both<S: KeySource>(src: &S) -> Result<(PrivateRecord, GatewayRecord)> {
    let p = src.load_private().await?;
    let g = src.load_gateway().await?;
    Ok((p, g))
}

/// Logs in and loads both records, retrying with capped exponential backoff and jitter.
async fn load_with_retry<S: KeySource>(
    src: &S,
    health: &HealthState,
) -> (PrivateRecord, GatewayRecord) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut logged_in = false;
    loop {
        if !logged_in {
            match src.prepare().await {
                Ok(()) => logged_in = true,
                Err(e) => {
                    count_failure(&health.metrics, &e, true);
                    let delay = backoff.next_delay(unit());
                    tracing::warn!(source = %src.describe(), error = %e, retry_in_ms = delay.as_millis(), "key source login failed; not ready");
                    health.set_readiness(Readiness::NotReady(format!(
                        "key source login failed: {e}"
                    )));
                    sleep(delay).await;
                    continue;
                }
            }
        }
        match load_both(src).await {
            Ok(r) => return r,
            Err(e) => {
                count_failure(&health.metrics, &e, false);
                let delay = backoff.next_delay(unit());
                if src.registers() {
                    let reason = crate::registration::failure_reason(&e);
                    health.metrics.count_registration_failure(reason);
                    tracing::warn!(source = %src.describe(), reason, error = %e, retry_in_ms = delay.as_millis(), "registration with the gateway failed; not ready");
                    health.set_readiness(Readiness::NotReady(format!(
                        "registration failed ({reason}): {e}"
                    )));
                } else {
                    tracing::warn!(source = %src.describe(), error = %e, retry_in_ms = delay.as_millis(), "reading keys failed; not ready");
                    health.set_readiness(Readiness::NotReady(format!("reading keys failed: {e}")));
                }
                sleep(delay).await;
            }
        }
    }
}

/// `--mtu auto`: the interface MTU for the path to `endpoint` (see `mtu`), logged with its
/// inputs; [`mtu::FALLBACK`] and a warning when there is no endpoint or the path cannot be
/// measured.
async fn auto_mtu(routes: &Routes, endpoint: Option<SocketAddr>, carries_ipv6: bool) -> u32 {
    let Some(endpoint) = endpoint else {
        tracing::warn!(
            mtu = mtu::FALLBACK,
            "--mtu auto: no resolvable gateway endpoint to measure the path to; using the fallback MTU"
        );
        return mtu::FALLBACK;
    };
    let path = match routes.path_mtu(endpoint.ip()).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(mtu = mtu::FALLBACK, %endpoint, error = %e, "--mtu auto: the path MTU is unknown; using the fallback MTU");
            return mtu::FALLBACK;
        }
    };
    let fit = mtu::fit(path.mtu, endpoint.ip(), carries_ipv6);
    tracing::info!(
        mtu = fit.mtu,
        path_mtu = fit.path_mtu,
        %endpoint,
        overhead = fit.overhead,
        path_from = if path.from_route { "route" } else { "interface" },
        interface = %path.interface,
        "interface MTU chosen from the path to the gateway endpoint"
    );
    match fit.clamped {
        Some(Clamp::Floor) if carries_ipv6 => tracing::warn!(
            mtu = fit.mtu, path_mtu = fit.path_mtu, %endpoint,
            "the path to the gateway endpoint is too small for IPv6 in the tunnel (IPv6 needs 1280 plus WireGuard's overhead): outer packets will be fragmented, or lost where the path drops fragments"
        ),
        Some(Clamp::Floor) => tracing::warn!(
            mtu = fit.mtu, path_mtu = fit.path_mtu, %endpoint,
            "the path to the gateway endpoint is smaller than 576 plus WireGuard's overhead: outer packets will be fragmented, or lost where the path drops fragments"
        ),
        Some(Clamp::Ceiling) => {
            tracing::info!(
                mtu = fit.mtu,
                path_mtu = fit.path_mtu,
                "interface MTU capped at 9000"
            );
        }
        None => {}
    }
    fit.mtu
}

async fn resolve(endpoint: &str) -> Result<SocketAddr> {
    let mut addrs = tokio::net::lookup_host(endpoint)
        .await
        .map_err(|e| SidecarError::Resolve {
            endpoint: endpoint.to_owned(),
            reason: e.to_string(),
        })?;
    addrs.next().ok_or_else(|| SidecarError::Resolve {
        endpoint: endpoint.to_owned(),
        reason: "no address".to_owned(),
    })
}

struct Controller<S> {
    cfg: RunConfig,
    source: S,
    health: Arc<HealthState>,
    tunnel: WgTunnel,
    private: PrivateRecord,
    gateway: GatewayRecord,
    applied: Applied,
    endpoint_index: usize,
    switched_at: Instant,
    /// Gateway peer's (rx bytes, tx bytes) when rx last advanced, and when.
    rx_seen: (u64, u64, Instant),
    waiting_logged: u64,
    /// `not_before` of a held-back key: poll again then, so the switch lands within a tick of
    /// the gateway's (which switches exactly at that instant).
    key_due: Option<SystemTime>,
    /// The gateway's verdict while it refuses the Pod.
    verdict: Option<Verdict>,
    /// Verdict checks since the last handshake, and when the next is due (`None`: handshaken).
    verdict_checks: u32,
    next_verdict: Option<Instant>,
    /// A failed verdict read was logged (once until one succeeds).
    verdict_error_logged: bool,
    /// The Pod and its session with the gateway, for the connection events.
    events: crate::events::SidecarEvents,
    /// Netlink, for the path MTU of `--mtu auto`.
    routes: Routes,
    /// The endpoint the interface MTU was last chosen for (`--mtu auto`).
    mtu_endpoint: Option<SocketAddr>,
}

/// Whether the tunnel carries IPv6 (a route or an address of the family): `--mtu auto` then
/// keeps the interface at 1280 or more.
fn carries_ipv6(routes: &[ipnet::IpNet], addresses: &[ipnet::IpNet]) -> bool {
    routes
        .iter()
        .chain(addresses)
        .any(|n| matches!(n, ipnet::IpNet::V6(_)))
}

impl<S: KeySource> Controller<S> {
    fn endpoints(&self) -> &[String] {
        if self.cfg.endpoints.is_empty() {
            &self.gateway.endpoints
        } else {
            &self.cfg.endpoints
        }
    }

    async fn peer_spec(&self) -> PeerSpec {
        let endpoint = match self.endpoints().get(self.endpoint_index) {
            None => None,
            Some(ep) => match resolve(ep).await {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::warn!(error = %e, "endpoint not resolvable; will try the next one");
                    None
                }
            },
        };
        PeerSpec {
            public_key: self.gateway.public_key.clone(),
            preshared_key: self.private.preshared_key.clone(),
            endpoint,
            allowed_ips: self.cfg.routes.clone(),
            keepalive: self.cfg.keepalive,
        }
    }

    /// With `--mtu auto`, sizes the interface for the path to `endpoint` when it is not the one
    /// the MTU was chosen for (an unresolvable endpoint keeps the MTU as it is).
    async fn fit_mtu(&mut self, endpoint: Option<SocketAddr>) {
        if self.cfg.mtu != MtuSetting::Auto || endpoint.is_none() || endpoint == self.mtu_endpoint {
            return;
        }
        self.mtu_endpoint = endpoint;
        let v6 = carries_ipv6(&self.cfg.routes, &self.private.addresses);
        let mtu = auto_mtu(&self.routes, endpoint, v6).await;
        let before = self.tunnel.mtu();
        if mtu == before {
            return;
        }
        match self.tunnel.set_mtu(mtu) {
            Ok(()) => {
                tracing::info!(interface = %self.cfg.interface, from = before, to = mtu, "interface MTU changed for the new endpoint");
                self.health.metrics.interface_mtu.set(i64::from(mtu));
            }
            Err(e) => {
                tracing::warn!(error = %e, mtu = before, "setting the interface MTU failed; keeping the current one");
                return;
            }
        }
        // BoringTun reads the TUN device into a buffer of the MTU it last saw, and looks again
        // once a second: until then a packet above the old MTU would be cut short. The new peer
        // (whose configuration drops what was queued for the old one) waits for that look.
        if mtu > before && self.tunnel.mode() == crate::tunnel::Mode::Userspace {
            sleep(USERSPACE_MTU_SETTLE).await;
        }
    }

    async fn apply_peer(&mut self) -> Result<()> {
        let spec = self.peer_spec().await;
        self.fit_mtu(spec.endpoint).await;
        tracing::info!(peer = %spec.public_key, endpoint = %crate::logfmt::opt(spec.endpoint.as_ref()), "gateway peer configured");
        replace_peers(&mut self.tunnel, std::slice::from_ref(&spec))?;
        self.switched_at = Instant::now();
        self.rx_seen = (0, 0, Instant::now());
        self.kick_handshake();
        Ok(())
    }

    /// BoringTun starts a handshake only when a packet needs the tunnel (or after the first
    /// persistent-keepalive interval). One empty UDP datagram to the discard port of the first
    /// tunnelled network makes the handshake start now, so `/ready` follows within milliseconds.
    fn kick_handshake(&self) {
        let Some(net) = self.cfg.routes.first() else {
            return;
        };
        let dst = SocketAddr::new(crate::routes::probe_address(net), 9);
        let bind: SocketAddr = if dst.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sent = std::net::UdpSocket::bind(bind).and_then(|s| s.send_to(&[], dst));
        if let Err(e) = sent {
            tracing::debug!(error = %e, %dst, "handshake kick not sent");
        }
    }

    /// One tick: statistics, readiness, failover. Returns whether the sidecar is ready, or
    /// `None` when the userspace device has stopped.
    ///
    /// A userspace device that answers no UAPI request twice in a row has stopped (it no longer
    /// takes SIGTERM itself: `tunnel/userspace.rs` replaces its signalfd), so the sidecar shuts
    /// down rather than report a tunnel it no longer has.
    async fn tick(&mut self) -> Option<bool> {
        self.health.tick();
        let now = SystemTime::now();
        // Read and recorded as one step, in turn with `/metrics` scrapes (see `refresh_peers`).
        let stats = match self.health.metrics.refresh_peers(|| {
            self.tunnel
                .peer_stats()
                .or_else(|_| self.tunnel.peer_stats())
        }) {
            Ok(s) => s,
            Err(e) => {
                if self.tunnel.mode() == crate::tunnel::Mode::Userspace {
                    tracing::warn!(error = %e, "the userspace WireGuard device stopped answering; shutting down");
                    return None;
                }
                if self
                    .health
                    .set_readiness(Readiness::NotReady(e.to_string()))
                {
                    tracing::warn!(error = %e, "interface unreadable; not ready");
                }
                return Some(false);
            }
        };
        crate::events::emit_all(self.events.on_stats(&stats, &self.gateway.public_key, now));
        let gw_stats = stats
            .iter()
            .find(|p| p.public_key == self.gateway.public_key);
        let last_hs = gw_stats.and_then(|p| p.last_handshake);
        let mut sent_since_rx = false;
        if let Some(p) = gw_stats {
            if p.rx_bytes != self.rx_seen.0 {
                self.rx_seen = (p.rx_bytes, p.tx_bytes, Instant::now());
            }
            sent_since_rx = p.tx_bytes > self.rx_seen.1;
        }
        let r = with_verdict(readiness(true, last_hs, now), self.verdict.as_ref());
        let ready = r == Readiness::Ready;
        if ready {
            // Handshaken: the gateway admits the Pod, whatever an old verdict says.
            if self.verdict.take().is_some() {
                self.health.metrics.set_gateway_refused(None);
            }
            self.next_verdict = None;
            self.verdict_checks = 0;
        } else if self.next_verdict.is_none() {
            self.next_verdict = Some(Instant::now() + jittered(verdict_check_delay(0), unit()));
        }
        if self.health.set_readiness(r.clone()) {
            match &r {
                Readiness::Ready => tracing::info!("ready: handshake with the gateway"),
                Readiness::NotReady(why) => tracing::warn!(reason = %why, "not ready"),
            }
        }
        let stale = should_fail_over(
            last_hs,
            self.switched_at.elapsed(),
            self.cfg.failover_after,
            now,
        );
        if stale
            || session_silent(
                // Only a gateway that advertises keepalives is expected never to be silent.
                last_hs.is_some() && self.gateway.keepalive.is_some(),
                sent_since_rx,
                self.rx_seen.2.elapsed(),
                self.switched_at.elapsed(),
                self.cfg.failover_after,
            )
        {
            let previous = self.endpoints().get(self.endpoint_index).cloned();
            let n = self.endpoints().len().max(1);
            self.endpoint_index = (self.endpoint_index + 1) % n;
            self.health.metrics.endpoint_failovers.inc();
            let why = crate::events::failover_reason(stale, last_hs.is_some());
            crate::events::emit(&self.events.failover(
                previous.as_ref(),
                self.endpoints().get(self.endpoint_index),
                why,
            ));
            tracing::warn!(
                endpoint = %crate::logfmt::opt(self.endpoints().get(self.endpoint_index)),
                "no handshake within --failover-after; switching endpoint (re-resolving)"
            );
            if let Err(e) = self.apply_peer().await {
                tracing::error!(error = %e, "failed to apply the next endpoint");
            }
        }
        Some(ready)
    }

    /// Takes a check for the gateway's verdict and schedules the next.
    fn take_verdict(&mut self, read: Result<Option<Verdict>>) {
        match read {
            Ok(Some(v)) => {
                self.verdict_error_logged = false;
                if !self.verdict.as_ref().is_some_and(|old| old.same_as(&v)) {
                    tracing::warn!(
                        gateway = %v.gateway, reason = %v.reason, detail = %v.message,
                        "refused by the gateway: no peer for this Pod until that changes"
                    );
                    self.health.metrics.set_gateway_refused(Some(&v.reason));
                    crate::events::emit(&self.events.refused(&v.reason, &v.message));
                    self.verdict = Some(v);
                }
            }
            Ok(None) => {
                self.verdict_error_logged = false;
                if self.verdict.take().is_some() {
                    tracing::info!("the gateway's verdict is gone: waiting for the handshake");
                    self.health.metrics.set_gateway_refused(None);
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut self.verdict_error_logged, true) {
                    tracing::warn!(error = %e, "cannot read the gateway's verdict on this Pod; /ready cannot say whether the gateway refuses it (the wg-pod policy needs read on its verdicts path: re-run `wg-sidecar vault bootstrap`)");
                }
            }
        }
        self.verdict_checks = self.verdict_checks.saturating_add(1);
        self.next_verdict =
            Some(Instant::now() + jittered(verdict_check_delay(self.verdict_checks), unit()));
    }

    /// One KV poll: apply a new private key and/or peer set in place.
    async fn poll(&mut self, polled: Result<(PrivateRecord, GatewayRecord)>) {
        let (private, gateway) = match polled {
            Ok(r) => r,
            Err(e) => {
                count_failure(&self.health.metrics, &e, false);
                tracing::warn!(error = %e, "polling keys failed; keeping the current configuration");
                return;
            }
        };
        let now = SystemTime::now();
        let p = plan(
            self.applied,
            private.version,
            private.not_before.map(SystemTime::from),
            gateway.version,
            now,
        );
        self.key_due = if p.key_waiting {
            private.not_before.map(SystemTime::from)
        } else {
            None
        };
        if p.key_waiting && self.waiting_logged != private.version {
            self.waiting_logged = private.version;
            tracing::info!(version = private.version, not_before = %crate::logfmt::opt(private.not_before.as_ref()), "new private key waits for its not_before");
        }
        if p.apply_key {
            if private.addresses != self.private.addresses {
                tracing::warn!("the address in the private record changed; the new address takes effect only after a restart");
            }
            match self.tunnel.set_private_key(&private.private_key) {
                Ok(()) => {
                    tracing::info!(version = private.version, public_key = %private.public_key().unwrap_or_default(), "private key rotated in place");
                    if let Ok(k) = private.public_key() {
                        crate::events::emit(&self.events.key_rotated(&k, private.version));
                    }
                    self.applied.key_version = private.version;
                    set_version(&self.health.metrics.key_version, private.version);
                    self.health.metrics.key_rotations.inc();
                    self.private = private;
                }
                Err(e) => {
                    tracing::error!(error = %e, "applying the new private key failed");
                    return;
                }
            }
        }
        if p.apply_peers {
            let endpoints_changed = gateway.endpoints != self.gateway.endpoints;
            self.gateway = gateway;
            if endpoints_changed && self.cfg.endpoints.is_empty() {
                self.endpoint_index = 0;
            }
            match self.apply_peer().await {
                Ok(()) => {
                    self.applied.gateway_version = self.gateway.version;
                    set_version(&self.health.metrics.gateway_version, self.gateway.version);
                    self.health.metrics.peer_updates.inc();
                    tracing::info!(
                        version = self.gateway.version,
                        "gateway peer set applied in place"
                    );
                }
                Err(e) => tracing::error!(error = %e, "applying the new peer set failed"),
            }
        }
    }
}

/// The MTU to create the interface with, and the endpoint `--mtu auto` chose it for: sized for
/// the first endpoint before the interface exists, so the device never starts at a size the path
/// cannot carry (`Controller::fit_mtu` follows later moves).
async fn initial_mtu(
    cfg: &RunConfig,
    routes: &Routes,
    private: &PrivateRecord,
    gateway: &GatewayRecord,
) -> (u32, Option<SocketAddr>) {
    match cfg.mtu {
        MtuSetting::Fixed(n) => (n, None),
        MtuSetting::Auto => {
            let endpoints = if cfg.endpoints.is_empty() {
                &gateway.endpoints
            } else {
                &cfg.endpoints
            };
            let endpoint = match endpoints.first() {
                Some(ep) => resolve(ep).await.ok(),
                None => None,
            };
            let v6 = carries_ipv6(&cfg.routes, &private.addresses);
            (auto_mtu(routes, endpoint, v6).await, endpoint)
        }
    }
}

/// Creates the interface (its MTU from [`initial_mtu`]) and records its mode and MTU.
async fn create_tunnel(
    cfg: &RunConfig,
    routes: &Routes,
    private: &PrivateRecord,
    gateway: &GatewayRecord,
    health: &HealthState,
) -> Result<(WgTunnel, Option<SocketAddr>)> {
    let (mtu, mtu_endpoint) = initial_mtu(cfg, routes, private, gateway).await;
    let tunnel = WgTunnel::create(
        &cfg.interface,
        mtu,
        &private.addresses,
        &private.private_key,
        crate::routes::FWMARK,
    )?;
    health.metrics.set_mode(tunnel.mode());
    health.metrics.interface_mtu.set(i64::from(tunnel.mtu()));
    Ok((tunnel, mtu_endpoint))
}

async fn run_with<S: KeySource>(
    cfg: RunConfig,
    source: S,
    health: Arc<HealthState>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    tokio::pin!(shutdown);
    let routes = Routes::connect()?;
    routes.install_rules(&cfg.routes, &cfg.exclude).await?;
    if cfg.kill_switch {
        routes.install_kill_switch(&cfg.routes).await?;
    } else {
        routes.remove_kill_switch(&cfg.routes).await?;
    }
    let (private, gateway) = tokio::select! {
        r = load_with_retry(&source, &health) => r,
        () = &mut shutdown => {
            tracing::info!("shutdown before keys were loaded");
            return Ok(());
        }
    };
    tracing::info!(source = %source.describe(), key_version = private.version, gateway_version = gateway.version, "keys loaded");
    let (tunnel, mtu_endpoint) = create_tunnel(&cfg, &routes, &private, &gateway, &health).await?;
    // `/metrics` reads the byte counters at scrape time, not as of the last tick (issue 18).
    let (reader, metrics) = (tunnel.stats_reader(), health.metrics.clone());
    health.set_metrics_refresh(move || metrics.refresh_peers(|| reader.peer_stats()).map(drop));
    set_version(&health.metrics.key_version, private.version);
    set_version(&health.metrics.gateway_version, gateway.version);
    let mut ctl = Controller {
        events: crate::events::SidecarEvents::new(&cfg, private.public_key().ok().as_deref()),
        applied: Applied {
            key_version: private.version,
            gateway_version: gateway.version,
        },
        cfg,
        source,
        health: health.clone(),
        tunnel,
        private,
        gateway,
        endpoint_index: 0,
        switched_at: Instant::now(),
        rx_seen: (0, 0, Instant::now()),
        waiting_logged: 0,
        key_due: None,
        verdict: None,
        verdict_checks: 0,
        next_verdict: None,
        verdict_error_logged: false,
        routes: routes.clone(),
        mtu_endpoint,
    };
    if ctl.endpoints().is_empty() {
        tracing::warn!(
            "no gateway endpoint configured (flag or record); waiting for the gateway to connect"
        );
    }
    routes
        .add_tunnel_routes(&ctl.cfg.interface, &ctl.cfg.routes)
        .await?;
    ctl.apply_peer().await?;
    tracing::info!(interface = %ctl.cfg.interface, mode = ctl.tunnel.mode().as_str(), routes = %crate::logfmt::list(&ctl.cfg.routes), "tunnel up");

    let mut next_poll = Instant::now() + jittered(ctl.cfg.poll_interval, unit());
    let mut ready = false;
    loop {
        let tick = if ready { SLOW_TICK } else { FAST_TICK };
        // A due key switch or rotation step lands on time, not on the next tick.
        let tick = tick.min(next_poll.saturating_duration_since(Instant::now()));
        tokio::select! {
            () = &mut shutdown => break,
            () = sleep(tick) => {
                match ctl.tick().await {
                    Some(r) => ready = r,
                    None => break,
                }
                if !ready && ctl.next_verdict.is_some_and(|t| Instant::now() >= t) {
                    let read = tokio::select! {
                        r = ctl.source.load_verdict() => r,
                        () = &mut shutdown => break,
                    };
                    ctl.take_verdict(read);
                }
                if Instant::now() >= next_poll {
                    let polled = tokio::select! {
                        r = load_both(&ctl.source) => r,
                        () = &mut shutdown => break,
                    };
                    ctl.poll(polled).await;
                    next_poll = Instant::now() + jittered(ctl.cfg.poll_interval, unit());
                    let due = ctl.key_due.into_iter().chain(ctl.source.next_change()).min();
                    if let Some(due) = due.and_then(|t| t.duration_since(SystemTime::now()).ok()) {
                        next_poll = next_poll.min(Instant::now() + due);
                    }
                }
            }
        }
    }
    tracing::info!(interface = %ctl.cfg.interface, "shutting down: removing the interface (kill switch stays)");
    health.set_readiness(Readiness::NotReady("shutting down".into()));
    ctl.tunnel.remove()
}
