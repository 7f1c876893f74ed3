//! A real Kubernetes control plane for one test: etcd + kube-apiserver (and, on request,
//! kube-controller-manager) on free loopback ports, with an admin client built from a static
//! token and the apiserver's own CA.
//!
//! Everything it starts is killed by PID when the [`ControlPlane`] drops, also when the test
//! panics. It never touches the system etcd on :2379 or anything outside its scratch folder.

use crate::lab::{find_binary, free_port, scratch_dir, write_private};
use crate::process::ChildGuard;
use anyhow::{bail, Context as _};
use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long the apiserver may take to become ready (about 1–2 s on a warm machine).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// etcd + kube-apiserver (+ optional controller manager), torn down on drop.
pub struct ControlPlane {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// PEM of the apiserver's serving certificate chain (its self-signed CA included).
    pub ca_pem: String,
    admin_token: String,
    sa_key: PathBuf,
    // Drop order matters: processes first, then the folder holding their data.
    controller_manager: Option<ChildGuard>,
    apiserver: ChildGuard,
    etcd: ChildGuard,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("url", &self.url)
            .field("apiserver_pid", &self.apiserver.pid())
            .field("etcd_pid", &self.etcd.pid())
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Start etcd and kube-apiserver and wait until the apiserver serves requests.
    /// Retries with fresh ports when a port was taken between probing and binding.
    pub async fn start() -> anyhow::Result<Self> {
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once().await {
                Ok(plane) => return Ok(plane),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("control plane did not start")))
    }

    async fn start_once() -> anyhow::Result<Self> {
        let etcd_bin = find_binary("etcd")?;
        let apiserver_bin = find_binary("kube-apiserver")?;
        let dir = scratch_dir("wg-e2e-kube-")?;
        let root = dir.path();

        let sa_key = root.join("sa.key");
        let sa_pub = root.join("sa.pub");
        run_checked(
            Command::new("openssl")
                .args(["genrsa", "-out"])
                .arg(&sa_key)
                .arg("2048"),
        )?;
        run_checked(
            Command::new("openssl")
                .args(["rsa", "-in"])
                .arg(&sa_key)
                .args(["-pubout", "-out"])
                .arg(&sa_pub),
        )?;
        let admin_token = random_token("admin");
        write_private(
            &root.join("tokens.csv"),
            format!("{admin_token},admin,admin,system:masters\n").as_bytes(),
        )?;

        let (client_port, peer_port, secure_port) = (free_port()?, free_port()?, free_port()?);
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd_cmd = Command::new(etcd_bin);
        etcd_cmd
            .args(["--name", "t", "--data-dir"])
            .arg(root.join("etcd"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .arg("--unsafe-no-fsync");
        let etcd = ChildGuard::spawn("etcd", etcd_cmd, root)?;

        let mut api_cmd = Command::new(apiserver_bin);
        api_cmd
            .arg(format!("--etcd-servers={client_url}"))
            .arg(format!("--cert-dir={}", root.join("certs").display()))
            .arg(format!("--secure-port={secure_port}"))
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
            ));
        let apiserver = ChildGuard::spawn("kube-apiserver", api_cmd, root)?;

        let mut plane = Self {
            url: format!("https://127.0.0.1:{secure_port}"),
            ca_pem: String::new(),
            admin_token,
            sa_key,
            controller_manager: None,
            apiserver,
            etcd,
            dir,
        };
        plane.wait_ready().await?;
        Ok(plane)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let crt = self.dir.path().join("certs/apiserver.crt");
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_err = String::from("not tried yet");
        while Instant::now() < deadline {
            if !self.apiserver.is_running() || !self.etcd.is_running() {
                bail!(
                    "control plane exited early\n{}\n{}",
                    self.etcd.log_tail(2000),
                    self.apiserver.log_tail(4000)
                );
            }
            if self.ca_pem.is_empty() {
                if let Ok(pem) = std::fs::read_to_string(&crt) {
                    if pem.contains("END CERTIFICATE") {
                        self.ca_pem = pem;
                    }
                }
            }
            if !self.ca_pem.is_empty() {
                match self.admin_client().await {
                    Ok(client) => {
                        let namespaces: Api<Namespace> = Api::all(client);
                        match namespaces.get_opt("default").await {
                            Ok(Some(_)) => return Ok(()),
                            Ok(None) => last_err = "namespace default not created yet".into(),
                            Err(err) => last_err = err.to_string(),
                        }
                    }
                    Err(err) => last_err = err.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!(
            "kube-apiserver not ready after {READY_TIMEOUT:?}: {last_err}\n{}",
            self.apiserver.log_tail(4000)
        )
    }

    /// The scratch folder of this control plane (logs, certificates, kubeconfigs).
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The apiserver's CA as a file (for OpenBao's `kubernetes_ca_cert` or a webhook client).
    #[must_use]
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("certs/apiserver.crt")
    }

    /// A kubeconfig (YAML) that authenticates with `token`.
    #[must_use]
    pub fn kubeconfig_yaml(&self, token: &str) -> String {
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca_pem.as_bytes());
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: u\ncurrent-context: lab\n",
            self.url
        )
    }

    /// Write a kubeconfig for `token` (mode 0600, in the memory-backed scratch folder).
    pub fn write_kubeconfig(&self, name: &str, token: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        write_private(&path, self.kubeconfig_yaml(token).as_bytes())?;
        Ok(path)
    }

    /// A client authenticated with `token`.
    pub async fn client_with_token(&self, token: &str) -> anyhow::Result<kube::Client> {
        // Several crates enable rustls features; pick ring (the workspace's provider) once.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kubeconfig = Kubeconfig::from_yaml(&self.kubeconfig_yaml(token))?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A cluster-admin client (static token in `system:masters`).
    pub async fn admin_client(&self) -> anyhow::Result<kube::Client> {
        self.client_with_token(&self.admin_token).await
    }

    /// A kubeconfig for the admin user.
    pub fn admin_kubeconfig(&self) -> anyhow::Result<PathBuf> {
        self.write_kubeconfig("admin", &self.admin_token.clone())
    }

    /// Start `kube-controller-manager` (Deployments → `ReplicaSets` → Pods) against this apiserver.
    pub fn start_controller_manager(&mut self) -> anyhow::Result<()> {
        let bin = find_binary("kube-controller-manager")?;
        let kubeconfig = self.admin_kubeconfig()?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!(
                "--service-account-private-key-file={}",
                self.sa_key.display()
            ))
            .args([
                "--leader-elect=false",
                "--controllers=*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-route,-service",
                "--secure-port=0",
                "--port=0",
            ]);
        self.controller_manager = Some(ChildGuard::spawn(
            "kube-controller-manager",
            cmd,
            self.dir.path(),
        )?);
        Ok(())
    }

    /// The controller manager's recent output (empty when not started).
    #[must_use]
    pub fn controller_manager_log(&self) -> String {
        self.controller_manager
            .as_ref()
            .map(|cm| cm.log_tail(4000))
            .unwrap_or_default()
    }

    /// The apiserver's recent output.
    #[must_use]
    pub fn apiserver_log(&self) -> String {
        self.apiserver.log_tail(6000)
    }

    /// Create a namespace carrying `labels`.
    pub async fn create_namespace(
        &self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let client = self.admin_client().await?;
        let namespaces: Api<Namespace> = Api::all(client);
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("failed to create namespace {name}"))?;
        Ok(())
    }

    /// Create a ServiceAccount (if missing) and return a token for it from the `TokenRequest` API
    /// with `audience` and a lifetime of one hour.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        audience: &str,
    ) -> anyhow::Result<String> {
        let client = self.admin_client().await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client, namespace);
        if accounts.get_opt(name).await?.is_none() {
            let sa = ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    ..ObjectMeta::default()
                },
                ..ServiceAccount::default()
            };
            accounts.create(&PostParams::default(), &sa).await?;
        }
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.to_owned()],
                expiration_seconds: Some(3600),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let answer = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for {namespace}/{name} failed"))?;
        answer
            .status
            .map(|status| status.token)
            .context("TokenRequest answered without a token")
    }
}

fn run_checked(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("failed to run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// An unguessable token for test-only static credentials (never leaves the test process and
/// its scratch folder).
#[must_use]
pub fn random_token(prefix: &str) -> String {
    use std::fmt::Write as _;
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut out = String::from(prefix);
    for _ in 0..4 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let _ = write!(out, "{:016x}", hasher.finish());
    }
    out
}
