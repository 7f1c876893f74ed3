//! `sidecar-mode: auto` against a real kube-apiserver 1.20 + etcd (the lab's, see LAB.md): the
//! injector reads every Node's kubelet version with the chart's own `ClusterRole`, and a kubelet
//! older than 1.29 (version skew) keeps `auto` classic.
//!
//! The Nodes are created through the API with a `status.nodeInfo.kubeletVersion` (Nodes may set
//! their status on create; there is no kubelet in this lab). The injector's side authenticates
//! as a user that holds only the chart's `<fullname>-nodes` `ClusterRole` (rendered with helm), so
//! the test fails if the chart stops granting what `cluster::kubelet_versions` needs.
//!
//! Prerequisites: `bash scripts/lab-install.sh` (etcd, kube-apiserver, helm). A missing piece
//! fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use serde_json::json;
use wg_injector::cluster::{self, Kubelet, KubeletIndex, NativeSidecars};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A lab binary from `$WG_LAB_BIN`, `.cache/lab/bin` or `PATH` (as `wg_e2e::lab::find_binary`).
fn find_binary(name: &str) -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("WG_LAB_BIN") {
        candidates.push(PathBuf::from(dir).join(name));
    }
    candidates.push(workspace_root().join(".cache/lab/bin").join(name));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|dir| dir.join(name)));
    }
    candidates
        .into_iter()
        .find(|c| c.is_file())
        .unwrap_or_else(|| {
            panic!("lab component `{name}` not found in $WG_LAB_BIN, .cache/lab/bin or PATH; run `bash scripts/lab-install.sh`")
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn random_token() -> String {
    let mut bytes = [0_u8; 16];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    bytes.iter().fold(String::new(), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

fn run(command: &mut Command) {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// etcd + kube-apiserver, killed (by their own PIDs) on drop.
struct ControlPlane {
    dir: tempfile::TempDir,
    url: String,
    children: Vec<Child>,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl ControlPlane {
    fn start(users: &[(&str, &str, &str)]) -> Self {
        let (etcd, apiserver) = (find_binary("etcd"), find_binary("kube-apiserver"));
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (sa_key, sa_pub) = (root.join("sa.key"), root.join("sa.pub"));
        run(Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&sa_key)
            .arg("2048"));
        run(Command::new("openssl")
            .args(["rsa", "-in"])
            .arg(&sa_key)
            .args(["-pubout", "-out"])
            .arg(&sa_pub));
        let tokens = users
            .iter()
            .fold(String::new(), |mut csv, (token, user, groups)| {
                let _ = writeln!(csv, "{token},{user},{user},\"{groups}\"");
                csv
            });
        std::fs::write(root.join("tokens.csv"), tokens).unwrap();
        let (client, peer, secure) = (free_port(), free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = |name: &str| {
            Stdio::from(std::fs::File::create(root.join(format!("{name}.log"))).unwrap())
        };
        let mut children = vec![Command::new(etcd)
            .args(["--name", "t", "--data-dir"])
            .arg(root.join("etcd"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .arg("--unsafe-no-fsync")
            .stdout(log("etcd"))
            .stderr(log("etcd-err"))
            .spawn()
            .unwrap()];
        children.push(
            Command::new(apiserver)
                .arg(format!("--etcd-servers={client_url}"))
                .arg(format!("--cert-dir={}", root.join("certs").display()))
                .arg(format!("--secure-port={secure}"))
                .args([
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    "--service-cluster-ip-range=10.0.0.0/24",
                    "--authorization-mode=RBAC",
                    "--disable-admission-plugins=ServiceAccount",
                    "--service-account-issuer=https://kubernetes.default.svc",
                    "--insecure-port=0",
                ])
                .arg(format!("--service-account-key-file={}", sa_pub.display()))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    sa_key.display()
                ))
                .arg(format!(
                    "--token-auth-file={}",
                    root.join("tokens.csv").display()
                ))
                .stdout(log("apiserver"))
                .stderr(log("apiserver-err"))
                .spawn()
                .unwrap(),
        );
        Self {
            dir,
            url: format!("https://127.0.0.1:{secure}"),
            children,
        }
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// A client authenticated with `token` (through a kubeconfig file: no token in argv).
    async fn client(&self, name: &str, token: &str) -> kube::Client {
        let ca = self.dir.path().join("certs/apiserver.crt");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ca.is_file() {
            assert!(Instant::now() < deadline, "{}", self.log("apiserver-err"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        let kubeconfig = json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "t",
            "clusters": [{"name": "t", "cluster": {"server": self.url, "certificate-authority": ca}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "t", "context": {"cluster": "t", "user": name}}],
        });
        std::fs::write(&path, serde_json::to_vec(&kubeconfig).unwrap()).unwrap();
        let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        // As `wg-injector serve` does at start: the workspace's crate graph enables two rustls
        // providers, so kube cannot pick one by itself.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = kube::Client::try_from(config).unwrap();
        loop {
            match client.apiserver_version().await {
                Ok(_) => return client,
                Err(e) if Instant::now() > deadline => {
                    panic!(
                        "kube-apiserver not ready: {e}\n{}",
                        self.log("apiserver-err")
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// The chart's `<fullname>-nodes` `ClusterRole` as `helm template` renders it (default values,
/// Kubernetes 1.20).
fn chart_nodes_role() -> ClusterRole {
    let out = Command::new(find_binary("helm"))
        .args(["template", "t", "--kube-version", "1.20.2"])
        .arg(workspace_root().join("charts/wg-injector"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value: serde_json::Value = serde::Deserialize::deserialize(document).unwrap();
        if value["kind"] == "ClusterRole" && value["metadata"]["name"] == "t-wg-injector-nodes" {
            return serde_json::from_value(value).unwrap();
        }
    }
    panic!("the chart renders no ClusterRole t-wg-injector-nodes");
}

/// The next event of the Node watch, within 20 s.
async fn next_event(
    events: &mut std::pin::Pin<
        Box<impl Stream<Item = Result<watcher::Event<Node>, watcher::Error>>>,
    >,
) -> watcher::Event<Node> {
    tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .expect("a Node watch event within 20 s")
        .expect("the watch does not end")
        .expect("the chart's ClusterRole allows the watch")
}

fn node(name: &str, kubelet_version: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "status": {"nodeInfo": {
            "kubeletVersion": kubelet_version, "kubeProxyVersion": kubelet_version,
            "architecture": "amd64", "bootID": "", "containerRuntimeVersion": "containerd://1.6.20",
            "kernelVersion": "6.1.0", "machineID": "", "operatingSystem": "linux",
            "osImage": "Debian GNU/Linux 12", "systemUUID": ""
        }}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_lets_the_injector_read_every_kubelet_version_and_one_older_than_1_29_keeps_auto_classic(
) {
    let (admin_token, injector_token) = (random_token(), random_token());
    let plane = ControlPlane::start(&[
        (&admin_token, "admin", "system:masters"),
        (&injector_token, "wg-injector", "wg-injector"),
    ]);
    let admin = plane.client("admin", &admin_token).await;
    let injector = plane.client("wg-injector", &injector_token).await;

    let nodes: Api<Node> = Api::all(admin.clone());
    for (name, version) in [
        ("new-a", "v1.30.2"),
        ("new-b", "v1.29.0-eks-1"),
        ("old", "v1.28.9"),
    ] {
        nodes
            .create(&PostParams::default(), &node(name, version))
            .await
            .unwrap();
    }

    // Without the chart's ClusterRole the Nodes are forbidden, and the error says which grant.
    let denied = cluster::kubelet_versions(&injector).await.unwrap_err();
    assert!(denied.to_string().contains("RBAC: list nodes"), "{denied}");

    let mut role = chart_nodes_role();
    assert_eq!(
        serde_json::to_value(&role.rules).unwrap(),
        json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}])
    );
    role.metadata.labels = None;
    Api::<ClusterRole>::all(admin.clone())
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "t-wg-injector-nodes"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "t-wg-injector-nodes"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "wg-injector"}],
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();

    // RBAC takes effect within moments (the authorizer's informer).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut kubelets = loop {
        match cluster::kubelet_versions(&injector).await {
            Ok(kubelets) => break kubelets,
            Err(e) if Instant::now() > deadline => panic!("{e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    kubelets.sort_by(|a, b| a.node.cmp(&b.node));
    let kubelet = |node: &str, version: &str| Kubelet {
        node: node.to_owned(),
        version: version.to_owned(),
    };
    assert_eq!(
        kubelets,
        [
            kubelet("new-a", "v1.30.2"),
            kubelet("new-b", "v1.29.0-eks-1"),
            kubelet("old", "v1.28.9")
        ]
    );
    // A 1.30 apiserver over these Nodes: the 1.28 kubelet keeps auto classic, named.
    assert_eq!(
        cluster::native_sidecars((1, 30), &kubelets),
        NativeSidecars::OldKubelets(vec![kubelet("old", "v1.28.9")])
    );
    // The watch the refresh task keeps, with the same grant (`watch`): the index holds the
    // three Nodes after the list, then follows a delete.
    let mut events = Box::pin(cluster::kubelet_events(&injector));
    let mut index = KubeletIndex::default();
    while !index.synced() {
        index.apply(next_event(&mut events).await);
    }
    assert_eq!(index.kubelets(), kubelets);
    nodes
        .delete("old", &kube::api::DeleteParams::default())
        .await
        .unwrap();
    while index.kubelets().len() == 3 {
        index.apply(next_event(&mut events).await);
    }
    // Without the old kubelet, native.
    assert!(cluster::native_sidecars((1, 30), &index.kubelets()).native());
    assert_eq!(
        cluster::kubelet_versions(&injector).await.unwrap(),
        index.kubelets()
    );
    // And this apiserver itself is 1.20: classic, whatever its Nodes run.
    assert!(!cluster::discover_native_sidecars(&injector).await.unwrap());
}
