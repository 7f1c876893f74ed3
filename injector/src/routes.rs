//! The routes a Pod may send through the tunnel, as pure checks over CIDRs: no route overlaps
//! another, and no route covers what the sidecar must reach before the tunnel is up (Vault, the
//! gateway endpoint, cluster DNS, the cluster's Pod and Service networks) unless it is the full
//! tunnel.
//!
//! Why the second rule: `wg-init` installs the kill switch for every route before the sidecar
//! starts, so a route over Vault's address, cluster DNS or the gateway endpoint drops the very
//! packets that bring the tunnel up, and the Pod never starts (a bootstrap lock-out).
//!
//! This module owns the overlap rules and the wording of what is covered and of the fix. It
//! knows nothing of annotations, the config file or Pods: callers describe each protected
//! network ([`Protected`]) and prefix the messages with where the routes came from.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// What a protected network is to the sidecar (it decides the message's consequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A Service CIDR of the cluster (Vault and DNS are usually Services).
    ServiceNetwork,
    /// A Pod CIDR of the cluster.
    PodNetwork,
    /// A cluster DNS server.
    ClusterDns,
    /// Vault's address.
    Vault,
    /// A gateway endpoint.
    GatewayEndpoint,
}

/// Something the sidecar must reach outside the tunnel, and where the injector learnt of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protected {
    /// The network (a single address is a /32 or /128).
    pub net: IpNet,
    /// What it is.
    pub need: Need,
    /// Where it comes from, for the message: `config cluster.serviceCIDRs`.
    pub origin: String,
}

impl Protected {
    /// A single address (`Need::Vault`, `Need::ClusterDns`, `Need::GatewayEndpoint`).
    #[must_use]
    pub fn address(ip: IpAddr, need: Need, origin: String) -> Self {
        Self {
            net: IpNet::from(ip),
            need,
            origin,
        }
    }

    /// What is cut off when the route covers it.
    fn consequence(&self) -> &'static str {
        match self.need {
            Need::ServiceNetwork => {
                "the sidecar could not reach Vault or cluster DNS before the tunnel is up"
            }
            Need::PodNetwork => {
                "the sidecar could not reach Vault or cluster DNS running in Pods before the tunnel is up"
            }
            Need::ClusterDns => {
                "the sidecar could not resolve Vault's or the gateway's name before the tunnel is up"
            }
            Need::Vault => {
                "the sidecar could not log in to Vault and read the gateway record before the tunnel is up"
            }
            Need::GatewayEndpoint => {
                "the tunnel's own packets to the gateway would be sent into the tunnel, which never comes up"
            }
        }
    }
}

impl fmt::Display for Protected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.need {
            Need::ServiceNetwork => "the cluster's Service network",
            Need::PodNetwork => "the cluster's Pod network",
            Need::ClusterDns => "the cluster DNS server",
            Need::Vault => "Vault's address",
            Need::GatewayEndpoint => "the gateway endpoint",
        };
        let net = self.net;
        if net.prefix_len() == net.max_prefix_len() {
            write!(f, "{what} {} ({})", net.addr(), self.origin)
        } else {
            write!(f, "{what} {net} ({})", self.origin)
        }
    }
}

/// The full tunnel (`0.0.0.0/0`, `::/0`): exempt from the lock-out check, because with it the
/// Pod's routing keeps the gateway endpoint, Vault and the cluster networks outside the tunnel
/// (DESIGN.md, "Routing in the Pod"; that exemption is the sidecar's, not built here).
#[must_use]
pub fn is_full_tunnel(route: &IpNet) -> bool {
    route.prefix_len() == 0
}

/// Two routes of one list that overlap (`outer` contains `inner`; equal for a duplicate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    /// The larger route.
    pub outer: IpNet,
    /// The route inside it.
    pub inner: IpNet,
}

impl fmt::Display for Overlap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (outer, inner) = (self.outer, self.inner);
        if outer == inner {
            write!(f, "{outer} is listed twice; list each route once")
        } else {
            write!(
                f,
                "{inner} lies inside {outer}, and routes may not overlap; keep {outer} alone (it already sends {inner} through the tunnel), or list prefixes that do not overlap"
            )
        }
    }
}

/// The first pair of `routes` that overlap, in the order given.
#[must_use]
pub fn overlap(routes: &[IpNet]) -> Option<Overlap> {
    routes.iter().enumerate().find_map(|(i, a)| {
        routes[i + 1..].iter().find_map(|b| {
            if a.contains(b) {
                Some(Overlap {
                    outer: *a,
                    inner: *b,
                })
            } else if b.contains(a) {
                Some(Overlap {
                    outer: *b,
                    inner: *a,
                })
            } else {
                None
            }
        })
    })
}

/// A route that covers (or lies inside) something the sidecar must reach outside the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lockout {
    /// The route.
    pub route: IpNet,
    /// Everything it overlaps, the first one named in full.
    pub covered: Vec<Protected>,
    /// The route minus everything it overlaps (empty when the route lies inside one of them).
    pub rest: Vec<IpNet>,
}

/// How many prefixes of [`Lockout::rest`] the message suggests.
const SUGGESTED: usize = 4;

impl fmt::Display for Lockout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let route = self.route;
        let Some(first) = self.covered.first() else {
            return write!(f, "{route} covers nothing protected");
        };
        let verb = if route.contains(&first.net) {
            "covers"
        } else {
            "lies inside"
        };
        write!(f, "{route} {verb} {first}: {}", first.consequence())?;
        if self.covered.len() > 1 {
            let others: Vec<String> = self.covered[1..].iter().map(ToString::to_string).collect();
            write!(f, "; it also overlaps {}", others.join(", "))?;
        }
        let join = |nets: &[IpNet]| {
            nets.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        if self.rest.is_empty() {
            write!(
                f,
                "; remove {route} from the routes: the sidecar reaches it outside the tunnel"
            )
        } else if self.rest.len() <= SUGGESTED {
            write!(
                f,
                "; route narrower prefixes, e.g. the rest of {route}: {}",
                join(&self.rest)
            )
        } else {
            let mut largest = self.rest.clone();
            largest.sort_by_key(IpNet::prefix_len);
            largest.truncate(SUGGESTED);
            largest.sort();
            write!(
                f,
                "; route narrower prefixes that leave it out, such as {} ({} more make up the rest of {route})",
                join(&largest),
                self.rest.len() - SUGGESTED
            )
        }
    }
}

/// The first of `routes` (other than the full tunnel) that overlaps any of `protected`.
#[must_use]
pub fn lockout(routes: &[IpNet], protected: &[Protected]) -> Option<Lockout> {
    routes
        .iter()
        .filter(|route| !is_full_tunnel(route))
        .find_map(|route| {
            let covered: Vec<Protected> = protected
                .iter()
                .filter(|p| route.contains(&p.net) || p.net.contains(route))
                .cloned()
                .collect();
            if covered.is_empty() {
                return None;
            }
            let rest = covered.iter().fold(vec![*route], |pieces, p| {
                pieces
                    .into_iter()
                    .flat_map(|piece| subtract(piece, p.net))
                    .collect()
            });
            Some(Lockout {
                route: *route,
                covered,
                rest,
            })
        })
}

/// `from` without `hole`, as the fewest prefixes, in address order.
fn subtract(from: IpNet, hole: IpNet) -> Vec<IpNet> {
    if hole.contains(&from) {
        return Vec::new();
    }
    if !from.contains(&hole) {
        return vec![from];
    }
    let mut rest = Vec::new();
    let mut inside = from;
    while inside.prefix_len() < hole.prefix_len() {
        let Ok(halves) = inside.subnets(inside.prefix_len() + 1) else {
            break;
        };
        let halves: Vec<IpNet> = halves.collect();
        let [low, high] = halves[..] else { break };
        if low.contains(&hole) {
            rest.push(high);
            inside = low;
        } else {
            rest.push(low);
            inside = high;
        }
    }
    rest.sort();
    rest
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn nets(list: &str) -> Vec<IpNet> {
        list.split(',').map(|n| n.parse().unwrap()).collect()
    }

    fn service(net: &str) -> Protected {
        Protected {
            net: net.parse().unwrap(),
            need: Need::ServiceNetwork,
            origin: "config cluster.serviceCIDRs".to_owned(),
        }
    }

    #[test]
    fn a_route_inside_another_and_a_duplicate_overlap() {
        let o = overlap(&nets("fd00::/64,10.20.0.0/16,10.0.0.0/8")).unwrap();
        assert_eq!(
            (o.outer, o.inner),
            (nets("10.0.0.0/8")[0], nets("10.20.0.0/16")[0])
        );
        assert!(
            o.to_string()
                .starts_with("10.20.0.0/16 lies inside 10.0.0.0/8"),
            "{o}"
        );
        let o = overlap(&nets("10.20.0.0/16,10.20.0.0/16")).unwrap();
        assert_eq!(
            o.to_string(),
            "10.20.0.0/16 is listed twice; list each route once"
        );
    }

    #[test]
    fn disjoint_routes_of_both_families_do_not_overlap() {
        assert_eq!(overlap(&nets("10.20.0.0/16,10.21.0.0/16,fd00::/8")), None);
        assert_eq!(overlap(&nets("0.0.0.0/0,::/0")), None);
        assert_eq!(overlap(&nets("0.0.0.0/0,fd00::/8")), None);
        assert!(overlap(&nets("0.0.0.0/0,10.0.0.0/8")).is_some());
    }

    #[test]
    fn a_route_over_the_service_network_names_both_and_the_rest() {
        let l = lockout(&nets("10.20.0.0/16,10.0.0.0/8"), &[service("10.96.0.0/12")]).unwrap();
        assert_eq!(
            l.to_string(),
            "10.0.0.0/8 covers the cluster's Service network 10.96.0.0/12 (config cluster.serviceCIDRs): \
             the sidecar could not reach Vault or cluster DNS before the tunnel is up; route narrower \
             prefixes, e.g. the rest of 10.0.0.0/8: 10.0.0.0/10,10.64.0.0/11,10.112.0.0/12,10.128.0.0/9"
        );
    }

    #[test]
    fn a_route_inside_a_protected_network_is_to_be_removed() {
        let l = lockout(&nets("10.96.5.0/24"), &[service("10.96.0.0/12")]).unwrap();
        assert!(
            l.to_string()
                .starts_with("10.96.5.0/24 lies inside the cluster's Service network 10.96.0.0/12"),
            "{l}"
        );
        assert!(
            l.to_string().ends_with(
                "; remove 10.96.5.0/24 from the routes: the sidecar reaches it outside the tunnel"
            ),
            "{l}"
        );
    }

    #[test]
    fn a_single_address_is_named_without_its_prefix_and_the_largest_rest_is_suggested() {
        let vault = Protected::address(
            "10.1.2.3".parse().unwrap(),
            Need::Vault,
            "config vault.address".to_owned(),
        );
        let l = lockout(&nets("10.0.0.0/8"), &[vault]).unwrap();
        let message = l.to_string();
        assert!(message.starts_with("10.0.0.0/8 covers Vault's address 10.1.2.3 (config vault.address): the sidecar could not log in"), "{message}");
        assert!(message.contains("such as 10.16.0.0/12,10.32.0.0/11,10.64.0.0/10,10.128.0.0/9 (20 more make up the rest of 10.0.0.0/8)"), "{message}");
        assert_eq!(l.rest.len(), 24);
    }

    #[test]
    fn the_full_tunnel_and_a_narrow_route_pass() {
        let protected = [service("10.96.0.0/12"), service("fd00:96::/112")];
        assert_eq!(lockout(&nets("0.0.0.0/0,::/0"), &protected), None);
        assert_eq!(
            lockout(&nets("10.20.0.0/16,fd00:20::/64"), &protected),
            None
        );
        assert_eq!(lockout(&nets("10.0.0.0/8"), &[]), None);
    }

    #[test]
    fn every_overlapped_network_is_named_and_left_out_of_the_rest() {
        let dns = Protected::address(
            "10.96.0.10".parse().unwrap(),
            Need::ClusterDns,
            "config cluster.dns".to_owned(),
        );
        let pods = Protected {
            net: "10.244.0.0/16".parse().unwrap(),
            need: Need::PodNetwork,
            origin: "config cluster.podCIDRs".to_owned(),
        };
        let l = lockout(&nets("10.0.0.0/8"), &[service("10.96.0.0/12"), dns, pods]).unwrap();
        assert!(l.to_string().contains("; it also overlaps the cluster DNS server 10.96.0.10 (config cluster.dns), the cluster's Pod network 10.244.0.0/16 (config cluster.podCIDRs);"), "{l}");
        for piece in &l.rest {
            assert!(
                !piece.contains(&nets("10.96.0.0/12")[0])
                    && !piece.contains(&nets("10.244.0.0/16")[0])
            );
            assert!(
                !nets("10.96.0.0/12")[0].contains(piece)
                    && !nets("10.244.0.0/16")[0].contains(piece)
            );
        }
        let covered: u64 = l.rest.iter().map(|n| 1u64 << (32 - n.prefix_len())).sum();
        assert_eq!(
            covered,
            (1 << 24) - (1 << 20) - (1 << 16),
            "the rest is exactly what is left"
        );
    }
}
