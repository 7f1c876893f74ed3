//! `wg-sidecar gateway --pod-source kubernetes` on real parts: a real kube-apiserver + etcd (no
//! kubelet: the test writes the Pod status a kubelet would, through the status subresource), a
//! real OpenBao, and the real gateway binary in userspace mode inside a network namespace the
//! test creates (`wgt15-…`). Pods register as their sidecars do, with
//! `wg_sidecar::registration::register`; the gateway's peers are read with `wg show <if> dump`
//! and its `/metrics`; its nftables table with `nft -j list table` in the namespace.
//!
//! The gateway reaches the apiserver and OpenBao (both on 127.0.0.1 of the host) through a TCP
//! relay this test runs on the host end of a veth pair; the kubeconfig names the apiserver's
//! certificate (`tls-server-name: kubernetes.default.svc`). Its Kubernetes identity is a service
//! account bound by the `ClusterRole` the chart renders, and its Vault token carries exactly the
//! policy `docs/gateway.md` documents.
//!
//! Who may use the gateway (`access.namespaceSelector`, `access.serviceAccounts`, the injector's
//! status annotation) is checked with the flags the chart renders for those values, a real
//! Namespace relabel, and one real `wg-sidecar run` (in the same namespace, token auth) whose
//! `/ready` must show the gateway's verdict.
//!
//! A Pod's in-place key rotation (`--key-rotation-interval`) is checked with a real `wg-sidecar
//! run` in a namespace of its own (`rot-…`, joined to the gateway's by a veth) whose TCP
//! connection to the gateway's tunnel address must survive the rotation.
//!
//! Must be run as root. Prerequisites: `bash scripts/lab-install.sh`, `cargo build -p wg-sidecar`.
#![allow(
    clippy::unwrap_used,
    clippy::too_many_lines,
    clippy::missing_panics_doc,
    // Metric values are integer counts in a float exposition: compared exactly on purpose.
    clippy::float_cmp
)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use base64::Engine as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use wg_e2e::{
    charts::{self, Template},
    control_plane::ControlPlane,
    lab::{cargo_binary, scratch_dir, write_private},
    openbao::OpenBao,
    process::ChildGuard,
};
use wg_sidecar::{
    keys::generate_keypair,
    keysource::GatewayRecord,
    registration::{self, Layout, PodIdentity, Registration, Verdict},
    vault::{Vault, VaultAuth, VaultSettings},
};

const GATEWAY: &str = "corp";
const POOL: &str = "10.99.0.0/16";
const HEALTH_PORT: u16 = 9901;

/// The gateway's Vault policy, as `docs/gateway.md` ("Vault") documents it.
const GATEWAY_POLICY: &str = r#"
path "secret/data/wg/gateways/corp" { capabilities = ["read"] }
path "secret/data/wg/gateway-keys/corp" { capabilities = ["read"] }
path "secret/data/wg/peers/corp/*" { capabilities = ["read"] }
path "secret/metadata/wg/peers/corp" { capabilities = ["list"] }
path "secret/metadata/wg/peers/corp/*" { capabilities = ["list", "delete"] }
path "secret/data/wg/addresses/corp/*" { capabilities = ["read"] }
path "secret/metadata/wg/addresses/corp" { capabilities = ["list"] }
path "secret/metadata/wg/addresses/corp/*" { capabilities = ["list", "delete"] }
path "secret/data/wg/verdicts/corp/*" { capabilities = ["create", "update", "read"] }
path "secret/metadata/wg/verdicts/corp" { capabilities = ["list"] }
path "secret/metadata/wg/verdicts/corp/*" { capabilities = ["list", "delete"] }
"#;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap();
    assert_eq!(
        uid, "0",
        "gateway_pods needs root (network namespaces, TUN)"
    );
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace `wgt15-…` joined to the host by a veth pair (10.215.S.0/30: host .1,
/// namespace .2); deleted (with its veth) on drop.
struct Netns {
    name: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
    interface: String,
}

impl Netns {
    fn new() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let id = format!("{}{n}", pid % 10_000);
        let name = format!("wgt15-{id}");
        let subnet = u8::try_from((pid % 50 * 5 + n) % 250 + 1).unwrap();
        let host_ip = Ipv4Addr::new(10, 215, subnet, 1);
        let ns_ip = Ipv4Addr::new(10, 215, subnet, 2);
        let (veth_host, veth_ns) = (format!("wgt15h{id}"), format!("wgt15n{id}"));
        run(Command::new("ip").args(["netns", "add", &name]));
        let me = Self {
            name,
            host_ip,
            ns_ip,
            interface: format!("wgt15g{id}"),
        };
        run(Command::new("ip").args([
            "link", "add", &veth_host, "type", "veth", "peer", "name", &veth_ns,
        ]));
        run(Command::new("ip").args(["link", "set", &veth_ns, "netns", &me.name]));
        run(Command::new("ip").args(["addr", "add", &format!("{host_ip}/30"), "dev", &veth_host]));
        run(Command::new("ip").args(["link", "set", &veth_host, "up"]));
        me.ip(&["addr", "add", &format!("{ns_ip}/30"), "dev", &veth_ns]);
        me.ip(&["link", "set", &veth_ns, "up"]);
        me.ip(&["link", "set", "lo", "up"]);
        me
    }

    fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A TCP relay on `listen` (the host end of the veth) to `target` (a loopback service).
struct Relay {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(listen: Ipv4Addr, target: SocketAddr) -> Self {
        let l = tokio::net::TcpListener::bind((listen, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    // A stopped target refuses: the client sees its connection closed.
                    if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                    }
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a registered Pod published (public halves; the preshared key to compare with `wg`).
struct Registered {
    pod: PodIdentity,
    public_key: String,
    preshared_key: String,
    address: String,
}

/// Everything one test runs; dropped processes first.
struct Lab {
    gateway: Option<ChildGuard>,
    gateway_runs: u32,
    ns: Netns,
    _relays: (Relay, Relay),
    vault_relay: SocketAddr,
    bao: OpenBao,
    plane: ControlPlane,
    vault: Vault,
    gateway_record: GatewayRecord,
    layout: Layout,
    kubeconfig: PathBuf,
    gateway_token: PathBuf,
    /// The `--allow-*` arguments the chart rendered for the lab's `chart_sets`.
    chart_access_args: Vec<String>,
    dir: tempfile::TempDir,
}

/// A Pod to create: namespace `shop` unless said otherwise.
struct PodSpec<'a> {
    name: &'a str,
    service_account: &'a str,
    app: &'a str,
    /// With the injector's `wg-injector.io/status` annotation.
    injected: bool,
}

impl<'a> PodSpec<'a> {
    fn web(name: &'a str) -> Self {
        Self {
            name,
            service_account: "web",
            app: "",
            injected: true,
        }
    }
}

fn wg_sidecar(bao: &OpenBao, args: &[&str]) -> String {
    let token = bao.admin_token_file().unwrap();
    run(Command::new(cargo_binary("wg-sidecar").unwrap())
        .args(["--log-format", "text"])
        .args(args)
        .args(["--vault-addr", &bao.addr, "--vault-auth", "token"])
        .arg("--vault-token-file")
        .arg(token))
}

impl Lab {
    async fn start(persistent_vault: bool) -> Self {
        Self::start_with(persistent_vault, &[]).await
    }

    /// [`Lab::start`] with more chart values (`--set`) for the gateway's RBAC and access flags.
    async fn start_with(persistent_vault: bool, chart_sets: &[&str]) -> Self {
        require_root();
        let plane = ControlPlane::start().await.unwrap();
        let bao = tokio::task::spawn_blocking(move || {
            if persistent_vault {
                OpenBao::start_persistent()
            } else {
                OpenBao::start()
            }
        })
        .await
        .unwrap()
        .unwrap();
        let dir = scratch_dir("wgt15-").unwrap();
        let admin = plane.admin_client().await.unwrap();
        plane.create_namespace("shop", &[]).await.unwrap();
        plane.create_namespace("vpn", &[]).await.unwrap();

        // The gateway's Kubernetes identity: the chart's own ClusterRole and binding.
        let objects = Template {
            chart: "wg-gateway",
            release: "vpn-gateway",
            namespace: "vpn",
            kube_version: "1.33.0",
            values_file: None,
            sets: &[
                &[
                    "server.publicEndpoint=203.0.113.1:51820",
                    "server.name=corp",
                ],
                chart_sets,
            ]
            .concat(),
        }
        .render()
        .unwrap();
        let chart_access_args: Vec<String> = charts::of_kind(&objects, "Deployment")[0]["spec"]
            ["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .filter(|a| a.starts_with("--allow-"))
            .collect();
        let role: ClusterRole =
            serde_json::from_value(charts::of_kind(&objects, "ClusterRole")[0].clone()).unwrap();
        let binding: ClusterRoleBinding =
            serde_json::from_value(charts::of_kind(&objects, "ClusterRoleBinding")[0].clone())
                .unwrap();
        let subject = binding.subjects.as_ref().unwrap()[0].clone();
        Api::<ClusterRole>::all(admin.clone())
            .create(&PostParams::default(), &role)
            .await
            .unwrap();
        Api::<ClusterRoleBinding>::all(admin.clone())
            .create(&PostParams::default(), &binding)
            .await
            .unwrap();
        let sa_token = plane
            .service_account_token(
                subject.namespace.as_deref().unwrap(),
                &subject.name,
                "https://kubernetes.default.svc",
            )
            .await
            .unwrap();

        // Vault: the gateway's keys and record, and a token with the documented policy only.
        wg_sidecar(
            &bao,
            &[
                "keys",
                "provision-gateway",
                GATEWAY,
                "--endpoints",
                "127.0.0.1:51820",
                "--pool",
                POOL,
            ],
        );
        let policy = bao
            .private_file("wg-gateway-corp.hcl", GATEWAY_POLICY.as_bytes())
            .unwrap();
        bao.cli(&[
            "policy",
            "write",
            "wg-gateway-corp",
            &policy.display().to_string(),
        ])
        .unwrap();
        let token = bao
            .cli(&[
                "token",
                "create",
                "-policy=wg-gateway-corp",
                "-ttl=2h",
                "-field=token",
            ])
            .unwrap();
        let gateway_token = dir.path().join("gateway.token");
        write_private(&gateway_token, token.trim().as_bytes()).unwrap();

        let vault = Vault::new(VaultSettings {
            addr: bao.addr.clone(),
            ca_file: None,
            auth: VaultAuth::Token {
                file: bao.admin_token_file().unwrap(),
            },
        })
        .unwrap();
        vault.login().await.unwrap();
        let rec = vault
            .read("secret", &format!("wg/gateways/{GATEWAY}"))
            .await
            .unwrap();
        let gateway_record =
            GatewayRecord::from_fields("gateway record", &rec.data, rec.version).unwrap();
        assert!(
            !gateway_record.pool.is_empty(),
            "provision-gateway wrote no pool"
        );

        let ns = Netns::new();
        let api_target: SocketAddr = plane.url.trim_start_matches("https://").parse().unwrap();
        let vault_target: SocketAddr = bao.addr.trim_start_matches("http://").parse().unwrap();
        let api_relay = Relay::start(ns.host_ip, api_target).await;
        let vault_relay = Relay::start(ns.host_ip, vault_target).await;
        let ca = base64::engine::general_purpose::STANDARD.encode(plane.ca_pem.as_bytes());
        let kubeconfig = dir.path().join("gateway.kubeconfig");
        write_private(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: https://{}\n    certificate-authority-data: {ca}\n    tls-server-name: kubernetes.default.svc\nusers:\n- name: gw\n  user:\n    token: {sa_token}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: gw\ncurrent-context: lab\n",
                api_relay.addr
            )
            .as_bytes(),
        )
        .unwrap();
        let layout = Layout {
            kv_mount: "secret".into(),
            peers_prefix: "wg/peers".into(),
            addresses_prefix: "wg/addresses".into(),
            verdicts_prefix: "wg/verdicts".into(),
        };
        Self {
            gateway: None,
            gateway_runs: 0,
            vault_relay: vault_relay.addr,
            _relays: (api_relay, vault_relay),
            ns,
            bao,
            plane,
            vault,
            gateway_record,
            layout,
            kubeconfig,
            gateway_token,
            chart_access_args,
            dir,
        }
    }

    fn gateway_log(&self) -> String {
        self.gateway
            .as_ref()
            .map(|g| g.log_tail(6000))
            .unwrap_or_default()
    }

    /// Starts the real gateway in the namespace and waits for `/ready`.
    async fn start_gateway(&mut self) {
        self.start_gateway_with(&[]).await;
    }

    /// [`Lab::start_gateway`] with more flags.
    async fn start_gateway_with(&mut self, extra: &[&str]) {
        self.gateway_runs += 1;
        let mut cmd = self.ns.command(&cargo_binary("wg-sidecar").unwrap());
        cmd.args([
            "--log-format",
            "text",
            "gateway",
            "--pod-source",
            "kubernetes",
        ])
        .args(["--interface", &self.ns.interface, "--listen-port", "51820"])
        .args(["--vault-gateway-path", &format!("wg/gateways/{GATEWAY}")])
        .args(["--health-addr", &format!("0.0.0.0:{HEALTH_PORT}")])
        .args(["--masquerade=false", "--poll-interval", "2"])
        .args(["--orphan-sweep-interval", "2", "--orphan-grace", "3"])
        // stop_gateway's SIGTERM cleans up at once (no drain).
        .args(["--shutdown-delay", "0"])
        .args(["--vault-addr", &format!("http://{}", self.vault_relay)])
        .args(["--vault-auth", "token", "--vault-token-file"])
        .arg(&self.gateway_token)
        .args(extra)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("KUBECONFIG", &self.kubeconfig)
        .env("WG_SIDECAR_LOG", "info,wg_sidecar=debug");
        let name = format!("gateway-{}", self.gateway_runs);
        self.gateway = Some(ChildGuard::spawn(&name, cmd, self.dir.path()).unwrap());
        let started = Instant::now();
        loop {
            if matches!(self.http_get("/ready").await, Some((200, _))) {
                eprintln!(
                    "gateway run {} ready after {:?}",
                    self.gateway_runs,
                    started.elapsed()
                );
                return;
            }
            let g = self.gateway.as_mut().unwrap();
            assert!(g.is_running(), "the gateway exited\n{}", self.gateway_log());
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "gateway not ready in 30 s\n{}",
                self.gateway_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the gateway with SIGTERM (its clean shutdown: the interface goes), SIGKILL after 5 s.
    async fn stop_gateway(&mut self) {
        let Some(mut g) = self.gateway.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &g.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while g.is_running() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        g.stop();
    }

    async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        self.http_get_port(HEALTH_PORT, path).await
    }

    /// `GET path` on `port` of the namespace (the gateway's health port, or a sidecar's).
    async fn http_get_port(&self, port: u16, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let fut = async {
            let mut s = tokio::net::TcpStream::connect((self.ns.ns_ip, port))
                .await
                .ok()?;
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .ok()?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.ok()?;
            let text = String::from_utf8_lossy(&buf).into_owned();
            let status = text.split_whitespace().nth(1)?.parse().ok()?;
            let body = text.split_once("\r\n\r\n").map(|x| x.1.to_owned())?;
            Some((status, body))
        };
        tokio::time::timeout(Duration::from_secs(2), fut)
            .await
            .ok()
            .flatten()
    }

    /// The sum of the series of `name` whose labels contain `labels` (e.g. `kind="record"`).
    async fn metric(&self, name: &str, labels: &str) -> f64 {
        self.metric_on(HEALTH_PORT, name, labels).await
    }

    /// [`Lab::metric`] of the process serving `/metrics` on `port`.
    async fn metric_on(&self, port: u16, name: &str, labels: &str) -> f64 {
        let (_, text) = self.http_get_port(port, "/metrics").await.unwrap();
        text.lines()
            .filter(|l| l.split([' ', '{']).next() == Some(name) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// `wg show <if> dump`: public key → (preshared key, allowed IPs).
    fn peers(&self) -> BTreeMap<String, (String, String)> {
        let out = run(Command::new("ip").args([
            "netns",
            "exec",
            &self.ns.name,
            "wg",
            "show",
            &self.ns.interface,
            "dump",
        ]));
        out.lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f.len() >= 4).then(|| (f[0].to_owned(), (f[1].to_owned(), f[3].to_owned())))
            })
            .collect()
    }

    /// Polls `ok` every 100 ms for at most `limit`; the time it took.
    async fn wait(
        &self,
        limit: Duration,
        what: &str,
        mut ok: impl FnMut(&Self) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            if ok(self) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "{what}: not within {limit:?}; peers {:?}\n{}",
                self.peers(),
                self.gateway_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.plane.admin_client().await.unwrap(), "shop")
    }

    /// Creates a Pod of the profile and writes the status a kubelet would once its
    /// `wg-sidecar` container runs.
    async fn running_pod(&self, name: &str) -> PodIdentity {
        self.running_pod_labelled(name, "").await
    }

    /// [`Lab::running_pod`] with the label `app=<app>` too (none when empty).
    async fn running_pod_labelled(&self, name: &str, app: &str) -> PodIdentity {
        self.running_pod_as(&PodSpec {
            app,
            ..PodSpec::web(name)
        })
        .await
    }

    /// A running Pod of the profile in `shop` as `spec` says; an injected one carries the
    /// injector's status annotation, as every Pod the webhook patched does.
    async fn running_pod_as(&self, spec: &PodSpec<'_>) -> PodIdentity {
        let (name, app) = (spec.name, spec.app);
        let api = self.pods().await;
        let mut labels = serde_json::json!({"wg-injector.io/tunnel": GATEWAY});
        if !app.is_empty() {
            labels["app"] = app.into();
        }
        let mut metadata = serde_json::json!({"name": name, "labels": labels});
        if spec.injected {
            metadata["annotations"] =
                serde_json::json!({"wg-injector.io/status": "{\"version\":\"e2e\"}"});
        }
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": metadata,
            "spec": {"serviceAccountName": spec.service_account, "containers": [
                {"name": "app", "image": "app:1"},
                {"name": "wg-sidecar", "image": "localhost/wg-sidecar:e2e"}]},
        }))
        .unwrap();
        let stored = api.create(&PostParams::default(), &pod).await.unwrap();
        let uid = stored.metadata.uid.unwrap();
        let container = |n: &str, id: &str| {
            serde_json::json!({"name": n, "containerID": format!("containerd://{id}"),
                "image": "x", "imageID": "", "ready": true, "restartCount": 0, "started": true,
                "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}})
        };
        let status = serde_json::json!({"status": {"phase": "Running", "containerStatuses": [
            container("app", &format!("{uid}-app")),
            container("wg-sidecar", &format!("{uid}-wg")),
        ]}});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
        PodIdentity::new("shop", spec.service_account, name, &uid).unwrap()
    }

    /// Sets the labels of namespace `shop` to exactly `labels`.
    async fn label_shop(&self, labels: serde_json::Value) {
        let api: Api<Namespace> = Api::all(self.plane.admin_client().await.unwrap());
        let mut ns = api.get("shop").await.unwrap();
        ns.metadata.labels = Some(serde_json::from_value(labels).unwrap());
        api.replace("shop", &PostParams::default(), &ns)
            .await
            .unwrap();
    }

    /// The gateway's verdict on `pod`, if any.
    async fn verdict(&self, pod: &PodIdentity) -> Option<Verdict> {
        let path = self.layout.verdict_path(GATEWAY, pod);
        match self.vault.read("secret", &path).await {
            Ok(rec) => Some(Verdict::from_fields(&path, &rec.data).unwrap()),
            Err(wg_sidecar::SidecarError::VaultKv {
                status: Some(404), ..
            }) => None,
            Err(e) => panic!("reading {path}: {e}"),
        }
    }

    /// A real `wg-sidecar run` for `pod` in the namespace (token auth with the admin token:
    /// a token cannot evaluate the wg-pod policy's identity templates), health on `port`.
    fn start_sidecar(&self, pod: &PodIdentity, port: u16) -> ChildGuard {
        let mut cmd = self.ns.command(&cargo_binary("wg-sidecar").unwrap());
        let interface = self.ns.interface.replacen("wgt15g", "wgt15p", 1);
        cmd.args(["--log-format", "text", "run", "--interface", &interface])
            .args(["--gateway", GATEWAY, "--routes", "10.20.0.0/24"])
            .args(["--health-addr", &format!("0.0.0.0:{port}")])
            .args(["--keepalive", "1", "--poll-interval", "30"])
            .args(["--vault-addr", &format!("http://{}", self.vault_relay)])
            .args(["--vault-auth", "token", "--vault-token-file"])
            .arg(self.bao.admin_token_file().unwrap())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("WG_POD_NAMESPACE", &pod.namespace)
            .env("WG_POD_SERVICE_ACCOUNT", &pod.service_account)
            .env("WG_POD_NAME", &pod.name)
            .env("WG_POD_UID", &pod.uid)
            .env("WG_SIDECAR_LOG", "info,wg_sidecar=debug");
        ChildGuard::spawn(&format!("sidecar-{}", pod.name), cmd, self.dir.path()).unwrap()
    }

    async fn delete_pod(&self, name: &str) {
        self.pods()
            .await
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }

    /// Registers `pod` as its sidecar does: a new key pair and preshared key, a claimed
    /// address, the public record.
    async fn register(&self, pod: &PodIdentity) -> Registered {
        let (_, public_key) = generate_keypair();
        let (psk, _) = generate_keypair();
        let r = registration::register(
            &self.vault,
            &self.layout,
            &Registration {
                pod,
                gateway: GATEWAY,
                gateway_record: &self.gateway_record,
                public_key: &public_key,
                preshared_key: &psk,
                fixed_addresses: &[],
                rotates_at: None,
            },
        )
        .await
        .unwrap();
        Registered {
            pod: pod.clone(),
            public_key,
            preshared_key: psk.expose().to_owned(),
            address: r.addresses[0].to_string(),
        }
    }

    async fn exists(&self, path: &str) -> bool {
        match self.vault.read("secret", path).await {
            Ok(_) => true,
            Err(wg_sidecar::SidecarError::VaultKv {
                status: Some(404), ..
            }) => false,
            Err(e) => panic!("reading {path}: {e}"),
        }
    }

    fn record_path(&self, r: &Registered) -> String {
        self.layout.record_path(GATEWAY, &r.pod)
    }

    fn claim_path(&self, r: &Registered) -> String {
        let addr: IpAddr = r.address.split('/').next().unwrap().parse().unwrap();
        self.layout.claim_path(GATEWAY, addr)
    }

    fn admitted(&self, r: &Registered) -> bool {
        self.peers().get(&r.public_key) == Some(&(r.preshared_key.clone(), r.address.clone()))
    }

    /// The gateway's nftables table as `nft -j` lists it.
    fn nft(&self) -> Vec<serde_json::Value> {
        let table = wg_sidecar::nat::table_name(&self.ns.interface);
        let text = run(Command::new("ip").args([
            "netns",
            "exec",
            &self.ns.name,
            "nft",
            "-j",
            "list",
            "table",
            "inet",
            &table,
        ]));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["nftables"].as_array().unwrap().clone()
    }

    async fn policies(&self) -> Api<NetworkPolicy> {
        Api::namespaced(self.plane.admin_client().await.unwrap(), "shop")
    }
}

/// The egress chain of a registered Pod's peer: `peer_` and its address with `_` for `.`.
fn chain_of(r: &Registered) -> String {
    let addr = r.address.split('/').next().unwrap();
    format!("peer_{}", addr.replace('.', "_"))
}

/// The rules of `chain` in an `nft -j` listing, each as `left op right; …; verdict` (`None`:
/// no such chain).
fn chain_rules(json: &[serde_json::Value], chain: &str) -> Option<Vec<String>> {
    json.iter()
        .filter_map(|o| o.get("chain"))
        .find(|c| c["name"] == chain)?;
    let describe = |e: &serde_json::Value| -> String {
        let Some(m) = e.get("match") else {
            return e.as_object().unwrap().keys().next().unwrap().clone();
        };
        let left = &m["left"];
        let l = if let Some(p) = left.get("payload") {
            format!(
                "{} {}",
                p["protocol"].as_str().unwrap(),
                p["field"].as_str().unwrap()
            )
        } else if let Some(k) = left.get("meta") {
            format!("meta {}", k["key"].as_str().unwrap())
        } else {
            left.to_string()
        };
        let r = match &m["right"] {
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        format!("{l} {} {r}", m["op"].as_str().unwrap())
    };
    Some(
        json.iter()
            .filter_map(|o| o.get("rule"))
            .filter(|r| r["chain"] == chain)
            .map(|r| {
                let parts: Vec<String> =
                    r["expr"].as_array().unwrap().iter().map(describe).collect();
                parts.join("; ")
            })
            .collect(),
    )
}

/// The last rule of the `tunnel` chain: the verdict of peers without a policy.
fn tunnel_default(json: &[serde_json::Value]) -> String {
    chain_rules(json, "tunnel").unwrap().last().unwrap().clone()
}

/// `shop/web-egress`: Pods labelled `app=web` may reach 10.20.0.2 on TCP `port` only.
fn web_egress(port: u16) -> NetworkPolicy {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web-egress", "namespace": "shop"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.20.0.2/32"}}],
                        "ports": [{"protocol": "TCP", "port": port}]}],
        },
    }))
    .unwrap()
}

/// The chain [`web_egress`] compiles to (`nft` shows `meta l4proto tcp th dport N` as
/// `tcp dport N`; the final drop is counted in the named counter `dropped_policy`).
fn web_chain(port: u16) -> Vec<String> {
    vec![
        format!("ip daddr == 10.20.0.2; tcp dport == {port}; accept"),
        "counter; drop".to_owned(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_admits_live_pods_with_their_preshared_key_never_forged_records_and_releases_a_deleted_pod(
) {
    let mut lab = Lab::start(false).await;
    lab.start_gateway().await;

    // A live Pod's key is admitted with its preshared key and its one address.
    let web1 = lab.running_pod("web-1").await;
    let r1 = lab.register(&web1).await;
    let took = lab
        .wait(Duration::from_secs(10), "web-1 admitted", |l| {
            l.admitted(&r1)
        })
        .await;
    eprintln!("web-1 admitted {took:?} after it registered");

    // A forged record under a UID no live Pod has (published as a sidecar would, with a claim):
    // never admitted, and collected by the sweep once older than the grace period.
    let ghost = PodIdentity::new(
        "shop",
        "web",
        "web-ghost",
        "6f1d6a0e-0000-4000-8000-00000000dead",
    )
    .unwrap();
    let rg = lab.register(&ghost).await;
    // A record under a live Pod's path that names another Pod: refused.
    let web4 = lab.running_pod("web-4").await;
    let forged_at_web4 = {
        let (_, public_key) = generate_keypair();
        let (psk, _) = generate_keypair();
        let rec = wg_sidecar::keys::PeerRecord {
            public_key: public_key.clone(),
            addresses: vec!["10.99.200.4/32".parse().unwrap()],
            next_public_key: None,
            activate_at: None,
            rotates_at: None,
            preshared_key: Some(psk),
            pod: Some(PodIdentity::new("shop", "web", "web-1", &web1.uid).unwrap()),
            version: 0,
        };
        let path = lab.layout.record_path(GATEWAY, &web4);
        lab.vault
            .write("secret", &path, &rec.to_fields(), None)
            .await
            .unwrap();
        public_key
    };
    let (ghost_record, ghost_claim) = (lab.record_path(&rg), lab.claim_path(&rg));
    let started = Instant::now();
    loop {
        let peers = lab.peers();
        assert!(
            !peers.contains_key(&rg.public_key),
            "the forged record was admitted"
        );
        assert!(
            !peers.contains_key(&forged_at_web4),
            "a record naming another Pod was admitted"
        );
        if !lab.exists(&ghost_record).await && !lab.exists(&ghost_claim).await {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the sweep did not collect the forged record and claim\n{}",
            lab.gateway_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "forged record and claim collected {:?} after they were written",
        started.elapsed()
    );
    let mut refused = 0.0;
    for _ in 0..50 {
        refused = lab
            .metric(
                "wg_gateway_peers_refused_total",
                "reason=\"identity_mismatch\"",
            )
            .await;
        if refused >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(refused, 1.0, "{}", lab.gateway_log());
    assert!(lab.admitted(&r1), "web-1 must stay");
    assert!(
        lab.exists(&lab.record_path(&r1)).await,
        "web-1's record must stay"
    );

    // A deleted Pod's peer leaves within 5 s; its record and claim are deleted.
    let deleted_at = Instant::now();
    lab.delete_pod("web-1").await;
    let took = lab
        .wait(Duration::from_secs(5), "web-1's peer removed", |l| {
            !l.peers().contains_key(&r1.public_key)
        })
        .await;
    eprintln!("web-1's peer left {took:?} after the Pod was deleted");
    let (p, c) = (lab.record_path(&r1), lab.claim_path(&r1));
    loop {
        if !lab.exists(&p).await && !lab.exists(&c).await {
            break;
        }
        assert!(
            deleted_at.elapsed() < Duration::from_secs(5),
            "web-1's record or claim still there\n{}",
            lab.gateway_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "web-1's record and claim deleted {:?} after the Pod",
        deleted_at.elapsed()
    );

    // A restarted gateway resyncs the same table, with one record read per live Pod.
    let web2 = lab.running_pod("web-2").await;
    let web3 = lab.running_pod("web-3").await;
    let r2 = lab.register(&web2).await;
    let r3 = lab.register(&web3).await;
    lab.wait(Duration::from_secs(10), "web-2 and web-3 admitted", |l| {
        l.admitted(&r2) && l.admitted(&r3)
    })
    .await;
    let before = lab.peers();
    assert_eq!(before.len(), 2, "{before:?}");
    lab.stop_gateway().await;
    let restarted = Instant::now();
    lab.start_gateway().await;
    let took = lab
        .wait(
            Duration::from_secs(5),
            "the same table after a restart",
            |l| l.peers() == before,
        )
        .await;
    eprintln!(
        "restarted gateway: same table {:?} after it was ready ({:?} after the restart)",
        took,
        restarted.elapsed()
    );
    // web-2, web-3 and web-4 (whose record is the forgery) are read once each.
    let reads = lab
        .metric("wg_gateway_vault_reads_total", "kind=\"record\"")
        .await;
    assert_eq!(reads, 3.0, "{}", lab.gateway_log());
    let watched = lab.metric("wg_gateway_pods_watched", "").await;
    assert_eq!(watched, 3.0);
    let sync = lab.metric("wg_gateway_sync_duration_seconds", "").await;
    assert!(sync > 0.0 && sync < 30.0, "sync duration {sync}");
    lab.stop_gateway().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_vault_down_running_peers_stay_and_a_pod_created_meanwhile_is_admitted_when_vault_is_back(
) {
    let mut lab = Lab::start(true).await;
    lab.start_gateway().await;
    let web1 = lab.running_pod("web-1").await;
    let r1 = lab.register(&web1).await;
    lab.wait(Duration::from_secs(10), "web-1 admitted", |l| {
        l.admitted(&r1)
    })
    .await;

    // OpenBao killed (by PID): the gateway's key checks and reads fail; the peer stays.
    lab.bao.stop();
    let down = Instant::now();
    let web2 = lab.running_pod("web-2").await;
    while down.elapsed() < Duration::from_secs(6) {
        assert!(
            lab.admitted(&r1),
            "web-1 lost its peer while Vault was down"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(lab.peers().len(), 1, "web-2 has no record yet");
    assert!(
        matches!(lab.http_get("/ready").await, Some((200, _))),
        "still ready"
    );

    // Vault is back; web-2's sidecar registers now, and the gateway's retry admits it.
    lab.bao.start_again().unwrap();
    let back = Instant::now();
    lab.vault.login().await.unwrap();
    let r2 = lab.register(&web2).await;
    let took = lab
        .wait(
            Duration::from_secs(20),
            "web-2 admitted after Vault returned",
            |l| l.admitted(&r2),
        )
        .await;
    eprintln!(
        "web-2 admitted {took:?} after it registered ({:?} since Vault came back)",
        back.elapsed()
    );
    assert!(lab.admitted(&r1));
    lab.stop_gateway().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pods_egress_networkpolicy_becomes_its_peer_chain_within_two_seconds_and_default_deny_closes_unselected_pods(
) {
    const APPLY: Duration = Duration::from_secs(2);
    let mut lab = Lab::start(false).await;
    lab.start_gateway_with(&["--private-networks", "10.20.0.0/16"])
        .await;
    let web = lab.running_pod_labelled("web-1", "web").await;
    let other = lab.running_pod_labelled("other-1", "other").await;
    let (rw, ro) = (lab.register(&web).await, lab.register(&other).await);
    lab.wait(Duration::from_secs(10), "web-1 and other-1 admitted", |l| {
        l.admitted(&rw) && l.admitted(&ro)
    })
    .await;
    let (web_chain_name, other_chain_name) = (chain_of(&rw), chain_of(&ro));
    let json = lab.nft();
    assert_eq!(chain_rules(&json, &web_chain_name), None, "no policy yet");
    assert_eq!(chain_rules(&json, &other_chain_name), None);
    assert_eq!(tunnel_default(&json), "accept", "without --default-deny");

    // The policy appears: web-1's peer gets exactly its rule, other-1 (not selected) nothing.
    let policies = lab.policies().await;
    policies
        .create(&PostParams::default(), &web_egress(8080))
        .await
        .unwrap();
    let took = lab
        .wait(APPLY, "web-1's chain with the policy's rule", |l| {
            chain_rules(&l.nft(), &web_chain_name) == Some(web_chain(8080))
        })
        .await;
    eprintln!("policy created: web-1's chain in force {took:?} later");
    let json = lab.nft();
    assert_eq!(
        chain_rules(&json, &other_chain_name),
        None,
        "other-1 is not selected"
    );
    let peers_map = json
        .iter()
        .filter_map(|o| o.get("map"))
        .find(|m| m["name"] == "peers")
        .unwrap();
    let web_addr = rw.address.split('/').next().unwrap();
    assert_eq!(
        peers_map["elem"],
        serde_json::json!([[web_addr, {"jump": {"target": web_chain_name}}]]),
        "{peers_map}"
    );
    let mut metric_ok = false;
    for _ in 0..20 {
        if lab.metric("wg_gateway_policy_peers", "").await == 1.0
            && lab.metric("wg_gateway_policy_rules", "").await == 2.0
        {
            metric_ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metric_ok, "policy metrics\n{}", lab.gateway_log());
    assert!(
        lab.metric("wg_gateway_policy_apply_duration_seconds_count", "")
            .await
            >= 1.0,
        "apply duration histogram"
    );
    assert!(lab.admitted(&rw) && lab.admitted(&ro), "peers untouched");

    // The port changes live.
    policies
        .patch(
            "web-egress",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"egress": [
                {"to": [{"ipBlock": {"cidr": "10.20.0.2/32"}}],
                 "ports": [{"protocol": "TCP", "port": 9090}]}]}})),
        )
        .await
        .unwrap();
    let took = lab
        .wait(APPLY, "web-1's chain with the new port", |l| {
            chain_rules(&l.nft(), &web_chain_name) == Some(web_chain(9090))
        })
        .await;
    eprintln!("port changed: in force {took:?} later");

    // A label change selects other-1 too.
    lab.pods()
        .await
        .patch(
            "other-1",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"app": "web"}}})),
        )
        .await
        .unwrap();
    let took = lab
        .wait(APPLY, "other-1 relabelled app=web gets the chain", |l| {
            chain_rules(&l.nft(), &other_chain_name) == Some(web_chain(9090))
        })
        .await;
    eprintln!("label changed: in force {took:?} later");

    // Deleted: the chains go, the peers stay.
    policies
        .delete("web-egress", &DeleteParams::default())
        .await
        .unwrap();
    let took = lab
        .wait(APPLY, "the chains gone with the policy", |l| {
            let json = l.nft();
            chain_rules(&json, &web_chain_name).is_none()
                && chain_rules(&json, &other_chain_name).is_none()
        })
        .await;
    eprintln!("policy deleted: chains gone {took:?} later");
    assert!(lab.admitted(&rw) && lab.admitted(&ro), "peers untouched");
    lab.stop_gateway().await;

    // --default-deny: a Pod selected by no policy has no chain and the default is drop; a
    // policy still gives its Pods exactly its rules.
    lab.pods()
        .await
        .patch(
            "other-1",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"app": "other"}}})),
        )
        .await
        .unwrap();
    policies
        .create(&PostParams::default(), &web_egress(8080))
        .await
        .unwrap();
    lab.start_gateway_with(&["--private-networks", "10.20.0.0/16", "--default-deny"])
        .await;
    lab.wait(Duration::from_secs(5), "both admitted again", |l| {
        l.admitted(&rw) && l.admitted(&ro)
    })
    .await;
    let json = lab.nft();
    assert_eq!(tunnel_default(&json), "counter; drop", "--default-deny");
    assert_eq!(
        chain_rules(&json, &other_chain_name),
        None,
        "other-1: nothing"
    );
    assert_eq!(
        chain_rules(&json, &web_chain_name),
        Some(web_chain(8080)),
        "web-1's chain is in force when the gateway is ready"
    );
    lab.stop_gateway().await;
}

/// Polls `get` every 100 ms until `ok` holds of its answer, for at most `limit`; the time it
/// took, or a panic showing the last answer and `logs`.
async fn eventually<T: std::fmt::Debug, F: std::future::Future<Output = T>>(
    limit: Duration,
    what: &str,
    mut get: impl FnMut() -> F,
    ok: impl Fn(&T) -> bool,
    logs: impl Fn() -> String,
) -> Duration {
    let started = Instant::now();
    loop {
        let v = get().await;
        if ok(&v) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{what}: not within {limit:?}; last: {v:?}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pods_outside_the_access_rules_get_no_peer_and_their_sidecar_says_why_and_a_namespace_relabel_admits_within_two_seconds(
) {
    const SIDECAR_PORT: u16 = 9902;
    const APPLY: Duration = Duration::from_secs(2);
    let mut lab = Lab::start_with(
        false,
        &[
            "access.namespaceSelector.matchLabels.vpn=allowed",
            "access.serviceAccounts={shop/web}",
        ],
    )
    .await;
    // The flags the chart renders for these values, passed to the real gateway as they are.
    assert_eq!(
        lab.chart_access_args,
        [
            "--allow-namespace-selector=vpn=allowed",
            "--allow-service-accounts=shop/web"
        ]
    );
    let args = lab.chart_access_args.clone();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.start_gateway_with(&args).await;
    let logs = |lab: &Lab, sidecar: &ChildGuard| {
        format!(
            "--- gateway\n{}\n--- sidecar\n{}",
            lab.gateway_log(),
            sidecar.log_tail(4000)
        )
    };

    // web-1 (shop/web, the listed account) in shop, which lacks vpn=allowed: refused before any
    // read, its real sidecar told why.
    let web = lab.running_pod_as(&PodSpec::web("web-1")).await;
    let mut sidecar = lab.start_sidecar(&web, SIDECAR_PORT);
    let took = eventually(
        Duration::from_secs(20),
        "the sidecar's /ready names the gateway's refusal",
        || lab.http_get_port(SIDECAR_PORT, "/ready"),
        |r| {
            r.as_ref().is_some_and(|(code, body)| {
                *code == 503
                    && body.trim()
                        == "not ready: refused by gateway corp: namespace shop does not match \
                            the gateway's access.namespaceSelector vpn=allowed"
            })
        },
        || logs(&lab, &sidecar),
    )
    .await;
    eprintln!("the sidecar's /ready named the refusal {took:?} after it started");
    let (_, ready) = lab.http_get_port(SIDECAR_PORT, "/ready").await.unwrap();
    eprintln!("refused sidecar GET /ready: 503 {}", ready.trim());
    let v = lab.verdict(&web).await.expect("web-1's verdict");
    assert_eq!(
        (v.reason.as_str(), v.gateway.as_str(), &v.pod),
        ("namespace_not_selected", GATEWAY, &web)
    );
    assert_eq!(
        lab.metric_on(
            SIDECAR_PORT,
            "wg_sidecar_gateway_refused",
            "reason=\"namespace_not_selected\""
        )
        .await,
        1.0
    );
    assert_eq!(
        lab.metric(
            "wg_gateway_peers_refused_total",
            "reason=\"namespace_not_selected\""
        )
        .await,
        1.0
    );
    assert!(lab.peers().is_empty(), "no peer for a refused Pod");

    // fake-1: the tunnel label without the injector's status annotation, and a record: refused
    // not_injected, never admitted, no verdict (it has no sidecar of the injector's).
    let fake = lab
        .running_pod_as(&PodSpec {
            injected: false,
            ..PodSpec::web("fake-1")
        })
        .await;
    let rf = lab.register(&fake).await;
    eventually(
        Duration::from_secs(5),
        "fake-1 counted not_injected",
        || lab.metric("wg_gateway_peers_refused_total", "reason=\"not_injected\""),
        |n| *n == 1.0,
        || lab.gateway_log(),
    )
    .await;

    // shop is labelled vpn=allowed: web-1 is admitted within 2 s (its record read at once), its
    // sidecar turns ready, its verdict is deleted.
    let relabelled = Instant::now();
    lab.label_shop(serde_json::json!({"vpn": "allowed"})).await;
    let took = lab
        .wait(APPLY, "web-1 admitted after the relabel", |l| {
            l.peers().len() == 1
        })
        .await;
    eprintln!("namespace relabelled vpn=allowed: web-1's peer in {took:?}");
    let took = eventually(
        Duration::from_secs(20),
        "the sidecar ready after admission",
        || lab.http_get_port(SIDECAR_PORT, "/ready"),
        |r| matches!(r, Some((200, _))),
        || logs(&lab, &sidecar),
    )
    .await;
    eprintln!(
        "sidecar ready {took:?} after its peer was admitted ({:?} after the relabel)",
        relabelled.elapsed()
    );
    assert_eq!(
        lab.metric_on(SIDECAR_PORT, "wg_sidecar_gateway_refused", "")
            .await,
        0.0,
        "no refusal series once handshaken"
    );
    eventually(
        Duration::from_secs(2),
        "web-1's verdict deleted on admission",
        || lab.verdict(&web),
        Option::is_none,
        || lab.gateway_log(),
    )
    .await;

    // api-1 runs as shop/admin, not in access.serviceAccounts: refused, told why.
    let api = lab
        .running_pod_as(&PodSpec {
            service_account: "admin",
            ..PodSpec::web("api-1")
        })
        .await;
    let ra = lab.register(&api).await;
    eventually(
        Duration::from_secs(5),
        "api-1's verdict",
        || lab.verdict(&api),
        |v| {
            v.as_ref()
                .is_some_and(|v| v.reason == "service_account_not_allowed")
        },
        || lab.gateway_log(),
    )
    .await;
    let v = lab.verdict(&api).await.unwrap();
    assert_eq!(
        v.message,
        "service account shop/admin is not in the gateway's access.serviceAccounts"
    );
    // Over 3 s: neither fake-1 nor api-1 is ever admitted; fake-1 never gets a verdict.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        let peers = lab.peers();
        assert!(!peers.contains_key(&rf.public_key), "fake-1 admitted");
        assert!(!peers.contains_key(&ra.public_key), "api-1 admitted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(lab.verdict(&fake).await.is_none(), "fake-1 got a verdict");
    for (reason, n) in [
        ("not_injected", 1.0),
        ("namespace_not_selected", 1.0),
        ("service_account_not_allowed", 1.0),
    ] {
        assert_eq!(
            lab.metric(
                "wg_gateway_peers_refused_total",
                &format!("reason=\"{reason}\"")
            )
            .await,
            n,
            "{reason}\n{}",
            lab.gateway_log()
        );
    }
    // Refused Pods' records are never read: web-1's, once, after the relabel, is the only one.
    assert_eq!(
        lab.metric("wg_gateway_vault_reads_total", "kind=\"record\"")
            .await,
        1.0,
        "{}",
        lab.gateway_log()
    );

    // shop stops matching: the admitted peer leaves within 2 s and the verdict is back.
    lab.label_shop(serde_json::json!({"vpn": "no"})).await;
    let took = lab
        .wait(APPLY, "web-1's peer removed after the relabel", |l| {
            l.peers().is_empty()
        })
        .await;
    eprintln!("namespace relabelled vpn=no: web-1's peer gone in {took:?}");
    eventually(
        Duration::from_secs(2),
        "web-1's verdict written again",
        || lab.verdict(&web),
        |v| {
            v.as_ref()
                .is_some_and(|v| v.reason == "namespace_not_selected")
        },
        || lab.gateway_log(),
    )
    .await;
    // api-1, in shop too, is refused for its namespace now: its verdict is rewritten (checked
    // and set on the version read), since it says something else.
    eventually(
        Duration::from_secs(2),
        "api-1's verdict rewritten",
        || lab.verdict(&api),
        |v| {
            v.as_ref()
                .is_some_and(|v| v.reason == "namespace_not_selected")
        },
        || lab.gateway_log(),
    )
    .await;
    let written = lab.metric("wg_gateway_verdicts_written_total", "").await;
    assert_eq!(
        written,
        4.0,
        "web-1 and api-1 twice each\n{}",
        lab.gateway_log()
    );

    // Deleted: the verdict goes with the record and the claim.
    sidecar.stop();
    lab.delete_pod("web-1").await;
    eventually(
        Duration::from_secs(5),
        "web-1's verdict released",
        || lab.verdict(&web),
        Option::is_none,
        || lab.gateway_log(),
    )
    .await;
    lab.stop_gateway().await;
}

/// A Pod's own network namespace `rot-…` for a real `wg-sidecar run` whose traffic must cross
/// the tunnel: a veth pair to the gateway's namespace (10.217.S.0/30: gateway .1, Pod .2; the
/// WireGuard endpoint) and one to the host (10.218.S.0/30: host .1, Pod .2; Vault through a relay
/// and the sidecar's health port). Deleted (with its veths) on drop.
struct PodNetns {
    name: String,
    gateway_side: Ipv4Addr,
    host_ip: Ipv4Addr,
    pod_ip: Ipv4Addr,
    vault: Relay,
}

impl PodNetns {
    async fn new(lab: &Lab, vault_target: SocketAddr) -> Self {
        let seq = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let id = format!("{}{seq}", pid % 10_000);
        let name = format!("rot-{id}");
        let subnet = u8::try_from((pid % 50 * 5 + seq) % 250 + 1).unwrap();
        let (gateway_side, pod_wg) = (
            Ipv4Addr::new(10, 217, subnet, 1),
            Ipv4Addr::new(10, 217, subnet, 2),
        );
        let (host_ip, pod_ip) = (
            Ipv4Addr::new(10, 218, subnet, 1),
            Ipv4Addr::new(10, 218, subnet, 2),
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let in_ns = |ns: &str, args: &[&str]| run(Command::new("ip").args(["-n", ns]).args(args));
        let (gw_veth, pod_veth) = (format!("rotg{id}"), format!("rotp{id}"));
        run(Command::new("ip").args([
            "link", "add", &gw_veth, "type", "veth", "peer", "name", &pod_veth,
        ]));
        run(Command::new("ip").args(["link", "set", &gw_veth, "netns", &lab.ns.name]));
        run(Command::new("ip").args(["link", "set", &pod_veth, "netns", &name]));
        in_ns(
            &lab.ns.name,
            &[
                "addr",
                "add",
                &format!("{gateway_side}/30"),
                "dev",
                &gw_veth,
            ],
        );
        in_ns(&lab.ns.name, &["link", "set", &gw_veth, "up"]);
        in_ns(
            &name,
            &["addr", "add", &format!("{pod_wg}/30"), "dev", &pod_veth],
        );
        in_ns(&name, &["link", "set", &pod_veth, "up"]);
        let (host_veth, pod_host_veth) = (format!("roth{id}"), format!("rotq{id}"));
        run(Command::new("ip").args([
            "link",
            "add",
            &host_veth,
            "type",
            "veth",
            "peer",
            "name",
            &pod_host_veth,
        ]));
        run(Command::new("ip").args(["link", "set", &pod_host_veth, "netns", &name]));
        run(Command::new("ip").args(["addr", "add", &format!("{host_ip}/30"), "dev", &host_veth]));
        run(Command::new("ip").args(["link", "set", &host_veth, "up"]));
        in_ns(
            &name,
            &[
                "addr",
                "add",
                &format!("{pod_ip}/30"),
                "dev",
                &pod_host_veth,
            ],
        );
        in_ns(&name, &["link", "set", &pod_host_veth, "up"]);
        in_ns(&name, &["link", "set", "lo", "up"]);
        let vault = Relay::start(host_ip, vault_target).await;
        Self {
            name,
            gateway_side,
            host_ip,
            pod_ip,
            vault,
        }
    }

    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The Pod's public record at `path`.
async fn read_peer_record(vault: &Vault, path: &str) -> wg_sidecar::keys::PeerRecord {
    let r = vault.read("secret", path).await.unwrap();
    wg_sidecar::keys::PeerRecord::from_fields(path, &r.data, r.version).unwrap()
}

/// `GET path` on `ip:port` (a sidecar's health port in its own namespace).
async fn http_get_at(ip: Ipv4Addr, port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|x| x.1.to_owned())?;
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .ok()
        .flatten()
}

/// The sum of the series of `name` whose labels contain `labels`, from `ip:port`'s `/metrics`.
async fn metric_at(ip: Ipv4Addr, port: u16, name: &str, labels: &str) -> f64 {
    let (_, text) = http_get_at(ip, port, "/metrics").await.unwrap();
    text.lines()
        .filter(|l| l.split([' ', '{']).next() == Some(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Issue 15 item 6: a Pod rotates its own key in place (`--key-rotation-interval`, here the
/// shortest, 1m) under a TCP connection that exchanges a line every 100 ms through the tunnel.
/// The connection survives; the gateway's peer for the Pod changes to the new public key with
/// the same allowed IP and the old key leaves the interface; the record ends folded (new key, no
/// `next_public_key`, the next `rotates_at`); the gateway read the record once for the rotation
/// (`wg_gateway_vault_reads_total{kind="record"}`) and counts it
/// (`wg_gateway_pod_key_rotations_total`), the sidecar too (`wg_sidecar_key_rotations_total`);
/// the sidecar's `/ready` stays 200 throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_rotating_its_key_keeps_its_address_and_tcp_connection_and_costs_the_gateway_one_read(
) {
    const SIDECAR_PORT: u16 = 9903;
    const ECHO_PORT: u16 = 7000;
    let mut lab = Lab::start(false).await;
    lab.start_gateway().await;
    let vault_target: SocketAddr = lab.bao.addr.trim_start_matches("http://").parse().unwrap();
    let pod_ns = PodNetns::new(&lab, vault_target).await;
    // The gateway's own tunnel address: the echo server listens there.
    let gw_addr = lab
        .ns
        .ip(&["-4", "-o", "addr", "show", "dev", &lab.ns.interface]);
    let gw_addr: Ipv4Addr = gw_addr
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap()
        .parse()
        .unwrap();
    let web = lab.running_pod("web-rot").await;

    let mut cmd = pod_ns.command(&cargo_binary("wg-sidecar").unwrap());
    cmd.args(["--log-format", "text", "run", "--interface", "wgrot0"])
        .args(["--gateway", GATEWAY, "--routes", &format!("{gw_addr}/32")])
        .args(["--endpoints", &format!("{}:51820", pod_ns.gateway_side)])
        .args(["--health-addr", &format!("0.0.0.0:{SIDECAR_PORT}")])
        .args(["--keepalive", "1", "--poll-interval", "30"])
        .args(["--key-rotation-interval", "1m"])
        .args([
            "--vault-addr",
            &format!("http://{}:{}", pod_ns.host_ip, pod_ns.vault.addr.port()),
        ])
        .args(["--vault-auth", "token", "--vault-token-file"])
        .arg(lab.bao.admin_token_file().unwrap())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("WG_POD_NAMESPACE", &web.namespace)
        .env("WG_POD_SERVICE_ACCOUNT", &web.service_account)
        .env("WG_POD_NAME", &web.name)
        .env("WG_POD_UID", &web.uid)
        .env("WG_SIDECAR_LOG", "info,wg_sidecar=debug");
    let sidecar = ChildGuard::spawn("sidecar-web-rot", cmd, lab.dir.path()).unwrap();
    let logs = || {
        format!(
            "--- gateway\n{}\n--- sidecar\n{}",
            lab.gateway_log(),
            sidecar.log_tail(6000)
        )
    };
    eventually(
        Duration::from_secs(20),
        "the rotating sidecar is ready",
        || http_get_at(pod_ns.pod_ip, SIDECAR_PORT, "/ready"),
        |r| matches!(r, Some((200, _))),
        logs,
    )
    .await;
    let path = lab.layout.record_path(GATEWAY, &web);
    let first = read_peer_record(&lab.vault, &path).await;
    let old_key = first.public_key.clone();
    let address = first.addresses[0].to_string();
    let rotates_at = first.rotates_at.expect("a rotating Pod's record says when");
    assert!(first.next_public_key.is_none());
    assert_eq!(
        lab.peers().get(&old_key).map(|p| p.1.clone()),
        Some(address.clone())
    );
    let until_rotation =
        Duration::try_from(jiff::Timestamp::now().duration_until(rotates_at)).unwrap();
    eprintln!("registered with {old_key} at {address}; rotates in {until_rotation:?}");
    assert!(
        until_rotation > Duration::from_secs(40) && until_rotation < Duration::from_secs(70),
        "1m jittered ±10 %: {until_rotation:?}"
    );

    // One TCP connection through the tunnel, a line every 100 ms, until 25 s after rotates_at.
    let echo = format!(
        "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind(('{gw_addr}',{ECHO_PORT}))\ns.listen(4)\nwhile True:\n  c,_=s.accept()\n  while True:\n\
         \x20   d=c.recv(65536)\n    if not d: break\n    c.sendall(d)\n  c.close()\n"
    );
    let mut echo_cmd = lab.ns.command(Path::new("python3"));
    echo_cmd.args(["-c", &echo]);
    let _echo = ChildGuard::spawn("echo", echo_cmd, lab.dir.path()).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let secs = until_rotation.as_secs() + 25;
    let client = format!(
        "import socket,time,sys\ns=socket.create_connection(('{gw_addr}',{ECHO_PORT}),timeout=60)\n\
         end=time.time()+{secs}\nn=0\ngap=0.0\nwhile time.time()<end:\n  t=time.time()\n\
         \x20 m=b'ping %d\\n'%n\n  s.sendall(m)\n  got=b''\n  while len(got)<len(m):\n\
         \x20   d=s.recv(65536)\n    if not d: sys.exit('closed after %d' % n)\n    got+=d\n\
         \x20 assert got==m, got\n  gap=max(gap,time.time()-t)\n  n+=1\n  time.sleep(0.1)\n\
         print('OK',n,int(gap*1000))\n"
    );
    let mut client_cmd = pod_ns.command(Path::new("python3"));
    client_cmd.args(["-c", &client]);
    let client = tokio::task::spawn_blocking(move || client_cmd.output());
    // The sidecar's /ready, sampled every 100 ms through the rotation.
    let ready_ip = pod_ns.pod_ip;
    let not_ready = tokio::spawn(async move {
        let end = Instant::now() + until_rotation + Duration::from_secs(20);
        let mut bad = Vec::new();
        while Instant::now() < end {
            match http_get_at(ready_ip, SIDECAR_PORT, "/ready").await {
                Some((200, _)) => {}
                other => bad.push(format!("{other:?}")),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bad
    });

    let before = until_rotation.saturating_sub(Duration::from_secs(3));
    tokio::time::sleep(before).await;
    let reads_before = lab
        .metric("wg_gateway_vault_reads_total", "kind=\"record\"")
        .await;
    assert!(
        lab.peers().contains_key(&old_key),
        "{:?}\n{}",
        lab.peers(),
        logs()
    );

    // The next key is published at rotates_at with activate_at 10 s later.
    let deadline = Duration::from_secs(15);
    let started = Instant::now();
    let pending = loop {
        let r = read_peer_record(&lab.vault, &path).await;
        if r.next_public_key.is_some() {
            break r;
        }
        assert!(
            started.elapsed() < deadline,
            "no next key published\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let new_key = pending.next_public_key.clone().unwrap();
    let activate_at = pending.activate_at.unwrap();
    assert_ne!(new_key, old_key);
    assert_eq!(pending.public_key, old_key);
    assert_eq!(pending.addresses, first.addresses, "same address");
    let published_after = jiff::Timestamp::now().duration_since(rotates_at);
    eprintln!(
        "next key {new_key} seen {published_after:?} after rotates_at, activates at {activate_at}"
    );

    // The gateway switches at activate_at: new key, same allowed IP, old key gone.
    let took = lab
        .wait(
            Duration::from_secs(20),
            "the gateway takes the new key",
            |l| {
                let p = l.peers();
                p.get(&new_key).is_some_and(|x| x.1 == address) && !p.contains_key(&old_key)
            },
        )
        .await;
    let switched = jiff::Timestamp::now().duration_since(activate_at);
    eprintln!("gateway peer switched {switched:?} after activate_at (waited {took:?})");
    assert!(
        switched < jiff::SignedDuration::from_secs(2)
            && switched > jiff::SignedDuration::from_millis(-200),
        "the gateway switches at activate_at: {switched:?}\n{}",
        logs()
    );
    assert_eq!(lab.peers().len(), 1, "{:?}", lab.peers());

    // The record is folded: the new key is the key, the next rotation is scheduled.
    let started = Instant::now();
    let folded = loop {
        let r = read_peer_record(&lab.vault, &path).await;
        if r.next_public_key.is_none() && r.public_key == new_key {
            break r;
        }
        assert!(
            started.elapsed() < deadline,
            "record not folded\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(folded.addresses, first.addresses);
    assert!(folded.rotates_at.unwrap() > rotates_at);
    assert_eq!(
        folded.version,
        first.version + 2,
        "v+1 next key, v+2 folded"
    );

    let (ok, out) = match client.await.unwrap() {
        Ok(o) => (o.status.success(), o),
        Err(e) => panic!("tcp client: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        ok && stdout.starts_with("OK"),
        "the TCP connection broke during the rotation: {stdout} {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    eprintln!(
        "TCP connection across the rotation: {} (exchanges, longest round trip ms)",
        stdout.trim()
    );
    let longest_ms: u64 = stdout.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(
        longest_ms < 3000,
        "the pause is about a second, not a 5 s handshake retry: {longest_ms} ms"
    );
    let reads = lab
        .metric("wg_gateway_vault_reads_total", "kind=\"record\"")
        .await
        - reads_before;
    eprintln!("gateway record reads for the rotation: {reads}");
    assert_eq!(
        reads,
        1.0,
        "one read per rotation per gateway replica\n{}",
        logs()
    );
    assert_eq!(
        lab.metric("wg_gateway_pod_key_rotations_total", "").await,
        1.0
    );
    assert_eq!(
        metric_at(
            pod_ns.pod_ip,
            SIDECAR_PORT,
            "wg_sidecar_key_rotations_total",
            ""
        )
        .await,
        1.0
    );
    let pod_pub = run(pod_ns
        .command(Path::new("wg"))
        .args(["show", "wgrot0", "public-key"]));
    assert_eq!(
        pod_pub.trim(),
        new_key,
        "the sidecar's interface uses the new key"
    );
    let not_ready = not_ready.await.unwrap();
    eprintln!("sidecar /ready answers other than 200 during the rotation: {not_ready:?}");
    assert!(
        not_ready.is_empty(),
        "/ready stays 200: {not_ready:?}\n{}",
        logs()
    );
}
