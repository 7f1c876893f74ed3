//! Routes over netlink (`rtnetlink`; the image has no `ip` binary).
//!
//! Owns: the kill switch (an `unreachable` route with a high metric for every tunnelled CIDR) and
//! the tunnel routes (the same CIDRs via the WireGuard interface with a lower metric, so they win
//! while the interface exists and the kill switch answers when it does not). All adds use
//! replace semantics, so every call is idempotent.
//! Must never: touch routes other than those for the CIDRs it is given, or the default route.

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::{
    packet_route::route::{RouteMessage, RouteScope, RouteType},
    Handle, RouteMessageBuilder,
};

use crate::error::{Result, SidecarError};

/// Metric of kill-switch routes: loses against any ordinary route for the same prefix.
pub const KILL_SWITCH_METRIC: u32 = 9999;
/// Metric of the tunnel routes: wins against the kill switch.
pub const TUNNEL_METRIC: u32 = 100;

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

fn base(cidr: &IpNet) -> Result<RouteMessageBuilder<std::net::IpAddr>> {
    RouteMessageBuilder::<std::net::IpAddr>::new()
        .destination_prefix(cidr.network(), cidr.prefix_len())
        .map_err(|e| SidecarError::Route {
            op: "build",
            cidr: cidr.to_string(),
            reason: e.to_string(),
        })
}

/// The kill-switch route message for `cidr`.
pub fn kill_switch_route(cidr: &IpNet) -> Result<RouteMessage> {
    Ok(base(cidr)?
        .kind(RouteType::Unreachable)
        .priority(KILL_SWITCH_METRIC)
        .build())
}

/// The tunnel route message for `cidr` via interface `index`.
pub fn tunnel_route(cidr: &IpNet, index: u32) -> Result<RouteMessage> {
    Ok(base(cidr)?
        .output_interface(index)
        .scope(RouteScope::Link)
        .priority(TUNNEL_METRIC)
        .build())
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
                Err(rtnetlink::Error::NetlinkError(e))
                    if e.raw_code().abs() == 3 /* ESRCH: no such route */ => {}
                Err(e) => return Err(route_err("remove kill-switch", cidr)(e)),
            }
        }
        Ok(())
    }

    /// Routes every CIDR through interface `name` with [`TUNNEL_METRIC`].
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
    use rtnetlink::packet_route::route::{RouteAttribute, RouteType};

    use super::{kill_switch_route, tunnel_route, KILL_SWITCH_METRIC, TUNNEL_METRIC};

    fn priority(m: &rtnetlink::packet_route::route::RouteMessage) -> u32 {
        m.attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Priority(p) => Some(*p),
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn the_tunnel_route_beats_the_kill_switch_for_the_same_prefix() {
        let cidr = "10.20.0.0/16".parse().unwrap();
        let ks = kill_switch_route(&cidr).unwrap();
        let tun = tunnel_route(&cidr, 7).unwrap();
        assert_eq!(ks.header.kind, RouteType::Unreachable);
        assert_eq!(ks.header.destination_prefix_length, 16);
        assert!(priority(&tun) < priority(&ks));
        assert_eq!(
            (priority(&tun), priority(&ks)),
            (TUNNEL_METRIC, KILL_SWITCH_METRIC)
        );
    }

    #[test]
    fn ipv6_prefixes_build_too() {
        let cidr = "fd00:1::/64".parse().unwrap();
        assert_eq!(
            kill_switch_route(&cidr)
                .unwrap()
                .header
                .destination_prefix_length,
            64
        );
    }
}
