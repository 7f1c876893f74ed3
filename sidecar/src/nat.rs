//! The gateway's masquerading and forward filter: one nftables table, written over netfilter
//! netlink (no `nft` binary: the gateway image is `FROM scratch`). Turning IP forwarding on is
//! [`crate::forwarding`]'s job.
//!
//! Owns: the pure encoding of one `nf_tables` batch (table `inet wg_gateway_<interface>`, a NAT
//! postrouting chain, one rule per tunnel source range: `ip[6] saddr <pool> oifname != <wg>
//! masquerade`, or with private networks one per (pool, network) pair of one family:
//! `ip[6] saddr <pool> ip[6] daddr <net> oifname != <wg> masquerade`; and with private networks a
//! forward filter chain: `iifname <wg> ip[6] daddr <net> accept` per network, then
//! `iifname <wg> drop`), sending it and reading the kernel's acknowledgements, and deleting the
//! table.
//! Must never: touch any table but its own, or leave a half-applied ruleset (the batch is one
//! `nf_tables` transaction: create, delete, re-create and fill the table, all or nothing).
//!
//! Why hand-encoded netlink and not a crate or the `nft` tool: `nftnl` binds the C libnftnl and
//! `rustables` needs bindgen at build time; `nft` is a dynamically linked program with five
//! libraries the scratch image does not have. The ruleset is four kinds of expression written once
//! at startup, and `netlink-sys` (already in the tree through `rtnetlink`) gives the socket.
//! The end-to-end test checks the result with the real `nft list` and real traffic.

use ipnet::IpNet;
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::error::{Result, SidecarError};

// netlink / nfnetlink / nf_tables constants (linux/netlink.h, linux/netfilter/nf_tables.h).
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_APPEND: u16 = 0x800;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NF_INET_FORWARD: u32 = 2;
const NF_INET_POST_ROUTING: u32 = 4;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NAT_SRC_PRIORITY: u32 = 100;
const FILTER_PRIORITY: u32 = 0;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_NFPROTO: u32 = 15;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const IFNAMSIZ: usize = 16;
const CHAIN: &str = "postrouting";
const FORWARD_CHAIN: &str = "forward";

/// The nftables table name for `interface` (only `[A-Za-z0-9_]`).
#[must_use]
pub fn table_name(interface: &str) -> String {
    let clean: String = interface
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("wg_gateway_{clean}")
}

/// A netlink attribute tree, encoded on demand.
enum Attr {
    Bytes(u16, Vec<u8>),
    Nested(u16, Vec<Attr>),
}

fn s(ty: u16, v: &str) -> Attr {
    let mut b = v.as_bytes().to_vec();
    b.push(0);
    Attr::Bytes(ty, b)
}

fn be32(ty: u16, v: u32) -> Attr {
    Attr::Bytes(ty, v.to_be_bytes().to_vec())
}

fn data(ty: u16, bytes: Vec<u8>) -> Attr {
    // NFTA_DATA_VALUE = 1 inside an nft_data nest.
    Attr::Nested(ty, vec![Attr::Bytes(1, bytes)])
}

impl Attr {
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0, 0]);
        let ty = match self {
            Self::Bytes(ty, b) => {
                out.extend_from_slice(b);
                *ty
            }
            Self::Nested(ty, children) => {
                for c in children {
                    c.encode(out);
                }
                *ty | NLA_F_NESTED
            }
        };
        let len = u16::try_from(out.len() - start).unwrap_or(u16::MAX);
        out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        out[start + 2..start + 4].copy_from_slice(&ty.to_ne_bytes());
        while out.len() % 4 != 0 {
            out.push(0);
        }
    }
}

/// One expression: `NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA { … } }`.
fn expr(name: &str, attrs: Vec<Attr>) -> Attr {
    let mut e = vec![s(1, name)];
    if !attrs.is_empty() {
        e.push(Attr::Nested(2, attrs));
    }
    Attr::Nested(1, e)
}

/// `meta load <key> => reg 1`.
fn meta(key: u32) -> Attr {
    expr("meta", vec![be32(2, key), be32(1, NFT_REG_1)])
}

/// `cmp <op> reg 1 <bytes>`.
fn cmp(op: u32, bytes: Vec<u8>) -> Attr {
    expr("cmp", vec![be32(1, NFT_REG_1), be32(2, op), data(3, bytes)])
}

/// Which address of the network header a match reads.
#[derive(Clone, Copy)]
enum Dir {
    Source,
    Destination,
}

/// `ip[6] saddr|daddr <net>` (payload, bitwise mask, compare), preceded by the family check
/// `meta nfproto <family>` when `family_check` (an inet table sees both families).
fn addr_match(dir: Dir, net: IpNet, family_check: bool) -> Vec<Attr> {
    let net = net.trunc();
    let (proto, offset, addr, mask): (u8, u32, Vec<u8>, Vec<u8>) = match net {
        IpNet::V4(n) => (
            NFPROTO_IPV4,
            match dir {
                Dir::Source => 12,
                Dir::Destination => 16,
            },
            n.network().octets().to_vec(),
            n.netmask().octets().to_vec(),
        ),
        IpNet::V6(n) => (
            NFPROTO_IPV6,
            match dir {
                Dir::Source => 8,
                Dir::Destination => 24,
            },
            n.network().octets().to_vec(),
            n.netmask().octets().to_vec(),
        ),
    };
    let len = u32::try_from(addr.len()).unwrap_or(16);
    let mut out = Vec::new();
    if family_check {
        out.push(meta(NFT_META_NFPROTO));
        out.push(cmp(NFT_CMP_EQ, vec![proto]));
    }
    out.extend([
        expr(
            "payload",
            vec![
                be32(1, NFT_REG_1),
                be32(2, NFT_PAYLOAD_NETWORK_HEADER),
                be32(3, offset),
                be32(4, len),
            ],
        ),
        expr(
            "bitwise",
            vec![
                be32(1, NFT_REG_1),
                be32(2, NFT_REG_1),
                be32(3, len),
                data(4, mask),
                data(5, vec![0; addr.len()]),
            ],
        ),
        cmp(NFT_CMP_EQ, addr),
    ]);
    out
}

/// `meta iifname|oifname <op> <interface>` (the name padded to `IFNAMSIZ`).
fn ifname_match(key: u32, op: u32, interface: &str) -> Vec<Attr> {
    let mut ifname = interface.as_bytes().to_vec();
    ifname.resize(IFNAMSIZ, 0);
    vec![meta(key), cmp(op, ifname)]
}

/// `immediate` verdict (`accept` / `drop`).
fn verdict(code: u32) -> Attr {
    // NFTA_IMMEDIATE_DREG = 1, NFTA_IMMEDIATE_DATA = 2 { NFTA_DATA_VERDICT = 2 { NFTA_VERDICT_CODE = 1 } }.
    expr(
        "immediate",
        vec![
            be32(1, NFT_REG_VERDICT),
            Attr::Nested(2, vec![Attr::Nested(2, vec![be32(1, code)])]),
        ],
    )
}

/// The expressions of `ip[6] saddr <net> [ip[6] daddr <dest>] oifname != <interface> masquerade`
/// in an inet table (`dest` of the same family as `net`).
fn masquerade_rule(interface: &str, net: IpNet, dest: Option<IpNet>) -> Vec<Attr> {
    let mut rule = addr_match(Dir::Source, net, true);
    if let Some(dest) = dest {
        // Same family as the source (the caller pairs them): the check above covers it.
        rule.extend(addr_match(Dir::Destination, dest, false));
    }
    rule.extend(ifname_match(NFT_META_OIFNAME, NFT_CMP_NEQ, interface));
    rule.push(expr("masq", Vec::new()));
    rule
}

/// The forward-chain rule `iifname <interface> ip[6] daddr <net> accept`.
fn accept_rule(interface: &str, net: IpNet) -> Vec<Attr> {
    let mut rule = ifname_match(NFT_META_IIFNAME, NFT_CMP_EQ, interface);
    rule.extend(addr_match(Dir::Destination, net, true));
    rule.push(verdict(NF_ACCEPT));
    rule
}

/// The forward-chain rule `iifname <interface> drop`.
fn drop_rule(interface: &str) -> Vec<Attr> {
    let mut rule = ifname_match(NFT_META_IIFNAME, NFT_CMP_EQ, interface);
    rule.push(verdict(NF_DROP));
    rule
}

/// A batch of nfnetlink messages under construction.
struct Batch {
    buf: Vec<u8>,
    seq: u32,
    acks: usize,
}

impl Batch {
    fn new() -> Self {
        let mut b = Self {
            buf: Vec::new(),
            seq: 0,
            acks: 0,
        };
        b.message(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        b
    }

    fn message(&mut self, ty: u16, flags: u16, family: u8, res_id: u16, attrs: &[Attr]) {
        let start = self.buf.len();
        self.seq += 1;
        self.buf.extend_from_slice(&[0; 4]); // length, patched below
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        for a in attrs {
            a.encode(&mut self.buf);
        }
        let len = u32::try_from(self.buf.len() - start).unwrap_or(u32::MAX);
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        if flags & NLM_F_ACK != 0 {
            self.acks += 1;
        }
    }

    fn nft(&mut self, msg: u16, extra_flags: u16, attrs: &[Attr]) {
        self.message(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | NLM_F_ACK | extra_flags,
            NFPROTO_INET,
            0,
            attrs,
        );
    }

    fn finish(mut self) -> (Vec<u8>, usize) {
        self.message(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        (self.buf, self.acks)
    }
}

/// The install batch: (re)create the table; with `sources`, its NAT chain masquerading them
/// (towards `private` only, when `private` is not empty); with `private`, the forward filter
/// letting tunnel traffic reach only those networks.
/// Returns the bytes and how many acknowledgements to expect.
#[must_use]
pub fn install_batch(interface: &str, sources: &[IpNet], private: &[IpNet]) -> (Vec<u8>, usize) {
    let table = table_name(interface);
    let mut b = Batch::new();
    // Create-if-absent, delete, create: the result is a fresh table whether or not one existed.
    b.nft(NFT_MSG_NEWTABLE, NLM_F_CREATE, &[s(1, &table)]);
    b.nft(NFT_MSG_DELTABLE, 0, &[s(1, &table)]);
    b.nft(NFT_MSG_NEWTABLE, NLM_F_CREATE, &[s(1, &table)]);
    // A base chain of `kind` on `hook` at `priority`, policy accept.
    let base_chain = |b: &mut Batch, chain: &str, kind: &str, hook: u32, priority: u32| {
        b.nft(
            NFT_MSG_NEWCHAIN,
            NLM_F_CREATE,
            &[
                s(1, &table),
                s(3, chain),
                Attr::Nested(4, vec![be32(1, hook), be32(2, priority)]),
                be32(5, NF_ACCEPT),
                s(7, kind),
            ],
        );
    };
    let rule = |b: &mut Batch, chain: &str, exprs: Vec<Attr>| {
        b.nft(
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            &[s(1, &table), s(2, chain), Attr::Nested(4, exprs)],
        );
    };
    if !sources.is_empty() {
        base_chain(&mut b, CHAIN, "nat", NF_INET_POST_ROUTING, NAT_SRC_PRIORITY);
        for net in sources {
            if private.is_empty() {
                rule(&mut b, CHAIN, masquerade_rule(interface, *net, None));
            }
            for dest in private
                .iter()
                .filter(|d| d.addr().is_ipv4() == net.addr().is_ipv4())
            {
                rule(&mut b, CHAIN, masquerade_rule(interface, *net, Some(*dest)));
            }
        }
    }
    if !private.is_empty() {
        base_chain(
            &mut b,
            FORWARD_CHAIN,
            "filter",
            NF_INET_FORWARD,
            FILTER_PRIORITY,
        );
        for net in private {
            rule(&mut b, FORWARD_CHAIN, accept_rule(interface, *net));
        }
        rule(&mut b, FORWARD_CHAIN, drop_rule(interface));
    }
    b.finish()
}

/// The removal batch: delete the table.
#[must_use]
pub fn remove_batch(interface: &str) -> (Vec<u8>, usize) {
    let mut b = Batch::new();
    b.nft(NFT_MSG_DELTABLE, 0, &[s(1, &table_name(interface))]);
    b.finish()
}

/// Sends a batch and waits for every acknowledgement or the first error.
fn transact(batch: &[u8], acks: usize, op: &'static str) -> Result<()> {
    let err = |reason: String| SidecarError::Nat { op, reason };
    let mut sock = Socket::new(NETLINK_NETFILTER).map_err(|e| err(e.to_string()))?;
    sock.bind_auto().map_err(|e| err(e.to_string()))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(|e| err(e.to_string()))?;
    sock.send(batch, 0).map_err(|e| err(e.to_string()))?;
    let mut seen = 0;
    while seen < acks {
        let (buf, _) = sock.recv_from_full().map_err(|e| err(e.to_string()))?;
        let mut off = 0;
        while off + 16 <= buf.len() {
            let field = |at: usize| -> [u8; 4] {
                let mut a = [0; 4];
                a.copy_from_slice(&buf[at..at + 4]);
                a
            };
            let len = u32::from_ne_bytes(field(off)) as usize;
            let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            if len < 16 || off + len > buf.len() {
                return Err(err("malformed netlink answer".into()));
            }
            if ty == NLMSG_ERROR && len >= 20 {
                let code = i32::from_ne_bytes(field(off + 16));
                if code != 0 {
                    return Err(err(format!(
                        "kernel refused the nf_tables batch: {}",
                        std::io::Error::from_raw_os_error(-code)
                    )));
                }
                seen += 1;
            }
            off += (len + 3) & !3;
        }
    }
    Ok(())
}

/// The installed NAT table; [`Nat::remove`] deletes it.
#[derive(Debug)]
pub struct Nat {
    interface: String,
}

impl Nat {
    /// Installs (or re-installs) the table for `interface` masquerading `sources` and, when
    /// `private` is not empty, letting tunnel traffic reach only those networks.
    pub fn install(interface: &str, sources: &[IpNet], private: &[IpNet]) -> Result<Self> {
        let (batch, acks) = install_batch(interface, sources, private);
        transact(&batch, acks, "install")?;
        Ok(Self {
            interface: interface.to_owned(),
        })
    }

    /// Deletes the table.
    pub fn remove(&self) -> Result<()> {
        let (batch, acks) = remove_batch(&self.interface);
        transact(&batch, acks, "remove")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::{install_batch, remove_batch, table_name};

    /// Splits a batch into (type, flags, payload) messages.
    fn messages(buf: &[u8]) -> Vec<(u16, u16, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < buf.len() {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
            let flags = u16::from_ne_bytes(buf[off + 6..off + 8].try_into().unwrap());
            assert_eq!(len % 4, 0, "messages are 4-byte aligned");
            out.push((ty, flags, buf[off + 16..off + len].to_vec()));
            off += len;
        }
        out
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn the_install_batch_recreates_the_table_and_masquerades_each_source_range() {
        let (buf, acks) = install_batch(
            "wg0",
            &[
                "10.99.0.1/16".parse().unwrap(),
                "fd99::1/64".parse().unwrap(),
            ],
            &[],
        );
        let m = messages(&buf);
        let types: Vec<u16> = m.iter().map(|x| x.0).collect();
        // begin, newtable, deltable, newtable, newchain, 2 × newrule, end
        assert_eq!(
            types,
            vec![0x10, 0xa00, 0xa02, 0xa00, 0xa03, 0xa06, 0xa06, 0x11]
        );
        assert_eq!(
            acks, 6,
            "every nf_tables message asks for an acknowledgement"
        );
        assert!(contains(&m[1].2, b"wg_gateway_wg0\0"));
        assert!(contains(&m[4].2, b"nat\0") && contains(&m[4].2, b"postrouting\0"));
        let v4 = &m[5].2;
        assert!(contains(v4, b"masq\0") && contains(v4, b"payload\0"));
        assert!(
            contains(v4, &[10, 99, 0, 0]),
            "network, not the host address"
        );
        assert!(contains(v4, &[255, 255, 0, 0]), "prefix mask");
        assert!(
            contains(v4, b"wg0\0\0\0\0\0\0\0\0\0\0\0\0\0"),
            "oifname padded to IFNAMSIZ"
        );
        let v6 = &m[6].2;
        assert!(contains(
            v6,
            &[0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        ));
    }

    #[test]
    fn with_private_networks_the_batch_masquerades_only_towards_them_and_drops_other_tunnel_traffic(
    ) {
        let (buf, acks) = install_batch(
            "wg0",
            &[
                "10.99.0.1/16".parse().unwrap(),
                "fd99::1/64".parse().unwrap(),
            ],
            &[
                "10.20.0.9/24".parse().unwrap(),
                "172.16.0.0/12".parse().unwrap(),
                "fd20::/64".parse().unwrap(),
            ],
        );
        let m = messages(&buf);
        let types: Vec<u16> = m.iter().map(|x| x.0).collect();
        // begin, newtable, deltable, newtable, nat chain, 2 × v4 masq + 1 × v6 masq,
        // filter chain, 3 × accept, drop, end
        assert_eq!(
            types,
            vec![
                0x10, 0xa00, 0xa02, 0xa00, 0xa03, 0xa06, 0xa06, 0xa06, 0xa03, 0xa06, 0xa06, 0xa06,
                0xa06, 0x11
            ]
        );
        assert_eq!(acks, 12);
        // Masquerade: saddr at offset 12 and daddr at offset 16 (IPv4), 8 and 24 (IPv6).
        let payload_at = |offset: u32| -> Vec<u8> {
            // NFTA_PAYLOAD_OFFSET (type 3, length 8) carrying the big-endian offset.
            let mut a = vec![8, 0, 3, 0];
            a.extend_from_slice(&offset.to_be_bytes());
            a
        };
        let first = &m[5].2;
        assert!(contains(first, b"masq\0"));
        assert!(contains(first, &payload_at(12)) && contains(first, &payload_at(16)));
        assert!(contains(first, &[10, 99, 0, 0]) && contains(first, &[10, 20, 0, 0]));
        assert!(contains(first, &[255, 255, 255, 0]), "the /24 mask");
        assert!(contains(&m[6].2, &[172, 16, 0, 0]) && contains(&m[6].2, &[255, 240, 0, 0]));
        let v6 = &m[7].2;
        assert!(contains(v6, &payload_at(8)) && contains(v6, &payload_at(24)));
        assert!(contains(
            v6,
            &[0xfd, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        ));
        assert!(
            !contains(v6, &[10, 20, 0, 0]),
            "no pair across address families"
        );
        // The filter chain: forward hook (2), priority 0, policy accept, type filter.
        let chain = &m[8].2;
        assert!(contains(chain, b"forward\0") && contains(chain, b"filter\0"));
        assert!(contains(chain, &[8, 0, 1, 0, 0, 0, 0, 2]), "hook forward");
        assert!(contains(chain, &[8, 0, 2, 0, 0, 0, 0, 0]), "priority 0");
        let iif = b"wg0\0\0\0\0\0\0\0\0\0\0\0\0\0";
        // NFTA_DATA_VERDICT nest { NFTA_VERDICT_CODE = NF_ACCEPT (1) / NF_DROP (0) }.
        let accept = [12, 0, 2, 0x80, 8, 0, 1, 0, 0, 0, 0, 1];
        let drop = [12, 0, 2, 0x80, 8, 0, 1, 0, 0, 0, 0, 0];
        for (i, net) in [(9, &[10, 20, 0, 0][..]), (10, &[172, 16, 0, 0][..])] {
            let r = &m[i].2;
            assert!(contains(r, b"forward\0") && contains(r, b"immediate\0"));
            assert!(contains(r, iif) && contains(r, &payload_at(16)) && contains(r, net));
            assert!(contains(r, &accept) && !contains(r, &drop) && !contains(r, b"masq\0"));
        }
        assert!(contains(&m[11].2, &payload_at(24)));
        let last = &m[12].2;
        assert!(contains(last, iif) && contains(last, &drop) && !contains(last, &accept));
        assert!(
            !contains(last, b"payload\0"),
            "the drop matches every destination"
        );
    }

    #[test]
    fn with_masquerading_off_and_private_networks_only_the_filter_chain_is_installed() {
        let (buf, _) = install_batch("wg0", &[], &["10.20.0.0/24".parse().unwrap()]);
        let m = messages(&buf);
        let types: Vec<u16> = m.iter().map(|x| x.0).collect();
        assert_eq!(
            types,
            vec![0x10, 0xa00, 0xa02, 0xa00, 0xa03, 0xa06, 0xa06, 0x11]
        );
        assert!(contains(&m[4].2, b"filter\0") && !contains(&buf, b"masq\0"));
    }

    #[test]
    fn the_remove_batch_only_deletes_its_own_table() {
        let (buf, acks) = remove_batch("wg-gw.0");
        let m = messages(&buf);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].0, 0xa02);
        assert!(contains(&m[1].2, b"wg_gateway_wg_gw_0\0"));
        assert_eq!(acks, 1);
    }

    #[test]
    fn table_names_only_hold_safe_characters() {
        assert_eq!(table_name("wg-gw.0"), "wg_gateway_wg_gw_0");
    }
}
