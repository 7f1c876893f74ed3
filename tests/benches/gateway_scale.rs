//! Gateway scale benchmark: `wg-sidecar gateway --pod-source kubernetes` (the release build)
//! against a real kube-apiserver + etcd and a real OpenBao dev server, with N Pods whose status
//! the benchmark writes as a kubelet would (there is no kubelet), and their records written to
//! Vault as their sidecars would.
//!
//! Measures (targets of the scale issue in brackets, reported, never asserted):
//! 1. initial sync [≤ 5 s]: N Pods and records exist, the gateway starts; time from its process
//!    start to `wg_gateway_peers` = N and to `/ready` 200;
//! 2. change latency at `--rate` Pod starts per second for `--change-secs` [p99 ≤ 1 s]: from the
//!    status patch (sidecar running) to the gateway's "peer admitted" log line for the Pod's UID
//!    and to the apply after it (the peer on the interface), beside the floor (when a watch of
//!    the same Pods in this process saw the status); then `--deletes` Pod deletions at the same
//!    rate, to the "peer removed" line;
//! 3. Vault reads per Pod start [≤ 1.1]: `wg_gateway_vault_reads_total` over the change phase;
//! 4. gateway RSS per peer [≤ 16 KiB]: `VmRSS` with no Pods and with N peers.
//!
//! Everything runs in a network namespace the benchmark makes (`wgb15-<pid>`) and deletes at the
//! end: the program re-executes itself inside it, so the apiserver, etcd, OpenBao and the gateway
//! (userspace WireGuard) share its loopback and nothing touches the host's network. Processes
//! are ended by PID only. A state not reached within its timeout is an error saying what was
//! seen. Root only.
//!
//! Run: `cargo build --release -p wg-sidecar && cargo bench -p wg-e2e --bench gateway_scale`
//! (`-- --pods 1000` for a quick run; `-- --help` for every flag).
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::too_many_lines,
    missing_docs
)]

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    io::{Read as _, Seek as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _};
use clap::Parser as _;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use tokio::{sync::Semaphore, task::JoinSet};
use wg_e2e::{control_plane::ControlPlane, openbao::OpenBao, process::ChildGuard};
use wg_sidecar::{
    keys::{generate_keypair, PeerRecord},
    registration::{Claim, PodIdentity},
    vault::{Vault, VaultAuth, VaultSettings},
};

const GATEWAY: &str = "corp";
const POOL: &str = "10.128.0.0/14";
const NAMESPACE: &str = "bench";
const SERVICE_ACCOUNT: &str = "web";
const KV_MOUNT: &str = "secret";

/// Flags (`cargo bench` adds `--bench`, accepted and ignored).
#[derive(Debug, Clone, clap::Parser)]
#[command(about = "Gateway scale benchmark (kubernetes pod source); root only")]
struct Args {
    /// Pods (and peers) in place before the gateway starts.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Pod starts per second in the change phase.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Length of the change phase in seconds.
    #[arg(long, default_value_t = 20)]
    change_secs: u32,
    /// Pods deleted (at `--rate` per second) after the change phase.
    #[arg(long, default_value_t = 100)]
    deletes: usize,
    /// Requests in flight while the initial Pods are created.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// The gateway binary (default: `$CARGO_TARGET_DIR/release/wg-sidecar`).
    #[arg(long)]
    sidecar_bin: Option<PathBuf>,
    /// Also write the figures table (markdown) to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Copy the gateways' logs (JSON) into this folder at the end.
    #[arg(long)]
    keep_logs: Option<PathBuf>,
    /// Internal: set when the program runs inside its network namespace.
    #[arg(long, hide = true)]
    in_netns: bool,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.in_netns {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        return runtime.block_on(inner(args));
    }
    let uid = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|v| v.split_whitespace().next() == Some("0"))
        });
    if uid != Some(true) {
        bail!("the gateway scale benchmark must run as root (network namespace, TUN device)");
    }
    let netns = Netns::create(&format!("wgb15-{}", std::process::id()))?;
    let mut inner = Command::new("ip");
    inner
        .args(["netns", "exec", &netns.0])
        .arg(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .arg("--in-netns");
    let status = inner
        .status()
        .context("failed to run the benchmark in its namespace")?;
    drop(netns);
    if !status.success() {
        bail!("the benchmark failed ({status})");
    }
    Ok(())
}

/// A network namespace with loopback up, deleted on drop.
struct Netns(String);

impl Netns {
    fn create(name: &str) -> anyhow::Result<Self> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self(name.to_owned());
        run(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
        println!("network namespace {} deleted", self.0);
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One bench Pod: its name and UID.
#[derive(Debug, Clone)]
struct BenchPod {
    name: String,
    uid: String,
}

/// What one Pod start took, on the wall clock (the gateway's log timestamps are wall clock).
#[derive(Debug, Clone)]
struct Started {
    pod: BenchPod,
    /// When the status patch (sidecar running) returned.
    patched: SystemTime,
    /// Create + claim + record + patch.
    took: Duration,
    /// The status patch alone.
    patch_took: Duration,
}

/// The shared pieces every Pod start uses.
struct Cluster {
    pods: Api<Pod>,
    vault: Vault,
}

fn pod_address(index: usize) -> Ipv4Addr {
    // 10.128.0.0 is the network, 10.128.0.1 the gateway: peers from 10.128.0.2 on.
    let base = u32::from(Ipv4Addr::new(10, 128, 0, 2));
    Ipv4Addr::from(base + u32::try_from(index).unwrap_or(u32::MAX))
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

impl Cluster {
    /// Starts Pod `index` as the system would: the Pod is created (the injector's label, a node
    /// so nothing schedules it), its sidecar claims the address and publishes the record, and
    /// the kubelet reports the sidecar container running.
    async fn start_pod(&self, index: usize) -> anyhow::Result<Started> {
        let t0 = Instant::now();
        let name = format!("bench-{index}");
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "labels": {"wg-injector.io/tunnel": GATEWAY, "app": "bench"},
                // What the injector writes: without it the gateway refuses the Pod (not_injected).
                "annotations": {"wg-injector.io/status": "{\"version\":\"bench\"}"},
            },
            "spec": {
                "nodeName": "bench-node",
                "serviceAccountName": SERVICE_ACCOUNT,
                "containers": [
                    {"name": "wg-sidecar", "image": "wg-sidecar:bench"},
                    {"name": "app", "image": "registry.k8s.io/pause:3.10"},
                ],
            },
        }))?;
        let created = self
            .pods
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("failed to create Pod {name}"))?;
        let uid = created
            .metadata
            .uid
            .with_context(|| format!("Pod {name} came back without a UID"))?;
        let address = pod_address(index);
        let identity = PodIdentity::new(NAMESPACE, SERVICE_ACCOUNT, &name, &uid)?;
        let claim = Claim {
            address: address.into(),
            pod: identity.clone(),
        };
        let claim_path = format!("wg/addresses/{GATEWAY}/{address}");
        self.vault
            .write(KV_MOUNT, &claim_path, &claim.to_fields(), Some(0))
            .await
            .with_context(|| format!("failed to write the claim {claim_path}"))?;
        let (psk, _) = generate_keypair(); // 32 random bytes in base64: a valid preshared key
        let record = PeerRecord {
            public_key: generate_keypair().1,
            addresses: vec![format!("{address}/32").parse()?],
            next_public_key: None,
            activate_at: None,
            rotates_at: None,
            preshared_key: Some(psk),
            pod: Some(identity),
            version: 0,
        };
        let record_path = format!("wg/peers/{GATEWAY}/{NAMESPACE}/{SERVICE_ACCOUNT}/{uid}");
        self.vault
            .write(KV_MOUNT, &record_path, &record.to_fields(), None)
            .await
            .with_context(|| format!("failed to write the record {record_path}"))?;
        let now = now_rfc3339();
        let container_id = format!("containerd://{0}{0}", uid.replace('-', ""));
        let running = |c: &str, id: &str| {
            serde_json::json!({
                "name": c, "image": format!("{c}:bench"), "imageID": format!("sha256:{}", "0".repeat(64)),
                "containerID": id, "ready": true, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            })
        };
        let condition =
            |t: &str| serde_json::json!({"type": t, "status": "True", "lastTransitionTime": now});
        let status = serde_json::json!({"status": {
            "phase": "Running",
            "startTime": now,
            "conditions": [condition("PodScheduled"), condition("Initialized"),
                           condition("ContainersReady"), condition("Ready")],
            "containerStatuses": [running("wg-sidecar", &container_id),
                                  running("app", &format!("containerd://{}", "a".repeat(64)))],
        }});
        let p0 = Instant::now();
        self.pods
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .with_context(|| format!("failed to patch the status of Pod {name}"))?;
        Ok(Started {
            pod: BenchPod { name, uid },
            patched: SystemTime::now(),
            took: t0.elapsed(),
            patch_took: p0.elapsed(),
        })
    }

    /// Deletes a Pod at once (grace period 0: there is no kubelet to confirm a graceful end);
    /// returns when the apiserver has removed it.
    async fn delete_pod(&self, name: &str) -> anyhow::Result<SystemTime> {
        self.pods
            .delete(
                name,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                },
            )
            .await
            .with_context(|| format!("failed to delete Pod {name}"))?;
        Ok(SystemTime::now())
    }
}

/// When the benchmark's own watch (same selector as the gateway's, same apiserver) first saw
/// each Pod's sidecar running, and each Pod deleted: the floor under the gateway's latency.
#[derive(Default)]
struct Seen {
    synced: bool,
    running: HashMap<String, SystemTime>,
    deleted: HashMap<String, SystemTime>,
}

fn sidecar_running(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.name == "wg-sidecar"
                    && c.state.as_ref().is_some_and(|s| s.running.is_some())
                    && c.container_id.as_deref().is_some_and(|id| !id.is_empty())
            })
        })
}

/// A task aborted when this drops: the floor watch must end before the apiserver does (a
/// watch that cannot connect would otherwise keep the runtime from shutting down).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the floor watch; returns once it has listed the Pods.
async fn watch_floor(
    client: kube::Client,
) -> anyhow::Result<(Arc<std::sync::Mutex<Seen>>, AbortOnDrop)> {
    use futures_util::StreamExt as _;
    use kube::runtime::{watcher, WatchStreamExt as _};
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let api: Api<Pod> = Api::namespaced(client, NAMESPACE);
    let cfg = watcher::Config::default().labels(&format!("wg-injector.io/tunnel={GATEWAY}"));
    let out = Arc::clone(&seen);
    let task = AbortOnDrop(tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher(api, cfg).default_backoff());
        while let Some(ev) = events.next().await {
            let now = SystemTime::now();
            let Ok(mut s) = out.lock() else { return };
            match ev {
                Ok(watcher::Event::Apply(p)) if sidecar_running(&p) => {
                    if let Some(uid) = p.metadata.uid {
                        s.running.entry(uid).or_insert(now);
                    }
                }
                Ok(watcher::Event::Delete(p)) => {
                    if let Some(uid) = p.metadata.uid {
                        s.deleted.entry(uid).or_insert(now);
                    }
                }
                Ok(watcher::Event::InitDone) => s.synced = true,
                _ => {}
            }
        }
    }));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !seen.lock().is_ok_and(|s| s.synced) {
        if Instant::now() > deadline {
            bail!("the benchmark's own Pod watch did not list the Pods within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((seen, task))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Creates Pods `from..to` with `concurrency` starts in flight, printing progress.
async fn create_pods(
    cluster: &Arc<Cluster>,
    from: usize,
    to: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Started>> {
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let t0 = Instant::now();
    let mut out = Vec::with_capacity(to - from);
    let mut next = from;
    while next < to || !tasks.is_empty() {
        while next < to && gate.available_permits() > 0 {
            let permit = Arc::clone(&gate).acquire_owned().await?;
            let c = Arc::clone(cluster);
            let i = next;
            tasks.spawn(async move {
                let r = c.start_pod(i).await;
                drop(permit);
                r
            });
            next += 1;
        }
        if let Some(r) = tasks.join_next().await {
            out.push(r??);
            let done = out.len();
            if done % 1000 == 0 || done == to - from {
                let secs = t0.elapsed().as_secs_f64();
                println!(
                    "  {done}/{} Pods started ({secs:.1} s, {:.0} Pods/s)",
                    to - from,
                    done as f64 / secs
                );
            }
        }
    }
    Ok(out)
}

/// `wg-sidecar gateway` as a child process, its JSON log followed from the log file.
struct GatewayProcess {
    child: ChildGuard,
    started: Instant,
    /// The wall-clock time of the spawn (the log's timestamps are wall clock).
    started_wall: SystemTime,
    health: String,
    log_path: PathBuf,
    log_offset: u64,
    partial: String,
    /// UID → wall-clock time of its first "admitted" / "removed" line.
    admitted: HashMap<String, SystemTime>,
    removed: HashMap<String, SystemTime>,
    /// UID → time of the first "peer table reconciled" line after its "admitted" line: when
    /// the peer is on the interface (the gateway logs the index's changes, then applies them).
    applied: HashMap<String, SystemTime>,
    /// UIDs admitted and not yet applied.
    pending: Vec<String>,
    /// "peer table reconciled" lines: (time, peers on the interface after it).
    reconciled: Vec<(SystemTime, u64)>,
    /// The "initial sync complete" line: (time, its `seconds` field).
    sync_complete: Option<(SystemTime, f64)>,
    /// Every log line with a level of WARN or ERROR (shown when something goes wrong).
    warnings: Vec<String>,
    /// Messages seen, with a count (what the gateway said, for a failure report).
    messages: BTreeMap<String, usize>,
}

/// The gateway's log lines the benchmark follows (sidecar/src/gateway.rs): per Pod (field
/// `uid`) "peer admitted" and "peer removed", logged as the index's change is applied; per
/// apply "peer table reconciled" (field `peers`); once "initial sync complete" (`seconds`).
const ADMITTED_MESSAGE: &str = "peer admitted";
const REMOVED_MESSAGE: &str = "peer removed";
const RECONCILED_MESSAGE: &str = "peer table reconciled";
const SYNC_MESSAGE: &str = "initial sync complete";

impl GatewayProcess {
    fn start(
        bin: &Path,
        dir: &Path,
        label: &str,
        kubeconfig: &Path,
        vault_addr: &str,
        token_file: &Path,
    ) -> anyhow::Result<Self> {
        let port = wg_e2e::lab::free_port()?;
        let health = format!("127.0.0.1:{port}");
        let interface = format!("wgb{}{label}", std::process::id() % 100_000);
        let mut cmd = Command::new(bin);
        cmd.args([
            "--log-format",
            "json",
            "gateway",
            "--pod-source",
            "kubernetes",
        ])
        .args(["--profile", GATEWAY])
        .args(["--vault-gateway-path", &format!("wg/gateways/{GATEWAY}")])
        .args(["--interface", &interface, "--listen-port", "51820"])
        .args(["--health-addr", &health, "--shutdown-delay", "0"])
        .args(["--vault-addr", vault_addr, "--vault-auth", "token"])
        .arg("--vault-token-file")
        .arg(token_file)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_BACKTRACE", "1");
        let name = format!("gateway-{label}");
        let started_wall = SystemTime::now();
        let started = Instant::now();
        let child = ChildGuard::spawn(&name, cmd, dir)?;
        println!(
            "gateway {label} started: pid {}, /metrics on {health}",
            child.pid()
        );
        Ok(Self {
            child,
            started,
            started_wall,
            health,
            log_path: dir.join(format!("{name}.log")),
            log_offset: 0,
            partial: String::new(),
            admitted: HashMap::new(),
            removed: HashMap::new(),
            applied: HashMap::new(),
            pending: Vec::new(),
            reconciled: Vec::new(),
            sync_complete: None,
            warnings: Vec::new(),
            messages: BTreeMap::new(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Reads the log lines written since the last call.
    fn follow_log(&mut self) -> anyhow::Result<()> {
        let mut f = std::fs::File::open(&self.log_path)?;
        f.seek(std::io::SeekFrom::Start(self.log_offset))?;
        let mut buf = String::new();
        let n = f.read_to_string(&mut buf)?;
        self.log_offset += n as u64;
        self.partial.push_str(&buf);
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            self.take_line(line.trim_end());
        }
        Ok(())
    }

    fn take_line(&mut self, line: &str) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            if !line.is_empty() {
                self.warnings.push(line.to_owned());
            }
            return;
        };
        let message = v["fields"]["message"].as_str().unwrap_or_default();
        *self.messages.entry(message.to_owned()).or_default() += 1;
        if matches!(v["level"].as_str(), Some("WARN" | "ERROR")) {
            self.warnings.push(line.to_owned());
        }
        let Some(ts) = v["timestamp"]
            .as_str()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(SystemTime::from)
        else {
            return;
        };
        let fields = &v["fields"];
        let table = match message {
            ADMITTED_MESSAGE => &mut self.admitted,
            REMOVED_MESSAGE => &mut self.removed,
            RECONCILED_MESSAGE => {
                if let Some(p) = fields["peers"].as_u64() {
                    self.reconciled.push((ts, p));
                }
                for uid in self.pending.drain(..) {
                    self.applied.entry(uid).or_insert(ts);
                }
                return;
            }
            SYNC_MESSAGE => {
                self.sync_complete = Some((ts, fields["seconds"].as_f64().unwrap_or(f64::NAN)));
                return;
            }
            _ => return,
        };
        if let Some(uid) = fields["uid"].as_str() {
            if message == ADMITTED_MESSAGE && !table.contains_key(uid) {
                self.pending.push(uid.to_owned());
            }
            table.entry(uid.to_owned()).or_insert(ts);
        }
    }

    /// Seconds from the spawn to `t`.
    fn since_start(&self, t: SystemTime) -> f64 {
        ms_between(self.started_wall, t) / 1000.0
    }

    /// What the gateway said, for an error: message counts, warnings, the log's end.
    fn report(&self) -> String {
        let mut s = String::from("gateway log messages (count):\n");
        for (m, n) in &self.messages {
            let _ = writeln!(s, "  {n:>6}  {m}");
        }
        if !self.warnings.is_empty() {
            s.push_str("last warnings:\n");
            for w in self.warnings.iter().rev().take(10).rev() {
                let _ = writeln!(s, "  {w}");
            }
        }
        s.push_str(&self.child.log_tail(3000));
        s
    }

    fn alive(&mut self) -> anyhow::Result<()> {
        if !self.child.is_running() {
            bail!("the gateway exited\n{}", self.report());
        }
        Ok(())
    }

    /// Ends the gateway with SIGTERM (its clean shutdown), SIGKILL after 5 s.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.stop();
    }
}

/// GET `http://addr/path` with a plain HTTP/1.1 exchange: (status, body).
async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .with_context(|| format!("GET {addr}{path} timed out"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET {addr}{path}: no HTTP status in {head:?}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The sum of every series of `name` (exact metric name, any labels) in a Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ')?;
        let base = series.split('{').next().unwrap_or(series);
        if base == name {
            let v: f64 = value.parse().ok()?;
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// Every series of `name` by the value of its label `label`.
fn by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let key = format!("{label}=\"");
    for line in text.lines().filter(|l| l.starts_with(name)) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some((base, labels)) = series.split_once('{') else {
            continue;
        };
        let (Some(start), Ok(v)) = (labels.find(&key), value.parse::<f64>()) else {
            continue;
        };
        if base != name {
            continue;
        }
        let rest = &labels[start + key.len()..];
        let val = rest.split('"').next().unwrap_or_default().to_owned();
        *out.entry(val).or_insert(0.0) += v;
    }
    out
}

/// The counter the gateway exports for its KV reads.
const VAULT_READS: &str = "wg_gateway_vault_reads_total";

fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// CPU seconds (user + system) of `pid`.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = &stat[stat.rfind(')').context("bad /proc/PID/stat")? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

/// Milliseconds from `from` to `to` (negative when the gateway's line came first).
fn ms_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Latencies {
    p50: f64,
    p99: f64,
    max: f64,
    n: usize,
}

fn latencies(mut ms: Vec<f64>) -> Latencies {
    ms.sort_by(f64::total_cmp);
    Latencies {
        p50: percentile(&ms, 50.0),
        p99: percentile(&ms, 99.0),
        max: ms.last().copied().unwrap_or(f64::NAN),
        n: ms.len(),
    }
}

/// How often `/metrics` is scraped while waiting: with N peers the text holds two series per
/// peer (megabytes at 10 000), and `wg_gateway_peers` only changes at the 1 s statistics tick.
const METRICS_POLL: Duration = Duration::from_millis(250);

/// Polls `/metrics` and the log until `done(metrics text)` holds, at most `timeout`.
async fn wait_metrics(
    gw: &mut GatewayProcess,
    timeout: Duration,
    what: &str,
    mut done: impl FnMut(&str) -> bool,
) -> anyhow::Result<(Duration, String)> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("(no answer yet)");
    loop {
        gw.alive()?;
        gw.follow_log()?;
        if let Ok((200, text)) = http_get(&gw.health, "/metrics").await {
            if done(&text) {
                return Ok((gw.started.elapsed(), text));
            }
            last = text;
        }
        if Instant::now() > deadline {
            let seen: Vec<&str> = last
                .lines()
                .filter(|l| l.starts_with("wg_gateway_") && !l.contains('{'))
                .collect();
            bail!(
                "{what}: not reached within {timeout:?}; last metrics:\n  {}\n{}",
                seen.join("\n  "),
                gw.report()
            );
        }
        tokio::time::sleep(METRICS_POLL).await;
    }
}

/// The initial sync as seen from outside: process start → `/ready` 200 (polled every 20 ms)
/// and → `wg_gateway_peers` = `n` (polled every [`METRICS_POLL`]).
async fn initial_sync(
    gw: &mut GatewayProcess,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<(Duration, Duration, String)> {
    let deadline = Instant::now() + timeout;
    let (mut ready, mut peers, mut text) = (None, None, String::new());
    let mut next_scrape = Instant::now();
    let mut last_ready = String::from("no answer");
    loop {
        gw.alive()?;
        if ready.is_none() {
            match http_get(&gw.health, "/ready").await {
                Ok((200, _)) => ready = Some(gw.started.elapsed()),
                Ok((code, body)) => last_ready = format!("{code} {}", body.trim()),
                Err(e) => last_ready = e.to_string(),
            }
        }
        if peers.is_none() && Instant::now() >= next_scrape {
            next_scrape = Instant::now() + METRICS_POLL;
            if let Ok((200, t)) = http_get(&gw.health, "/metrics").await {
                if metric(&t, "wg_gateway_peers") == Some(n as f64) {
                    peers = Some(gw.started.elapsed());
                }
                text = t;
            }
        }
        if let (Some(r), Some(p)) = (ready, peers) {
            gw.follow_log()?;
            return Ok((p, r, text));
        }
        if Instant::now() > deadline {
            gw.follow_log()?;
            let seen: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("wg_gateway_") && !l.contains('{'))
                .collect();
            bail!(
                "initial sync of {n} Pods not done within {timeout:?}: /ready {}, last /ready answer {last_ready}; \
                 last metrics:\n  {}\n{}",
                if ready.is_some() { "200" } else { "never 200" },
                seen.join("\n  "),
                gw.report()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_ready(gw: &mut GatewayProcess, timeout: Duration) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + timeout;
    loop {
        gw.alive()?;
        let last = match http_get(&gw.health, "/ready").await {
            Ok((200, _)) => return Ok(gw.started.elapsed()),
            Ok((code, body)) => format!("{code} {}", body.trim()),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            gw.follow_log()?;
            bail!(
                "/ready not 200 within {timeout:?}: last answer {last}\n{}",
                gw.report()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the log has a line in `table` (admitted or removed) for every UID of `uids`.
async fn wait_log(
    gw: &mut GatewayProcess,
    uids: &[String],
    removed: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        gw.alive()?;
        gw.follow_log()?;
        let table = if removed { &gw.removed } else { &gw.admitted };
        let missing: Vec<&String> = uids.iter().filter(|u| !table.contains_key(*u)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let what = if removed {
                REMOVED_MESSAGE
            } else {
                ADMITTED_MESSAGE
            };
            bail!(
                "{} of {} Pods have no {what:?} log line after {timeout:?} (first: {:?})\n{}",
                missing.len(),
                uids.len(),
                missing.iter().take(5).collect::<Vec<_>>(),
                gw.report()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Default)]
struct Figures {
    rows: Vec<(String, String, String, String)>,
    notes: Vec<String>,
}

impl Figures {
    fn row(&mut self, figure: &str, measured: String, target: &str, met: Option<bool>) {
        let met = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        println!("  {figure}: {measured}");
        self.rows.push((
            figure.to_owned(),
            measured,
            target.to_owned(),
            met.to_owned(),
        ));
    }

    fn markdown(&self) -> String {
        let mut s = String::from("| figure | measured | target | met |\n|---|---|---|---|\n");
        for (f, m, t, ok) in &self.rows {
            let _ = writeln!(s, "| {f} | {m} | {t} | {ok} |");
        }
        for n in &self.notes {
            let _ = writeln!(s, "\n{n}");
        }
        s
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

async fn inner(args: Args) -> anyhow::Result<()> {
    let bench_start = Instant::now();
    let load_start = loadavg();
    let bin = match &args.sidecar_bin {
        Some(p) => p.clone(),
        None => wg_e2e::lab::cargo_release_binary("wg-sidecar")?,
    };
    let n = args.pods;
    let changes = usize::try_from(args.rate * args.change_secs)?;
    if args.deletes > changes + n {
        bail!("--deletes {} is more than the Pods there are", args.deletes);
    }
    println!(
        "gateway scale: {n} Pods, then {} starts/s for {} s, then {} deletions; gateway {}",
        args.rate,
        args.change_secs,
        args.deletes,
        bin.display()
    );

    // The control plane, Vault, the gateway's records.
    let plane = ControlPlane::start().await?;
    let bao = tokio::task::spawn_blocking(OpenBao::start).await??;
    let token_file = bao.admin_token_file()?;
    let kubeconfig = plane.admin_kubeconfig()?;
    let client = plane.admin_client().await?;
    run(Command::new(&bin)
        .args(["keys", "provision-gateway", GATEWAY])
        .args(["--endpoints", "127.0.0.1:51820", "--pool", POOL])
        .args(["--vault-addr", &bao.addr, "--vault-auth", "token"])
        .arg("--vault-token-file")
        .arg(&token_file))
    .context("keys provision-gateway failed")?;
    plane.create_namespace(NAMESPACE, &[]).await?;
    let sa: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": SERVICE_ACCOUNT}}))?;
    Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &sa)
        .await?;
    let vault = Vault::new(VaultSettings {
        addr: bao.addr.clone(),
        ca_file: None,
        auth: VaultAuth::Token {
            file: token_file.clone(),
        },
    })?;
    vault.login().await?;
    let cluster = Arc::new(Cluster {
        pods: Api::namespaced(client.clone(), NAMESPACE),
        vault,
    });
    let work = plane.dir().to_owned();
    let start_gateway = |label: &str| {
        GatewayProcess::start(&bin, &work, label, &kubeconfig, &bao.addr, &token_file)
    };
    let mut fig = Figures::default();
    println!("setup: {:.1} s", bench_start.elapsed().as_secs_f64());

    // 4a. RSS with no Pods.
    let mut idle = start_gateway("a")?;
    wait_ready(&mut idle, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss0 = proc_status_kib(idle.pid(), "VmRSS:")?;
    let hwm0 = proc_status_kib(idle.pid(), "VmHWM:")?;
    idle.stop();
    println!(
        "gateway with no Pods: VmRSS {} (VmHWM {})",
        mib(rss0),
        mib(hwm0)
    );

    // The N Pods and their records, before the gateway starts.
    println!("creating {n} Pods ({} in flight)", args.concurrency);
    let creating = Instant::now();
    let pods = create_pods(&cluster, 0, n, args.concurrency).await?;
    let create_secs = creating.elapsed().as_secs_f64();
    fig.notes.push(format!(
        "Creating the {n} Pods (Pod, claim, record, status patch; {} in flight) took {create_secs:.0} s ({:.0} Pods/s).",
        args.concurrency,
        n as f64 / create_secs
    ));

    // 1. Initial sync.
    let mut gw = start_gateway("b")?;
    let cpu_at_start = cpu_secs(gw.pid()).unwrap_or(0.0);
    let (to_peers, to_ready, text) = initial_sync(&mut gw, n, Duration::from_secs(300)).await?;
    let cpu_sync = cpu_secs(gw.pid())? - cpu_at_start;
    let sync_metric = metric(&text, "wg_gateway_sync_duration_seconds");
    let admitted_at_sync = gw.admitted.len();
    let table_full = gw
        .reconciled
        .iter()
        .find(|(_, p)| *p as usize >= n)
        .map(|(t, _)| gw.since_start(*t));
    let applies = gw.reconciled.len();
    println!("initial sync:");
    fig.row(
        "initial sync: process start → `wg_gateway_peers` = N (scraped every 250 ms)",
        format!("{:.2} s", to_peers.as_secs_f64()),
        "≤ 5 s",
        Some(to_peers <= Duration::from_secs(5)),
    );
    fig.row(
        "initial sync: process start → `/ready` 200",
        format!("{:.2} s", to_ready.as_secs_f64()),
        "≤ 5 s",
        Some(to_ready <= Duration::from_secs(5)),
    );
    fig.row(
        "initial sync: process start → N peers on the interface (log)",
        table_full.map_or_else(|| "not logged".to_owned(), |s| format!("{s:.2} s")),
        "",
        None,
    );
    fig.row(
        "initial sync: `wg_gateway_sync_duration_seconds`",
        sync_metric.map_or_else(|| "not exported".to_owned(), |s| format!("{s:.2} s")),
        "",
        None,
    );
    fig.row(
        "initial sync: gateway CPU (user + system) until ready",
        format!("{cpu_sync:.2} s"),
        "",
        None,
    );
    fig.notes.push(format!(
        "Initial sync: the gateway applied the table {applies} times on the way to {n} peers and \
         logged {admitted_at_sync} \"{ADMITTED_MESSAGE}\" lines; `wg_gateway_peers` is refreshed \
         by the gateway's 1 s statistics tick, so it trails the interface by up to a second.{}",
        gw.sync_complete.map_or_else(String::new, |(t, secs)| format!(
            " \"{SYNC_MESSAGE}\" was logged {:.2} s after the process start (its own clock: {secs:.2} s).",
            gw.since_start(t)
        ))
    ));

    // The floor watch lists the N Pods now, so the change phase sees only its events.
    let (seen, floor_watch) = watch_floor(client.clone()).await?;
    // 4b. RSS with N peers (after the sync settles).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_n = proc_status_kib(gw.pid(), "VmRSS:")?;
    let hwm_n = proc_status_kib(gw.pid(), "VmHWM:")?;

    // 2 + 3. Change phase: Pod starts at `rate`/s.
    let (_, metrics_before) =
        wait_metrics(&mut gw, Duration::from_secs(5), "metrics", |_| true).await?;
    let reads_before = metric(&metrics_before, VAULT_READS);
    let cpu_before = cpu_secs(gw.pid())?;
    let load_change = loadavg();
    println!(
        "change phase: {changes} Pod starts at {}/s (load average {load_change})",
        args.rate
    );
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let phase_start = tokio::time::Instant::now();
    let mut tasks = JoinSet::new();
    for k in 0..changes {
        tokio::time::sleep_until(phase_start + interval * u32::try_from(k)?).await;
        let c = Arc::clone(&cluster);
        tasks.spawn(async move { c.start_pod(n + k).await });
        if k % 200 == 0 {
            gw.follow_log()?;
        }
    }
    let schedule_secs = phase_start.elapsed().as_secs_f64();
    let mut started = Vec::with_capacity(changes);
    while let Some(r) = tasks.join_next().await {
        started.push(r??);
    }
    let starts_secs = phase_start.elapsed().as_secs_f64();
    let uids: Vec<String> = started.iter().map(|s| s.pod.uid.clone()).collect();
    wait_log(&mut gw, &uids, false, Duration::from_secs(120)).await?;
    // Let retries and follow-ups land before the counter is read.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_change = cpu_secs(gw.pid())? - cpu_before;
    let change_wall = phase_start.elapsed().as_secs_f64();
    let (_, metrics_after) = wait_metrics(
        &mut gw,
        Duration::from_secs(30),
        "wg_gateway_peers = N + starts",
        |m| metric(m, "wg_gateway_peers") == Some((n + changes) as f64),
    )
    .await?;
    let reads_after = metric(&metrics_after, VAULT_READS);
    let admit_ms: Vec<f64> = started
        .iter()
        .map(|s| ms_between(s.patched, gw.admitted[&s.pod.uid]))
        .collect();
    let admit = latencies(admit_ms);
    let on_interface = latencies(
        started
            .iter()
            .filter_map(|s| {
                gw.applied
                    .get(&s.pod.uid)
                    .map(|t| ms_between(s.patched, *t))
            })
            .collect(),
    );
    let floor = {
        let seen = seen
            .lock()
            .map_err(|_| anyhow::anyhow!("floor watch poisoned"))?;
        latencies(
            started
                .iter()
                .filter_map(|s| {
                    seen.running
                        .get(&s.pod.uid)
                        .map(|t| ms_between(s.patched, *t))
                })
                .collect(),
        )
    };
    let op = latencies(
        started
            .iter()
            .map(|s| s.took.as_secs_f64() * 1000.0)
            .collect(),
    );
    let patch = latencies(
        started
            .iter()
            .map(|s| s.patch_took.as_secs_f64() * 1000.0)
            .collect(),
    );
    println!("change phase:");
    fig.row(
        &format!(
            "Pod start → admitted, {} starts/s for {} s: p50 / p99 / max",
            args.rate, args.change_secs
        ),
        format!(
            "{:.0} / {:.0} / {:.0} ms (n = {})",
            admit.p50, admit.p99, admit.max, admit.n
        ),
        "p99 ≤ 1 s",
        Some(admit.p99 <= 1000.0),
    );
    fig.row(
        "… Pod start → on the interface (the apply after the admitted line): p50 / p99 / max",
        format!(
            "{:.0} / {:.0} / {:.0} ms (n = {})",
            on_interface.p50, on_interface.p99, on_interface.max, on_interface.n
        ),
        "",
        None,
    );
    fig.row(
        "… floor: status patch → the benchmark's own watch sees it: p50 / p99 / max",
        format!(
            "{:.0} / {:.0} / {:.0} ms (n = {})",
            floor.p50, floor.p99, floor.max, floor.n
        ),
        "",
        None,
    );
    fig.notes.push(format!(
        "Change phase: {changes} starts scheduled over {schedule_secs:.1} s, all done after {starts_secs:.1} s \
         (achieved {:.0}/s). One start (create Pod, claim, record, status patch) took p50 {:.0} ms, \
         p99 {:.0} ms; the status patch alone p50 {:.0} ms, p99 {:.0} ms. Latency runs from the status \
         patch's response to the timestamp of the gateway's \"{ADMITTED_MESSAGE}\" log line for the \
         Pod's UID; the floor is when a watch of the same Pods in the benchmark process saw the \
         status (apiserver and watch delivery, on the same loaded machine), and the gateway reads \
         a record 250 ms after it sees the sidecar running (`pod_index::FIRST_READ_DELAY`). \
         Gateway CPU over the phase: {cpu_change:.1} s in {change_wall:.0} s ({:.0} % of one core); \
         load average at its start: {load_change}.",
        changes as f64 / starts_secs,
        op.p50,
        op.p99,
        patch.p50,
        patch.p99,
        cpu_change / change_wall * 100.0
    ));
    match (reads_before, reads_after) {
        (Some(before), Some(after)) => {
            let reads = after - before;
            let per = reads / changes as f64;
            fig.row(
                "Vault reads per Pod start (`wg_gateway_vault_reads_total` delta / starts)",
                format!("{per:.2} ({reads:.0} reads / {changes} starts)"),
                "≤ 1.1",
                Some(per <= 1.1),
            );
            let by_kind: Vec<String> = by_label(&metrics_after, VAULT_READS, "kind")
                .into_iter()
                .map(|(kind, v)| {
                    let was = by_label(&metrics_before, VAULT_READS, "kind")
                        .get(&kind)
                        .copied()
                        .unwrap_or(0.0);
                    format!("{kind} {:.0}", v - was)
                })
                .collect();
            fig.notes.push(format!(
                "Vault reads over the change phase by kind: {}.",
                by_kind.join(", ")
            ));
        }
        _ => fig.row(
            "Vault reads per Pod start",
            format!("`{VAULT_READS}` not exported"),
            "≤ 1.1",
            None,
        ),
    }

    // Removals: `--deletes` Pods of the change phase, at the same rate.
    println!(
        "removals: {} Pod deletions at {}/s",
        args.deletes, args.rate
    );
    let victims: Vec<BenchPod> = started
        .iter()
        .map(|s| s.pod.clone())
        .chain(pods.iter().map(|s| s.pod.clone()))
        .take(args.deletes)
        .collect();
    let phase_start = tokio::time::Instant::now();
    let mut tasks = JoinSet::new();
    for (k, p) in victims.iter().enumerate() {
        tokio::time::sleep_until(phase_start + interval * u32::try_from(k)?).await;
        let c = Arc::clone(&cluster);
        let (name, uid) = (p.name.clone(), p.uid.clone());
        tasks.spawn(async move { c.delete_pod(&name).await.map(|t| (uid, t)) });
    }
    let mut deleted = Vec::new();
    while let Some(r) = tasks.join_next().await {
        deleted.push(r??);
    }
    let uids: Vec<String> = deleted.iter().map(|d| d.0.clone()).collect();
    wait_log(&mut gw, &uids, true, Duration::from_secs(60)).await?;
    let rm = latencies(
        deleted
            .iter()
            .map(|(uid, t)| ms_between(*t, gw.removed[uid]))
            .collect(),
    );
    let rm_floor = {
        let seen = seen
            .lock()
            .map_err(|_| anyhow::anyhow!("floor watch poisoned"))?;
        latencies(
            deleted
                .iter()
                .filter_map(|(uid, t)| seen.deleted.get(uid).map(|s| ms_between(*t, *s)))
                .collect(),
        )
    };
    fig.row(
        &format!(
            "Pod deletion → removed, {} at {}/s: p50 / p99 / max",
            args.deletes, args.rate
        ),
        format!(
            "{:.0} / {:.0} / {:.0} ms (n = {})",
            rm.p50, rm.p99, rm.max, rm.n
        ),
        "",
        None,
    );
    fig.row(
        "… floor: deletion → the benchmark's own watch sees it: p50 / p99 / max",
        format!(
            "{:.0} / {:.0} / {:.0} ms (n = {})",
            rm_floor.p50, rm_floor.p99, rm_floor.max, rm_floor.n
        ),
        "",
        None,
    );
    let left = n + changes - args.deletes;
    wait_metrics(
        &mut gw,
        Duration::from_secs(30),
        "wg_gateway_peers after the deletions",
        |m| metric(m, "wg_gateway_peers") == Some(left as f64),
    )
    .await?;

    // 4. Memory.
    let rss_end = proc_status_kib(gw.pid(), "VmRSS:")?;
    let hwm_end = proc_status_kib(gw.pid(), "VmHWM:")?;
    let per_peer = (rss_n.saturating_sub(rss0)) as f64 / n as f64;
    fig.row(
        "gateway VmRSS, no Pods (started, ready)",
        mib(rss0),
        "",
        None,
    );
    fig.row(
        "gateway VmRSS, N peers (3 s after the sync)",
        mib(rss_n),
        "",
        None,
    );
    fig.row(
        "gateway RSS per peer ((VmRSS N − VmRSS 0) / N)",
        format!("{per_peer:.1} KiB"),
        "≤ 16 KiB",
        Some(per_peer <= 16.0),
    );
    fig.row("gateway VmHWM after the sync", mib(hwm_n), "", None);
    fig.row(
        &format!("gateway VmRSS / VmHWM at the end ({left} peers)"),
        format!("{} / {}", mib(rss_end), mib(hwm_end)),
        "",
        None,
    );
    gw.follow_log()?;
    let mut warned: BTreeMap<String, usize> = BTreeMap::new();
    for w in &gw.warnings {
        let m = serde_json::from_str::<serde_json::Value>(w)
            .ok()
            .and_then(|v| v["fields"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| w.clone());
        *warned.entry(m).or_default() += 1;
    }
    let warned: Vec<String> = warned
        .iter()
        .map(|(m, k)| format!("{k} × \"{m}\""))
        .collect();
    gw.stop();
    drop(floor_watch);
    drop(pods);
    if let Some(dir) = &args.keep_logs {
        std::fs::create_dir_all(dir)?;
        for name in ["gateway-a.log", "gateway-b.log"] {
            std::fs::copy(work.join(name), dir.join(name))
                .with_context(|| format!("failed to copy {name} to {}", dir.display()))?;
        }
        println!("gateway logs copied to {}", dir.display());
    }
    let total = bench_start.elapsed().as_secs_f64();
    fig.notes.push(format!(
        "Gateway warnings logged: {}{}. Whole benchmark (setup to figures): {total:.0} s; load \
         average (1, 5, 15 min) at its start {load_start}, at its end {}.",
        gw.warnings.len(),
        if warned.is_empty() {
            String::new()
        } else {
            format!(" ({})", warned.join(", "))
        },
        loadavg()
    ));
    let table = fig.markdown();
    println!("\n## Gateway scale figures (N = {n})\n\n{table}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &table)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(())
}
