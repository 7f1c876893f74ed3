//! Secret hygiene of `wg-sidecar gateway` (`--pod-source vault`), `wg-sidecar keys
//! provision|provision-gateway|rotate` and a registering `wg-sidecar run` (a key born in the
//! process, its public record and preshared key published in Vault, the gateway admitting it
//! from that record) against a real OpenBao dev server, as root, in a network namespace made by
//! the test. (`sidecar/tests/dataplane.rs` checks the Pod sidecar with a mounted key folder.)
//!
//! Every private key, in base64 and in the hex form the UAPI uses, the registered Pod's
//! preshared key (which the gateway holds too) and the Vault token must be absent from: the processes' argv (`/proc/PID/cmdline`) and environment (`/proc/PID/environ`),
//! their stdout/stderr, `/metrics`, and every file they leave in their working directory. The
//! token file the test hands them is 0600 on memory-backed storage (`/dev/shm`), and so is every
//! regular file the gateway holds open. Needs root, `ip`, `curl` and `bao` (scripts/lab-install.sh).
#![allow(
    clippy::unwrap_used,
    clippy::missing_panics_doc,
    clippy::too_many_lines
)]

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use wg_e2e::lab::find_binary;

const TOKEN: &str = "devroot-hygiene-3f9a1c";

fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = unique("hyg");
        assert!(Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success());
        let ns = Self(name);
        assert!(Command::new("ip")
            .args(["-n", &ns.0, "link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success());
        ns
    }

    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }

    fn http_get(&self, url: &str) -> (u16, String) {
        let out = self
            .command(&find_binary("curl").unwrap())
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
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// A child process killed by its PID on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The PID of the program itself (the child of `ip netns exec`, which execs it: same PID).
fn pid(guard: &Guard) -> u32 {
    guard.0.id()
}

fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

fn sidecar_bin() -> PathBuf {
    wg_e2e::lab::cargo_binary("wg-sidecar").unwrap()
}

fn key_hex(b64: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
        .iter()
        .fold(String::new(), |mut acc, b| {
            let _ = write!(acc, "{b:02x}");
            acc
        })
}

struct Lab {
    ns: Netns,
    _bao: Guard,
    bao_bin: PathBuf,
    shm: tempfile::TempDir,
    token_file: PathBuf,
    work: tempfile::TempDir,
}

impl Lab {
    fn new() -> Self {
        assert!(
            fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")),
            "the secret-hygiene suite must run as root (network namespaces, TUN devices)"
        );
        let ns = Netns::new();
        let bao_bin = find_binary("bao").unwrap();
        let home = tempfile::tempdir().unwrap();
        let bao = ns
            .command(&bao_bin)
            .args(["server", "-dev", "-dev-listen-address=127.0.0.1:8200"])
            .arg(format!("-dev-root-token-id={TOKEN}"))
            .env_clear()
            .env("HOME", home.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Memory-backed, 0600: where a token file belongs.
        let shm = tempfile::Builder::new()
            .prefix("wg-hygiene")
            .tempdir_in("/dev/shm")
            .unwrap();
        let token_file = shm.path().join("token");
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&token_file)
            .unwrap();
        fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        let lab = Self {
            ns,
            _bao: Guard(bao),
            bao_bin,
            shm,
            token_file,
            work: tempfile::tempdir().unwrap(),
        };
        assert!(
            wait_for(Duration::from_secs(15), || lab.bao(&["status"]).is_some()),
            "OpenBao did not start"
        );
        lab
    }

    fn bao(&self, args: &[&str]) -> Option<String> {
        let out = self
            .ns
            .command(&self.bao_bin)
            .args(args)
            .env_clear()
            .env("BAO_ADDR", "http://127.0.0.1:8200")
            .env("BAO_TOKEN", TOKEN)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn field(&self, path: &str, field: &str) -> String {
        self.bao(&[
            "kv",
            "get",
            &format!("-field={field}"),
            &format!("secret/{path}"),
        ])
        .unwrap_or_else(|| panic!("no {field} at secret/{path}"))
        .trim()
        .to_owned()
    }

    fn vault_flags(&self) -> Vec<String> {
        [
            "--vault-addr",
            "http://127.0.0.1:8200",
            "--vault-auth",
            "token",
            "--vault-token-file",
            self.token_file.to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// Runs `wg-sidecar keys ARGS…` with an empty environment in the working dir; returns
    /// (argv as the process saw it, stdout + stderr).
    fn keys(&self, args: &[&str]) -> (String, String) {
        let mut command = self.ns.command(&sidecar_bin());
        command
            .args(["--log-format", "json", "keys"])
            .args(args)
            .args(self.vault_flags())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .current_dir(self.work.path());
        let command_line = format!("{command:?}");
        let out = command.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "keys {args:?} failed: {text}");
        (command_line, text)
    }
}

fn assert_clean(what: &str, text: &str, secrets: &[String]) {
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "{what} contains a secret ({}…)",
            &secret[..6]
        );
    }
}

/// A running process (`what`, PID `pid`, its health server at `health`): argv, environment,
/// `/metrics`, and every regular file it holds open but `log` (0600 on tmpfs if it holds one).
fn assert_process_clean(
    lab: &Lab,
    what: &str,
    pid: u32,
    health: &str,
    log: &Path,
    secrets: &[String],
) {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains(what),
        "pid {pid} is not the {what}: {cmdline}"
    );
    assert_clean(&format!("{what} argv"), &cmdline, secrets);
    let environ = fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert_clean(
        &format!("{what} environment"),
        &String::from_utf8_lossy(&environ),
        secrets,
    );
    let (status, metrics) = lab.ns.http_get(&format!("http://{health}/metrics"));
    assert_eq!(status, 200);
    assert!(metrics.contains("wg_"), "no metrics: {metrics}");
    assert_clean(&format!("{what} metrics"), &metrics, secrets);
    for fd in fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let Ok(target) = fs::read_link(fd.unwrap().path()) else {
            continue;
        };
        if target.is_file() && target != log {
            let mode = fs::metadata(&target).unwrap().permissions().mode() & 0o777;
            let text = fs::read(&target).map(|b| String::from_utf8_lossy(&b).into_owned());
            let holds_secret = text
                .as_ref()
                .is_ok_and(|t| secrets.iter().any(|s| t.contains(s.as_str())));
            if holds_secret {
                assert!(
                    mode & 0o777 == 0o600 && on_tmpfs(&target),
                    "{} holds a secret with mode {mode:o} (want 600) or off tmpfs",
                    target.display()
                );
            }
        }
    }
}

/// A file removed on drop (a userspace device's UAPI socket survives a SIGKILL).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Whether `path` lives on a tmpfs (memory-backed) mount, from /proc/self/mounts.
fn on_tmpfs(path: &Path) -> bool {
    let path = fs::canonicalize(path).unwrap();
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, kind) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(point)
                .then(|| (point.len(), kind == "tmpfs"))
        })
        .max_by_key(|(len, _)| *len)
        .is_some_and(|(_, tmpfs)| tmpfs)
}

#[test]
fn the_gateway_keys_and_a_registered_sidecar_never_expose_private_or_preshared_keys_or_the_vault_token(
) {
    let lab = Lab::new();
    assert!(
        on_tmpfs(&lab.token_file),
        "/dev/shm is not memory-backed here"
    );
    assert_eq!(
        fs::metadata(&lab.token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let mut outputs = Vec::new();
    outputs.push(lab.keys(&[
        "provision-gateway",
        "corp",
        "--endpoints",
        "127.0.0.1:51820",
        "--allowed-ips",
        "10.20.0.0/24",
        "--pool",
        "10.99.0.0/16",
    ]));
    for sa in ["web", "api"] {
        outputs.push(lab.keys(&[
            "provision",
            "--namespace",
            "shop",
            "--service-account",
            sa,
            "--pool",
            "10.99.0.0/16",
        ]));
    }

    let iface = unique("wgh");
    let _gateway_uapi = RemoveOnDrop(PathBuf::from(format!("/var/run/wireguard/{iface}.sock")));
    let log_path = lab.work.path().join("gateway.log");
    let log = fs::File::create(&log_path).unwrap();
    let gateway = Guard(
        lab.ns
            .command(&sidecar_bin())
            .args(["--log-format", "json", "gateway", "--interface", &iface])
            .args([
                "--listen-port",
                "51820",
                "--vault-gateway-path",
                "wg/gateways/corp",
                "--pod-source",
                "vault",
            ])
            .args(["--health-addr", "127.0.0.1:9901", "--poll-interval", "1"])
            .args(lab.vault_flags())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .current_dir(lab.work.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_for(Duration::from_secs(20), || lab
            .ns
            .http_get("http://127.0.0.1:9901/ready")
            .0
            == 200),
        "gateway never ready: {}",
        fs::read_to_string(&log_path).unwrap_or_default()
    );

    // A Pod's sidecar that registers: its identity from the downward-API env as the injector
    // writes it, token auth in place of Kubernetes auth. The gateway admits it from its record
    // (the sidecar turns ready only after a handshake, which needs the published preshared key).
    let pod_uid = "3c9e2f1a-5b7d-4e8f-9a0b-1c2d3e4f5a6b";
    let pod_if = unique("wgp");
    let _pod_uapi = RemoveOnDrop(PathBuf::from(format!("/var/run/wireguard/{pod_if}.sock")));
    let pod_log_path = lab.work.path().join("sidecar.log");
    let pod_log = fs::File::create(&pod_log_path).unwrap();
    let sidecar = Guard(
        lab.ns
            .command(&sidecar_bin())
            .args(["--log-format", "json", "run", "--interface", &pod_if])
            .args(["--gateway", "corp", "--routes", "10.20.0.0/24"])
            .args(["--health-addr", "127.0.0.1:9902", "--poll-interval", "1"])
            .args(lab.vault_flags())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("WG_POD_NAMESPACE", "shop")
            .env("WG_POD_SERVICE_ACCOUNT", "web")
            .env("WG_POD_NAME", "web-0")
            .env("WG_POD_UID", pod_uid)
            .current_dir(lab.work.path())
            .stdout(pod_log.try_clone().unwrap())
            .stderr(pod_log)
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_for(Duration::from_secs(30), || lab
            .ns
            .http_get("http://127.0.0.1:9902/ready")
            .0
            == 200),
        "the registered sidecar never had a handshake with the gateway: {}\n{}",
        fs::read_to_string(&pod_log_path).unwrap_or_default(),
        fs::read_to_string(&log_path).unwrap_or_default()
    );
    let record = format!("wg/peers/corp/shop/web/{pod_uid}");
    let pod_psk = lab.field(&record, "preshared_key");
    let pod_private = lab
        .ns
        .command(&find_binary("wg").unwrap())
        .args(["show", &pod_if, "private-key"])
        .output()
        .unwrap();
    assert!(pod_private.status.success(), "wg show {pod_if} failed");
    let pod_private = String::from_utf8(pod_private.stdout)
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(
        key_hex(&pod_private).len(),
        64,
        "a 32-byte key from wg show"
    );

    // Rotate one identity while the gateway runs (it must pick up the new public key, and
    // the new private key must not show up anywhere either).
    outputs.push(lab.keys(&[
        "rotate",
        "--namespace",
        "shop",
        "--service-account",
        "web",
        "--activate-after",
        "1",
    ]));
    std::thread::sleep(Duration::from_secs(3));

    // Every secret that now exists or existed during the test.
    let mut secrets = vec![
        TOKEN.to_owned(),
        key_hex(&pod_psk),
        pod_psk.clone(),
        key_hex(&pod_private),
        pod_private.clone(),
    ];
    for path in [
        "wg/gateway-keys/corp",
        "wg/keys/shop/web",
        "wg/keys/shop/api",
    ] {
        let versions = lab
            .bao(&[
                "kv",
                "metadata",
                "get",
                "-format=json",
                &format!("secret/{path}"),
            ])
            .unwrap();
        let versions: serde_json::Value = serde_json::from_str(&versions).unwrap();
        let count = versions["data"]["versions"].as_object().unwrap().len();
        for v in 1..=count {
            if let Some(key) = lab
                .bao(&[
                    "kv",
                    "get",
                    &format!("-version={v}"),
                    "-field=private_key",
                    &format!("secret/{path}"),
                ])
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty())
            {
                secrets.push(key_hex(&key));
                secrets.push(key);
            }
        }
    }
    assert!(
        secrets.len() >= 5 + 2 * 4,
        "expected the token, the registered Pod's two keys, the gateway key and three web/api versions: {} secrets",
        secrets.len()
    );
    let _ = lab.field("wg/keys/shop/web", "address");

    // The gateway and the registered sidecar: argv, environment, metrics, open files.
    assert_process_clean(
        &lab,
        "gateway",
        pid(&gateway),
        "127.0.0.1:9901",
        &log_path,
        &secrets,
    );
    assert_process_clean(
        &lab,
        "run",
        pid(&sidecar),
        "127.0.0.1:9902",
        &pod_log_path,
        &secrets,
    );

    // keys: argv as run, and everything printed (JSON lines on stdout, logs on stderr).
    for (argv, text) in &outputs {
        assert_clean("keys argv", argv, &secrets);
        assert_clean("keys output", text, &secrets);
    }
    drop(sidecar);
    drop(gateway);
    for (what, path) in [("gateway", &log_path), ("sidecar", &pod_log_path)] {
        let log = fs::read_to_string(path).unwrap();
        assert!(!log.is_empty(), "the {what} logged nothing");
        assert_clean(&format!("{what} log"), &log, &secrets);
    }
    let sidecar_log = fs::read_to_string(&pod_log_path).unwrap();
    assert!(
        sidecar_log.contains("registered with the gateway"),
        "{sidecar_log}"
    );

    // Nothing left behind in the working directory but the logs the test created.
    for file in files_under(lab.work.path()) {
        assert!(
            file == log_path || file == pod_log_path,
            "unexpected file written: {}",
            file.display()
        );
    }
    assert!(lab.shm.path().exists());
}
