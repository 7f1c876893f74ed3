//! The gateway's masquerading, forward filter and per-peer egress: one nftables table, written
//! over netfilter netlink (no `nft` binary: the gateway image is `FROM scratch`). Turning IP
//! forwarding on is [`crate::forwarding`]'s job; what a Pod may reach is [`crate::policy`]'s.
//!
//! Owns: the pure encoding of `nf_tables` batches for table `inet wg_gateway_<interface>`, sending
//! them and reading the kernel's answers, and a mirror of what the per-peer part holds. Layout:
//!
//! ```text
//! chain postrouting { type nat hook postrouting priority 100;      # only with masquerade sources
//!   ip[6] saddr <pool> [ip[6] daddr <net>] oifname != <wg> masquerade }   # per (pool, network)
//! chain forward { type filter hook forward priority 0; policy accept;
//!   iifname <wg> ip[6] daddr <net> jump tunnel                      # per gateway network
//!   iifname <wg> counter name dropped_outside_networks drop }       # closed by default
//! chain tunnel {                                                    # destination is in a network
//!   meta nfproto ipv4 ip saddr vmap @peers                          # peer address → jump peer_<id>
//!   meta nfproto ipv6 ip6 saddr vmap @peers6
//!   accept | counter name dropped_policy drop }                     # peers without a policy
//! map peers  { type ipv4_addr : verdict }                           # hash, flat cost per packet
//! map peers6 { type ipv6_addr : verdict }
//! chain peer_<id> {                                                 # one per peer with a policy
//!   [ip[6] daddr <block>] [meta l4proto <p> [th dport <first>-<last>]] accept | jump peer_<id>_x<n>
//!   …
//!   counter name dropped_policy drop }
//! chain peer_<id>_x<n> { ip[6] daddr <except> return; …; accept }   # a block with exceptions
//! counter dropped_outside_networks, counter dropped_policy          # read by Nat::drop_counters
//! ```
//!
//! Tunnel traffic (`iifname <wg>`) is only ever forwarded into the gateway's networks: with none,
//! nothing is; peer to peer (back out of `<wg>`) only when the destination is in a network. Inside
//! the networks a peer with a chain gets exactly its rules; one without gets the `tunnel` default.
//! The filter is stateless (no conntrack): a policy change applies to the next packet.
//!
//! Must never: touch any table but its own; leave a half-applied transaction (every batch is one
//! `nf_tables` transaction, all or nothing); let a peer reach more than its policy says (a
//! peer's map entry only ever points at its complete chain: it is added after the chain is filled
//! and removed before the chain is deleted, in the same transaction).
//!
//! Why hand-encoded netlink and not a crate or the `nft` tool: `nftnl` binds the C libnftnl and
//! `rustables` needs bindgen at build time; `nft` is a dynamically linked program with five
//! libraries the scratch image does not have. The ruleset is a handful of expression kinds, and
//! `netlink-sys` (already in the tree through `rtnetlink`) gives the socket. The end-to-end tests
//! (`tests/policy_enforcement.rs`) check the result with the real `nft -j list` and real traffic.
//!
//! Only the last message of a batch asks for an acknowledgement: the kernel reports every failing
//! message anyway, and 100 000 acknowledgements would overflow the socket's receive buffer. A
//! batch must fit the socket's send buffer (`net.core.wmem_default`, 208 KiB by default; the
//! gateway forces 8 MiB with `CAP_NET_ADMIN`, so a first write of 10 000 peers is a few commits),
//! so [`Nat::set_peer_policies`] splits a larger call at peer boundaries ([`Nat::transaction_budget`]):
//! each transaction holds whole peers, and the mirror only advances with committed ones.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::{
    error::{Result, SidecarError},
    policy::{Allow, Egress, Ports, Protocol},
};

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
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWOBJ: u16 = 18;
const NFT_MSG_GETOBJ: u16 = 19;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NF_INET_FORWARD: u32 = 2;
const NF_INET_POST_ROUTING: u32 = 4;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
// Negative verdicts as the kernel reads them (`int` in a be32 attribute).
const NFT_JUMP: u32 = 0xffff_fffd; // -3
const NFT_RETURN: u32 = 0xffff_fffb; // -5
const NAT_SRC_PRIORITY: u32 = 100;
const FILTER_PRIORITY: u32 = 0;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_RANGE_EQ: u32 = 0;
const NFT_SET_MAP: u32 = 0x8;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
// nft's own key type ids (nftables `enum datatypes`), stored by the kernel for `nft list`.
const NFT_TYPE_IPADDR: u32 = 7;
const NFT_TYPE_IP6ADDR: u32 = 8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const IFNAMSIZ: usize = 16;
/// `NFT_CHAIN_MAXNAMELEN`, the terminating NUL included.
const CHAIN_NAME_MAX: usize = 256;
/// Elements per set-element message: a netlink attribute holds at most 64 KiB.
const ELEMENTS_PER_MESSAGE: usize = 256;
const CHAIN: &str = "postrouting";
const FORWARD_CHAIN: &str = "forward";
const TUNNEL_CHAIN: &str = "tunnel";
const PEERS_V4: &str = "peers";
const PEERS_V6: &str = "peers6";
/// Named counter of tunnel packets dropped for a destination outside the gateway's networks.
const DROPPED_OUTSIDE: &str = "dropped_outside_networks";
/// Named counter of tunnel packets dropped by a peer's egress chain or `default_deny`.
const DROPPED_POLICY: &str = "dropped_policy";

/// The largest batch [`Nat::set_peer_policies`] sends as one transaction when the socket keeps
/// the kernel's default send buffer (212 992 bytes minus overhead).
pub const MAX_TRANSACTION_BYTES: usize = 200 * 1024;
/// The send buffer asked for with `SO_SNDBUFFORCE` (`CAP_NET_ADMIN`, which the gateway has): a
/// larger batch is fewer commits, and each commit that adds a rule re-validates every chain
/// (about 30 ms at 10 000 peers), so the first write of 10 000 peers' chains takes a few
/// commits instead of hundreds.
const LARGE_SEND_BUFFER: usize = 8 << 20;
/// The largest transaction with the large buffer (the kernel refuses a message longer than the
/// buffer minus 32 bytes; it reports twice the size asked for, so this leaves room).
const LARGE_TRANSACTION_BYTES: usize = 8 << 20;

/// The nftables table name for `interface` (only `[A-Za-z0-9_]`).
#[must_use]
pub fn table_name(interface: &str) -> String {
    let clean: String = interface
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("wg_gateway_{clean}")
}

/// A peer's tunnel addresses (its WireGuard allowed IPs, which are host addresses): the keys of
/// its map entries. The first names its chains.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerAddresses(Vec<IpAddr>);

impl PeerAddresses {
    /// The addresses, duplicates dropped, in order; `None` when there are none.
    #[must_use]
    pub fn new(addresses: impl IntoIterator<Item = IpAddr>) -> Option<Self> {
        let mut out: Vec<IpAddr> = Vec::new();
        for a in addresses {
            if !out.contains(&a) {
                out.push(a);
            }
        }
        (!out.is_empty()).then_some(Self(out))
    }

    /// From a peer's allowed IPs; `None` when there are none or one is not a host prefix (a map
    /// keyed by address cannot hold a range, and leaving part of it out would widen the peer's
    /// egress to the `tunnel` default).
    #[must_use]
    pub fn from_allowed_ips(allowed_ips: &[IpNet]) -> Option<Self> {
        if allowed_ips
            .iter()
            .any(|n| n.prefix_len() != n.max_prefix_len())
        {
            return None;
        }
        Self::new(allowed_ips.iter().map(IpNet::addr))
    }

    /// The addresses.
    #[must_use]
    pub fn addresses(&self) -> &[IpAddr] {
        &self.0
    }

    /// The peer's chain: `peer_` and its first address with `.` and `:` as `_`
    /// (`peer_10_203_0_2`, `peer_fd00__2`); at most 45 bytes, distinct for distinct addresses.
    #[must_use]
    pub fn chain(&self) -> String {
        format!("peer_{}", address_id(self.0[0]))
    }
}

/// `10.203.0.2` → `10_203_0_2`, `fd00::2` → `fd00__2`. The canonical IPv6 text only uses dots
/// for IPv4-mapped addresses; those are written as eight uncompressed groups, which no canonical
/// text has, so the mapping stays one to one.
fn address_id(a: IpAddr) -> String {
    match a {
        IpAddr::V4(v4) => v4.to_string().replace('.', "_"),
        IpAddr::V6(v6) => {
            let text = v6.to_string();
            if text.contains('.') {
                v6.segments()
                    .iter()
                    .map(|g| format!("{g:x}"))
                    .collect::<Vec<_>>()
                    .join("_")
            } else {
                text.replace(':', "_")
            }
        }
    }
}

/// The chain of exception list `n` of peer chain `chain` (`x` is in no peer chain name).
fn except_chain(chain: &str, n: usize) -> String {
    let name = format!("{chain}_x{n}");
    debug_assert!(
        name.len() < CHAIN_NAME_MAX,
        "{name} is too long for nftables"
    );
    name
}

/// One rule of a peer chain: destination and ports, then accept or the exception chain.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerRule {
    /// `None`: any destination (the networks bound it already).
    to: Option<IpNet>,
    /// `None`: any protocol and port.
    ports: Option<Ports>,
    /// Index into [`PeerChains::excepts`]: jump there instead of accepting.
    except: Option<usize>,
}

/// What a peer's chains hold (the final `drop` and each exception chain's `accept` implied).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PeerChains {
    rules: Vec<PeerRule>,
    excepts: Vec<Vec<IpNet>>,
}

impl PeerChains {
    /// One rule per (allow, block, ports); blocks with the same exceptions share a chain.
    fn compile(allows: &[Allow]) -> Self {
        let mut c = Self::default();
        for allow in allows {
            let blocks: Vec<(Option<IpNet>, &[IpNet])> = match &allow.to {
                None => vec![(None, &[])],
                Some(blocks) => blocks
                    .iter()
                    .map(|b| (Some(b.cidr.trunc()), b.except.as_slice()))
                    .collect(),
            };
            let ports: Vec<Option<Ports>> = match &allow.ports {
                None => vec![None],
                Some(list) => list.iter().copied().map(Some).collect(),
            };
            for (to, except) in blocks {
                let except = (!except.is_empty()).then(|| {
                    let list: Vec<IpNet> = except.iter().map(IpNet::trunc).collect();
                    if let Some(i) = c.excepts.iter().position(|e| *e == list) {
                        i
                    } else {
                        c.excepts.push(list);
                        c.excepts.len() - 1
                    }
                });
                for p in &ports {
                    c.rules.push(PeerRule {
                        to,
                        ports: *p,
                        except,
                    });
                }
            }
        }
        c
    }

    /// Rules in the kernel: the peer chain's and its drop, each exception chain's and its accept.
    fn kernel_rules(&self) -> usize {
        self.rules.len() + 1 + self.excepts.iter().map(|e| e.len() + 1).sum::<usize>()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct InstalledPeer {
    addresses: Vec<IpAddr>,
    chains: PeerChains,
}

/// What the per-peer part of the table holds, as written: chains by name and map entries by
/// address. [`peer_policy_batch`] reads one and returns the [`PeerDelta`] its transaction makes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerFilters {
    peers: BTreeMap<String, InstalledPeer>,
    owner: HashMap<IpAddr, String>,
}

impl PeerFilters {
    /// Peers with a chain (peers with a policy).
    #[must_use]
    pub fn peers(&self) -> usize {
        self.peers.len()
    }

    /// Rules in the peer chains (their final verdicts included).
    #[must_use]
    pub fn rules(&self) -> usize {
        self.peers.values().map(|p| p.chains.kernel_rules()).sum()
    }

    /// Entries of the two verdict maps.
    #[must_use]
    pub fn map_entries(&self) -> usize {
        self.owner.len()
    }

    /// True when a chain for `chain` is installed.
    #[must_use]
    pub fn has_peer(&self, chain: &str) -> bool {
        self.peers.contains_key(chain)
    }

    /// Records a committed transaction's changes.
    pub fn apply(&mut self, delta: PeerDelta) {
        for (chain, peer) in delta.peers {
            match peer {
                Some(p) => self.peers.insert(chain, p),
                None => self.peers.remove(&chain),
            };
        }
        for (a, chain) in delta.owner {
            match chain {
                Some(c) => self.owner.insert(a, c),
                None => self.owner.remove(&a),
            };
        }
    }
}

/// The changes one [`peer_policy_batch`] transaction makes to a [`PeerFilters`] (`None`: gone).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerDelta {
    peers: HashMap<String, Option<InstalledPeer>>,
    owner: HashMap<IpAddr, Option<String>>,
}

/// A [`PeerFilters`] as a batch under construction leaves it: the base, the delta over it, and
/// what the delta held before each write (to take the last change back out).
struct View<'a> {
    base: &'a PeerFilters,
    delta: PeerDelta,
    undo: Vec<Undo>,
}

/// A delta entry as it was before a write.
enum Undo {
    Peer(String, Prior<InstalledPeer>),
    Owner(IpAddr, Prior<String>),
}

/// A delta entry's earlier state.
enum Prior<T> {
    /// The delta had no entry (the base applied).
    Absent,
    /// The delta held this.
    Held(Option<T>),
}

impl<T> From<Option<Option<T>>> for Prior<T> {
    fn from(v: Option<Option<T>>) -> Self {
        v.map_or(Self::Absent, Self::Held)
    }
}

impl View<'_> {
    fn peer(&self, chain: &str) -> Option<&InstalledPeer> {
        match self.delta.peers.get(chain) {
            Some(p) => p.as_ref(),
            None => self.base.peers.get(chain),
        }
    }

    fn owner(&self, a: &IpAddr) -> Option<&String> {
        match self.delta.owner.get(a) {
            Some(c) => c.as_ref(),
            None => self.base.owner.get(a),
        }
    }

    fn set_peer(&mut self, chain: &str, peer: Option<InstalledPeer>) {
        let before = self.delta.peers.insert(chain.to_owned(), peer).into();
        self.undo.push(Undo::Peer(chain.to_owned(), before));
    }

    fn set_owner(&mut self, a: IpAddr, chain: Option<&str>) {
        let before = self.delta.owner.insert(a, chain.map(str::to_owned)).into();
        self.undo.push(Undo::Owner(a, before));
    }

    /// Takes every write after `mark` (a length of the undo log) back.
    fn rollback(&mut self, mark: usize) {
        while self.undo.len() > mark {
            match self.undo.pop() {
                Some(Undo::Peer(chain, Prior::Held(before))) => {
                    self.delta.peers.insert(chain, before);
                }
                Some(Undo::Peer(chain, Prior::Absent)) => {
                    self.delta.peers.remove(&chain);
                }
                Some(Undo::Owner(a, Prior::Held(before))) => {
                    self.delta.owner.insert(a, before);
                }
                Some(Undo::Owner(a, Prior::Absent)) => {
                    self.delta.owner.remove(&a);
                }
                None => {}
            }
        }
    }
}

/// The size of the ruleset, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleCounts {
    /// Rules of the `postrouting`, `forward` and `tunnel` chains.
    pub base_rules: usize,
    /// Peers with a chain of their own (an egress policy).
    pub peers: usize,
    /// Rules in the peer chains.
    pub peer_rules: usize,
    /// Entries of the verdict maps (peer addresses).
    pub map_entries: usize,
}

/// What one [`Nat::set_peer_policies`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyUpdate {
    /// Peers whose chain or map entries were (re)written.
    pub written: usize,
    /// Peers whose chain and entries were removed.
    pub removed: usize,
    /// Peers left as they were (nothing changed).
    pub untouched: usize,
    /// `nf_tables` transactions sent (0 when nothing changed).
    pub transactions: usize,
}

impl PolicyUpdate {
    fn add(&mut self, o: Self) {
        self.written += o.written;
        self.removed += o.removed;
        self.untouched += o.untouched;
        self.transactions += o.transactions;
    }
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

/// `payload load <len>b @ <base> + <offset> => reg 1`.
fn payload(base: u32, offset: u32, len: u32) -> Attr {
    expr(
        "payload",
        vec![
            be32(1, NFT_REG_1),
            be32(2, base),
            be32(3, offset),
            be32(4, len),
        ],
    )
}

/// Which address of the network header a match reads.
#[derive(Clone, Copy)]
enum Dir {
    Source,
    Destination,
}

/// The family, header offset and length of an address field.
fn address_field(v4: bool, dir: Dir) -> (u8, u32, u32) {
    match (v4, dir) {
        (true, Dir::Source) => (NFPROTO_IPV4, 12, 4),
        (true, Dir::Destination) => (NFPROTO_IPV4, 16, 4),
        (false, Dir::Source) => (NFPROTO_IPV6, 8, 16),
        (false, Dir::Destination) => (NFPROTO_IPV6, 24, 16),
    }
}

/// `meta nfproto <family>` (an inet table sees both families).
fn family_match(proto: u8) -> Vec<Attr> {
    vec![meta(NFT_META_NFPROTO), cmp(NFT_CMP_EQ, vec![proto])]
}

/// `ip[6] saddr|daddr <net>` (payload, bitwise mask unless a host, compare; nothing for /0),
/// preceded by the family check when `family_check`.
fn addr_match(dir: Dir, net: IpNet, family_check: bool) -> Vec<Attr> {
    let net = net.trunc();
    let (proto, offset, len) = address_field(net.addr().is_ipv4(), dir);
    let (addr, mask): (Vec<u8>, Vec<u8>) = match net {
        IpNet::V4(n) => (n.network().octets().to_vec(), n.netmask().octets().to_vec()),
        IpNet::V6(n) => (n.network().octets().to_vec(), n.netmask().octets().to_vec()),
    };
    let mut out = Vec::new();
    if family_check {
        out.extend(family_match(proto));
    }
    if net.prefix_len() == 0 {
        return out;
    }
    out.push(payload(NFT_PAYLOAD_NETWORK_HEADER, offset, len));
    if net.prefix_len() != net.max_prefix_len() {
        out.push(expr(
            "bitwise",
            vec![
                be32(1, NFT_REG_1),
                be32(2, NFT_REG_1),
                be32(3, len),
                data(4, mask),
                data(5, vec![0; addr.len()]),
            ],
        ));
    }
    out.push(cmp(NFT_CMP_EQ, addr));
    out
}

/// `meta l4proto <protocol> [th dport <first>[-<last>]]`.
fn ports_match(p: Ports) -> Vec<Attr> {
    let proto = match p.protocol {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    };
    let mut out = vec![meta(NFT_META_L4PROTO), cmp(NFT_CMP_EQ, vec![proto])];
    if (p.first, p.last) == (0, u16::MAX) {
        return out;
    }
    // The destination port: 2 bytes at offset 2 of the TCP, UDP and SCTP headers.
    out.push(payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2));
    if p.first == p.last {
        out.push(cmp(NFT_CMP_EQ, p.first.to_be_bytes().to_vec()));
    } else {
        out.push(expr(
            "range",
            vec![
                be32(1, NFT_REG_1),
                be32(2, NFT_RANGE_EQ),
                data(3, p.first.to_be_bytes().to_vec()),
                data(4, p.last.to_be_bytes().to_vec()),
            ],
        ));
    }
    out
}

/// `meta iifname|oifname <op> <interface>` (the name padded to `IFNAMSIZ`).
fn ifname_match(key: u32, op: u32, interface: &str) -> Vec<Attr> {
    let mut ifname = interface.as_bytes().to_vec();
    ifname.resize(IFNAMSIZ, 0);
    vec![meta(key), cmp(op, ifname)]
}

/// A verdict.
#[derive(Clone, Copy)]
enum Verdict<'a> {
    Accept,
    Drop,
    Return,
    Jump(&'a str),
}

/// `NFTA_DATA_VERDICT { NFTA_VERDICT_CODE [, NFTA_VERDICT_CHAIN] }` inside attribute `ty`.
fn verdict_data(ty: u16, v: Verdict) -> Attr {
    let inner = match v {
        Verdict::Accept => vec![be32(1, NF_ACCEPT)],
        Verdict::Drop => vec![be32(1, NF_DROP)],
        Verdict::Return => vec![be32(1, NFT_RETURN)],
        Verdict::Jump(chain) => vec![be32(1, NFT_JUMP), s(2, chain)],
    };
    Attr::Nested(ty, vec![Attr::Nested(2, inner)])
}

/// `immediate` verdict.
fn verdict(v: Verdict) -> Attr {
    // NFTA_IMMEDIATE_DREG = 1, NFTA_IMMEDIATE_DATA = 2.
    expr(
        "immediate",
        vec![be32(1, NFT_REG_VERDICT), verdict_data(2, v)],
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

/// The forward-chain rule `iifname <interface> ip[6] daddr <net> jump tunnel`.
fn network_rule(interface: &str, net: IpNet) -> Vec<Attr> {
    let mut rule = ifname_match(NFT_META_IIFNAME, NFT_CMP_EQ, interface);
    rule.extend(addr_match(Dir::Destination, net, true));
    rule.push(verdict(Verdict::Jump(TUNNEL_CHAIN)));
    rule
}

/// The forward-chain rule `iifname <interface> counter name dropped_outside_networks drop`.
fn drop_rule(interface: &str) -> Vec<Attr> {
    let mut rule = ifname_match(NFT_META_IIFNAME, NFT_CMP_EQ, interface);
    rule.extend(counted_drop(DROPPED_OUTSIDE));
    rule
}

/// `counter name <counter> drop`: the named counter object's `objref`, then the verdict.
fn counted_drop(counter: &str) -> Vec<Attr> {
    // NFTA_OBJREF_IMM_TYPE = 1, NFTA_OBJREF_IMM_NAME = 2.
    vec![
        expr("objref", vec![be32(1, NFT_OBJECT_COUNTER), s(2, counter)]),
        verdict(Verdict::Drop),
    ]
}

/// The tunnel-chain rule `meta nfproto ipv4 ip saddr vmap @peers` (`ip6 … @peers6`).
fn vmap_rule(v4: bool) -> Vec<Attr> {
    let (proto, offset, len) = address_field(v4, Dir::Source);
    let mut rule = family_match(proto);
    rule.push(payload(NFT_PAYLOAD_NETWORK_HEADER, offset, len));
    // NFTA_LOOKUP_SET = 1, NFTA_LOOKUP_SREG = 2, NFTA_LOOKUP_DREG = 3, NFTA_LOOKUP_SET_ID = 4.
    rule.push(expr(
        "lookup",
        vec![
            s(1, if v4 { PEERS_V4 } else { PEERS_V6 }),
            be32(2, NFT_REG_1),
            be32(3, NFT_REG_VERDICT),
            be32(4, set_id(v4)),
        ],
    ));
    rule
}

fn set_id(v4: bool) -> u32 {
    if v4 {
        1
    } else {
        2
    }
}

/// An encoded `nf_tables` transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// The batch: begin, the `nf_tables` messages, end.
    pub bytes: Vec<u8>,
    /// How many `nf_tables` messages it holds (begin and end not counted).
    pub messages: usize,
    /// The sequence number of the last message, the only one asking for an acknowledgement.
    ack_seq: Option<u32>,
}

/// A batch of nfnetlink messages under construction.
struct Batch {
    buf: Vec<u8>,
    seq: u32,
    messages: usize,
    last: Option<usize>,
    table: String,
}

impl Batch {
    fn new(interface: &str) -> Self {
        let mut b = Self {
            buf: Vec::new(),
            seq: 0,
            messages: 0,
            last: None,
            table: table_name(interface),
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
    }

    fn nft(&mut self, msg: u16, extra_flags: u16, attrs: &[Attr]) {
        self.last = Some(self.buf.len());
        self.messages += 1;
        self.message(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | extra_flags,
            NFPROTO_INET,
            0,
            attrs,
        );
    }

    fn table_message(&mut self, msg: u16, flags: u16) {
        let t = s(1, &self.table);
        self.nft(msg, flags, &[t]);
    }

    /// A base chain of `kind` on `hook` at `priority`, policy accept.
    fn base_chain(&mut self, chain: &str, kind: &str, hook: u32, priority: u32) {
        let attrs = [
            s(1, &self.table),
            s(3, chain),
            Attr::Nested(4, vec![be32(1, hook), be32(2, priority)]),
            be32(5, NF_ACCEPT),
            s(7, kind),
        ];
        self.nft(NFT_MSG_NEWCHAIN, NLM_F_CREATE, &attrs);
    }

    /// A named counter object (`counter <name>`), referenced by drop rules.
    fn counter(&mut self, name: &str) {
        // NFTA_OBJ_TABLE = 1, _NAME = 2, _TYPE = 3, _DATA = 4 (required; empty: from zero).
        let attrs = [
            s(1, &self.table),
            s(2, name),
            be32(3, NFT_OBJECT_COUNTER),
            Attr::Nested(4, Vec::new()),
        ];
        self.nft(NFT_MSG_NEWOBJ, NLM_F_CREATE, &attrs);
    }

    /// A regular chain (a jump target).
    fn chain(&mut self, chain: &str) {
        let attrs = [s(1, &self.table), s(3, chain)];
        self.nft(NFT_MSG_NEWCHAIN, NLM_F_CREATE, &attrs);
    }

    /// Deletes a chain and its rules (nothing may point at it any more).
    fn delete_chain(&mut self, chain: &str) {
        let attrs = [s(1, &self.table), s(3, chain)];
        self.nft(NFT_MSG_DELCHAIN, 0, &attrs);
    }

    /// Deletes every rule of a chain (`flush chain`).
    fn flush_chain(&mut self, chain: &str) {
        let attrs = [s(1, &self.table), s(2, chain)];
        self.nft(NFT_MSG_DELRULE, 0, &attrs);
    }

    fn rule(&mut self, chain: &str, exprs: Vec<Attr>) {
        let attrs = [s(1, &self.table), s(2, chain), Attr::Nested(4, exprs)];
        self.nft(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, &attrs);
    }

    /// A verdict map keyed by IPv4 or IPv6 address.
    fn verdict_map(&mut self, v4: bool) {
        let attrs = [
            s(1, &self.table),
            s(2, if v4 { PEERS_V4 } else { PEERS_V6 }),
            be32(3, NFT_SET_MAP),
            be32(
                4,
                if v4 {
                    NFT_TYPE_IPADDR
                } else {
                    NFT_TYPE_IP6ADDR
                },
            ),
            be32(5, if v4 { 4 } else { 16 }),
            be32(6, NFT_DATA_VERDICT),
            be32(10, set_id(v4)),
        ];
        self.nft(NFT_MSG_NEWSET, NLM_F_CREATE, &attrs);
    }

    /// Adds (`Some(chain)`: `address : jump chain`) or deletes (`None`) map entries, one
    /// message per family and [`ELEMENTS_PER_MESSAGE`].
    fn map_entries(&mut self, addresses: &[IpAddr], jump: Option<&str>) {
        for v4 in [true, false] {
            let keys: Vec<&IpAddr> = addresses.iter().filter(|a| a.is_ipv4() == v4).collect();
            for part in keys.chunks(ELEMENTS_PER_MESSAGE) {
                let elements = part
                    .iter()
                    .map(|a| {
                        let key = match a {
                            IpAddr::V4(a) => a.octets().to_vec(),
                            IpAddr::V6(a) => a.octets().to_vec(),
                        };
                        // NFTA_SET_ELEM_KEY = 1, NFTA_SET_ELEM_DATA = 2.
                        let mut e = vec![data(1, key)];
                        if let Some(chain) = jump {
                            e.push(verdict_data(2, Verdict::Jump(chain)));
                        }
                        Attr::Nested(1, e)
                    })
                    .collect();
                // NFTA_SET_ELEM_LIST_TABLE = 1, _SET = 2, _ELEMENTS = 3.
                let attrs = [
                    s(1, &self.table),
                    s(2, if v4 { PEERS_V4 } else { PEERS_V6 }),
                    Attr::Nested(3, elements),
                ];
                match jump {
                    Some(_) => self.nft(NFT_MSG_NEWSETELEM, NLM_F_CREATE, &attrs),
                    None => self.nft(NFT_MSG_DELSETELEM, 0, &attrs),
                }
            }
        }
    }

    /// Where the batch stands, for [`Batch::rollback`].
    fn mark(&self) -> (usize, u32, usize, Option<usize>) {
        (self.buf.len(), self.seq, self.messages, self.last)
    }

    /// Drops every message after `mark`.
    fn rollback(&mut self, mark: (usize, u32, usize, Option<usize>)) {
        self.buf.truncate(mark.0);
        (self.seq, self.messages, self.last) = (mark.1, mark.2, mark.3);
    }

    /// The length of the batch once finished (the end message is 20 bytes).
    fn len_finished(&self) -> usize {
        self.buf.len() + 20
    }

    fn finish(mut self) -> Transaction {
        let ack_seq = self.last.map(|at| {
            let flags = u16::from_ne_bytes([self.buf[at + 6], self.buf[at + 7]]) | NLM_F_ACK;
            self.buf[at + 6..at + 8].copy_from_slice(&flags.to_ne_bytes());
            u32::from_ne_bytes([
                self.buf[at + 8],
                self.buf[at + 9],
                self.buf[at + 10],
                self.buf[at + 11],
            ])
        });
        self.message(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        Transaction {
            bytes: self.buf,
            messages: self.messages,
            ack_seq,
        }
    }
}

/// The install batch: (re)create the table; with `sources`, its NAT chain masquerading them
/// (towards `networks` only, when there are any); always the forward filter, which lets tunnel
/// traffic into `networks` through the `tunnel` chain and drops the rest, the two verdict maps,
/// and the `tunnel` chain whose last rule is `drop` with `default_deny`, else `accept`.
#[must_use]
pub fn install_batch(
    interface: &str,
    sources: &[IpNet],
    networks: &[IpNet],
    default_deny: bool,
) -> Transaction {
    let mut b = Batch::new(interface);
    // Create-if-absent, delete, create: the result is a fresh table whether or not one existed.
    b.table_message(NFT_MSG_NEWTABLE, NLM_F_CREATE);
    b.table_message(NFT_MSG_DELTABLE, 0);
    b.table_message(NFT_MSG_NEWTABLE, NLM_F_CREATE);
    b.counter(DROPPED_OUTSIDE);
    b.counter(DROPPED_POLICY);
    if !sources.is_empty() {
        b.base_chain(CHAIN, "nat", NF_INET_POST_ROUTING, NAT_SRC_PRIORITY);
        for net in sources {
            if networks.is_empty() {
                b.rule(CHAIN, masquerade_rule(interface, *net, None));
            }
            for dest in networks
                .iter()
                .filter(|d| d.addr().is_ipv4() == net.addr().is_ipv4())
            {
                b.rule(CHAIN, masquerade_rule(interface, *net, Some(*dest)));
            }
        }
    }
    b.verdict_map(true);
    b.verdict_map(false);
    b.chain(TUNNEL_CHAIN);
    b.rule(TUNNEL_CHAIN, vmap_rule(true));
    b.rule(TUNNEL_CHAIN, vmap_rule(false));
    b.rule(
        TUNNEL_CHAIN,
        if default_deny {
            counted_drop(DROPPED_POLICY)
        } else {
            vec![verdict(Verdict::Accept)]
        },
    );
    b.base_chain(FORWARD_CHAIN, "filter", NF_INET_FORWARD, FILTER_PRIORITY);
    for net in networks {
        b.rule(FORWARD_CHAIN, network_rule(interface, *net));
    }
    b.rule(FORWARD_CHAIN, drop_rule(interface));
    b.finish()
}

/// Rules [`install_batch`] writes outside the peer chains.
fn base_rules(sources: &[IpNet], networks: &[IpNet]) -> usize {
    let masq: usize = sources
        .iter()
        .map(|s| {
            if networks.is_empty() {
                1
            } else {
                networks
                    .iter()
                    .filter(|d| d.addr().is_ipv4() == s.addr().is_ipv4())
                    .count()
            }
        })
        .sum();
    masq + 3 + networks.len() + 1
}

/// The removal batch: delete the table.
#[must_use]
pub fn remove_batch(interface: &str) -> Transaction {
    let mut b = Batch::new(interface);
    b.table_message(NFT_MSG_DELTABLE, 0);
    b.finish()
}

/// Appends the rules of `chains` to the (empty) chains of peer `chain`.
fn fill_peer(b: &mut Batch, chain: &str, chains: &PeerChains) {
    for (n, list) in chains.excepts.iter().enumerate() {
        let x = except_chain(chain, n);
        for e in list {
            let mut rule = addr_match(Dir::Destination, *e, true);
            rule.push(verdict(Verdict::Return));
            b.rule(&x, rule);
        }
        b.rule(&x, vec![verdict(Verdict::Accept)]);
    }
    for r in &chains.rules {
        let mut rule = Vec::new();
        if let Some(to) = r.to {
            rule.extend(addr_match(Dir::Destination, to, true));
        }
        if let Some(p) = r.ports {
            rule.extend(ports_match(p));
        }
        let x = r.except.map(|n| except_chain(chain, n));
        rule.push(verdict(x.as_deref().map_or(Verdict::Accept, Verdict::Jump)));
        b.rule(chain, rule);
    }
    b.rule(chain, counted_drop(DROPPED_POLICY));
}

/// Removes peer `chain` entirely: map entries first, then its chains.
fn remove_peer(b: &mut Batch, view: &mut View, chain: &str) -> bool {
    let Some(peer) = view.peer(chain).cloned() else {
        return false;
    };
    b.map_entries(&peer.addresses, None);
    for a in &peer.addresses {
        view.set_owner(*a, None);
    }
    b.delete_chain(chain);
    for n in 0..peer.chains.excepts.len() {
        b.delete_chain(&except_chain(chain, n));
    }
    view.set_peer(chain, None);
    true
}

/// Takes `addresses` out of the entries of every peer but `chain` (a peer left with none loses
/// its chains too); true when there was any.
fn release_addresses(b: &mut Batch, view: &mut View, addresses: &[IpAddr], chain: &str) -> bool {
    let mut released = false;
    for a in addresses {
        let Some(other) = view.owner(a).filter(|o| *o != chain).cloned() else {
            continue;
        };
        released = true;
        let mut left = view.peer(&other).cloned();
        if let Some(p) = &mut left {
            p.addresses.retain(|x| x != a);
        }
        match left {
            Some(p) if p.addresses.is_empty() => {
                remove_peer(b, view, &other);
            }
            p => {
                b.map_entries(&[*a], None);
                view.set_owner(*a, None);
                if let Some(p) = p {
                    view.set_peer(&other, Some(p));
                }
            }
        }
    }
    released
}

/// Writes peer `chain` with `addresses` and `chains`; false when it already held exactly that.
fn write_peer(
    b: &mut Batch,
    view: &mut View,
    chain: &str,
    addresses: &[IpAddr],
    chains: PeerChains,
) -> bool {
    // An address another peer's entry holds moves here (the kernel refuses a clashing entry).
    let mut touched = release_addresses(b, view, addresses, chain);
    let old = view.peer(chain).cloned();
    match &old {
        None => {
            b.chain(chain);
            for n in 0..chains.excepts.len() {
                b.chain(&except_chain(chain, n));
            }
            fill_peer(b, chain, &chains);
            touched = true;
        }
        Some(old) if old.chains != chains => {
            b.flush_chain(chain);
            for n in 0..old.chains.excepts.len() {
                if n < chains.excepts.len() {
                    b.flush_chain(&except_chain(chain, n));
                } else {
                    b.delete_chain(&except_chain(chain, n));
                }
            }
            for n in old.chains.excepts.len()..chains.excepts.len() {
                b.chain(&except_chain(chain, n));
            }
            fill_peer(b, chain, &chains);
            touched = true;
        }
        Some(_) => {}
    }
    let had: &[IpAddr] = old.as_ref().map_or(&[], |o| o.addresses.as_slice());
    let gone: Vec<IpAddr> = had
        .iter()
        .filter(|a| !addresses.contains(a))
        .copied()
        .collect();
    let new: Vec<IpAddr> = addresses
        .iter()
        .filter(|a| view.owner(a).is_none_or(|o| o != chain))
        .copied()
        .collect();
    if !gone.is_empty() {
        b.map_entries(&gone, None);
        for a in &gone {
            view.set_owner(*a, None);
        }
        touched = true;
    }
    if !new.is_empty() {
        b.map_entries(&new, Some(chain));
        for a in &new {
            view.set_owner(*a, Some(chain));
        }
        touched = true;
    }
    if touched {
        view.set_peer(
            chain,
            Some(InstalledPeer {
                addresses: addresses.to_vec(),
                chains,
            }),
        );
    }
    touched
}

/// The batch that takes the per-peer part of `interface`'s table from `current` to what
/// `changes` ask, in order, and the changes it makes: `None` or [`Egress::Unrestricted`] removes
/// the peer's chains and map entries (the `tunnel` default applies to it), [`Egress::Allowed`]
/// (re)writes its chains (flush and refill) and entries. A peer already holding what is asked is
/// not touched; with nothing to do the transaction has no messages.
#[must_use]
pub fn peer_policy_batch(
    interface: &str,
    current: &PeerFilters,
    changes: &[(PeerAddresses, Option<&Egress>)],
) -> (Transaction, PeerDelta, PolicyUpdate) {
    let (tx, delta, done, _) = peer_policy_part(interface, current, changes, usize::MAX);
    (tx, delta, done)
}

/// [`peer_policy_batch`] for the longest prefix of `changes` whose batch stays within `budget`
/// bytes (at least one change); the last value is the length of that prefix.
fn peer_policy_part(
    interface: &str,
    current: &PeerFilters,
    changes: &[(PeerAddresses, Option<&Egress>)],
    budget: usize,
) -> (Transaction, PeerDelta, PolicyUpdate, usize) {
    let mut b = Batch::new(interface);
    let mut view = View {
        base: current,
        delta: PeerDelta::default(),
        undo: Vec::new(),
    };
    let mut done = PolicyUpdate::default();
    let mut taken = changes.len();
    for (i, (peer, egress)) in changes.iter().enumerate() {
        let (batch_mark, view_mark, done_mark) = (b.mark(), view.undo.len(), done);
        let chain = peer.chain();
        let touched = match egress {
            None | Some(Egress::Unrestricted) => {
                // The peer's chains, and its addresses wherever they are (an entry left under
                // another chain would keep that chain's policy on them).
                let removed = remove_peer(&mut b, &mut view, &chain)
                    | release_addresses(&mut b, &mut view, peer.addresses(), &chain);
                done.removed += usize::from(removed);
                removed
            }
            Some(Egress::Allowed(allows)) => {
                let chains = PeerChains::compile(allows);
                let written = write_peer(&mut b, &mut view, &chain, peer.addresses(), chains);
                done.written += usize::from(written);
                written
            }
        };
        done.untouched += usize::from(!touched);
        if i > 0 && b.len_finished() > budget {
            b.rollback(batch_mark);
            view.rollback(view_mark);
            done = done_mark;
            taken = i;
            break;
        }
    }
    let tx = b.finish();
    done.transactions = usize::from(tx.messages > 0);
    (tx, view.delta, done, taken)
}

/// The netfilter netlink socket a [`Nat`] keeps: it belongs to the network namespace of the thread
/// that installed the table, and closing one after a transaction that deleted something waits
/// for an RCU grace period (about 10 ms), which one socket for the table's life pays only once.
#[derive(Debug)]
struct Netlink(Socket, usize);

impl Netlink {
    fn open(op: &'static str) -> Result<Self> {
        let err = |e: std::io::Error| SidecarError::Nat {
            op,
            reason: format!("failed to open a netfilter netlink socket: {e}"),
        };
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(err)?;
        sock.bind_auto().map_err(err)?;
        sock.connect(&SocketAddr::new(0, 0)).map_err(err)?;
        // Errors without the echoed request: a refused 200 KiB batch stays one small answer.
        let _ = sock.set_cap_ack(true);
        Ok(Self(sock, MAX_TRANSACTION_BYTES).with_large_send_buffer())
    }

    /// Asks for [`LARGE_SEND_BUFFER`]; the transaction budget follows what the kernel granted
    /// (without `CAP_NET_ADMIN` the default buffer and [`MAX_TRANSACTION_BYTES`] stay).
    fn with_large_send_buffer(mut self) -> Self {
        use nix::sys::socket::{getsockopt, setsockopt, sockopt};
        if setsockopt(&self.0, sockopt::SndBufForce, &LARGE_SEND_BUFFER).is_ok() {
            if let Ok(granted) = getsockopt(&self.0, sockopt::SndBuf) {
                self.1 = granted
                    .saturating_sub(64 * 1024)
                    .clamp(MAX_TRANSACTION_BYTES, LARGE_TRANSACTION_BYTES);
            }
        }
        self
    }

    /// The largest transaction this socket sends.
    fn budget(&self) -> usize {
        self.1
    }

    /// Sends a transaction and reads every answer: the kernel handles the whole batch while
    /// `send` runs, so the answers are all queued when it returns, and none is left behind.
    fn transact(&self, tx: &Transaction, op: &'static str) -> Result<()> {
        let Some(ack_seq) = tx.ack_seq else {
            return Ok(());
        };
        let err = |reason: String| SidecarError::Nat { op, reason };
        let sock = &self.0;
        sock.set_non_blocking(false)
            .map_err(|e| err(e.to_string()))?;
        sock.send(&tx.bytes, 0).map_err(|e| {
            err(format!(
                "failed to send a {}-byte nf_tables batch: {e}",
                tx.bytes.len()
            ))
        })?;
        let mut acked = false;
        let mut refused: Option<i32> = None;
        loop {
            let buf = match sock.recv_from_full() {
                Ok((buf, _)) => buf,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(err(e.to_string())),
            };
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
                    let seq = u32::from_ne_bytes(field(off + 8));
                    if code != 0 {
                        refused.get_or_insert(code);
                    } else if seq == ack_seq {
                        acked = true;
                    }
                }
                off += (len + 3) & !3;
            }
            // The first answer is waited for; whatever else the batch produced is queued.
            sock.set_non_blocking(true)
                .map_err(|e| err(e.to_string()))?;
        }
        if let Some(code) = refused {
            return Err(err(format!(
                "kernel refused the nf_tables batch: {}",
                std::io::Error::from_raw_os_error(-code)
            )));
        }
        if !acked {
            return Err(err(
                "the kernel did not acknowledge the nf_tables batch".into()
            ));
        }
        Ok(())
    }

    /// Reads the packet count of counter object `name` (one request, its answer and ack).
    fn counter(&self, interface: &str, name: &str) -> Result<u64> {
        let err = |reason: String| SidecarError::Nat {
            op: "read the drop counters of",
            reason,
        };
        let sock = &self.0;
        sock.set_non_blocking(false)
            .map_err(|e| err(e.to_string()))?;
        sock.send(&get_counter_request(interface, name, 1), 0)
            .map_err(|e| err(format!("failed to ask for counter {name}: {e}")))?;
        let mut packets = None;
        loop {
            let buf = match sock.recv_from_full() {
                Ok((buf, _)) => buf,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(err(e.to_string())),
            };
            match counter_packets(&buf) {
                Ok(p) => packets = packets.or(p),
                Err(code) => {
                    return Err(err(format!(
                        "kernel refused to read counter {name}: {}",
                        std::io::Error::from_raw_os_error(-code)
                    )))
                }
            }
            sock.set_non_blocking(true)
                .map_err(|e| err(e.to_string()))?;
        }
        packets.ok_or_else(|| err(format!("no answer with counter {name}")))
    }
}

/// Tunnel packets the table dropped since it was installed (its named counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounters {
    /// For a destination outside the gateway's networks (the forward filter's last rule).
    pub outside_networks: u64,
    /// By a peer's egress chain, or by the `tunnel` chain with `default_deny`.
    pub policy: u64,
}

/// The request `NFT_MSG_GETOBJ` for counter `name` of the table of `interface`.
fn get_counter_request(interface: &str, name: &str, seq: u32) -> Vec<u8> {
    let mut buf = Vec::new();
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ).to_ne_bytes());
    buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&[NFPROTO_INET, 0, 0, 0]);
    for a in [
        s(1, &table_name(interface)),
        s(2, name),
        be32(3, NFT_OBJECT_COUNTER),
    ] {
        a.encode(&mut buf);
    }
    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    buf[..4].copy_from_slice(&len.to_ne_bytes());
    buf
}

/// The attributes `(type without flags, payload)` of a netlink attribute stream.
fn attributes(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & !NLA_F_NESTED;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((ty, &buf[4..len]));
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    out
}

/// The packet count of a counter object in the answers to [`get_counter_request`]:
/// `NFT_MSG_NEWOBJ { …, NFTA_OBJ_DATA { NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS } }`.
/// `Err(errno)` when the kernel answered with an error.
fn counter_packets(answers: &[u8]) -> std::result::Result<Option<u64>, i32> {
    let mut off = 0;
    let mut found = None;
    while off + 16 <= answers.len() {
        let len = u32::from_ne_bytes([
            answers[off],
            answers[off + 1],
            answers[off + 2],
            answers[off + 3],
        ]) as usize;
        if len < 16 || off + len > answers.len() {
            break;
        }
        let ty = u16::from_ne_bytes([answers[off + 4], answers[off + 5]]);
        let body = &answers[off + 16..off + len];
        if ty == NLMSG_ERROR && body.len() >= 4 {
            let code = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
            if code != 0 {
                return Err(code);
            }
        } else if ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ && body.len() >= 4 {
            found = attributes(&body[4..])
                .into_iter()
                .find(|(t, _)| *t == 4)
                .and_then(|(_, data)| {
                    attributes(data)
                        .into_iter()
                        .find(|(t, v)| *t == 2 && v.len() == 8)
                })
                .map(|(_, v)| {
                    let mut b = [0; 8];
                    b.copy_from_slice(v);
                    u64::from_be_bytes(b)
                });
        }
        off += (len + 3) & !3;
    }
    Ok(found)
}

/// The installed table; [`Nat::remove`] deletes it.
#[derive(Debug)]
pub struct Nat {
    netlink: Netlink,
    interface: String,
    base_rules: usize,
    peers: PeerFilters,
}

impl Nat {
    /// [`Nat::install_with`] where peers without a policy reach every gateway network.
    pub fn install(interface: &str, sources: &[IpNet], networks: &[IpNet]) -> Result<Self> {
        Self::install_with(interface, sources, networks, false)
    }

    /// Installs (or re-installs, dropping every peer chain) the table for `interface`, in the
    /// network namespace of the calling thread, which every later call of this `Nat` uses:
    /// masquerading of `sources`, and the forward filter letting tunnel traffic into `networks`
    /// only (with none: nowhere). Peers without a policy get `networks` (`default_deny`:
    /// nothing) until [`Nat::set_peer_policies`] gives them one. One transaction.
    pub fn install_with(
        interface: &str,
        sources: &[IpNet],
        networks: &[IpNet],
        default_deny: bool,
    ) -> Result<Self> {
        let netlink = Netlink::open("install")?;
        netlink.transact(
            &install_batch(interface, sources, networks, default_deny),
            "install",
        )?;
        Ok(Self {
            netlink,
            interface: interface.to_owned(),
            base_rules: base_rules(sources, networks),
            peers: PeerFilters::default(),
        })
    }

    /// Applies peers' egress: `None` or [`Egress::Unrestricted`] removes the peer's chain and map
    /// entries, [`Egress::Allowed`] (re)writes them; peers whose rules did not change are not
    /// touched. One `nf_tables` transaction when the batch fits [`Nat::transaction_budget`]
    /// (about 500 rules of a destination and a port); a larger call is split at peer
    /// boundaries, each transaction all or nothing. On an error, the transactions before it are
    /// in force and [`Nat::rule_counts`] says so; the failing one and those after it are not.
    ///
    /// Batch changes into few calls: the kernel re-validates every chain reachable through the
    /// maps on each commit that adds a rule, whatever its size (about 30 ms at 10 000 peers of
    /// 10 rules; `nft` pays the same).
    pub fn set_peer_policies(
        &mut self,
        changes: &[(PeerAddresses, Option<&Egress>)],
    ) -> Result<PolicyUpdate> {
        let mut done = PolicyUpdate::default();
        let mut rest = changes;
        while !rest.is_empty() {
            let (tx, delta, part, taken) =
                peer_policy_part(&self.interface, &self.peers, rest, self.netlink.budget());
            self.netlink.transact(&tx, "update peer policies in")?;
            self.peers.apply(delta);
            done.add(part);
            rest = &rest[taken..];
        }
        Ok(done)
    }

    /// The largest transaction [`Nat::set_peer_policies`] sends: [`MAX_TRANSACTION_BYTES`], or
    /// up to 8 MiB when the kernel granted the larger send buffer (`CAP_NET_ADMIN`).
    #[must_use]
    pub fn transaction_budget(&self) -> usize {
        self.netlink.budget()
    }

    /// What the per-peer part holds.
    #[must_use]
    pub fn peer_filters(&self) -> &PeerFilters {
        &self.peers
    }

    /// The size of the ruleset, for metrics.
    #[must_use]
    pub fn rule_counts(&self) -> RuleCounts {
        RuleCounts {
            base_rules: self.base_rules,
            peers: self.peers.peers(),
            peer_rules: self.peers.rules(),
            map_entries: self.peers.map_entries(),
        }
    }

    /// The tunnel packets dropped since the table was installed (two counter reads).
    pub fn drop_counters(&self) -> Result<DropCounters> {
        Ok(DropCounters {
            outside_networks: self.netlink.counter(&self.interface, DROPPED_OUTSIDE)?,
            policy: self.netlink.counter(&self.interface, DROPPED_POLICY)?,
        })
    }

    /// Deletes the table.
    pub fn remove(&self) -> Result<()> {
        self.netlink
            .transact(&remove_batch(&self.interface), "remove")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::policy::Block;

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

    fn types(tx: &Transaction) -> Vec<u16> {
        messages(&tx.bytes).iter().map(|m| m.0).collect()
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn peer(addrs: &[&str]) -> PeerAddresses {
        PeerAddresses::new(addrs.iter().map(|a| a.parse().unwrap())).unwrap()
    }

    fn tcp(first: u16, last: u16) -> Ports {
        Ports {
            protocol: Protocol::Tcp,
            first,
            last,
        }
    }

    fn allow_to(cidr: &str, except: &[&str], ports: Option<Vec<Ports>>) -> Allow {
        Allow {
            to: Some(vec![Block {
                cidr: net(cidr),
                except: except.iter().map(|e| net(e)).collect(),
            }]),
            ports,
        }
    }

    // Message types (NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_*).
    const BEGIN: u16 = 0x10;
    const END: u16 = 0x11;
    const NEWTABLE: u16 = 0xa00;
    const DELTABLE: u16 = 0xa02;
    const NEWCHAIN: u16 = 0xa03;
    const DELCHAIN: u16 = 0xa05;
    const NEWRULE: u16 = 0xa06;
    const DELRULE: u16 = 0xa08;
    const NEWSET: u16 = 0xa09;
    const NEWOBJ: u16 = 0xa12;
    const NEWSETELEM: u16 = 0xa0c;
    const DELSETELEM: u16 = 0xa0e;
    const IIF: &[u8] = b"wg0\0\0\0\0\0\0\0\0\0\0\0\0\0";
    // NFTA_DATA_VERDICT nest { NFTA_VERDICT_CODE }.
    const ACCEPT: [u8; 12] = [12, 0, 2, 0x80, 8, 0, 1, 0, 0, 0, 0, 1];
    const DROP: [u8; 12] = [12, 0, 2, 0x80, 8, 0, 1, 0, 0, 0, 0, 0];
    const JUMP: [u8; 8] = [8, 0, 1, 0, 0xff, 0xff, 0xff, 0xfd];
    const RETURN: [u8; 8] = [8, 0, 1, 0, 0xff, 0xff, 0xff, 0xfb];

    fn payload_at(offset: u32) -> Vec<u8> {
        // NFTA_PAYLOAD_OFFSET (type 3, length 8) carrying the big-endian offset.
        let mut a = vec![8, 0, 3, 0];
        a.extend_from_slice(&offset.to_be_bytes());
        a
    }

    #[test]
    fn only_the_last_message_of_a_batch_asks_for_an_acknowledgement() {
        let tx = install_batch("wg0", &[], &[], false);
        let m = messages(&tx.bytes);
        let acked: Vec<usize> = (0..m.len()).filter(|i| m[*i].1 & NLM_F_ACK != 0).collect();
        assert_eq!(acked, vec![m.len() - 2], "the message before batch end");
        assert_eq!(tx.messages, m.len() - 2);
        let seq = |i: usize| {
            let mut off = 0;
            for _ in 0..i {
                off += u32::from_ne_bytes(tx.bytes[off..off + 4].try_into().unwrap()) as usize;
            }
            u32::from_ne_bytes(tx.bytes[off + 8..off + 12].try_into().unwrap())
        };
        assert_eq!(tx.ack_seq, Some(seq(m.len() - 2)));
    }

    #[test]
    fn the_install_batch_recreates_the_table_and_masquerades_each_source_range() {
        let tx = install_batch("wg0", &[net("10.99.0.1/16"), net("fd99::1/64")], &[], false);
        let m = messages(&tx.bytes);
        assert_eq!(
            &types(&tx)[..8],
            [BEGIN, NEWTABLE, DELTABLE, NEWTABLE, NEWOBJ, NEWOBJ, NEWCHAIN, NEWRULE]
        );
        assert!(contains(&m[1].2, b"wg_gateway_wg0\0"));
        assert!(contains(&m[6].2, b"nat\0") && contains(&m[6].2, b"postrouting\0"));
        let v4 = &m[7].2;
        assert!(contains(v4, b"masq\0") && contains(v4, b"payload\0"));
        assert!(
            contains(v4, &[10, 99, 0, 0]),
            "network, not the host address"
        );
        assert!(contains(v4, &[255, 255, 0, 0]), "prefix mask");
        assert!(contains(v4, IIF), "oifname padded to IFNAMSIZ");
        let v6 = &m[8].2;
        assert!(contains(
            v6,
            &[0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        ));
    }

    #[test]
    fn with_networks_the_batch_masquerades_only_towards_them_and_jumps_to_the_tunnel_chain() {
        let tx = install_batch(
            "wg0",
            &[net("10.99.0.1/16"), net("fd99::1/64")],
            &[net("10.20.0.9/24"), net("172.16.0.0/12"), net("fd20::/64")],
            false,
        );
        let m = messages(&tx.bytes);
        // begin, newtable, deltable, newtable, 2 counters, nat chain, 2 × v4 masq + 1 × v6 masq,
        // 2 maps, tunnel chain + 3 rules, forward chain + 3 jumps + drop, end
        assert_eq!(
            types(&tx),
            vec![
                BEGIN, NEWTABLE, DELTABLE, NEWTABLE, NEWOBJ, NEWOBJ, NEWCHAIN, NEWRULE, NEWRULE,
                NEWRULE, NEWSET, NEWSET, NEWCHAIN, NEWRULE, NEWRULE, NEWRULE, NEWCHAIN, NEWRULE,
                NEWRULE, NEWRULE, NEWRULE, END
            ]
        );
        let first = &m[7].2;
        assert!(contains(first, b"masq\0"));
        assert!(contains(first, &payload_at(12)) && contains(first, &payload_at(16)));
        assert!(contains(first, &[10, 99, 0, 0]) && contains(first, &[10, 20, 0, 0]));
        assert!(contains(first, &[255, 255, 255, 0]), "the /24 mask");
        assert!(contains(&m[8].2, &[172, 16, 0, 0]) && contains(&m[8].2, &[255, 240, 0, 0]));
        let v6 = &m[9].2;
        assert!(contains(v6, &payload_at(8)) && contains(v6, &payload_at(24)));
        assert!(
            !contains(v6, &[10, 20, 0, 0]),
            "no pair across address families"
        );
        // The maps: NFT_SET_MAP, key type ipv4_addr (7) / ipv6_addr (8), verdict data.
        let map4 = &m[10].2;
        assert!(contains(map4, b"peers\0") && contains(map4, &[8, 0, 3, 0, 0, 0, 0, 8]));
        assert!(
            contains(map4, &[8, 0, 4, 0, 0, 0, 0, 7]) && contains(map4, &[8, 0, 5, 0, 0, 0, 0, 4])
        );
        assert!(contains(map4, &[8, 0, 6, 0, 0xff, 0xff, 0xff, 0]));
        assert!(contains(&m[11].2, b"peers6\0") && contains(&m[11].2, &[8, 0, 4, 0, 0, 0, 0, 8]));
        // The tunnel chain: a lookup in each map, then the default verdict.
        assert!(contains(&m[12].2, b"tunnel\0"));
        assert!(contains(&m[13].2, b"lookup\0") && contains(&m[13].2, b"peers\0"));
        assert!(
            contains(&m[13].2, &payload_at(12)),
            "keyed by source address"
        );
        assert!(contains(&m[14].2, b"peers6\0") && contains(&m[14].2, &payload_at(8)));
        assert!(
            contains(&m[15].2, &ACCEPT),
            "peers without a policy: accept"
        );
        // The filter chain: forward hook (2), priority 0, policy accept, type filter.
        let chain = &m[16].2;
        assert!(contains(chain, b"forward\0") && contains(chain, b"filter\0"));
        assert!(contains(chain, &[8, 0, 1, 0, 0, 0, 0, 2]), "hook forward");
        assert!(contains(chain, &[8, 0, 2, 0, 0, 0, 0, 0]), "priority 0");
        for (i, addr) in [(17, &[10, 20, 0, 0][..]), (18, &[172, 16, 0, 0][..])] {
            let r = &m[i].2;
            assert!(contains(r, IIF) && contains(r, &payload_at(16)) && contains(r, addr));
            assert!(contains(r, &JUMP) && contains(r, b"tunnel\0"));
            assert!(!contains(r, &ACCEPT) && !contains(r, &DROP));
        }
        assert!(contains(&m[19].2, &payload_at(24)));
        let last = &m[20].2;
        assert!(contains(last, IIF) && contains(last, &DROP) && !contains(last, &ACCEPT));
        assert!(
            !contains(last, b"payload\0"),
            "the drop matches every destination"
        );
    }

    #[test]
    fn with_no_networks_tunnel_traffic_is_dropped_and_default_deny_drops_peers_without_policy() {
        let tx = install_batch("wg0", &[], &[], true);
        let m = messages(&tx.bytes);
        assert_eq!(
            types(&tx),
            vec![
                BEGIN, NEWTABLE, DELTABLE, NEWTABLE, NEWOBJ, NEWOBJ, NEWSET, NEWSET, NEWCHAIN,
                NEWRULE, NEWRULE, NEWRULE, NEWCHAIN, NEWRULE, END
            ]
        );
        assert!(contains(&m[11].2, &DROP), "default deny");
        assert!(contains(&m[13].2, IIF) && contains(&m[13].2, &DROP));
        assert!(!contains(&tx.bytes, b"masq\0"));
        assert_eq!(base_rules(&[], &[]), 4);
    }

    /// Builds the batch for `changes` over `state` and records it as committed.
    fn step(
        state: &mut PeerFilters,
        changes: &[(PeerAddresses, Option<&Egress>)],
    ) -> (Transaction, PolicyUpdate) {
        let (tx, delta, done) = peer_policy_batch("wg0", state, changes);
        state.apply(delta);
        (tx, done)
    }

    #[test]
    fn a_new_peer_gets_its_filled_chain_before_its_map_entry() {
        let egress = Egress::Allowed(vec![allow_to(
            "10.20.0.2/32",
            &[],
            Some(vec![tcp(8080, 8080)]),
        )]);
        let mut state = PeerFilters::default();
        let p = peer(&["10.203.0.2", "fd00::2"]);
        let (tx, done) = step(&mut state, &[(p.clone(), Some(&egress))]);
        let m = messages(&tx.bytes);
        assert_eq!(
            types(&tx),
            vec![BEGIN, NEWCHAIN, NEWRULE, NEWRULE, NEWSETELEM, NEWSETELEM, END]
        );
        assert!(contains(&m[1].2, b"peer_10_203_0_2\0"));
        let rule = &m[2].2;
        assert!(contains(rule, &payload_at(16)) && contains(rule, &[10, 20, 0, 2]));
        assert!(!contains(rule, b"bitwise\0"), "a host needs no mask");
        // meta l4proto (NFTA_META_KEY = 16) == 6, then th dport == 8080.
        assert!(contains(rule, &[8, 0, 2, 0, 0, 0, 0, 16]) && contains(rule, &[5, 0, 1, 0, 6]));
        assert!(contains(rule, &payload_at(2)) && contains(rule, &[6, 0, 1, 0, 0x1f, 0x90]));
        assert!(contains(rule, &ACCEPT));
        assert!(contains(&m[3].2, &DROP));
        let v4 = &m[4].2;
        assert!(contains(v4, b"peers\0") && contains(v4, &[10, 203, 0, 2]));
        assert!(contains(v4, &JUMP) && contains(v4, b"peer_10_203_0_2\0"));
        assert!(contains(&m[5].2, b"peers6\0"));
        assert_eq!(
            (
                done.written,
                state.peers(),
                state.rules(),
                state.map_entries()
            ),
            (1, 1, 2, 2)
        );
        // The same again: nothing to do.
        let before = state.clone();
        let (tx, done) = step(&mut state, &[(p, Some(&egress))]);
        assert_eq!((tx.messages, done.untouched, done.transactions), (0, 1, 0));
        assert_eq!(state, before);
    }

    #[test]
    fn a_changed_policy_flushes_and_refills_and_removal_deletes_entries_before_chains() {
        let old = Egress::Allowed(vec![allow_to("10.20.0.0/24", &["10.20.0.3/32"], None)]);
        let p = peer(&["10.203.0.2"]);
        let mut state = PeerFilters::default();
        let (tx, _) = step(&mut state, &[(p.clone(), Some(&old))]);
        // peer chain, exception chain, return + accept, jump + drop, entry
        assert_eq!(
            types(&tx),
            vec![BEGIN, NEWCHAIN, NEWCHAIN, NEWRULE, NEWRULE, NEWRULE, NEWRULE, NEWSETELEM, END]
        );
        let m = messages(&tx.bytes);
        assert!(contains(&m[2].2, b"peer_10_203_0_2_x0\0"));
        assert!(contains(&m[3].2, &RETURN) && contains(&m[3].2, &[10, 20, 0, 3]));
        assert!(contains(&m[4].2, &ACCEPT));
        assert!(contains(&m[5].2, &JUMP) && contains(&m[5].2, b"peer_10_203_0_2_x0\0"));
        assert_eq!(state.rules(), 4);

        let new = Egress::Allowed(vec![allow_to(
            "10.20.0.2/32",
            &[],
            Some(vec![tcp(8000, 8100)]),
        )]);
        let (tx, done) = step(&mut state, &[(p.clone(), Some(&new))]);
        assert_eq!(
            types(&tx),
            vec![BEGIN, DELRULE, DELCHAIN, NEWRULE, NEWRULE, END],
            "flush, drop the unused exception chain, refill; the entry stays"
        );
        assert!(contains(&messages(&tx.bytes)[3].2, b"range\0"));
        assert_eq!(
            (done.written, state.rules(), state.map_entries()),
            (1, 2, 1)
        );

        let (tx, done) = step(&mut state, &[(p, Some(&Egress::Unrestricted))]);
        assert_eq!(types(&tx), vec![BEGIN, DELSETELEM, DELCHAIN, END]);
        assert_eq!(
            (done.removed, state.peers(), state.map_entries()),
            (1, 0, 0)
        );
        let (tx, done) = step(&mut state, &[(peer(&["10.203.0.9"]), None)]);
        assert_eq!(
            (tx.messages, done.untouched),
            (0, 1),
            "removing an absent peer: nothing"
        );
    }

    #[test]
    fn an_address_moving_to_another_peer_leaves_the_old_entry_first() {
        let deny = Egress::Allowed(vec![]);
        let mut state = PeerFilters::default();
        step(
            &mut state,
            &[(peer(&["10.203.0.2", "10.203.0.7"]), Some(&deny))],
        );
        let (tx, _) = step(
            &mut state,
            &[(peer(&["10.203.0.3", "10.203.0.7"]), Some(&deny))],
        );
        assert_eq!(
            types(&tx),
            vec![BEGIN, DELSETELEM, NEWCHAIN, NEWRULE, NEWSETELEM, END]
        );
        assert_eq!((state.peers(), state.map_entries()), (2, 3));
        assert!(state.has_peer("peer_10_203_0_2") && state.has_peer("peer_10_203_0_3"));
        // The last address leaving takes the peer's chain with it.
        let (tx, _) = step(
            &mut state,
            &[(peer(&["10.203.0.4", "10.203.0.2"]), Some(&deny))],
        );
        assert_eq!(
            &types(&tx)[..4],
            [BEGIN, DELSETELEM, DELCHAIN, NEWCHAIN],
            "the entry of peer_10_203_0_2, its chain, then the new peer's chain"
        );
        assert!(!state.has_peer("peer_10_203_0_2"));
        assert_eq!((state.peers(), state.map_entries()), (2, 4));
    }

    #[test]
    fn removing_a_peer_releases_its_addresses_from_whichever_chain_holds_them() {
        let deny = Egress::Allowed(vec![]);
        let mut state = PeerFilters::default();
        step(
            &mut state,
            &[(peer(&["10.203.0.2", "10.203.0.3"]), Some(&deny))],
        );
        // 10.203.0.2 goes to another peer; the first is now known by 10.203.0.3 alone.
        step(
            &mut state,
            &[(peer(&["10.203.0.9", "10.203.0.2"]), Some(&deny))],
        );
        let (tx, done) = step(&mut state, &[(peer(&["10.203.0.3"]), None)]);
        assert_eq!(types(&tx), vec![BEGIN, DELSETELEM, DELCHAIN, END]);
        assert!(contains(&messages(&tx.bytes)[1].2, &[10, 203, 0, 3]));
        assert_eq!(done.removed, 1);
        assert_eq!((state.peers(), state.map_entries()), (1, 2));
        assert!(state.has_peer("peer_10_203_0_9") && !state.has_peer("peer_10_203_0_2"));
    }

    #[test]
    fn one_call_writes_every_peer_in_one_transaction() {
        let egress = Egress::Allowed(vec![allow_to("10.20.0.0/24", &[], None)]);
        let changes: Vec<(PeerAddresses, Option<&Egress>)> = (2..12)
            .map(|i| (peer(&[&format!("10.203.0.{i}")]), Some(&egress)))
            .collect();
        let mut state = PeerFilters::default();
        let (tx, done) = step(&mut state, &changes);
        let m = messages(&tx.bytes);
        assert_eq!(m.iter().filter(|x| x.0 == BEGIN).count(), 1);
        assert_eq!((done.written, done.transactions, tx.messages), (10, 1, 40));
        assert_eq!(state.rules(), 20);
    }

    #[test]
    fn a_call_over_the_budget_is_split_at_peer_boundaries_into_the_same_result() {
        let egress = Egress::Allowed(vec![allow_to(
            "10.20.0.0/24",
            &["10.20.0.9/32"],
            Some(vec![tcp(443, 443), tcp(8000, 8100)]),
        )]);
        let mut changes: Vec<(PeerAddresses, Option<&Egress>)> = (2..40)
            .map(|i| (peer(&[&format!("10.203.0.{i}")]), Some(&egress)))
            .collect();
        // A removal and an address moving between peers inside the same call.
        changes.push((peer(&["10.203.0.5"]), None));
        changes.push((peer(&["10.203.0.99", "10.203.0.6"]), Some(&egress)));
        let mut whole = PeerFilters::default();
        let (tx, _) = step(&mut whole, &changes);
        let budget = tx.bytes.len() / 5;
        let mut parts = PeerFilters::default();
        let (mut rest, mut sent, mut n) = (&changes[..], 0, 0);
        while !rest.is_empty() {
            let (tx, delta, _, taken) = peer_policy_part("wg0", &parts, rest, budget);
            assert!(taken >= 1 && (tx.bytes.len() <= budget || taken == 1));
            assert_eq!(
                messages(&tx.bytes).last().unwrap().0,
                END,
                "a complete batch"
            );
            parts.apply(delta);
            sent += tx.messages;
            n += 1;
            rest = &rest[taken..];
        }
        assert!(n >= 5, "{n} parts");
        assert_eq!(parts, whole, "the parts add up to the whole");
        assert_eq!(sent, tx.messages, "and to the same messages");
        // 38 peers, minus .5, minus .6 (its only address moved), plus .99 holding two.
        assert_eq!((whole.peers(), whole.map_entries()), (37, 38));
        assert!(!whole.has_peer("peer_10_203_0_6") && whole.has_peer("peer_10_203_0_99"));
    }

    #[test]
    fn an_allow_without_destinations_or_ports_matches_everything_and_empty_allows_nothing() {
        let c = PeerChains::compile(&[Allow {
            to: None,
            ports: Some(vec![tcp(0, u16::MAX), tcp(53, 53)]),
        }]);
        assert_eq!(c.rules.len(), 2);
        assert!(c.rules.iter().all(|r| r.to.is_none()));
        assert_eq!(PeerChains::compile(&[]).kernel_rules(), 1, "only the drop");
        let every = PeerChains::compile(&[Allow {
            to: None,
            ports: None,
        }]);
        assert_eq!(
            every.rules,
            vec![PeerRule {
                to: None,
                ports: None,
                except: None
            }]
        );
    }

    #[test]
    fn chain_names_come_from_the_first_address_and_stay_distinct() {
        assert_eq!(peer(&["10.203.0.2", "fd00::2"]).chain(), "peer_10_203_0_2");
        assert_eq!(peer(&["fd00::2"]).chain(), "peer_fd00__2");
        assert_eq!(
            peer(&["::ffff:1.2.3.4"]).chain(),
            "peer_0_0_0_0_0_ffff_102_304"
        );
        assert_ne!(
            peer(&["::ffff:1:2:3:4"]).chain(),
            peer(&["::ffff:1.2.3.4"]).chain()
        );
        let longest = peer(&["fd00:1111:2222:3333:4444:5555:6666:7777"]).chain();
        assert!(except_chain(&longest, 99).len() < CHAIN_NAME_MAX);
        assert!(PeerAddresses::from_allowed_ips(&[net("10.203.0.0/24")]).is_none());
        assert!(PeerAddresses::from_allowed_ips(&[]).is_none());
        assert_eq!(
            PeerAddresses::from_allowed_ips(&[net("10.203.0.2/32")])
                .unwrap()
                .chain(),
            "peer_10_203_0_2"
        );
    }

    #[test]
    fn the_remove_batch_only_deletes_its_own_table() {
        let tx = remove_batch("wg-gw.0");
        let m = messages(&tx.bytes);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].0, DELTABLE);
        assert!(contains(&m[1].2, b"wg_gateway_wg_gw_0\0"));
        assert_eq!(tx.messages, 1);
    }

    #[test]
    fn table_names_only_hold_safe_characters() {
        assert_eq!(table_name("wg-gw.0"), "wg_gateway_wg_gw_0");
    }
}
