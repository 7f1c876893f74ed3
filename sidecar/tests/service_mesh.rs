//! A service mesh's traffic capture beside ours (issue 21, item 3; docs/service-mesh.md), as root
//! in network namespaces made by the test: `wg-sidecar init` first (as the injector orders
//! `wg-init` before `istio-init`), then the nat rules `istio-init` writes (outbound TCP
//! redirected to `15001` except for the proxy's uid `1337` and loopback; inbound TCP to `15006`
//! except excluded ports), a stand-in for the mesh proxy running as uid `1337` on `15001`, and
//! then `wg-sidecar run` (the real binary, userspace WireGuard, keys from a folder) with Debian's
//! `wireguard-go` + `wg` as the gateway.
//!
//! ```text
//!  pod (hs-p)  veth 192.168.93.2 ───── gateway (hs-g) 192.168.93.1:51820 wireguard-go, tunnel 10.93.0.1
//!   wg0 10.93.0.2 (the sidecar)                      private service 10.93.0.10:8080 (answers with
//!   "mesh proxy" uid 1337 on :15001                  the address the request came from)
//!   nat: OUTPUT tcp → 15001, PREROUTING tcp → 15006
//! ```
//!
//! The stand-in proxy reads each redirected connection's original destination
//! (`SO_ORIGINAL_DST`, as Envoy and linkerd2-proxy do) and connects to it itself, as uid 1337,
//! which the redirect lets through: so the connection to the private network is the proxy's, not
//! the app's. A destination in `240.240.0.0/16` (a virtual address, as Istio's DNS proxy
//! allocates for a `ServiceEntry`) is mapped to the private service, so the proxy — not the
//! app — is the one that reaches a tunnelled address. A request that went through the tunnel is
//! answered with `10.93.0.2`; one that left in the clear with `192.168.93.2`, and it is counted
//! by an nftables counter on the Pod's veth.
//!
//! A second test writes the capture before the sidecar starts (the mesh's CNI plugin) and
//! shows the sidecar kept from Vault (a real OpenBao behind the veth) until Vault's port is
//! excluded from the capture.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

mod lab;

use std::{
    fs,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use lab::{
    find_binary, keypair, require_root, scratch, spawn_sidecar, veth, wait_for, write_secret_file,
    ChildGuard, Netns, OpenBao, WgGoPeer,
};
use serde_json::json;

const ROUTE: &str = "10.93.0.0/24";
const POD_VETH: &str = "192.168.93.2";
const GATEWAY_VETH: &str = "192.168.93.1";
const POD_TUN: &str = "10.93.0.2";
const SERVICE: &str = "10.93.0.10";
/// A virtual address the mesh proxy maps to [`SERVICE`] (outside the tunnelled routes).
const VIP: &str = "240.240.0.1";
/// Istio's proxy uid (linkerd's is 2102): the redirect lets its own connections through.
const PROXY_UID: &str = "1337";
const HEALTH_PORT: &str = "9901";

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn log_of(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// `iptables ARGS…` inside `ns`.
fn iptables(ns: &Netns, args: &[&str]) {
    ns.run("iptables", args).unwrap();
}

/// The nat rules of `istio-init` (`istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*'
/// -b '*' -d 15090,15021,15020,9901`), trimmed to what a Pod without IPv6 and without
/// `excludeOutboundIPRanges` gets: outbound TCP of every uid but the proxy's to `15001`,
/// loopback and the proxy's own connections left alone, inbound TCP to `15006` but for the
/// excluded ports — here the sidecar's health port, as docs/service-mesh.md advises
/// (`traffic.sidecar.istio.io/excludeInboundPorts: "9901"`).
fn istio_init(ns: &Netns) {
    for chain in [
        "ISTIO_INBOUND",
        "ISTIO_IN_REDIRECT",
        "ISTIO_OUTPUT",
        "ISTIO_REDIRECT",
    ] {
        iptables(ns, &["-t", "nat", "-N", chain]);
    }
    let rules: &[&[&str]] = &[
        &[
            "-A",
            "ISTIO_REDIRECT",
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ],
        &[
            "-A",
            "ISTIO_IN_REDIRECT",
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15006",
        ],
        &["-A", "PREROUTING", "-p", "tcp", "-j", "ISTIO_INBOUND"],
        &[
            "-A",
            "ISTIO_INBOUND",
            "-p",
            "tcp",
            "--dport",
            "15008",
            "-j",
            "RETURN",
        ],
        &[
            "-A",
            "ISTIO_INBOUND",
            "-p",
            "tcp",
            "--dport",
            "15090",
            "-j",
            "RETURN",
        ],
        &[
            "-A",
            "ISTIO_INBOUND",
            "-p",
            "tcp",
            "--dport",
            "15021",
            "-j",
            "RETURN",
        ],
        &[
            "-A",
            "ISTIO_INBOUND",
            "-p",
            "tcp",
            "--dport",
            "15020",
            "-j",
            "RETURN",
        ],
        &[
            "-A",
            "ISTIO_INBOUND",
            "-p",
            "tcp",
            "--dport",
            HEALTH_PORT,
            "-j",
            "RETURN",
        ],
        &[
            "-A",
            "ISTIO_INBOUND",
            "-p",
            "tcp",
            "-j",
            "ISTIO_IN_REDIRECT",
        ],
        &["-A", "OUTPUT", "-p", "tcp", "-j", "ISTIO_OUTPUT"],
        &[
            "-A",
            "ISTIO_OUTPUT",
            "-o",
            "lo",
            "-s",
            "127.0.0.6/32",
            "-j",
            "RETURN",
        ],
        &[
            "-A",
            "ISTIO_OUTPUT",
            "-o",
            "lo",
            "!",
            "-d",
            "127.0.0.1/32",
            "-m",
            "owner",
            "--uid-owner",
            PROXY_UID,
            "-j",
            "ISTIO_IN_REDIRECT",
        ],
        &[
            "-A",
            "ISTIO_OUTPUT",
            "-o",
            "lo",
            "-m",
            "owner",
            "!",
            "--uid-owner",
            PROXY_UID,
            "-j",
            "RETURN",
        ],
        &[
            "-A",
            "ISTIO_OUTPUT",
            "-m",
            "owner",
            "--uid-owner",
            PROXY_UID,
            "-j",
            "RETURN",
        ],
        &[
            "-A",
            "ISTIO_OUTPUT",
            "-m",
            "owner",
            "--gid-owner",
            PROXY_UID,
            "-j",
            "RETURN",
        ],
        &["-A", "ISTIO_OUTPUT", "-d", "127.0.0.1/32", "-j", "RETURN"],
        &["-A", "ISTIO_OUTPUT", "-j", "ISTIO_REDIRECT"],
    ];
    for rule in rules {
        let mut args = vec!["-t", "nat"];
        args.extend_from_slice(rule);
        iptables(ns, &args);
    }
}

/// The nat table's rules as `iptables -S` prints them (no counters).
fn nat_rules(ns: &Netns) -> String {
    ns.run("iptables", &["-t", "nat", "-S"]).unwrap()
}

/// Packets the redirect to the proxy (`ISTIO_REDIRECT`) has caught so far.
fn redirected(ns: &Netns) -> u64 {
    let out = ns
        .run(
            "iptables",
            &["-t", "nat", "-L", "ISTIO_REDIRECT", "-v", "-n", "-x"],
        )
        .unwrap();
    out.lines()
        .find(|l| l.contains("redir ports 15001"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// The stand-in for the mesh proxy, as uid [`PROXY_UID`] on `0.0.0.0:15001`: for each
/// redirected connection it reads the original destination, connects to it (to [`SERVICE`] for
/// [`VIP`]) and relays both ways; it prints `orig -> target ok|errno N` per connection.
fn mesh_proxy(pod: &Netns, log: &Path) -> ChildGuard {
    let code = format!(
        "import socket,struct,sys,threading\n\
         ls=socket.socket()\nls.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         ls.bind(('0.0.0.0',15001))\nls.listen(64)\nprint('listening',flush=True)\n\
         def pipe(a,b):\n\
         \x20 try:\n\
         \x20   while True:\n\
         \x20     d=a.recv(65536)\n\
         \x20     if not d: break\n\
         \x20     b.sendall(d)\n\
         \x20 except OSError: pass\n\
         \x20 try: b.shutdown(socket.SHUT_WR)\n\
         \x20 except OSError: pass\n\
         def handle(c):\n\
         \x20 raw=c.getsockopt(socket.SOL_IP,80,16)\n\
         \x20 port=struct.unpack('!H',raw[2:4])[0]\n\
         \x20 ip=socket.inet_ntoa(raw[4:8])\n\
         \x20 target='{SERVICE}' if ip=='{VIP}' else ip\n\
         \x20 try:\n\
         \x20   u=socket.create_connection((target,port),timeout=5)\n\
         \x20   res='ok'\n\
         \x20 except OSError as e:\n\
         \x20   u=None\n\
         \x20   res='errno %d'%e.errno\n\
         \x20 print('%s:%d -> %s:%d %s'%(ip,port,target,port,res),flush=True)\n\
         \x20 if u is None:\n\
         \x20   c.close()\n\
         \x20   return\n\
         \x20 threading.Thread(target=pipe,args=(u,c),daemon=True).start()\n\
         \x20 pipe(c,u)\n\
         while True:\n\
         \x20 c,_=ls.accept()\n\
         \x20 threading.Thread(target=handle,args=(c,),daemon=True).start()\n"
    );
    let child = pod
        .command(find_binary("setpriv").unwrap())
        .args([
            &format!("--reuid={PROXY_UID}"),
            &format!("--regid={PROXY_UID}"),
            "--clear-groups",
            "--",
        ])
        .arg(find_binary("python3").unwrap())
        .args(["-c", &code])
        .env_clear()
        .stdout(fs::File::create(log).unwrap())
        .stderr(fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    let proxy = ChildGuard {
        child,
        what: "mesh proxy".into(),
    };
    assert!(
        wait_for(Duration::from_secs(5), || log_of(log).contains("listening")),
        "the mesh proxy did not start: {}",
        log_of(&log.with_extension("err"))
    );
    proxy
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

/// `connect()` as the app (uid 0) from the Pod to `dst:8080`: `Ok(())` or the errno, and how
/// long it took.
fn connect(pod: &Netns, dst: &str) -> (Result<(), i32>, Duration) {
    let code = format!(
        "import socket\ntry:\n  socket.create_connection(('{dst}',8080),timeout=10)\n  print('connected')\nexcept OSError as e:\n  print(e.errno)\n"
    );
    let start = Instant::now();
    let out = pod.run("python3", &["-c", &code]).unwrap();
    let took = start.elapsed();
    match out.trim() {
        "connected" => (Ok(()), took),
        errno => (Err(errno.parse().unwrap_or(-1)), took),
    }
}

/// nftables counters on the Pod's veth: `clear` counts packets for the tunnelled route that
/// leave by it (a leak), `wireguard` the UDP to the gateway endpoint.
fn veth_counters(pod: &Netns, veth: &str) {
    pod.run("nft", &["add", "table", "inet", "mesh"]).unwrap();
    for name in ["clear", "wireguard"] {
        pod.run("nft", &["add", "counter", "inet", "mesh", name])
            .unwrap();
    }
    pod.run(
        "nft",
        &[
            "add",
            "chain",
            "inet",
            "mesh",
            "out",
            "{ type filter hook postrouting priority 0; }",
        ],
    )
    .unwrap();
    pod.run(
        "nft",
        &[
            "add", "rule", "inet", "mesh", "out", "oifname", veth, "ip", "daddr", ROUTE, "counter",
            "name", "clear",
        ],
    )
    .unwrap();
    pod.run(
        "nft",
        &[
            "add",
            "rule",
            "inet",
            "mesh",
            "out",
            "oifname",
            veth,
            "ip",
            "daddr",
            GATEWAY_VETH,
            "udp",
            "dport",
            "51820",
            "counter",
            "name",
            "wireguard",
        ],
    )
    .unwrap();
}

/// Packets counted so far by the named counter of [`veth_counters`].
fn counted(pod: &Netns, name: &str) -> u64 {
    let out = pod
        .run("nft", &["list", "counter", "inet", "mesh", name])
        .unwrap();
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {out}"))
}

/// A file removed on drop (the UAPI socket a killed sidecar leaves behind).
struct RemoveOnDrop(String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn url(dst: &str) -> String {
    format!("http://{dst}:8080/")
}

#[test]
fn with_istio_init_rules_after_wg_init_the_mesh_proxy_reaches_the_private_network_through_the_tunnel_and_the_kill_switch_holds(
) {
    require_root();
    let pod = Netns::new("hs-p").unwrap();
    let gw = Netns::new("hs-g").unwrap();
    let (pod_veth, _) = veth(&pod, "192.168.93.2/24", &gw, "192.168.93.1/24").unwrap();
    pod.ip(&["route", "add", "default", "via", GATEWAY_VETH])
        .unwrap();
    gw.ip(&["addr", "add", &format!("{SERVICE}/32"), "dev", "lo"])
        .unwrap();
    let dir = scratch();
    let (pod_private, pod_public) = keypair();
    let gw_key = keypair();
    let keys = dir.path().join("keys");
    fs::create_dir_all(&keys).unwrap();
    write_secret_file(&keys.join("private_key"), &pod_private);
    write_secret_file(&keys.join("address"), &format!("{POD_TUN}/32"));
    write_secret_file(&keys.join("peer_public_key"), &gw_key.1);
    write_secret_file(
        &keys.join("peer_endpoints"),
        &format!("{GATEWAY_VETH}:51820"),
    );
    let gwpeer = WgGoPeer::start_with_key(&gw, "10.93.0.1/24", 51820, &gw_key).unwrap();
    gwpeer
        .set_peer(&pod_public, &format!("{POD_TUN}/32"), None)
        .unwrap();
    let _server = whoami_server(&gw);
    veth_counters(&pod, &pod_veth);
    // Before anything: the private service answers a request in the clear (the setting in which
    // a leak would be seen), and the counter counts it.
    assert!(
        wait_for(Duration::from_secs(5), || pod
            .http_get(&url(SERVICE))
            .is_ok_and(|(code, body)| code == 200 && body == POD_VETH)),
        "the lab's private service does not answer in the clear: {:?}",
        pod.http_get(&url(SERVICE))
    );
    assert!(counted(&pod, "clear") > 0, "the leak counter is blind");
    pod.run("nft", &["reset", "counter", "inet", "mesh", "clear"])
        .unwrap();

    // 1. wg-init, first of the init containers.
    let out = pod
        .command(lab::sidecar_bin())
        .args(["init", "--routes", ROUTE, "--log-format", "text"])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wg-sidecar init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = pod.ip(&["rule", "show"]).unwrap();
    let table = pod.ip(&["route", "show", "table", "51820"]).unwrap();
    assert!(
        rules.contains("10001:\tnot from all fwmark 0xca6d lookup 51820")
            && table.contains(&format!("unreachable {ROUTE}")),
        "{rules}\n{table}"
    );

    // 2. istio-init, after it: its nat rules leave wg-init's rules and routes as they were.
    istio_init(&pod);
    assert_eq!(pod.ip(&["rule", "show"]).unwrap(), rules);
    assert_eq!(pod.ip(&["route", "show", "table", "51820"]).unwrap(), table);
    let nat = nat_rules(&pod);

    // 3. The mesh proxy (a native sidecar, or the first container) and wg-sidecar.
    let proxy_log = dir.path().join("proxy.log");
    let _proxy = mesh_proxy(&pod, &proxy_log);
    let ifname = lab::unique("hs-w");
    let log = dir.path().join("sidecar.log");
    let run = strings(&[
        "run",
        "--interface",
        &ifname,
        "--gateway",
        "corp",
        "--routes",
        ROUTE,
        "--key-source",
        "file",
        "--key-dir",
        keys.to_str().unwrap(),
        "--health-addr",
        &format!("0.0.0.0:{HEALTH_PORT}"),
        "--log-format",
        "text",
    ]);
    let _socket = RemoveOnDrop(format!("/var/run/wireguard/{ifname}.sock"));
    let mut sidecar = spawn_sidecar(&pod, &run, &log).unwrap();
    // The WireGuard UDP is not TCP: the mesh's redirect does not catch it, the handshake
    // happens and the sidecar turns ready.
    assert!(
        wait_for(Duration::from_secs(20), || pod
            .http_get(&format!("http://127.0.0.1:{HEALTH_PORT}/ready"))
            .is_ok_and(|(code, _)| code == 200)),
        "never ready: {}",
        log_of(&log)
    );
    // wg-sidecar run re-installs the rules at start; it leaves the mesh's nat rules alone.
    assert_eq!(nat_rules(&pod), nat, "the sidecar changed the nat table");
    // A probe from outside the Pod (the kubelet's) reaches the health port: it is excluded from
    // the inbound capture.
    let (code, _) = gw
        .http_get(&format!("http://{POD_VETH}:{HEALTH_PORT}/ready"))
        .unwrap();
    assert_eq!(code, 200, "the probe must reach /ready past the capture");

    // (a) The app's requests go to the mesh proxy, and the proxy's connections to the private
    // service go through the tunnel: the service sees the Pod's tunnel address.
    let before = redirected(&pod);
    let wireguard_before = counted(&pod, "wireguard");
    for dst in [SERVICE, VIP, SERVICE, VIP] {
        let (code, body) = pod.http_get(&url(dst)).unwrap();
        assert_eq!(
            (code, body.as_str()),
            (200, POD_TUN),
            "{dst}: not through the mesh proxy and the tunnel; proxy: {}",
            log_of(&proxy_log)
        );
    }
    let caught = redirected(&pod) - before;
    let proxied = log_of(&proxy_log);
    assert!(caught >= 4, "the redirect caught {caught} packets");
    assert_eq!(
        proxied
            .matches(&format!("{SERVICE}:8080 -> {SERVICE}:8080 ok"))
            .count(),
        2,
        "{proxied}"
    );
    assert_eq!(
        proxied
            .matches(&format!("{VIP}:8080 -> {SERVICE}:8080 ok"))
            .count(),
        2,
        "{proxied}"
    );
    let wireguard = counted(&pod, "wireguard") - wireguard_before;
    assert!(
        wireguard >= 8,
        "the proxied requests must have crossed the veth as WireGuard: {wireguard} packets"
    );
    assert_eq!(
        counted(&pod, "clear"),
        0,
        "tunnelled traffic left the veth in the clear"
    );
    eprintln!("tunnelled through the mesh proxy: 4 requests, {caught} packets redirected to 15001, {wireguard} WireGuard packets on the veth, 0 in the clear");

    // (b) The sidecar is SIGKILLed (no cleanup; the userspace device goes with the process).
    sidecar.child.kill().unwrap();
    sidecar.child.wait().unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || pod
            .ip(&["link", "show", &ifname])
            .is_err()),
        "the tunnel interface outlived the sidecar"
    );
    // The app's own connection to the tunnelled address fails at once: the route lookup at
    // connect() finds the kill switch before the nat hook could redirect the SYN.
    let (res, took) = connect(&pod, SERVICE);
    assert_eq!(res, Err(113), "want EHOSTUNREACH, took {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // To the virtual address the app's connection is redirected, and the proxy's own connection
    // to the private service hits the kill switch: the request fails.
    let before = redirected(&pod);
    for dst in [SERVICE, VIP] {
        let (code, body) = pod.http_get(&url(dst)).unwrap();
        assert_eq!(code, 0, "{dst} answered with the tunnel gone: {body}");
    }
    assert!(
        redirected(&pod) > before,
        "the VIP request was not redirected"
    );
    let proxied = log_of(&proxy_log);
    assert!(
        proxied.contains(&format!("{VIP}:8080 -> {SERVICE}:8080 errno 113")),
        "the proxy's connection must meet the kill switch: {proxied}"
    );
    assert_eq!(
        counted(&pod, "clear"),
        0,
        "with the sidecar killed, tunnelled traffic left the veth in the clear"
    );
    eprintln!("sidecar SIGKILLed: the app's connect EHOSTUNREACH in {took:.0?}, the proxy's errno 113, 0 packets in the clear");

    // Control: without the kill switch's rule the same requests leave the veth in the clear,
    // the proxy's included, and the counter sees them (so its zero above means something).
    pod.ip(&["rule", "del", "priority", "10001"]).unwrap();
    for dst in [SERVICE, VIP] {
        let (code, body) = pod.http_get(&url(dst)).unwrap();
        assert_eq!(
            (code, body.as_str()),
            (200, POD_VETH),
            "{dst} without the rule; proxy: {}",
            log_of(&proxy_log)
        );
    }
    let clear = counted(&pod, "clear");
    assert!(clear > 0, "the counter must see the control requests");
    eprintln!("control without wg-init's rule: {clear} packets in the clear");

    // The health port is excluded from the inbound capture for a reason: captured, the probe
    // goes to the mesh's inbound port (nothing listens on 15006 here) instead of the sidecar.
    iptables(
        &pod,
        &[
            "-t",
            "nat",
            "-D",
            "ISTIO_INBOUND",
            "-p",
            "tcp",
            "--dport",
            HEALTH_PORT,
            "-j",
            "RETURN",
        ],
    );
    let _restarted = spawn_sidecar(&pod, &run, &log.with_extension("2.log")).unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || pod
            .http_get(&format!("http://127.0.0.1:{HEALTH_PORT}/ready"))
            .is_ok_and(|(code, _)| code == 200)),
        "the restarted sidecar never ready: {}",
        log_of(&log.with_extension("2.log"))
    );
    let (code, _) = gw
        .http_get(&format!("http://{POD_VETH}:{HEALTH_PORT}/ready"))
        .unwrap();
    assert_eq!(code, 0, "a captured probe must not reach the sidecar");
}

/// With the mesh's capture in place before `wg-sidecar` starts (what `istio-cni` or
/// `linkerd-cni` does: the rules are written when the Pod's network is set up, before any
/// container), the sidecar's TCP to Vault is redirected to a mesh proxy that is not running yet
/// (in native mode it starts after `wg-sidecar` is ready): the sidecar never becomes ready until
/// Vault's port is excluded from the capture (`traffic.sidecar.istio.io/excludeOutboundPorts`).
#[test]
fn with_the_mesh_capture_in_place_first_the_sidecar_reaches_vault_only_once_its_port_is_excluded() {
    require_root();
    let pod = Netns::new("hs-p").unwrap();
    let gw = Netns::new("hs-g").unwrap();
    veth(&pod, "192.168.93.2/24", &gw, "192.168.93.1/24").unwrap();
    pod.ip(&["route", "add", "default", "via", GATEWAY_VETH])
        .unwrap();
    let (pod_private, pod_public) = keypair();
    let gw_key = keypair();
    let gwpeer = WgGoPeer::start_with_key(&gw, "10.93.0.1/24", 51820, &gw_key).unwrap();
    gwpeer
        .set_peer(&pod_public, &format!("{POD_TUN}/32"), None)
        .unwrap();
    let bao = OpenBao::start_on(&gw, &format!("{GATEWAY_VETH}:8200")).unwrap();
    bao.put(
        "wg/keys/shop/web",
        &json!({"private_key": pod_private, "address": format!("{POD_TUN}/32")}),
    )
    .unwrap();
    bao.put(
        "wg/gateways/corp",
        &json!({"public_key": gw_key.1, "endpoints": format!("{GATEWAY_VETH}:51820"), "allowed_ips": ROUTE}),
    )
    .unwrap();
    let dir = scratch();
    let token = dir.path().join("token");
    write_secret_file(&token, "devroot\n");

    // The CNI plugin's rules, then wg-init; no mesh proxy yet.
    istio_init(&pod);
    let out = pod
        .command(lab::sidecar_bin())
        .args(["init", "--routes", ROUTE, "--log-format", "text"])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wg-sidecar init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ifname = lab::unique("hs-w");
    let log = dir.path().join("sidecar.log");
    let run = strings(&[
        "run",
        "--interface",
        &ifname,
        "--gateway",
        "corp",
        "--routes",
        ROUTE,
        "--vault-addr",
        &bao.addr,
        "--vault-auth",
        "token",
        "--vault-token-file",
        token.to_str().unwrap(),
        "--vault-key-path",
        "wg/keys/shop/web",
        "--health-addr",
        &format!("127.0.0.1:{HEALTH_PORT}"),
        "--log-format",
        "text",
    ]);
    let _socket = RemoveOnDrop(format!("/var/run/wireguard/{ifname}.sock"));
    let _sidecar = spawn_sidecar(&pod, &run, &log).unwrap();
    let ready = || {
        pod.http_get(&format!("http://127.0.0.1:{HEALTH_PORT}/ready"))
            .unwrap()
    };
    assert!(
        wait_for(Duration::from_secs(5), || ready().0 == 503),
        "the health port never answered: {}",
        log_of(&log)
    );
    // Redirected to 15001, where nothing listens: not ready, for as long as we look.
    let redirected_before = redirected(&pod);
    assert!(
        !wait_for(Duration::from_secs(8), || ready().0 == 200),
        "ready although Vault was captured: {}",
        log_of(&log)
    );
    let (code, why) = ready();
    assert!(
        redirected(&pod) > redirected_before,
        "the sidecar's Vault connections were not redirected"
    );
    eprintln!("captured: /ready {code} {why:?}");

    // Vault's port excluded, as Istio writes `excludeOutboundPorts` (a RETURN before the
    // redirect): the sidecar reaches Vault on its next retry and the tunnel comes up.
    iptables(
        &pod,
        &[
            "-t",
            "nat",
            "-I",
            "ISTIO_OUTPUT",
            "1",
            "-p",
            "tcp",
            "--dport",
            "8200",
            "-j",
            "RETURN",
        ],
    );
    let excluded = Instant::now();
    assert!(
        wait_for(Duration::from_secs(45), || ready().0 == 200),
        "not ready with Vault excluded: {:?} {}",
        ready(),
        log_of(&log)
    );
    eprintln!(
        "Vault excluded from the capture: ready {:.1?} later",
        excluded.elapsed()
    );
}
