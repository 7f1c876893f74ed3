//! The webhook over real TLS on loopback: what only a socket shows. Protocol versions and ALPN,
//! plaintext refused, bad inputs, the body limit over HTTP/1.1 and HTTP/2, timeouts, the
//! connection limit, and certificate hot-reload while requests keep flowing. Needs `openssl` on
//! PATH for the TLS 1.1 probe (fails without).
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ClientConfig;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use wg_certs::{generate_ca, issue_serving_cert, CertificateAuthority, ReloadingResolver};
use wg_injector::config::Config;
use wg_injector::server::{bind, serve, tls_config, Limits};
use wg_injector::webhook::{router, AppState, MAX_BODY_BYTES};

const HOUR: Duration = Duration::from_secs(3600);

/// A webhook served on 127.0.0.1 with certificate files in a temp dir; stopped on drop.
struct Server {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    ca: CertificateAuthority,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

fn write_pair(dir: &Path, ca: &CertificateAuthority) {
    let leaf =
        issue_serving_cert(ca, &["localhost".to_owned(), "127.0.0.1".to_owned()], HOUR).unwrap();
    std::fs::write(dir.join("tls.crt"), leaf.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), leaf.key_pem).unwrap();
}

async fn start(limits: Limits) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let ca = generate_ca("wg-injector test CA", HOUR).unwrap();
    write_pair(dir.path(), &ca);
    let resolver = Arc::new(
        ReloadingResolver::from_files(&dir.path().join("tls.crt"), &dir.path().join("tls.key"))
            .unwrap(),
    );
    Arc::clone(&resolver).spawn_watcher(Duration::from_millis(100));
    let tls = tls_config(Arc::clone(&resolver) as _).unwrap();
    let app = router(AppState::new(Config::default(), Some(resolver)));
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve(listener, app, tls, &limits, async {
            let _ = rx.await;
        })
        .await;
    });
    Server {
        addr,
        dir,
        ca,
        shutdown: Some(tx),
        task,
    }
}

fn client(
    cas: &[&str],
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots
            .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
            .unwrap();
    }
    let mut config = ClientConfig::builder_with_provider(wg_certs::crypto_provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Every request makes a full handshake, so the certificate we record is the one served
    // now (a resumed session reports the certificate of the session it resumes).
    config.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

fn default_client(ca: &str) -> TlsConnector {
    client(&[ca], rustls::DEFAULT_VERSIONS, &[b"http/1.1"])
}

async fn connect(
    addr: SocketAddr,
    connector: &TlsConnector,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

struct Reply {
    status: u16,
    body: String,
    served: CertificateDer<'static>,
}

/// One HTTP/1.1 request on a fresh TLS connection (`Connection: close`), written by hand.
async fn request(
    addr: SocketAddr,
    connector: &TlsConnector,
    head: &str,
    body: &[u8],
) -> std::io::Result<Reply> {
    let mut tls = connect(addr, connector).await?;
    let served = tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned();
    let text = format!("{head}\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(text.as_bytes()).await?;
    tls.write_all(body).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("response timed out"))??;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {raw:?}")))?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok(Reply {
        status,
        body,
        served,
    })
}

async fn post(
    addr: SocketAddr,
    connector: &TlsConnector,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<Reply> {
    let head = format!(
        "POST /mutate HTTP/1.1\r\nContent-Type: {content_type}\r\nContent-Length: {}",
        body.len()
    );
    request(addr, connector, &head, body).await
}

fn annotated_review(uid: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "alice"},
            "object": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web", "annotations": {"wg-injector.io/inject": "true"}},
                "spec": {"containers": [{"name": "app", "image": "nginx"}]}}
        }
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_holds_over_tls() {
    let server = start(Limits::default()).await;
    let connector = default_client(server.ca.cert_pem());
    let reply = post(
        server.addr,
        &connector,
        "application/json",
        &annotated_review("tls-1"),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let answer: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(answer["response"]["uid"], "tls-1");
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch", "{answer}");
    for (path, expected) in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/metrics", 200),
        ("/nope", 404),
    ] {
        let reply = request(
            server.addr,
            &connector,
            &format!("GET {path} HTTP/1.1"),
            b"",
        )
        .await
        .unwrap();
        assert_eq!(reply.status, expected, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_400_413_and_415_over_tls() {
    let server = start(Limits::default()).await;
    let connector = default_client(server.ca.cert_pem());
    let reply = post(server.addr, &connector, "application/json", b"{oops")
        .await
        .unwrap();
    assert_eq!(reply.status, 400);
    let reply = post(server.addr, &connector, "text/plain", b"{}")
        .await
        .unwrap();
    assert_eq!(reply.status, 415);
    // Declares 7 MiB and sends a few bytes: refused from the header, without waiting for the rest.
    let head = "POST /mutate HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 7340032";
    let started = Instant::now();
    let reply = request(server.addr, &connector, head, b"{}").await.unwrap();
    assert_eq!(reply.status, 413);
    assert!(started.elapsed() < Duration::from_secs(5));
    // A real 7 MiB body is cut off at the limit.
    let big = vec![b' '; 7 * 1024 * 1024];
    let head =
        "POST /mutate HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked";
    let mut chunked = format!("{:x}\r\n", big.len()).into_bytes();
    chunked.extend_from_slice(&big);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    match request(server.addr, &connector, head, &chunked).await {
        Ok(reply) => assert_eq!(reply.status, 413),
        // The server may close while we are still writing; that is a refusal too, but then
        // it must not have been a success.
        Err(e) => assert!(!e.to_string().contains("200"), "{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_and_1_3_are_accepted_and_h2_is_negotiated_and_spoken() {
    let server = start(Limits::default()).await;
    let ca = server.ca.cert_pem();
    for (version, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let tls = connect(server.addr, &client(&[ca], &[version], &[b"http/1.1"]))
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.protocol_version(), Some(expected));
    }
    let tls = connect(
        server.addr,
        &client(&[ca], rustls::DEFAULT_VERSIONS, &[b"h2", b"http/1.1"]),
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::post(format!("https://localhost:{}/mutate", server.addr.port()))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(axum::body::Bytes::from(
            annotated_review("h2"),
        )))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), hyper::Version::HTTP_2);
}

fn openssl() -> std::path::PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("openssl"))
                .find(|p| p.is_file())
        })
        .expect("openssl must be on PATH for the TLS 1.1 probe (apt-get install openssl)")
}

async fn s_client(addr: SocketAddr, version_flag: &str) -> (bool, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(openssl())
            .args([
                "s_client",
                "-connect",
                &addr.to_string(),
                "-servername",
                "localhost",
            ])
            .arg(version_flag)
            // OpenSSL 3 refuses TLS 1.0/1.1 at its default security level: lower it so the
            // refusal we observe is the server's.
            .args(["-cipher", "DEFAULT@SECLEVEL=0"])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("openssl s_client timed out")
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_1_is_refused() {
    let server = start(Limits::default()).await;
    let (ok, text) = s_client(server.addr, "-tls1_2").await;
    assert!(
        ok && text.contains("TLSv1.2"),
        "control: TLS 1.2 via openssl must work:\n{text}"
    );
    let (ok, text) = s_client(server.addr, "-tls1_1").await;
    assert!(!ok, "TLS 1.1 was accepted:\n{text}");
    // OpenSSL prints the attempted version even on failure; no cipher and no certificate
    // means the handshake never completed.
    assert!(text.contains("Cipher is (NONE)"), "{text}");
    assert!(text.contains("no peer certificate available"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_http_is_refused() {
    let server = start(Limits::default()).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut raw)).await;
    assert!(
        !raw.starts_with(b"HTTP/"),
        "plaintext got an HTTP answer: {raw:?}"
    );
    assert!(!String::from_utf8_lossy(&raw).contains("ok"));
}

async fn closed_within(stream: &mut (impl AsyncReadExt + Unpin), bound: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + bound;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_the_handshake_is_dropped() {
    let limits = Limits {
        tls_handshake_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let server = start(limits).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut tcp, Duration::from_secs(5)).await);
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_headers_are_cut_off() {
    let limits = Limits {
        header_read_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let server = start(limits).await;
    let connector = default_client(server.ca.cert_pem());
    // Silent after the handshake.
    let mut silent = connect(server.addr, &connector).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
    // Half a request line, then nothing.
    let mut slow = connect(server.addr, &connector).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: loc")
        .await
        .unwrap();
    assert!(closed_within(&mut slow, Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_holds_new_connections_until_one_closes() {
    let limits = Limits {
        max_connections: 1,
        ..Limits::default()
    };
    let server = start(limits).await;
    let connector = default_client(server.ca.cert_pem());
    let mut first = connect(server.addr, &connector).await.unwrap();
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = first.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // The first connection is kept alive: a second one is not served meanwhile.
    let blocked =
        tokio::time::timeout(Duration::from_secs(1), connect(server.addr, &connector)).await;
    assert!(
        blocked.is_err(),
        "a second connection was served beyond the limit"
    );
    drop(first);
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        request(server.addr, &connector, "GET /healthz HTTP/1.1", b""),
    )
    .await
    .expect("served once the first connection closed")
    .unwrap();
    assert_eq!(reply.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_while_requests_flow_without_a_failure() {
    let server = start(Limits::default()).await;
    let next_ca = generate_ca("wg-injector next CA", HOUR).unwrap();
    let connector = client(
        &[server.ca.cert_pem(), next_ca.cert_pem()],
        rustls::DEFAULT_VERSIONS,
        &[b"http/1.1"],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for worker in 0..4 {
        let (connector, stop, failures) =
            (connector.clone(), Arc::clone(&stop), Arc::clone(&failures));
        let addr = server.addr;
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            // Bounded: at most 2000 requests per worker, and the main task stops us earlier.
            for i in 0..2000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let body = annotated_review(&format!("w{worker}-{i}"));
                match post(addr, &connector, "application/json", &body).await {
                    Ok(reply) if reply.status == 200 => seen.push(reply.served),
                    Ok(reply) => {
                        eprintln!("worker {worker} request {i}: status {}", reply.status);
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("worker {worker} request {i}: {e}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Rewrite the files in place (not atomically): the resolver sees half-written and
    // mismatched pairs on the way and must keep serving the old one until the pair is whole.
    write_pair(server.dir.path(), &next_ca);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen_certs = Vec::new();
    for client in clients {
        seen_certs.extend(client.await.unwrap());
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed during the reload"
    );
    let distinct: HashSet<_> = seen_certs.iter().map(|c| c.as_ref().to_vec()).collect();
    assert_eq!(
        distinct.len(),
        2,
        "expected the old and the new certificate to be served"
    );
    let last = seen_certs.last().unwrap();
    let (_, last) = x509_parser::parse_x509_certificate(last.as_ref()).unwrap();
    assert!(
        last.issuer().to_string().contains("next CA"),
        "{}",
        last.issuer()
    );
    assert!(
        seen_certs.len() > 20,
        "only {} requests completed",
        seen_certs.len()
    );
}

/// A body of `len` bytes the server accepts as an `AdmissionReview`: a review padded with
/// trailing whitespace (valid JSON).
fn padded_review(uid: &str, len: usize) -> Vec<u8> {
    let mut body = annotated_review(uid);
    assert!(body.len() <= len);
    body.resize(len, b' ');
    body
}

/// How a test sends an oversized body: with `Content-Length` (refused from the header) or
/// without (HTTP/1.1 chunked, HTTP/2 DATA frames with no length; refused while reading).
#[derive(Debug, Clone, Copy)]
enum Length {
    Declared,
    Streamed,
}

const CHUNK: usize = 64 * 1024;

/// `POST /mutate` over HTTP/1.1 on a fresh TLS connection, the body written in 64 KiB chunks
/// while the response is read, so an early answer is seen even if the server stops reading.
async fn h1_post(
    addr: SocketAddr,
    connector: &TlsConnector,
    body: Vec<u8>,
    length: Length,
) -> Result<(u16, String), String> {
    let tls = connect(addr, connector).await.map_err(|e| e.to_string())?;
    let (mut reader, mut writer) = tokio::io::split(tls);
    let framing = match length {
        Length::Declared => format!("Content-Length: {}", body.len()),
        Length::Streamed => "Transfer-Encoding: chunked".to_owned(),
    };
    let head = format!(
        "POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         {framing}\r\nConnection: close\r\n\r\n"
    );
    let writing = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await?;
        for chunk in body.chunks(CHUNK) {
            match length {
                Length::Declared => writer.write_all(chunk).await?,
                Length::Streamed => {
                    writer
                        .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                        .await?;
                    writer.write_all(chunk).await?;
                    writer.write_all(b"\r\n").await?;
                }
            }
        }
        if let Length::Streamed = length {
            writer.write_all(b"0\r\n\r\n").await?;
        }
        std::io::Result::Ok(writer)
    });
    // Read until the head and `Content-Length` bytes of body are in; errors after that (the
    // server closing on a body it did not read) do not matter.
    let mut raw = Vec::new();
    let mut buf = vec![0; CHUNK];
    let reply = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).into_owned();
                let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap();
                if raw.len() >= end + 4 + length {
                    let text = String::from_utf8_lossy(&raw[end + 4..end + 4 + length]);
                    return Ok((status, text.into_owned()));
                }
            }
            match reader.read(&mut buf).await {
                Ok(0) => {
                    return Err(format!(
                        "closed before a full response: {:?}",
                        String::from_utf8_lossy(&raw)
                    ))
                }
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) => return Err(format!("read failed after {} bytes: {e}", raw.len())),
            }
        }
    })
    .await
    .map_err(|_| "response timed out".to_owned())?;
    writing.abort();
    reply
}

type H2Sender = hyper::client::conn::http2::SendRequest<
    http_body_util::StreamBody<
        futures_util::stream::Iter<
            std::vec::IntoIter<
                Result<hyper::body::Frame<axum::body::Bytes>, std::convert::Infallible>,
            >,
        >,
    >,
>;

/// An HTTP/2 connection over TLS (ALPN `h2` only).
async fn h2_connect(addr: SocketAddr, connector: &TlsConnector) -> H2Sender {
    let tls = connect(addr, connector).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    sender
}

/// `POST /mutate` as one HTTP/2 stream on `sender`, the body sent as 64 KiB DATA frames.
async fn h2_post(
    sender: &mut H2Sender,
    port: u16,
    body: &[u8],
    length: Length,
) -> Result<(u16, String), String> {
    use http_body_util::BodyExt as _;
    let mut request = hyper::Request::post(format!("https://localhost:{port}/mutate"))
        .header("content-type", "application/json");
    if let Length::Declared = length {
        request = request.header("content-length", body.len());
    }
    let frames: Vec<_> = body
        .chunks(CHUNK)
        .map(|c| {
            Ok(hyper::body::Frame::data(
                axum::body::Bytes::copy_from_slice(c),
            ))
        })
        .collect();
    let request = request
        .body(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        sender
            .ready()
            .await
            .map_err(|e| format!("connection not ready: {e:?}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request failed: {e:?}"))?;
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("response body failed after status {status}: {e:?}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
    .await
    .map_err(|_| "response timed out".to_owned())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_gets_the_same_413_over_http_1_1_and_http_2() {
    let server = start(Limits::default()).await;
    let ca = server.ca.cert_pem();
    let h1 = default_client(ca);
    let h2 = client(&[ca], rustls::DEFAULT_VERSIONS, &[b"h2"]);
    let over = padded_review("over", MAX_BODY_BYTES + 1);
    let message = format!("AdmissionReview bodies are limited to {MAX_BODY_BYTES} bytes\n");
    let too_large = Ok((413, message));
    for length in [Length::Declared, Length::Streamed] {
        let reply = h1_post(server.addr, &h1, over.clone(), length).await;
        assert_eq!(reply, too_large, "HTTP/1.1 {length:?}");
        // HTTP/2 refuses the stream (RST_STREAM NO_ERROR after the complete 413), not the
        // connection: the next review on it is answered.
        let mut sender = h2_connect(server.addr, &h2).await;
        let reply = h2_post(&mut sender, server.addr.port(), &over, length).await;
        assert_eq!(reply, too_large, "HTTP/2 {length:?}");
        let small = annotated_review("after-413");
        let reply = h2_post(&mut sender, server.addr.port(), &small, length).await;
        assert_eq!(
            reply.map(|(status, _)| status),
            Ok(200),
            "HTTP/2 {length:?}, same connection"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_at_the_limit_is_answered_over_http_1_1_and_http_2() {
    let server = start(Limits::default()).await;
    let ca = server.ca.cert_pem();
    let h1 = default_client(ca);
    let h2 = client(&[ca], rustls::DEFAULT_VERSIONS, &[b"h2"]);
    let at = padded_review("at-the-limit", MAX_BODY_BYTES);
    for length in [Length::Declared, Length::Streamed] {
        for (protocol, reply) in [
            (
                "HTTP/1.1",
                h1_post(server.addr, &h1, at.clone(), length).await,
            ),
            (
                "HTTP/2",
                h2_post(
                    &mut h2_connect(server.addr, &h2).await,
                    server.addr.port(),
                    &at,
                    length,
                )
                .await,
            ),
        ] {
            let (status, body) = reply.unwrap_or_else(|e| panic!("{protocol} {length:?}: {e}"));
            assert_eq!(status, 200, "{protocol} {length:?}: {body}");
            let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(
                answer["response"]["uid"], "at-the-limit",
                "{protocol} {length:?}"
            );
            assert_eq!(answer["response"]["allowed"], true, "{protocol} {length:?}");
        }
    }
}
