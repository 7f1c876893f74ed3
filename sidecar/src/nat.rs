//! The gateway's forwarding and masquerading: IP forwarding sysctls and one nftables table,
//! written over netfilter netlink (no `nft` binary: the gateway image is `FROM scratch`).
//!
//! Owns: the pure encoding of one `nf_tables` batch (table `inet wg_gateway_<interface>`, a NAT
//! postrouting chain, one rule per tunnel source range: `ip[6] saddr <pool> oifname != <wg>
//! masquerade`), sending it and reading the kernel's acknowledgements, deleting the table, and
//! turning on IP forwarding in the gateway's network namespace.
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
const NF_INET_POST_ROUTING: u32 = 4;
const NF_ACCEPT: u32 = 1;
const NAT_SRC_PRIORITY: u32 = 100;
const NFT_REG_1: u32 = 1;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_NFPROTO: u32 = 15;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const IFNAMSIZ: usize = 16;
const CHAIN: &str = "postrouting";

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

/// The expressions of `ip[6] saddr <net> oifname != <interface> masquerade` in an inet table.
fn masquerade_rule(interface: &str, net: IpNet) -> Vec<Attr> {
    let net = net.trunc();
    let (proto, offset, addr, mask): (u8, u32, Vec<u8>, Vec<u8>) = match net {
        IpNet::V4(n) => (
            NFPROTO_IPV4,
            12,
            n.network().octets().to_vec(),
            n.netmask().octets().to_vec(),
        ),
        IpNet::V6(n) => (
            NFPROTO_IPV6,
            8,
            n.network().octets().to_vec(),
            n.netmask().octets().to_vec(),
        ),
    };
    let len = u32::try_from(addr.len()).unwrap_or(16);
    let mut ifname = interface.as_bytes().to_vec();
    ifname.resize(IFNAMSIZ, 0);
    vec![
        meta(NFT_META_NFPROTO),
        cmp(NFT_CMP_EQ, vec![proto]),
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
        meta(NFT_META_OIFNAME),
        cmp(NFT_CMP_NEQ, ifname),
        expr("masq", Vec::new()),
    ]
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

/// The install batch: (re)create the table, its NAT chain and one rule per source range.
/// Returns the bytes and how many acknowledgements to expect.
#[must_use]
pub fn install_batch(interface: &str, sources: &[IpNet]) -> (Vec<u8>, usize) {
    let table = table_name(interface);
    let mut b = Batch::new();
    // Create-if-absent, delete, create: the result is a fresh table whether or not one existed.
    b.nft(NFT_MSG_NEWTABLE, NLM_F_CREATE, &[s(1, &table)]);
    b.nft(NFT_MSG_DELTABLE, 0, &[s(1, &table)]);
    b.nft(NFT_MSG_NEWTABLE, NLM_F_CREATE, &[s(1, &table)]);
    b.nft(
        NFT_MSG_NEWCHAIN,
        NLM_F_CREATE,
        &[
            s(1, &table),
            s(3, CHAIN),
            Attr::Nested(
                4,
                vec![be32(1, NF_INET_POST_ROUTING), be32(2, NAT_SRC_PRIORITY)],
            ),
            be32(5, NF_ACCEPT),
            s(7, "nat"),
        ],
    );
    for net in sources {
        b.nft(
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            &[
                s(1, &table),
                s(2, CHAIN),
                Attr::Nested(4, masquerade_rule(interface, *net)),
            ],
        );
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
    /// Installs (or re-installs) the table for `interface` masquerading `sources`.
    pub fn install(interface: &str, sources: &[IpNet]) -> Result<Self> {
        let (batch, acks) = install_batch(interface, sources);
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

/// Turns on IPv4 (and with `ipv6`, IPv6) forwarding in this network namespace.
pub fn enable_forwarding(ipv6: bool) -> Result<()> {
    let mut files = vec!["/proc/sys/net/ipv4/ip_forward"];
    if ipv6 {
        files.push("/proc/sys/net/ipv6/conf/all/forwarding");
    }
    for f in files {
        let current = std::fs::read_to_string(f).unwrap_or_default();
        if current.trim() == "1" {
            continue;
        }
        std::fs::write(f, "1").map_err(|e| SidecarError::Nat {
            op: "enable forwarding for",
            reason: format!(
                "{f}: {e} (set the sysctl in the Pod spec, or run with NET_ADMIN and a writable /proc/sys)"
            ),
        })?;
    }
    Ok(())
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
