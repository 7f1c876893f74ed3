//! The gateway's forward filter and per-peer egress (`wg_sidecar::nat`) in the real kernel, as
//! root, in network namespaces each test makes (`wgt16-<role>-<pid>-<n>`, deleted on drop),
//! inspected with the real `nft -j list` and with real TCP traffic:
//!
//! ```text
//!   pod ──────────── wg0 [gw] privgw ─────────── private
//!   gwlink 192.168.16.2   .1  10.20.0.1/24        10.20.0.2, 10.20.0.3 (/24), 192.0.2.1 (lo)
//!   + 10.203.0.2, 10.203.0.3                      HTTP on :8080 and :8081 (every address)
//!   fd16::2 + fd00::2, fd00::3   fd16::1  fd20::1/64    fd20::2, fd20::3
//! ```
//! The gateway's side of the pod link is a veth named `wg0`: the filter matches by `iifname`, so
//! WireGuard itself is not needed. The pod sends from two peer addresses (curl `--interface`);
//! the private side routes 10.203.0.0/24 back, so without the table every probe succeeds (each
//! test checks that first) and whatever fails afterwards was dropped by the table. The table's
//! calls run on a thread that entered the gateway namespace (`setns(CLONE_NEWNET)` on that thread
//! only): the netlink socket belongs to the namespace of the thread creating it.
//! Needs `ip`, `nft`, `curl` and `python3`.
#![allow(
    clippy::unwrap_used,
    clippy::missing_panics_doc,
    clippy::too_many_lines,
    clippy::cast_precision_loss
)]

use std::{
    fs::{self, File},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread::sleep,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use nix::sched::{setns, CloneFlags};
use serde_json::Value;
use wg_sidecar::{
    nat::{self, Nat, PeerAddresses},
    policy::{Allow, Block, Egress, Ports, Protocol},
};

const WG: &str = "wg0";
const POOL: &str = "10.203.0.0/24";
const NETWORK: &str = "10.20.0.0/24";
const PEER_A: &str = "10.203.0.2";
const PEER_B: &str = "10.203.0.3";
const HOST_2: &str = "10.20.0.2";
const HOST_3: &str = "10.20.0.3";
const OUTSIDE: &str = "192.0.2.1";
const POOL6: &str = "fd00::/64";
const NETWORK6: &str = "fd20::/64";
const PEER_A6: &str = "fd00::2";
const PEER_B6: &str = "fd00::3";
const HOST6_2: &str = "fd20::2";
const HOST6_3: &str = "fd20::3";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"]
        .iter()
        .map(|d| PathBuf::from(d).join(name))
        .chain(
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join(name))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        )
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` not found: these tests need ip, nft, curl, python3"))
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

fn require_root() {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap();
    assert_eq!(
        uid, "0",
        "these tests must run as root (network namespaces, nftables)"
    );
}

/// A network namespace `wgt16-<role>-<pid>-<n>`, deleted on drop (with its interfaces).
struct Netns {
    name: String,
}

impl Netns {
    fn new(role: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let ns = Self {
            name: format!("wgt16-{role}-{}-{n}", std::process::id()),
        };
        run(Command::new(tool("ip")).args(["netns", "add", &ns.name]));
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) -> String {
        run(Command::new(tool("ip")).args(["-n", &self.name]).args(args))
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(tool("ip"));
        c.args(["netns", "exec", &self.name]).arg(tool(program));
        c
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        run(self.command(program).args(args))
    }

    /// Runs `f` on a new thread inside this namespace (that thread only).
    fn on_thread<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            setns(File::open(path).unwrap(), CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new(tool("ip"))
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// A process killed and reaped on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The three namespaces and the two HTTP servers of one test.
struct Lab {
    _servers: Vec<Guard>,
    pod: Netns,
    gw: Netns,
    _private: Netns,
    _served: tempfile::TempDir,
}

impl Lab {
    fn new() -> Self {
        require_root();
        let (pod, gw, private) = (Netns::new("pod"), Netns::new("gw"), Netns::new("prv"));
        let veth = |a: &Netns, a_if: &str, b: &Netns, b_if: &str| {
            run(Command::new(tool("ip")).args([
                "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if,
                "netns", &b.name,
            ]));
            a.ip(&["link", "set", a_if, "up"]);
            b.ip(&["link", "set", b_if, "up"]);
        };
        veth(&gw, WG, &pod, "gwlink");
        veth(&gw, "privgw", &private, "priv0");
        pod.ip(&["addr", "add", "192.168.16.2/24", "dev", "gwlink"]);
        for a in [PEER_A, PEER_B] {
            pod.ip(&["addr", "add", &format!("{a}/32"), "dev", "gwlink"]);
        }
        pod.ip(&["route", "add", "default", "via", "192.168.16.1"]);
        pod.ip(&["addr", "add", "fd16::2/64", "dev", "gwlink", "nodad"]);
        for a in [PEER_A6, PEER_B6] {
            pod.ip(&["addr", "add", &format!("{a}/128"), "dev", "gwlink", "nodad"]);
        }
        pod.ip(&["-6", "route", "add", "default", "via", "fd16::1"]);
        gw.ip(&["addr", "add", "192.168.16.1/24", "dev", WG]);
        gw.ip(&["addr", "add", "10.20.0.1/24", "dev", "privgw"]);
        gw.ip(&["route", "add", POOL, "via", "192.168.16.2"]);
        gw.ip(&["route", "add", "192.0.2.0/24", "via", HOST_2]);
        gw.ip(&["addr", "add", "fd16::1/64", "dev", WG, "nodad"]);
        gw.ip(&["addr", "add", "fd20::1/64", "dev", "privgw", "nodad"]);
        gw.ip(&["-6", "route", "add", POOL6, "via", "fd16::2"]);
        gw.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        gw.run("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        private.ip(&["addr", "add", &format!("{HOST_2}/24"), "dev", "priv0"]);
        private.ip(&["addr", "add", &format!("{HOST_3}/24"), "dev", "priv0"]);
        private.ip(&["addr", "add", &format!("{OUTSIDE}/32"), "dev", "lo"]);
        private.ip(&["route", "add", POOL, "via", "10.20.0.1"]);
        for a in [HOST6_2, HOST6_3] {
            private.ip(&["addr", "add", &format!("{a}/64"), "dev", "priv0", "nodad"]);
        }
        private.ip(&["-6", "route", "add", POOL6, "via", "fd20::1"]);
        let served = tempfile::tempdir().unwrap();
        let servers = [8080, 8081]
            .iter()
            .map(|port| {
                Guard(
                    private
                        .command("python3")
                        .args(["-m", "http.server", "--bind", "::", &port.to_string()])
                        .current_dir(served.path())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap(),
                )
            })
            .collect();
        let lab = Self {
            _servers: servers,
            pod,
            gw,
            _private: private,
            _served: served,
        };
        let start = Instant::now();
        while !lab
            .reach(&[
                (PEER_A, HOST_2, 8080),
                (PEER_A, HOST_2, 8081),
                (PEER_A6, HOST6_2, 8080),
                (PEER_B6, HOST6_3, 8081),
            ])
            .iter()
            .all(|ok| *ok)
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the HTTP servers did not come up"
            );
            sleep(Duration::from_millis(100));
        }
        lab
    }

    /// Whether each (source, destination, port) connection gets an HTTP answer (in parallel; a
    /// dropped SYN costs the 1 s connect timeout).
    fn reach(&self, probes: &[(&str, &str, u16)]) -> Vec<bool> {
        let children: Vec<Child> = probes
            .iter()
            .map(|(from, to, port)| {
                self.pod
                    .command("curl")
                    .args([
                        "-s",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "--connect-timeout",
                        "1",
                        "-m",
                        "3",
                        "--interface",
                        from,
                        &if to.contains(':') {
                            format!("http://[{to}]:{port}/")
                        } else {
                            format!("http://{to}:{port}/")
                        },
                    ])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        children
            .into_iter()
            .map(|c| String::from_utf8_lossy(&c.wait_with_output().unwrap().stdout) == "200")
            .collect()
    }

    /// Asserts which probes pass: `(from, to, port, expected)`.
    fn expect(&self, what: &str, cases: &[(&str, &str, u16, bool)]) {
        let probes: Vec<(&str, &str, u16)> = cases.iter().map(|c| (c.0, c.1, c.2)).collect();
        let got = self.reach(&probes);
        let wrong: Vec<String> = cases
            .iter()
            .zip(&got)
            .filter(|(c, ok)| c.3 != **ok)
            .map(|(c, ok)| {
                format!(
                    "{} → {}:{} {}",
                    c.0,
                    c.1,
                    c.2,
                    if *ok { "passed" } else { "was dropped" }
                )
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "{what}: {}\n{}",
            wrong.join("; "),
            self.gw
                .command("nft")
                .args(["list", "table", "inet", &nat::table_name(WG)])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        );
    }

    /// Every probe of the matrix: both peers to both hosts on both ports, and the outside address.
    fn matrix(
        a: [[bool; 2]; 2],
        b: [[bool; 2]; 2],
        outside: bool,
    ) -> Vec<(&'static str, &'static str, u16, bool)> {
        let mut out = Vec::new();
        for (peer, table) in [(PEER_A, a), (PEER_B, b)] {
            for (h, host) in [HOST_2, HOST_3].iter().enumerate() {
                for (p, port) in [8080, 8081].iter().enumerate() {
                    out.push((peer, *host, *port, table[h][p]));
                }
            }
            out.push((peer, OUTSIDE, 8080, outside));
        }
        out
    }

    /// Installs the table in the gateway namespace.
    fn install(&self, networks: &[&str], default_deny: bool) -> Nat {
        let networks: Vec<IpNet> = networks.iter().map(|n| n.parse().unwrap()).collect();
        self.gw.on_thread(move || {
            let pools = [POOL.parse().unwrap(), POOL6.parse().unwrap()];
            Nat::install_with(WG, &pools, &networks, default_deny).unwrap()
        })
    }

    /// One `set_peer_policies` call in the gateway namespace; returns how long it took.
    fn set(&self, nat: Nat, changes: Vec<(PeerAddresses, Option<Egress>)>) -> (Nat, Duration) {
        self.gw.on_thread(move || {
            let mut nat = nat;
            let refs: Vec<(PeerAddresses, Option<&Egress>)> = changes
                .iter()
                .map(|(p, e)| (p.clone(), e.as_ref()))
                .collect();
            let start = Instant::now();
            let done = nat.set_peer_policies(&refs).unwrap();
            let took = start.elapsed();
            assert_eq!(done.transactions, 1, "one call, one transaction: {done:?}");
            (nat, took)
        })
    }

    fn nft_json(&self) -> Vec<Value> {
        let text = self.nft(&["-j", "list", "table", "inet", &nat::table_name(WG)]);
        let v: Value = serde_json::from_str(&text).unwrap();
        v["nftables"].as_array().unwrap().clone()
    }

    fn nft_text(&self) -> String {
        self.nft(&["list", "table", "inet", &nat::table_name(WG)])
    }

    fn nft(&self, args: &[&str]) -> String {
        self.gw.run("nft", args)
    }
}

fn peer(a: &str) -> PeerAddresses {
    peers(&[a])
}

fn peers(a: &[&str]) -> PeerAddresses {
    PeerAddresses::new(a.iter().map(|a| a.parse().unwrap())).unwrap()
}

fn block(cidr: &str, except: &[&str]) -> Block {
    Block {
        cidr: cidr.parse().unwrap(),
        except: except.iter().map(|e| e.parse().unwrap()).collect(),
    }
}

fn tcp(port: u16) -> Ports {
    Ports {
        protocol: Protocol::Tcp,
        first: port,
        last: port,
    }
}

/// The rules of `chain` in an `nft -j` listing.
fn rules<'a>(json: &'a [Value], chain: &str) -> Vec<&'a Value> {
    json.iter()
        .filter_map(|o| o.get("rule"))
        .filter(|r| r["chain"] == chain)
        .collect()
}

fn object<'a>(json: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    json.iter()
        .filter_map(|o| o.get(kind))
        .find(|c| c["name"] == name)
}

/// `{"jump": {"target": chain}}` somewhere in `v`.
fn jumps_to(v: &Value, chain: &str) -> bool {
    v.to_string()
        .contains(&format!(r#"{{"jump":{{"target":"{chain}"}}}}"#))
}

#[test]
fn with_networks_an_unrestricted_peer_reaches_them_and_nothing_else() {
    let lab = Lab::new();
    let all = [[true; 2]; 2];
    lab.expect("before the table", &Lab::matrix(all, all, true));
    let nat = lab.install(&[NETWORK], false);
    lab.expect(
        "unrestricted peers under networks [10.20.0.0/24]",
        &Lab::matrix(all, all, false),
    );
    let json = lab.nft_json();
    let forward = object(&json, "chain", "forward").unwrap();
    assert_eq!(
        (&forward["hook"], &forward["type"], &forward["policy"]),
        (
            &Value::from("forward"),
            &Value::from("filter"),
            &Value::from("accept")
        )
    );
    let fw = rules(&json, "forward");
    assert_eq!(fw.len(), 2, "{fw:?}");
    let first = fw[0]["expr"].to_string();
    assert!(
        first.contains(r#""iifname""#) && first.contains(r#""wg0""#),
        "{first}"
    );
    assert!(first.contains(r#""addr":"10.20.0.0","len":24"#), "{first}");
    assert!(jumps_to(&fw[0]["expr"], "tunnel"), "{first}");
    assert_eq!(
        (&fw[1]["expr"][1], &fw[1]["expr"][2]),
        (
            &serde_json::json!({"counter": "dropped_outside_networks"}),
            &serde_json::json!({"drop": null})
        ),
        "{:?}",
        fw[1]
    );
    assert!(object(&json, "counter", "dropped_outside_networks").is_some());
    let dropped = nat.drop_counters().unwrap();
    // The matrix sent one connection per peer to the outside address: its SYN and retries.
    assert!(
        dropped.outside_networks >= 2 && dropped.policy == 0,
        "{dropped:?}"
    );
    assert_eq!(
        object(&json, "counter", "dropped_outside_networks").unwrap()["packets"],
        dropped.outside_networks,
        "the netlink read agrees with nft"
    );
    let tunnel = rules(&json, "tunnel");
    assert_eq!(tunnel.len(), 3);
    assert!(
        tunnel[0]["expr"].to_string().contains(r#""vmap""#)
            && tunnel[0]["expr"].to_string().contains("@peers")
    );
    assert!(tunnel[1]["expr"].to_string().contains("@peers6"));
    assert_eq!(tunnel[2]["expr"][0], serde_json::json!({"accept": null}));
    let map = object(&json, "map", "peers").unwrap();
    assert_eq!(
        (&map["type"], &map["map"]),
        (&Value::from("ipv4_addr"), &Value::from("verdict"))
    );
    assert_eq!(object(&json, "map", "peers6").unwrap()["type"], "ipv6_addr");
    assert!(lab.nft_text().contains("masquerade"), "masquerading stays");
    assert_eq!(
        nat.rule_counts(),
        nat::RuleCounts {
            base_rules: 1 + 3 + 2, // one masquerade (no IPv6 network), tunnel, forward
            ..nat::RuleCounts::default()
        }
    );
}

#[test]
fn with_no_networks_nothing_is_forwarded() {
    let lab = Lab::new();
    let none = [[false; 2]; 2];
    let _nat = lab.install(&[], false);
    lab.expect("no networks", &Lab::matrix(none, none, false));
    let json = lab.nft_json();
    let fw = rules(&json, "forward");
    assert_eq!(fw.len(), 1, "only the drop: {fw:?}");
    assert!(!jumps_to(&fw[0]["expr"], "tunnel"));
}

#[test]
fn a_peer_policy_allows_exactly_its_destination_and_port_and_changes_apply_live() {
    let lab = Lab::new();
    let all = [[true; 2]; 2];
    let nat = lab.install(&[NETWORK], false);
    let (nat, first) = lab.set(nat, vec![(peer(PEER_A), Some(only_2_8080()))]);
    lab.expect(
        "peer A allowed 10.20.0.2:8080 only",
        &Lab::matrix([[true, false], [false, false]], all, false),
    );
    let json = lab.nft_json();
    let map = object(&json, "map", "peers").unwrap();
    assert_eq!(
        map["elem"],
        serde_json::json!([["10.203.0.2", {"jump": {"target": "peer_10_203_0_2"}}]]),
        "{map}"
    );
    let chain = rules(&json, "peer_10_203_0_2");
    assert_eq!(chain.len(), 2, "{chain:?}");
    let text = chain[0]["expr"].to_string();
    assert!(
        text.contains(r#""right":"10.20.0.2""#) && text.contains(r#""right":8080"#),
        "{text}"
    );
    assert_eq!(
        chain[1]["expr"],
        serde_json::json!([{"counter": "dropped_policy"}, {"drop": null}])
    );
    let dropped = nat.drop_counters().unwrap();
    assert!(
        dropped.policy >= 3,
        "peer A's three refused connections inside the network: {dropped:?}"
    );
    assert_eq!(
        (
            nat.rule_counts().peers,
            nat.rule_counts().peer_rules,
            nat.rule_counts().map_entries
        ),
        (1, 2, 1)
    );

    let only_3_8081 = Egress::Allowed(vec![Allow {
        to: Some(vec![block("10.20.0.3/32", &[])]),
        ports: Some(vec![tcp(8081)]),
    }]);
    let (nat, change) = lab.set(nat, vec![(peer(PEER_A), Some(only_3_8081))]);
    lab.expect(
        "changed live to 10.20.0.3:8081",
        &Lab::matrix([[false, false], [false, true]], all, false),
    );
    let (nat, removal) = lab.set(nat, vec![(peer(PEER_A), None)]);
    lab.expect("policy removed", &Lab::matrix(all, all, false));
    let json = lab.nft_json();
    assert!(object(&json, "chain", "peer_10_203_0_2").is_none());
    assert!(object(&json, "map", "peers").unwrap().get("elem").is_none());
    assert_eq!(nat.rule_counts().peers, 0);
    eprintln!(
        "FIGURE set_peer_policies one peer: add {first:?}, change {change:?}, remove {removal:?}"
    );
}

#[test]
fn an_except_inside_a_block_is_refused_and_other_rules_still_apply_to_it() {
    let lab = Lab::new();
    let all = [[true; 2]; 2];
    let nat = lab.install(&[NETWORK], false);
    let egress = Egress::Allowed(vec![
        Allow {
            to: Some(vec![block(NETWORK, &["10.20.0.3/32"])]),
            ports: None,
        },
        Allow {
            to: Some(vec![block("10.20.0.3/32", &[])]),
            ports: Some(vec![tcp(8081)]),
        },
    ]);
    let (_nat, _) = lab.set(nat, vec![(peer(PEER_A), Some(egress))]);
    lab.expect(
        "10.20.0.0/24 except 10.20.0.3, plus 10.20.0.3:8081",
        &Lab::matrix([[true, true], [false, true]], all, false),
    );
    let json = lab.nft_json();
    let x = rules(&json, "peer_10_203_0_2_x0");
    assert_eq!(x.len(), 2, "{x:?}");
    assert!(x[0]["expr"].to_string().contains(r#""10.20.0.3""#));
    assert_eq!(
        x[0]["expr"].as_array().unwrap().last().unwrap(),
        &serde_json::json!({"return": null}),
        "{:?}",
        x[0]
    );
    assert_eq!(x[1]["expr"][0], serde_json::json!({"accept": null}));
    assert!(jumps_to(
        &rules(&json, "peer_10_203_0_2")[0]["expr"],
        "peer_10_203_0_2_x0"
    ));
}

#[test]
fn default_deny_drops_peers_without_a_policy() {
    let lab = Lab::new();
    let none = [[false; 2]; 2];
    let nat = lab.install(&[NETWORK], true);
    lab.expect("default deny, no policies", &Lab::matrix(none, none, false));
    let everything = Egress::Allowed(vec![Allow {
        to: None,
        ports: None,
    }]);
    let (_nat, _) = lab.set(nat, vec![(peer(PEER_A), Some(everything))]);
    lab.expect(
        "peer A allowed everything, B without policy",
        &Lab::matrix([[true; 2]; 2], none, false),
    );
    assert_eq!(
        rules(&lab.nft_json(), "tunnel")[2]["expr"],
        serde_json::json!([{"counter": "dropped_policy"}, {"drop": null}])
    );
}

#[test]
fn ipv6_addresses_are_keyed_and_filtered_like_ipv4_ones() {
    let lab = Lab::new();
    let six = |a: [bool; 2], b: [bool; 2], v4: bool| {
        let mut cases = Vec::new();
        for (peer, row) in [(PEER_A6, a), (PEER_B6, b)] {
            cases.push((peer, HOST6_2, 8080, row[0]));
            cases.push((peer, HOST6_2, 8081, row[1]));
            cases.push((peer, HOST6_3, 8080, row[1]));
        }
        cases.push((PEER_A, HOST_2, 8080, v4));
        cases
    };
    lab.expect("IPv6 before the table", &six([true; 2], [true; 2], true));
    let nat = lab.install(&[NETWORK, NETWORK6], false);
    lab.expect("IPv6, unrestricted", &six([true; 2], [true; 2], true));
    let egress = Egress::Allowed(vec![Allow {
        to: Some(vec![block("fd20::2/128", &[])]),
        ports: Some(vec![tcp(8080)]),
    }]);
    // Peer A is one peer with both addresses: its policy names only an IPv6 host.
    let (_nat, _) = lab.set(nat, vec![(peers(&[PEER_A, PEER_A6]), Some(egress))]);
    lab.expect(
        "peer A allowed [fd20::2]:8080 only",
        &six([true, false], [true; 2], false),
    );
    let json = lab.nft_json();
    assert_eq!(
        object(&json, "map", "peers6").unwrap()["elem"],
        serde_json::json!([["fd00::2", {"jump": {"target": "peer_10_203_0_2"}}]])
    );
    assert_eq!(
        object(&json, "map", "peers").unwrap()["elem"],
        serde_json::json!([["10.203.0.2", {"jump": {"target": "peer_10_203_0_2"}}]])
    );
    let text = rules(&json, "peer_10_203_0_2")[0]["expr"].to_string();
    assert!(
        text.contains(r#""protocol":"ip6""#) && text.contains(r#""right":"fd20::2""#),
        "{text}"
    );
}

/// 10 000 peers × 10 rules each (5 hosts × 2 ports): the policies of peer `i`.
fn big_changes() -> Vec<(PeerAddresses, Egress)> {
    (0..10_000u32)
        .map(|i| {
            let a = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 203, 0, 2)) + i);
            let hosts = (0..5)
                .map(|h| block(&format!("10.20.{}.{}/32", i % 200, h + 2), &[]))
                .collect();
            let egress = Egress::Allowed(vec![Allow {
                to: Some(hosts),
                ports: Some(vec![tcp(443), tcp(8000 + u16::try_from(i % 100).unwrap())]),
            }]);
            (PeerAddresses::new([a.into()]).unwrap(), egress)
        })
        .collect()
}

#[test]
fn ten_thousand_peers_with_ten_rules_each_build_apply_and_keep_filtering() {
    let changes = big_changes();
    let refs: Vec<(PeerAddresses, Option<&Egress>)> =
        changes.iter().map(|(p, e)| (p.clone(), Some(e))).collect();
    let start = Instant::now();
    let (tx, delta, done) = nat::peer_policy_batch(WG, &nat::PeerFilters::default(), &refs);
    let build = start.elapsed();
    let mut state = nat::PeerFilters::default();
    state.apply(delta);
    assert_eq!(
        (
            done.written,
            state.peers(),
            state.rules(),
            state.map_entries()
        ),
        (10_000, 10_000, 110_000, 10_000)
    );
    eprintln!(
        "FIGURE batch for 10000 peers x 10 rules: {} messages, {} bytes ({:.1} MiB), built in {build:?}",
        tx.messages,
        tx.bytes.len(),
        tx.bytes.len() as f64 / f64::from(1u32 << 20)
    );

    let lab = Lab::new();
    let nat = lab.install(&[NETWORK], false);
    let (nat, applied, parts) = lab.gw.on_thread(move || {
        let mut nat = nat;
        let refs: Vec<(PeerAddresses, Option<&Egress>)> =
            changes.iter().map(|(p, e)| (p.clone(), Some(e))).collect();
        let start = Instant::now();
        let done = nat.set_peer_policies(&refs).unwrap();
        (nat, start.elapsed(), done.transactions)
    });
    let counts = nat.rule_counts();
    assert_eq!(
        (counts.peers, counts.peer_rules, counts.map_entries),
        (10_000, 110_000, 10_000)
    );
    let start = Instant::now();
    let listed = lab.nft_text();
    let list = start.elapsed();
    assert_eq!(
        listed.matches("jump peer_").count(),
        10_000,
        "one map entry per peer"
    );
    assert_eq!(listed.matches("tcp dport 443 accept").count(), 50_000);
    eprintln!(
        "FIGURE applied 10000 peers x 10 rules in {applied:?} ({parts} transactions of <= {} bytes); `nft list` took {list:?}",
        nat.transaction_budget()
    );

    // The test peers still get exactly their policies among 10 000 others (the first big peer is
    // PEER_A: 10.20.0.{2..6}:{443,8000}; PEER_B: 10.20.1.{2..6}:{443,8001}, neither 8080 nor 8081).
    let none = [[false; 2]; 2];
    let all = [[true; 2]; 2];
    lab.expect("among 10 000 peers", &Lab::matrix(none, none, false));
    // One more small change among them stays quick and is one transaction.
    let (nat, change) = lab.set(nat, vec![(peer(PEER_B), None)]);
    lab.expect(
        "peer B's policy removed among 10 000",
        &Lab::matrix(none, all, false),
    );
    let (nat, rewrite) = lab.set(nat, vec![(peer(PEER_A), Some(only_2_8080()))]);
    lab.expect(
        "peer A rewritten to 10.20.0.2:8080 among 10 000",
        &Lab::matrix([[true, false], [false, false]], all, false),
    );
    eprintln!(
        "FIGURE among 10000 peers: removing one peer's policy {change:?}, rewriting one {rewrite:?}"
    );
    let crowded = connect_latency(&lab, PEER_A);
    drop(nat);
    // The same peer alone in a fresh table, for comparison.
    let nat = lab.install(&[NETWORK], false);
    let (_nat, _) = lab.set(nat, vec![(peer(PEER_A), Some(only_2_8080()))]);
    let alone = connect_latency(&lab, PEER_A);
    eprintln!(
        "FIGURE TCP connect + HTTP HEAD through the gateway by a peer with a policy: {crowded:?} per request among 10000 peer chains, {alone:?} alone"
    );
}

fn only_2_8080() -> Egress {
    Egress::Allowed(vec![Allow {
        to: Some(vec![block("10.20.0.2/32", &[])]),
        ports: Some(vec![tcp(8080)]),
    }])
}

/// Mean time of 500 sequential HTTP requests from `from` to 10.20.0.2:8080 (one Python client).
fn connect_latency(lab: &Lab, from: &str) -> Duration {
    let code = format!(
        "import socket,time\nn=500\nt=time.perf_counter()\nfor _ in range(n):\n  s=socket.create_connection(('{HOST_2}',8080),timeout=2,source_address=('{from}',0))\n  s.sendall(b'HEAD / HTTP/1.0\\r\\n\\r\\n')\n  while s.recv(4096): pass\n  s.close()\nprint((time.perf_counter()-t)/n)\n"
    );
    let out = lab.pod.run("python3", &["-c", &code]);
    Duration::from_secs_f64(out.trim().parse().unwrap())
}
