//! A tiny second mutating webhook for reinvocation tests: HTTPS on loopback (HTTP/1.1 over
//! tokio-rustls, certificate from `wg-certs`), it adds a container named `late` to every Pod
//! that lacks one, so it mutates *after* the injector and makes the apiserver re-invoke it.
//!
//! It is test scaffolding only: no limits, no metrics; it never answers anything but
//! `AdmissionReview` v1.

use anyhow::Context as _;
use base64::Engine as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Name of the container the second webhook adds.
pub const LATE_CONTAINER: &str = "late";

/// The running second webhook; its accept loop stops when this drops.
#[derive(Debug)]
pub struct SecondWebhook {
    /// Its loopback port.
    pub port: u16,
    /// PEM of the CA that signed its certificate.
    pub ca_pem: String,
    /// How many `AdmissionReview`s it answered.
    pub calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SecondWebhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SecondWebhook {
    /// Start it on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let ca = wg_certs::generate_ca("wg-e2e second webhook CA", Duration::from_secs(86_400))?;
        let serving = wg_certs::issue_serving_cert(
            &ca,
            &["127.0.0.1".to_owned()],
            Duration::from_secs(86_400),
        )?;
        let resolver = Arc::new(wg_certs::ReloadingResolver::from_certified_key(
            serving.certified_key()?,
        )?);
        let tls = rustls::ServerConfig::builder_with_provider(wg_certs::crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = serve_connection(tls, &counter).await;
                    }
                });
            }
        });
        Ok(Self {
            port,
            ca_pem: ca.cert_pem().to_owned(),
            calls,
            task,
        })
    }

    /// `https://127.0.0.1:PORT/mutate`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/mutate", self.port)
    }
}

async fn serve_connection<S>(mut stream: S, calls: &AtomicUsize) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buffer = Vec::new();
    for _ in 0..10_000 {
        let header_end = loop {
            if let Some(pos) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
            let mut chunk = [0_u8; 8192];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buffer[..header_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .context("request without Content-Length")?;
        while buffer.len() < header_end + length {
            let mut chunk = [0_u8; 8192];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&chunk[..n]);
        }
        let body: Vec<u8> = buffer
            .drain(..header_end + length)
            .skip(header_end)
            .collect();
        calls.fetch_add(1, Ordering::SeqCst);
        let answer = serde_json::to_vec(&answer(&body)?)?;
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            answer.len()
        );
        stream.write_all(response.as_bytes()).await?;
        stream.write_all(&answer).await?;
        stream.flush().await?;
    }
    Ok(())
}

fn answer(body: &[u8]) -> anyhow::Result<serde_json::Value> {
    let review: serde_json::Value = serde_json::from_slice(body)?;
    let request = &review["request"];
    let has_late = request["object"]["spec"]["containers"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["name"] == LATE_CONTAINER));
    let mut response = serde_json::json!({ "uid": request["uid"], "allowed": true });
    if !has_late {
        let patch = serde_json::json!([{
            "op": "add",
            "path": "/spec/containers/-",
            "value": { "name": LATE_CONTAINER, "image": "example.invalid/late:1" },
        }]);
        response["patchType"] = "JSONPatch".into();
        response["patch"] = base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(&patch)?)
            .into();
    }
    Ok(serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}
