//! IPv6 in network namespaces each test makes (`v6h-<pid>x<n>`, deleted on drop), as root:
//!
//! - the sidecar's health port on its default address (`[::]:9901`, `wg_sidecar::health::listen`)
//!   answers on 127.0.0.1, `::1`, an IPv6 and an IPv4 address of the namespace, with
//!   `net.ipv6.bindv6only=1` in it (the socket turns `IPV6_V6ONLY` off itself), and
//!   `/quitquitquit` still tells the Pod's own v4-mapped loopback from a neighbour;
//! - in an IPv6-only namespace (only IPv6 on its veth) a neighbour reaches the gateway's health
//!   router on the same listener over IPv6;
//! - IPv6 forwarding: with `net.ipv6.conf.all.forwarding=0` in a router namespace, neither the
//!   kernel's netlink (`IFLA_INET6_CONF` is refused) nor the interfaces' own `forwarding`
//!   makes a packet cross; `wg_sidecar::forwarding::enable_ipv6` does, and a ping crosses.
//!
//! ```text
//!   left ── fd98:N:1::/64 ── router ── fd98:N:2::/64 ── right
//!  ::2 (default via ::1)     ::1    ::1      (default via ::1) ::2
//! ```
//! IPv6 addresses are added `nodad`, so they are usable at once. No tool beyond `ip`, `sysctl`,
//! `ping` and `curl`.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

mod lab;

use std::{fs::File, net::SocketAddr, sync::mpsc, thread::JoinHandle};

use lab::{find_binary, require_root, subnet_id, unique, Netns};
use nix::sched::{setns, CloneFlags};
use wg_sidecar::{
    forwarding,
    gateway::{self, GatewayHealth},
    health::{self, HealthState, ShutdownRequest, DEFAULT_ADDR},
    metrics::Metrics,
};

/// Connects `a` and `b` with a veth pair, puts `a_addrs` on `a`'s end and `b_addrs` on `b`'s
/// (IPv6 ones `nodad`) and brings both up; returns the two interface names.
fn link(a: &Netns, a_addrs: &[String], b: &Netns, b_addrs: &[String]) -> (String, String) {
    let (ia, ib) = (unique("v6a"), unique("v6b"));
    lab::ip(&[
        "link", "add", &ia, "netns", &a.name, "type", "veth", "peer", "name", &ib, "netns", &b.name,
    ])
    .unwrap();
    for (ns, dev, addrs) in [(a, &ia, a_addrs), (b, &ib, b_addrs)] {
        for addr in addrs {
            let mut args = vec!["addr", "add", addr.as_str(), "dev", dev.as_str()];
            if addr.contains(':') {
                args.push("nodad");
            }
            ns.ip(&args).unwrap();
        }
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
    (ia, ib)
}

/// A sysctl of `ns`, read by `sysctl -n` inside it.
fn sysctl(ns: &Netns, key: &str) -> String {
    ns.run("sysctl", &["-n", key]).unwrap().trim().to_owned()
}

/// Writes a sysctl of `ns` with `sysctl -w` inside it.
fn set_sysctl(ns: &Netns, key_value: &str) {
    ns.run("sysctl", &["-q", "-w", key_value]).unwrap();
}

/// Whether one ping from `ns` to `addr` gets an answer within a second.
fn pings(ns: &Netns, addr: &str) -> bool {
    ns.command(find_binary("ping").unwrap())
        .args(["-c", "1", "-W", "1", addr])
        .output()
        .unwrap()
        .status
        .success()
}

/// `POST url` from inside `ns`: the status code (0 when there was no answer).
fn post(ns: &Netns, url: &str) -> u16 {
    let out = ns
        .command(find_binary("curl").unwrap())
        .args([
            "-s",
            "-m",
            "2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            url,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Runs `f` to completion on a new thread inside `ns` (that thread only, `setns`), on a
/// current-thread tokio runtime.
fn on_thread<T: Send + 'static>(
    ns: &Netns,
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        setns(File::open(path).unwrap(), CloneFlags::CLONE_NEWNET).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .join()
    .unwrap()
}

/// A server started by a closure on a thread inside a namespace, serving until dropped.
struct Served {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// Where it listens.
    addr: SocketAddr,
}

impl Served {
    /// Calls `start` (which binds and spawns its server task) on a runtime inside `ns`.
    fn start(ns: &Netns, start: impl FnOnce() -> SocketAddr + Send + 'static) -> Self {
        let path = format!("/run/netns/{}", ns.name);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound_tx, bound) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            setns(File::open(path).unwrap(), CloneFlags::CLONE_NEWNET).unwrap();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    bound_tx.send(start()).unwrap();
                    let _ = stopped.await;
                });
        });
        Self {
            stop: Some(stop),
            thread: Some(thread),
            addr: bound.recv().unwrap(),
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn the_sidecar_health_port_answers_on_both_loopbacks_and_both_families_even_with_bindv6only_1() {
    require_root();
    let n = subnet_id();
    let (pod, neighbour) = (Netns::new("v6h-").unwrap(), Netns::new("v6h-").unwrap());
    link(
        &pod,
        &[format!("192.168.{n}.1/24"), format!("fd98:{n:x}::1/64")],
        &neighbour,
        &[format!("192.168.{n}.2/24"), format!("fd98:{n:x}::2/64")],
    );
    // A socket that inherited this would be IPv6-only: the listener must not depend on it.
    set_sysctl(&pod, "net.ipv6.bindv6only=1");
    let served = Served::start(&pod, || {
        let state = HealthState::new(Metrics::new(), ShutdownRequest::new());
        health::serve(DEFAULT_ADDR.parse().unwrap(), state).unwrap()
    });
    assert_eq!(served.addr, "[::]:9901".parse().unwrap());
    for (from, url) in [
        (&pod, "http://127.0.0.1:9901/healthz".to_owned()),
        (&pod, "http://[::1]:9901/healthz".to_owned()),
        (&neighbour, format!("http://[fd98:{n:x}::1]:9901/healthz")),
        (&neighbour, format!("http://192.168.{n}.1:9901/healthz")),
    ] {
        assert_eq!(from.http_get(&url).unwrap(), (200, "ok\n".into()), "{url}");
    }
    // The Pod's own containers come in as ::ffff:127.0.0.1 on the dual-stack socket and may
    // stop the sidecar; a neighbour, over either family, may not.
    assert_eq!(
        post(
            &neighbour,
            &format!("http://192.168.{n}.1:9901/quitquitquit")
        ),
        403
    );
    assert_eq!(
        post(
            &neighbour,
            &format!("http://[fd98:{n:x}::1]:9901/quitquitquit")
        ),
        403
    );
    assert_eq!(post(&pod, "http://127.0.0.1:9901/quitquitquit"), 200);
}

#[test]
fn in_an_ipv6_only_namespace_a_neighbour_reaches_the_gateway_health_port_over_ipv6() {
    require_root();
    let n = subnet_id();
    let (gw, neighbour) = (Netns::new("v6h-").unwrap(), Netns::new("v6h-").unwrap());
    let (veth, _) = link(
        &gw,
        &[format!("fd98:{n:x}:6::1/64")],
        &neighbour,
        &[format!("fd98:{n:x}:6::2/64")],
    );
    assert_eq!(
        gw.ip(&["-4", "-o", "addr", "show", "dev", &veth]).unwrap(),
        "",
        "precondition: no IPv4 on the gateway's veth"
    );
    // The gateway's router on the listener its `bind` uses.
    let served = Served::start(&gw, || {
        let listener = health::listen(DEFAULT_ADDR.parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, gateway::router(GatewayHealth::new()))
                .await
                .unwrap();
        });
        addr
    });
    assert!(served.addr.is_ipv6(), "{}", served.addr);
    let base = format!("http://[fd98:{n:x}:6::1]:9901");
    assert_eq!(
        neighbour.http_get(&format!("{base}/healthz")).unwrap().0,
        200
    );
    let (code, body) = neighbour.http_get(&format!("{base}/ready")).unwrap();
    assert_eq!((code, body.trim()), (503, "not ready: interface not up"));
}

/// left ─ router ─ right over IPv6 only, with `net.ipv6.conf.all.forwarding=0` in the router;
/// returns (left, router, right, the router's two veths, right's address).
fn ipv6_topology() -> (Netns, Netns, Netns, [String; 2], String) {
    require_root();
    let n = subnet_id();
    let (left, router, right) = (
        Netns::new("v6h-").unwrap(),
        Netns::new("v6h-").unwrap(),
        Netns::new("v6h-").unwrap(),
    );
    let (to_left, _) = link(
        &router,
        &[format!("fd98:{n:x}:1::1/64")],
        &left,
        &[format!("fd98:{n:x}:1::2/64")],
    );
    let (to_right, _) = link(
        &router,
        &[format!("fd98:{n:x}:2::1/64")],
        &right,
        &[format!("fd98:{n:x}:2::2/64")],
    );
    left.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &format!("fd98:{n:x}:1::1"),
    ])
    .unwrap();
    right
        .ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd98:{n:x}:2::1"),
        ])
        .unwrap();
    set_sysctl(&router, "net.ipv6.conf.all.forwarding=0");
    let far = format!("fd98:{n:x}:2::2");
    assert!(
        pings(&left, &format!("fd98:{n:x}:1::1")),
        "left cannot reach the router"
    );
    assert!(
        !pings(&left, &far),
        "ping crossed the router with forwarding off"
    );
    (left, router, right, [to_left, to_right], far)
}

/// The interface index of `dev` in `ns` (`ip -o link show` starts with it).
fn ifindex(ns: &Netns, dev: &str) -> u32 {
    let out = ns.ip(&["-o", "link", "show", "dev", dev]).unwrap();
    out.split(':').next().unwrap().trim().parse().unwrap()
}

#[test]
fn ipv6_forwarding_has_no_netlink_or_per_interface_way_and_enable_ipv6_makes_a_ping_cross() {
    use rtnetlink::packet_route::link::{
        AfSpecInet6, AfSpecUnspec, Inet6DevConf, LinkAttribute, LinkMessage,
    };
    let (left, router, _right, veths, far) = ipv6_topology();

    // 1. Netlink: IFLA_AF_SPEC { AF_INET6 { IFLA_INET6_CONF { forwarding: 1 } } } is refused
    //    (`inet6_af_policy` takes only the token and the address generation mode).
    let index = ifindex(&router, &veths[0]);
    let refused = on_thread(&router, async move {
        let (conn, handle, _) = rtnetlink::new_connection().unwrap();
        tokio::spawn(conn);
        let mut devconf = Inet6DevConf::default();
        devconf.forwarding = 1;
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::DevConf(devconf)],
            )]));
        handle.link().set(msg).execute().await
    });
    match refused {
        Err(rtnetlink::Error::NetlinkError(m)) => {
            assert_eq!(m.to_io().raw_os_error(), Some(22), "EINVAL: {m:?}");
        }
        other => panic!("the kernel took IFLA_INET6_CONF over netlink: {other:?}"),
    }
    assert_eq!(
        sysctl(&router, &format!("net.ipv6.conf.{}.forwarding", veths[0])),
        "0"
    );

    // 2. The interfaces' own `forwarding` (what writing `all` copies) does not forward IPv6.
    for veth in &veths {
        set_sysctl(&router, &format!("net.ipv6.conf.{veth}.forwarding=1"));
    }
    assert!(
        !pings(&left, &far),
        "per-interface forwarding forwarded IPv6"
    );

    // 3. The gateway's way: the `all` sysctl, written from inside the namespace.
    let first = on_thread(&router, async { forwarding::enable_ipv6() });
    assert!(matches!(first, Ok(false)), "{first:?}");
    assert_eq!(sysctl(&router, "net.ipv6.conf.all.forwarding"), "1");
    assert!(pings(&left, &far), "ping does not cross after enable_ipv6");
    let second = on_thread(&router, async { forwarding::enable_ipv6() });
    assert!(matches!(second, Ok(true)), "already on: {second:?}");
}
