//! Runtime tier: a Pod injected by the real `wg-injector` image runs under podman + runc like
//! a kubelet would run it: `wg-init`, then `wg-sidecar`, then the app container, each with
//! exactly the securityContext, capabilities, read-only root filesystem, volumes and user the
//! injector wrote (translated field by field by `wg_e2e::podman`), all joined to one network
//! namespace this test created. Run as root: `cargo test -p wg-e2e --test runtime`.
//!
//! Topology (names unique per run; addresses exist only inside these namespaces):
//!
//! ```text
//! [pod] ──veth 192.168.66.0/24── [gw] ──veth 10.66.1.0/24── [private]
//!  OpenBao dev 127.0.0.1:8200     wireguard-go + wg            HTTP 10.66.1.2:8080
//!  podman: wg-init, wg-sidecar,   tunnel 10.66.0.1/24          (default route back via gw)
//!          app (http-get)         ip_forward on
//! ```
//!
//! The Pod's default route leads to the gateway host, which forwards to the private network:
//! without the kill switch, a request for the private network would leave by the veth in the
//! clear. The test proves it does not (tcpdump on the pod's veth sees zero packets) and, as a
//! control, that the same capture does see them once the kill-switch route is removed.
//!
//! Vault login: OpenBao's JWT auth method is mounted at `kubernetes` and verifies a token this
//! test signs like the kubelet's projected service-account token (issuer, `sub`, audience
//! `vault`, 10-minute expiry); the sidecar logs in with the injected flags unchanged (same
//! login request as Kubernetes auth) to the one role `wg-pod`, whose claim mappings give the
//! login the alias metadata Kubernetes auth gives it (namespace and service account), so the
//! real templated `wg-pod` policy (`wg_sidecar::bootstrap::plan`) applies. `TokenReview` against
//! a real apiserver is the control-plane tier's job (`vault_auth.rs`).
//!
//! Registration: the gateway record carries an address pool; the sidecar generates its key in
//! the Pod, claims an address and publishes its public record under the Pod's UID (from the
//! downward API, `WG_POD_UID`); the test reads the public key, preshared key and address from
//! that record to add the peer to the wireguard-go gateway, as the real gateway would.
//!
//! Needs: podman, runc, wireguard-go, wg, tcpdump, curl, python3, openssl, bao
//! (`bash scripts/lab-install.sh`); images are (re)built by `scripts/build-images.sh`.
#![allow(
    clippy::unwrap_used,
    clippy::too_many_lines,
    clippy::missing_panics_doc
)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser as _;
use k8s_openapi::api::core::v1::Pod;
use wg_e2e::lab::{find_binary, scratch_dir, workspace_root, write_private};
use wg_e2e::podman::{self, find_container, Container, Sandbox};
use wg_e2e::process::ChildGuard;

const ROUTES: &str = "10.66.0.0/16";
/// The Pods' address pool; its first host is the gateway's tunnel address.
const POOL: &str = "10.66.0.0/24";
const GW_TUN: &str = "10.66.0.1/24";
const POD_UID: &str = "5f0c9a7e-2b1d-4c3e-8f4a-6d7e8f9a0b1c";
const PRIVATE_ADDR: &str = "10.66.1.2";
const PRIVATE_PORT: u16 = 8080;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// prefix + pid + counter, at most 15 bytes (interface names).
fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let name = format!("{prefix}{}x{n}", std::process::id() % 100_000);
    assert!(name.len() <= 15, "{name} is too long for an interface name");
    name
}

fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap();
    assert_eq!(
        uid, "0",
        "the runtime test must run as root (podman rootful, netns, /dev/net/tun)"
    );
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_stdin(cmd: &mut Command, stdin: &[u8]) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("failed to start {cmd:?}: {e}"));
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    run(Command::new(find_binary("ip").unwrap()).args(args))
}

fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        sleep(Duration::from_millis(100));
    }
    false
}

/// A network namespace deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(prefix: &str) -> Self {
        let ns = Self {
            name: unique(prefix),
        };
        ip(&["netns", "add", &ns.name]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(find_binary("ip").unwrap());
        c.args(["netns", "exec", &self.name])
            .arg(find_binary(program).unwrap());
        c
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// HTTP GET from inside the namespace: (status, body); status 0 when no answer.
    fn http_get(&self, url: &str) -> (u16, String) {
        let out = self
            .command("curl")
            .args(["-s", "-m", "2", "-w", "\n%{http_code}", url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// A file removed on drop (wireguard-go's UAPI socket survives a SIGKILL).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Joins `a` and `b` with a veth pair; returns the name of `a`'s end.
fn veth(a: &Netns, a_addr: &str, b: &Netns, b_addr: &str) -> String {
    let (ia, ib) = (unique("rva"), unique("rvb"));
    ip(&[
        "link", "add", &ia, "netns", &a.name, "type", "veth", "peer", "name", &ib, "netns", &b.name,
    ]);
    a.ip(&["addr", "add", a_addr, "dev", &ia]);
    b.ip(&["addr", "add", b_addr, "dev", &ib]);
    a.ip(&["link", "set", &ia, "up"]);
    b.ip(&["link", "set", &ib, "up"]);
    ia
}

/// (private, public) WireGuard keys from `wg genkey | wg pubkey`, kept in memory.
fn wg_keypair() -> (String, String) {
    let private = run(Command::new(find_binary("wg").unwrap()).arg("genkey"));
    let public = run_stdin(
        Command::new(find_binary("wg").unwrap()).arg("pubkey"),
        private.as_bytes(),
    );
    (private.trim().to_owned(), public.trim().to_owned())
}

/// The OpenBao CLI inside the pod namespace (root token, setup only).
struct Bao<'a> {
    ns: &'a Netns,
    home: &'a Path,
}

impl Bao<'_> {
    fn cmd(&self) -> Command {
        let mut c = self.ns.command("bao");
        c.env_clear()
            .env("HOME", self.home)
            .env("BAO_ADDR", "http://127.0.0.1:8200")
            .env("BAO_TOKEN", "devroot");
        c
    }

    fn run(&self, args: &[&str]) -> String {
        run(self.cmd().args(args))
    }

    /// `bao ARGS… -` with a JSON body on stdin (secret values never in argv).
    fn write_json(&self, args: &[&str], body: &serde_json::Value) {
        run_stdin(self.cmd().args(args).arg("-"), body.to_string().as_bytes());
    }
}

/// A projected-service-account-style JWT (RS256) signed with `key_pem` by `openssl`.
fn sign_jwt(key_file: &Path, namespace: &str, service_account: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = b64.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = serde_json::json!({
        "iss": "https://kubernetes.default.svc",
        "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
        "aud": ["vault"],
        "iat": now, "nbf": now, "exp": now + 600,
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": service_account}},
    });
    let claims = b64.encode(claims.to_string());
    let signing_input = format!("{header}.{claims}");
    let mut child = Command::new(find_binary("openssl").unwrap())
        .args(["dgst", "-sha256", "-binary", "-sign"])
        .arg(key_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(signing_input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl dgst -sign failed");
    format!("{signing_input}.{}", b64.encode(out.stdout))
}

/// tcpdump on `iface` inside `ns` for `filter`, bounded by `timeout 60`; stopped with
/// [`captured`] once the traffic under test has been sent.
fn start_capture(ns: &Netns, iface: &str, filter: &str, logs: &Path) -> ChildGuard {
    let mut cmd = Command::new(find_binary("ip").unwrap());
    cmd.args(["netns", "exec", &ns.name])
        .arg(find_binary("timeout").unwrap())
        .arg("60")
        .arg(find_binary("tcpdump").unwrap())
        .args(["-i", iface, "-n", "-l", "-p", "-Z", "root", filter]);
    let name = unique("tcpdump");
    let mut guard = ChildGuard::spawn(&name, cmd, logs).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || guard
            .log()
            .contains("listening on")),
        "tcpdump never started listening: {}",
        guard.log_tail(2000)
    );
    assert!(guard.is_running());
    guard
}

/// Lets in-flight packets arrive, stops the capture (SIGTERM to `timeout`, which passes it on
/// to tcpdump) and returns how many packets it saw.
fn captured(mut guard: ChildGuard) -> (u64, String) {
    sleep(Duration::from_millis(500));
    // `ip netns exec` execs `timeout`, so the guard's PID is the `timeout` process we started.
    run(Command::new(find_binary("kill").unwrap()).args(["-TERM", &guard.pid().to_string()]));
    assert!(
        wait_for(Duration::from_secs(10), || !guard.is_running()),
        "tcpdump did not stop after SIGTERM"
    );
    let log = guard.log();
    let count = log
        .lines()
        .find_map(|l| {
            l.strip_suffix(" packets captured")
                .or_else(|| l.strip_suffix(" packet captured"))
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no capture summary in tcpdump output: {log}"));
    (count, log)
}

/// The real `wg-pod` policy (`wg-sidecar vault bootstrap`'s) for the auth mount `accessor`.
fn wg_pod_policy(accessor: &str) -> String {
    #[derive(clap::Parser)]
    struct Args {
        #[command(flatten)]
        bootstrap: wg_sidecar::bootstrap::BootstrapArgs,
    }
    let args = Args::try_parse_from([
        "bootstrap",
        "--gateway",
        "corp",
        "--gateway-namespace",
        "vpn",
        "--vault-addr",
        "http://127.0.0.1:8200",
    ])
    .unwrap();
    let plan = wg_sidecar::bootstrap::plan(&args.bootstrap, accessor);
    assert_eq!(plan.policies[0].0, "wg-pod");
    plan.policies[0].1.clone()
}

/// The sidecar's interface name (`--interface`, default `wg0`).
fn interface_of(sidecar: &k8s_openapi::api::core::v1::Container) -> String {
    sidecar
        .args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix("--interface="))
        .unwrap_or("wg0")
        .to_owned()
}

/// The private key (hex) of the WireGuard device behind the UAPI socket `sock` (`get=1`).
fn uapi_private_key(sock: &Path) -> String {
    use std::io::{BufRead as _, BufReader};
    let mut stream = std::os::unix::net::UnixStream::connect(sock)
        .unwrap_or_else(|e| panic!("no UAPI socket at {}: {e}", sock.display()));
    stream.write_all(b"get=1\n\n").unwrap();
    let mut key = None;
    for line in BufReader::new(stream).lines() {
        let line = line.unwrap();
        if line.is_empty() {
            break;
        }
        if let Some(k) = line.strip_prefix("private_key=") {
            key = Some(k.to_owned());
        }
    }
    key.unwrap_or_else(|| panic!("{} reported no private key", sock.display()))
}

/// The hex form (as the UAPI prints it) of a base64 key.
fn key_hex(b64: &str) -> String {
    use std::fmt::Write as _;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
        .iter()
        .fold(String::new(), |mut acc, b| {
            let _ = write!(acc, "{b:02x}");
            acc
        })
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn injected_pod_runs_under_podman_with_only_its_declared_privileges_and_never_leaks_without_the_sidecar(
) {
    require_root();
    let root = workspace_root();
    podman::build_images(&root).unwrap();
    let version = podman::image_version();
    let sidecar_image = format!("localhost/wg-sidecar:{version}");
    let injector_image = format!("localhost/wg-injector:{version}");
    let app_image = format!("localhost/wg-e2e-http-get:{version}");
    for image in [&sidecar_image, &injector_image, &app_image] {
        assert!(
            podman::image_exists(image).unwrap(),
            "{image} missing after build-images.sh"
        );
    }
    let injector_user = podman::podman_ok(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.User}}",
        &injector_image,
    ])
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&injector_user.stdout).trim(),
        "65532:65532"
    );

    let dir = scratch_dir("wg-runtime").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();

    // --- network: pod ⟷ gw ⟷ private ---
    let pod_ns = Netns::new("rtpod");
    let gw_ns = Netns::new("rtgw");
    let priv_ns = Netns::new("rtpriv");
    let pod_veth = veth(&pod_ns, "192.168.66.2/24", &gw_ns, "192.168.66.1/24");
    veth(
        &gw_ns,
        "10.66.1.1/24",
        &priv_ns,
        &format!("{PRIVATE_ADDR}/24"),
    );
    pod_ns.ip(&["route", "add", "default", "via", "192.168.66.1"]);
    priv_ns.ip(&["route", "add", "default", "via", "10.66.1.1"]);
    run(gw_ns
        .command("sysctl")
        .args(["-q", "-w", "net.ipv4.ip_forward=1"]));

    // --- the private service ---
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let marker = format!("private-{}-{}", std::process::id(), unique("m"));
    std::fs::write(www.join("marker.txt"), &marker).unwrap();
    let mut http = priv_ns.command("python3");
    http.args(["-m", "http.server", "--bind", PRIVATE_ADDR, "--directory"])
        .arg(&www)
        .arg(PRIVATE_PORT.to_string());
    let _http = ChildGuard::spawn("private-http", http, &logs).unwrap();

    // --- OpenBao in the pod namespace (the Pod's Vault, reached on loopback) ---
    let bao_home = dir.path().join("bao-home");
    std::fs::create_dir(&bao_home).unwrap();
    let mut bao_server = pod_ns.command("bao");
    bao_server
        .args([
            "server",
            "-dev",
            "-dev-root-token-id=devroot",
            "-dev-listen-address=127.0.0.1:8200",
        ])
        .env_clear()
        .env("HOME", &bao_home);
    let bao_guard = ChildGuard::spawn("openbao", bao_server, &logs).unwrap();
    let bao = Bao {
        ns: &pod_ns,
        home: &bao_home,
    };
    assert!(
        wait_for(Duration::from_secs(15), || bao
            .cmd()
            .arg("status")
            .output()
            .is_ok_and(|o| o.status.success())),
        "OpenBao never answered: {}",
        bao_guard.log_tail(3000)
    );

    let (gw_priv, gw_pub) = wg_keypair();
    bao.write_json(
        &["kv", "put", "-mount=secret", "wg/gateways/corp"],
        &serde_json::json!({"public_key": gw_pub, "endpoints": "192.168.66.1:51820", "allowed_ips": ROUTES, "pool": POOL}),
    );

    // Service-account-token login: JWT auth at the `kubernetes` mount, the one role `wg-pod`.
    let sa_key = dir.path().join("sa.key");
    let sa_pub = dir.path().join("sa.pub");
    write_private(&sa_key, b"").unwrap(); // openssl keeps the 0600 mode of an existing file
    run(Command::new(find_binary("openssl").unwrap())
        .args(["genrsa", "-out"])
        .arg(&sa_key)
        .arg("2048"));
    run(Command::new(find_binary("openssl").unwrap())
        .args(["rsa", "-pubout", "-in"])
        .arg(&sa_key)
        .arg("-out")
        .arg(&sa_pub));
    bao.run(&["auth", "enable", "-path=kubernetes", "jwt"]);
    bao.write_json(
        &["write", "auth/kubernetes/config"],
        &serde_json::json!({
            "jwt_validation_pubkeys": [std::fs::read_to_string(&sa_pub).unwrap()],
            "bound_issuer": "https://kubernetes.default.svc",
        }),
    );
    let auths: serde_json::Value =
        serde_json::from_str(&bao.run(&["auth", "list", "-format=json"])).unwrap();
    let accessor = auths["kubernetes/"]["accessor"].as_str().unwrap();
    run_stdin(
        bao.cmd().args(["policy", "write", "wg-pod", "-"]),
        wg_pod_policy(accessor).as_bytes(),
    );
    bao.write_json(
        &["write", "auth/kubernetes/role/wg-pod"],
        &serde_json::json!({
            "role_type": "jwt", "bound_audiences": ["vault"], "user_claim": "sub",
            "claim_mappings": {
                "/kubernetes.io/namespace": "service_account_namespace",
                "/kubernetes.io/serviceaccount/name": "service_account_name",
            },
            "token_policies": ["wg-pod"], "token_ttl": "10m",
        }),
    );

    // --- the gateway: Debian's wireguard-go + wg ---
    let gw_if = unique("rtwg");
    let mut wggo = gw_ns.command("wireguard-go");
    wggo.args(["-f", &gw_if]).env("LOG_LEVEL", "error");
    let _wggo = ChildGuard::spawn("wireguard-go", wggo, &logs).unwrap();
    let sock = PathBuf::from(format!("/var/run/wireguard/{gw_if}.sock"));
    let _sock_cleanup = RemoveOnDrop(sock.clone());
    assert!(
        wait_for(Duration::from_secs(5), || sock.exists()),
        "wireguard-go did not start"
    );
    let gw_key_file = dir.path().join("gw.key");
    write_private(&gw_key_file, gw_priv.as_bytes()).unwrap();
    run(gw_ns
        .command("wg")
        .args(["set", &gw_if, "private-key"])
        .arg(&gw_key_file)
        .args(["listen-port", "51820"]));
    std::fs::remove_file(&gw_key_file).unwrap();
    gw_ns.ip(&["addr", "add", GW_TUN, "dev", &gw_if]);
    gw_ns.ip(&["link", "set", &gw_if, "up"]);

    // --- the Pod: an example manifest, injected by the wg-injector image ---
    let cfg_dir = dir.path().join("injector");
    std::fs::create_dir(&cfg_dir).unwrap();
    std::fs::write(
        cfg_dir.join("config.yaml"),
        format!(
            "images: {{sidecar: '{sidecar_image}', pullPolicy: Never}}\nnativeSidecars: true\n\
             defaultGateway: corp\ngateways:\n  corp: {{routes: ['{ROUTES}']}}\n\
             vault: {{address: 'http://127.0.0.1:8200', allowPlaintext: true, roleTemplate: wg-pod}}\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cfg_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        cfg_dir.join("config.yaml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  uid: {POD_UID}\n  annotations:\n    wg-injector.io/inject: \"true\"\n    wg-injector.io/gateway: corp\n\
         spec:\n  serviceAccountName: web\n  containers:\n  - name: app\n    image: {app_image}\n    imagePullPolicy: Never\n\
         \x20   args: [\"http://{PRIVATE_ADDR}:{PRIVATE_PORT}/marker.txt\"]\n    securityContext:\n      runAsUser: 65532\n      runAsGroup: 65532\n      runAsNonRoot: true\n\
         \x20     allowPrivilegeEscalation: false\n      readOnlyRootFilesystem: true\n      capabilities: {{drop: [ALL]}}\n      seccompProfile: {{type: RuntimeDefault}}\n"
    );
    let mut inject = podman::podman().unwrap();
    inject
        .args([
            "run",
            "--rm",
            "-i",
            "--pull=never",
            "--network=none",
            "--read-only",
            "--cap-drop",
            "ALL",
        ])
        .args(["--security-opt", "no-new-privileges"])
        .args(podman::ULIMIT_FLAGS)
        .arg("--mount")
        .arg(format!(
            "type=bind,source={},destination=/config,ro=true",
            cfg_dir.display()
        ))
        .args([
            injector_image.as_str(),
            "inject",
            "-f",
            "-",
            "--config",
            "/config/config.yaml",
        ]);
    let injected = run_stdin(&mut inject, manifest.as_bytes());
    let pod: Pod = serde_yaml_ng::from_str(&injected).unwrap_or_else(|e| panic!("{e}: {injected}"));
    let spec = pod.spec.as_ref().unwrap();
    let init_names: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        init_names,
        ["wg-init", "wg-sidecar"],
        "native sidecar layout: {injected}"
    );
    let sidecar_spec = find_container(&pod, "wg-sidecar").unwrap();
    assert_eq!(sidecar_spec.image.as_deref(), Some(sidecar_image.as_str()));

    // --- the "kubelet": volumes backed by memory, token projected with mode 0400 ---
    let mut volume_dirs = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        if v.host_path.is_some() {
            continue; // /dev/net/tun: a device, translated to --device
        }
        let d = dir.path().join("volumes").join(&v.name);
        std::fs::create_dir_all(&d).unwrap();
        if v.projected.is_some() {
            let token = d.join("token");
            write_private(&token, sign_jwt(&sa_key, "shop", "web").as_bytes()).unwrap();
            std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o400)).unwrap();
        }
        volume_dirs.insert(v.name.clone(), d);
    }
    assert!(
        volume_dirs.contains_key("wg-runtime") && volume_dirs.contains_key("wg-token"),
        "{volume_dirs:?}"
    );
    let sandbox = Sandbox {
        netns: pod_ns.path(),
        volume_dirs,
        name_prefix: unique("rtpod"),
    };

    // 1. wg-init runs to completion and leaves the kill switch.
    let (code, out, err) =
        Container::run_to_end(&pod, find_container(&pod, "wg-init").unwrap(), &sandbox).unwrap();
    assert_eq!(code, 0, "wg-init failed: {out}{err}");
    let routes = pod_ns.ip(&["route", "show", ROUTES, "table", "51820"]);
    assert!(
        routes.contains("unreachable"),
        "kill switch missing after wg-init: {routes}"
    );

    // 2. wg-sidecar (native sidecar): started; it registers (a record under the Pod's UID), the
    // gateway learns the peer from that record, and the sidecar is probed like the kubelet's
    // startup probe.
    let sidecar = Container::start(&pod, sidecar_spec, &sandbox).unwrap();
    let record_path = format!("wg/peers/corp/shop/web/{POD_UID}");
    let mut record = serde_json::Value::Null;
    assert!(
        wait_for(Duration::from_secs(60), || {
            let out = bao
                .cmd()
                .args(["kv", "get", "-format=json", "-mount=secret", &record_path])
                .output()
                .unwrap();
            if out.status.success() {
                record = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["data"]
                    ["data"]
                    .clone();
            }
            out.status.success()
        }),
        "the sidecar never published {record_path}: {}\n{}",
        sidecar.logs(),
        bao_guard.log_tail(2000)
    );
    let field = |k: &str| record[k].as_str().unwrap_or_default().to_owned();
    let (pod_pub, psk, pod_tun) = (
        field("public_key"),
        field("preshared_key"),
        field("address"),
    );
    assert_eq!(
        (
            field("namespace"),
            field("service_account"),
            field("pod"),
            field("uid")
        ),
        ("shop".into(), "web".into(), "web".into(), POD_UID.into()),
        "{record}"
    );
    assert!(record.get("private_key").is_none(), "{record}");
    let pod_addr: std::net::Ipv4Addr = pod_tun
        .strip_suffix("/32")
        .unwrap_or_else(|| panic!("one IPv4 host address: {pod_tun}"))
        .parse()
        .unwrap();
    assert!(
        pod_addr.octets()[..3] == [10, 66, 0] && pod_addr.octets()[3] > 1,
        "{pod_tun} is not a Pod address of {POOL}"
    );
    let psk_file = dir.path().join("pod.psk");
    write_private(&psk_file, psk.as_bytes()).unwrap();
    run(gw_ns
        .command("wg")
        .args(["set", &gw_if, "peer", &pod_pub, "preshared-key"])
        .arg(&psk_file)
        .args(["allowed-ips", &pod_tun]));
    std::fs::remove_file(&psk_file).unwrap();
    let ready = wait_for(Duration::from_secs(60), || {
        pod_ns.http_get("http://127.0.0.1:9901/ready").0 == 200
    });
    assert!(
        ready,
        "wg-sidecar never became ready: {}\n{}",
        sidecar.logs(),
        bao_guard.log_tail(2000)
    );

    // It holds exactly what the spec granted: CapEff = NET_ADMIN only, no_new_privs, seccomp
    // filter mode, uid 0, read-only root filesystem.
    let pid = sidecar.inspect("{{.State.Pid}}").unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name).map(str::trim))
            .unwrap_or_else(|| panic!("{name} missing in /proc/{pid}/status"))
            .to_owned()
    };
    assert_eq!(
        field("CapEff:"),
        format!("{:016x}", 1u64 << 12),
        "only CAP_NET_ADMIN (bit 12)"
    );
    assert_eq!(field("CapPrm:"), format!("{:016x}", 1u64 << 12));
    assert_eq!(field("CapBnd:"), format!("{:016x}", 1u64 << 12));
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(
        field("Seccomp:"),
        "2",
        "seccomp filter (podman's default profile = RuntimeDefault)"
    );
    assert!(field("Uid:").starts_with("0\t"), "{}", field("Uid:"));
    assert_eq!(
        sidecar.inspect("{{.HostConfig.ReadonlyRootfs}}").unwrap(),
        "true"
    );

    let (code, metrics) = pod_ns.http_get("http://127.0.0.1:9901/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.lines().any(|l| l == "wg_sidecar_ready 1"),
        "{metrics}"
    );
    // The key born in the Pod, as its WireGuard device holds it (UAPI socket in the runtime
    // volume), and the preshared key: in neither metrics nor logs, in either encoding.
    let uapi =
        sandbox.volume_dirs["wg-runtime"].join(format!("{}.sock", interface_of(sidecar_spec)));
    let pod_priv_hex = uapi_private_key(&uapi);
    let b64 = base64::engine::general_purpose::STANDARD;
    let pod_priv = b64.encode(hex_bytes(&pod_priv_hex));
    let psk_hex = key_hex(&psk);
    let derived = run_stdin(
        Command::new(find_binary("wg").unwrap()).arg("pubkey"),
        pod_priv.as_bytes(),
    );
    assert_eq!(
        derived.trim(),
        pod_pub,
        "the published public key is the device's"
    );
    let sidecar_log = sidecar.logs();
    for (what, secret) in [
        ("private key", &pod_priv),
        ("private key (hex)", &pod_priv_hex),
        ("preshared key", &psk),
        ("preshared key (hex)", &psk_hex),
    ] {
        assert!(
            !metrics.contains(secret.as_str()) && !sidecar_log.contains(secret.as_str()),
            "the Pod's {what} must never appear in metrics or logs"
        );
    }

    // 3. The app container (uid 65532, no capabilities) reaches the private server through
    // the tunnel.
    let app = find_container(&pod, "app").unwrap();
    let (code, out, err) = Container::run_to_end(&pod, app, &sandbox).unwrap();
    assert_eq!(
        code,
        0,
        "app failed through the tunnel: {err}\n{}",
        sidecar.logs()
    );
    assert_eq!(out, marker);
    let (code, metrics) = pod_ns.http_get("http://127.0.0.1:9901/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("wg_sidecar_peer_receive_bytes_total{") && !l.ends_with(" 0")),
        "{metrics}"
    );

    // 4. The sidecar stops (SIGTERM, as the kubelet does): it exits cleanly and keeps the kill
    // switch; the app can no longer reach the private server and nothing for the private
    // network leaves by the Pod's default route.
    sidecar.stop(10).unwrap();
    assert_eq!(
        sidecar.inspect("{{.State.ExitCode}}").unwrap(),
        "0",
        "{}",
        sidecar.logs()
    );
    let routes = pod_ns.ip(&["route", "show", ROUTES, "table", "51820"]);
    assert!(
        routes.contains("unreachable"),
        "kill switch gone after the sidecar stopped: {routes}"
    );
    let filter = format!("dst net {ROUTES}");
    let capture = start_capture(&pod_ns, &pod_veth, &filter, &logs);
    let (code, out, err) = Container::run_to_end(&pod, app, &sandbox).unwrap();
    assert_eq!(
        code, 2,
        "the app must fail to connect without the sidecar: {out}{err}"
    );
    assert!(
        err.contains("os error 113"),
        "expected EHOSTUNREACH from the kill switch: {err}"
    );
    let (packets, log) = captured(capture);
    assert_eq!(
        packets, 0,
        "traffic for {ROUTES} left by the pod's veth: {log}"
    );

    // Control: without the kill-switch route the same request leaves by the veth (and even
    // succeeds in the clear through the gateway host), so the capture above could see it.
    pod_ns.ip(&[
        "route",
        "del",
        "unreachable",
        ROUTES,
        "metric",
        "9999",
        "table",
        "51820",
    ]);
    let capture = start_capture(&pod_ns, &pod_veth, &filter, &logs);
    let (code, out, _) = Container::run_to_end(&pod, app, &sandbox).unwrap();
    let (packets, log) = captured(capture);
    assert!(packets > 0, "the control capture saw nothing: {log}");
    assert_eq!(
        (code, out.as_str()),
        (0, marker.as_str()),
        "control: the leak path is real"
    );
}
