//! Links by name over a synchronous rtnetlink socket: bring one up, set its MTU, delete one left
//! behind.
//!
//! Owns: the three netlink requests the tunnel needs outside `defguard_wireguard_rs`. Must never:
//! touch a link other than the one named by the caller.

use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use rtnetlink::{
    packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST},
    packet_route::{
        link::{LinkAttribute, LinkFlags, LinkMessage},
        RouteNetlinkMessage,
    },
};

/// `ip link set NAME up` (the link is found by name).
pub(super) fn set_up(name: &str) -> std::io::Result<()> {
    let mut link = named(name);
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    request(RouteNetlinkMessage::SetLink(link))
}

/// `ip link set NAME mtu MTU` (the link is found by name).
pub(super) fn set_mtu(name: &str, mtu: u32) -> std::io::Result<()> {
    let mut link = named(name);
    link.attributes.push(LinkAttribute::Mtu(mtu));
    request(RouteNetlinkMessage::SetLink(link))
}

/// `ip link delete NAME`; `Ok(false)` when there is no such link.
///
/// A sidecar killed without cleanup (OOM kill, SIGKILL, a node's hard stop of the container)
/// leaves a kernel-mode interface in the Pod's network namespace, which outlives the container;
/// its restart must reclaim the name instead of failing on EEXIST.
pub(super) fn delete_if_present(name: &str) -> std::io::Result<bool> {
    match request(RouteNetlinkMessage::DelLink(named(name))) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(ENODEV) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `ENODEV` (Linux errno 19): the kernel's answer for a link name that does not exist.
const ENODEV: i32 = 19;

fn named(name: &str) -> LinkMessage {
    let mut link = LinkMessage::default();
    link.attributes.push(LinkAttribute::IfName(name.to_owned()));
    link
}

/// Sends one request and waits for its acknowledgement.
fn request(message: RouteNetlinkMessage) -> std::io::Result<()> {
    let mut req = NetlinkMessage::from(message);
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
        _ => Err(std::io::Error::other("unexpected rtnetlink answer")),
    }
}
