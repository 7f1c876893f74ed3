//! The gateway publishes its own endpoint and drains on SIGTERM, on real parts: a real OpenBao
//! dev server, the real `wg-sidecar gateway` and `wg-sidecar run` in network namespaces made by
//! each test (`wgpub…`), as root.
//!
//! ```text
//!   pod (OpenBao 0.0.0.0:8200, sidecar) ──veth 192.168.87.0/24── gwa ──veth 10.20.0.0/24── private
//!        └────────────────────────────────veth 192.168.88.0/24── gwb (second replica)
//! ```
//! The gateways log in with a token carrying the policy `wg-sidecar vault bootstrap` writes for
//! them ([`wg_sidecar::bootstrap::plan`]) plus the vault pod source's read of the peer folder:
//! the write of their own public record must pass with exactly that.
//!
//! What is checked: `--endpoints` replaces a stale endpoint in the record at start (nothing else
//! changes) and a sidecar with no `--endpoints` of its own then connects; a missing record is
//! created; two replicas started at once move the record's version once; SIGTERM makes `/ready`
//! answer 503 at once while a tunnelled ping still passes for `--shutdown-delay`, then the gateway
//! exits 0 and removes its table and interface.
#![allow(
    clippy::unwrap_used,
    clippy::too_many_lines,
    clippy::missing_panics_doc
)]

mod lab;

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lab::{
    require_root, scratch, spawn_sidecar, veth, wait_for, write_secret_file, ChildGuard, Netns,
    OpenBao,
};

const PRIVATE_NET: &str = "10.20.0.0/24";
const SERVER: &str = "10.20.0.2";
const POOL: &str = "10.99.0.0/16";
const RECORD: &str = "wg/gateways/corp";

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

/// The log without its colour codes.
fn log_of(path: &Path) -> String {
    let raw = fs::read_to_string(path).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

struct Lab {
    pod: Netns,
    gwa: Netns,
    gwb: Netns,
    _private: Netns,
    bao: OpenBao,
    dir: tempfile::TempDir,
    /// The root token (keys, the sidecar).
    root_token: PathBuf,
    /// The gateways' token: the bootstrap policy.
    gateway_token: PathBuf,
}

/// The gateway's policy as `wg-sidecar vault bootstrap` writes it, plus what the vault pod
/// source needs to list and read the `keys provision` records below `wg/peers`.
fn gateway_policy() -> String {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct B {
        #[command(flatten)]
        args: wg_sidecar::bootstrap::BootstrapArgs,
    }
    let args = B::try_parse_from([
        "x",
        "--gateway",
        "corp",
        "--gateway-namespace",
        "vpn",
        "--vault-addr",
        "http://127.0.0.1:1",
    ])
    .unwrap()
    .args;
    let plan = wg_sidecar::bootstrap::plan(&args, "auth_kubernetes_test");
    let (name, hcl) = &plan.policies[1];
    assert_eq!(name, "wg-gateway");
    format!(
        "{hcl}path \"secret/metadata/wg/peers\" {{ capabilities = [\"list\"] }}\n\
         path \"secret/metadata/wg/peers/*\" {{ capabilities = [\"list\"] }}\n\
         path \"secret/data/wg/peers/*\" {{ capabilities = [\"read\"] }}\n"
    )
}

impl Lab {
    fn new() -> Self {
        require_root();
        let pod = Netns::new("wgpubp").unwrap();
        let gwa = Netns::new("wgpuba").unwrap();
        let gwb = Netns::new("wgpubb").unwrap();
        let private = Netns::new("wgpubv").unwrap();
        veth(&pod, "192.168.87.2/24", &gwa, "192.168.87.1/24").unwrap();
        veth(&pod, "192.168.88.2/24", &gwb, "192.168.88.1/24").unwrap();
        veth(&gwa, "10.20.0.1/24", &private, "10.20.0.2/24").unwrap();
        let bao = OpenBao::start_on(&pod, "0.0.0.0:8200").unwrap();
        let dir = scratch();
        let root_token = dir.path().join("root.token");
        write_secret_file(&root_token, "devroot\n");
        bao.cli(
            &["policy", "write", "wg-gateway", "-"],
            Some(&gateway_policy()),
        )
        .unwrap();
        let token = bao
            .cli(
                &[
                    "token",
                    "create",
                    "-policy=wg-gateway",
                    "-ttl=1h",
                    "-field=token",
                ],
                None,
            )
            .unwrap();
        let gateway_token = dir.path().join("gateway.token");
        write_secret_file(&gateway_token, token.trim());
        Self {
            pod,
            gwa,
            gwb,
            _private: private,
            bao,
            dir,
            root_token,
            gateway_token,
        }
    }

    fn vault_flags(addr: &str, token: &Path) -> Vec<String> {
        s(&[
            "--vault-addr",
            addr,
            "--vault-auth",
            "token",
            "--vault-token-file",
            token.to_str().unwrap(),
        ])
    }

    /// `wg-sidecar keys ARGS…` in the pod namespace with the root token.
    fn keys(&self, args: &[&str]) {
        let mut full = s(&["--log-format", "text", "keys"]);
        full.extend(s(args));
        full.extend(Self::vault_flags("http://127.0.0.1:8200", &self.root_token));
        let out = self
            .pod
            .command(lab::sidecar_bin())
            .args(&full)
            .env_clear()
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "keys {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The gateway's keys and a record listing `endpoint`, and the Pod identity shop/web.
    fn provision(&self, endpoint: &str) {
        self.keys(&[
            "provision-gateway",
            "corp",
            "--endpoints",
            endpoint,
            "--allowed-ips",
            PRIVATE_NET,
            "--pool",
            POOL,
        ]);
        self.keys(&[
            "provision",
            "--namespace",
            "shop",
            "--service-account",
            "web",
            "--pool",
            POOL,
        ]);
    }

    /// The public record's fields and KV version (None: absent).
    fn record(&self) -> Option<(serde_json::Value, u64)> {
        let out = self
            .bao
            .cli(
                &["kv", "get", "-format=json", "-mount=secret", RECORD],
                None,
            )
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        Some((
            v["data"]["data"].clone(),
            v["data"]["metadata"]["version"].as_u64().unwrap(),
        ))
    }

    /// Starts a gateway in `ns` (vault pod source), reaching OpenBao at `vault`, without waiting.
    fn spawn_gateway(
        &self,
        ns: &Netns,
        vault: &str,
        name: &str,
        extra: &[&str],
    ) -> (ChildGuard, PathBuf) {
        let log = self.dir.path().join(format!("gateway-{name}.log"));
        let mut args = s(&[
            "--log-format",
            "text",
            "gateway",
            "--interface",
            &lab::unique("wgpg"),
            "--listen-port",
            "51820",
            "--vault-gateway-path",
            RECORD,
            "--health-addr",
            "127.0.0.1:9901",
            "--poll-interval",
            "1",
            "--pod-source",
            "vault",
        ]);
        args.extend(s(extra));
        args.extend(Self::vault_flags(vault, &self.gateway_token));
        (spawn_sidecar(ns, &args, &log).unwrap(), log)
    }

    fn wait_ready(ns: &Netns, log: &Path) {
        assert!(
            wait_for(Duration::from_secs(20), || ns
                .http_get("http://127.0.0.1:9901/ready")
                .is_ok_and(|r| r.0 == 200)),
            "gateway never ready: {}",
            log_of(log)
        );
    }

    /// The Pod's sidecar for shop/web with no `--endpoints`: it dials what the record lists.
    fn sidecar(&self) -> (ChildGuard, PathBuf) {
        let out = self
            .pod
            .command(lab::sidecar_bin())
            .args(["init", "--routes", PRIVATE_NET])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = self.dir.path().join("sidecar.log");
        let mut args = s(&[
            "--log-format",
            "text",
            "run",
            "--interface",
            &lab::unique("wgps"),
            "--gateway",
            "corp",
            "--routes",
            PRIVATE_NET,
            "--vault-key-path",
            "wg/keys/shop/web",
            "--health-addr",
            "127.0.0.1:9911",
            "--poll-interval",
            "1",
        ]);
        args.extend(Self::vault_flags("http://127.0.0.1:8200", &self.root_token));
        (spawn_sidecar(&self.pod, &args, &log).unwrap(), log)
    }

    /// One ping from the Pod to the private server through the tunnel.
    fn ping(&self) -> bool {
        self.pod
            .run("ping", &["-c", "1", "-W", "1", SERVER])
            .is_ok()
    }
}

#[test]
fn a_stale_endpoint_is_replaced_at_start_a_sidecar_without_its_own_connects_and_sigterm_drains() {
    let lab = Lab::new();
    lab.provision("stale.example:51820");
    let (before, v0) = lab.record().unwrap();
    assert_eq!(before["endpoints"], "stale.example:51820");

    let (mut gateway, gwlog) = lab.spawn_gateway(
        &lab.gwa,
        "http://192.168.87.2:8200",
        "a",
        &["--endpoints", "192.168.87.1:51820", "--shutdown-delay", "4"],
    );
    Lab::wait_ready(&lab.gwa, &gwlog);
    let (after, v1) = lab.record().unwrap();
    assert_eq!(v1, v0 + 1, "one write: {}", log_of(&gwlog));
    let mut expected = before.clone();
    expected["endpoints"] = "192.168.87.1:51820".into();
    assert_eq!(after, expected, "only the endpoints changed");
    let log = log_of(&gwlog);
    assert!(
        log.contains("published --endpoints in the public record")
            && log.contains("old=stale.example:51820")
            && log.contains("new=192.168.87.1:51820"),
        "{log}"
    );

    // The sidecar has no --endpoints: it finds the gateway through the record alone.
    let (_sidecar, sclog) = lab.sidecar();
    assert!(
        wait_for(Duration::from_secs(20), || lab.ping()),
        "no ping through the tunnel.\nsidecar: {}\ngateway: {}",
        log_of(&sclog),
        log_of(&gwlog)
    );

    // SIGTERM: not ready at once, forwarding on for the delay, then the cleanup.
    let pid = gateway.pid().to_string();
    lab::run(std::process::Command::new("kill").args(["-TERM", &pid])).unwrap();
    let signalled = Instant::now();
    assert!(
        wait_for(Duration::from_secs(2), || lab
            .gwa
            .http_get("http://127.0.0.1:9901/ready")
            .is_ok_and(|r| r.0 == 503 && r.1.contains("shutting down"))),
        "/ready not 503 after SIGTERM: {}",
        log_of(&gwlog)
    );
    // Still forwarding during the delay.
    let mut pings = 0;
    while signalled.elapsed() < Duration::from_secs(3) {
        assert!(
            lab.ping(),
            "a ping failed {:?} after SIGTERM (the delay is 4 s): {}",
            signalled.elapsed(),
            log_of(&gwlog)
        );
        assert!(
            gateway.running(),
            "exited before the delay: {}",
            log_of(&gwlog)
        );
        pings += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(pings >= 3, "{pings}");
    let exit = loop {
        if let Some(st) = gateway.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(20),
            "no exit after the delay: {}",
            log_of(&gwlog)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = signalled.elapsed();
    assert_eq!(exit.code(), Some(0), "{}", log_of(&gwlog));
    assert!(
        took >= Duration::from_secs(3),
        "exited after {took:?}, before the delay"
    );
    let rules = lab.gwa.run("nft", &["list", "ruleset"]).unwrap();
    assert!(!rules.contains("wg_gateway"), "{rules}");
    assert!(!lab.gwa.ip(&["link"]).unwrap().contains("wgpg"));
    assert!(
        log_of(&gwlog).contains("/ready answers 503; peers are still forwarded"),
        "{}",
        log_of(&gwlog)
    );
}

#[test]
fn two_replicas_started_at_once_write_the_record_once_and_a_missing_record_is_created() {
    let lab = Lab::new();
    lab.provision("stale.example:51820");
    let (_, v0) = lab.record().unwrap();
    let endpoint = "vpn.example.test:51820";
    let flags = ["--endpoints", endpoint, "--shutdown-delay", "0"];
    let (mut a, alog) = lab.spawn_gateway(&lab.gwa, "http://192.168.87.2:8200", "a", &flags);
    let (mut b, blog) = lab.spawn_gateway(&lab.gwb, "http://192.168.88.2:8200", "b", &flags);
    Lab::wait_ready(&lab.gwa, &alog);
    Lab::wait_ready(&lab.gwb, &blog);
    let (rec, v1) = lab.record().unwrap();
    assert_eq!(rec["endpoints"], endpoint);
    let logs = format!("{}\n{}", log_of(&alog), log_of(&blog));
    assert_eq!(v1, v0 + 1, "the version moved once: {logs}");
    assert_eq!(
        logs.matches("published --endpoints in the public record")
            .count(),
        1,
        "{logs}"
    );
    assert_eq!(
        logs.matches("the public record already lists --endpoints")
            .count(),
        1,
        "{logs}"
    );
    a.terminate(Duration::from_secs(5)).unwrap();
    b.terminate(Duration::from_secs(5)).unwrap();

    // No public record at all (the private one stays): the gateway creates it from its key and
    // addresses, and a sidecar with no --endpoints connects through it.
    lab.bao
        .cli(&["kv", "metadata", "delete", "-mount=secret", RECORD], None)
        .unwrap();
    assert!(lab.record().is_none());
    let (_a, alog) = lab.spawn_gateway(
        &lab.gwa,
        "http://192.168.87.2:8200",
        "created",
        &[
            "--endpoints",
            "192.168.87.1:51820",
            "--private-networks",
            PRIVATE_NET,
            "--shutdown-delay",
            "0",
        ],
    );
    Lab::wait_ready(&lab.gwa, &alog);
    let (rec, v) = lab.record().unwrap();
    assert_eq!(v, 1, "{}", log_of(&alog));
    assert_eq!(rec["endpoints"], "192.168.87.1:51820");
    assert_eq!(rec["pool"], POOL, "the networks of the gateway's addresses");
    assert_eq!(rec["allowed_ips"], PRIVATE_NET);
    assert!(
        log_of(&alog).contains("there was no public record: created it"),
        "{}",
        log_of(&alog)
    );
    let (_sidecar, sclog) = lab.sidecar();
    assert!(
        wait_for(Duration::from_secs(20), || lab.ping()),
        "no ping through the tunnel.\nsidecar: {}\ngateway: {}",
        log_of(&sclog),
        log_of(&alog)
    );
}
