//! IP forwarding in the gateway's network namespace, with or without a writable `/proc/sys`.
//!
//! Owns: turning IPv4 forwarding on — by the `net.ipv4.ip_forward` sysctl when `/proc/sys` takes
//! the write, else per interface over rtnetlink on every interface of the namespace but loopback
//! (`RTM_SETLINK` carrying `IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF { IPV4_DEVCONF_FORWARDING:
//! 1 } } }`, which needs `CAP_NET_ADMIN` and no `/proc`) — and turning IPv6 forwarding on, which
//! only the sysctl can do.
//! Must never: change any other per-interface setting, or a namespace other than its own.
//!
//! Why per interface is enough: Linux forwards an IPv4 packet when the interface it came in on
//! has `forwarding` on (`ip_route_input_slow` checks `IN_DEV_FORWARD` of the input device);
//! writing `ip_forward` only copies the value to every interface. Requests come in by the tunnel
//! and replies by the Pod's own interface, so both need it. In a Pod `/proc/sys` is read-only and
//! `net.ipv4.ip_forward` in the Pod's sysctls needs `--allowed-unsafe-sysctls` on the kubelet;
//! this way needs neither. One limit: an interface created later does not get it (the `default`
//! setting has no netlink setter), so call this once the WireGuard interface exists.
//!
//! IPv6 has neither way, only the `all` sysctl. Linux forwards IPv6 only when
//! `net.ipv6.conf.all.forwarding` is 1 (`ip6_forward` checks `devconf_all`); an interface's own
//! `forwarding` only switches it between host and router behaviour (Router Advertisements,
//! Neighbour Discovery flags), and the per-interface `force_forwarding` of Linux 6.17+ is a
//! sysctl file too. Over netlink, `IFLA_AF_SPEC { AF_INET6 { … } }` takes only
//! `IFLA_INET6_TOKEN` and `IFLA_INET6_ADDR_GEN_MODE` (`inet6_af_policy`, `inet6_set_link_af`):
//! `IFLA_INET6_CONF` is in dumps only, and a request carrying it alone is refused with EINVAL.
//! So with a read-only `/proc/sys` (a Pod) IPv6 forwarding needs
//! `net.ipv6.conf.all.forwarding=1` in the Pod's `securityContext.sysctls` (the kubelet must
//! allow it: `--allowed-unsafe-sysctls`) or a CNI that sets it; the gateway only asks for it
//! when it forwards IPv6 at all ([`ipv6_needed`]).
//!
//! Tested against the kernel in `tests/forwarding.rs` (a router namespace with a read-only
//! `/proc/sys`, real traffic across it) and, for IPv6, `tests/ipv6.rs` (the sysctl forwards,
//! the per-interface settings do not, the netlink request is refused).

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::{
    packet_route::link::{
        AfSpecInet, AfSpecUnspec, InetDevConf, LinkAttribute, LinkFlags, LinkMessage,
    },
    Handle,
};

use crate::error::{Result, SidecarError};

/// The IPv4 forwarding sysctl of this network namespace.
pub const IPV4_SYSCTL: &str = "/proc/sys/net/ipv4/ip_forward";
/// The IPv6 forwarding sysctl of this network namespace.
pub const IPV6_SYSCTL: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// `EAFNOSUPPORT`: the interface has no IPv4 configuration (`inet_validate_link_af`).
const EAFNOSUPPORT: i32 = 97;

/// How IPv4 forwarding came to be on.
#[derive(Debug)]
pub enum Ipv4Forwarding {
    /// `net.ipv4.ip_forward` was already 1 (from the Pod spec, or a node that shares its
    /// namespace).
    AlreadyOn,
    /// This process wrote 1 to [`IPV4_SYSCTL`].
    Sysctl,
    /// [`IPV4_SYSCTL`] refused the write, so forwarding was turned on for each of `interfaces`
    /// over rtnetlink (`ip_forward` itself still reads 0).
    PerInterface {
        /// The interfaces now forwarding (every one with IPv4 but loopback).
        interfaces: Vec<String>,
        /// Why the sysctl could not be written (EROFS for a Pod's read-only `/proc/sys`).
        sysctl_error: std::io::Error,
    },
}

impl Ipv4Forwarding {
    /// The way that was used, for logs: `sysctl` or `per-interface netlink`.
    #[must_use]
    pub fn way(&self) -> &'static str {
        match self {
            Self::AlreadyOn | Self::Sysctl => "sysctl",
            Self::PerInterface { .. } => "per-interface netlink",
        }
    }
}

/// The `RTM_SETLINK` request turning IPv4 forwarding on for interface `index`: no flags and an
/// empty change mask (the link's up/down state is left alone), one attribute
/// `IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF { IPV4_DEVCONF_FORWARDING: 1u32 } } }`.
#[must_use]
pub fn forwarding_request(index: u32) -> LinkMessage {
    // `InetDevConf` is non-exhaustive: built from its default, and only non-zero fields are sent.
    let mut conf = InetDevConf::default();
    conf.forwarding = 1;
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.attributes
        .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![
            AfSpecInet::DevConfRequest(conf),
        ])]));
    link
}

/// An rtnetlink failure as an `io::Error`, keeping the kernel's errno when it answered one.
fn io_error(e: rtnetlink::Error) -> std::io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => std::io::Error::other(other),
    }
}

/// Writes 1 to a forwarding sysctl unless it already reads 1; `Ok(true)` when it already did.
fn sysctl_on(path: &'static str) -> Result<bool> {
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return Ok(true);
    }
    std::fs::write(path, "1").map_err(|source| SidecarError::ForwardingSysctl { path, source })?;
    Ok(false)
}

/// Turns IPv4 forwarding on in this network namespace: nothing when [`IPV4_SYSCTL`] already
/// reads 1, else by writing it, else (read-only `/proc/sys`, as in a Pod) per interface with
/// [`enable_ipv4_per_interface`]. Call it after the tunnel interface exists.
pub async fn enable_ipv4() -> Result<Ipv4Forwarding> {
    match sysctl_on(IPV4_SYSCTL) {
        Ok(true) => Ok(Ipv4Forwarding::AlreadyOn),
        Ok(false) => Ok(Ipv4Forwarding::Sysctl),
        Err(SidecarError::ForwardingSysctl { source, .. }) => {
            let interfaces = enable_ipv4_per_interface().await?;
            Ok(Ipv4Forwarding::PerInterface {
                interfaces,
                sysctl_error: source,
            })
        }
        Err(e) => Err(e),
    }
}

/// Turns IPv6 forwarding on with [`IPV6_SYSCTL`], the only switch Linux forwards IPv6 by (no
/// per-interface way, see the module docs); `Ok(true)` when it was already on.
pub fn enable_ipv6() -> Result<bool> {
    sysctl_on(IPV6_SYSCTL)
}

/// Whether the gateway forwards IPv6, so IPv6 forwarding is worth turning on: an address of its
/// own, a peer pool (peers reach each other through the gateway) or a network it advertises is
/// IPv6. An IPv4-only gateway leaves `net.ipv6.conf.all.forwarding` alone.
#[must_use]
pub fn ipv6_needed(own: &[IpNet], pools: &[IpNet], networks: &[IpNet]) -> bool {
    own.iter()
        .chain(pools)
        .chain(networks)
        .any(|n| matches!(n, IpNet::V6(_)))
}

/// Turns IPv4 forwarding on over rtnetlink for every interface of this network namespace but
/// loopback, and returns their names. Interfaces without IPv4 (the kernel answers
/// `EAFNOSUPPORT`) are skipped; any other refusal stops with an error naming the interface.
/// Opens its own rtnetlink socket, whose task runs on the current tokio runtime.
pub async fn enable_ipv4_per_interface() -> Result<Vec<String>> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|source| SidecarError::ListInterfaces { source })?;
    tokio::spawn(conn);
    let links = interfaces(&handle).await?;
    let mut done = Vec::with_capacity(links.len());
    for (index, name) in links {
        match handle.link().set(forwarding_request(index)).execute().await {
            Ok(()) => done.push(name),
            Err(e) => {
                let source = io_error(e);
                if source.raw_os_error() != Some(EAFNOSUPPORT) {
                    return Err(SidecarError::InterfaceForwarding {
                        interface: name,
                        source,
                    });
                }
            }
        }
    }
    Ok(done)
}

/// (index, name) of every interface of the namespace but loopback.
async fn interfaces(handle: &Handle) -> Result<Vec<(u32, String)>> {
    let list_err = |e| SidecarError::ListInterfaces {
        source: io_error(e),
    };
    let mut dump = handle.link().get().execute();
    let mut out = Vec::new();
    while let Some(link) = dump.try_next().await.map_err(list_err)? {
        if link.header.flags.contains(LinkFlags::Loopback) {
            continue;
        }
        let index = link.header.index;
        let name = link
            .attributes
            .into_iter()
            .find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n),
                _ => None,
            })
            .unwrap_or_else(|| format!("#{index}"));
        out.push((index, name));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use rtnetlink::packet_core::Emitable;

    use super::{forwarding_request, ipv6_needed, Ipv4Forwarding};
    use crate::error::SidecarError;

    #[test]
    fn the_request_carries_only_ipv4_devconf_forwarding_1_and_leaves_the_link_flags_alone() {
        let msg = forwarding_request(7);
        let mut buf = vec![0; msg.buffer_len()];
        msg.emit(&mut buf);
        // ifinfomsg: family AF_UNSPEC, index 7, flags 0, change mask 0 (up/down untouched).
        assert_eq!(buf[0], 0, "family AF_UNSPEC");
        assert_eq!(&buf[4..8], &7u32.to_ne_bytes(), "interface index");
        assert_eq!(&buf[8..16], &[0; 8], "no flags, empty change mask");
        #[rustfmt::skip]
        let attrs: &[u8] = &[
            20, 0, 26, 0,          // IFLA_AF_SPEC (26), 20 bytes
            16, 0, 2, 0,           //   AF_INET (2), 16 bytes
            12, 0, 1, 0x80,        //     IFLA_INET_CONF (1) | NLA_F_NESTED, 12 bytes
            8, 0, 1, 0, 1, 0, 0, 0, //       IPV4_DEVCONF_FORWARDING (1): u32 1
        ];
        assert_eq!(&buf[16..], attrs);
    }

    #[test]
    fn both_sysctl_outcomes_log_as_sysctl_and_the_fallback_as_per_interface_netlink() {
        assert_eq!(Ipv4Forwarding::AlreadyOn.way(), "sysctl");
        assert_eq!(Ipv4Forwarding::Sysctl.way(), "sysctl");
        let fallback = Ipv4Forwarding::PerInterface {
            interfaces: vec!["wg0".into(), "eth0".into()],
            sysctl_error: std::io::Error::from_raw_os_error(30),
        };
        assert_eq!(fallback.way(), "per-interface netlink");
    }

    #[test]
    fn a_refused_interface_is_named_in_the_error_with_the_errno() {
        let e = SidecarError::InterfaceForwarding {
            interface: "wg0".into(),
            source: std::io::Error::from_raw_os_error(1),
        };
        let text = e.to_string();
        assert!(text.contains("interface wg0"), "{text}");
        assert!(text.contains("os error 1"), "{text}");
    }

    #[test]
    fn ipv6_forwarding_is_needed_when_an_own_address_a_pool_or_a_network_is_ipv6() {
        let nets =
            |s: &[&str]| -> Vec<ipnet::IpNet> { s.iter().map(|n| n.parse().unwrap()).collect() };
        let v4 = nets(&["10.8.0.1/24"]);
        assert!(!ipv6_needed(
            &v4,
            &nets(&["10.8.0.0/24"]),
            &nets(&["10.20.0.0/16"])
        ));
        assert!(!ipv6_needed(&[], &[], &[]));
        assert!(ipv6_needed(
            &nets(&["10.8.0.1/24", "fd00:8::1/64"]),
            &[],
            &[]
        ));
        assert!(ipv6_needed(&v4, &nets(&["fd00:8::/64"]), &[]));
        assert!(ipv6_needed(
            &v4,
            &[],
            &nets(&["10.20.0.0/16", "fd00:20::/64"])
        ));
    }
}
