//! IPv4 forwarding turned on by `wg_sidecar::forwarding`, as root, in network namespaces each
//! test makes (`wgfw-<pid>-<n>`, deleted on drop), checked with real traffic:
//!
//! ```text
//!   left ── 10.98.N.0/25 ── router ── 10.98.N.128/25 ── right
//!  .2 (default via .1)     .1    .129     (default via .129) .130
//! ```
//! The router starts with `net.ipv4.ip_forward=0`, so a ping from left to right dies there. The
//! function under test runs on a dedicated thread that entered the router namespace
//! (`setns(CLONE_NEWNET)` on that thread only) on a current-thread tokio runtime; for the
//! Pod case the thread also gets its own mount namespace with `/proc/sys` read-only, as in a
//! Pod. No tool beyond `ip`, `sysctl` and `ping`.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

mod lab;

use std::{
    fs::File,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use lab::{find_binary, require_root, run};
use nix::{
    mount::{mount, MsFlags},
    sched::{setns, unshare, CloneFlags},
};
use wg_sidecar::{
    forwarding::{self, Ipv4Forwarding},
    SidecarError,
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn next() -> u32 {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

/// A network namespace `wgfw-<pid>-<n>`, deleted on drop (with its veths).
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        let name = format!("wgfw-{}-{}", std::process::id(), next());
        run(Command::new(find_binary("ip").unwrap()).args(["netns", "add", &name])).unwrap();
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        run(Command::new(find_binary("ip").unwrap())
            .args(["-n", &self.name])
            .args(args))
        .unwrap();
    }

    fn exec(&self, program: &str) -> Command {
        let mut c = Command::new(find_binary("ip").unwrap());
        c.args(["netns", "exec", &self.name])
            .arg(find_binary(program).unwrap());
        c
    }

    /// A sysctl of this namespace, read by `sysctl -n` inside it.
    fn sysctl(&self, key: &str) -> String {
        run(self.exec("sysctl").args(["-n", key]))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// Whether one ping to `addr` gets an answer within a second.
    fn pings(&self, addr: &str) -> bool {
        self.exec("ping")
            .args(["-c", "1", "-W", "1", addr])
            .output()
            .unwrap()
            .status
            .success()
    }

    /// Runs `f` on a new thread inside this namespace (that thread only), on a current-thread
    /// tokio runtime; with `read_only_proc_sys`, the thread also sees `/proc/sys` read-only.
    fn on_thread<T: Send + 'static>(
        &self,
        read_only_proc_sys: bool,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            setns(File::open(path).unwrap(), CloneFlags::CLONE_NEWNET).unwrap();
            if read_only_proc_sys {
                make_proc_sys_read_only_for_this_thread();
            }
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f)
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(Command::new(find_binary("ip").unwrap()).args(["netns", "delete", &self.name]));
    }
}

/// A private mount namespace for the calling thread in which `/proc/sys` is a read-only bind
/// mount, like a Pod's. Private first, so nothing propagates back to the host's mounts.
fn make_proc_sys_read_only_for_this_thread() {
    let none: Option<&str> = None;
    unshare(CloneFlags::CLONE_NEWNS).unwrap();
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).unwrap();
    mount(Some("/proc/sys"), "/proc/sys", none, MsFlags::MS_BIND, none).unwrap();
    mount(
        none,
        "/proc/sys",
        none,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        none,
    )
    .unwrap();
}

/// left ─ router ─ right with forwarding off in the router; the router's veths are `to-left`
/// and `to-right`.
struct Topology {
    left: Netns,
    router: Netns,
    _right: Netns,
    /// The right end's address.
    far: String,
}

impl Topology {
    fn new() -> Self {
        require_root();
        let n = next() % 250 + 1;
        let (left, router, right) = (Netns::new(), Netns::new(), Netns::new());
        for (peer, here, there, here_addr, there_addr) in [
            (&left, "to-left", "to-router", "1/25", "2/25"),
            (&right, "to-right", "to-router", "129/25", "130/25"),
        ] {
            router.ip(&[
                "link", "add", here, "type", "veth", "peer", "name", there, "netns", &peer.name,
            ]);
            router.ip(&[
                "addr",
                "add",
                &format!("10.98.{n}.{here_addr}"),
                "dev",
                here,
            ]);
            peer.ip(&[
                "addr",
                "add",
                &format!("10.98.{n}.{there_addr}"),
                "dev",
                there,
            ]);
            router.ip(&["link", "set", here, "up"]);
            peer.ip(&["link", "set", there, "up"]);
        }
        left.ip(&["route", "add", "default", "via", &format!("10.98.{n}.1")]);
        right.ip(&["route", "add", "default", "via", &format!("10.98.{n}.129")]);
        // A new namespace may inherit ip_forward=1 from the host; the write also resets every
        // interface's own setting.
        run(router
            .exec("sysctl")
            .args(["-q", "-w", "net.ipv4.ip_forward=0"]))
        .unwrap();
        for veth in ["to-left", "to-right"] {
            assert_eq!(
                router.sysctl(&format!("net.ipv4.conf.{veth}.forwarding")),
                "0"
            );
        }
        let far = format!("10.98.{n}.130");
        assert!(
            left.pings(&format!("10.98.{n}.1")),
            "left cannot reach the router"
        );
        assert!(
            !left.pings(&far),
            "ping crossed the router with forwarding off"
        );
        Self {
            left,
            router,
            _right: right,
            far,
        }
    }
}

#[test]
fn with_a_read_only_proc_sys_ipv4_forwarding_is_turned_on_per_interface_and_traffic_crosses() {
    let t = Topology::new();
    let (ipv4, ipv6) = t.router.on_thread(true, async {
        let write = std::fs::write(forwarding::IPV4_SYSCTL, "1");
        assert_eq!(
            write.unwrap_err().raw_os_error(),
            Some(30),
            "precondition: EROFS on the thread's /proc/sys"
        );
        (forwarding::enable_ipv4().await, forwarding::enable_ipv6())
    });
    match ipv4 {
        Ok(Ipv4Forwarding::PerInterface {
            mut interfaces,
            sysctl_error,
        }) => {
            interfaces.sort();
            assert_eq!(
                interfaces,
                ["to-left", "to-right"],
                "every interface but lo"
            );
            assert_eq!(sysctl_error.raw_os_error(), Some(30));
        }
        other => panic!("expected the per-interface way, got {other:?}"),
    }
    assert!(
        t.left.pings(&t.far),
        "ping does not cross the router after per-interface forwarding"
    );
    assert_eq!(
        t.router.sysctl("net.ipv4.ip_forward"),
        "0",
        "the sysctl was not used"
    );
    for veth in ["to-left", "to-right"] {
        assert_eq!(
            t.router.sysctl(&format!("net.ipv4.conf.{veth}.forwarding")),
            "1",
            "{veth}"
        );
    }
    assert_eq!(t.router.sysctl("net.ipv4.conf.lo.forwarding"), "0");
    // IPv6 has no netlink setter: it still needs the sysctl, and says which file it could not write.
    match ipv6 {
        Err(e @ SidecarError::ForwardingSysctl { path, .. }) => {
            assert_eq!(path, forwarding::IPV6_SYSCTL);
            assert!(e.to_string().contains("os error 30"), "{e}");
        }
        other => panic!("expected the IPv6 sysctl error, got {other:?}"),
    }
}

#[test]
fn with_a_writable_proc_sys_the_sysctl_is_used_and_a_second_call_finds_it_on() {
    let t = Topology::new();
    let first = t.router.on_thread(false, forwarding::enable_ipv4());
    assert!(matches!(first, Ok(Ipv4Forwarding::Sysctl)), "{first:?}");
    assert_eq!(t.router.sysctl("net.ipv4.ip_forward"), "1");
    assert!(t.left.pings(&t.far));
    let second = t.router.on_thread(false, forwarding::enable_ipv4());
    assert!(
        matches!(second, Ok(Ipv4Forwarding::AlreadyOn)),
        "{second:?}"
    );
}
