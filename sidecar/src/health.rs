//! `/healthz`, `/ready`, `/metrics` and `POST /quitquitquit` on one port, and the pure readiness
//! rule (with the gateway's verdict, when it refuses the Pod, as the reason).
//!
//! Owns: the HTTP router over a shared [`HealthState`], the rule "ready = interface up and a
//! handshake with the gateway younger than 180 s", and the [`ShutdownRequest`] that
//! `/quitquitquit` raises (so a Job's app container can stop a classic-mode sidecar, like
//! Istio's pilot-agent endpoint of the same name).
//! Must never: do WireGuard or Vault IO itself; it reports what the control loop recorded, plus
//! what the [`MetricsRefresh`] hook the loop registered reads at scrape time (the peers' byte
//! counters, bounded by [`REFRESH_TIMEOUT`]); a shutdown request only raises a flag that `run`
//! and `main` treat like SIGTERM.
//!
//! Also owns [`listen`], how the health port is bound for the sidecar and the gateway alike: the
//! default `[::]` is one socket for IPv6 and IPv4 (`IPV6_V6ONLY` off on the socket itself), with
//! `0.0.0.0` as the fallback on a host without IPv6.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    extract::{connect_info::ConnectInfo, rejection::ExtensionRejection, State},
    http::StatusCode,
    response::IntoResponse,
    routing::{get, post},
    Router,
};
use tokio::sync::watch;

use crate::{
    error::{Result, SidecarError},
    metrics::Metrics,
};

/// The health address of the sidecar and the gateway unless `--health-addr` says otherwise: every
/// address of both families (see [`listen`]).
pub const DEFAULT_ADDR: &str = "[::]:9901";

/// A handshake older than this means the session is gone (WireGuard's reject-after-time).
pub const HANDSHAKE_FRESH: Duration = Duration::from_secs(180);
/// `/healthz` fails when the control loop has not ticked for this long.
pub const LOOP_STALL: Duration = Duration::from_secs(30);

/// Whether the sidecar is ready, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Serving traffic.
    Ready,
    /// Not serving, with a reason for the log and `/ready`'s body.
    NotReady(String),
}

/// The readiness rule: interface up and a handshake with the gateway younger than 180 s.
#[must_use]
pub fn readiness(
    interface_up: bool,
    last_handshake: Option<SystemTime>,
    now: SystemTime,
) -> Readiness {
    if !interface_up {
        return Readiness::NotReady("interface not up".into());
    }
    match last_handshake {
        None => Readiness::NotReady("no handshake with the gateway yet".into()),
        Some(t) => match now.duration_since(t) {
            Ok(age) if age >= HANDSHAKE_FRESH => Readiness::NotReady(format!(
                "last handshake with the gateway {}s ago",
                age.as_secs()
            )),
            _ => Readiness::Ready,
        },
    }
}

/// The first check for the gateway's verdict comes this long after the tunnel is up (or the
/// handshake is lost); the delay doubles up to [`VERDICT_CHECK_MAX`].
pub const VERDICT_CHECK_FIRST: Duration = Duration::from_secs(2);
/// The longest delay between two checks for the gateway's verdict.
pub const VERDICT_CHECK_MAX: Duration = Duration::from_secs(10);

/// The delay before check number `checks` (0: the first) for the gateway's verdict while there
/// is no handshake: 2, 4, 8, then every 10 s.
#[must_use]
pub fn verdict_check_delay(checks: u32) -> Duration {
    VERDICT_CHECK_FIRST
        .saturating_mul(1u32.checked_shl(checks.min(8)).unwrap_or(u32::MAX))
        .min(VERDICT_CHECK_MAX)
}

/// Readiness `r` with the gateway's refusal as the reason while the Pod is not ready: the
/// handshake is missing *because* the gateway refuses the Pod, and that is what to act on.
#[must_use]
pub fn with_verdict(r: Readiness, verdict: Option<&crate::registration::Verdict>) -> Readiness {
    match (r, verdict) {
        (Readiness::NotReady(_), Some(v)) => Readiness::NotReady(v.ready_reason()),
        (r, _) => r,
    }
}

/// Reads current statistics into the metrics just before `/metrics` encodes them (the control
/// loop records them once a second; a scrape should not see them up to a second late).
pub type MetricsRefresh = Arc<dyn Fn() -> Result<()> + Send + Sync>;

/// Longest a scrape waits for the [`MetricsRefresh`] hook before it serves the last recorded
/// values (a stuck device must not hang a scrape).
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(1);

/// The scrape-time refresh of `/metrics`, shared by the sidecar's and the gateway's health
/// servers: at most one read of the interface at a time (a scrape that finds one running waits
/// for it, within [`REFRESH_TIMEOUT`]), and a read that failed or timed out is counted and
/// leaves the last values.
pub struct ScrapeRefresh {
    hook: Mutex<Option<MetricsRefresh>>,
    /// Held by the blocking read itself, so a read that outlives its scrape still blocks the
    /// next one: a stuck device costs one thread, not one per scrape.
    running: Arc<tokio::sync::Mutex<()>>,
    failures: prometheus_client::metrics::counter::Counter,
}

impl std::fmt::Debug for ScrapeRefresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScrapeRefresh")
    }
}

impl ScrapeRefresh {
    /// No hook yet; failures are counted in `failures`.
    #[must_use]
    pub fn new(failures: prometheus_client::metrics::counter::Counter) -> Self {
        Self {
            hook: Mutex::new(None),
            running: Arc::default(),
            failures,
        }
    }

    /// Registers the hook (replacing an earlier one).
    pub fn set(&self, hook: MetricsRefresh) {
        *self
            .hook
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(hook);
    }

    /// Runs the hook (if any) within `timeout`; returns false when it failed or timed out.
    pub async fn refresh(&self, timeout: Duration) -> bool {
        let Some(hook) = self
            .hook
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
        else {
            return true;
        };
        let running = self.running.clone();
        let read = async move {
            let turn = running.lock_owned().await;
            tokio::task::spawn_blocking(move || {
                let _turn = turn;
                hook()
            })
            .await
        };
        let why = match tokio::time::timeout(timeout, read).await {
            Ok(Ok(Ok(()))) => return true,
            Ok(Ok(Err(e))) => e.to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} ms", timeout.as_millis()),
        };
        self.failures.inc();
        tracing::debug!(reason = %why, "scrape-time refresh of the peer statistics failed; serving the last values");
        false
    }
}

/// A sticky "shut down now" flag: raised by `POST /quitquitquit`, awaited like SIGTERM.
/// Clones share the flag.
#[derive(Debug, Clone)]
pub struct ShutdownRequest(Arc<watch::Sender<bool>>);

impl Default for ShutdownRequest {
    fn default() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }
}

impl ShutdownRequest {
    /// A flag not raised yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises the flag; returns true the first time.
    #[must_use = "whether this call raised the flag (false: it already was)"]
    pub fn raise(&self) -> bool {
        !self.0.send_replace(true)
    }

    /// Whether the flag is raised.
    #[must_use]
    pub fn is_raised(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes once the flag is raised (at once if it already is).
    pub async fn raised(&self) {
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = self.0.subscribe().wait_for(|raised| *raised).await;
    }
}

/// What the control loop shares with the HTTP handlers.
#[derive(Debug)]
pub struct HealthState {
    last_tick: Mutex<Instant>,
    readiness: Mutex<Readiness>,
    /// The metrics served on `/metrics`.
    pub metrics: Metrics,
    /// Raised by `POST /quitquitquit`.
    pub shutdown: ShutdownRequest,
    refresh: ScrapeRefresh,
}

impl HealthState {
    /// Fresh state: alive, not ready; `POST /quitquitquit` raises `shutdown`.
    #[must_use]
    pub fn new(metrics: Metrics, shutdown: ShutdownRequest) -> Arc<Self> {
        Arc::new(Self {
            last_tick: Mutex::new(Instant::now()),
            readiness: Mutex::new(Readiness::NotReady("starting".into())),
            refresh: ScrapeRefresh::new(metrics.metrics_refresh_failures.clone()),
            metrics,
            shutdown,
        })
    }

    /// Registers what `/metrics` runs before it encodes (the tunnel's current statistics).
    pub fn set_metrics_refresh(&self, hook: impl Fn() -> Result<()> + Send + Sync + 'static) {
        self.refresh.set(Arc::new(hook));
    }

    /// The control loop is alive.
    pub fn tick(&self) {
        *self
            .last_tick
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
    }

    /// Records readiness; returns true when it changed.
    pub fn set_readiness(&self, r: Readiness) -> bool {
        self.metrics.ready.set(i64::from(r == Readiness::Ready));
        let mut cur = self
            .readiness
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = *cur != r;
        *cur = r;
        changed
    }

    /// Current readiness.
    #[must_use]
    pub fn readiness(&self) -> Readiness {
        self.readiness
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn alive(&self) -> bool {
        self.last_tick
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .elapsed()
            < LOOP_STALL
    }
}

async fn healthz(State(s): State<Arc<HealthState>>) -> impl IntoResponse {
    if s.alive() {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "control loop stalled\n".to_owned(),
        )
    }
}

async fn ready(State(s): State<Arc<HealthState>>) -> impl IntoResponse {
    match s.readiness() {
        Readiness::Ready => (StatusCode::OK, "ready\n".to_owned()),
        Readiness::NotReady(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(State(s): State<Arc<HealthState>>) -> impl IntoResponse {
    s.refresh.refresh(REFRESH_TIMEOUT).await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// `POST /quitquitquit`: stop the sidecar as on SIGTERM, so a run-once Pod (a Job's) can
/// complete in classic mode, where the sidecar is an ordinary container. Only a peer on the
/// loopback (the Pod's own containers) may ask, as with Istio's endpoint of the same name: the
/// health port listens on every address, and anyone else in the cluster could otherwise take
/// the Pod's tunnel down. Other methods get 405 with `Allow: POST` (from the method router).
async fn quitquitquit(
    State(s): State<Arc<HealthState>>,
    peer: Result<ConnectInfo<SocketAddr>, ExtensionRejection>,
) -> impl IntoResponse {
    let peer = peer.ok().map(|ConnectInfo(addr)| addr);
    match peer {
        Some(peer) if from_own_container(peer.ip()) => {
            if s.shutdown.raise() {
                tracing::info!(%peer, "shutdown requested over /quitquitquit");
            }
            (StatusCode::OK, "shutting down\n")
        }
        _ => {
            tracing::warn!(peer = %crate::logfmt::opt(peer), "refused /quitquitquit from outside the Pod's loopback");
            (
                StatusCode::FORBIDDEN,
                "only the Pod's own containers (over localhost) may stop the sidecar\n",
            )
        }
    }
}

/// Whether a `/quitquitquit` caller is one of the Pod's own containers: exactly `127.0.0.1` or
/// `::1` (v4-mapped too), not all of `127.0.0.0/8`. A service mesh's inbound proxy hands
/// connections from other Pods to the app with a loopback source of its own (Istio's
/// `127.0.0.6`), so the rest of the range may be a stranger (docs/service-mesh.md).
fn from_own_container(ip: std::net::IpAddr) -> bool {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => v4 == std::net::Ipv4Addr::LOCALHOST,
        std::net::IpAddr::V6(v6) => v6 == std::net::Ipv6Addr::LOCALHOST,
    }
}

/// The health router of `wg-sidecar run` (the gateway has its own, without `/quitquitquit`).
/// `/quitquitquit` needs the peer address: serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()` (as [`serve`] does).
pub fn router(state: Arc<HealthState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/quitquitquit", post(quitquitquit))
        .with_state(state)
}

/// `EAFNOSUPPORT`: the kernel has no IPv6 (booted with `ipv6.disable=1`, or built without it).
const EAFNOSUPPORT: i32 = 97;

/// Whether a failure to bind `[::]` means "this host has no IPv6" (so `0.0.0.0` is worth a try)
/// rather than a real problem with the address, such as the port being taken.
fn no_ipv6(e: &io::Error) -> bool {
    e.raw_os_error() == Some(EAFNOSUPPORT) || e.kind() == io::ErrorKind::AddrNotAvailable
}

/// A listening TCP socket on `addr`, for the health port. An IPv6 socket gets `IPV6_V6ONLY` off,
/// set on the socket rather than inherited from `net.ipv6.bindv6only`, so `[::]` takes IPv4
/// clients too (as v4-mapped peers, `::ffff:a.b.c.d`). `SO_REUSEADDR` as std and tokio set it, so
/// a restart does not wait for the old connections' `TIME_WAIT`.
fn bind_socket(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Binds the health port of the sidecar and of the gateway (one way for both). `[::]:port` (the
/// default, [`DEFAULT_ADDR`]) is one socket for both families whatever `net.ipv6.bindv6only`
/// says; on a host without IPv6 (EAFNOSUPPORT or EADDRNOTAVAIL) it becomes `0.0.0.0:port`, with a
/// warning. Any other address (an explicit `--health-addr`) is bound as given. Call it on a tokio
/// runtime.
pub fn listen(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    listen_with(addr, bind_socket)
}

/// [`listen`] with the socket call as a parameter, so the fallback is tested without a host that
/// lacks IPv6.
fn listen_with(
    addr: SocketAddr,
    bind: impl Fn(SocketAddr) -> io::Result<std::net::TcpListener>,
) -> Result<tokio::net::TcpListener> {
    let to_tokio = |at: SocketAddr, bound: io::Result<std::net::TcpListener>| {
        bound
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| SidecarError::Health {
                addr: at.to_string(),
                source,
            })
    };
    if addr.ip() != IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        return to_tokio(addr, bind(addr));
    }
    match bind(addr) {
        Ok(l) => {
            tracing::info!(%addr, families = "ipv6,ipv4", "health port bound on both families (IPV6_V6ONLY off)");
            to_tokio(addr, Ok(l))
        }
        Err(e) if no_ipv6(&e) => {
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
            tracing::warn!(%addr, error = %e, fallback = %v4, families = "ipv4", "no IPv6 on this host: health port bound on IPv4 only");
            to_tokio(v4, bind(v4))
        }
        Err(e) => to_tokio(addr, Err(e)),
    }
}

/// Binds `addr` with [`listen`] now (so a bad port fails startup) and serves in a background task
/// on the current tokio runtime.
pub fn serve(addr: SocketAddr, state: Arc<HealthState>) -> Result<SocketAddr> {
    let listener = listen(addr)?;
    let local = listener
        .local_addr()
        .map_err(|source| SidecarError::Health {
            addr: addr.to_string(),
            source,
        })?;
    tokio::spawn(async move {
        let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "health server stopped");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::{
        net::SocketAddr,
        time::{Duration, SystemTime},
    };

    use axum::{
        body::{to_bytes, Body},
        extract::connect_info::MockConnectInfo,
        http::{header::ALLOW, Request},
    };
    use tower::ServiceExt;

    use super::{
        listen, listen_with, readiness, router, verdict_check_delay, with_verdict, HealthState,
        Readiness, ShutdownRequest, DEFAULT_ADDR,
    };
    use crate::metrics::Metrics;

    fn state() -> std::sync::Arc<HealthState> {
        HealthState::new(Metrics::new(), ShutdownRequest::new())
    }

    /// The router as `serve` runs it for a request from `peer`.
    fn from(peer: &str, s: &std::sync::Arc<HealthState>) -> axum::Router {
        let peer: SocketAddr = peer.parse().unwrap();
        router(s.clone()).layer(MockConnectInfo(peer))
    }

    fn post(path: &str) -> Request<Body> {
        Request::post(path).body(Body::empty()).unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_stuck_refresh_gives_up_within_its_timeout_counts_a_failure_and_runs_one_at_a_time() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let failures = prometheus_client::metrics::counter::Counter::default();
        let r = super::ScrapeRefresh::new(failures.clone());
        // No hook yet: nothing to do, nothing counted.
        assert!(r.refresh(Duration::from_millis(100)).await);
        let (calls, release) = (
            std::sync::Arc::new(AtomicU32::new(0)),
            std::sync::Arc::new(std::sync::Barrier::new(2)),
        );
        let (c, b) = (calls.clone(), release.clone());
        r.set(std::sync::Arc::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
            b.wait();
            Ok(())
        }));
        let started = std::time::Instant::now();
        assert!(!r.refresh(Duration::from_millis(100)).await);
        assert!(!r.refresh(Duration::from_millis(100)).await);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(failures.get(), 2);
        // The second scrape did not start a second read while the first was stuck.
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        release.wait();
        r.set(std::sync::Arc::new(|| {
            Err(crate::error::SidecarError::InvalidConfig(
                "device gone".into(),
            ))
        }));
        assert!(!r.refresh(Duration::from_secs(1)).await);
        assert_eq!(failures.get(), 3);
        r.set(std::sync::Arc::new(|| Ok(())));
        assert!(r.refresh(Duration::from_secs(1)).await);
        assert_eq!(failures.get(), 3);
    }

    #[test]
    fn ready_needs_the_interface_and_a_handshake_younger_than_180_seconds() {
        let now = SystemTime::now();
        assert!(matches!(
            readiness(false, Some(now), now),
            Readiness::NotReady(_)
        ));
        assert!(matches!(readiness(true, None, now), Readiness::NotReady(_)));
        assert_eq!(
            readiness(true, Some(now - Duration::from_secs(179)), now),
            Readiness::Ready
        );
        assert!(matches!(
            readiness(true, Some(now - Duration::from_secs(180)), now),
            Readiness::NotReady(_)
        ));
    }

    #[test]
    fn a_refused_pod_is_not_ready_with_the_gateways_reason_and_checks_back_off_to_ten_seconds() {
        let v = crate::registration::Verdict {
            reason: "namespace_not_selected".into(),
            message:
                "namespace shop does not match the gateway's access.namespaceSelector vpn=allowed"
                    .into(),
            gateway: "corp".into(),
            time: "2030-01-01T00:00:00Z".parse().unwrap(),
            pod: crate::registration::PodIdentity::new("shop", "web", "web-0", "0001").unwrap(),
        };
        let now = SystemTime::now();
        assert_eq!(
            with_verdict(readiness(true, None, now), Some(&v)),
            Readiness::NotReady(
                "refused by gateway corp: namespace shop does not match the gateway's access.namespaceSelector vpn=allowed".into()
            )
        );
        // A handshake wins over a stale verdict; no verdict keeps the plain reason.
        assert_eq!(
            with_verdict(readiness(true, Some(now), now), Some(&v)),
            Readiness::Ready
        );
        assert_eq!(
            with_verdict(readiness(true, None, now), None),
            readiness(true, None, now)
        );
        let secs: Vec<u64> = (0..6).map(|n| verdict_check_delay(n).as_secs()).collect();
        assert_eq!(secs, [2, 4, 8, 10, 10, 10]);
        assert_eq!(verdict_check_delay(u32::MAX).as_secs(), 10);
    }

    #[tokio::test]
    async fn ready_endpoint_goes_from_503_to_200() {
        let s = state();
        let get = |p: &'static str| Request::get(p).body(Body::empty()).unwrap();
        let r = router(s.clone()).oneshot(get("/ready")).await.unwrap();
        assert_eq!(r.status(), 503);
        s.set_readiness(Readiness::Ready);
        let r = router(s.clone()).oneshot(get("/ready")).await.unwrap();
        assert_eq!(r.status(), 200);
        let r = router(s.clone()).oneshot(get("/healthz")).await.unwrap();
        assert_eq!(r.status(), 200);
        let r = router(s).oneshot(get("/metrics")).await.unwrap();
        assert_eq!(r.status(), 200);
    }

    #[tokio::test]
    async fn a_post_to_quitquitquit_from_localhost_answers_200_and_raises_the_shutdown_request() {
        let s = state();
        assert!(!s.shutdown.is_raised());
        let r = from("127.0.0.1:40000", &s)
            .oneshot(post("/quitquitquit"))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body = to_bytes(r.into_body(), 1024).await.unwrap();
        assert_eq!(&body[..], b"shutting down\n");
        assert!(s.shutdown.is_raised());
        // What `run` and `main` wait on completes at once now.
        tokio::time::timeout(Duration::from_secs(1), s.shutdown.raised())
            .await
            .unwrap();
        // Asking again is harmless.
        let r = from("[::1]:40000", &s)
            .oneshot(post("/quitquitquit"))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    #[tokio::test]
    async fn quitquitquit_accepts_ipv6_and_ipv4_mapped_loopback_peers() {
        for peer in ["[::1]:40000", "[::ffff:127.0.0.1]:40000"] {
            let s = state();
            let r = from(peer, &s).oneshot(post("/quitquitquit")).await.unwrap();
            assert_eq!(r.status(), 200, "{peer}");
            assert!(s.shutdown.is_raised(), "{peer}");
        }
    }

    #[tokio::test]
    async fn other_methods_on_quitquitquit_get_405_with_allow_post_and_do_not_stop_the_sidecar() {
        let s = state();
        for method in ["GET", "PUT", "DELETE", "HEAD"] {
            let req = Request::builder()
                .method(method)
                .uri("/quitquitquit")
                .body(Body::empty())
                .unwrap();
            let r = from("127.0.0.1:40000", &s).oneshot(req).await.unwrap();
            assert_eq!(r.status(), 405, "{method}");
            assert_eq!(r.headers().get(ALLOW).unwrap(), "POST", "{method}");
        }
        assert!(!s.shutdown.is_raised());
    }

    #[tokio::test]
    async fn quitquitquit_from_outside_the_pods_loopback_is_refused_with_403() {
        let s = state();
        for peer in [
            "10.244.1.7:40000",
            "[fd00::7]:40000",
            "[::ffff:10.0.0.1]:40000",
            // A mesh's inbound proxy passing another Pod's request on (Istio: 127.0.0.6).
            "127.0.0.6:40000",
            "[::ffff:127.0.0.6]:40000",
        ] {
            let r = from(peer, &s).oneshot(post("/quitquitquit")).await.unwrap();
            assert_eq!(r.status(), 403, "{peer}");
        }
        // Without the peer address (a router not served with connect info) it fails closed.
        let r = router(s.clone())
            .oneshot(post("/quitquitquit"))
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        assert!(!s.shutdown.is_raised());
    }

    #[tokio::test]
    async fn the_default_address_is_one_socket_that_takes_ipv6_and_ipv4_clients() {
        assert_eq!(DEFAULT_ADDR, "[::]:9901");
        let l = listen("[::]:0".parse().unwrap()).unwrap();
        let local = l.local_addr().unwrap();
        assert_eq!(local.ip(), std::net::Ipv6Addr::UNSPECIFIED, "{local}");
        assert!(
            !socket2::SockRef::from(&l).only_v6().unwrap(),
            "IPV6_V6ONLY is off"
        );
        for client in ["127.0.0.1", "::1"] {
            let to = SocketAddr::new(client.parse().unwrap(), local.port());
            tokio::net::TcpStream::connect(to).await.unwrap();
            let (_, peer) = l.accept().await.unwrap();
            assert!(peer.ip().to_canonical().is_loopback(), "{client}: {peer}");
        }
    }

    #[tokio::test]
    async fn without_ipv6_the_default_address_falls_back_to_0_0_0_0() {
        for errno in [97 /* EAFNOSUPPORT */, 99 /* EADDRNOTAVAIL */] {
            let l = listen_with("[::]:0".parse().unwrap(), |a| {
                if a.is_ipv6() {
                    Err(std::io::Error::from_raw_os_error(errno))
                } else {
                    std::net::TcpListener::bind(a).and_then(|l| {
                        l.set_nonblocking(true)?;
                        Ok(l)
                    })
                }
            })
            .unwrap();
            let local = l.local_addr().unwrap();
            assert_eq!(local.ip(), std::net::Ipv4Addr::UNSPECIFIED, "errno {errno}");
        }
    }

    #[tokio::test]
    async fn a_taken_port_is_an_error_naming_the_address_and_is_not_retried_on_ipv4() {
        let tried = std::sync::Mutex::new(Vec::new());
        let e = listen_with("[::]:9901".parse().unwrap(), |a| {
            tried.lock().unwrap().push(a);
            Err(std::io::Error::from_raw_os_error(98 /* EADDRINUSE */))
        })
        .unwrap_err();
        assert_eq!(
            tried.into_inner().unwrap(),
            ["[::]:9901".parse::<SocketAddr>().unwrap()]
        );
        assert!(e.to_string().contains("on [::]:9901"), "{e}");
    }

    #[tokio::test]
    async fn an_explicit_address_is_bound_as_given() {
        let l = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(l.local_addr().unwrap().ip(), std::net::Ipv4Addr::LOCALHOST);
        let l = listen("0.0.0.0:0".parse().unwrap()).unwrap();
        assert!(l.local_addr().unwrap().is_ipv4());
    }
}
