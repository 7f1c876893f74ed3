//! A real single-node Kubernetes 1.20 cluster for one test: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kube-proxy, containerd (+ runc, CNI bridge) and a
//! kubelet, all inside a network namespace and a private mount namespace of the fixture's own.
//!
//! The recipe is `../shared/lab-node/RECIPE.md`; the binaries come from `scripts/lab-install.sh`.
//! Why the two namespaces: the kubelet and containerd write fixed host paths (`/var/lib/kubelet`,
//! `/var/lib/cni`, `/var/log/pods`, `/run/containerd`) and host-global sysctls
//! (`vm.overcommit_memory`, `kernel.panic`, `kernel.panic_on_oops`); the mount namespace gives
//! them copy-on-write overlays and pre-set sysctl files, and the network namespace keeps cni0,
//! the Pods' veths, kube-proxy's iptables rules and forwarding off the host. The node has no
//! route out: it reaches only itself and the networks a test attaches ([`Node::attach_network`]).
//!
//! Owns: bringing the node up (measured: [`Node::ready_after`]), importing images, running
//! commands inside it (kubectl, helm, anything), and tearing it all down by PID.
//! Must never: signal a process it did not start (containerd's shims are found by the fixture's
//! own socket path in their argv, then killed by PID), touch the host's network, or leave a
//! mount, cgroup, namespace or sysctl behind — [`Node::stop`] checks that and says what is left.

use crate::control_plane::random_token;
use crate::lab::{find_binary, workspace_root, write_private};
use crate::process::ChildGuard;
use anyhow::{bail, Context as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The node's address (on `lo` of its network namespace): kubelet, apiserver and `NodePorts`.
pub const NODE_IP: &str = "10.201.0.1";
/// The Pods' network (CNI bridge `cni0`, host-local IPAM); the bridge holds `.1`.
pub const POD_CIDR: &str = "10.244.0.0/24";
/// The Services' network (kube-proxy, iptables mode).
pub const SERVICE_CIDR: &str = "10.96.0.0/24";
/// The apiserver's port on the node (`https://10.201.0.1:26443`, also `127.0.0.1` inside).
pub const API_PORT: u16 = 26443;
/// The node's name.
pub const NODE_NAME: &str = "wg-node";
/// The sandbox image (built from Kubernetes' `pause.c` by `scripts/build-images.sh`).
pub const PAUSE_IMAGE: &str = "localhost/wg-e2e-pause:3.4";

/// Host-global sysctls the kubelet would write (`setupKernelTunables`); read before and after.
const WATCHED_SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
    "net/ipv4/ip_forward",
];

/// Nodes started by this process (part of the netns and cgroup names).
static NODES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A running node; everything is killed by PID on [`Node::stop`] or drop.
pub struct Node {
    /// The network namespace (`/run/netns/<name>`).
    pub netns: String,
    /// Time from nothing to `Ready` of the node object.
    pub ready_after: Duration,
    started: Instant,
    admin_token: String,
    cgroup_root: String,
    host_sysctls: Vec<(String, String)>,
    bin_dir: PathBuf,
    holder: Option<ChildGuard>,
    /// Started in order, stopped in reverse.
    daemons: Vec<(String, ChildGuard)>,
    networks: Vec<String>,
    stopped: bool,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("netns", &self.netns)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// What [`Node::stop`] found left behind (empty = clean).
#[derive(Debug, Default)]
pub struct Leftovers(pub Vec<String>);

impl Node {
    /// Bring a node up from nothing and import `images` (local podman references, e.g.
    /// `localhost/wg-sidecar:0.1.0`) into its containerd, plus the pause image.
    pub fn start(images: &[&str]) -> anyhow::Result<Self> {
        let t0 = Instant::now();
        let bin_dir = find_binary("kubelet")?
            .parent()
            .map(Path::to_path_buf)
            .context("kubelet has no folder")?;
        for needed in [
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kube-proxy",
            "kubectl",
            "helm",
        ] {
            find_binary(needed)?;
        }
        for tool in [
            "containerd",
            "ctr",
            "runc",
            "etcd",
            "nsenter",
            "unshare",
            "iptables",
            "conntrack",
            "podman",
            "openssl",
        ] {
            find_binary(tool)?;
        }
        if !Path::new("/usr/lib/cni/bridge").is_file() {
            bail!("CNI plugins missing in /usr/lib/cni; run `bash scripts/lab-install.sh`");
        }
        remove_stale_netns();
        let n = NODES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let netns = format!("wgn-{}-{n}", std::process::id());
        // Short paths: containerd's sockets must fit in 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("wgn-")
            .tempdir_in("/tmp")
            .context("failed to create the node folder")?;
        let mut node = Self {
            netns: netns.clone(),
            ready_after: Duration::ZERO,
            started: t0,
            admin_token: random_token("admin"),
            cgroup_root: netns.clone(),
            host_sysctls: read_sysctls(),
            bin_dir,
            holder: None,
            daemons: Vec::new(),
            networks: Vec::new(),
            stopped: false,
            dir,
        };
        node.write_files()?;
        node.make_netns()?;
        node.start_holder()?;
        node.start_runtime(images)?;
        node.start_control_plane()?;
        node.start_kubelet()?;
        node.ready_after = t0.elapsed();
        Ok(node)
    }

    /// The node's scratch folder (logs under `logs/`).
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The admin kubeconfig (usable inside the node only: the apiserver is on the node address).
    #[must_use]
    pub fn kubeconfig(&self) -> PathBuf {
        self.path("kubeconfig")
    }

    /// The apiserver's CA certificate (for Vault's `kubernetes_ca_cert`).
    #[must_use]
    pub fn ca_file(&self) -> PathBuf {
        self.path("apiserver/apiserver.crt")
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn logs(&self) -> PathBuf {
        self.path("logs")
    }

    /// A command run inside the node (its network and mount namespaces), with the lab's
    /// binaries first on `PATH`, `KUBECONFIG` set and the workspace root as working folder.
    #[must_use]
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        let holder = self.holder.as_ref().map_or(0, ChildGuard::pid);
        cmd.arg("-t")
            .arg(holder.to_string())
            .args(["-m", "-n"])
            .arg(format!("--wd={}", workspace_root().display()))
            .arg("--")
            .arg(program)
            .env("PATH", self.path_env())
            .env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.path("home"));
        cmd
    }

    /// The `PATH` commands inside the node get: the lab binaries first, then the system.
    #[must_use]
    pub fn path_env(&self) -> String {
        format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            self.bin_dir.display()
        )
    }

    /// Start a long-running process inside the node; the caller owns it (killed by PID on drop).
    pub fn spawn(&self, name: &str, program: &str, args: &[&str]) -> anyhow::Result<ChildGuard> {
        let mut cmd = self.command(program);
        cmd.args(args);
        ChildGuard::spawn(name, cmd, &self.logs())
    }

    /// Run `program ARGS` inside the node and return its output (not checked).
    pub fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = self.command(program);
        cmd.args(args);
        cmd.output()
            .with_context(|| format!("failed to run {program} {args:?} in the node"))
    }

    /// Run `program ARGS` inside the node; its stdout, or an error with both streams.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run(program, args)?;
        if !out.status.success() {
            bail!(
                "`{program} {}` failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl ARGS` with the admin kubeconfig; stdout or an error.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.run_ok("kubectl", args)
    }

    /// `kubectl ARGS -o json`, parsed.
    pub fn kubectl_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.kubectl(&all)?;
        serde_json::from_str(&text).with_context(|| format!("kubectl {args:?}: not JSON"))
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<String> {
        use std::io::Write as _;
        let mut cmd = self.command("kubectl");
        cmd.args(["apply", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().context("failed to start kubectl apply")?;
        child
            .stdin
            .take()
            .context("kubectl has no stdin")?
            .write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl apply failed: {}{}\n---\n{yaml}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Run a bash script inside the node (`bash -euo pipefail`), with `env` added; the output.
    pub fn bash(&self, script: &str, env: &[(&str, &str)]) -> anyhow::Result<Output> {
        let mut cmd = self.command("bash");
        cmd.args(["-euo", "pipefail", "-c", script]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().context("failed to run bash in the node")
    }

    /// Poll `check` every 200 ms until it returns `Ok(Some(v))` or `timeout` passes; the error
    /// names `what` and the last failure.
    pub fn wait_for<T>(
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match check() {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => "not yet".to_owned(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for {what}: {last}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A network namespace `name` joined to the node by a veth: the node side is
    /// `<prefix>.1/24`, the far side `<prefix>.2/24` with its default route to the node. Pods
    /// (and so the gateway) route to it through the node; it is removed with the node.
    pub fn attach_network(&mut self, name: &str, prefix: &str) -> anyhow::Result<()> {
        let host_if = format!("{}-n", &name[..name.len().min(12)]);
        let far_if = format!("{}-f", &name[..name.len().min(12)]);
        ip(&["netns", "add", name])?;
        self.networks.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        ip(&[
            "link",
            "add",
            &host_if,
            "netns",
            &self.netns,
            "type",
            "veth",
            "peer",
            "name",
            &far_if,
            "netns",
            name,
        ])?;
        ip(&[
            "-n",
            &self.netns,
            "addr",
            "add",
            &format!("{prefix}.1/24"),
            "dev",
            &host_if,
        ])?;
        ip(&["-n", &self.netns, "link", "set", &host_if, "up"])?;
        ip(&[
            "-n",
            name,
            "addr",
            "add",
            &format!("{prefix}.2/24"),
            "dev",
            &far_if,
        ])?;
        ip(&["-n", name, "link", "set", &far_if, "up"])?;
        ip(&[
            "-n",
            name,
            "route",
            "add",
            "default",
            "via",
            &format!("{prefix}.1"),
        ])?;
        Ok(())
    }

    fn write_files(&self) -> anyhow::Result<()> {
        let d = self.dir.path();
        for sub in [
            "run",
            "logs",
            "etcd",
            "apiserver",
            "containerd",
            "kubelet",
            "cni/net.d",
            "cni/ipam",
            "cni/cache",
            "images",
            "home",
            "sysctl",
            "kcm-flex",
            "ns",
        ] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        run_checked(
            Command::new("openssl")
                .args(["genrsa", "-out"])
                .arg(d.join("sa.key"))
                .arg("2048"),
        )?;
        run_checked(
            Command::new("openssl")
                .args(["rsa", "-in"])
                .arg(d.join("sa.key"))
                .args(["-pubout", "-out"])
                .arg(d.join("sa.pub")),
        )?;
        write_private(
            &d.join("tokens.csv"),
            format!("{},admin,admin,system:masters\n", self.admin_token).as_bytes(),
        )?;
        write_private(
            &d.join("kubeconfig"),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: node\n  cluster:\n    server: https://{NODE_IP}:{API_PORT}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: node\n  context: {{cluster: node, user: admin}}\ncurrent-context: node\n",
                ca = self.ca_file().display(),
                token = self.admin_token
            )
            .as_bytes(),
        )?;
        // The values the kubelet wants, so it finds nothing to write (bind-mounted in ns-init).
        for (file, value) in [
            ("overcommit_memory", "1"),
            ("panic", "10"),
            ("panic_on_oops", "1"),
        ] {
            std::fs::write(d.join("sysctl").join(file), format!("{value}\n"))?;
        }
        std::fs::write(d.join("ns-init.sh"), ns_init_script(d))?;
        std::fs::write(d.join("containerd.toml"), containerd_config(d))?;
        std::fs::write(d.join("cni/net.d/10-wg-node.conflist"), cni_config(d))?;
        Ok(())
    }

    fn make_netns(&self) -> anyhow::Result<()> {
        ip(&["netns", "add", &self.netns])?;
        ip(&["-n", &self.netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &self.netns,
            "addr",
            "add",
            &format!("{NODE_IP}/32"),
            "dev",
            "lo",
        ])?;
        // The node has no default route, and a local connect() to a Service address needs a
        // route before kube-proxy's OUTPUT DNAT rewrites it (then the kernel re-routes). Source
        // the node address, which the Pods can answer.
        let netns = self.netns.as_str();
        ip(&[
            "-n",
            netns,
            "route",
            "add",
            SERVICE_CIDR,
            "dev",
            "lo",
            "src",
            NODE_IP,
        ])?;
        Ok(())
    }

    fn start_holder(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .args([
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "slave",
                "--",
                "sh",
            ])
            .arg(self.path("ns-init.sh"));
        let holder = ChildGuard::spawn("holder", cmd, &self.logs())?;
        self.holder = Some(holder);
        let ready = self.path("run/ns-ready");
        Self::wait_for(
            "the mount namespace holder",
            Duration::from_secs(10),
            || Ok(ready.exists().then_some(())),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}\n{}",
                self.holder
                    .as_ref()
                    .map(|h| h.log_tail(2000))
                    .unwrap_or_default()
            )
        })
    }

    fn daemon(&mut self, name: &str, program: &Path, args: &[String]) -> anyhow::Result<()> {
        let mut cmd = self.command(&program.display().to_string());
        cmd.args(args);
        let child = ChildGuard::spawn(name, cmd, &self.logs())?;
        self.daemons.push((name.to_owned(), child));
        Ok(())
    }

    /// The last output of a node daemon (`kubelet`, `containerd`, `kube-apiserver`, …).
    #[must_use]
    pub fn log_of(&self, name: &str) -> String {
        self.daemons
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.log_tail(4000))
            .unwrap_or_default()
    }

    fn stamp(&self, what: &str) {
        eprintln!(
            "[node {:6.2}s] {what}",
            self.started.elapsed().as_secs_f64()
        );
    }

    /// containerd (with the images) and etcd.
    fn start_runtime(&mut self, images: &[&str]) -> anyhow::Result<()> {
        let d = self.dir.path().to_path_buf();
        let p = |rel: &str| d.join(rel).display().to_string();
        let bin = |name: &str| find_binary(name);

        self.daemon(
            "containerd",
            &bin("containerd")?,
            &["--config".into(), p("containerd.toml")],
        )?;
        self.daemon(
            "etcd",
            &bin("etcd")?,
            &[
                "--name",
                "node",
                "--data-dir",
                &p("etcd"),
                "--listen-client-urls",
                "http://127.0.0.1:22379",
                "--advertise-client-urls",
                "http://127.0.0.1:22379",
                "--listen-peer-urls",
                "http://127.0.0.1:22380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:22380",
                "--initial-cluster",
                "node=http://127.0.0.1:22380",
                "--unsafe-no-fsync",
            ]
            .map(String::from),
        )?;
        let ctr_sock = p("run/containerd.sock");
        Self::wait_for("containerd", Duration::from_secs(30), || {
            Ok(self
                .run("ctr", &["--address", &ctr_sock, "version"])?
                .status
                .success()
                .then_some(()))
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.log_of("containerd")))?;
        self.stamp("containerd up");
        let mut refs: Vec<&str> = images.to_vec();
        refs.push(PAUSE_IMAGE);
        self.import_images(&refs)?;
        self.stamp("images imported");
        Ok(())
    }

    /// kube-apiserver, controller manager, scheduler and kube-proxy.
    fn start_control_plane(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path().to_path_buf();
        let p = |rel: &str| d.join(rel).display().to_string();
        let bin = |name: &str| find_binary(name);
        let api_args = [
            "--etcd-servers=http://127.0.0.1:22379".to_owned(),
            format!("--cert-dir={}", p("apiserver")),
            format!("--secure-port={API_PORT}"),
            "--insecure-port=0".into(),
            "--bind-address=0.0.0.0".into(),
            format!("--advertise-address={NODE_IP}"),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=Node,RBAC".into(),
            "--kubelet-preferred-address-types=InternalIP".into(),
            "--service-node-port-range=30000-32767".into(),
        ];
        self.daemon("kube-apiserver", &bin("kube-apiserver")?, &api_args)?;
        Self::wait_for("kube-apiserver /readyz", Duration::from_secs(90), || {
            self.run_ok("kubectl", &["get", "--raw", "/readyz"])
                .map(|_| Some(()))
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.log_of("kube-apiserver")))?;
        self.stamp("kube-apiserver ready");

        let kc = self.kubeconfig().display().to_string();
        self.daemon(
            "kube-controller-manager",
            &bin("kube-controller-manager")?,
            &[
                format!("--kubeconfig={kc}"),
                format!("--service-account-private-key-file={}", p("sa.key")),
                format!("--root-ca-file={}", self.ca_file().display()),
                "--leader-elect=false".into(),
                "--controllers=*,-nodeipam,-cloud-node-lifecycle,-route,-service".into(),
                "--secure-port=0".into(),
                "--port=0".into(),
                format!("--flex-volume-plugin-dir={}", p("kcm-flex")),
            ],
        )?;
        self.daemon(
            "kube-scheduler",
            &bin("kube-scheduler")?,
            &[
                format!("--kubeconfig={kc}"),
                "--leader-elect=false".into(),
                "--port=0".into(),
                "--secure-port=0".into(),
            ],
        )?;
        // kube-proxy only writes per-namespace sysctls here: conntrack sizing (global) is off.
        self.daemon(
            "kube-proxy",
            &bin("kube-proxy")?,
            &[
                format!("--kubeconfig={kc}"),
                format!("--hostname-override={NODE_NAME}"),
                format!("--bind-address={NODE_IP}"),
                format!("--cluster-cidr={POD_CIDR}"),
                "--proxy-mode=iptables".into(),
                "--conntrack-max-per-core=0".into(),
                "--conntrack-min=0".into(),
                "--conntrack-tcp-timeout-established=0".into(),
                "--conntrack-tcp-timeout-close-wait=0".into(),
                "--metrics-bind-address=127.0.0.1:10249".into(),
                "--healthz-bind-address=127.0.0.1:10256".into(),
            ],
        )?;
        Ok(())
    }

    /// The kubelet, until the node is Ready and the default ServiceAccount exists.
    fn start_kubelet(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path().to_path_buf();
        let p = |rel: &str| d.join(rel).display().to_string();
        let bin = |name: &str| find_binary(name);
        let ctr_sock = p("run/containerd.sock");
        let kc = self.kubeconfig().display().to_string();

        // The kubelet's own cgroup root, in every v1 hierarchy it needs.
        for h in cgroup_hierarchies() {
            std::fs::create_dir_all(h.join(&self.cgroup_root))
                .with_context(|| format!("failed to create cgroup {}", h.display()))?;
        }
        let kubelet_args = [
            format!("--kubeconfig={kc}"),
            "--container-runtime=remote".into(),
            format!("--container-runtime-endpoint=unix://{ctr_sock}"),
            format!("--containerd={ctr_sock}"),
            "--cgroup-driver=cgroupfs".into(),
            "--fail-swap-on=false".into(),
            "--cgroups-per-qos=true".into(),
            "--enforce-node-allocatable=pods".into(),
            format!("--cgroup-root=/{}", self.cgroup_root),
            format!("--root-dir={}", p("kubelet")),
            format!("--cert-dir={}", p("kubelet/pki")),
            format!("--volume-plugin-dir={}", p("kubelet/volume-plugins")),
            format!("--seccomp-profile-root={}", p("kubelet/seccomp")),
            "--register-node=true".into(),
            format!("--hostname-override={NODE_NAME}"),
            format!("--node-ip={NODE_IP}"),
            format!("--address={NODE_IP}"),
            "--read-only-port=0".into(),
            "--healthz-bind-address=127.0.0.1".into(),
            "--make-iptables-util-chains=false".into(),
            "--eviction-hard=memory.available<100Mi,nodefs.available<1%,imagefs.available<1%"
                .into(),
            "--image-gc-high-threshold=100".into(),
            "--image-gc-low-threshold=99".into(),
            "--node-status-update-frequency=1s".into(),
            "--v=2".into(),
        ];
        self.daemon("kubelet", &bin("kubelet")?, &kubelet_args)?;
        Self::wait_for("node Ready", Duration::from_secs(120), || {
            let out = self.run(
                "kubectl",
                &[
                    "get",
                    "node",
                    NODE_NAME,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ],
            )?;
            Ok((String::from_utf8_lossy(&out.stdout).trim() == "True").then_some(()))
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.log_of("kubelet")))?;
        self.stamp("node Ready");
        Self::wait_for(
            "the default ServiceAccount",
            Duration::from_secs(60),
            || {
                Ok(self
                    .run("kubectl", &["-n", "default", "get", "sa", "default"])?
                    .status
                    .success()
                    .then_some(()))
            },
        )?;
        Ok(())
    }

    /// Import local podman images into the node's containerd (`podman save` + `ctr import`).
    pub fn import_images(&self, refs: &[&str]) -> anyhow::Result<()> {
        let ctr_sock = self.path("run/containerd.sock").display().to_string();
        for reference in refs {
            let tar = self
                .path("images")
                .join(format!("{}.tar", reference.replace(['/', ':'], "_")));
            let tar_path = tar.display().to_string();
            crate::podman::podman_ok(&[
                "save",
                "--format",
                "docker-archive",
                "-o",
                &tar_path,
                reference,
            ])
            .with_context(|| format!("build {reference} with `bash scripts/build-images.sh`"))?;
            self.run_ok(
                "ctr",
                &[
                    "--address",
                    &ctr_sock,
                    "-n",
                    "k8s.io",
                    "images",
                    "import",
                    &tar_path,
                ],
            )?;
        }
        Ok(())
    }

    /// Stop everything (by PID), remove the namespaces and cgroups, and report what is left:
    /// mounts of the node's folder, its netns, cgroups, or a changed host sysctl.
    #[must_use]
    pub fn stop(mut self) -> Leftovers {
        self.teardown();
        let mut left = Vec::new();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let dir = self.dir.path().display().to_string();
        for line in mountinfo.lines().filter(|l| l.contains(&dir)) {
            left.push(format!("mount: {line}"));
        }
        for ns in std::iter::once(&self.netns).chain(&self.networks) {
            if Path::new("/run/netns").join(ns).exists() {
                left.push(format!("netns {ns}"));
            }
        }
        for h in cgroup_hierarchies() {
            let cg = h.join(&self.cgroup_root);
            if cg.exists() {
                left.push(format!("cgroup {}", cg.display()));
            }
        }
        let now = read_sysctls();
        for ((k, before), (_, after)) in self.host_sysctls.iter().zip(&now) {
            if before != after {
                left.push(format!("host sysctl {k}: {before} -> {after}"));
            }
        }
        for p in [
            "/var/lib/kubelet",
            "/var/lib/cni",
            "/run/containerd",
            "/var/log/pods",
        ] {
            if Path::new(p).exists() {
                left.push(format!("host path {p}"));
            }
        }
        Leftovers(left)
    }

    fn teardown(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        while let Some((_, mut daemon)) = self.daemons.pop() {
            if self.daemons.len() == 1 {
                // Only containerd is left: kill the container tasks first, so no container
                // process outlives its shim.
                self.kill_tasks();
            }
            daemon.stop();
        }
        self.kill_shims();
        if let Some(mut holder) = self.holder.take() {
            holder.stop();
        }
        for ns in self
            .networks
            .drain(..)
            .chain(std::iter::once(self.netns.clone()))
        {
            let _ = ip(&["netns", "del", &ns]);
        }
        // Pod cgroups empty once their processes are gone; remove the tree bottom-up.
        for h in cgroup_hierarchies() {
            let root = h.join(&self.cgroup_root);
            for _ in 0..50 {
                remove_cgroup_tree(&root);
                if !root.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn kill_tasks(&self) {
        let sock = self.path("run/containerd.sock").display().to_string();
        let ctr = ["--address", sock.as_str(), "-n", "k8s.io"];
        let Ok(list) = self.run("ctr", &[&ctr[..], &["tasks", "ls", "-q"]].concat()) else {
            return;
        };
        for task in String::from_utf8_lossy(&list.stdout).split_whitespace() {
            let _ = self.run(
                "ctr",
                &[&ctr[..], &["tasks", "kill", "-a", "-s", "SIGKILL", task]].concat(),
            );
        }
        for _ in 0..50 {
            let running = self
                .run("ctr", &[&ctr[..], &["tasks", "ls"]].concat())
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("RUNNING"));
            if !running {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// containerd's shims outlive it (re-parented to PID 1); they carry this node's socket path
    /// in their argv, which is how they are found — then killed by PID.
    fn kill_shims(&self) {
        let sock = self.path("run/containerd.sock").display().to_string();
        for _ in 0..2 {
            let mut found = false;
            for pid in shim_pids(&sock) {
                found = true;
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            if !found {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn shim_pids(sock: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_shim = args
            .first()
            .is_some_and(|a| String::from_utf8_lossy(a).contains("containerd-shim"));
        if is_shim && args.contains(&sock.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The cgroup v1 hierarchies (the host is "hybrid": v1 controllers plus `unified`).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name != "unified" && path.is_dir() && !path.is_symlink() {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn read_sysctls() -> Vec<(String, String)> {
    WATCHED_SYSCTLS
        .iter()
        .map(|k| {
            let v = std::fs::read_to_string(Path::new("/proc/sys").join(k)).unwrap_or_default();
            ((*k).to_owned(), v.trim().to_owned())
        })
        .collect()
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run_checked(Command::new("ip").args(args))
}

fn run_checked(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The first process of the node's mount namespace: the kubelet's sysctls pre-set, and
/// copy-on-write overlays on the fixed paths the kubelet and containerd write.
fn ns_init_script(d: &Path) -> String {
    let d = d.display();
    format!(
        r"#!/bin/sh
set -e
mount --bind {d}/sysctl/overcommit_memory /proc/sys/vm/overcommit_memory
mount --bind {d}/sysctl/panic /proc/sys/kernel/panic
mount --bind {d}/sysctl/panic_on_oops /proc/sys/kernel/panic_on_oops
for p in /var/lib /var/log /run; do
  n=$(echo $p | tr / _); mkdir -p {d}/ns/$n/upper {d}/ns/$n/work
  mount -t overlay wg-node$n -o lowerdir=$p,upperdir={d}/ns/$n/upper,workdir={d}/ns/$n/work $p
done
echo ready > {d}/run/ns-ready
exec sleep 2147483647
"
    )
}

fn containerd_config(d: &Path) -> String {
    let d = d.display();
    format!(
        r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "{d}/run/containerd.sock"
[ttrpc]
  address = "{d}/run/containerd.sock.ttrpc"
[debug]
  address = "{d}/run/containerd-debug.sock"
  level = "info"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  # This machine's root lacks CAP_SYS_RESOURCE: without the clamp every sandbox fails.
  restrict_oom_score_adj = true
  tolerate_missing_hugetlb_controller = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "{d}/containerd/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni/net.d"
    max_conf_num = 1
"#
    )
}

fn cni_config(d: &Path) -> String {
    let d = d.display();
    format!(
        r#"{{
  "cniVersion": "0.4.0",
  "name": "wg-node-pods",
  "plugins": [
    {{
      "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{POD_CIDR}"}}]],
               "routes": [{{"dst": "0.0.0.0/0"}}], "dataDir": "{d}/cni/ipam"}}
    }},
    {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
  ]
}}
"#
    )
}

/// A test process killed before its `Node` dropped (a CI timeout, a ^C) leaves its network
/// namespaces behind; their processes died with it. Remove the `wgn-<pid>-<n>` namespaces (and
/// the `wgp-<pid>` networks tests attach) whose test process no longer exists.
fn remove_stale_netns() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("wgn-")
            .and_then(|rest| rest.split('-').next())
            .or_else(|| name.strip_prefix("wgp-"))
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new("/proc").join(pid.to_string()).exists() {
                eprintln!("[node] removing netns {name} left by test process {pid}, which is gone");
                let _ = ip(&["netns", "del", &name]);
            }
        }
    }
}
