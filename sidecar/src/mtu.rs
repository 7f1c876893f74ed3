//! The WireGuard interface's MTU: `--mtu N` as given, or `--mtu auto` from the path to the
//! gateway endpoint.
//!
//! Owns: the `--mtu` value ([`MtuSetting`]) and the arithmetic of `auto` ([`fit`]), a pure
//! function; `routes::Routes::path_mtu` measures the path and `run` applies the result.
//! Must never: do IO, or pick an MTU outside what the interface and IPv6 allow.
//!
//! How `auto` decides, and why:
//! - **The path MTU** is the route the WireGuard socket's own packets take to the endpoint
//!   (looked up with the socket's firewall mark, so the tunnel's table is skipped as it is for
//!   the packets themselves): the route's `mtu` metric when it has one (a route configured with
//!   `mtu`, or a path MTU the kernel learned from an ICMP "fragmentation needed"), else the
//!   MTU of the interface the route leaves by (the Pod's `eth0`). The outer packets are what
//!   must fit that path; the inner ones are what the interface MTU bounds.
//! - **The overhead** is what WireGuard adds to each inner packet: the outer IP header (20
//!   bytes IPv4, 40 IPv6), UDP (8) and WireGuard's data header and tag (16 + 16): 60 for an IPv4
//!   endpoint, 80 for an IPv6 one. (`wg-quick` always takes 80; taking the family of the
//!   endpoint in use gives an IPv4 path its 20 bytes back.)
//! - **The floor** is 1280 when the tunnel carries IPv6 (routes or an address of the family):
//!   IPv6 requires every link to take 1280 bytes, and Linux removes IPv6 from an interface
//!   below it. A smaller path is warned about: the outer packets are then fragmented, or lost
//!   where the path drops fragments. An IPv4-only tunnel goes down to 576 (the smallest
//!   datagram every IPv4 host must accept). **The ceiling** is 9000 (jumbo frames), the
//!   largest `--mtu N` too.
//! - **When it is decided**: before the interface is created (from the first endpoint) and again
//!   whenever the sidecar moves to another endpoint (failover, a new gateway record), because
//!   two endpoints may lie behind paths of different sizes. Not on a timer: a path that shrinks
//!   later is the kernel's path MTU discovery's business for the outer packets.
//! - **When it cannot be measured** (no endpoint yet, the name does not resolve, the route
//!   lookup fails) the interface gets [`FALLBACK`], the old default, and a warning.

use std::{fmt, net::IpAddr, str::FromStr};

/// Smallest `--mtu N` and the floor of `auto` for a tunnel that carries IPv6 (RFC 8200).
pub const IPV6_MIN: u32 = 1280;
/// The floor of `auto` for an IPv4-only tunnel (RFC 791's minimum reassembly size).
pub const IPV4_MIN: u32 = 576;
/// Largest MTU, fixed or `auto` (jumbo frames).
pub const MAX: u32 = 9000;
/// The MTU when `auto` cannot measure the path (and the default before `auto`).
pub const FALLBACK: u32 = 1420;
/// WireGuard's overhead over an IPv4 path: IPv4 20 + UDP 8 + WireGuard data header 16 + tag 16.
pub const IPV4_OVERHEAD: u32 = 60;
/// WireGuard's overhead over an IPv6 path: IPv6 40 + UDP 8 + 16 + 16.
pub const IPV6_OVERHEAD: u32 = 80;

/// The `--mtu` flag: `auto` or a fixed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtuSetting {
    /// From the path to the gateway endpoint ([`fit`]).
    Auto,
    /// As given (1280–9000).
    Fixed(u32),
}

impl fmt::Display for MtuSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl FromStr for MtuSetting {
    type Err = String;

    fn from_str(v: &str) -> Result<Self, String> {
        if v == "auto" {
            return Ok(Self::Auto);
        }
        v.parse::<u32>()
            .ok()
            .filter(|n| (IPV6_MIN..=MAX).contains(n))
            .map(Self::Fixed)
            .ok_or_else(|| format!("{v:?} is not an MTU: allowed are \"auto\" and an integer from {IPV6_MIN} to {MAX}"))
    }
}

/// Why [`fit`] did not take the path MTU minus the overhead as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clamp {
    /// Raised to the floor (1280 with IPv6, else 576): the path is smaller than that plus the
    /// overhead.
    Floor,
    /// Lowered to [`MAX`].
    Ceiling,
}

/// What `auto` chose and from what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fit {
    /// The interface MTU.
    pub mtu: u32,
    /// The path MTU it came from.
    pub path_mtu: u32,
    /// WireGuard's overhead for the endpoint's family.
    pub overhead: u32,
    /// Set when the result was clamped.
    pub clamped: Option<Clamp>,
}

/// WireGuard's overhead for packets to `endpoint` (an IPv4-mapped IPv6 address travels as IPv4).
#[must_use]
pub fn overhead(endpoint: IpAddr) -> u32 {
    match endpoint.to_canonical() {
        IpAddr::V4(_) => IPV4_OVERHEAD,
        IpAddr::V6(_) => IPV6_OVERHEAD,
    }
}

/// The interface MTU for a path of `path_mtu` bytes to `endpoint`: the path minus WireGuard's
/// overhead, at least 1280 when the tunnel `carries_ipv6` (else 576), at most 9000.
#[must_use]
pub fn fit(path_mtu: u32, endpoint: IpAddr, carries_ipv6: bool) -> Fit {
    let overhead = overhead(endpoint);
    let floor = if carries_ipv6 { IPV6_MIN } else { IPV4_MIN };
    let inner = path_mtu.saturating_sub(overhead);
    let (mtu, clamped) = if inner < floor {
        (floor, Some(Clamp::Floor))
    } else if inner > MAX {
        (MAX, Some(Clamp::Ceiling))
    } else {
        (inner, None)
    };
    Fit {
        mtu,
        path_mtu,
        overhead,
        clamped,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::IpAddr;

    use super::{fit, overhead, Clamp, MtuSetting};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_path_mtu_minus_60_for_an_ipv4_endpoint_and_80_for_an_ipv6_one() {
        let v4 = fit(1500, ip("192.0.2.1"), false);
        assert_eq!((v4.mtu, v4.overhead, v4.clamped), (1440, 60, None));
        assert_eq!(fit(1400, ip("192.0.2.1"), true).mtu, 1340);
        let v6 = fit(1500, ip("2001:db8::1"), true);
        assert_eq!((v6.mtu, v6.overhead, v6.path_mtu), (1420, 80, 1500));
        assert_eq!(overhead(ip("::ffff:192.0.2.1")), 60, "v4-mapped is IPv4");
    }

    #[test]
    fn a_small_path_is_raised_to_1280_with_ipv6_and_to_576_without() {
        let v6 = fit(1300, ip("192.0.2.1"), true);
        assert_eq!((v6.mtu, v6.clamped), (1280, Some(Clamp::Floor)));
        assert_eq!(
            fit(1340, ip("192.0.2.1"), true).clamped,
            None,
            "exactly 1280"
        );
        let v4 = fit(1300, ip("192.0.2.1"), false);
        assert_eq!((v4.mtu, v4.clamped), (1240, None));
        let tiny = fit(600, ip("2001:db8::1"), false);
        assert_eq!((tiny.mtu, tiny.clamped), (576, Some(Clamp::Floor)));
        assert_eq!(fit(0, ip("192.0.2.1"), false).mtu, 576);
    }

    #[test]
    fn a_jumbo_path_is_capped_at_9000() {
        assert_eq!(fit(9000, ip("192.0.2.1"), true).mtu, 8940);
        let big = fit(65_536, ip("192.0.2.1"), true);
        assert_eq!((big.mtu, big.clamped), (9000, Some(Clamp::Ceiling)));
    }

    #[test]
    fn the_flag_takes_auto_or_1280_to_9000_as_before() {
        assert_eq!("auto".parse::<MtuSetting>(), Ok(MtuSetting::Auto));
        assert_eq!("1380".parse::<MtuSetting>(), Ok(MtuSetting::Fixed(1380)));
        assert_eq!("1280".parse::<MtuSetting>(), Ok(MtuSetting::Fixed(1280)));
        assert_eq!("9000".parse::<MtuSetting>(), Ok(MtuSetting::Fixed(9000)));
        for bad in ["1279", "9001", "Auto", "", "-1", "1400.5"] {
            let e = bad.parse::<MtuSetting>().unwrap_err();
            assert!(
                e.contains("\"auto\" and an integer from 1280 to 9000"),
                "{bad}: {e}"
            );
        }
        assert_eq!(MtuSetting::Auto.to_string(), "auto");
        assert_eq!(MtuSetting::Fixed(1420).to_string(), "1420");
    }
}
