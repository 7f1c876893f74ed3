//! Tunnel address pools: which address a newly provisioned identity gets.
//!
//! Owns: the pure choice of the lowest free host address in a pool (IPv4 and IPv6), the addresses
//! a pool never hands out (network, broadcast, and the first host, which is the gateway's), and
//! the name of the per-address allocation record in Vault.
//! Must never: do IO. Collision freedom across concurrent `keys provision` runs comes from the
//! caller writing the allocation record with KV v2 check-and-set `cas=0` ("only if absent").

use std::{
    collections::HashSet,
    hash::BuildHasher,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

use crate::error::{Result, SidecarError};

/// How many candidates an IPv6 pool scans at most (pools hand out addresses densely from the
/// bottom, so this bounds the work, not the pool).
const V6_SCAN_LIMIT: u128 = 1 << 20;

/// The gateway's own tunnel address in `pool`: the first host (`10.99.0.1` in `10.99.0.0/16`).
#[must_use]
pub fn gateway_address(pool: IpNet) -> IpAddr {
    nth(pool, 1).unwrap_or_else(|| pool.network())
}

/// The `n`-th address of `pool` counted from its network address, if inside the pool.
fn nth(pool: IpNet, n: u128) -> Option<IpAddr> {
    let pool = pool.trunc();
    match pool {
        IpNet::V4(p) => {
            let size = 1u128 << (32 - u32::from(p.prefix_len()));
            if n >= size {
                return None;
            }
            let base = u32::from(p.network());
            let n = u32::try_from(n).ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(base.checked_add(n)?)))
        }
        IpNet::V6(p) => {
            let bits = 128 - u32::from(p.prefix_len());
            if bits < 128 && n >= (1u128 << bits) {
                return None;
            }
            let base = u128::from(p.network());
            Some(IpAddr::V6(Ipv6Addr::from(base.checked_add(n)?)))
        }
    }
}

/// The lowest address of `pool` that is not in `taken` and is not reserved (network address,
/// the gateway's first host, and for IPv4 the broadcast address).
pub fn first_free<S: BuildHasher>(pool: IpNet, taken: &HashSet<IpAddr, S>) -> Result<IpAddr> {
    let pool = pool.trunc();
    let exhausted = || SidecarError::PoolExhausted {
        pool: pool.to_string(),
    };
    let (last, limit) = match pool {
        IpNet::V4(p) => {
            let size = 1u128 << (32 - u32::from(p.prefix_len()));
            // /31 and /32 have no room for a gateway and a peer.
            if size < 4 {
                return Err(exhausted());
            }
            (size - 2, size - 2)
        }
        IpNet::V6(p) => {
            let bits = 128 - u32::from(p.prefix_len());
            let size = if bits >= 128 {
                u128::MAX
            } else {
                1u128 << bits
            };
            if size < 4 {
                return Err(exhausted());
            }
            (size - 1, V6_SCAN_LIMIT.min(size - 1))
        }
    };
    (2..=limit.min(last))
        .filter_map(|n| nth(pool, n))
        .find(|a| !taken.contains(a))
        .ok_or_else(exhausted)
}

/// A free address of `pool` chosen from a random start (`seed`), so Pods starting together
/// rarely race for the same address; wraps around and falls back to [`first_free`].
pub fn pick_free<S: BuildHasher>(
    pool: IpNet,
    taken: &HashSet<IpAddr, S>,
    seed: u64,
) -> Result<IpAddr> {
    let pool = pool.trunc();
    let span: u128 = match pool {
        IpNet::V4(p) => (1u128 << (32 - u32::from(p.prefix_len()))).saturating_sub(3),
        IpNet::V6(p) => {
            let bits = 128 - u32::from(p.prefix_len());
            if bits >= 128 {
                V6_SCAN_LIMIT
            } else {
                ((1u128 << bits).saturating_sub(2)).min(V6_SCAN_LIMIT)
            }
        }
    };
    if span == 0 {
        return first_free(pool, taken);
    }
    let start = u128::from(seed) % span;
    // A bounded scan upwards from the random start, then the dense scan from the bottom.
    for i in 0..span.min(4096) {
        let n = 2 + (start + i) % span;
        if let Some(a) = nth(pool, n) {
            if !taken.contains(&a) && !is_reserved(pool, a) {
                return Ok(a);
            }
        }
    }
    first_free(pool, taken)
}

fn is_reserved(pool: IpNet, a: IpAddr) -> bool {
    match pool {
        IpNet::V4(p) => a == IpAddr::V4(p.broadcast()) || a == IpAddr::V4(p.network()),
        IpNet::V6(p) => a == IpAddr::V6(p.network()),
    }
}

/// The host prefix of an allocated address (`/32` or `/128`): what the peer owns in the tunnel.
#[must_use]
pub fn host_net(addr: IpAddr) -> IpNet {
    IpNet::from(addr)
}

/// The allocation record name for `addr` (a single path segment: `:` becomes `-`).
#[must_use]
pub fn record_name(addr: IpAddr) -> String {
    addr.to_string().replace(':', "-")
}

/// Parses an allocation record name back into its address (`None` for foreign names).
#[must_use]
pub fn parse_record_name(name: &str) -> Option<IpAddr> {
    let name = name.trim_end_matches('/');
    name.parse::<Ipv4Addr>().map(IpAddr::V4).ok().or_else(|| {
        name.replace('-', ":")
            .parse::<Ipv6Addr>()
            .ok()
            .map(IpAddr::V6)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::{collections::HashSet, net::IpAddr};

    use ipnet::IpNet;

    use super::{first_free, gateway_address, parse_record_name, record_name};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn the_first_peer_gets_the_second_host_because_the_first_is_the_gateways() {
        let pool = net("10.99.0.0/16");
        assert_eq!(gateway_address(pool), ip("10.99.0.1"));
        assert_eq!(first_free(pool, &HashSet::new()).unwrap(), ip("10.99.0.2"));
    }

    #[test]
    fn taken_addresses_are_skipped_and_holes_are_reused() {
        let pool = net("10.99.0.0/16");
        let taken: HashSet<IpAddr> = [ip("10.99.0.2"), ip("10.99.0.4")].into();
        assert_eq!(first_free(pool, &taken).unwrap(), ip("10.99.0.3"));
    }

    #[test]
    fn a_full_ipv4_pool_is_exhausted_and_never_hands_out_the_broadcast() {
        let pool = net("10.99.0.0/29");
        let mut taken = HashSet::new();
        for _ in 0..5 {
            taken.insert(first_free(pool, &taken).unwrap());
        }
        assert!(!taken.contains(&ip("10.99.0.7")));
        let err = first_free(pool, &taken).unwrap_err().to_string();
        assert!(err.contains("10.99.0.0/29"), "{err}");
        assert!(first_free(net("10.0.0.0/31"), &HashSet::new()).is_err());
    }

    #[test]
    fn ipv6_pools_allocate_from_the_bottom() {
        let pool = net("fd99::/64");
        assert_eq!(first_free(pool, &HashSet::new()).unwrap(), ip("fd99::2"));
        let taken: HashSet<IpAddr> = [ip("fd99::2")].into();
        assert_eq!(first_free(pool, &taken).unwrap(), ip("fd99::3"));
    }

    #[test]
    fn record_names_are_one_path_segment_and_round_trip() {
        for a in ["10.99.0.2", "fd99::2"] {
            let n = record_name(ip(a));
            assert!(!n.contains('/') && !n.contains(':'), "{n}");
            assert_eq!(parse_record_name(&n), Some(ip(a)));
        }
        assert_eq!(parse_record_name("not-an-ip"), None);
    }
}
