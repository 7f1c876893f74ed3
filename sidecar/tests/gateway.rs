//! End-to-end tests of `wg-sidecar gateway` and `wg-sidecar keys`, as root, in network namespaces
//! made by each test, with a real OpenBao dev server and the real binaries.
//!
//! Topology (names unique per test):
//! ```text
//!   pod (OpenBao on 0.0.0.0:8200, sidecar) ──veth 192.168.77.0/24── gw-a ──veth 10.20.0.0/24── private
//!        └─────────────────────────────────veth 192.168.78.0/24── gw-b ──veth 10.20.1.0/24───┘
//! ```
//! The private namespace serves HTTP and TCP on 10.20.0.2 and has no route to the tunnel pool
//! 10.99.0.0/16: replies only come back because the gateway masquerades.
#![allow(
    clippy::unwrap_used,
    clippy::too_many_lines,
    clippy::missing_panics_doc
)]

mod lab;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use lab::{
    find_binary, metric, require_root, scratch, spawn_sidecar, tcp_client, tcp_echo_server, veth,
    wait_for, write_secret_file, ChildGuard, Netns, OpenBao, WgGoPeer,
};

const PRIVATE_NET: &str = "10.20.0.0/24";
const SERVER: &str = "10.20.0.2";
const POOL: &str = "10.99.0.0/16";

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

fn log_of(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// Every namespace, process and file of one test; dropped in reverse order of need.
struct Lab {
    pod: Netns,
    gwa: Netns,
    gwb: Option<Netns>,
    private: Netns,
    bao: OpenBao,
    dir: tempfile::TempDir,
    token: PathBuf,
    _http: ChildGuard,
}

/// OpenBao dev server in `ns` listening on every address of the namespace (the gateways reach
/// it over their veth), root token `devroot`.
/// Python's static file server for `dir` on `addr`:8080 inside `ns`, stopped when dropped.
fn serve_http(ns: &Netns, addr: &str, dir: &Path, what: &str) -> ChildGuard {
    let child = ns
        .command(find_binary("python3").unwrap())
        .args(["-m", "http.server", "--bind", addr, "8080", "--directory"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    ChildGuard {
        child,
        what: what.into(),
    }
}

fn start_openbao(ns: &Netns) -> OpenBao {
    let bao = find_binary("bao").unwrap();
    let home = scratch();
    let log = fs::File::create(home.path().join("bao.log")).unwrap();
    let child = ns
        .command(&bao)
        .args([
            "server",
            "-dev",
            "-dev-root-token-id=devroot",
            "-dev-listen-address=0.0.0.0:8200",
        ])
        .env_clear()
        .env("HOME", home.path())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let me = OpenBao {
        process: ChildGuard {
            child,
            what: "OpenBao".into(),
        },
        netns: ns.name.clone(),
        home,
        addr: "http://127.0.0.1:8200".into(),
    };
    assert!(
        wait_for(Duration::from_secs(15), || me
            .cli(&["status"], None)
            .is_ok()),
        "OpenBao did not become ready: {}",
        fs::read_to_string(me.home.path().join("bao.log")).unwrap_or_default()
    );
    me
}

impl Lab {
    fn new(with_b: bool) -> Self {
        require_root();
        let pod = Netns::new("pod").unwrap();
        let gwa = Netns::new("gwa").unwrap();
        let private = Netns::new("prv").unwrap();
        veth(&pod, "192.168.77.2/24", &gwa, "192.168.77.1/24").unwrap();
        veth(&gwa, "10.20.0.1/24", &private, "10.20.0.2/24").unwrap();
        let gwb = with_b.then(|| {
            let gwb = Netns::new("gwb").unwrap();
            veth(&pod, "192.168.78.2/24", &gwb, "192.168.78.1/24").unwrap();
            veth(&gwb, "10.20.1.1/24", &private, "10.20.1.2/24").unwrap();
            // The server's address 10.20.0.2 is reached over the second link too.
            gwb.ip(&["route", "add", "10.20.0.2/32", "via", "10.20.1.2"])
                .unwrap();
            gwb
        });
        let bao = start_openbao(&pod);
        let dir = scratch();
        let token = dir.path().join("token");
        write_secret_file(&token, "devroot\n");
        let www = dir.path().join("www");
        fs::create_dir_all(&www).unwrap();
        fs::write(www.join("hello.txt"), "hello from the private network\n").unwrap();
        let http = serve_http(&private, SERVER, &www, "http server");
        assert!(wait_for(Duration::from_secs(5), || private
            .http_get(&format!("http://{SERVER}:8080/hello.txt"))
            .is_ok_and(|r| r.0 == 200)));
        Self {
            pod,
            gwa,
            gwb,
            private,
            bao,
            dir,
            token,
            _http: http,
        }
    }

    fn vault_flags(&self, addr: &str) -> Vec<String> {
        s(&[
            "--vault-addr",
            addr,
            "--vault-auth",
            "token",
            "--vault-token-file",
            self.token.to_str().unwrap(),
        ])
    }

    /// Runs `wg-sidecar keys ARGS…` in the pod namespace; returns the JSON lines it printed.
    fn keys(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut full = vec![
            "--log-format".to_owned(),
            "text".to_owned(),
            "keys".to_owned(),
        ];
        full.extend(s(args));
        full.extend(self.vault_flags("http://127.0.0.1:8200"));
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
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn provision(&self, ns: &str, sa: &str) -> serde_json::Value {
        self.keys(&[
            "provision",
            "--namespace",
            ns,
            "--service-account",
            sa,
            "--pool",
            POOL,
        ])
        .remove(0)
    }

    fn provision_gateway(&self, endpoints: &str, pools: &str) -> serde_json::Value {
        self.keys(&[
            "provision-gateway",
            "corp",
            "--endpoints",
            endpoints,
            "--allowed-ips",
            PRIVATE_NET,
            "--pool",
            pools,
        ])
        .remove(0)
    }

    /// Starts the gateway in `ns`, reaching OpenBao at `vault`.
    fn gateway(
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
            &lab::unique("wgw"),
            "--listen-port",
            "51820",
            "--vault-gateway-path",
            "wg/gateways/corp",
            "--health-addr",
            "127.0.0.1:9901",
            "--poll-interval",
            "1",
            // The `keys provision` records (`wg/peers/<ns>/<sa>`), polled from Vault.
            "--pod-source",
            "vault",
        ]);
        args.extend(s(extra));
        args.extend(self.vault_flags(vault));
        let g = spawn_sidecar(ns, &args, &log).unwrap();
        assert!(
            wait_for(Duration::from_secs(15), || ns
                .http_get("http://127.0.0.1:9901/ready")
                .is_ok_and(|r| r.0 == 200)),
            "gateway {name} never ready: {}",
            log_of(&log)
        );
        (g, log)
    }

    /// Starts the Pod's sidecar for `shop/<sa>` (after `init`), polling Vault every second.
    fn sidecar(&self, sa: &str, extra: &[&str]) -> (ChildGuard, PathBuf, String) {
        let out = self
            .pod
            .command(lab::sidecar_bin())
            .args(["init", "--routes", PRIVATE_NET])
            .output()
            .unwrap();
        assert!(out.status.success());
        let ifname = lab::unique("ws");
        let log = self.dir.path().join(format!("sidecar-{sa}.log"));
        let mut args = s(&[
            "--log-format",
            "text",
            "run",
            "--interface",
            &ifname,
            "--gateway",
            "corp",
            "--routes",
            PRIVATE_NET,
            "--vault-key-path",
            &format!("wg/keys/shop/{sa}"),
            "--health-addr",
            "127.0.0.1:9911",
            "--poll-interval",
            "1",
        ]);
        args.extend(s(extra));
        args.extend(self.vault_flags("http://127.0.0.1:8200"));
        let c = spawn_sidecar(&self.pod, &args, &log).unwrap();
        (c, log, ifname)
    }

    fn pod_fetch(&self) -> (u16, String) {
        self.pod
            .http_get(&format!("http://{SERVER}:8080/hello.txt"))
            .unwrap()
    }
}

fn gateway_metrics(ns: &Netns) -> String {
    ns.http_get("http://127.0.0.1:9901/metrics").unwrap().1
}

#[test]
fn provisioned_pod_reaches_the_private_network_through_the_gateway_and_loses_it_when_removed() {
    let lab = Lab::new(false);
    // Dual-stack pool; the record advertises 10.20.0.0/24 (`--allowed-ips`), and with no
    // `--private-networks` that is all the gateway forwards to and masquerades towards.
    let gw = lab.provision_gateway("192.168.77.1:51820", "10.99.0.0/16,fd99::/64");
    assert_eq!(gw["address"], "10.99.0.1/16,fd99::1/64", "{gw}");
    let web = lab.provision("shop", "web");
    assert_eq!(web["created"], true);
    assert_eq!(web["address"], "10.99.0.2/32", "{web}");
    let api = lab.provision("shop", "api");
    assert_eq!(api["address"], "10.99.0.3/32", "no collision: {api}");
    // Provisioning is idempotent: same key, same address, nothing new allocated.
    let again = lab.provision("shop", "web");
    assert_eq!(again["created"], false);
    assert_eq!(again["public_key"], web["public_key"]);
    assert_eq!(again["address"], web["address"]);
    let allocations = lab
        .bao
        .cli(&["kv", "list", "-mount=secret", "wg/allocations"], None)
        .unwrap();
    assert_eq!(
        allocations
            .lines()
            .filter(|l| l.starts_with("10.99."))
            .count(),
        2,
        "{allocations}"
    );
    // The private key never appears in what `keys` prints.
    let private = lab
        .bao
        .cli(
            &[
                "kv",
                "get",
                "-mount=secret",
                "-field=private_key",
                "wg/keys/shop/web",
            ],
            None,
        )
        .unwrap();
    assert!(!web.to_string().contains(private.trim()));

    // No drain: the SIGTERM at the end checks the cleanup (tests/gateway_publish.rs: the drain).
    let (mut gateway, gwlog) = lab.gateway(
        &lab.gwa,
        "http://192.168.77.2:8200",
        "a",
        &["--shutdown-delay=0"],
    );
    let (_sc, sclog, _ifname) = lab.sidecar("web", &[]);
    assert!(
        wait_for(Duration::from_secs(15), || lab.pod_fetch().0 == 200),
        "pod never fetched through the tunnel.\nsidecar: {}\ngateway: {}",
        log_of(&sclog),
        log_of(&gwlog)
    );
    let (code, body) = lab.pod_fetch();
    assert_eq!(
        (code, body.as_str()),
        (200, "hello from the private network\n")
    );
    // Without the gateway's masquerading the private side has no route back to the pool; the
    // rule is the gateway's own netlink-written table, as the real `nft` reads it.
    assert!(lab.private.ip(&["route", "get", "10.99.0.2"]).is_err());
    let rules = lab.gwa.run("nft", &["list", "ruleset"]).unwrap();
    assert!(
        rules.contains("ip saddr 10.99.0.0/16 ip daddr 10.20.0.0/24 oifname != \"wgw")
            && rules.contains("masquerade"),
        "{rules}"
    );
    assert!(
        rules.contains("ip daddr 10.20.0.0/24 jump tunnel"),
        "the record's allowed_ips are the forward filter's networks: {rules}"
    );
    assert!(
        !rules.contains("ip6 saddr fd99::/64"),
        "no IPv6 network advertised, so no IPv6 masquerading: {rules}"
    );
    assert!(
        log_of(&gwlog).contains("\"the gateway record's allowed_ips\""),
        "{}",
        log_of(&gwlog)
    );

    // Statistics are sampled every second.
    assert!(wait_for(Duration::from_secs(3), || metric(
        &gateway_metrics(&lab.gwa),
        "wg_gateway_active_peers"
    ) == Some(1.0)));
    let m = gateway_metrics(&lab.gwa);
    assert_eq!(metric(&m, "wg_gateway_peers"), Some(2.0), "{m}");
    assert_eq!(metric(&m, "wg_gateway_active_peers"), Some(1.0), "{m}");
    let web_key = web["public_key"].as_str().unwrap();
    let rx = metric(
        &m,
        &format!("wg_gateway_peer_receive_bytes_total{{public_key=\"{web_key}\"}}"),
    );
    assert!(rx.unwrap_or(0.0) > 0.0, "{m}");
    assert!(
        m.contains("wg_gateway_reconcile_duration_seconds_count"),
        "{m}"
    );
    assert!(
        !log_of(&gwlog).contains(private.trim()),
        "private key in the gateway log"
    );

    // A peer whose key is not in Vault gets nothing.
    let rogue = Netns::new("rog").unwrap();
    veth(&rogue, "192.168.79.2/24", &lab.gwa, "192.168.79.1/24").unwrap();
    let peer = WgGoPeer::start(&rogue, "10.99.0.50/32", 51821).unwrap();
    let gw_pub = gw["public_key"].as_str().unwrap();
    rogue
        .run(
            "wg",
            &[
                "set",
                &peer.ifname,
                "peer",
                gw_pub,
                "endpoint",
                "192.168.79.1:51820",
                "allowed-ips",
                PRIVATE_NET,
            ],
        )
        .unwrap();
    rogue
        .ip(&["route", "add", PRIVATE_NET, "dev", &peer.ifname])
        .unwrap();
    let (code, _) = rogue
        .http_get(&format!("http://{SERVER}:8080/hello.txt"))
        .unwrap();
    assert_eq!(code, 0, "an unknown key must get nothing");
    assert_eq!(
        peer.handshake_age(gw_pub).unwrap(),
        None,
        "no handshake for an unknown key"
    );

    // Removed from Vault → no access within one reconcile period (1 s, jittered ±20%).
    lab.bao
        .cli(
            &[
                "kv",
                "metadata",
                "delete",
                "-mount=secret",
                "wg/peers/shop/web",
            ],
            None,
        )
        .unwrap();
    let removed = Instant::now();
    assert!(
        wait_for(Duration::from_secs(5), || lab.pod_fetch().0 != 200),
        "still reachable after removal: {}",
        log_of(&gwlog)
    );
    let took = removed.elapsed();
    assert!(took < Duration::from_secs(4), "removal took {took:?}");
    assert!(wait_for(Duration::from_secs(3), || metric(
        &gateway_metrics(&lab.gwa),
        "wg_gateway_peers"
    ) == Some(1.0)));
    let m = gateway_metrics(&lab.gwa);
    assert_eq!(
        metric(&m, "wg_gateway_peer_changes_total{op=\"remove\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(metric(&m, "wg_gateway_ready"), Some(1.0), "{m}");

    // SIGTERM: clean exit, NAT table and interface gone.
    let (code, _) = gateway.terminate(Duration::from_secs(5)).unwrap();
    assert_eq!(code, Some(0), "{}", log_of(&gwlog));
    let rules = lab.gwa.run("nft", &["list", "ruleset"]).unwrap();
    assert!(!rules.contains("wg_gateway"), "{rules}");
    assert!(!lab.gwa.ip(&["link"]).unwrap().contains("wgw"));
}

#[test]
fn with_private_networks_the_pod_reaches_the_listed_network_and_not_another_the_gateway_routes_to()
{
    const OTHER_NET: &str = "10.30.0.0/24";
    const OTHER: &str = "10.30.0.2";
    let lab = Lab::new(false);
    // A second network behind the gateway, not listed. Its host even has a route back to the
    // tunnel pool, so neither routing nor missing NAT keeps the Pod out: only the filter does.
    veth(&lab.gwa, "10.30.0.1/24", &lab.private, "10.30.0.2/24").unwrap();
    lab.private
        .ip(&["route", "add", POOL, "via", "10.30.0.1"])
        .unwrap();
    let _other = serve_http(
        &lab.private,
        OTHER,
        &lab.dir.path().join("www"),
        "http server on the unlisted network",
    );
    let other_url = format!("http://{OTHER}:8080/hello.txt");
    assert!(
        wait_for(Duration::from_secs(5), || lab
            .gwa
            .http_get(&other_url)
            .is_ok_and(|r| r.0 == 200)),
        "the gateway itself must reach the unlisted network"
    );

    lab.provision_gateway("192.168.77.1:51820", POOL);
    lab.provision("shop", "web");
    let (_gateway, gwlog) = lab.gateway(
        &lab.gwa,
        "http://192.168.77.2:8200",
        "a",
        &["--private-networks", PRIVATE_NET],
    );
    // The Pod sends both networks into the tunnel.
    let (_sc, sclog, _ifname) = lab.sidecar("web", &["--routes", OTHER_NET]);
    assert!(
        wait_for(Duration::from_secs(15), || lab.pod_fetch().0 == 200),
        "pod never fetched the listed network through the tunnel.\nsidecar: {}\ngateway: {}",
        log_of(&sclog),
        log_of(&gwlog)
    );
    assert_eq!(lab.pod_fetch().1, "hello from the private network\n");
    // The unlisted network: every attempt fails, each within curl's 2 s limit.
    for _ in 0..3 {
        let started = Instant::now();
        let (code, _) = lab.pod.http_get(&other_url).unwrap();
        assert_eq!(code, 0, "the unlisted network answered through the tunnel");
        assert!(started.elapsed() < Duration::from_secs(4));
    }
    assert_eq!(lab.pod_fetch().0, 200, "the listed network still answers");

    let rules = lab.gwa.run("nft", &["list", "ruleset"]).unwrap();
    assert!(
        rules.contains("ip saddr 10.99.0.0/16 ip daddr 10.20.0.0/24 oifname != \"wgw")
            && rules.contains("masquerade"),
        "{rules}"
    );
    assert!(
        rules.contains("type filter hook forward priority filter; policy accept;"),
        "{rules}"
    );
    assert!(
        rules.contains("ip daddr 10.20.0.0/24 jump tunnel") && rules.contains(" drop"),
        "{rules}"
    );
    // Control: without the gateway's forward chain the same request gets through, so the
    // failures above were the filter's doing.
    let table = rules
        .lines()
        .find_map(|l| l.strip_prefix("table inet "))
        .and_then(|l| l.strip_suffix(" {"))
        .unwrap()
        .to_owned();
    assert!(table.starts_with("wg_gateway_wgw"), "{table}");
    lab.gwa
        .run("nft", &["delete", "chain", "inet", &table, "forward"])
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || lab
            .pod
            .http_get(&other_url)
            .is_ok_and(|r| r.0 == 200)),
        "without the filter the unlisted network should answer: {}",
        lab.gwa.run("nft", &["list", "ruleset"]).unwrap()
    );
}

#[test]
fn keys_rotate_switches_pod_and_gateway_together_under_a_long_tcp_stream() {
    let lab = Lab::new(false);
    let old_gw_key = lab.provision_gateway("192.168.77.1:51820", POOL)["public_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let web = lab.provision("shop", "web");
    let old_key = web["public_key"].as_str().unwrap().to_owned();
    let (_gw, gwlog) = lab.gateway(&lab.gwa, "http://192.168.77.2:8200", "a", &[]);
    let (_sc, sclog, ifname) = lab.sidecar("web", &[]);
    assert!(
        wait_for(Duration::from_secs(15), || lab.pod_fetch().0 == 200),
        "{}",
        log_of(&sclog)
    );
    let _echo = tcp_echo_server(&lab.private, SERVER, 7000).unwrap();
    let mut client = tcp_client(&lab.pod, SERVER, 7000, 15).unwrap();
    std::thread::sleep(Duration::from_secs(2));

    let started = Instant::now();
    let out = lab.keys(&[
        "rotate",
        "--namespace",
        "shop",
        "--service-account",
        "web",
        "--activate-after",
        "3",
        "--vault-gateway-path",
        "wg/gateways/corp",
    ]);
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "rotate must wait for the activation"
    );
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(out[0]["outcome"], "started then folded", "{out:?}");
    assert_eq!(out[1]["identity"], "gateway wg/gateways/corp", "{out:?}");
    assert_eq!(out[1]["outcome"], "started then folded", "{out:?}");
    // Phase 2 folded the next key into the current one.
    let peer = lab
        .bao
        .cli(
            &[
                "kv",
                "get",
                "-mount=secret",
                "-format=json",
                "wg/peers/shop/web",
            ],
            None,
        )
        .unwrap();
    let peer: serde_json::Value = serde_json::from_str(&peer).unwrap();
    let data = &peer["data"]["data"];
    let new_key = data["public_key"].as_str().unwrap();
    assert_ne!(new_key, old_key);
    assert!(data.get("next_public_key").is_none(), "{data}");
    // Both sides use the new key: the pod's interface and the gateway's peer table.
    let pod_pub = lab.pod.run("wg", &["show", &ifname, "public-key"]).unwrap();
    assert_eq!(pod_pub.trim(), new_key);
    // The gateway's key rotated too: its interface, its public record and the Pod's peer agree.
    let gw_rec = lab
        .bao
        .cli(
            &[
                "kv",
                "get",
                "-mount=secret",
                "-field=public_key",
                "wg/gateways/corp",
            ],
            None,
        )
        .unwrap();
    let gw_rec = gw_rec.trim();
    assert_ne!(gw_rec, old_gw_key);
    let gw_if = lab.gwa.run("wg", &["show", "all", "public-key"]).unwrap();
    assert!(gw_if.contains(gw_rec), "{gw_if} vs {gw_rec}");
    assert!(
        wait_for(Duration::from_secs(5), || lab
            .pod
            .run("wg", &["show", &ifname, "peers"])
            .is_ok_and(|p| p.trim() == gw_rec)),
        "the Pod never took the new gateway key: {}",
        log_of(&sclog)
    );
    assert!(
        wait_for(Duration::from_secs(5), || lab.pod_fetch().0 == 200),
        "no access with the new key: {}\n{}",
        log_of(&sclog),
        log_of(&gwlog)
    );
    let (ok, stdout, stderr) = client.wait_output().unwrap();
    assert!(
        ok && stdout.starts_with("OK"),
        "TCP stream broke during rotation: {stdout} {stderr}\nsidecar: {}\ngateway: {}",
        log_of(&sclog),
        log_of(&gwlog)
    );
    let m = gateway_metrics(&lab.gwa);
    assert_eq!(metric(&m, "wg_gateway_peers"), Some(1.0), "{m}");
    assert!(m.contains(&format!("public_key=\"{new_key}\"")), "{m}");
}

#[test]
fn when_gateway_a_dies_traffic_resumes_through_gateway_b_within_ten_seconds() {
    let lab = Lab::new(true);
    let gwb = lab.gwb.as_ref().unwrap();
    lab.provision_gateway("192.168.77.1:51820,192.168.78.1:51820", POOL);
    lab.provision("shop", "web");
    // Gateways send keepalives every second, so 3 s of silence means a dead gateway.
    let ka = ["--peer-keepalive", "1"];
    let (mut gw_a, _loga) = lab.gateway(&lab.gwa, "http://192.168.77.2:8200", "a", &ka);
    let (_gw_b, _logb) = lab.gateway(gwb, "http://192.168.78.2:8200", "b", &ka);
    let (_sc, sclog, ifname) = lab.sidecar("web", &["--failover-after", "3", "--keepalive", "1"]);
    assert!(
        wait_for(Duration::from_secs(15), || lab.pod_fetch().0 == 200),
        "{}",
        log_of(&sclog)
    );
    let ep = lab.pod.run("wg", &["show", &ifname, "endpoints"]).unwrap();
    assert!(ep.contains("192.168.77.1:51820"), "starts on A: {ep}");

    gw_a.child.kill().unwrap();
    gw_a.child.wait().unwrap();
    let killed = Instant::now();
    let recovered = wait_for(Duration::from_secs(30), || lab.pod_fetch().0 == 200);
    let took = killed.elapsed();
    eprintln!("gateway failover: traffic resumed {took:?} after gateway A was killed");
    assert!(recovered, "never recovered: {}", log_of(&sclog));
    let ep = lab.pod.run("wg", &["show", &ifname, "endpoints"]).unwrap();
    assert!(ep.contains("192.168.78.1:51820"), "now on B: {ep}");
    assert!(
        took <= Duration::from_secs(10),
        "recovery took {took:?} (target ≤ 10 s)"
    );
}

#[test]
fn concurrent_provisioning_never_hands_out_one_address_twice() {
    require_root();
    let ns = Netns::new("kv").unwrap();
    let bao = start_openbao(&ns);
    let dir = scratch();
    let token = dir.path().join("token");
    write_secret_file(&token, "devroot\n");
    // Eight provisions race for the lowest free addresses of the same pool.
    let children: Vec<_> = (0..8)
        .map(|i| {
            ns.command(lab::sidecar_bin())
                .args([
                    "--log-format",
                    "text",
                    "keys",
                    "provision",
                    "--namespace",
                    "race",
                ])
                .args([
                    "--service-account",
                    &format!("sa{i}"),
                    "--pool",
                    "10.98.0.0/24",
                ])
                .args([
                    "--vault-addr",
                    "http://127.0.0.1:8200",
                    "--vault-auth",
                    "token",
                ])
                .arg("--vault-token-file")
                .arg(&token)
                .env_clear()
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut addresses = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        addresses.push(v["address"].as_str().unwrap().to_owned());
    }
    addresses.sort();
    let mut unique = addresses.clone();
    unique.dedup();
    assert_eq!(unique, addresses, "an address was handed out twice");
    let expected: Vec<String> = (2..10).map(|h| format!("10.98.0.{h}/32")).collect();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(
        addresses, expected_sorted,
        "the lowest free addresses are used"
    );
    let listed = bao
        .cli(&["kv", "list", "-mount=secret", "wg/allocations"], None)
        .unwrap();
    assert_eq!(
        listed.lines().filter(|l| l.starts_with("10.98.0.")).count(),
        8,
        "{listed}"
    );
}
