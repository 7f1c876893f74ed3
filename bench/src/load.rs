//! The load generator: HTTPS `POST /mutate` over kept-alive HTTP/1.1, HTTP/2, or a new TLS
//! connection per request, either **open loop** at a fixed rate or **closed loop** with N
//! workers (the maximum).
//!
//! Open loop avoids coordinated omission: a pacing thread (precise OS sleeps, not the 1 ms
//! tokio timer) issues one ticket per intended send time, workers take tickets in order, and
//! latency is measured from the ticket's intended time, so a stalled server is charged for the
//! requests it delayed. Closed loop measures from the actual send. Every run is bounded by its
//! duration; traffic goes only to the address given (the benchmark passes loopback addresses).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::{http1, http2};
use hyper::header::{CONNECTION, CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::Resumption;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};
use tokio_rustls::TlsConnector;

use crate::Error;

/// How requests travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 over kept-alive TLS connections, one request at a time per connection.
    Http1,
    /// HTTP/2 over a few TLS connections, many streams each.
    Http2,
    /// A new TCP + TLS connection per request (HTTP/1.1, `Connection: close`); the handshake
    /// counts in the latency. `resume` lets the client resume TLS sessions.
    NewConnection {
        /// Offer TLS session resumption (tickets from earlier connections).
        resume: bool,
    },
}

impl Protocol {
    /// Short name for tables.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "HTTP/1.1 keep-alive",
            Protocol::Http2 => "HTTP/2",
            Protocol::NewConnection { resume: false } => "new TLS conn/request (full handshake)",
            Protocol::NewConnection { resume: true } => "new TLS conn/request (resumed)",
        }
    }
}

/// How fast requests are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// Open loop: this many requests per second, whatever the server does.
    PerSecond(u32),
    /// Closed loop: every worker sends its next request as soon as the last one is answered.
    Max,
}

impl Rate {
    /// Short name for tables.
    #[must_use]
    pub fn label(self) -> String {
        match self {
            Rate::PerSecond(r) => format!("{r}/s"),
            Rate::Max => "max".to_owned(),
        }
    }
}

/// One measured run against one server.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Transport.
    pub protocol: Protocol,
    /// Open or closed loop.
    pub rate: Rate,
    /// Concurrent requests at most (workers): connections for HTTP/1.1, streams for HTTP/2.
    pub workers: usize,
    /// TLS connections the HTTP/2 workers share.
    pub h2_connections: usize,
    /// Measured time (sending stops after it; answers still in flight are awaited).
    pub duration: Duration,
}

/// The server under load.
#[derive(Debug, Clone)]
pub struct Target {
    /// Loopback address.
    pub addr: SocketAddr,
    /// Client TLS settings trusting the server's CA, one per protocol.
    pub tls: ClientTls,
}

/// Client TLS configurations trusting one CA.
#[derive(Debug, Clone)]
pub struct ClientTls {
    h1: Arc<ClientConfig>,
    h2: Arc<ClientConfig>,
    fresh: Arc<ClientConfig>,
}

impl ClientTls {
    /// Client settings that trust the CA in `ca_pem`.
    pub fn new(ca_pem: &str) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("bad CA PEM: {e}"))?;
            roots.add(cert).map_err(|e| format!("unusable CA: {e}"))?;
        }
        let build = |alpn: &[u8], resume: bool| -> Result<Arc<ClientConfig>, String> {
            let mut config = ClientConfig::builder_with_provider(wg_certs::crypto_provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            config.alpn_protocols = vec![alpn.to_vec()];
            if !resume {
                config.resumption = Resumption::disabled();
            }
            Ok(Arc::new(config))
        };
        Ok(Self {
            h1: build(b"http/1.1", true)?,
            h2: build(b"h2", true)?,
            // Go's TLS client (the kube-apiserver's) keeps no session cache by default.
            fresh: build(b"http/1.1", false)?,
        })
    }
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct Measurement {
    /// Latency of every answered request, nanoseconds, sorted.
    pub latencies_ns: Vec<u64>,
    /// Requests answered `200 OK`.
    pub ok: u64,
    /// Requests that failed (connection error or a status other than 200).
    pub errors: u64,
    /// From the first intended send to the last answer.
    pub elapsed: Duration,
}

impl Measurement {
    /// Answered requests per second.
    #[must_use]
    pub fn throughput(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            to_f64(self.ok) / secs
        } else {
            0.0
        }
    }

    /// The `q` quantile (0.0–1.0) of latency, nearest rank.
    #[must_use]
    pub fn quantile(&self, q: f64) -> Duration {
        if self.latencies_ns.is_empty() {
            return Duration::ZERO;
        }
        let n = self.latencies_ns.len();
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )] // rank ≤ n, a count of samples far below 2^52
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        Duration::from_nanos(self.latencies_ns[rank - 1])
    }
}

/// `u64` → `f64` for rates (counts here stay far below 2^52).
#[must_use]
#[allow(clippy::cast_precision_loss)]
pub fn to_f64(n: u64) -> f64 {
    n as f64
}

type Body = Full<Bytes>;

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("TCP: {e}"))?;
    tcp.set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    TlsConnector::from(config)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))
}

async fn connect(target: &Target, protocol: Protocol) -> Result<Sender, String> {
    match protocol {
        Protocol::Http2 => {
            let tls = tls_connect(target.addr, Arc::clone(&target.tls.h2)).await?;
            let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP/2: {e}"))?;
            tokio::spawn(connection);
            Ok(Sender::H2(sender))
        }
        Protocol::Http1 | Protocol::NewConnection { .. } => {
            let config = match protocol {
                Protocol::NewConnection { resume: false } => &target.tls.fresh,
                _ => &target.tls.h1,
            };
            let tls = tls_connect(target.addr, Arc::clone(config)).await?;
            let (sender, connection) = http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP/1.1: {e}"))?;
            tokio::spawn(connection);
            Ok(Sender::H1(sender))
        }
    }
}

/// Send one review on `sender`; `Ok` with the body when the answer is `200 OK`.
async fn send(
    sender: &mut Sender,
    addr: SocketAddr,
    body: &Bytes,
    close: bool,
) -> Result<Bytes, String> {
    let builder = Request::post("/mutate").header(CONTENT_TYPE, "application/json");
    let response = match sender {
        Sender::H1(s) => {
            let mut builder = builder.header(HOST, addr.to_string());
            if close {
                builder = builder.header(CONNECTION, "close");
            }
            let request = builder
                .body(Full::new(body.clone()))
                .map_err(|e| e.to_string())?;
            s.ready().await.map_err(|e| e.to_string())?;
            s.send_request(request).await
        }
        Sender::H2(s) => {
            let request = Request::post(format!("https://{addr}/mutate"))
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(body.clone()))
                .map_err(|e| e.to_string())?;
            s.ready().await.map_err(|e| e.to_string())?;
            s.send_request(request).await
        }
    }
    .map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status == StatusCode::OK {
        Ok(bytes)
    } else {
        Err(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&bytes)
        ))
    }
}

/// Send one review over a fresh connection of `protocol` and return the answer body (used to
/// check what a server answers before measuring it).
pub async fn probe(target: &Target, protocol: Protocol, body: &Bytes) -> Result<Bytes, Error> {
    let fail = |reason| Error::Connect {
        addr: target.addr,
        reason,
    };
    let mut sender = connect(target, protocol).await.map_err(fail)?;
    send(&mut sender, target.addr, body, false)
        .await
        .map_err(fail)
}

type Tickets = Arc<Mutex<mpsc::UnboundedReceiver<Instant>>>;

struct WorkerLog {
    latencies_ns: Vec<u64>,
    ok: u64,
    errors: u64,
    last_done: Option<Instant>,
}

/// Which of the bodies one worker sends: its own offset, then every `stride`-th one.
struct Bodies {
    all: Arc<[Bytes]>,
    next: usize,
    stride: usize,
}

impl Bodies {
    fn next(&mut self) -> &Bytes {
        let index = self.next % self.all.len();
        self.next = index + self.stride;
        &self.all[index]
    }
}

async fn worker(
    target: Target,
    protocol: Protocol,
    mut sender: Option<Sender>,
    mut bodies: Bodies,
    tickets: Option<Tickets>,
    deadline: Instant,
) -> WorkerLog {
    let mut log = WorkerLog {
        latencies_ns: Vec::with_capacity(4096),
        ok: 0,
        errors: 0,
        last_done: None,
    };
    let fresh = matches!(protocol, Protocol::NewConnection { .. });
    loop {
        let started = if let Some(tickets) = &tickets {
            let Some(intended) = tickets.lock().await.recv().await else {
                break;
            };
            intended
        } else {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            now
        };
        if sender.is_none() {
            sender = connect(&target, protocol).await.ok();
        }
        let body = bodies.next();
        let result = match sender.as_mut() {
            Some(s) => send(s, target.addr, body, fresh).await,
            None => Err("connect failed".to_owned()),
        };
        let done = Instant::now();
        if result.is_ok() {
            log.ok += 1;
            #[allow(clippy::cast_possible_truncation)] // latencies are far below 584 years
            log.latencies_ns
                .push(done.saturating_duration_since(started).as_nanos() as u64);
        } else {
            log.errors += 1;
        }
        log.last_done = Some(done);
        if fresh || result.is_err() {
            sender = None;
        }
    }
    log
}

/// Issue one ticket per intended send time from `start` for `duration` at `per_second`,
/// sleeping with the OS's precise timers on a thread of its own.
fn pace(
    start: Instant,
    duration: Duration,
    per_second: u32,
    tickets: &mpsc::UnboundedSender<Instant>,
) {
    let period = Duration::from_secs(1) / per_second.max(1);
    let mut intended = start;
    while intended < start + duration {
        let now = Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        if tickets.send(intended).is_err() {
            return;
        }
        intended += period;
    }
}

/// Run `plan` against `target`, sending `bodies` in turn (at least one).
pub async fn run(target: &Target, plan: &Plan, bodies: &[Bytes]) -> Result<Measurement, Error> {
    let all: Arc<[Bytes]> = if bodies.is_empty() {
        Arc::from(vec![Bytes::new()])
    } else {
        Arc::from(bodies)
    };
    let body = &all[0];
    let workers = plan.workers.max(1);
    // Connections are made (and used once) before the clock starts; only the new-connection
    // protocol pays its handshakes inside the measurement.
    let mut senders: Vec<Option<Sender>> = Vec::with_capacity(workers);
    match plan.protocol {
        Protocol::Http1 => {
            for _ in 0..workers {
                let mut sender =
                    connect(target, plan.protocol)
                        .await
                        .map_err(|reason| Error::Connect {
                            addr: target.addr,
                            reason,
                        })?;
                let _ = send(&mut sender, target.addr, body, false).await;
                senders.push(Some(sender));
            }
        }
        Protocol::Http2 => {
            let mut shared = Vec::new();
            for _ in 0..plan.h2_connections.max(1) {
                let mut sender =
                    connect(target, plan.protocol)
                        .await
                        .map_err(|reason| Error::Connect {
                            addr: target.addr,
                            reason,
                        })?;
                let _ = send(&mut sender, target.addr, body, false).await;
                let Sender::H2(h2) = sender else {
                    unreachable!("HTTP/2 connect returns an HTTP/2 sender")
                };
                shared.push(h2);
            }
            for i in 0..workers {
                senders.push(Some(Sender::H2(shared[i % shared.len()].clone())));
            }
        }
        Protocol::NewConnection { .. } => senders.resize_with(workers, || None),
    }
    let start = Instant::now() + Duration::from_millis(5);
    let deadline = start + plan.duration;
    let tickets = match plan.rate {
        Rate::PerSecond(per_second) => {
            let (tx, rx) = mpsc::unbounded_channel();
            let duration = plan.duration;
            std::thread::spawn(move || pace(start, duration, per_second, &tx));
            Some(Arc::new(Mutex::new(rx)))
        }
        Rate::Max => None,
    };
    tokio::time::sleep_until(start.into()).await;
    let handles: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, sender)| {
            let bodies = Bodies {
                all: Arc::clone(&all),
                next: i,
                stride: workers,
            };
            tokio::spawn(worker(
                target.clone(),
                plan.protocol,
                sender,
                bodies,
                tickets.clone(),
                deadline,
            ))
        })
        .collect();
    let mut measurement = Measurement::default();
    let mut last_done = start;
    for handle in handles {
        let Ok(log) = handle.await else {
            measurement.errors += 1;
            continue;
        };
        measurement.latencies_ns.extend(log.latencies_ns);
        measurement.ok += log.ok;
        measurement.errors += log.errors;
        if let Some(done) = log.last_done {
            last_done = last_done.max(done);
        }
    }
    measurement.elapsed = last_done.saturating_duration_since(start);
    measurement.latencies_ns.sort_unstable();
    Ok(measurement)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let m = Measurement {
            latencies_ns: (1..=1000).collect(),
            ok: 1000,
            errors: 0,
            elapsed: Duration::from_secs(2),
        };
        assert_eq!(m.quantile(0.5), Duration::from_nanos(500));
        assert_eq!(m.quantile(0.99), Duration::from_nanos(990));
        assert_eq!(m.quantile(0.999), Duration::from_nanos(999));
        assert!((m.throughput() - 500.0).abs() < f64::EPSILON);
    }

    #[test]
    fn pacing_issues_one_ticket_per_period_at_the_intended_times() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let start = Instant::now();
        pace(start, Duration::from_millis(50), 1000, &tx);
        drop(tx);
        let mut times = Vec::new();
        while let Ok(t) = rx.try_recv() {
            times.push(t);
        }
        assert_eq!(times.len(), 50);
        assert_eq!(times[1] - times[0], Duration::from_millis(1));
        assert!(Instant::now() >= start + Duration::from_millis(49));
    }
}
