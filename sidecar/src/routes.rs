//! Policy routing of the Pod over netlink (`rtnetlink`; the image has no `ip` binary), as
//! `wg-quick` does it.
//!
//! Owns: the tunnel's routing table [`TABLE`] and the rules that consult it, per address family
//! of the tunnelled CIDRs:
//! - `priority 10000 to <exclude> lookup main` for every exempt CIDR (Vault, the gateway
//!   endpoints, the cluster's networks): what must stay reachable before the tunnel is up;
//! - `priority 10001 not fwmark 51821 lookup 51820`: everything the WireGuard socket did not send
//!   consults the tunnel's table before `main` (the socket carries [`FWMARK`], so its UDP to the
//!   gateway endpoint skips the table and leaves by the Pod's own default route);
//! - in table 51820, the kill switch: an `unreachable` route with metric [`KILL_SWITCH_METRIC`]
//!   for every tunnelled CIDR, and the tunnel routes: the same CIDRs via the WireGuard interface
//!   with metric [`TUNNEL_METRIC`], which win while the interface exists. When it goes (the
//!   sidecar stopped or died) its routes go with it and the table answers unreachable: nothing
//!   for a tunnelled destination falls through to `main`, whatever `main` says (its default
//!   route included, so `0.0.0.0/0` and `::/0` work).
//!
//! Also measures the path MTU to the gateway endpoint for `--mtu auto` (see `mtu`).
//!
//! `wg-init` writes the rules and the kill switch; `wg-sidecar run` writes them again (same
//! values) and adds the tunnel routes. Every write is idempotent (routes replace, rules that
//! exist already are kept).
//! Must never: touch the main table, routes for CIDRs it is not given, or rules other than its
//! own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::{
    packet_route::{
        link::LinkAttribute,
        route::{RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage},
        AddressFamily,
    },
    Handle, RouteMessageBuilder,
};

use crate::error::{Result, SidecarError};

/// Metric of kill-switch routes: loses against any ordinary route for the same prefix.
pub const KILL_SWITCH_METRIC: u32 = 9999;
/// Metric of the tunnel routes: wins against the kill switch.
pub const TUNNEL_METRIC: u32 = 100;
/// The tunnel's routing table (`wg-quick`'s default).
pub const TABLE: u32 = 51820;
/// The firewall mark of the WireGuard socket's packets. Not equal to [`TABLE`], unlike
/// `wg-quick`: removing a kernel WireGuard interface with a mark makes `defguard_wireguard_rs`
/// delete the rules `fwmark <mark> lookup <mark>`, a request the kernel also matches against
/// `not fwmark <mark> lookup <mark>`, and the kill switch would go with the interface.
pub const FWMARK: u32 = 51821;
/// Priority of the `to <exclude> lookup main` rules.
pub const EXCLUDE_PRIORITY: u32 = 10_000;
/// Priority of the `not fwmark FWMARK lookup TABLE` rule (after the excludes, before `main`
/// at 32766).
pub const TUNNEL_PRIORITY: u32 = 10_001;

// The excludes are consulted first, the tunnel's table next, `main` (32766) last; see FWMARK.
const _: () =
    assert!(EXCLUDE_PRIORITY < TUNNEL_PRIORITY && TUNNEL_PRIORITY < 32766 && TABLE != FWMARK);

/// `EEXIST`: the rule is there already.
const EEXIST: i32 = 17;
/// `ESRCH`: no such route.
const ESRCH: i32 = 3;

/// The path MTU towards one destination ([`Routes::path_mtu`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathMtu {
    /// Bytes.
    pub mtu: u32,
    /// The interface the route leaves by.
    pub interface: String,
    /// True when the route's own `mtu` metric gave it, false when the interface's MTU did.
    pub from_route: bool,
}

/// A netlink route handle bound to the current network namespace.
#[derive(Debug, Clone)]
pub struct Routes {
    handle: Handle,
}

fn route_err<'a>(
    op: &'static str,
    cidr: &'a IpNet,
) -> impl Fn(rtnetlink::Error) -> SidecarError + use<'a> {
    move |e| SidecarError::Route {
        op,
        cidr: cidr.to_string(),
        reason: e.to_string(),
    }
}

fn base(cidr: &IpNet) -> Result<RouteMessageBuilder<IpAddr>> {
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(cidr.network(), cidr.prefix_len())
        .map_err(|e| SidecarError::Route {
            op: "build",
            cidr: cidr.to_string(),
            reason: e.to_string(),
        })?
        .table_id(TABLE))
}

/// The kill-switch route message for `cidr` (in [`TABLE`]).
pub fn kill_switch_route(cidr: &IpNet) -> Result<RouteMessage> {
    Ok(base(cidr)?
        .kind(RouteType::Unreachable)
        .priority(KILL_SWITCH_METRIC)
        .build())
}

/// The tunnel route message for `cidr` via interface `index` (in [`TABLE`]).
pub fn tunnel_route(cidr: &IpNet, index: u32) -> Result<RouteMessage> {
    Ok(base(cidr)?
        .output_interface(index)
        .scope(RouteScope::Link)
        .priority(TUNNEL_METRIC)
        .build())
}

fn family(cidr: &IpNet) -> AddressFamily {
    match cidr {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    }
}

fn rule(family: AddressFamily, priority: u32, table: u32) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = family;
    m.header.action = RuleAction::ToTable;
    // Tables above 255 travel in the attribute only (the header's field is one byte).
    m.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    m.attributes.push(RuleAttribute::Table(table));
    m.attributes.push(RuleAttribute::Priority(priority));
    m
}

/// `priority EXCLUDE_PRIORITY to <cidr> lookup main`.
#[must_use]
pub fn exclude_rule(cidr: &IpNet) -> RuleMessage {
    let mut m = rule(
        family(cidr),
        EXCLUDE_PRIORITY,
        u32::from(RouteHeader::RT_TABLE_MAIN),
    );
    m.header.dst_len = cidr.prefix_len();
    m.attributes
        .push(RuleAttribute::Destination(cidr.network()));
    m
}

/// `priority TUNNEL_PRIORITY not fwmark FWMARK lookup TABLE` for the family of `cidr`.
#[must_use]
pub fn tunnel_rule(cidr: &IpNet) -> RuleMessage {
    let mut m = rule(family(cidr), TUNNEL_PRIORITY, TABLE);
    m.header.flags = RuleFlags::Invert;
    m.attributes.push(RuleAttribute::FwMark(FWMARK));
    m
}

fn is_v6(cidr: &IpNet) -> bool {
    matches!(cidr, IpNet::V6(_))
}

/// The rules for tunnelled `routes` and exempt `exclude`, each with its `ip rule` text: per
/// family that has routes, an exclude rule for each exempt CIDR of that family, then the tunnel
/// rule. (An exempt CIDR of a family without routes is outside the tunnel anyway.)
#[must_use]
pub fn policy_rules(routes: &[IpNet], exclude: &[IpNet]) -> Vec<(String, RuleMessage)> {
    let mut rules = Vec::new();
    for any in [
        IpNet::from(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        IpNet::from(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
    ] {
        if !routes.iter().any(|r| is_v6(r) == is_v6(&any)) {
            continue;
        }
        for cidr in exclude.iter().filter(|e| is_v6(e) == is_v6(&any)) {
            rules.push((
                format!("priority {EXCLUDE_PRIORITY} to {cidr} lookup main"),
                exclude_rule(cidr),
            ));
        }
        rules.push((
            format!("priority {TUNNEL_PRIORITY} not fwmark {FWMARK} lookup {TABLE}"),
            tunnel_rule(&any),
        ));
    }
    rules
}

/// The address the sidecar sends its handshake kick to inside `net`: its network address, or
/// for the full tunnel (where that is `0.0.0.0` or `::`, which mean this host) a documentation
/// address (`192.0.2.9`, `2001:db8::9`) that only the tunnel routes.
#[must_use]
pub fn probe_address(net: &IpNet) -> IpAddr {
    match net {
        IpNet::V4(n) if n.prefix_len() == 0 => IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)),
        IpNet::V6(n) if n.prefix_len() == 0 => {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9))
        }
        _ => net.network(),
    }
}

impl Routes {
    /// Opens a netlink socket; its connection task runs on the current tokio runtime.
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| SidecarError::Netlink(format!("failed to open netlink socket: {e}")))?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The index of interface `name`.
    pub async fn link_index(&self, name: &str) -> Result<u32> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(SidecarError::Netlink(format!("interface {name} not found"))),
            Err(e) => Err(SidecarError::Netlink(format!(
                "failed to look up interface {name}: {e}"
            ))),
        }
    }

    /// The path MTU towards `dst` as the WireGuard socket's packets see it: the route is looked
    /// up (`ip route get <dst> mark FWMARK`) with the socket's mark, so the rules send the lookup
    /// past the tunnel's table just as they send the packets. The route's `mtu` metric when it
    /// has one (configured, or learned by path MTU discovery), else the MTU of the interface it
    /// leaves by.
    pub async fn path_mtu(&self, dst: IpAddr) -> Result<PathMtu> {
        let err = |what: &str, e: &dyn std::fmt::Display| {
            SidecarError::Netlink(format!("failed to {what} for the path MTU to {dst}: {e}"))
        };
        let dst = dst.to_canonical();
        // A bare lookup, as `ip route get` sends it: family, destination, mark.
        let mut msg = RouteMessage::default();
        msg.header.address_family = if dst.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        msg.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
        msg.attributes.push(RouteAttribute::Destination(dst.into()));
        msg.attributes.push(RouteAttribute::Mark(FWMARK));
        let route = self
            .handle
            .route()
            .get(msg)
            .execute()
            .try_next()
            .await
            .map_err(|e| err("look up the route", &e))?
            .ok_or_else(|| err("look up the route", &"no route"))?;
        let oif = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        let metric = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Metrics(m) => m.iter().find_map(|m| match m {
                RouteMetric::Mtu(mtu) if *mtu > 0 => Some(*mtu),
                _ => None,
            }),
            _ => None,
        });
        let oif = oif.ok_or_else(|| err("look up the route", &"no output interface"))?;
        let link = self
            .handle
            .link()
            .get()
            .match_index(oif)
            .execute()
            .try_next()
            .await
            .map_err(|e| err("read the output interface", &e))?
            .ok_or_else(|| err("read the output interface", &format!("no link {oif}")))?;
        let interface = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
            .unwrap_or_else(|| oif.to_string());
        let link_mtu = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        });
        let (mtu, from_route) = match (metric, link_mtu) {
            (Some(m), _) => (m, true),
            (None, Some(m)) => (m, false),
            (None, None) => {
                return Err(err(
                    "read the output interface",
                    &format!("{interface} reports no MTU"),
                ))
            }
        };
        Ok(PathMtu {
            mtu,
            interface,
            from_route,
        })
    }

    /// Installs the rules of [`policy_rules`]; rules that exist already are kept.
    pub async fn install_rules(&self, routes: &[IpNet], exclude: &[IpNet]) -> Result<()> {
        for (text, msg) in policy_rules(routes, exclude) {
            let mut req = self.handle.rule().add();
            *req.message_mut() = msg;
            match req.execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == EEXIST => {}
                Err(e) => {
                    return Err(SidecarError::Rule {
                        rule: text,
                        reason: e.to_string(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Installs (or re-installs) the kill-switch route for every CIDR.
    pub async fn install_kill_switch(&self, cidrs: &[IpNet]) -> Result<()> {
        for cidr in cidrs {
            let msg = kill_switch_route(cidr)?;
            self.handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(route_err("install kill-switch", cidr))?;
        }
        Ok(())
    }

    /// Removes the kill-switch routes; missing ones are fine.
    pub async fn remove_kill_switch(&self, cidrs: &[IpNet]) -> Result<()> {
        for cidr in cidrs {
            let msg = kill_switch_route(cidr)?;
            match self.handle.route().del(msg).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == ESRCH => {}
                Err(e) => return Err(route_err("remove kill-switch", cidr)(e)),
            }
        }
        Ok(())
    }

    /// Routes every CIDR through interface `name` with [`TUNNEL_METRIC`] (in [`TABLE`]).
    pub async fn add_tunnel_routes(&self, name: &str, cidrs: &[IpNet]) -> Result<()> {
        let index = self.link_index(name).await?;
        for cidr in cidrs {
            self.handle
                .route()
                .add(tunnel_route(cidr, index)?)
                .replace()
                .execute()
                .await
                .map_err(route_err("add tunnel", cidr))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use ipnet::IpNet;
    use rtnetlink::packet_route::{
        route::{RouteAttribute, RouteMessage, RouteType},
        rule::{RuleAttribute, RuleFlags, RuleMessage},
        AddressFamily,
    };

    use super::{
        kill_switch_route, policy_rules, probe_address, tunnel_route, FWMARK, KILL_SWITCH_METRIC,
        TABLE, TUNNEL_METRIC, TUNNEL_PRIORITY,
    };

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn priority(m: &RouteMessage) -> u32 {
        m.attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Priority(p) => Some(*p),
                _ => None,
            })
            .unwrap()
    }

    fn table(m: &RouteMessage) -> Option<u32> {
        m.attributes.iter().find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
    }

    fn rule_attr<T>(m: &RuleMessage, f: impl Fn(&RuleAttribute) -> Option<T>) -> Option<T> {
        m.attributes.iter().find_map(f)
    }

    #[test]
    fn the_tunnel_route_beats_the_kill_switch_for_the_same_prefix_in_the_tunnels_table() {
        let cidr = net("10.20.0.0/16");
        let ks = kill_switch_route(&cidr).unwrap();
        let tun = tunnel_route(&cidr, 7).unwrap();
        assert_eq!(ks.header.kind, RouteType::Unreachable);
        assert_eq!(ks.header.destination_prefix_length, 16);
        assert!(priority(&tun) < priority(&ks));
        assert_eq!(
            (priority(&tun), priority(&ks)),
            (TUNNEL_METRIC, KILL_SWITCH_METRIC)
        );
        assert_eq!((table(&ks), table(&tun)), (Some(TABLE), Some(TABLE)));
    }

    #[test]
    fn ipv6_and_full_tunnel_prefixes_build_too() {
        for (cidr, len) in [("fd00:1::/64", 64), ("0.0.0.0/0", 0), ("::/0", 0)] {
            let ks = kill_switch_route(&net(cidr)).unwrap();
            assert_eq!(ks.header.destination_prefix_length, len, "{cidr}");
            assert_eq!(table(&ks), Some(TABLE), "{cidr}");
        }
    }

    #[test]
    fn excludes_come_before_the_unmarked_rule_of_each_routed_family_only() {
        let rules = policy_rules(
            &[net("0.0.0.0/0"), net("::/0")],
            &[
                net("10.96.0.0/12"),
                net("192.0.2.1/32"),
                net("fd00:96::/112"),
            ],
        );
        let texts: Vec<&str> = rules.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            texts,
            [
                "priority 10000 to 10.96.0.0/12 lookup main",
                "priority 10000 to 192.0.2.1/32 lookup main",
                "priority 10001 not fwmark 51821 lookup 51820",
                "priority 10000 to fd00:96::/112 lookup main",
                "priority 10001 not fwmark 51821 lookup 51820",
            ]
        );
        let (_, exclude) = &rules[0];
        assert_eq!(exclude.header.family, AddressFamily::Inet);
        assert_eq!(exclude.header.dst_len, 12);
        assert_eq!(
            rule_attr(exclude, |a| match a {
                RuleAttribute::Table(t) => Some(*t),
                _ => None,
            }),
            Some(254)
        );
        let (_, tunnel) = &rules[4];
        assert_eq!(tunnel.header.family, AddressFamily::Inet6);
        assert_eq!(tunnel.header.flags, RuleFlags::Invert);
        assert_eq!(tunnel.header.dst_len, 0);
        assert_eq!(
            rule_attr(tunnel, |a| match a {
                RuleAttribute::FwMark(m) => Some(*m),
                _ => None,
            }),
            Some(FWMARK)
        );
        assert_eq!(
            rule_attr(tunnel, |a| match a {
                RuleAttribute::Priority(p) => Some(*p),
                _ => None,
            }),
            Some(TUNNEL_PRIORITY)
        );
        // IPv4 routes only: no IPv6 rule, so a Pod without IPv6 needs none.
        let v4 = policy_rules(&[net("10.20.0.0/16")], &[net("fd00::1/128")]);
        assert_eq!(v4.len(), 1);
    }

    #[test]
    fn the_handshake_kick_goes_to_an_address_only_the_tunnel_routes() {
        assert_eq!(probe_address(&net("10.20.0.0/24")).to_string(), "10.20.0.0");
        assert_eq!(probe_address(&net("0.0.0.0/0")).to_string(), "192.0.2.9");
        assert_eq!(probe_address(&net("::/0")).to_string(), "2001:db8::9");
    }
}
