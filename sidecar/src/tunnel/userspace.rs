//! The embedded BoringTun device of userspace mode.
//!
//! Owns: creating the BoringTun device (TUN interface plus its worker threads) with the
//! sidecar's own [`DeviceConfig`] instead of the library default, and bringing the link up.
//! Configuration (key, MTU, addresses, peers) still goes through `defguard_wireguard_rs` over
//! the device's UAPI socket. Must never: configure keys or peers itself, or touch routes.

use defguard_boringtun::device::{DeviceConfig, DeviceHandle};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use rtnetlink::{
    packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST},
    packet_route::{
        link::{LinkAttribute, LinkFlags, LinkMessage},
        RouteNetlinkMessage,
    },
};

/// How the BoringTun device runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserspaceConfig {
    /// Worker threads (each one an event loop over the TUN queue(s) and UDP sockets).
    pub threads: usize,
    /// One connected UDP socket per peer (instead of `send_to` on the listening socket).
    pub connected_socket: bool,
    /// One TUN queue per worker thread (`IFF_MULTI_QUEUE`).
    pub multi_queue: bool,
}

impl UserspaceConfig {
    /// The library default `DeviceConfig::default()` uses.
    pub const LIBRARY_DEFAULT: Self = Self {
        threads: 4,
        connected_socket: true,
        multi_queue: true,
    };
}

/// Creates the TUN interface `name` served by a BoringTun device configured by `cfg`, and sets
/// the link up. Dropping the returned handle stops the device (and so removes the interface).
pub(super) fn create(name: &str, cfg: UserspaceConfig) -> std::io::Result<DeviceHandle> {
    let config = DeviceConfig {
        n_threads: cfg.threads.max(1),
        use_connected_socket: cfg.connected_socket,
        use_multi_queue: cfg.multi_queue,
        ..DeviceConfig::default()
    };
    let handle = DeviceHandle::new(name, config).map_err(std::io::Error::other)?;
    // The TUN interface starts down; Linux does not bring it up when addresses are assigned.
    set_link_up(name)?;
    Ok(handle)
}

/// `ip link set NAME up` over a synchronous rtnetlink socket (the link is found by name).
fn set_link_up(name: &str) -> std::io::Result<()> {
    let mut link = LinkMessage::default();
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    link.attributes.push(LinkAttribute::IfName(name.to_owned()));
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::SetLink(link));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);

    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    sock.send(&buf, 0)?;
    let (answer, _) = sock.recv_from_full()?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer)
        .map_err(std::io::Error::other)?;
    match reply.payload {
        NetlinkPayload::Error(e) if e.code.is_none() => Ok(()),
        NetlinkPayload::Error(e) => Err(e.to_io()),
        _ => Err(std::io::Error::other(
            "unexpected rtnetlink answer to set link up",
        )),
    }
}
