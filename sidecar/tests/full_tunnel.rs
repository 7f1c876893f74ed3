//! The full tunnel (`0.0.0.0/0`, `::/0`) in a Pod-like namespace whose own default route goes out
//! by its `eth0`, as root in network namespaces made by the test: `wg-sidecar init` and `run`
//! (the real binary, userspace WireGuard, keys from a real OpenBao), Debian's `wireguard-go` +
//! `wg` as the gateway, three servers behind the gateway, and `tcpdump` on the Pod's `eth0`.
//!
//! ```text
//!  pod (ft-p) eth0 192.168.40.2 ── router (ft-r) 192.168.40.1, OpenBao :8200
//!  default via the router             │ 172.31.40.1   routes the servers' networks to the gateway
//!                                     │                (so a request sent in the clear arrives)
//!                          gateway (ft-g) 172.31.40.2:51820 wireguard-go, tunnel 10.66.0.1
//!                                     │
//!                          servers (ft-s) 198.51.100.10, 203.0.113.10, 2001:db8:77::10 :8080
//! ```
//!
//! The servers answer with the address the request came from, so a request that went through
//! the tunnel says `10.66.0.2` / `fd66::2` and one that leaked says `192.168.40.2`.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

mod lab;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use lab::{
    find_binary, keypair, require_root, scratch, wait_for, write_secret_file, ChildGuard, Netns,
    OpenBao, WgGoPeer,
};
use serde_json::json;

const POD_ETH0: &str = "192.168.40.2";
const POD_ETH0_6: &str = "fd40::2";
const ROUTER_POD_SIDE: &str = "192.168.40.1";
const ENDPOINT: &str = "172.31.40.2";
const POD_TUN4: &str = "10.66.0.2";
const POD_TUN6: &str = "fd66::2";
const DESTINATIONS: [&str; 3] = ["198.51.100.10", "203.0.113.10", "2001:db8:77::10"];

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn sysctl(ns: &Netns, kv: &str) {
    ns.run("sysctl", &["-qw", kv]).unwrap();
}

/// `ip addr add` without duplicate address detection (IPv6 addresses are usable at once).
fn addr(ns: &Netns, cidr: &str, dev: &str) {
    let mut args = vec!["addr", "add", cidr, "dev", dev];
    if cidr.contains(':') {
        args.push("nodad");
    }
    ns.ip(&args).unwrap();
}

/// Links `a` and `b` with a veth pair carrying `a_addrs` and `b_addrs`; returns (a's, b's) name.
fn link(a: &Netns, a_addrs: &[&str], b: &Netns, b_addrs: &[&str]) -> (String, String) {
    let (ia, ib) = (lab::unique("fa"), lab::unique("fb"));
    lab::ip(&[
        "link", "add", &ia, "netns", &a.name, "type", "veth", "peer", "name", &ib, "netns", &b.name,
    ])
    .unwrap();
    for cidr in a_addrs {
        addr(a, cidr, &ia);
    }
    for cidr in b_addrs {
        addr(b, cidr, &ib);
    }
    a.ip(&["link", "set", &ia, "up"]).unwrap();
    b.ip(&["link", "set", &ib, "up"]).unwrap();
    (ia, ib)
}

/// An HTTP server on `[::]:8080` (IPv4 too) that answers every request with the client's
/// address.
fn whoami_server(ns: &Netns) -> ChildGuard {
    let code = "import socket\n\
        s=socket.socket(socket.AF_INET6)\n\
        s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
        s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\n\
        s.bind(('::',8080))\ns.listen(16)\n\
        while True:\n  c,a=s.accept()\n  c.settimeout(2)\n  try:\n    c.recv(4096)\n\
        \x20   b=a[0].replace('::ffff:','').encode()\n\
        \x20   c.sendall(b'HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n'%len(b)+b)\n\
        \x20 except OSError: pass\n  c.close()\n";
    let child = ns
        .command(find_binary("python3").unwrap())
        .args(["-c", code])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    ChildGuard {
        child,
        what: "whoami server".into(),
    }
}

/// The Pod's own eth0 address of `dst`'s family: what a server sees from a request in the clear.
fn eth0_of(dst: &str) -> &'static str {
    if dst.contains(':') {
        POD_ETH0_6
    } else {
        POD_ETH0
    }
}

fn url(dst: &str) -> String {
    if dst.contains(':') {
        format!("http://[{dst}]:8080/")
    } else {
        format!("http://{dst}:8080/")
    }
}

/// `connect()` from the Pod to `dst:8080`: `Ok(())` or the errno, and how long it took.
fn connect(pod: &Netns, dst: &str) -> (Result<(), i32>, Duration) {
    let code = format!(
        "import socket,sys\ntry:\n  socket.create_connection(('{dst}',8080),timeout=10)\n  print('connected')\nexcept OSError as e:\n  print(e.errno)\n"
    );
    let start = Instant::now();
    let out = pod.run("python3", &["-c", &code]).unwrap();
    let took = start.elapsed();
    match out.trim() {
        "connected" => (Ok(()), took),
        errno => (Err(errno.parse().unwrap_or(-1)), took),
    }
}

/// `wg-sidecar ARGS…` in `ns` as the injector runs it: uid 0 with `NET_ADMIN` as its only
/// capability (bounding, inheritable and ambient sets), an empty environment but `PATH`. So the
/// rules, the routes, the TUN device and the socket's mark (`SO_MARK`) are shown to need no more.
fn as_injected(ns: &Netns, args: &[String]) -> Command {
    let mut c = ns.command(find_binary("setpriv").unwrap());
    c.args([
        "--bounding-set=-all,+net_admin",
        "--inh-caps=-all,+net_admin",
        "--ambient-caps=-all,+net_admin",
        "--",
    ])
    .arg(lab::sidecar_bin())
    .args(args)
    .env_clear()
    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    c
}

/// Asserts that a connection to each destination fails at once as unreachable; returns
/// `dst errno took` of each.
fn all_unreachable(pod: &Netns, phase: &str) -> Vec<String> {
    DESTINATIONS
        .iter()
        .map(|dst| {
            let (res, took) = connect(pod, dst);
            assert!(
                matches!(res, Err(113 | 101)),
                "{dst} {phase}: {res:?} (want EHOSTUNREACH or ENETUNREACH)"
            );
            // At once, not after the 10 s connect timeout (room for a loaded CI machine).
            assert!(
                took < Duration::from_secs(5),
                "{dst} {phase}: took {took:?}"
            );
            format!("{dst} errno {} in {took:.0?}", res.unwrap_err())
        })
        .collect()
}

/// `tcpdump` on one interface of a namespace, writing a pcap file; stopped with SIGTERM.
struct Capture {
    process: ChildGuard,
    file: PathBuf,
}

impl Capture {
    fn start(ns: &Netns, dev: &str, file: &Path) -> Self {
        let log = file.with_extension("log");
        let child = ns
            .command(find_binary("tcpdump").unwrap())
            .args(["-i", dev, "-n", "-U", "--immediate-mode", "-w"])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let process = ChildGuard {
            child,
            what: "tcpdump".into(),
        };
        assert!(
            wait_for(Duration::from_secs(5), || fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("listening on")),
            "tcpdump did not start: {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        Self {
            process,
            file: file.to_owned(),
        }
    }

    /// Stops the capture; every packet written so far is in the file.
    fn stop(mut self) -> PathBuf {
        sleep(Duration::from_millis(200));
        self.process.terminate(Duration::from_secs(5)).unwrap();
        self.file.clone()
    }
}

/// A file removed on drop (the UAPI socket a killed sidecar leaves behind).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// The packets of `pcap` that match the BPF `filter`, one summary line each.
fn packets(pcap: &Path, filter: &str) -> Vec<String> {
    let out = Command::new(find_binary("tcpdump").unwrap())
        .args(["-r"])
        .arg(pcap)
        .args(["-n", filter])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "tcpdump -r {filter:?} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// What may leave the Pod's eth0: the tunnel's own UDP with the gateway endpoint, the
/// sidecar's traffic with Vault (exempt), and IPv6 link-local/multicast housekeeping
/// (neighbour discovery, MLD).
fn allowed() -> String {
    format!(
        "(udp and host {ENDPOINT} and port 51820) or (tcp and host {ROUTER_POD_SIDE} and port 8200) \
         or (ip6 and (net fe80::/10 or net ff00::/8))"
    )
}

/// Stops `capture` after one request to Vault (exempt, so it leaves by eth0), and checks that
/// the capture saw it: a capture that sees nothing proves nothing.
fn stop_checked(pod: &Netns, capture: Capture) -> PathBuf {
    let (code, _) = pod
        .http_get(&format!("http://{ROUTER_POD_SIDE}:8200/v1/sys/health"))
        .unwrap();
    assert_eq!(code, 200, "Vault must stay reachable (exempt)");
    let pcap = capture.stop();
    let vault = packets(&pcap, &vault_filter());
    assert!(
        vault.len() >= 6,
        "the capture missed the request to Vault: {vault:#?}"
    );
    pcap
}

fn vault_filter() -> String {
    format!("tcp and host {ROUTER_POD_SIDE} and port 8200")
}

/// IP packets of `pcap` that are none of [`allowed`]: what left in the clear.
fn in_the_clear(pcap: &Path) -> Vec<String> {
    packets(pcap, &format!("(ip or ip6) and not ({})", allowed()))
}

/// The namespaces of the module doc, configured: the gateway's `wireguard-go` knows the Pod's
/// key (`pod_key`) and the servers answer.
struct Lab {
    pod: Netns,
    router: Netns,
    _gateway: Netns,
    _servers: Netns,
    eth0: String,
    _gwpeer: WgGoPeer,
    _server: ChildGuard,
    pod_key: (String, String),
    gw_public: String,
}

fn lab() -> Lab {
    let pod = Netns::new("ft-p").unwrap();
    let router = Netns::new("ft-r").unwrap();
    let gateway = Netns::new("ft-g").unwrap();
    let servers = Netns::new("ft-s").unwrap();
    let (eth0, _) = link(
        &pod,
        &["192.168.40.2/24", "fd40::2/64"],
        &router,
        &["192.168.40.1/24", "fd40::1/64"],
    );
    link(
        &router,
        &["172.31.40.1/24", "fd31::1/64"],
        &gateway,
        &["172.31.40.2/24", "fd31::2/64"],
    );
    link(
        &gateway,
        &["198.51.100.1/24", "203.0.113.1/24", "2001:db8:77::1/64"],
        &servers,
        &["198.51.100.10/24", "203.0.113.10/24", "2001:db8:77::10/64"],
    );
    // The Pod: its own default routes go out by eth0, metric 0, as a CNI sets them.
    pod.ip(&["route", "add", "default", "via", ROUTER_POD_SIDE])
        .unwrap();
    pod.ip(&["-6", "route", "add", "default", "via", "fd40::1"])
        .unwrap();
    // The router reaches the servers' networks in the clear through the gateway's namespace.
    for net in ["198.51.100.0/24", "203.0.113.0/24"] {
        router.ip(&["route", "add", net, "via", ENDPOINT]).unwrap();
    }
    router
        .ip(&["-6", "route", "add", "2001:db8:77::/64", "via", "fd31::2"])
        .unwrap();
    gateway
        .ip(&["route", "add", "default", "via", "172.31.40.1"])
        .unwrap();
    gateway
        .ip(&["-6", "route", "add", "default", "via", "fd31::1"])
        .unwrap();
    servers
        .ip(&["route", "add", "default", "via", "198.51.100.1"])
        .unwrap();
    servers
        .ip(&["-6", "route", "add", "default", "via", "2001:db8:77::1"])
        .unwrap();
    for ns in [&router, &gateway] {
        sysctl(ns, "net.ipv4.ip_forward=1");
        sysctl(ns, "net.ipv6.conf.all.forwarding=1");
    }
    let pod_key = keypair();
    let gw_key = keypair();
    let gw_public = gw_key.1.clone();
    let gwpeer = WgGoPeer::start_with_key(&gateway, "10.66.0.1/24", 51820, &gw_key).unwrap();
    addr(&gateway, "fd66::1/64", &gwpeer.ifname);
    gwpeer
        .set_peer(&pod_key.1, &format!("{POD_TUN4}/32,{POD_TUN6}/128"), None)
        .unwrap();
    let server = whoami_server(&servers);
    assert!(
        wait_for(Duration::from_secs(5), || servers
            .http_get("http://127.0.0.1:8080/")
            .is_ok_and(|(code, _)| code == 200)),
        "whoami server not up"
    );
    Lab {
        pod,
        router,
        _gateway: gateway,
        _servers: servers,
        eth0,
        _gwpeer: gwpeer,
        _server: server,
        pod_key,
        gw_public,
    }
}

const ROUTES: &str = "0.0.0.0/0,::/0";

/// What the injector would render for this Pod: Vault's and the endpoint's addresses exempt.
fn exclude_args() -> Vec<String> {
    strings(&[
        "--exclude",
        &format!("{ROUTER_POD_SIDE}/32"),
        "--exclude",
        &format!("{ENDPOINT}/32"),
    ])
}

#[test]
fn the_full_tunnel_carries_everything_but_vault_and_the_endpoint_and_nothing_leaves_in_the_clear_when_it_dies(
) {
    require_root();
    let lab = lab();
    let pod = &lab.pod;
    let dir = scratch();
    let bao = OpenBao::start_on(&lab.router, &format!("{ROUTER_POD_SIDE}:8200")).unwrap();
    bao.put(
        "wg/keys/shop/web",
        &json!({"private_key": lab.pod_key.0, "address": format!("{POD_TUN4}/32,{POD_TUN6}/128")}),
    )
    .unwrap();
    bao.put(
        "wg/gateways/corp",
        &json!({"public_key": lab.gw_public, "endpoints": format!("{ENDPOINT}:51820"), "allowed_ips": ROUTES}),
    )
    .unwrap();

    // Before: the Pod's own default route reaches every destination in the clear (the bug's
    // setting: a server behind the gateway answers a request that never went through it).
    // (Waiting a moment for the lab's neighbours on the first request.)
    for dst in DESTINATIONS {
        assert!(
            wait_for(Duration::from_secs(5), || pod
                .http_get(&url(dst))
                .is_ok_and(|(code, body)| code == 200 && body == eth0_of(dst))),
            "{dst} before init: {:?}",
            pod.http_get(&url(dst))
        );
    }

    // wg-init: rules and kill switch. Every destination is unreachable at once; Vault is not.
    let mut init = strings(&["init", "--routes", ROUTES]);
    init.extend(exclude_args());
    let out = as_injected(pod, &init).output().unwrap();
    assert!(
        out.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = pod.ip(&["rule", "show"]).unwrap();
    assert!(
        rules.contains(&format!(
            "10000:\tfrom all to {ROUTER_POD_SIDE} lookup main"
        )) && rules.contains(&format!("10000:\tfrom all to {ENDPOINT} lookup main"))
            && rules.contains("10001:\tnot from all fwmark 0xca6d lookup 51820"),
        "{rules}"
    );
    let rules6 = pod.ip(&["-6", "rule", "show"]).unwrap();
    assert!(
        rules6.contains("10001:\tnot from all fwmark 0xca6d lookup 51820"),
        "{rules6}"
    );
    let capture = Capture::start(pod, &lab.eth0, &dir.path().join("init.pcap"));
    let failed = all_unreachable(pod, "after init");
    // Vault stays reachable before the tunnel is up (stop_checked asks it).
    let pcap = stop_checked(pod, capture);
    let clear = in_the_clear(&pcap);
    assert!(clear.is_empty(), "left in the clear after init: {clear:#?}");
    eprintln!(
        "after init: {failed:?}; eth0 saw {} Vault, {} other IP packets",
        packets(&pcap, &vault_filter()).len(),
        clear.len()
    );

    // wg-sidecar run: keys from OpenBao (exempt), the tunnel up; the app talks to the three
    // destinations, which see the Pod's tunnel addresses.
    let token = dir.path().join("token");
    write_secret_file(&token, "devroot\n");
    let ifname = lab::unique("ft-w");
    let log = dir.path().join("sidecar.log");
    let mut run = strings(&[
        "run",
        "--interface",
        &ifname,
        "--gateway",
        "corp",
        "--routes",
        ROUTES,
        "--vault-addr",
        &bao.addr,
        "--vault-auth",
        "token",
        "--vault-token-file",
        token.to_str().unwrap(),
        "--vault-key-path",
        "wg/keys/shop/web",
        "--health-addr",
        "127.0.0.1:9901",
        "--poll-interval",
        "2",
        "--log-format",
        "text",
    ]);
    run.extend(exclude_args());
    let capture = Capture::start(pod, &lab.eth0, &dir.path().join("run.pcap"));
    let _socket = RemoveOnDrop(PathBuf::from(format!("/var/run/wireguard/{ifname}.sock")));
    let sidecar = ChildGuard {
        child: as_injected(pod, &run)
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap(),
        what: "wg-sidecar".into(),
    };
    let started = Instant::now();
    assert!(
        wait_for(Duration::from_secs(20), || pod
            .http_get("http://127.0.0.1:9901/ready")
            .is_ok_and(|(code, _)| code == 200)),
        "never ready: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    let ready_after = started.elapsed();
    let status = fs::read_to_string(format!("/proc/{}/status", sidecar.pid())).unwrap();
    assert!(
        status.contains("wg-sidecar") && status.contains("CapEff:\t0000000000001000"),
        "the sidecar must run with NET_ADMIN only: {status}"
    );
    // Interop: the standard `wg` reads the socket's mark over UAPI.
    let fwmark = pod.run("wg", &["show", &ifname, "fwmark"]).unwrap();
    assert_eq!(fwmark.trim(), "0xca6d");
    let table = pod.ip(&["route", "show", "table", "51820"]).unwrap();
    assert!(
        table.contains(&format!("default dev {ifname}")) && table.contains("unreachable default"),
        "{table}"
    );
    let mut answered = 0;
    for round in 0..3 {
        for dst in DESTINATIONS {
            let (code, body) = pod.http_get(&url(dst)).unwrap();
            let want = if dst.contains(':') {
                POD_TUN6
            } else {
                POD_TUN4
            };
            assert_eq!(
                (code, body.as_str()),
                (200, want),
                "{dst} round {round}: not through the tunnel; {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            answered += 1;
        }
    }
    // Let a keepalive-free poll of Vault happen too (every 2 s).
    sleep(Duration::from_millis(2500));
    let pcap = stop_checked(pod, capture);
    let clear = in_the_clear(&pcap);
    let wireguard = packets(&pcap, &format!("udp and host {ENDPOINT} and port 51820"));
    let vault = packets(
        &pcap,
        &format!("tcp and host {ROUTER_POD_SIDE} and port 8200"),
    );
    assert!(
        clear.is_empty(),
        "left the Pod's eth0 in the clear while tunnelled: {clear:#?}"
    );
    assert!(
        wireguard.len() >= 2 * answered,
        "the requests must have crossed eth0 as WireGuard: {} packets",
        wireguard.len()
    );
    assert!(
        !vault.is_empty(),
        "the sidecar reached Vault outside the tunnel"
    );
    eprintln!(
        "tunnelled: ready after {ready_after:?}; {answered} requests; eth0 saw {} WireGuard, {} Vault, {} other IP packets",
        wireguard.len(),
        vault.len(),
        clear.len()
    );

    // The tunnel dies (its interface goes, and with it the table's routes through it): every
    // destination is unreachable at once and nothing leaves in the clear.
    let capture = Capture::start(pod, &lab.eth0, &dir.path().join("dead.pcap"));
    pod.ip(&["link", "del", &ifname]).unwrap();
    let table = pod.ip(&["route", "show", "table", "51820"]).unwrap();
    assert!(!table.contains(&ifname), "{table}");
    let failed = all_unreachable(pod, "with the tunnel gone");
    for dst in DESTINATIONS {
        let (code, _) = pod.http_get(&url(dst)).unwrap();
        assert_eq!(code, 0, "{dst} answered with the tunnel gone");
    }
    let pcap = stop_checked(pod, capture);
    let clear = in_the_clear(&pcap);
    assert!(
        clear.is_empty(),
        "left in the clear with the tunnel gone: {clear:#?}"
    );
    eprintln!(
        "tunnel gone: {failed:?}; eth0 saw {} other IP packets",
        clear.len()
    );

    // Control: without the rules, the same requests leave by eth0 in the clear and the
    // servers answer them, and the capture sees it (so its silence above means something).
    let capture = Capture::start(pod, &lab.eth0, &dir.path().join("control.pcap"));
    pod.ip(&["rule", "del", "priority", "10001"]).unwrap();
    pod.ip(&["-6", "rule", "del", "priority", "10001"]).unwrap();
    for dst in DESTINATIONS {
        let (code, body) = pod.http_get(&url(dst)).unwrap();
        assert_eq!(
            (code, body.as_str()),
            (200, eth0_of(dst)),
            "{dst} without rules"
        );
    }
    let pcap = stop_checked(pod, capture);
    let clear = in_the_clear(&pcap);
    for dst in DESTINATIONS {
        assert!(
            clear.iter().any(|p| p.contains(&format!("> {dst}."))),
            "the capture must see the request to {dst} in the clear: {clear:#?} (all: {:#?})",
            packets(&pcap, "")
        );
    }
    eprintln!(
        "control without rules: {} IP packets in the clear",
        clear.len()
    );
}
