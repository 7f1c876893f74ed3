//! The HTTPS server under the webhook: TLS (rustls, TLS 1.2+ only, ALPN h2 and http/1.1),
//! HTTP/1.1 and HTTP/2 (hyper-util's auto builder serving the axum router), connection limits,
//! timeouts, certificate hot-reload wiring and graceful shutdown.
//!
//! Owns sockets and their limits. Never decides anything about admission and never logs per
//! request at info level (failed handshakes are debug: scanners and probes are routine).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::server::ResolvesServerCert;
use rustls::ServerConfig;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower_http::timeout::TimeoutLayer;

use crate::Error;

/// Limits and timeouts of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Time allowed for the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Time allowed for the first bytes after the handshake and for each request's headers.
    pub header_read_timeout: Duration,
    /// Time allowed to read a request body and answer it (408 after).
    pub request_timeout: Duration,
    /// Time open connections get to finish after shutdown starts.
    pub drain_timeout: Duration,
    /// Time between SIGTERM and closing the listener: `/readyz` answers 503 and new
    /// connections are still served while the endpoints controller and kube-proxy take the Pod
    /// out of the Service (`--shutdown-delay`), so a rollout refuses no admission request.
    pub shutdown_delay: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            shutdown_delay: Duration::from_secs(5),
        }
    }
}

/// The rustls configuration: TLS 1.2 and 1.3 only, ALPN h2 then http/1.1, certificates from
/// `resolver` (so a reload applies to the next handshake).
pub fn tls_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<Arc<ServerConfig>, Error> {
    let mut config = ServerConfig::builder_with_provider(wg_certs::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::InvalidFlag {
            flag: "--tls-cert",
            reason: format!("TLS configuration refused: {e}"),
        })?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Bind `addr` (errors name the address).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::BindListener { addr, source })
}

/// Serve `app` over TLS on `listener` until `shutdown` completes, then drain open connections
/// for at most `limits.drain_timeout`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Arc<ServerConfig>,
    limits: &Limits,
    shutdown: impl Future<Output = ()>,
) {
    let app = app.layer(TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        limits.request_timeout,
    ));
    let acceptor = TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // the semaphore is never closed
            },
            () = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        let handshake_timeout = limits.tls_handshake_timeout;
        let first_bytes_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(
                tcp,
                peer,
                acceptor,
                app,
                &builder,
                watcher,
                handshake_timeout,
                first_bytes_timeout,
            )
            .await;
        });
    }
    drop(listener);
    tracing::info!("shutting down: draining open connections");
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout; closing them");
    }
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename these
async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    app: Router,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    handshake_timeout: Duration,
    first_bytes_timeout: Duration,
) {
    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    // hyper's header-read timeout starts only once it knows the protocol; bound the wait for
    // the first bytes (HTTP/1 request line or HTTP/2 preface) here.
    let mut io = BufReader::new(tls);
    match tokio::time::timeout(first_bytes_timeout, io.fill_buf()).await {
        Ok(Ok(bytes)) if !bytes.is_empty() => {}
        Ok(Ok(_) | Err(_)) => return,
        Err(_) => {
            tracing::debug!(%peer, "no request after the TLS handshake");
            return;
        }
    }
    let service = TowerToHyperService::new(app);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    if let Err(error) = watcher.watch(connection).await {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = terminate => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// A Kubernetes client (in-cluster, or `KUBECONFIG`) when one is needed: required for
/// self-managed certificates, optional for version discovery (reading `/version` needs no RBAC
/// grant; without a client `sidecar-mode: auto` follows the config file).
async fn cluster_client(
    discover_version: bool,
    self_managed: bool,
) -> Result<Option<kube::Client>, Error> {
    if !discover_version && !self_managed {
        return Ok(None);
    }
    // kube's TLS needs a process-level rustls provider; this workspace uses ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match kube::Client::try_default().await {
        Ok(client) => Ok(Some(client)),
        Err(source) if self_managed => Err(Error::Kube {
            action:
                "build a Kubernetes client (in-cluster or KUBECONFIG) for --cert-mode self-managed"
                    .to_owned(),
            source,
        }),
        Err(error) => {
            tracing::warn!(%error, "no Kubernetes client; cannot discover the apiserver version");
            Ok(None)
        }
    }
}

/// The start-up warning of a plaintext `vault.address`, which [`crate::config::Config::validate`]
/// accepts only with `vault.allowPlaintext`.
fn warn_if_vault_is_plaintext(vault: &crate::config::VaultSettings) {
    if vault.is_plaintext() {
        tracing::warn!(
            vault_address = %vault.address,
            "vault.address is plaintext http:// (vault.allowPlaintext): every injected sidecar's \
             Vault token and keys cross the network in the clear"
        );
    }
}

/// Run `wg-injector serve`: load the config and the certificate, print the caBundle when
/// self-signed, serve until SIGTERM.
pub async fn run(settings: crate::cli::ServeSettings) -> Result<(), Error> {
    use base64::Engine as _;
    let mut config = match &settings.config {
        Some(path) => crate::config::Config::from_yaml_file(path)?,
        None => crate::config::Config::default(),
    };
    warn_if_vault_is_plaintext(&config.vault);
    let self_managed = settings.certificate == crate::cli::CertificateSource::SelfManaged;
    let client = cluster_client(settings.cluster.discover_version, self_managed).await?;
    if let (true, Some(client)) = (settings.cluster.discover_version, &client) {
        match crate::cluster::discover_native_sidecars(client).await {
            Ok(native) => config.native_sidecars = native,
            Err(error) => tracing::warn!(
                %error,
                native_sidecars = config.native_sidecars,
                "apiserver version unknown; sidecar-mode auto follows the config file"
            ),
        }
    }
    let resolver = match &settings.certificate {
        crate::cli::CertificateSource::Files {
            cert,
            key,
            reload_interval,
        } => {
            let resolver = Arc::new(wg_certs::ReloadingResolver::from_files(cert, key)?);
            Arc::clone(&resolver).spawn_watcher(*reload_interval);
            resolver
        }
        crate::cli::CertificateSource::SelfManaged => {
            let client = client.clone().ok_or(Error::InvalidFlag {
                flag: "--cert-mode",
                reason: "self-managed needs a Kubernetes client".to_owned(),
            })?;
            let cluster_settings = settings
                .cluster
                .self_managed_settings(client.default_namespace())?;
            let manager = crate::cluster::SelfManaged::new(client, cluster_settings);
            let (resolver, material) = manager.bootstrap().await?;
            manager.spawn(Arc::clone(&resolver), material);
            resolver
        }
        crate::cli::CertificateSource::SelfSigned { names } => {
            let lifetime = Duration::from_secs(365 * 86_400);
            let ca = wg_certs::generate_ca("wg-injector self-signed CA", lifetime)?;
            let serving = wg_certs::issue_serving_cert(&ca, names, lifetime)?;
            let bundle = base64::engine::general_purpose::STANDARD.encode(ca.cert_pem());
            // stdout carries only the caBundle, so `| head -n1` captures it; logs go to stderr.
            println!("{bundle}");
            Arc::new(wg_certs::ReloadingResolver::from_certified_key(
                serving.certified_key()?,
            )?)
        }
    };
    let tls = tls_config(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>)?;
    let native_sidecars = config.native_sidecars;
    let mut state = crate::webhook::AppState::new(config, Some(resolver));
    let draining = Arc::clone(&state.draining);
    let shutdown_delay = settings.limits.shutdown_delay;
    state.memo = Arc::new(crate::memo::PatchMemo::new(settings.patch_memo_entries));
    spawn_heap_release(Arc::clone(&state.metrics));
    if let (true, Some(client)) = (settings.cluster.discover_version, client) {
        let refreshed = state.clone();
        crate::cluster::spawn_version_refresh(
            client,
            Duration::from_secs(settings.cluster.version_refresh_seconds.max(1)),
            native_sidecars,
            move |native| {
                tracing::info!(native_sidecars = native, "apiserver version changed");
                refreshed.set_native_sidecars(native);
            },
        );
    }
    let listener = bind(settings.listen).await?;
    tracing::info!(
        listen = %settings.listen,
        max_connections = settings.limits.max_connections,
        "serving the admission webhook"
    );
    let shutdown = async move {
        shutdown_signal().await;
        draining.store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(
            shutdown_delay_seconds = shutdown_delay.as_secs(),
            "shutting down: /readyz answers 503; still serving until the Pod leaves the Service"
        );
        tokio::time::sleep(shutdown_delay).await;
    };
    serve(
        listener,
        crate::webhook::router(state),
        tls,
        &settings.limits,
        shutdown,
    )
    .await;
    Ok(())
}

/// After a burst, give the allocator's freed memory back to the OS: once a second, when no body
/// was answered in the last second but some were since the last release ([`QuietAfterBurst`]),
/// run [`wg_heap::release_free_memory`] on a blocking thread. A busy webhook never pays for it;
/// an idle one returns close to its start-up size instead of staying at its peak.
fn spawn_heap_release(metrics: Arc<crate::metrics::Metrics>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut quiet = QuietAfterBurst::new(metrics.answered());
        loop {
            tick.tick().await;
            if quiet.tick(metrics.answered()) {
                let released = tokio::task::spawn_blocking(wg_heap::release_free_memory)
                    .await
                    .unwrap_or(false);
                tracing::debug!(released, "gave freed memory back to the OS after a burst");
            }
        }
    });
}

/// Tells, from a counter read once per tick, when traffic has just stopped: the first quiet
/// tick after some activity, once per burst.
#[derive(Debug, Clone, Copy)]
struct QuietAfterBurst {
    last_seen: u64,
    released_at: u64,
}

impl QuietAfterBurst {
    fn new(count: u64) -> Self {
        Self {
            last_seen: count,
            released_at: count,
        }
    }

    /// `true` when `count` did not move since the last tick but did since the last `true`.
    fn tick(&mut self, count: u64) -> bool {
        let quiet_after_burst = count == self.last_seen && count != self.released_at;
        if quiet_after_burst {
            self.released_at = count;
        }
        self.last_seen = count;
        quiet_after_burst
    }
}

#[cfg(test)]
mod quiet_tests {
    use super::QuietAfterBurst;

    #[test]
    fn memory_is_released_once_on_the_first_quiet_tick_after_a_burst() {
        let mut quiet = QuietAfterBurst::new(0);
        assert!(!quiet.tick(0), "no traffic yet: nothing to give back");
        assert!(!quiet.tick(500), "busy");
        assert!(!quiet.tick(900), "still busy");
        assert!(quiet.tick(900), "the first quiet second after the burst");
        assert!(!quiet.tick(900), "once per burst");
        assert!(!quiet.tick(901), "a new request");
        assert!(quiet.tick(901), "quiet again");
    }
}
