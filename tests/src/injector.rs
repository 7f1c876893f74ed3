//! The real `wg-injector serve` binary on a loopback port, plus the
//! `MutatingWebhookConfiguration` that points a test apiserver at it (the chart's webhook with
//! `clientConfig.url` instead of a Service).
//!
//! The binary is `target/debug/wg-injector`, built by the test command (`cargo build -p
//! wg-injector` before `cargo test -p wg-e2e`); [`InjectorProcess`] refuses to start without
//! it. It never builds anything itself: cargo holds the build lock while tests run.

use crate::lab::{cargo_binary, free_port, scratch_dir, write_private};
use crate::process::ChildGuard;
use anyhow::{bail, Context as _};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Name of the webhook inside the configuration (as in the chart).
pub const WEBHOOK_NAME: &str = "inject.wg-injector.io";

/// How the injector gets its certificate.
#[derive(Debug, Clone)]
pub enum Certificates {
    /// Files written by the test (a CA and a serving certificate from `wg-certs`), passed as
    /// `--tls-cert`/`--tls-key`: the "provided certificates" mode, no cluster permissions.
    Files,
    /// `--cert-mode self-managed` with these extra flags (secret, webhook config, lifetimes).
    SelfManaged(Vec<String>),
}

/// A running `wg-injector serve`, killed by PID on drop.
#[derive(Debug)]
pub struct InjectorProcess {
    /// The loopback port it listens on.
    pub port: u16,
    /// PEM of the CA that signed its certificate (Files mode; empty when self-managed).
    pub ca_pem: String,
    child: ChildGuard,
    dir: tempfile::TempDir,
}

impl InjectorProcess {
    /// Start `wg-injector serve` on a free loopback port with `config_yaml` as its config file,
    /// `kubeconfig` (if any) as `KUBECONFIG`, and certificates from `certs`.
    pub fn start(
        config_yaml: &str,
        kubeconfig: Option<&Path>,
        certs: &Certificates,
    ) -> anyhow::Result<Self> {
        Self::start_on(free_port()?, config_yaml, kubeconfig, certs)
    }

    /// [`Self::start`] on a given port (when the webhook registration must name it first).
    pub fn start_on(
        port: u16,
        config_yaml: &str,
        kubeconfig: Option<&Path>,
        certs: &Certificates,
    ) -> anyhow::Result<Self> {
        let bin = cargo_binary("wg-injector")?;
        let dir = scratch_dir("wg-e2e-injector-")?;
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, config_yaml)?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg(format!("--config={}", config.display()))
            .args(["--log-format=text", "--log-filter=info"])
            .env_remove("KUBECONFIG")
            // A start-up error is read from the tail of the output: keep it free of backtraces
            // (RUST_BACKTRACE may be set in the caller's environment).
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE");
        if let Some(kubeconfig) = kubeconfig {
            cmd.env("KUBECONFIG", kubeconfig);
        } else {
            cmd.arg("--discover-version=false");
        }
        let mut ca_pem = String::new();
        match certs {
            Certificates::Files => {
                let ca = wg_certs::generate_ca("wg-e2e test CA", Duration::from_secs(86_400))?;
                let serving = wg_certs::issue_serving_cert(
                    &ca,
                    &["127.0.0.1".to_owned()],
                    Duration::from_secs(86_400),
                )?;
                let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
                write_private(&cert, serving.cert_pem.as_bytes())?;
                write_private(&key, serving.key_pem.as_bytes())?;
                cmd.arg(format!("--tls-cert={}", cert.display()))
                    .arg(format!("--tls-key={}", key.display()));
                ca.cert_pem().clone_into(&mut ca_pem);
            }
            Certificates::SelfManaged(flags) => {
                cmd.arg("--cert-mode=self-managed").args(flags);
            }
        }
        let child = ChildGuard::spawn("wg-injector", cmd, dir.path())?;
        let mut injector = Self {
            port,
            ca_pem,
            child,
            dir,
        };
        injector.wait_listening()?;
        Ok(injector)
    }

    fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if !self.child.is_running() {
                bail!("wg-injector exited early\n{}", self.child.log_tail(4000));
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "wg-injector did not listen on {} within 30 s\n{}",
            self.port,
            self.child.log_tail(4000)
        )
    }

    /// `https://127.0.0.1:PORT/mutate`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/mutate", self.port)
    }

    /// The injector's log so far.
    #[must_use]
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// Kill the injector now (the failure-policy test).
    pub fn stop(&mut self) {
        self.child.stop();
    }

    /// The scratch folder (config, certificates, logs).
    #[must_use]
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

/// The chart's webhook registration, pointed at `url` and trusting `ca_pem` (empty: no
/// `caBundle`, the self-managed injector patches it in). `failurePolicy: Fail`,
/// `reinvocationPolicy: IfNeeded`, the chart's namespace and object selectors.
pub fn webhook_configuration(
    name: &str,
    url: &str,
    ca_pem: &str,
) -> anyhow::Result<MutatingWebhookConfiguration> {
    let mut client_config = serde_json::json!({ "url": url });
    if !ca_pem.is_empty() {
        use base64::Engine as _;
        client_config["caBundle"] = base64::engine::general_purpose::STANDARD
            .encode(ca_pem)
            .into();
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": name },
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "reinvocationPolicy": "IfNeeded",
            "matchPolicy": "Equivalent",
            "clientConfig": client_config,
            "rules": [{
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }],
            "namespaceSelector": { "matchExpressions": [
                { "key": "wg-injector.io/injection", "operator": "In", "values": ["enabled"] },
                { "key": "kubernetes.io/metadata.name", "operator": "NotIn",
                  "values": ["kube-system", "kube-public", "kube-node-lease", "wg-injector"] },
            ]},
            "objectSelector": { "matchExpressions": [
                { "key": "wg-injector.io/role", "operator": "NotIn", "values": ["injector"] },
            ]},
        }],
    }))
    .context("webhook configuration does not parse")
}

/// Start the injector with provided certificates (its token has no RBAC grant), register it
/// with `failurePolicy: Fail` and wait until the apiserver calls it: a dry-run Pod in a labelled
/// namespace `probe` comes back injected.
pub async fn start_registered(
    plane: &crate::control_plane::ControlPlane,
    config_yaml: &str,
) -> anyhow::Result<InjectorProcess> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, PostParams};
    plane.create_namespace("wg-injector", &[]).await?;
    let token = plane
        .service_account_token(
            "wg-injector",
            "wg-injector",
            "https://kubernetes.default.svc",
        )
        .await?;
    let kubeconfig = plane.write_kubeconfig("injector", &token)?;
    let injector = InjectorProcess::start(config_yaml, Some(&kubeconfig), &Certificates::Files)?;
    let client = plane.admin_client().await?;
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(
            &PostParams::default(),
            &webhook_configuration("wg-injector", &injector.url(), &injector.ca_pem)?,
        )
        .await?;
    plane
        .create_namespace("probe", &[("wg-injector.io/injection", "enabled")])
        .await?;
    let pods: Api<Pod> = Api::namespaced(client, "probe");
    let probe: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "probe", "annotations": { "wg-injector.io/inject": "true" } },
        "spec": { "serviceAccountName": "probe", "containers": [{ "name": "app", "image": "app:1" }] },
    }))?;
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        match pods.create(&dry, &probe).await {
            Ok(p)
                if p.spec
                    .iter()
                    .flat_map(|s| &s.containers)
                    .any(|c| c.name == "wg-sidecar") =>
            {
                return Ok(injector);
            }
            Ok(_) => last = "created without sidecar".into(),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!(
        "the apiserver never called the injector: {last}\n{}",
        injector.log()
    )
}
